"""make export / make import: a run's stage folders through one archive, every file checked against its manifest."""
import io
import json
import os
import tarfile

import pytest

from stages import transfer
from cart_intent.artifacts import sha256_file


def _stage(folder, files: dict[str, bytes], stage: str) -> None:
    """A finished stage folder: its files, then a manifest listing them as publish() does."""
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    outputs = {relative: {"bytes": len(data), "sha256": sha256_file(folder / relative)}
               for relative, data in sorted(files.items())}
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "outputs": outputs}))


@pytest.fixture
def run(tmp_path):
    """artifacts/demo with flat, nested and per-host stage folders, plus what must never travel."""
    run_dir = tmp_path / "artifacts" / "demo"
    _stage(run_dir / "data", {"train.jsonl": b'{"id": 1}\n', "stats.json": b"{}"}, "generate")
    _stage(run_dir / "gguf", {"tiny/model-Q4_K_M.gguf": os.urandom(300_000), "tiny/convert.log": b"ok"}, "gguf")
    _stage(run_dir / "profiles" / "amd-epyc-2c-d03123" / "cpu",
           {"results.json": b'{"rows": []}', "requests/tiny__Q4_K_M.jsonl": b"{}\n"}, "profile_cpu")
    (run_dir / ".cache" / "api").mkdir(parents=True)
    (run_dir / ".cache" / "api" / "responses.jsonl").write_text("paid answers stay here\n")
    (run_dir / ".merge.tmp").mkdir()                       # an interrupted stage
    (run_dir / "merge").mkdir()                            # a folder without manifest: never trusted
    (run_dir / "merge" / "half.safetensors").write_bytes(b"partial")
    config = tmp_path / "demo.toml"
    config.write_text(f'[run]\nname = "demo"\nartifacts_dir = "{tmp_path / "artifacts"}"\n')
    return run_dir, config


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _export(config, *extra) -> int:
    return transfer.main(["export", "--config", str(config), *extra])


def _repack(archive, out, change):
    """The archive's members through change(name, data) -> data or None (dropped); extra members appended."""
    with tarfile.open(archive, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            data = change(member.name, src.extractfile(member).read())
            if data is not None:
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    return out


def test_round_trip_restores_every_stage_folder_byte_for_byte(run, tmp_path, capsys):
    run_dir, config = run
    archive = tmp_path / "demo.tar.gz"
    assert _export(config, "--out", str(archive)) == 0
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == transfer.INDEX
    assert not [n for n in names if "/.cache/" in n or ".tmp" in n or "/merge/" in n]

    elsewhere = tmp_path / "other-host" / "artifacts"
    assert transfer.main(["import", str(archive), "--artifacts-dir", str(elsewhere)]) == 0
    for folder in ("data", "gguf", "profiles/amd-epyc-2c-d03123/cpu"):
        assert _files(elsewhere / "demo" / folder) == _files(run_dir / folder), folder
    assert sorted(p.name for p in elsewhere.iterdir()) == ["demo"]   # the staging folder is gone
    assert "added" in capsys.readouterr().err

    assert transfer.main(["import", str(archive), "--artifacts-dir", str(elsewhere)]) == 0
    assert capsys.readouterr().err.count("unchanged") == 3


def test_export_of_chosen_stages_and_a_changed_folder_replacing_the_old_one(run, tmp_path, capsys):
    run_dir, config = run
    assert _export(config, "--stages", "profile-cpu,data") == 0           # by stage name and by folder
    archive = run_dir.parent / "demo-profile-cpu+data.tar.gz"
    with tarfile.open(archive) as tar:
        folders = json.loads(tar.extractfile(transfer.INDEX).read())["folders"]
    assert sorted(folders) == ["data", "profiles/amd-epyc-2c-d03123/cpu"]
    assert _export(config, "--stages", "nope") == 2
    assert "--stages nope: no finished stage folder" in capsys.readouterr().err

    elsewhere = tmp_path / "elsewhere"
    _stage(elsewhere / "demo" / "data", {"old.jsonl": b"stale"}, "generate")
    assert transfer.main(["import", str(archive), "--artifacts-dir", str(elsewhere)]) == 0
    assert _files(elsewhere / "demo" / "data") == _files(run_dir / "data")
    assert "replaced" in capsys.readouterr().err


def test_export_refuses_a_stage_folder_changed_after_its_manifest(run, tmp_path, capsys):
    run_dir, config = run
    (run_dir / "data" / "stats.json").write_bytes(b"[]")                  # same size, other content
    assert _export(config, "--out", str(tmp_path / "x.tar.gz")) == 3
    err = capsys.readouterr().err
    assert "stats.json does not match its SHA-256" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*x.tar.gz*"))                           # no partial archive left


@pytest.mark.parametrize("damage, message", [
    (lambda name, data: data[:-1] + bytes([data[-1] ^ 1]) if name.endswith(".gguf") else data, "is corrupted"),
    (lambda name, data: None if name.endswith("convert.log") else data, "is missing"),
    (lambda name, data: None if name.endswith("gguf/manifest.json") else data, "manifest.json is missing"),
    (lambda name, data: b'{"run": "demo"}' if name == transfer.INDEX else data, "no readable"),
])
def test_import_refuses_a_corrupted_or_partial_archive_and_places_nothing(run, tmp_path, capsys, damage, message):
    _, config = run
    archive = tmp_path / "demo.tar.gz"
    assert _export(config, "--out", str(archive)) == 0
    bad = _repack(archive, tmp_path / "bad.tar.gz", damage)
    target = tmp_path / "target"
    capsys.readouterr()
    assert transfer.main(["import", str(bad), "--artifacts-dir", str(target)]) == 3
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(target.iterdir()) == []                                    # nothing placed, staging removed


def test_import_refuses_files_no_manifest_lists(run, tmp_path, capsys):
    _, config = run
    archive = tmp_path / "demo.tar.gz"
    assert _export(config, "--out", str(archive)) == 0
    bad = tmp_path / "extra.tar.gz"
    with tarfile.open(archive, "r:gz") as src, tarfile.open(bad, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        extra = tarfile.TarInfo("demo/data/unlisted.txt")
        extra.size = 3
        dst.addfile(extra, io.BytesIO(b"abc"))
    assert transfer.main(["import", str(bad), "--artifacts-dir", str(tmp_path / "t")]) == 3
    assert "demo/data/unlisted.txt is not listed in any manifest" in capsys.readouterr().err


def test_import_checks_sizes_before_writing_a_member(run, tmp_path, capsys, monkeypatch):
    """A listed file grown to other than its manifest's size is refused before any of it is extracted."""
    _, config = run
    archive = tmp_path / "demo.tar.gz"
    assert _export(config, "--out", str(archive)) == 0
    bad = _repack(archive, tmp_path / "grown.tar.gz",
                  lambda name, data: data + b" " * 4096 if name == "demo/data/stats.json" else data)
    written = []
    extract = tarfile.TarFile.extractall
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda self, path, members, **kw: (
        written.extend(m.name for m in members), extract(self, path, members=members, **kw))[1])
    assert transfer.main(["import", str(bad), "--artifacts-dir", str(tmp_path / "t")]) == 3
    assert "demo/data/stats.json is " in capsys.readouterr().err
    assert "demo/data/stats.json" not in written and all(n.endswith(".json") for n in written)


def test_import_refuses_a_truncated_archive(run, tmp_path, capsys):
    _, config = run
    archive = tmp_path / "demo.tar.gz"
    assert _export(config, "--out", str(archive)) == 0
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert transfer.main(["import", str(truncated), "--artifacts-dir", str(tmp_path / "t")]) == 3
    assert "is not a complete tar.gz archive" in capsys.readouterr().err
    assert list((tmp_path / "t").iterdir()) == []
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not an archive at all")
    assert transfer.main(["import", str(garbage), "--artifacts-dir", str(tmp_path / "t")]) == 3
    assert transfer.main(["import", str(tmp_path / "absent.tar.gz")]) == 2


@pytest.mark.parametrize("name", ["../escaped.txt", "{tmp}/escaped.txt", "demo/data/../../../escaped.txt"])
def test_import_refuses_paths_outside_the_run(tmp_path, capsys, name):
    member = tarfile.TarInfo(name.format(tmp=tmp_path))
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        index = json.dumps({"run": "demo", "folders": {"data": "0" * 64}}).encode()
        info = tarfile.TarInfo(transfer.INDEX)
        info.size = len(index)
        tar.addfile(info, io.BytesIO(index))
        member.size = 4
        tar.addfile(member, io.BytesIO(b"evil"))
    target = tmp_path / "deep" / "artifacts"
    assert transfer.main(["import", str(archive), "--artifacts-dir", str(target)]) == 3
    assert "unsafe path" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escaped.txt"))
    assert list(target.iterdir()) == []


def test_import_refuses_links(tmp_path, capsys):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("demo/data/train.jsonl")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    assert transfer.main(["import", str(archive), "--artifacts-dir", str(tmp_path / "t")]) == 3
    assert "is a link or device" in capsys.readouterr().err


def test_export_of_a_run_without_finished_stages(tmp_path, capsys):
    config = tmp_path / "empty.toml"
    config.write_text(f'[run]\nname = "empty"\nartifacts_dir = "{tmp_path}"\n')
    assert _export(config) == 3
    assert "has no finished stage folder" in capsys.readouterr().err
    assert transfer.main(["export", "--config", str(tmp_path / "missing.toml")]) == 2


def test_export_to_a_folder_or_an_unwritable_place_is_one_line_and_writes_nothing(run, tmp_path, capsys):
    _, config = run
    assert _export(config, "--out", str(tmp_path)) == 2   # a folder: IsADirectoryError before
    assert "ending in .tar.gz" in capsys.readouterr().err
    assert _export(config, "--out", "/proc/run.tar.gz") == 2   # not writable: FileNotFoundError before
    assert "cannot write it" in capsys.readouterr().err and not list(tmp_path.glob(".*.partial"))

"""llama.cpp's converter, taken from the installed llama-cpp-python's own source distribution.

One llama.cpp version converts, quantizes and runs: the commit vendored in the pinned
llama-cpp-python. `make venv` runs `python -m stages.lib.llama_cpp_tools install` once, which
downloads that version's sdist from PyPI (hash-checked), and keeps `convert_hf_to_gguf.py`, its
`conversion/` package and `gguf-py/` under `<venv>/share/llama.cpp/`, with the commit in `COMMIT`.
No llama.cpp code is copied into this repository.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from importlib import metadata
from pathlib import Path

PACKAGE = "llama-cpp-python"
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


class ToolsMissing(Exception):
    """The converter is not installed where the stage looks for it."""


def tools_dir() -> Path:
    return Path(os.environ.get("LLAMA_CPP_TOOLS", Path(sys.prefix) / "share" / "llama.cpp"))


def converter() -> tuple[Path, str]:
    """Path of convert_hf_to_gguf.py and the llama.cpp commit it came from."""
    folder = tools_dir()
    script, commit = folder / "convert_hf_to_gguf.py", folder / "COMMIT"
    if not (script.is_file() and commit.is_file()):
        raise ToolsMissing(f"llama.cpp converter not found in {folder}: run `make venv` "
                           f"(or `python -m stages.lib.llama_cpp_tools install`)")
    return script, commit.read_text().strip()


def weights_read_per_token(gguf_file: Path) -> dict:
    """Bytes of weights one decode step reads: every tensor, except the token embedding table when the
    model has a separate output matrix (then only one row of it is looked up per token)."""
    script, _ = converter()
    sys.path.insert(0, str(script.parent / "gguf-py"))
    from gguf import GGUFReader
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf_file)).tensors}
    separate_output = "output.weight" in tensors
    read = sum(n for name, n in tensors.items() if not (separate_output and name == "token_embd.weight"))
    return {"bytes_per_token": read, "tensor_bytes": sum(tensors.values()), "tied_embeddings": not separate_output}


def tensor_types(gguf_file: Path) -> dict[str, dict]:
    """Storage type -> tensors, parameters and bytes in one GGUF file: which tensors a k-quant left in another
    type (llama.cpp falls back when a row length is not a multiple of the type's block, e.g. 576 for 256)."""
    script, _ = converter()
    sys.path.insert(0, str(script.parent / "gguf-py"))
    from gguf import GGUFReader
    mix: dict[str, dict] = {}
    for tensor in GGUFReader(str(gguf_file)).tensors:
        entry = mix.setdefault(tensor.tensor_type.name, {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += int(tensor.n_elements)
        entry["bytes"] += int(tensor.n_bytes)
    return dict(sorted(mix.items(), key=lambda kv: -kv[1]["parameters"]))


def _sdist_url(version: str) -> tuple[str, str]:
    """The sdist's URL and sha256 from PyPI's simple index (JSON form, PEP 691)."""
    request = urllib.request.Request(f"https://pypi.org/simple/{PACKAGE}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        files = json.load(resp)["files"]
    wanted = f"llama_cpp_python-{version}.tar.gz"
    for file in files:
        if file["filename"] == wanted:
            return file["url"], file["hashes"]["sha256"]
    raise SystemExit(f"{wanted} is not on PyPI")


def install(dest: Path) -> str:
    """Download the installed version's sdist, keep the converter files and record the commit."""
    version = metadata.version(PACKAGE)
    url, sha256 = _sdist_url(version)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        urllib.request.urlretrieve(url, archive)
        if hashlib.sha256(archive.read_bytes()).hexdigest() != sha256:
            raise SystemExit(f"{url}: sha256 does not match PyPI's record")
        root = f"llama_cpp_python-{version}/"
        vendor, head = root + "vendor/llama.cpp/", root + ".git/modules/vendor/llama.cpp/HEAD"
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(vendor)
                       and m.name[len(vendor):].startswith(KEEP)]
            for member in members:
                member.name = member.name[len(vendor):]
                tar.extract(member, staging, filter="data")
            commit = tar.extractfile(head).read().decode().strip()
        (staging / "COMMIT").write_text(commit + "\n")
        (staging / "VERSION").write_text(f"{PACKAGE}=={version}\n")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(staging, dest)
    return commit


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        raise SystemExit("usage: python -m stages.lib.llama_cpp_tools install")
    target = tools_dir()
    print(f"llama.cpp {install(target)} converter installed in {target}")

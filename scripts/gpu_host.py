"""The package side of scripts/gpu-check.sh: wheels made on a connected machine, installed on a GPU host that
reaches no package index, never from one. Stdlib only: it runs under the host's python before anything is there.

    python scripts/gpu_host.py download        # `make gpu-wheels`: requirements/gpu-host.lock -> gpu-wheels/
    python3 scripts/gpu_host.py install --site /tmp/site --results artifacts/gpu-check     # on the GPU host
    python scripts/gpu_host.py index --wheels DIR --lock FILE   # (re)write DIR/wheels.json from the wheels in DIR

`install` checks the host's torch and transformers against the lock's `# host:` line, then installs with
`pip --no-index --no-deps --target SITE` only the pins the host lacks in that exact version, each wheel checked
against the SHA-256 in wheels.json first. The other commands serve gpu-check.sh: `cuda`, `importable MODULE`,
`record`/`skip` (a step's outcome), `summary` (every JSON of the check in one file, printed).
Exit codes: 0 ok, 1 pip failed (or `cuda`/`importable` said no), 2 bad usage or an incompatible host python,
3 the wheel folder is missing, incomplete or altered.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cart_intent.artifacts import sha256_file as sha256  # noqa: E402 - stdlib only, like this file
LOCK = ROOT / "requirements" / "gpu-host.lock"
WHEELS = ROOT / "gpu-wheels"
INDEX = "wheels.json"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64"]
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)\s*(#.*)?")


class Failure(Exception):
    """One line for the user and an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0): enough to compare against a floor."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(x) for x in match.group(0).split(".")) if match else ()


def read_lock(path: Path) -> tuple[list[dict], list[str]]:
    """The pins (name, version, hashes, sdist) and the `# host:` requirements of a lock file."""
    if not path.is_file():
        raise Failure(2, f"{path}: no such lock file")
    pins, host = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if text.startswith("# host:"):
            host += text.split(":", 1)[1].split()
        elif text and not text.startswith("#"):
            match = PIN.fullmatch(text)
            if not match:
                raise Failure(2, f"{path}:{number}: expected `name==version --hash=sha256:HEX [# sdist]`, got {text!r}")
            pins.append({"name": canon(match[1]), "version": match[2], "hashes": re.findall(r"[0-9a-f]{64}", match[3]),
                         "sdist": (match[4] or "").startswith("# sdist")})
    return pins, host


def wheel_tags(filename: str) -> tuple[str, str, str, str, str]:
    """name, version, python tag, abi tag, platform tag of a wheel file name."""
    parts = filename[:-len(".whl")].split("-")
    return canon(parts[0]), parts[1], parts[-3], parts[-2], parts[-1]


def runs_on(filename: str, python: str) -> bool:
    """Whether a wheel installs on CPython `python` (e.g. '3.12') on x86-64 Linux."""
    _, _, py, abi, platform = wheel_tags(filename)
    digits = python.replace(".", "")
    pythons = set(py.split("."))
    fits_python = bool(pythons & {"py3", f"py{digits}", f"cp{digits}"}) or (abi == "abi3" and any(
        p.startswith("cp3") and int(p[3:]) <= int(digits[1:]) for p in pythons))
    fits_platform = all(p == "any" or p.endswith("_x86_64") and p.startswith(("manylinux", "linux"))
                        for p in platform.split("."))
    return fits_python and fits_platform


# ---- on a connected machine: make gpu-wheels --------------------------------------------------------------

def pip(python: str, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pip", *args, "--disable-pip-version-check"], text=True,
                          capture_output=capture)


def pinned(pins: list[dict], path: Path) -> Path:
    path.write_text("".join(f"{p['name']}=={p['version']}" + "".join(f" --hash=sha256:{h}" for h in p["hashes"]) + "\n"
                            for p in pins))
    return path


def build_python(version: str, given: str | None) -> str | None:
    """A Python `version` here to build C extensions for the host: --build-python, python3.X or pyenv's."""
    candidates = [given] if given else [sys.executable, shutil.which(f"python{version}") or ""]
    pyenv = shutil.which("pyenv")
    if pyenv and not given:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(str(p) for p in Path(root or "/nonexistent").glob(f"versions/{version}*/bin/python{version}"))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    if given:
        raise Failure(2, f"--build-python {given} is not a working Python {version}")
    return None


def build_sdists(pins: list[dict], tmp: Path, out: Path, python: str | None, target: str) -> list[dict]:
    """A wheel of each pinned sdist (hash-checked by pip), built with a Python `target` where one is found (C
    extensions need it; pure ones build anywhere); the pins that could not be built, and why."""
    failed = []
    for pin in pins:
        print(f"building {pin['name']}=={pin['version']} from its sdist", flush=True)
        proc = pip(python or sys.executable, "wheel", "--no-deps", "--require-hashes", f"--no-binary={pin['name']}",
                   "-q", "-w", str(out), "-r", str(pinned([pin], tmp / f"{pin['name']}.txt")), capture=True)
        if proc.returncode != 0:
            last = ([ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or ["no ERROR line"])[0][:160]
            failed.append({"name": pin["name"], "reason": f"building a wheel from the sdist failed: {last}"})
    for wheel in out.glob("*.whl"):
        if not runs_on(wheel.name, target):
            wheel.unlink()
            failed.append({"name": wheel_tags(wheel.name)[0], "reason": f"a C extension: building it for Python "
                           f"{target} needs a python{target} here (none found; make gpu-wheels BUILD_PYTHON=...)"})
    return failed


def download(args) -> int:
    pins, _ = read_lock(args.lock)
    out, target = args.out, args.python_version
    out.mkdir(parents=True, exist_ok=True)
    platform = [f"--platform={p}" for p in PLATFORMS] + ["--platform=any"]
    with tempfile.TemporaryDirectory(prefix=".download-", dir=out) as tmp:
        tmp = Path(tmp)
        wheels, built = tmp / "wheels", tmp / "built"
        binary = [p for p in pins if not p["sdist"]]
        if binary and pip(sys.executable, "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
                          f"--python-version={target}", "--implementation=cp", f"--abi=cp{target.replace('.', '')}",
                          "--abi=abi3", "--abi=none", *platform, "-d", str(wheels),
                          "-r", str(pinned(binary, tmp / "wheels.txt"))).returncode != 0:
            raise Failure(1, f"pip could not download the wheels pinned in {args.lock} (see its error above)")
        sdists = [p for p in pins if p["sdist"]]
        failed = build_sdists(sdists, tmp, built, build_python(target, args.build_python), target) if sdists else []
        for old in out.glob("*.whl"):
            old.unlink()
        for wheel in [*wheels.glob("*.whl"), *built.glob("*.whl")]:
            shutil.move(str(wheel), out / wheel.name)
    index = write_index(out, args.lock, target, failed)
    show_sizes(out, index, args.max_mib)
    return 0


def write_index(folder: Path, lock: Path, target: str, failed: list[dict]) -> dict:
    """wheels.json: each pin's wheel (file, SHA-256, size) and the pins that could not be prepared, with why."""
    pins, _ = read_lock(lock)
    files = {wheel_tags(p.name)[:2]: p for p in folder.glob("*.whl")}
    wheels, missing = [], []
    for pin in pins:
        path = files.get((pin["name"], pin["version"]))
        if path is None:
            reason = next((f["reason"] for f in failed if f["name"] == pin["name"]), "no wheel for it in the folder")
            missing.append({"name": pin["name"], "version": pin["version"], "reason": reason})
            continue
        digest = sha256(path)
        if not pin["sdist"] and pin["hashes"] and digest not in pin["hashes"]:
            raise Failure(3, f"{path}: SHA-256 {digest} is not among the hashes pinned in {lock}")
        wheels.append({"name": pin["name"], "version": pin["version"], "file": path.name, "sha256": digest,
                       "bytes": path.stat().st_size, "source": "built here from the pinned sdist" if pin["sdist"] else "index"})
    index = {"python": target, "lock": str(lock.name), "lock_sha256": sha256(lock), "wheels": wheels,
             "not_carried": missing, "total_bytes": sum(w["bytes"] for w in wheels)}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def tree_bytes() -> int:
    """Bytes of the tracked working tree (what travels beside the wheel folder)."""
    proc = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True)
    names = proc.stdout.decode(errors="replace").split("\0") if proc.returncode == 0 else []
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def show_sizes(folder: Path, index: dict, max_mib: float) -> None:
    for wheel in sorted(index["wheels"], key=lambda w: -w["bytes"]):
        print(f"  {wheel['bytes'] / 2**20:7.2f} MiB  {wheel['file']}")
    for item in index["not_carried"]:
        print(f"  not carried: {item['name']}=={item['version']}: {item['reason']}")
    total, tree = index["total_bytes"] / 2**20, tree_bytes() / 2**20
    print(f"{folder}: {len(index['wheels'])} wheels, {total:.1f} MiB for Python {index['python']} "
          f"({total + tree:.1f} MiB with the tracked working tree)")
    if max_mib and total > max_mib:
        raise Failure(3, f"{folder} holds {total:.1f} MiB, over the {max_mib} MiB allowed (--max-mib)")


def index_command(args) -> int:
    index = write_index(args.wheels, args.lock, args.python_version, [])
    show_sizes(args.wheels, index, args.max_mib)
    return 0


# ---- on the GPU host: install what is missing, from the folder only ------------------------------------------

def host_version(name: str, site: Path) -> str | None:
    """The version this python has of a distribution, not counting what an earlier run put in `site`."""
    paths = [p for p in sys.path if Path(p or ".").resolve() != site.resolve()]
    found = [d.version for d in metadata.distributions(path=paths) if canon(d.metadata["Name"] or "") == name]
    return found[0] if found else None


def check_host(requirements: list[str], site: Path) -> dict:
    """Each `# host:` requirement present (and not older than its floor), else one line saying which is not."""
    versions = {}
    for requirement in requirements:
        name, _, floor = requirement.partition(">=")
        version = host_version(canon(name), site)
        if version is None or (floor and release(version) < release(floor)):
            have = f"has {name} {version}" if version else f"has no {name}"
            raise Failure(2, f"{sys.executable} {have}; this check needs {requirement} already on the host "
                          "(those are never carried): use PYTHON=<a python with them>")
        versions[canon(name)] = version
    return versions


def wheels_to_install(missing: list[dict], folder: Path) -> tuple[list[Path], list[dict]]:
    """The checked wheel file of each missing pin, and the pins `make gpu-wheels` could not prepare."""
    index_file = folder / INDEX
    if not index_file.is_file():
        raise Failure(3, f"{index_file} not found: run `make gpu-wheels` on a machine with a package index and "
                      f"bring {folder}/ here")
    index = json.loads(index_file.read_text())
    here = "%d.%d" % sys.version_info[:2]
    if index["python"] != here:
        raise Failure(3, f"{folder} was made for Python {index['python']}, this is {here}: "
                      f"run `make gpu-wheels GPU_PYTHON={here}` on a connected machine")
    by_name = {w["name"]: w for w in index["wheels"]}
    gone = {w["name"]: w for w in index["not_carried"]}
    files, skipped = [], []
    for pin in missing:
        entry = by_name.get(pin["name"])
        if entry is None and pin["name"] in gone:
            skipped.append(gone[pin["name"]])
            continue
        if entry is None or entry["version"] != pin["version"]:
            raise Failure(3, f"{pin['name']}=={pin['version']} is not in {folder}: it was made from another lock; "
                          "rerun `make gpu-wheels`")
        path = folder / entry["file"]
        if not path.is_file() or sha256(path) != entry["sha256"]:
            raise Failure(3, f"{path} is missing or altered (SHA-256 differs from {INDEX}): copy the folder again")
        files.append(path)
    return files, skipped


def install(args) -> int:
    pins, host = read_lock(args.lock)
    site = args.site.resolve()
    versions = check_host(host, site)
    present = [p for p in pins if host_version(p["name"], site) == p["version"]]
    missing = [p for p in pins if p not in present]
    files, skipped = wheels_to_install(missing, args.wheels) if missing else ([], [])
    if files:
        site.mkdir(parents=True, exist_ok=True)
        proc = pip(sys.executable, "install", "--isolated", "--no-index", "--no-deps", "--no-cache-dir", "--upgrade", "--target",
                   str(site), *map(str, files), capture=True)
        sys.stderr.write(proc.stdout)
        if proc.returncode != 0:
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or ["no ERROR line"]
            raise Failure(1, f"pip could not install from {args.wheels}: {errors[0][:300]}")
    record = {"python": sys.executable, "python_version": sys.version.split()[0], "host": versions,
              "site": str(site), "installed": [f.name for f in files],
              "already_on_host": [f"{p['name']}=={p['version']}" for p in present], "not_carried": skipped}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "install.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"gpu-check: python {record['python_version']} ({sys.executable}): "
          + ", ".join(f"{name} {version}" for name, version in versions.items() if name in ("torch", "transformers")))
    print(f"gpu-check: installed from {args.wheels} into {site}: {', '.join(record['installed']) or 'nothing'}; "
          f"already on the host: {', '.join(record['already_on_host']) or 'none'}"
          + "".join(f"; not carried: {s['name']} ({s['reason']})" for s in skipped))
    return 0


# ---- gpu-check.sh's small questions and its record ---------------------------------------------------------

def cuda(args) -> int:
    try:
        import torch
    except ImportError as err:
        print(f"torch cannot be imported ({err})")
        return 1
    if not torch.cuda.is_available():
        print("no CUDA device (torch.cuda.is_available() is False)")
        return 1
    print(torch.cuda.get_device_name(0))
    return 0


def importable(args) -> int:
    """Exit 0 if the module imports here, else 1 with the error's first line (its banners go to stderr)."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            importlib.import_module(args.module)
    except Exception as err:  # noqa: BLE001 - any failure means the variant cannot run; the line says which
        print(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])
        return 1
    return 0


def record(args) -> int:
    """Append one step's outcome to steps.json: an exit status and seconds, or `skipped` and the reason."""
    steps_file = args.results / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.is_file() else []
    entry = {"step": args.step}
    if args.command == "skip":
        entry["skipped"] = args.reason
    else:
        entry.update(rc=args.rc, seconds=args.seconds, **({"timed_out": True} if args.rc == 124 else {}))
    args.results.mkdir(parents=True, exist_ok=True)
    steps_file.write_text(json.dumps(steps + [entry], indent=2) + "\n")
    return 0


def summary(args) -> int:
    """Every JSON file of the check in summary.json (by file name), printed."""
    merged = {path.stem: json.loads(path.read_text()) for path in sorted(args.results.glob("*.json"))
              if path.name != "summary.json"}
    (args.results / "summary.json").write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(merged, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("download", "download and build the lock's wheels into --out (needs an index)"),
                            ("index", "write --wheels/wheels.json from the wheels already there (offline)")):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--lock", type=Path, default=LOCK, help="the pins (default requirements/gpu-host.lock)")
        c.add_argument("--python-version", default="3.12", help="the GPU host's Python, major.minor")
        c.add_argument("--max-mib", type=float, default=0,
                       help="largest folder allowed, MiB, for a host that takes a size-limited copy (0: no limit)")
        if name == "download":
            c.add_argument("--out", type=Path, default=WHEELS, help="the wheel folder (default gpu-wheels/)")
            c.add_argument("--build-python", help="a Python of --python-version to build C extensions with")
        else:
            c.add_argument("--wheels", type=Path, required=True, help="the wheel folder")
    c = sub.add_parser("install", help="install the pins this python lacks from --wheels, never from an index")
    c.add_argument("--lock", type=Path, default=LOCK, help="the pins (default requirements/gpu-host.lock)")
    c.add_argument("--wheels", type=Path, default=WHEELS, help="the folder `make gpu-wheels` made")
    c.add_argument("--site", type=Path, required=True, help="where to install (put it on PYTHONPATH)")
    c.add_argument("--results", type=Path, required=True, help="the check's results folder (install.json)")
    sub.add_parser("cuda", help="exit 0 and the GPU's name, or 1 and why there is none")
    sub.add_parser("importable", help="exit 0 if MODULE imports, else 1 and the error").add_argument("module")
    for name in ("record", "skip", "summary"):
        c = sub.add_parser(name, help={"record": "add a step's exit status and seconds to steps.json",
                                       "skip": "add a skipped step and its reason to steps.json",
                                       "summary": "merge the results folder's JSON files, print them"}[name])
        c.add_argument("--results", type=Path, required=True, help="the check's results folder")
        if name != "summary":
            c.add_argument("step", help="the step's name")
        if name == "record":
            c.add_argument("rc", type=int, help="its exit status")
            c.add_argument("seconds", type=int, help="its wall time")
        elif name == "skip":
            c.add_argument("reason", help="why it was skipped")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    commands = {"download": download, "index": index_command, "install": install, "cuda": cuda,
                "importable": importable, "record": record, "skip": record, "summary": summary}
    try:
        return commands[args.command](args)
    except Failure as err:
        print(f"gpu-check: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp built from the pinned llama-cpp-python sdist: the Python binding, llama-server and the converter.

One llama.cpp version converts, quantizes, runs and serves: the commit vendored in the pinned
llama-cpp-python. `make venv` runs `python stages/lib/llama_cpp_tools.py build REQUIREMENTS CMAKE_ARGS CACHE`
once: pip downloads the sdist (hash-pinned below), compiles it for CMAKE_ARGS into a wheel kept under
CACHE by build key (never pip's wheel cache, which ignores CMAKE_ARGS), installs it, compiles llama.cpp's
own HTTP server (`llama-server`, static, same CMAKE_ARGS, cached beside the wheel) into
`<venv>/share/llama.cpp/bin/`, and keeps `convert_hf_to_gguf.py`, its `conversion/` package and `gguf-py/`
under `<venv>/share/llama.cpp/`, with the commit in `COMMIT` and the build (with the server's build time)
in `BUILD.json`. `check` then proves the library loads as asked and the server runs.
The images run `install` (the converter, and llama-server for the CPU image; they compile the binding with
their own CMAKE_ARGS).
No llama.cpp code is copied into this repository. Stdlib only: it runs before anything else is installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

PACKAGE = "llama-cpp-python"
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
# sdists this code accepts (pip checks the download against it)
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}


# llama-server alone: no web UI (it would be fetched), no curl/OpenSSL (models are local files), one static
# binary that runs from wherever it is copied
SERVER_CMAKE_ARGS = ("-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON "
                     "-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF "
                     "-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF")


# tarfile's "data" filter exists from Python 3.11.4 (Debian 12 has 3.11.2); the sdist is hash-pinned either way
EXTRACT_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class ToolsMissing(Exception):
    """The converter or llama-server is not installed where the stage looks for it."""


def tools_dir() -> Path:
    return Path(os.environ.get("LLAMA_CPP_TOOLS", Path(sys.prefix) / "share" / "llama.cpp"))


def server_binary() -> Path:
    """llama-server as `make venv` (or the CPU image) installed it; LLAMA_SERVER names another build."""
    path = Path(os.environ.get("LLAMA_SERVER") or tools_dir() / "bin" / "llama-server")
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ToolsMissing(f"llama-server not found at {path}: run `make venv` (it compiles it from the pinned "
                           f"llama.cpp), or set serve.engine=\"llama-cpp-python\"")
    return path


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


def pinned_version(requirements: Path) -> str:
    """The llama-cpp-python version a requirements file pins (`llama-cpp-python[...]==X`)."""
    for line in requirements.read_text().splitlines():
        name, sep, rest = line.split("#")[0].partition("==")
        if sep and name.split("[")[0].strip().lower() == PACKAGE:
            return rest.strip()
    raise SystemExit(f"{requirements}: no `{PACKAGE}==<version>` line")


def fetch_sdist(version: str, folder: Path) -> Path:
    """The sdist through pip (the user's index and proxy settings apply), hash-checked against SDIST_SHA256.
    Only this package as source: pip prepares its metadata in a build environment, whose own requirements
    (cmake, ninja, scikit-build-core) would otherwise be compiled from source too (minutes, not seconds)."""
    if version not in SDIST_SHA256:
        raise SystemExit(f"no sha256 pinned for {PACKAGE}=={version}: add it to SDIST_SHA256 in {__file__}")
    archive = folder / f"llama_cpp_python-{version}.tar.gz"
    if archive.is_file() and hashlib.sha256(archive.read_bytes()).hexdigest() == SDIST_SHA256[version]:
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "requirements.txt"
        pins.write_text(f"{PACKAGE}=={version} --hash=sha256:{SDIST_SHA256[version]}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                        "--no-binary", PACKAGE, "--require-hashes", "-r", str(pins), "-d", str(folder)], check=True)
    return archive


def build_key(version: str, cmake_args: str) -> str:
    """What a compiled wheel depends on. A native build (no GGML_NATIVE=OFF) also depends on the CPU it was
    built on, so its key holds the CPU's flags. pip's own wheel cache keys only the sdist, which is why a
    `CMAKE_ARGS` change once reused a native build that died with SIGILL elsewhere: never use that cache."""
    parts = [version, " ".join(cmake_args.split()), platform.machine()]
    if "-DGGML_NATIVE=OFF" not in cmake_args.split():
        parts.append(_cpu_flags())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def build_wheel(sdist: Path, cmake_args: str, folder: Path) -> Path:
    """Compile the sdist once per build key into folder (about 7 minutes on 2 cores); reuse it after."""
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[-1]
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    env = {**os.environ, "CMAKE_ARGS": cmake_args}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--no-deps",
                    "--no-cache-dir", "-w", str(staging), str(sdist)], check=True, env=env)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return sorted(folder.glob("llama_cpp_python-*.whl"))[-1]


ISA_FEATURES = ("AVX", "AVX2", "F16C", "FMA", "BMI2", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
                "AVX512_BF16", "AMX_INT8")


def feature_mismatch(cmake_args: str, system_info: str) -> list[str]:
    """Instruction sets llama.cpp reports compiled in (`llama_print_system_info`) that a portable build
    (GGML_NATIVE=OFF) did not ask for, or asked for and lacks. Empty for native builds (no expectation)."""
    args = cmake_args.split()
    if "-DGGML_NATIVE=OFF" not in args:
        return []
    asked = {a[len("-DGGML_"):-len("=ON")] for a in args if a.startswith("-DGGML_") and a.endswith("=ON")}
    compiled = set()
    for part in system_info.split("|"):  # "CPU : SSE3 = 1 | AVX2 = 1 | ..."
        name, _, value = part.rpartition("=")
        if value.strip() == "1":
            compiled.add(name.split(":")[-1].strip())
    return ([f"{name} compiled in, not asked for" for name in ISA_FEATURES if name in compiled - asked]
            + [f"{name} asked for, not compiled in" for name in ISA_FEATURES if name in asked - compiled])


def check_installed(cmake_args: str) -> None:
    """Load the installed library in a fresh interpreter and compare what it was compiled for with cmake_args."""
    proc = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"installed llama.cpp does not load ({last}): rebuild with `rm -rf {sys.prefix} && make venv`")
    mismatch = feature_mismatch(cmake_args, proc.stdout)
    if mismatch:
        raise SystemExit(f"installed llama.cpp does not match CMAKE_ARGS ({'; '.join(mismatch)}): "
                         f"rebuild with `rm -rf {sys.prefix} && make venv`")
    print(f"llama.cpp loads and was compiled for what CMAKE_ARGS asked ({cmake_args or 'native'})")


def build_server(sdist: Path, version: str, cmake_args: str, folder: Path) -> dict:
    """Compile llama-server from the sdist's vendored llama.cpp once per build key into folder/bin (about 7
    minutes on 2 cores; the time is kept in folder/server.json); reuse it after."""
    record = folder / "server.json"
    if record.is_file() and (folder / "bin" / "llama-server").is_file():
        return json.loads(record.read_text())
    cmake = shutil.which("cmake")
    if not cmake:
        raise SystemExit("cmake not found: llama-server is compiled from source (apt install cmake g++, "
                         "or pip install cmake)")
    print(f"llama-server: compiling from {sdist.name} (once per build key; about 7 minutes on 2 cores)", flush=True)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        # the vendored tree and its git metadata, so the build records the commit (`llama-server --version`)
        extract(sdist, version, lambda path: path.startswith(("vendor/llama.cpp/", ".git/modules/vendor/llama.cpp/")),
                Path(tmp))
        source = Path(tmp) / "vendor" / "llama.cpp"
        build_dir, began = Path(tmp) / "build", time.monotonic()
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run([cmake, "-S", str(source), "-B", str(build_dir), *generator, *cmake_args.split(),
                        *SERVER_CMAKE_ARGS.split()], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
                       check=True, stdout=subprocess.DEVNULL)
        (staging / "bin").mkdir(parents=True)
        shutil.copy2(build_dir / "bin" / "llama-server", staging / "bin" / "llama-server")
    info = {"binary": "bin/llama-server", "build_s": round(time.monotonic() - began, 1), "cmake_args": cmake_args,
            "cores": os.cpu_count()}
    (staging / "server.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return info


def install_server(folder: Path, dest: Path) -> None:
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(folder / "bin" / "llama-server", dest / "bin" / "llama-server")


def check_server() -> None:
    """The installed llama-server starts (an instruction its CPU lacks would kill it here, not in a test)."""
    proc = subprocess.run([str(server_binary()), "--version"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-server does not run (exit code {proc.returncode}): rebuild with "
                         f"`rm -rf {sys.prefix} && make venv`")
    version = (proc.stdout + proc.stderr).strip()
    commit_file = tools_dir() / "COMMIT"
    pinned = commit_file.read_text().strip()[:7] if commit_file.is_file() else ""
    if pinned and pinned not in version:   # "version: 0.5.0-dev (build 1, commit 0c1e570)"; without git: "unknown"
        raise SystemExit(f"llama-server does not name the pinned commit {pinned} ({version.splitlines()[0]}): build it "
                         f"where git is installed, which reads the commit from the sdist's git metadata")
    print(f"llama-server runs ({version.splitlines()[0]})")


def extract(sdist: Path, version: str, wanted, dest: Path) -> None:
    """The sdist's files whose path under its root folder `wanted(path)` accepts, into dest (root stripped)."""
    root = f"llama_cpp_python-{version}/"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.name.startswith(root) and wanted(member.name[len(root):]):
                member.name = member.name[len(root):]
                tar.extract(member, dest, **EXTRACT_FILTER)


def install_converter(sdist: Path, version: str, dest: Path) -> str:
    """Keep the converter files of the sdist's vendored llama.cpp in dest; returns its commit."""
    with tempfile.TemporaryDirectory() as tmp:
        vendor, head = "vendor/llama.cpp/", ".git/modules/vendor/llama.cpp/HEAD"
        extract(sdist, version, lambda path: path == head or (path.startswith(vendor)
                                                              and path[len(vendor):].startswith(KEEP)), Path(tmp))
        commit = (Path(tmp) / head).read_text().strip()
        staging = Path(tmp) / "llama.cpp"
        (Path(tmp) / vendor).rename(staging)
        (staging / "COMMIT").write_text(commit + "\n")
        (staging / "VERSION").write_text(f"{PACKAGE}=={version}\n")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(staging, dest)
    return commit


def build(requirements: Path, cmake_args: str, cache: Path) -> None:
    """`make venv`: the pinned sdist -> a wheel compiled for cmake_args (cached by build key) -> installed
    here without its dependencies (the requirement files pin those; `check` runs once they are in) ->
    llama-server compiled for the same cmake_args (cached by the same key) -> the converter from the same
    sdist, with the build recorded in BUILD.json."""
    version = pinned_version(requirements)
    sdist = fetch_sdist(version, cache / "sdist")
    key = f"{version}-{build_key(version, cmake_args)}"
    wheel = build_wheel(sdist, cmake_args, cache / key)
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                    "--force-reinstall", str(wheel)], check=True)
    server_folder = cache / f"{key}-server"
    server = build_server(sdist, version, cmake_args, server_folder)
    target = tools_dir()
    commit = install_converter(sdist, version, target)
    install_server(server_folder, target)
    (target / "BUILD.json").write_text(json.dumps({"version": version, "cmake_args": cmake_args, "wheel": wheel.name,
                                                   "commit": commit, "server": server}, indent=2) + "\n")
    print(f"llama.cpp {commit} ({PACKAGE} {version}, CMAKE_ARGS={cmake_args!r}) installed; converter in {target}")


def main(argv: list[str]) -> None:
    usage = ("usage: llama_cpp_tools.py build REQUIREMENTS CMAKE_ARGS CACHE_DIR   (make venv: compile, install)\n"
             "       llama_cpp_tools.py check CMAKE_ARGS   (make venv, after the requirements: loads, as asked)\n"
             "       llama_cpp_tools.py install [SERVER_CMAKE_ARGS]   (for images: the installed version's\n"
             "           converter, and llama-server compiled for SERVER_CMAKE_ARGS when given)")
    if argv[:1] == ["build"] and len(argv) == 4:
        build(Path(argv[1]), argv[2], Path(argv[3]))
    elif argv[:1] == ["check"] and len(argv) == 2:
        check_installed(argv[1])
        check_server()
    elif argv[:1] == ["install"] and len(argv) <= 2:
        version, target = metadata.version(PACKAGE), tools_dir()
        with tempfile.TemporaryDirectory() as tmp:
            sdist = fetch_sdist(version, Path(tmp))
            commit = install_converter(sdist, version, target)
            print(f"llama.cpp {commit} converter installed in {target}")
            if len(argv) == 2:
                info = build_server(sdist, version, argv[1], Path(tmp) / "server")
                install_server(Path(tmp) / "server", target)
                check_server()
                print(f"llama-server built in {info['build_s']} s, installed in {target / 'bin'}")
    else:
        raise SystemExit(usage)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except subprocess.CalledProcessError as err:  # pip said why above; one line for where it stopped
        raise SystemExit(f"{' '.join(map(str, err.cmd[:5]))} ... failed with exit code {err.returncode}") from None

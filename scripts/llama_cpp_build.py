"""Build llama.cpp from the pinned llama-cpp-python sdist: the Python binding, llama-server and the converter.

One llama.cpp version converts, quantizes, runs and serves: the commit vendored in the llama-cpp-python sdist
that requirements/llama-cpp.json pins (version, sdist SHA-256, llama.cpp commit: the one place they are written;
requirements/gguf.txt names the same version for pip, a test keeps them equal).

  python scripts/llama_cpp_build.py build PIN CMAKE_ARGS CACHE     `make venv`
  python scripts/llama_cpp_build.py check PIN CMAKE_ARGS           `make venv`, once the requirements are in
  python scripts/llama_cpp_build.py install PIN [SERVER_CMAKE_ARGS]   the images

`build`: pip downloads the sdist (hash-checked), compiles it for CMAKE_ARGS into a wheel kept under CACHE by build
key (never pip's wheel cache, which ignores CMAKE_ARGS), installs it, compiles llama.cpp's own HTTP server
(`llama-server`, static, same CMAKE_ARGS, cached beside the wheel) into `<venv>/share/llama.cpp/bin/`, and keeps
`convert_hf_to_gguf.py`, its `conversion/` package and `gguf-py/` under `<venv>/share/llama.cpp/`, with the
commit in `COMMIT` and the build (with the server's build time) in `BUILD.json`. `check` proves the library
loads as asked and the server runs and names the pinned commit. `install` (the images, which compile the binding
with their own CMAKE_ARGS through pip) adds the converter, and llama-server when SERVER_CMAKE_ARGS are given.
Every step checks the sdist's vendored commit against the pin. The stages find these files through
cart_intent/llama_cpp_tools.py. No llama.cpp code is copied into this repository. Stdlib only: it runs before
anything else is installed, and alone in an image's build stage.
"""
from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


@dataclass(frozen=True)
class Pin:
    """requirements/llama-cpp.json: the sdist the whole project builds llama.cpp from."""
    package: str
    version: str
    sdist_sha256: str
    llama_cpp_commit: str


def read_pin(path: Path) -> Pin:
    try:
        return Pin(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(f"{path}: not a llama.cpp pin ({err}): it needs package, version, sdist_sha256 and "
                         f"llama_cpp_commit") from None


def tools_dir() -> Path:
    """Where the converter and llama-server go (the stages look there too, cart_intent/llama_cpp_tools.py)."""
    return Path(os.environ.get("LLAMA_CPP_TOOLS", Path(sys.prefix) / "share" / "llama.cpp"))


# llama-server alone: no web UI (it would be fetched), no curl/OpenSSL (models are local files), one static
# binary that runs from wherever it is copied
SERVER_CMAKE_ARGS = ("-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON "
                     "-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF "
                     "-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF")


# tarfile's "data" filter exists from Python 3.11.4 (Debian 12 has 3.11.2); the sdist is hash-pinned either way
EXTRACT_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def fetch_sdist(pin: Pin, folder: Path) -> Path:
    """The sdist through pip (the user's index and proxy settings apply), hash-checked against the pin.
    Only this package as source: pip prepares its metadata in a build environment, whose own requirements
    (cmake, ninja, scikit-build-core) would otherwise be compiled from source too (minutes, not seconds)."""
    archive = folder / f"{pin.package.replace('-', '_')}-{pin.version}.tar.gz"
    if archive.is_file() and hashlib.sha256(archive.read_bytes()).hexdigest() == pin.sdist_sha256:
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "requirements.txt"
        pins.write_text(f"{pin.package}=={pin.version} --hash=sha256:{pin.sdist_sha256}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                        "--no-binary", pin.package, "--require-hashes", "-r", str(pins), "-d", str(folder)], check=True)
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


def check_server(pin: Pin) -> None:
    """The installed llama-server starts (an instruction its CPU lacks would kill it here, not in a test) and
    names the pinned commit."""
    binary = Path(os.environ.get("LLAMA_SERVER") or tools_dir() / "bin" / "llama-server")
    try:
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    except OSError as err:
        raise SystemExit(f"llama-server does not run ({err}): rebuild with `rm -rf {sys.prefix} && make venv`") from None
    if proc.returncode != 0:
        raise SystemExit(f"llama-server does not run (exit code {proc.returncode}): rebuild with "
                         f"`rm -rf {sys.prefix} && make venv`")
    version = (proc.stdout + proc.stderr).strip()
    if pin.llama_cpp_commit[:7] not in version:   # "version: 0.5.0-dev (build 1, commit 0c1e570)"; no git: "unknown"
        raise SystemExit(f"llama-server does not name the pinned commit {pin.llama_cpp_commit[:7]} "
                         f"({version.splitlines()[0]}): build it where git is installed, which reads the commit "
                         f"from the sdist's git metadata")
    print(f"llama-server runs ({version.splitlines()[0]})")


def extract(sdist: Path, version: str, wanted, dest: Path) -> None:
    """The sdist's files whose path under its root folder `wanted(path)` accepts, into dest (root stripped)."""
    root = f"llama_cpp_python-{version}/"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.name.startswith(root) and wanted(member.name[len(root):]):
                member.name = member.name[len(root):]
                tar.extract(member, dest, **EXTRACT_FILTER)


def install_converter(sdist: Path, pin: Pin, dest: Path) -> str:
    """Keep the converter files of the sdist's vendored llama.cpp in dest; returns its commit (the pinned one)."""
    with tempfile.TemporaryDirectory() as tmp:
        vendor, head = "vendor/llama.cpp/", ".git/modules/vendor/llama.cpp/HEAD"
        extract(sdist, pin.version, lambda path: path == head or (path.startswith(vendor)
                                                              and path[len(vendor):].startswith(KEEP)), Path(tmp))
        commit = (Path(tmp) / head).read_text().strip()
        if commit != pin.llama_cpp_commit:
            raise SystemExit(f"{sdist.name} vendors llama.cpp {commit}, not the pinned {pin.llama_cpp_commit}: "
                             f"correct requirements/llama-cpp.json")
        staging = Path(tmp) / "llama.cpp"
        (Path(tmp) / vendor).rename(staging)
        (staging / "COMMIT").write_text(commit + "\n")
        (staging / "VERSION").write_text(f"{pin.package}=={pin.version}\n")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(staging, dest)
    return commit


def build(pin: Pin, cmake_args: str, cache: Path) -> None:
    """`make venv`: the pinned sdist -> a wheel compiled for cmake_args (cached by build key) -> installed
    here without its dependencies (the requirement files pin those; `check` runs once they are in) ->
    llama-server compiled for the same cmake_args (cached by the same key) -> the converter from the same
    sdist, with the build recorded in BUILD.json."""
    sdist = fetch_sdist(pin, cache / "sdist")
    key = f"{pin.version}-{build_key(pin.version, cmake_args)}"
    wheel = build_wheel(sdist, cmake_args, cache / key)
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                    "--force-reinstall", str(wheel)], check=True)
    server_folder = cache / f"{key}-server"
    server = build_server(sdist, pin.version, cmake_args, server_folder)
    target = tools_dir()
    commit = install_converter(sdist, pin, target)
    install_server(server_folder, target)
    (target / "BUILD.json").write_text(json.dumps({"version": pin.version, "cmake_args": cmake_args,
                                                   "wheel": wheel.name, "commit": commit, "server": server},
                                                  indent=2) + "\n")
    print(f"llama.cpp {commit} ({pin.package} {pin.version}, CMAKE_ARGS={cmake_args!r}) installed; converter in {target}")


def install(pin: Pin, server_cmake_args: str | None) -> None:
    """The images: pip installed the binding (with the image's CMAKE_ARGS); add the converter, and llama-server
    compiled for server_cmake_args when given, from the same sdist."""
    installed = metadata.version(pin.package)
    if installed != pin.version:
        raise SystemExit(f"{pin.package} {installed} is installed, the pin says {pin.version}: "
                         f"requirements/gguf.txt and requirements/llama-cpp.json must name the same version")
    target = tools_dir()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = fetch_sdist(pin, Path(tmp))
        commit = install_converter(sdist, pin, target)
        print(f"llama.cpp {commit} converter installed in {target}")
        if server_cmake_args is not None:
            info = build_server(sdist, pin.version, server_cmake_args, Path(tmp) / "server")
            install_server(Path(tmp) / "server", target)
            check_server(pin)
            print(f"llama-server built in {info['build_s']} s, installed in {target / 'bin'}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="llama_cpp_build.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("build", "make venv: compile the pinned sdist for CMAKE_ARGS and install it"),
                       ("check", "make venv, once the requirements are in: the library loads as asked, the server runs"),
                       ("install", "images: the installed version's converter, and llama-server when "
                                   "SERVER_CMAKE_ARGS are given")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("pin", type=Path, help="requirements/llama-cpp.json")
        if name == "install":
            command.add_argument("server_cmake_args", nargs="?", help="CMake arguments for llama-server")
        else:
            command.add_argument("cmake_args", help="CMake arguments of the binding (\"\": a native build)")
        if name == "build":
            command.add_argument("cache", type=Path, help="where compiled wheels are kept by build key")
    args = parser.parse_args(argv)
    pin = read_pin(args.pin)
    if args.command == "build":
        build(pin, args.cmake_args, args.cache)
    elif args.command == "check":
        check_installed(args.cmake_args)
        check_server(pin)
    else:
        install(pin, args.server_cmake_args)

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except subprocess.CalledProcessError as err:  # pip said why above; one line for where it stopped
        raise SystemExit(f"{' '.join(map(str, err.cmd[:5]))} ... failed with exit code {err.returncode}") from None

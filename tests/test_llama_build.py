"""The llama.cpp that `make venv` installs is the one its CMAKE_ARGS asked for (CI once ran a native
AMX build that pip's wheel cache handed back for a portable request, and every GGUF stage died of SIGILL)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from cart_intent.llama_cpp_tools import server_binary, tools_dir
from cart_intent.llama_internals import CHECKED_VERSION

sys.path.insert(0, str(ROOT / "scripts"))
from llama_cpp_build import build_key, feature_mismatch, read_pin  # noqa: E402  (a script, not a package)

PIN = read_pin(ROOT / "requirements" / "llama-cpp.json")

PORTABLE = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
PORTABLE_INFO = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | OPENMP = 1 | "


def test_a_native_build_handed_back_for_a_portable_request_is_caught():
    native = PORTABLE_INFO + "AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | "
    assert feature_mismatch(PORTABLE, PORTABLE_INFO) == []
    assert feature_mismatch(PORTABLE, native) == ["AVX512 compiled in, not asked for",
                                                  "AVX512_VNNI compiled in, not asked for",
                                                  "AMX_INT8 compiled in, not asked for"]
    assert feature_mismatch(PORTABLE, PORTABLE_INFO.replace("AVX2 = 1", "AVX2 = 0")) == ["AVX2 asked for, not compiled in"]
    assert feature_mismatch("", native) == []  # a native build promises nothing to check against


def test_build_key_changes_with_what_the_wheel_depends_on():
    key = build_key("0.3.36", PORTABLE)
    assert key == build_key("0.3.36", "  ".join(PORTABLE.split()))  # spacing is not a setting
    assert key != build_key("0.3.37", PORTABLE)
    assert key != build_key("0.3.36", PORTABLE.replace(" -DGGML_BMI2=ON", ""))
    assert key != build_key("0.3.36", "")


def test_the_pin_is_the_version_pip_installs_and_the_one_the_private_attributes_were_checked_against():
    """requirements/llama-cpp.json is the one place of version, sdist hash and commit; pip's requirement line and
    llama_internals must name the same version."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements" / "gguf.txt").read_text().splitlines()]
    assert f"{PIN.package}[server]=={PIN.version}" in lines
    assert CHECKED_VERSION == PIN.version
    assert len(PIN.sdist_sha256) == 64 and len(PIN.llama_cpp_commit) == 40


def test_a_bad_pin_file_is_one_line(tmp_path):
    (tmp_path / "pin.json").write_text('{"version": "0.3.36"}')
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "llama_cpp_build.py"), "check",
                           str(tmp_path / "pin.json"), ""], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "not a llama.cpp pin" in proc.stderr and "Traceback" not in proc.stderr


def test_installed_llama_cpp_was_compiled_for_the_recorded_cmake_args():
    record = tools_dir() / "BUILD.json"
    if not record.is_file():
        pytest.skip("llama.cpp not installed by `make venv` (no BUILD.json): nothing recorded to check against")
    build = json.loads(record.read_text())
    info = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                          capture_output=True, text=True, check=True).stdout
    assert feature_mismatch(build["cmake_args"], info) == []
    assert build["version"] == PIN.version and build["commit"] == PIN.llama_cpp_commit


def test_llama_server_is_built_from_the_same_llama_cpp_commit():
    """serve's default engine: llama-server compiled by `make venv` from the sdist's vendored llama.cpp,
    reporting the commit the converter came from, with its build recorded."""
    record = tools_dir() / "BUILD.json"
    if not record.is_file():
        pytest.skip("llama.cpp not installed by `make venv` (no BUILD.json): nothing recorded to check against")
    build = json.loads(record.read_text())
    assert build["server"]["cmake_args"] == build["cmake_args"] and build["server"]["build_s"] > 0
    version = subprocess.run([str(server_binary()), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    short = build["commit"][:7]
    assert f"commit {short}" in version.stdout + version.stderr, (short, version.stderr)

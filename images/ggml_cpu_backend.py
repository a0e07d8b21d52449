"""Loads the llama.cpp CPU backend that suits this host, in every Python process of the cpu and gpu images.

Those images build llama.cpp with GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS: the CPU kernels are
separate libggml-cpu-<level>.so modules (x64, sse42, sandybridge, haswell, skylakex, icelake, zen4, ...)
and ggml scores them against the running CPU and loads the best one. llama-cpp-python 0.3.36 never
calls ggml_backend_load_all() (abetlen/llama-cpp-python#2069), so without this file every model load
stops with "no backends are loaded". The Dockerfiles put it in the venv's site-packages beside
ggml_cpu_backend.pth, whose `import` line runs it at every interpreter start (a .pth, not sitecustomize.py:
a distribution's own sitecustomize, as Debian's python3 has, would shadow that one). On a regular build
(the local .venv: its CPU backend linked in, no variant modules) it does nothing.
"""
import ctypes
import sys
from importlib.util import find_spec
from pathlib import Path

_GGML_LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


def load_cpu_backend() -> None:
    spec = find_spec("llama_cpp")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    if not any(lib.glob("libggml-cpu-*.so")):
        return
    # The same file llama_cpp loads later (one copy per process, by soname), so it sees this backend.
    ggml = ctypes.CDLL(str(lib / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    quiet = _GGML_LOG(lambda level, text, data: None)  # no "loaded CPU backend" line in every process
    ggml.ggml_log_set(quiet, None)
    ggml.ggml_backend_load_all_from_path(str(lib).encode())
    ggml.ggml_log_set(None, None)
    if ggml.ggml_backend_reg_count() == 0:
        print(f"ggml_cpu_backend: no llama.cpp CPU backend in {lib} suits this CPU", file=sys.stderr)


load_cpu_backend()

"""Where the stages find llama.cpp's own tools, and what they read with them.

scripts/llama_cpp_build.py installs them from the pinned sdist (`make venv`, and the images): the converter
(`convert_hf_to_gguf.py` with `gguf-py/`) and llama-server under `<venv>/share/llama.cpp/`, the commit in `COMMIT`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


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
                           f"(or `python scripts/llama_cpp_build.py install requirements/llama-cpp.json`)")
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

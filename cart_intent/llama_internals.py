"""Every private part of llama-cpp-python this project reaches into, in one place.

Checked against llama-cpp-python 0.3.36 (requirements/gguf.txt; tests/test_llama_build.py fails on another
version). The public API has no way to read the last position's logits without a copy of all of them, to
read a token's raw bytes, to time one call with llama.cpp's own counters, or to reach the model the server
loaded; a version bump must recheck each function here.
"""
from __future__ import annotations

CHECKED_VERSION = "0.3.36"


def last_logits(llm):
    """The next-token logits after the last evaluated token, as a numpy view (no copy)."""
    import numpy as np
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def vocab(llm):
    """The llama_vocab pointer that llama_cpp.llama_token_to_piece takes."""
    return llm._model.vocab


def context(llm):
    """The llama_context pointer that llama_cpp.llama_perf_context(_reset) take."""
    return llm._ctx.ctx


def server_llama():
    """The llama_cpp.Llama that llama_cpp.server's app loaded (one per process)."""
    from llama_cpp.server import app
    return app._llama_proxy()

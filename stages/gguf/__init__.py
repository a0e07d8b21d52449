"""The gguf stage: `python -m stages.gguf` runs stage.py; its own helpers sit beside it."""

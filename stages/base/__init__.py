"""The base stage: `python -m stages.base` runs stage.py; its own helpers sit beside it."""

"""The generate stage: `python -m stages.generate` runs stage.py; its own helpers sit beside it."""

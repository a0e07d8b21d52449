"""The serve stage: `python -m stages.serve` runs stage.py; its own helpers sit beside it."""

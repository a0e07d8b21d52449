"""The report stage: `python -m stages.report` runs stage.py; its own helpers sit beside it."""

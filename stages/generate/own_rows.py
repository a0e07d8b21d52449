"""Your own labelled data in `generate` (generate.data_file): every row checked against the task's schema and
the catalog, with the file and line of the first bad one (exit 2); a text given twice is refused as well, as
the dataset never holds one text twice. Rows keep their id and language; the rest of the fields are filled in."""
from __future__ import annotations

from pathlib import Path

from cart_intent.catalog import LANGUAGES
from cart_intent.config import ConfigError
from cart_intent.task import BadExamples, numbered_examples, text_key


def read_own_rows(path: Path, catalog_names: set[str]) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"generate.data_file: {path} is not a file (a JSON Lines file of labelled examples)")
    try:
        numbered = numbered_examples(path, catalog_names)   # every row valid, or the file and line of the first
    except BadExamples as err:
        raise ConfigError(f"generate.data_file: {err}") from None
    rows, first_line = [], {}
    for number, row in numbered:
        where, lang = f"{path}:{number}", row.get("lang", "unknown")
        if lang not in (*LANGUAGES, "unknown"):
            raise ConfigError(f"generate.data_file: {where}: lang must be one of {', '.join(LANGUAGES)} (or absent), "
                              f"not {lang!r}")
        key = text_key(row["text"])
        if key in first_line:
            raise ConfigError(f"generate.data_file: {where}: the same text as line {first_line[key]}")
        first_line[key] = number
        rows.append({"id": str(row.get("id", f"own-{len(rows):05d}")), "lang": lang, "text": row["text"].strip(),
                     "action": row["action"], "product": row["product"], "quantity": row["quantity"],
                     "template_id": "own", "quantity_style": "own", "noise": [], "source": "file"})
    return rows

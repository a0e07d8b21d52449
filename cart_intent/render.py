"""A report as blocks -- ("h1"|"h2"|"p"|"note", text), ("table", headers, rows of cell texts), ("figure", png,
caption) -- rendered as Markdown, one self-contained HTML file, and every table as CSV with the same cells.
Shared by `report` (one run) and `compare` (several)."""
from __future__ import annotations

import base64
import csv
import html
import re
from pathlib import Path


def fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"[{fmt(value[0])}, {fmt(value[1])}]"
    return str(value)


def write_csv_tables(blocks: list[tuple], folder: Path) -> list[str]:
    """Every table also as CSV, cell for cell as the HTML shows it, named after its section
    (tables/<nn>-<section>.csv); returns the file names."""
    folder.mkdir()
    section, names = "report", []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            section = re.sub(r"[^a-z0-9]+", "-", rest[0].lower()).strip("-")[:48]
        elif kind == "table":
            name = f"{len(names) + 1:02d}-{section}.csv"
            with open(folder / name, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(rest[0])
                writer.writerows(rest[1])
            names.append(name)
    return names


def render(blocks: list[tuple], out: Path) -> None:
    """The same blocks as Markdown and as one self-contained HTML file (figures inlined as base64)."""
    md, body = [], []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            md.append(("# " if kind == "h1" else "## ") + rest[0])
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind in ("p", "note"):
            md.append(("> " if kind == "note" else "") + rest[0])
            body.append(f'<p class="{kind}">{html.escape(rest[0])}</p>')
        elif kind == "table":
            headers, rows = rest
            md += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            md += ["| " + " | ".join(cells) + " |" for cells in rows]
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "figure":
            path, caption = rest
            md.append(f"![{caption}](figures/{path.name})\n\n*{caption}*")
            encoded = base64.b64encode(path.read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(caption)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        md.append("")
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}figcaption{font-size:13px;color:#555}.note{background:#fff6d5;padding:.6em;"
             "border-left:4px solid #e0b000}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Report</title>"
                                     f"<style>{style}</style></head><body>{''.join(body)}</body></html>", encoding="utf-8")

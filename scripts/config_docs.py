"""Write docs/configs.md: every config table and key with its type, default and comment, read from the dataclasses
(a test fails when the page and the code differ, so it cannot drift).

    python scripts/config_docs.py            # rewrite docs/configs.md
    python scripts/config_docs.py --check    # exit 1 when docs/configs.md is not what the code gives
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.base.stage import BaseConfig  # noqa: E402  (the repository root first, as `python -m` would)
from stages.baseline import BaselineConfig  # noqa: E402
from stages.evaluate import EvaluateConfig  # noqa: E402
from stages.finetune import FinetuneConfig  # noqa: E402
from stages.generate.stage import GenerateConfig  # noqa: E402
from stages.gguf.stage import GGUFConfig  # noqa: E402
from stages.gptq import GPTQConfig  # noqa: E402
from cart_intent.config import KNOWN_SECTIONS, RunConfig  # noqa: E402
from cart_intent.intent import ServeConfig  # noqa: E402
from stages.loadtest import LoadtestConfig  # noqa: E402
from stages.merge import MergeConfig  # noqa: E402
from stages.profile_cpu import ProfileCPUConfig  # noqa: E402
from stages.profile_gpu import ProfileGPUConfig  # noqa: E402
from stages.publish import PublishConfig  # noqa: E402
from stages.report.stage import ReportConfig  # noqa: E402

PAGE = ROOT / "docs" / "configs.md"
# each table of a run config and the dataclass that reads it, in pipeline order
SECTIONS = {"run": RunConfig, "generate": GenerateConfig, "base": BaseConfig, "finetune": FinetuneConfig,
            "merge": MergeConfig, "gptq": GPTQConfig, "gguf": GGUFConfig, "baseline": BaselineConfig,
            "evaluate": EvaluateConfig, "profile_cpu": ProfileCPUConfig, "profile_gpu": ProfileGPUConfig,
            "loadtest": LoadtestConfig, "serve": ServeConfig, "report": ReportConfig, "publish": PublishConfig}
INTRO = """# Every config key

Generated from the config dataclasses by `python scripts/config_docs.py`; do not edit by hand. A run config
(`configs/*.toml`) holds one table per stage and lists only what it changes from these defaults; `--set
section.key=value` (make: `SET="section.key=value ..."`) overrides one value for one command. An unknown table or
key, a wrong type or a value out of range stops the stage with one line naming the file and key (exit code 2).
"""


def field_comments(cls) -> dict[str, str]:
    """Field name -> its comment in the source: the comment lines just above it and the one at its end."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        match = re.match(r"(\w+): [^=]+(?:=.*)?$", stripped)
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
        elif match and line.startswith("    ") and not line.startswith("     "):
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            comments[match.group(1)] = " ".join([*above, trailing]).strip()
            above = []
        elif stripped.startswith(("def ", '"""')) or not stripped:
            above = []
    return comments


def type_name(tp) -> str:
    text = tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp)
    return text.replace("typing.", "")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def section_lines(name: str, cls, defaults=None) -> list[str]:
    """One table's heading, the class's docstring and a row per key; sub-tables ([base.tiny]) follow, with the
    defaults their parent gives them."""
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    defaults = defaults if defaults is not None else cls()
    doc = inspect.getdoc(cls) if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}(") else ""
    lines = [f"## [{name}]", "", f"`{cls.__module__}.{cls.__name__}`" + (f": {doc}" if doc else ""), "",
             "| key | type | default | |", "|---|---|---|---|"]
    nested = []
    for field in dataclasses.fields(cls):
        default, comment = getattr(defaults, field.name), cell(comments.get(field.name, ""))
        if dataclasses.is_dataclass(hints[field.name]):
            nested.append((f"{name}.{field.name}", hints[field.name], default))
            lines.append(f"| `{field.name}` | table | [{name}.{field.name}] | {comment} |")
        else:
            lines.append(f"| `{field.name}` | {cell(type_name(hints[field.name]))} | "
                         f"`{cell(toml_value(default))}` | {comment} |")
    lines.append("")
    for sub_name, sub_cls, sub_defaults in nested:
        lines += section_lines(sub_name, sub_cls, sub_defaults)
    return lines


def render() -> str:
    assert set(SECTIONS) == set(KNOWN_SECTIONS), "a config table without its dataclass here"
    lines = [INTRO]
    for name, cls in SECTIONS.items():
        lines += section_lines(name, cls)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when docs/configs.md differs from the code")
    args = p.parse_args(argv)
    page = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
        if current != page:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run python scripts/config_docs.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(page.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

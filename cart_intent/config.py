"""Typed run configs: one TOML file per run profile, one table per stage.

A stage declares its config as a dataclass; `load_stage_config` fills it from the
file's table plus `--set section.key=value` overrides, checks every key and type,
then lets the dataclass's own `validate()` check ranges. Any problem becomes one
`ConfigError` line naming the file, the key and what was expected (exit code 2).
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

# Every table a run config may hold; a misspelled table is an error, not a silent no-op.
KNOWN_SECTIONS = (
    "run", "generate", "base", "finetune", "merge", "gptq", "gguf", "loadtest",
    "baseline", "evaluate", "profile_cpu", "profile_gpu", "report", "serve", "publish",
)


class ConfigError(Exception):
    """A config problem; its message is the one line shown to the user."""


@dataclass
class RunConfig:
    """The [run] table: which folder under artifacts/ this run writes (name: the config file's name unless set)."""
    name: str = ""                    # artifacts/<name>/; "": the config file's name (configs/smoke.toml: smoke)
    artifacts_dir: str = "artifacts"  # where runs live (the shared volume under RUNNER=docker)
    seed: int = 42                    # the models built here (tiny, shape twins) and fine-tuning

    def validate(self) -> None:
        require(is_run_name(self.name), "name",
                "ASCII letters, digits, '-' or '_', at most 200 (it becomes a folder name; unset, the config "
                "file's name)")

    @property
    def run_dir(self) -> Path:
        return Path(self.artifacts_dir) / self.name


def is_run_name(text: str) -> bool:
    """A run's folder name: letters, digits, '-' and '_' only (never a path, never empty), at most 200 of them
    (a file name has 255 bytes, and `.<name>.tmp` or a run's archive name adds to it)."""
    bare = text.replace("-", "").replace("_", "")
    return len(text) <= 200 and bare.isascii() and bare.isalnum()


def require(condition: bool, key: str, expected: str) -> None:
    """Range check used by the configs' validate(): raise the one-line error."""
    if not condition:
        raise ConfigError(f"{key}: expected {expected}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(value, tp, key: str):
    """Return value coerced to tp (int -> float only), or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected nothing, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table ({_type_name(tp)}), got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {k: _check_type(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):  # a sub-table, e.g. [baseline.api]
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table ([{key}]), got {value!r}")
        return build(tp, value, key)
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def build(cls, table: dict, section: str):
    """Fill dataclass `cls` from a TOML table, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    values = {k: _check_type(v, hints[k], f"{section}.{k}") for k, v in table.items()}
    cfg = cls(**values)
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{section}.{err}") from None
    return cfg


def parse_override(text: str) -> tuple[str, list[str], object]:
    """'section.key=value' or 'section.table.key=value' -> (section, key path, value); value read as TOML,
    else a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. generate.n_examples=600")
    dotted, raw = text.split("=", 1)
    section, *keys = [part.strip() for part in dotted.split(".")]
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {dotted}=...: the value nests deeper than any setting does") from None
    return section, keys, value


def read_tables(path: str | Path, overrides: list[str] = ()) -> dict:
    """The whole file as tables, overrides applied, unknown tables rejected."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pick one of configs/*.toml)")
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text (byte {err.start}): save the config as UTF-8") from None
    except RecursionError:
        raise ConfigError("a value nests deeper than any setting does: not a config of this project") from None
    def check(section: str, table) -> None:
        if section not in KNOWN_SECTIONS:
            raise ConfigError(f"[{section}]: unknown table (known: {', '.join(KNOWN_SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table ([{section}]), got {table!r}")
    for section, table in tables.items():
        check(section, table)
    for text in overrides:
        section, keys, value = parse_override(text)
        check(section, tables.setdefault(section, {}))
        table = tables[section]
        for depth, key in enumerate(keys[:-1], 1):  # into a sub-table: baseline.api.base_url
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{'.'.join([section, *keys[:depth]])}: not a table, cannot set {'.'.join(keys)}")
        table[keys[-1]] = value
    return tables


def load_stage_config(path: str | Path, section: str, cls, overrides: list[str] = ()):
    """(RunConfig, stage config) for one stage; errors name the file."""
    try:
        tables = read_tables(path, overrides)
        run = build(RunConfig, {"name": Path(path).stem, **tables.get("run", {})}, "run")
        stage = run if section == "run" else build(cls, tables.get(section, {}), section)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return run, stage


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)

"""compare: one report over several runs of this pipeline -- every config key whose value differs between them,
accuracy per variant and decoding, per language, out-of-scope messages turned away and cart operations wrongly
turned away per set, calibration, and CPU cost per variant and host -- as Markdown, one HTML file, a figure and
every table as CSV.

    python -m stages.compare --runs smollm2 tiny                  # -> artifacts/compare/smollm2-vs-tiny/
    make compare RUNS="smoke smoke-r8"

Reads each run's eval/ (required: `make evaluate`), its eval-*/ sets and profiles/*/cpu/ when present and every stage manifest's
config. Writes artifacts/compare/<run>-vs-<run>/ (report.md, report.html, figures/, tables/*.csv, tables.json).
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from cart_intent import artifacts, cli, registry
from cart_intent.config import ConfigError, is_run_name
from cart_intent.records import CpuRow, EvalRow, read_rows
from cart_intent.render import fmt, render, write_csv_tables


@dataclass
class CompareConfig:   # no table of its own: the runs come from --runs, artifacts_dir from [run]
    def validate(self) -> None:
        pass


def flat_config(manifests: dict[str, dict]) -> dict[str, object]:
    """'<stage folder>.<key>' -> value, from the manifest of every stage folder of the run (profiles aside)."""
    return {f"{folder}.{key}": value for folder, manifest in sorted(manifests.items()) if "/" not in folder
            for key, value in (manifest.get("config") or {}).items()}


def collect(run_dir: Path, manifests: dict[str, dict]) -> dict:
    """A run's evaluation rows (by variant without the model slug, and decoding) and naive CPU rows by host,
    from the finished folders `manifests` names."""
    rows = read_rows(run_dir / "eval" / "results.json", EvalRow)
    scored = {(r["variant"].split("/", 1)[-1], r["decoding"]): r for r in rows if "skipped" not in r}
    cpu = {}
    for folder in sorted(f for f in manifests if f.startswith("profiles/") and f.endswith("/cpu")):
        for row in read_rows(run_dir / folder / "results.json", CpuRow):
            if row.get("mode") == "naive":
                cpu[(folder.split("/")[1], row["variant"])] = row
    sets = {"synthetic test": scored, **{
        folder.removeprefix("eval-"): {(r["variant"].split("/", 1)[-1], r["decoding"]): r
                                       for r in read_rows(run_dir / folder / "results.json", EvalRow) if "skipped" not in r}
        for folder in sorted(f for f in manifests if f.startswith("eval-"))}}
    return {"eval": scored, "sets": sets, "cpu": cpu, "config": flat_config(manifests),
            "models": sorted({r["model"] for r in rows if "model" in r})}


def difference_blocks(data: dict[str, dict]) -> list[tuple]:
    keys = sorted({k for d in data.values() for k in d["config"]})
    # compared as shown: a key one run lacks and an empty value read the same ("–")
    differing = [k for k in keys if len({fmt(d["config"].get(k)) for d in data.values()}) > 1]
    rows = [[k, *(fmt(d["config"].get(k, "–")) for d in data.values())] for k in differing]
    return [("h2", "Config differences"),
            ("p", f"{len(differing)} of {len(keys)} config keys differ; models: "
                  + "; ".join(f"{name}: {', '.join(d['models'])}" for name, d in data.items()) + "."),
            ("table", ["config key", *data], rows)]


def accuracy_blocks(data: dict[str, dict]) -> list[tuple]:
    keys = sorted({k for d in data.values() for k in d["eval"]})
    overall = [[variant, decoding, *(fmt(d["eval"].get((variant, decoding), {}).get("exact_match")) for d in data.values())]
               for variant, decoding in keys]
    langs = sorted({lang for d in data.values() for r in d["eval"].values() for lang in r.get("by_language", {})})
    per_language = [[variant, decoding, lang, *(fmt(d["eval"].get((variant, decoding), {}).get("by_language", {})
                                                   .get(lang, {}).get("exact_match")) for d in data.values())]
                    for variant, decoding in keys for lang in langs]
    return [("h2", "Exact match per variant"), ("table", ["variant", "decoding", *data], overall),
            ("h2", "Exact match per language"), ("table", ["variant", "decoding", "language", *data], per_language)]


SCOPE_METRICS = (("out-of-scope turned away", lambda r: r["scope"]["rejected"]),
                 ("cart operations wrongly turned away", lambda r: r["scope"]["false_rejections"]),
                 ("exact match, cart operations", lambda r: r["scope"]["in_scope_exact_match"]),
                 ("ECE (constrained)", lambda r: (r.get("calibration") or {}).get("ece")))


def scope_blocks(data: dict[str, dict]) -> list[tuple]:
    """Per set, variant and decoding: the none-form's two error rates, cart-operation accuracy and calibration."""
    keys = sorted({(name, *key) for d in data.values() for name, rows in d["sets"].items() for key in rows})
    def value(d, key, read):
        row = d["sets"].get(key[0], {}).get(key[1:])
        return fmt(read(row)) if row and row.get("scope") else "–"
    rows = [[*key, metric, *(value(d, key, read) for d in data.values())]
            for key in keys for metric, read in SCOPE_METRICS]
    rows = [r for r in rows if any(cell != "–" for cell in r[4:])]
    return [("h2", "No cart operation: turned away, wrongly turned away, calibration"),
            ("table", ["set", "variant", "decoding", "metric", *data], rows)] if rows else []


def cost_blocks(data: dict[str, dict]) -> list[tuple]:
    keys = sorted({k for d in data.values() for k in d["cpu"]})
    if not keys:
        return [("h2", "CPU cost"), ("p", "No run has a CPU profile (`make profile-cpu`).")]
    def cells(field, scale, digits):
        return [[host, variant, *(fmt(d["cpu"][(host, variant)][field] / scale, digits) if (host, variant) in d["cpu"]
                                  else "–" for d in data.values())] for host, variant in keys]
    return [("h2", "CPU cost (llama.cpp, batch 1, naive)"),
            ("p", "End-to-end tokens/s per host and GGUF type"), ("table", ["host", "type", *data],
                                                                   cells("e2e_tok_s", 1, 1)),
            ("p", "Peak RAM (GB) per host and GGUF type"), ("table", ["host", "type", *data],
                                                            cells("peak_rss_bytes", 1e9, 2))]


def figure(data: dict[str, dict], path: Path) -> Path:
    """Exact match (free decoding) per variant, one bar per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = sorted({v for d in data.values() for v, mode in d["eval"] if mode == "free"})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(variants)), 3.6))
    width = 0.8 / len(data)
    for i, (name, d) in enumerate(data.items()):
        ax.bar([x + i * width for x in range(len(variants))],
               [d["eval"].get((v, "free"), {}).get("exact_match") or 0 for v in variants], width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(variants))], variants, rotation=20, ha="right")
    ax.set_ylabel("exact match (free decoding)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def folder_name(runs: list[str]) -> str:
    """compare/<run>-vs-<run>...; a name past 120 characters is cut and given a hash of the whole (a file name
    has at most 255 bytes, and `.<name>.lock` sits beside it)."""
    joined = "-vs-".join(runs)
    return joined if len(joined) <= 120 else f"{joined[:100]}-{hashlib.sha256(joined.encode()).hexdigest()[:12]}"


def run(run_cfg, cfg: CompareConfig, args) -> int:
    root = Path(run_cfg.artifacts_dir)
    runs = list(dict.fromkeys(args.runs))
    if len(runs) < 2 or not all(map(is_run_name, runs)):
        raise ConfigError(f"--runs {' '.join(args.runs)}: expected two or more run names (folders under {root})")
    manifests = {name: registry.upstream(root / name, "compare") for name in runs}
    inputs = artifacts.input_fingerprint({f"{name}/{folder}": manifest for name, read in manifests.items()
                                          for folder, manifest in read.items()})
    stage = artifacts.StageRun("compare", folder_name(runs), root / "compare", {"runs": runs}, inputs,
                               artifacts.code_hash(__file__), ["matplotlib"])
    if cli.already_done(stage, args):
        return 0
    data = {name: collect(root / name, manifests[name]) for name in runs}
    out = stage.fresh_tmp()
    (out / "figures").mkdir()
    blocks = [("h1", f"Cart-intent runs compared: {', '.join(runs)}"), *difference_blocks(data),
              *accuracy_blocks(data), ("figure", figure(data, out / "figures" / "exact_match.png"),
                                       "Exact match (free decoding) per variant and run"), *scope_blocks(data),
              *cost_blocks(data)]
    render(blocks, out)
    tables = write_csv_tables(blocks, out / "tables")
    artifacts.write_json(out / "tables.json", {"runs": runs, "csv": tables, "tables": [
        {"headers": b[1], "rows": b[2]} for b in blocks if b[0] == "table"]})
    stage.results.update(runs=runs, tables=tables)
    stage.publish()
    cli.console.print(f"compare: {stage.out_dir / 'report.html'}")
    return 0


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "compare", CompareConfig, run, argv, add_args=lambda p: p.add_argument(
        "--runs", nargs="+", required=True, metavar="RUN", help="run names (folders under artifacts_dir)"))


if __name__ == "__main__":
    sys.exit(main())

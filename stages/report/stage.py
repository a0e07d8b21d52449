"""report: the paper's tables and figures from this run, next to the paper's published numbers, across hosts.

Reads only what the stages wrote (eval, baseline, gptq/gguf sizes, every profiles/<host>/{cpu,gpu,serve}
and every manifest) and renders: Table 2 (accuracy of baselines and every fine-tuned variant, with
intervals, validity and the McNemar verdict against FP16), Table 3 (CPU trade-offs per GGUF variant
and host), the prefix-cache comparison, a GPU table (FP16 vs GPTQ), the serving load test (requests/s
and latency per engine and client count), figures 2-7 of the paper plus a
Pareto chart, per-language / per-noise accuracy and the share of the memory-bandwidth limit, the
deployment recommendation of the paper's section 5.3 computed from this run, and the environment.

    python -m stages.report --config configs/smollm2.toml
    python -m stages.report --config configs/smoke.toml

Writes artifacts/<run>/report/: report.md, report.html (self-contained, figures embedded),
figures/*.png, tables.json (every table's numbers).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stages.report import figures
from cart_intent import artifacts, cli, registry
from cart_intent.config import as_dict, require
from cart_intent.records import BaselineRow, CpuRow, EvalRow, GpuRow, ServeRow, read_rows
from cart_intent.render import fmt, render, write_csv_tables

PACKAGES = ["matplotlib"]

# The paper's published figures with the hardware they were measured on, and its recipe (one file, read by tests too)
PAPER = json.loads(artifacts.data_file(__file__, "paper.json").read_text(encoding="utf-8"))
# profile-cpu's decoding modes, as the prefix-cache table heads them
MODE_HEADERS = {"naive": "naive mean s", "prefix_cached": "prefix-cached mean s",
                "prefix_cached_constrained": "+ constrained mean s"}
@dataclass
class ReportConfig:
    accuracy_margin: float = 0.01     # "smallest within one point of the best accuracy"

    def validate(self) -> None:
        require(0 <= self.accuracy_margin < 1, "accuracy_margin", "a share in [0, 1)")


def variant_label(name: str) -> str:
    """eval's 'fp16' / 'gptq' / 'gguf-Q4_K_M', profile-cpu's 'Q4_K_M', profile-gpu's 'nf4' -> one label."""
    name = name.removeprefix("gguf-")
    fixed = {"fp16": "FP16", "gptq": "GPTQ 4-bit", "nf4": "NF4", "f16": "GGUF F16", "F16": "GGUF F16"}
    return fixed.get(name, f"GGUF {name}")


def gb(value) -> float | None:
    return round(value / 1e9, 3) if value else None


# ---- collecting what the stages wrote -----------------------------------------------------------------------

def collect(run_dir: Path, manifests: dict[str, dict]) -> dict:
    """Everything the report shows, read from the finished folders `manifests` names (its fingerprint)."""
    def results_of(folder: str, record: type) -> dict:
        path = run_dir / folder / "results.json"
        return {**artifacts.read_json(path), "rows": read_rows(path, record)}
    data = {"eval": results_of("eval", EvalRow), "baseline": results_of("baseline", BaselineRow),
            "other_sets": {folder.removeprefix("eval-"): results_of(folder, EvalRow)
                           for folder in manifests if folder.startswith("eval-")},
            "manifests": dict(manifests), "cpu": [], "gpu": [], "serve": [], "serve_ratios": [], "hosts": {},
            "gpu_skipped": {}, "bandwidth": {}}
    for folder in (f for f in manifests if f.startswith("profiles/")):
        host, kind = folder.split("/")[1:]
        results = results_of(folder, {"cpu": CpuRow, "gpu": GpuRow, "serve": ServeRow}[kind])
        data["hosts"][host] = artifacts.read_json(run_dir / folder / "fingerprint.json")
        if kind == "cpu":
            data["bandwidth"][host] = results["bandwidth"]
            data["cpu"] += [{**r, "host": host} for r in results["rows"]]
        elif kind == "serve":
            served = f"{results['model']} {results['variant']}, {results['serve']['slots']} slots"
            data["serve"] += [{**r, "host": host, "served": served} for r in results["rows"]]
            data["serve_ratios"] += [{**r, "host": host} for r in results["ratios"]]
        elif "skipped" in results:
            data["gpu_skipped"][host] = results["skipped"]
        else:
            data["gpu"] += [{**r, "host": host, "gpu": results["gpu"]} for r in results["rows"]]
    return data


def variant_sizes(manifests: dict) -> dict[tuple[str, str], int]:
    """(model, label) -> bytes on disk of each deployable variant."""
    sizes = {}
    for slug, r in manifests.get("gptq", {}).get("results", {}).get("models", {}).items():
        if "bytes" in r:
            sizes[(slug, "GPTQ 4-bit")], sizes[(slug, "FP16")] = r["bytes"], r["fp16_bytes"]
    for slug, r in manifests.get("gguf", {}).get("results", {}).get("models", {}).items():
        for type_name, v in r.get("variants", {}).items():
            sizes[(slug, variant_label(type_name))] = v["bytes"]
    return sizes


# ---- tables -------------------------------------------------------------------------------------------------

def accuracy_rows(data: dict) -> list[dict]:
    """Table 2: baselines first (few-shot), then every fine-tuned variant (free decoding)."""
    rows, primary = [], None
    for r in data["baseline"]["rows"]:
        name, kind = r.get("model", "?"), r.get("kind")
        is_api = kind == "api"
        primary = primary or (name if kind == "open-weight" else None)
        label = {"api": f"{name} (API), {r.get('shots', '?')}-shot",
                 "classic": f"{name} (TF-IDF + logistic regression, trained in {r.get('train_s', '?')} s)"}.get(
            kind, f"{name} base, {r.get('shots', '?')}-shot")
        row = {"group": "baseline", "label": label, "model": name, "variant": "base"}
        if "skipped" in r:
            rows.append({**row, "skipped": r["skipped"], "exact_match": None})
            continue
        paper = PAPER["accuracy"].get(name) if is_api else (PAPER["accuracy"]["base"] if name == primary else None)
        rows.append({**row, "exact_match": r["exact_match"], "ci95": r["exact_match_ci95"], "json_valid": r["json_valid"],
                     "paper": paper, "by_language": r["by_language"], "examples_per_s": r["examples_per_s"]})
    evals = [r for r in data["eval"]["rows"] if "skipped" not in r]
    constrained = {r["variant"]: r for r in evals if r["decoding"] == "constrained"}
    models = sorted({r["model"] for r in evals})
    for r in (r for r in evals if r["decoding"] == "free") if any(r["decoding"] == "free" for r in evals) else \
            constrained.values():
        label = variant_label(r["variant"].split("/", 1)[1])
        mcnemar = r["mcnemar_vs_fp16"]
        verdict = "reference" if label == "FP16" else (
            f"p={mcnemar['p_value']:.3g}: " + ("no significant difference" if not mcnemar["significant_at_0.05"] else
                                              "worse" if mcnemar["only_reference_correct"] > mcnemar["only_candidate_correct"]
                                              else "better"))
        rows.append({"group": "fine-tuned", "model": r["model"], "variant": label,
                     "label": label if len(models) == 1 else f"{r['model']} {label}", "exact_match": r["exact_match"],
                     "ci95": r["exact_match_ci95"], "json_valid": r["json_valid"], "mcnemar": verdict,
                     "constrained": constrained.get(r["variant"], {}).get("exact_match"),
                     "paper": PAPER["accuracy"].get(label) if r["model"] == models[0] else None,
                     "by_language": r["by_language"], "by_noise": r["by_noise"], "examples_per_s": r["examples_per_s"]})
    rows.sort(key=lambda r: (r["group"] != "baseline", r["group"] == "fine-tuned" and r["model"],
                             figures.order_key(r["variant"]) if r["group"] == "fine-tuned" else 0))
    for r in data["eval"]["rows"]:
        if "skipped" in r:
            rows.append({"group": "fine-tuned", "label": r["variant"], "model": r["variant"], "variant": "-",
                         "skipped": r["skipped"], "exact_match": None})
    return rows


def cpu_rows(data: dict, accuracy: list[dict], sizes: dict) -> list[dict]:
    """Table 3: one row per host and GGUF variant (naive mode, as the paper ran it), other modes attached."""
    em = {(r["model"], r["variant"]): r["exact_match"] for r in accuracy if r["group"] == "fine-tuned"}
    rows = {}
    for r in data["cpu"]:
        if "skipped" in r:
            continue
        label = variant_label(r["variant"])
        key = (r["host"], r["model"], label)
        row = rows.setdefault(key, {"host": r["host"], "model": r["model"], "variant": label, "modes": {},
                                    "source": r["source"], "exact_match": em.get((r["model"], label)),
                                    "bytes": sizes.get((r["model"], label), r["file_bytes"])})
        row["modes"][r["mode"]] = {"mean_s": r["latency_mean_s"], "p95_s": r["latency_p95_s"],
                                   "identical_to_naive": r.get("identical_to_naive"), "vs_naive": r["latency_vs_naive"]}
        if r["mode"] == "naive" or "e2e_tok_s" not in row:
            paper = PAPER["cpu"].get(label, {})
            row.update(ram_gb=gb(r["peak_rss_bytes"]), decode_tok_s=r["decode_tok_s"], e2e_tok_s=r["e2e_tok_s"],
                       prompt_tok_s=r["prompt_tok_s"], mean_s=r["latency_mean_s"], p95_s=r["latency_p95_s"],
                       load_s=r["load_s"], bandwidth_share=r["bandwidth_share"], threads=r["threads"],
                       decode_vs_plain=r.get("decode_vs_plain"), paper_tok_s=paper.get("tok_s"),
                       paper_ram_gb=paper.get("ram_gb") if isinstance(paper.get("ram_gb"), float) else None,
                       paper_ram=paper.get("ram_gb"), paper_latency_mean_s=paper.get("mean_s"),
                       paper_p95_s=paper.get("p95_s"), plain=r.get("plain_llama_cpp") or {})
    return sorted(rows.values(), key=lambda r: (r["host"], r["model"], figures.order_key(r["variant"])))


def gpu_rows(data: dict) -> list[dict]:
    rows = []
    for r in data["gpu"]:
        if "skipped" in r:
            continue
        label = variant_label(r["variant"])
        paper = PAPER["gpu"].get(label, {})
        vram = r.get("nvml_process_bytes") or r["torch_peak_allocated_bytes"]
        rows.append({"host": r["host"], "gpu": r["gpu"]["gpu"], "model": r["model"], "variant": label,
                     "vram_gb": gb(vram), "params_gb": gb(r["parameter_bytes"]), "load_s": r["load_s"],
                     "decode_tok_s": r["decode_tok_s"], "e2e_tok_s": r["e2e_tok_s"], "mean_s": r["latency_mean_s"],
                     "p95_s": r["latency_p95_s"], "j_per_token": r["energy_j_per_token"],
                     "energy_method": r["energy_method"], "kernel": r.get("kernel") or "-",
                     "batched": {b["batch"]: b["tok_s"] for b in r.get("batched", [])},
                     "paper_tok_s": paper.get("tok_s"), "paper_vram_gb": paper.get("vram_gb"),
                     "paper_params_gb": paper.get("params_gb"), "paper_load_s": paper.get("load_s")})
    return sorted(rows, key=lambda r: (r["host"], r["model"], figures.order_key(r["variant"])))


def recommend(accuracy: list[dict], cpu: list[dict], gpu: list[dict], sizes: dict, margin: float) -> dict:
    """Section 5.3 from this run: the most accurate, the fastest, the smallest within `margin` of the best."""
    scored = [r for r in accuracy if r["group"] == "fine-tuned" and r.get("exact_match") is not None]
    if not scored:
        return {"note": "no fine-tuned variant was scored in this run"}
    best = max(scored, key=lambda r: (r["exact_match"], -sizes.get((r["model"], r["variant"]), 0)))
    near = [r for r in scored if r["exact_match"] >= best["exact_match"] - margin and (r["model"], r["variant"]) in sizes]
    smallest = min(near, key=lambda r: sizes[(r["model"], r["variant"])]) if near else None
    out = {"most_accurate": {"variant": best["label"], "exact_match": best["exact_match"]}}
    if smallest:
        out["smallest_within_margin"] = {"variant": smallest["label"], "exact_match": smallest["exact_match"],
                                         "bytes": sizes[(smallest["model"], smallest["variant"])], "margin": margin}
    if cpu:
        host = cpu[0]["host"]
        fast = max((r for r in cpu if r["host"] == host), key=lambda r: r["e2e_tok_s"])
        out["fastest_cpu"] = {"variant": fast["variant"], "e2e_tok_s": fast["e2e_tok_s"], "host": host}
    if gpu:
        fast = max(gpu, key=lambda r: r["e2e_tok_s"])
        out["fastest_gpu"] = {"variant": fast["variant"], "e2e_tok_s": fast["e2e_tok_s"], "host": fast["host"]}
    return out


def pareto_points(accuracy: list[dict], cpu: list[dict], sizes: dict) -> list[dict]:
    """Variants with accuracy and CPU speed on the first host; memory = peak RSS (else file size)."""
    if not cpu:
        return []
    host = cpu[0]["host"]
    em = {(r["model"], r["variant"]): r["exact_match"] for r in accuracy if r["group"] == "fine-tuned" and r.get("exact_match") is not None}
    points = [{"variant": r["variant"], "exact_match": em[(r["model"], r["variant"])], "tok_s": r["e2e_tok_s"],
               "memory_gb": r["ram_gb"] or gb(r["bytes"]), "speed_source": f"CPU {host}, end to end"}
              for r in cpu if r["host"] == host and (r["model"], r["variant"]) in em]
    for p in points:
        p["pareto"] = not any(q is not p and q["exact_match"] >= p["exact_match"] and q["tok_s"] >= p["tok_s"]
                              and q["memory_gb"] <= p["memory_gb"] and
                              (q["exact_match"], q["tok_s"], -q["memory_gb"]) != (p["exact_match"], p["tok_s"], -p["memory_gb"])
                              for q in points)
    return points


def other_sets_blocks(data: dict) -> list[tuple]:
    """Every extra labelled set (`evaluate --data`, e.g. hand-written messages) beside the synthetic test split."""
    if not data["other_sets"]:
        return []
    sets = {"synthetic test": data["eval"], **data["other_sets"]}
    langs = sorted({lang for d in sets.values() for r in d["rows"] if "by_language" in r for lang in r["by_language"]})
    rows = []
    for name, d in sets.items():
        for r in d["rows"]:
            if "skipped" in r or r["decoding"] != "free":
                continue
            rows.append([name, fmt(d.get("examples")), variant_label(r["variant"].split("/", 1)[1]), fmt(r["exact_match"]),
                         fmt(r["exact_match_ci95"]), *(fmt(r["by_language"].get(lang, {}).get("exact_match"))
                                                        for lang in langs)])
    return [("h2", "Synthetic test split vs other labelled sets (free decoding)"),
            ("p", "Other sets are scored by `evaluate --data FILE`; datasets/realistic.jsonl holds cart messages and "
                  "datasets/out-of-scope.jsonl messages that ask for no cart change (its exact match is the share "
                  "turned away), written by hand as shoppers type, never seen in training and not made by the "
                  "generator's templates."),
            ("table", ["set", "examples", "variant", "exact match", "95% CI", *(f"EM {lang}" for lang in langs)], rows)]


def scope_blocks(data: dict) -> list[tuple]:
    """Messages that ask for no cart change: how many each variant turns away (the none-form), and how many cart
    operations it wrongly turns away, on every set that holds either."""
    rows = []
    for name, d in {"synthetic test": data["eval"], **data["other_sets"]}.items():
        for r in d["rows"]:
            scope = r.get("scope") or {}
            if "skipped" in r or not (scope.get("out_of_scope") or scope.get("false_rejections")):
                continue
            rows.append([name, r["decoding"], variant_label(r["variant"].split("/", 1)[1]), fmt(scope["out_of_scope"]),
                         fmt(scope["rejected"]), fmt(r.get("fallback", {}).get("out_of_scope_turned_away")),
                         fmt(scope["in_scope"]), fmt(scope["false_rejections"]),
                         fmt(r.get("fallback", {}).get("false_rejections")), fmt(scope["exact_match_answered"])])
    chosen = [[variant_label(variant.split("/", 1)[1]), fmt(c["threshold"]), fmt(c["ambiguity_margin"]), split, fmt(c[split]["examples"]),
               fmt(c[split]["false_rejections"]), fmt(c[split]["out_of_scope_turned_away"]),
               fmt(c[split]["exact_match_answered"])]
              for variant, c in data["eval"].get("fallback", {}).items() for split in ("validation", "test") if c[split]]
    if not rows and not chosen:
        return []
    fallback_blocks = [
        ("p", "The fallback (serve.fallback = \"validation\"): thresholds chosen on the validation split so that at "
              "most evaluate.max_false_rejections of its cart operations are turned away; what they do on the test "
              "split is the out-of-sample check."),
        ("table", ["variant", "threshold", "ambiguity margin", "split", "messages", "cart operations turned away",
                   "out-of-scope turned away", "exact match answered"], chosen)] if chosen else []
    return [("h2", "Out-of-scope messages (no cart operation)"),
            ("p", 'The answer {"action": "none", "product": null, "quantity": null} says a message asks for no cart '
                  "change (order status, a question, thanks, a product the shop does not sell). Turned away: share of "
                  "such messages answered so; wrongly turned away: share of cart operations answered so; with the "
                  "fallback: by the none-form or the fallback's thresholds (chosen on the validation split, below); "
                  "exact match answered: over the cart operations the variant did answer. datasets/out-of-scope.jsonl "
                  "holds such messages written by hand, never trained on."),
            ("table", ["set", "decoding", "variant", "out-of-scope messages", "turned away", "with the fallback",
                       "cart operations", "wrongly turned away", "with the fallback", "exact match answered"], rows),
            *fallback_blocks]


def confidence_blocks(data: dict, fig_dir: Path) -> list[tuple]:
    """How well the constrained decoder's confidence ranks and is calibrated, per variant, on the test split."""
    rows = [{**r, "variant": variant_label(r["variant"].split("/", 1)[1])} for r in data["eval"]["rows"]
            if "skipped" not in r and r.get("calibration")]
    if not rows:
        return []
    def kept(r, share):   # exact match when only the most confident `share` is answered
        return next(p["exact_match"] for p in r["calibration"]["risk_coverage"] if p["coverage"] >= share)
    return [("h2", "Confidence (constrained decoding, synthetic test split)"),
            ("p", "The decoder's confidence is the model's own probability of its choices (cart_intent/constrained.py); "
                  "ECE: expected calibration error over 10 bins (0 is calibrated); AURC: area under the risk-coverage "
                  "curve (lower ranks errors last). The fallback acts on it (the thresholds above)."),
            ("table", ["variant", "messages", "ECE", "AURC", "EM at 90% coverage", "EM at 80% coverage", "EM (all)"],
             [[r["variant"], fmt(r["calibration"]["n"]), fmt(r["calibration"]["ece"]), fmt(r["calibration"]["aurc"]),
               fmt(kept(r, 0.9)), fmt(kept(r, 0.8)), fmt(r["exact_match"])] for r in rows]),
            ("figure", figures.calibration(rows, fig_dir / "calibration.png"),
             "Reliability diagram and risk-coverage curve per variant")]


def training_blocks(finetune: dict, fig_dir: Path) -> list[tuple]:
    """Fine-tuning: steps, speed against the plain PyTorch loop, the curve, and each deviation from the paper."""
    models = {slug: r for slug, r in finetune.get("results", {}).get("models", {}).items() if "skipped" not in r}
    if not models:
        return []
    config = finetune.get("config", {})
    blocks = [("h2", "Fine-tuning"),
              ("table", ["model", "steps", "minutes", "train tok/s", "plain PyTorch loop tok/s", "vs plain loop",
                         "best eval loss", "val exact match per evaluation (step: EM)"],
               [[slug, fmt(r.get("steps")), fmt(r["wall_s"] / 60, 1), fmt(r["train_tokens_per_s"], 1),
                 fmt(r.get("plain_loop", {}).get("tokens_per_s"), 1), fmt(r.get("vs_plain_loop"), 2),
                 fmt(r.get("best_eval_loss"), 4),
                 ", ".join(f"{e['step']}: {e['val_exact_match']:.3f}" for e in r.get("evaluations", []))]
                for slug, r in models.items()])]
    curves = {slug: r["evaluations"] for slug, r in models.items() if r.get("evaluations")}
    if curves:
        blocks.append(("figure", figures.training_curve(curves, fig_dir / "training_curve.png"),
                       "Validation exact match and loss against minutes of training"))
    def plain(value) -> str:  # a config value as written (2e-4 stays 0.0002, not 0.000)
        return f"{value:g}" if isinstance(value, float) else str(value)
    deviations = [[key, plain(paper), plain(config.get(key))] for key, paper in PAPER["finetune_recipe"].items()
                  if key in config and config[key] != paper]
    if deviations:
        blocks += [("p", "Deviations from the paper's fine-tuning recipe (section 3.4.1); the reason for each is "
                         "commented next to its value in the run's config file."),
                   ("table", ["setting", "paper", "this run"], deviations)]
    return blocks


def intro_blocks(run_name: str, data: dict) -> list[tuple]:
    """The title, and what the run's base models mean for its numbers."""
    kinds = {r.get("kind") for r in data["manifests"].get("base", {}).get("results", {}).get("models", {}).values()}
    blocks: list[tuple] = [("h1", f"Cart-intent SLM report: run {run_name}")]
    if "tiny" in kinds or "shape" in kinds:
        blocks.append(("note", "This run uses " + " and ".join(
            k for k, on in (("the embedded tiny model (its accuracy and speed do not stand for a 1B model)", "tiny" in kinds),
                            ("the Llama 3.2 1B shape twin (random weights: its speed and memory are the real model's, "
                             "its accuracy is meaningless)", "shape" in kinds)) if on) +
            f". Paper columns are the published values on their hardware (CPU: {PAPER['cpu_hardware']}; GPU: "
            f"{PAPER['gpu_hardware']})."))
    return blocks


def accuracy_blocks(accuracy: list[dict], fig_dir: Path) -> list[tuple]:
    """Table 2 and the accuracy figures."""
    blocks: list[tuple] = [
        ("h2", "Table 2: accuracy"),
        ("table", ["model", "exact match", "95% CI", "JSON valid", "constrained EM", "McNemar vs FP16", "messages/s",
                   "paper"],
         [[r["label"], "skipped: " + r["skipped"], "", "", "", "", "", ""] if "skipped" in r else
          [r["label"], fmt(r["exact_match"]), fmt(r["ci95"]), fmt(r["json_valid"]), fmt(r.get("constrained")),
           r.get("mcnemar", "–"), fmt(r.get("examples_per_s"), 1), fmt(r.get("paper"))] for r in accuracy])]
    scored = [r for r in accuracy if r.get("exact_match") is not None]
    classic = next((r for r in scored if r["group"] == "baseline" and r["label"].startswith("classic:")), None)
    if classic:
        margins = ", ".join(f"{r['label']} {100 * (r['exact_match'] - classic['exact_match']):+.1f}"
                            for r in scored if r["group"] == "fine-tuned")
        blocks.append(("p", f"Exact match of each fine-tuned variant minus the classic model's ({classic['model']}, "
                            f"{fmt(classic['exact_match'])}), in points: {margins or 'no fine-tuned variant'}."))
    if scored:
        blocks.append(("figure", figures.accuracy(scored, fig_dir / "fig2_accuracy.png"),
                       "Figure 2: exact match of every model (95% Wilson intervals; diamonds: the paper)"))
    tuned = [r for r in scored if r["group"] == "fine-tuned"]
    if tuned:
        blocks.append(("figure", figures.breakdown(tuned, fig_dir / "accuracy_breakdown.png"),
                       "Accuracy per language and per noise kind, per fine-tuned variant"))
    return blocks


def cpu_blocks(cpu: list[dict], points: list[dict], fig_dir: Path) -> list[tuple]:
    """Table 3, the prefix-cache table and the CPU figures (points: the Pareto figure's)."""
    blocks: list[tuple] = [("h2", "Table 3: CPU trade-offs (llama.cpp, batch 1)")]
    if cpu:
        blocks.append(("p", "decode tok/s: generated tokens after the first over decode time; end-to-end tok/s: generated "
                            "tokens over the whole request (the paper's figure). RAM: peak RSS of the variant's own process."))
        blocks.append(("table", ["host", "variant", "exact match", "file MB", "peak RAM GB", "decode tok/s", "e2e tok/s",
                                 "mean s", "P95 s", "load s", "% of bandwidth", "paper tok/s", "paper RAM GB", "paper mean / P95 s"],
                       [[r["host"], r["variant"], fmt(r["exact_match"]), fmt(r["bytes"] / 1e6, 1), fmt(r["ram_gb"], 2),
                         fmt(r["decode_tok_s"], 1), fmt(r["e2e_tok_s"], 1), fmt(r["mean_s"]), fmt(r["p95_s"]),
                         fmt(r["load_s"], 2), fmt(100 * r["bandwidth_share"], 0), fmt(r["paper_tok_s"], 1),
                         fmt(r["paper_ram"]), f"{fmt(r['paper_latency_mean_s'], 2)} / {fmt(r['paper_p95_s'], 2)}"] for r in cpu]))
        blocks.append(("h2", "Prefix cache and constrained decoding (beyond the paper)"))
        blocks.append(("table", ["host", "variant", *MODE_HEADERS.values(),
                                 "prefix vs naive", "+ constrained vs naive", "identical outputs (prefix)", "decode vs plain llama-cpp"],
                       [[r["host"], r["variant"], *(fmt(r["modes"].get(m, {}).get("mean_s")) for m in MODE_HEADERS),
                         fmt(r["modes"].get("prefix_cached", {}).get("vs_naive"), 2),
                         fmt(r["modes"].get("prefix_cached_constrained", {}).get("vs_naive"), 2),
                         fmt(r["modes"].get("prefix_cached", {}).get("identical_to_naive"), 2),
                         fmt(r["decode_vs_plain"], 2)] for r in cpu]))
        blocks += [("figure", figures.cpu_speed_ram(cpu, fig_dir / "fig5_cpu_speed_ram.png"),
                    f"Figure 5: CPU speed and RAM per GGUF variant (diamonds: the paper, {PAPER['cpu_hardware']})"),
                   ("figure", figures.cpu_latency(cpu, fig_dir / "fig7_cpu_latency.png"),
                    "Figure 7: CPU latency per request, mean and P95, without and with the prefix cache"),
                   ("figure", figures.bandwidth(cpu, fig_dir / "bandwidth_share.png"),
                    "Share of the measured memory bandwidth reached by batch-1 decoding")]
        if points:
            blocks.append(("figure", figures.pareto(points, fig_dir / "pareto.png"),
                           "Accuracy vs speed vs memory of the GGUF variants"))
    else:
        blocks.append(("p", "No CPU profile in this run (run `make profile-cpu`)."))
    return blocks


def bench_blocks(cpu: list[dict], manifests: dict) -> list[tuple]:
    """llama-bench's table (prompt processing pp<N>, token generation tg<M>, t/s mean ± std over the repeats,
    llama.cpp's own counters) from each file's plain llama-cpp-python reference run."""
    models = manifests.get("gguf", {}).get("results", {}).get("models", {})
    rows = []
    for r in cpu:
        plain, params = r.get("plain") or {}, models.get(r["model"], {}).get("parameters")
        for kind, tokens in (("pp", plain.get("prompt_tokens")), ("tg", plain.get("new_tokens"))):
            if f"{kind}_tok_s_mean" in plain:
                rows.append([r["host"], r["model"], r["variant"], f"{r['bytes'] / 2**20:.2f} MiB",
                             f"{params / 1e6:.1f} M" if params else "–", str(r["threads"]), f"{kind}{tokens}",
                             f"{plain[f'{kind}_tok_s_mean']:.2f} ± {plain[f'{kind}_tok_s_std']:.2f}"])
    if not rows:
        return []
    return [("h2", "llama-bench style rows (plain llama-cpp-python, llama.cpp's counters)"),
            ("table", ["host", "model", "type", "size", "params", "threads", "test", "t/s"], rows)]


def gpu_blocks(gpu: list[dict], skipped: dict, fig_dir: Path) -> list[tuple]:
    """The FP16 vs GPTQ table and figures, or why there are none."""
    blocks: list[tuple] = [("h2", "GPU: FP16 vs GPTQ")]
    if gpu:
        batches = sorted({b for r in gpu for b in r["batched"]})
        blocks.append(("table", ["host", "GPU", "variant", "VRAM GB", "params GB", "load s", "decode tok/s", "e2e tok/s",
                                 "mean s", "P95 s", "J/token", "kernel", *(f"batch {b} tok/s" for b in batches),
                                 "paper tok/s", "paper VRAM / params GB", "paper load s"],
                       [[r["host"], r["gpu"], r["variant"], fmt(r["vram_gb"], 2), fmt(r["params_gb"], 2), fmt(r["load_s"], 2),
                         fmt(r["decode_tok_s"], 1), fmt(r["e2e_tok_s"], 1), fmt(r["mean_s"]), fmt(r["p95_s"]),
                         fmt(r["j_per_token"], 4), r["kernel"], *(fmt(r["batched"].get(b), 1) for b in batches),
                         fmt(r["paper_tok_s"], 2), f"{fmt(r['paper_vram_gb'], 2)} / {fmt(r['paper_params_gb'], 2)}",
                         fmt(r["paper_load_s"], 2)] for r in gpu]))
        methods = sorted({r["energy_method"] for r in gpu})
        blocks.append(("p", f"Energy: {'; '.join(methods)}. Paper values: {PAPER['gpu_hardware']}."))
        blocks += [("figure", figures.gpu_memory(gpu, fig_dir / "fig3_vram.png"), "Figure 3: GPU memory per variant"),
                   ("figure", figures.gpu_speed_energy(gpu, fig_dir / "fig4_gpu_speed_energy.png"),
                    "Figure 4: GPU speed and energy per generated token")]
    else:
        reasons = "; ".join(f"{h}: {why}" for h, why in skipped.items()) or "run `make profile-gpu` on a GPU host"
        blocks.append(("p", f"No GPU profile in this run ({reasons})."))
    return blocks


def serve_blocks(rows: list[dict], ratios: list[dict], fig_dir: Path) -> list[tuple]:
    """The load test: each engine under 1..N concurrent clients (beyond the paper, which measured batch 1)."""
    blocks: list[tuple] = [("h2", "Serving under concurrent clients (beyond the paper)")]
    if not rows:
        return blocks + [("p", "No load test in this run (run `make loadtest`).")]
    blocks.append(("p", "POST /v1/intent over the test split's messages, each client sending its next message when "
                        "its last is answered. llama-server decodes its slots' requests together; llama-cpp-python "
                        "serves one at a time. Same as 1 client / evaluate: share of answers identical to that "
                        "engine's answer at 1 client / to evaluate's constrained decoding of the same message."))
    blocks.append(("table", ["host", "served", "engine", "clients", "requests", "req/s", "mean s", "P50 s", "P95 s",
                             "P99 s", "errors", "exact match", "same as 1 client", "same as evaluate"],
                   [[r["host"], r["served"], r["engine"], str(r["clients"]), str(r["requests"]), fmt(r["requests_per_s"], 2),
                     fmt(r["latency_mean_s"]), fmt(r["latency_p50_s"]), fmt(r["latency_p95_s"]), fmt(r["latency_p99_s"]),
                     str(r["errors"]), fmt(r["exact_match"]), fmt(r["same_as_1_client"]), fmt(r["same_as_evaluate"])]
                    for r in rows]))
    if ratios:
        blocks.append(("table", ["host", "engines", "clients", "req/s ratio", "P95 latency ratio"],
                       [[r["host"], r["engines"], str(r["clients"]), fmt(r["requests_per_s"], 2), fmt(r["latency_p95"], 2)]
                        for r in ratios]))
    blocks.append(("figure", figures.serving(rows, fig_dir / "serving.png"),
                   "Requests/s and P95 latency per engine against concurrent clients"))
    return blocks


def recommendation_blocks(recommendation: dict) -> list[tuple]:
    """The paper's section 5.3, in sentences computed from this run."""
    blocks: list[tuple] = [("h2", "Deployment recommendation (the paper's section 5.3, computed from this run)")]
    lines = []
    if "most_accurate" in recommendation:
        best = recommendation["most_accurate"]
        lines.append(f"Most accurate: {best['variant']} ({fmt(best['exact_match'])} exact match).")
    if "smallest_within_margin" in recommendation:
        small = recommendation["smallest_within_margin"]
        lines.append(f"Smallest within {small['margin'] * 100:.0f} point(s) of the best: {small['variant']} "
                     f"({fmt(small['bytes'] / 1e6, 1)} MB, {fmt(small['exact_match'])}).")
    for key, where in (("fastest_cpu", "CPU"), ("fastest_gpu", "GPU")):
        if key in recommendation:
            fast = recommendation[key]
            lines.append(f"Fastest on {where} ({fast['host']}): {fast['variant']} ({fmt(fast['e2e_tok_s'], 1)} tok/s end to end).")
    blocks += [("p", line) for line in lines or [recommendation.get("note", "")]]
    return blocks


def timing_blocks(manifests: dict) -> list[tuple]:
    """Each stage folder's wall time (from its manifest) and the chain's total, in the order they finished."""
    timed = sorted(((folder, m) for folder, m in manifests.items() if isinstance(m.get("wall_s"), (int, float))),
                   key=lambda item: item[1].get("finished", ""))
    total = sum(m["wall_s"] for _, m in timed)
    rows = [[folder, fmt(m["wall_s"], 1), fmt(m["wall_s"] / 60, 1), fmt(100 * m["wall_s"] / total, 0) if total else "–",
             m.get("finished", "")] for folder, m in timed]
    return [("h2", "Time per stage"),
            ("table", ["stage folder", "wall s", "minutes", "% of the chain", "finished"],
             rows + [["chain total", fmt(total, 1), fmt(total / 60, 1), "100", ""]])]


def environment_blocks(data: dict) -> list[tuple]:
    """Hosts, package versions, the llama.cpp commit and every stage's hashes."""
    blocks: list[tuple] = [("h2", "Environment")]
    blocks.append(("table", ["host", "CPU", "cores", "ISA", "RAM GB", "GPU", "OS"],
                   [[h, f["cpu_model"], str(f.get("usable_cores", f.get("cores"))), " ".join(f.get("isa", [])),
                     fmt(f.get("ram_bytes", 0) / 2**30, 1), ", ".join(g["name"] for g in f.get("gpus", [])) or "–",
                     f.get("os", "")] for h, f in data["hosts"].items()]))
    packages = {}
    for m in data["manifests"].values():
        for name, version in m.get("packages", {}).items():
            packages.setdefault(name, set()).add(version)
    commit = data["manifests"].get("gguf", {}).get("results", {}).get("llama_cpp_commit")
    blocks.append(("p", "Packages: " + ", ".join(f"{n} {'/'.join(sorted(v))}" for n, v in sorted(packages.items()))
                   + (f". llama.cpp commit {commit}." if commit else ".")))
    blocks.append(("p", "Each stage folder (a profile's names its host) with the image it ran in: the image ID is the "
                        "same on every host that built or pulled that image; the registry digest once pushed or pulled."))
    blocks.append(("table", ["stage folder", "config hash", "code hash", "outputs hash", "runner", "image",
                             "image ID", "registry digest", "finished", "wall s"],
                   [[folder, m.get("config_hash", "")[:12], m.get("code_hash", "")[:12],
                     artifacts.sha256_json(m.get("outputs", {}))[:12], *runner_cells(m.get("runner")),
                     m.get("finished", ""), fmt(m.get("wall_s"), 1)]
                    for folder, m in data["manifests"].items()]))
    return blocks


def runner_cells(runner) -> list[str]:
    """runner, image, image ID, registry digest of a manifest's runner record ("–" where not known)."""
    runner = runner if isinstance(runner, dict) else {"kind": str(runner or "local")}
    digest = str(runner.get("digest", "–")).rpartition("@")[2]
    return [str(runner.get("kind", "local")), str(runner.get("image", "–")).rpartition("/")[2],
            str(runner.get("id", "–")).removeprefix("sha256:")[:12], digest.removeprefix("sha256:")[:12] or "–"]


def build(run_name: str, data: dict, cfg: ReportConfig, out: Path) -> dict:
    """Every table (as numbers and as text) and figure; returns the tables for tables.json."""
    fig_dir = out / "figures"
    fig_dir.mkdir()
    sizes = variant_sizes(data["manifests"])
    accuracy = accuracy_rows(data)
    cpu, gpu = cpu_rows(data, accuracy, sizes), gpu_rows(data)
    recommendation = recommend(accuracy, cpu, gpu, sizes, cfg.accuracy_margin)
    blocks = [*intro_blocks(run_name, data), *accuracy_blocks(accuracy, fig_dir), *other_sets_blocks(data),
              *scope_blocks(data), *confidence_blocks(data, fig_dir),
              *training_blocks(data["manifests"].get("finetune", {}), fig_dir),
              *cpu_blocks(cpu, pareto_points(accuracy, cpu, sizes), fig_dir), *bench_blocks(cpu, data["manifests"]),
              *gpu_blocks(gpu, data["gpu_skipped"], fig_dir)]
    if cpu or gpu:
        blocks.append(("figure", figures.load_times(cpu, gpu, fig_dir / "fig6_load_times.png"),
                       "Figure 6: load time of each variant"))
    blocks += serve_blocks(data["serve"], data["serve_ratios"], fig_dir)
    blocks += [*recommendation_blocks(recommendation), *timing_blocks(data["manifests"]), *environment_blocks(data)]
    render(blocks, out)
    return {"accuracy": accuracy, "cpu": cpu, "gpu": gpu, "recommendation": recommendation,
            "figures": sorted(p.name for p in fig_dir.glob("*.png")), "csv": write_csv_tables(blocks, out / "tables")}


def run(run_cfg, cfg: ReportConfig, args) -> int:
    run_dir = run_cfg.run_dir
    manifests = registry.upstream(run_dir, "report")   # eval and baseline, and every other finished folder
    stage = artifacts.StageRun("report", "report", run_dir, as_dict(cfg), artifacts.input_fingerprint(manifests),
                               artifacts.code_hash(__file__), PACKAGES)
    if cli.already_done(stage, args):
        return 0
    out = stage.fresh_tmp()
    tables = build(run_cfg.name, collect(run_dir, manifests), cfg, out)
    artifacts.write_json(out / "tables.json", tables)
    stage.results.update(recommendation=tables["recommendation"], figures=tables["figures"])
    stage.publish()
    rows = {r["label"]: r if "skipped" in r else {"exact match": fmt(r["exact_match"]), "95% CI": fmt(r["ci95"]),
                                                   "paper": fmt(r.get("paper"))} for r in tables["accuracy"]}
    cli.show_results(f"report: {stage.out_dir / 'report.html'}", rows, ["exact match", "95% CI", "paper"])
    cli.console.print(f"recommendation {json.dumps(tables['recommendation'])}")
    return 0


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "report", ReportConfig, run, argv)

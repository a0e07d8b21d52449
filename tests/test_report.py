"""report from a small fixed set of result files: every table and figure present, numbers equal to the inputs."""
import json
import re

from conftest import stage
from cart_intent.artifacts import sha256_file
from cart_intent.records import BaselineRow, CpuRow, EvalRow, GpuRow, ServeRow, checked

EM = {"fp16": 0.91, "gptq": 0.90, "gguf-f16": 0.91, "gguf-Q5_K_M": 0.93, "gguf-Q4_K_M": 0.925, "gguf-Q3_K_M": 0.922}
SIZES = {"F16": 8_000_000, "Q5_K_M": 3_000_000, "Q4_K_M": 2_500_000, "Q3_K_M": 2_100_000}
TOK_S = {"F16": 500.0, "Q5_K_M": 600.0, "Q4_K_M": 750.0, "Q3_K_M": 650.0}


def write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


DOCKER_RUNNER = {"kind": "docker", "image": "registry.example/cart-intent-cpu:0123456789ab", "id": "sha256:" + "a" * 64,
                 "digest": "registry.example/cart-intent-cpu@sha256:" + "b" * 64}


def manifest(folder, stage_name, results=None, runner=None):
    write(folder / "manifest.json", {"stage": stage_name, "config_hash": "c" * 64, "code_hash": "d" * 64, "outputs": {},
                                     "results": results or {}, "packages": {"llama-cpp-python": "0.3.36"},
                                     "runner": runner or {"kind": "local"},
                                     "finished": "2026-11-28T12:00:00+0000", "wall_s": 1.5})


def scores(em):
    return {"n": 20, "exact_match": em, "exact_match_ci95": [round(em - 0.02, 4), round(em + 0.02, 4)],
            "json_valid": 1.0, "field_accuracy": {"action": 1.0, "product": em, "quantity": em},
            "by_language": {"en": {"n": 10, "exact_match": em}, "hr": {"n": 10, "exact_match": em - 0.1}},
            "by_noise": {"typo": {"n": 5, "exact_match": em - 0.2}, "none": {"n": 15, "exact_match": em}},
            "by_quantity": {"1": {"n": 20, "exact_match": em}}, "top_confusions": [],
            "scope": {"out_of_scope": 4, "rejected": 0.75, "in_scope": 16, "false_rejections": 0.0625,
                      "in_scope_exact_match": em, "exact_match_answered": em},
            "calibration": None}


def eval_row(variant, decoding, em):
    return checked(EvalRow, {
        "variant": f"tiny/{variant}", "model": "tiny", "backend": variant.split("-")[0], "decoding": decoding,
        "kernel": None, "examples_per_s": 10.0, "wall_s": 2.0, "generated_tokens_per_answer": 14.0,
        "model_calls_per_answer": 14.0, **scores(em),
        "mcnemar_vs_fp16": {"p_value": 0.5, "significant_at_0.05": False, "only_reference_correct": 3,
                            "only_candidate_correct": 2}})


def cpu_rows(scale):
    rows = []
    for variant, tok_s in TOK_S.items():
        for mode, factor in (("naive", 1.0), ("prefix_cached", 0.7), ("prefix_cached_constrained", 0.45)):
            rows.append(checked(CpuRow, {
                         "model": "tiny", "variant": variant, "mode": mode, "source": "merged", "file_bytes": SIZES[variant],
                         "fixed_tokens": 0, "rss_before_load_bytes": 40_000_000, "rss_after_load_bytes": 50_000_000,
                         "sampled_peak_rss_bytes": 60_000_000, "vm_hwm_bytes": 60_000_000, "ru_maxrss_bytes": 60_000_000,
                         "shared_prefix_tokens": 0, "requests": 30, "prompt_tokens_mean": 60.0,
                         "processed_tokens_mean": 60.0, "generated_tokens_mean": 14.0, "decode_tok_s_median": tok_s * 2 * scale,
                         "ttft_mean_s": 0.01, "latency_p50_s": 0.02 * factor, "weights_read_per_token_bytes": SIZES[variant],
                         "load_s": 0.1, "threads": 2, "peak_rss_bytes": 60_000_000, "decode_tok_s": tok_s * 2 * scale,
                         "e2e_tok_s": tok_s * scale, "prompt_tok_s": 5000.0, "latency_mean_s": 0.02 * factor,
                         "latency_p95_s": 0.03 * factor, "latency_vs_naive": factor, "bandwidth_share": 0.4,
                         "identical_to_naive": 1.0, "decode_vs_plain": 0.97,
                         **({"plain_llama_cpp": {"prompt_tokens": 100, "new_tokens": 32, "pp_tok_s_mean": 900.0 * scale,
                                                 "pp_tok_s_std": 12.5, "tg_tok_s_mean": tok_s * scale,
                                                 "tg_tok_s_std": 3.25}} if mode == "naive" else {})}))
    return rows


def build_run(root):
    run = root / "smoke"
    manifest(run / "base", "base", {"models": {"tiny": {"kind": "tiny"}}})
    manifest(run / "gptq", "gptq", {"models": {"tiny": {"bytes": 2_900_000, "fp16_bytes": 7_900_000}}})
    manifest(run / "gguf", "gguf", {"llama_cpp_commit": "0c1e57098bba", "models": {"tiny": {"parameters": 1_910_016, "variants": {
        t: {"file": f"model-{t}.gguf", "bytes": b} for t, b in SIZES.items()}}}}, runner=DOCKER_RUNNER)
    rows = [eval_row(v, "free", em) for v, em in EM.items()] + [{**eval_row("fp16", "constrained", 0.915), "calibration": {
        "n": 20, "ece": 0.0375, "aurc": 0.021, "reliability": [{"low": 0.5, "n": 10, "confidence": 0.55, "exact_match": 0.5}],
        "risk_coverage": [{"coverage": c / 10, "exact_match": 1 - c / 100} for c in range(1, 11)]}}]
    on = {"examples": 54, "false_rejections": 0.0185, "out_of_scope_turned_away": 0.875, "exact_match_answered": 0.962}
    write(run / "eval" / "results.json", {"rows": rows + [{"variant": "llama-3.2-1b-shape", "skipped": "shape twin"}],
                                          "fallback": {"tiny/gguf-Q4_K_M": {"threshold": 0.3125, "ambiguity_margin": 0.05,
                                                                            "validation": on, "test": on}}})
    manifest(run / "eval", "evaluate")
    out_of_scope = {**eval_row("gguf-Q4_K_M", "constrained", 0.97)}
    out_of_scope["scope"] = {**out_of_scope["scope"], "out_of_scope": 108, "rejected": 0.9722}
    out_of_scope["fallback"] = {"threshold": 0.3125, "ambiguity_margin": 0.05, "examples": 108, "false_rejections": None,
                                "out_of_scope_turned_away": 0.9907, "exact_match_answered": None}
    write(run / "eval-out-of-scope" / "results.json", {"examples": 108, "rows": [out_of_scope]})
    manifest(run / "eval-out-of-scope", "evaluate")
    write(run / "baseline" / "results.json", {"rows": [
        checked(BaselineRow, {"model": "tiny", "kind": "open-weight", "shots": 3, "examples_per_s": 4.0,
                              **scores(0.05), "exact_match_ci95": [0.01, 0.1], "json_valid": 0.2}),
        checked(BaselineRow, {"model": "classic:char-ngram", "kind": "classic", "shots": 0, "examples_per_s": 5000.0,
                              "train_s": 21.5, "train_examples": 4860, **scores(0.9)}),
        checked(BaselineRow, {"model": "gpt-4.1", "kind": "api", "shots": 3, "skipped": "OPENAI_API_KEY is not set"})]})
    manifest(run / "baseline", "baseline")
    write(run / "eval-realistic" / "results.json", {"examples": 180, "rows": [eval_row("fp16", "free", 0.88)]})
    manifest(run / "eval-realistic", "evaluate")
    write(run / "finetune" / "manifest.json", {
        "stage": "finetune", "outputs": {}, "config": {"lora_dropout": 0.0, "lora_r": 16, "max_steps": 900,
                                                       "learning_rate": 1e-3, "load_in_4bit": False},
        "results": {"models": {"tiny": {"steps": 900, "wall_s": 1800.0, "train_tokens_per_s": 364.0,
                                        "plain_loop": {"steps": 6, "tokens_per_s": 166.0}, "vs_plain_loop": 2.19,
                                        "best_eval_loss": 0.01234, "evaluations": [
                                            {"step": 450, "elapsed_s": 900.0, "val_exact_match": 0.8, "eval_loss": 0.05},
                                            {"step": 900, "elapsed_s": 1800.0, "val_exact_match": 0.95,
                                             "eval_loss": 0.01234}]}}}})
    for host, scale in (("epyc-2c-aaaaaa", 1.0), ("xeon-8c-bbbbbb", 3.0)):
        folder = run / "profiles" / host / "cpu"
        write(folder / "results.json", {"host": host, "bandwidth": {"read_gb_s": 20.0}, "rows": cpu_rows(scale)})
        write(folder / "fingerprint.json", {"cpu_model": host.upper(), "usable_cores": 2, "isa": ["avx2"],
                                            "ram_bytes": 2**34, "gpus": [], "os": "Linux"})
        manifest(folder, "profile-cpu")
    gpu = run / "profiles" / "epyc-16c-h200-cccccc" / "gpu"
    write(gpu / "results.json", {"host": "epyc-16c-h200-cccccc", "gpu": {"gpu": "NVIDIA H200"}, "rows": [
        checked(GpuRow, {
            "model": "tiny", "source": "merged", "fixed_tokens": 0, "variant": v, "load_s": load, "parameter_bytes": params,
            "torch_peak_allocated_bytes": vram, "nvml_process_bytes": vram + 500_000_000, "requests": 30,
            "generated_tokens_mean": 14.0, "decode_tok_s": tok * 1.1, "e2e_tok_s": tok, "ttft_mean_s": 0.02,
            "latency_mean_s": 0.1, "latency_p95_s": 0.2, "energy_j": 21.0, "energy_j_per_token": 0.05,
            "energy_method": "nvml total energy counter", "kernel": kernel, "batched": [{"batch": 16, "tok_s": tok * 10}]})
        for v, load, params, vram, tok, kernel in (("fp16", 1.5, 16_000_000, 40_000_000, 120.0, None),
                                                   ("gptq", 0.9, 6_000_000, 30_000_000, 90.0, "MarlinQuantLinear"))]})
    write(gpu / "fingerprint.json", {"cpu_model": "EPYC", "usable_cores": 16, "isa": ["avx2", "avx512f"],
                                     "ram_bytes": 2**37, "gpus": [{"name": "NVIDIA H200"}], "os": "Linux"})
    manifest(gpu, "profile-gpu")
    serve = run / "profiles" / "epyc-2c-aaaaaa" / "serve"
    rows = [checked(ServeRow, {"engine": engine, "clients": c, "requests": 400, "seconds": 400 / rate, "requests_per_s": rate,
             "latency_mean_s": c / rate, "latency_p50_s": c / rate, "latency_p95_s": 1.5 * c / rate,
             "latency_p99_s": 2 * c / rate, "errors": 0, "exact_match": 0.95, "same_as_1_client": 1.0,
             "same_as_evaluate": 1.0, "evaluate_exact_match": 0.95})
            for engine, rates in (("llama-server", (3.0, 5.0, 6.0)), ("llama-cpp-python", (2.0, 2.0, 2.0)))
            for c, rate in zip((1, 4, 8), rates)]
    write(serve / "results.json", {"host": "epyc-2c-aaaaaa", "model": "tiny", "variant": "Q4_K_M",
                                   "serve": {"slots": 8}, "rows": rows,
                                   "ratios": [{"clients": 8, "engines": "llama-server / llama-cpp-python",
                                               "requests_per_s": 3.0, "latency_p95": 0.33}]})
    write(serve / "fingerprint.json", {"cpu_model": "EPYC-2C-AAAAAA", "usable_cores": 2, "isa": ["avx2"],
                                       "ram_bytes": 2**34, "gpus": [], "os": "Linux"})
    manifest(serve, "loadtest")
    return run


def test_report_renders_every_table_and_figure_with_the_input_numbers(tmp_path):
    run = build_run(tmp_path)
    stage("report", tmp_path)
    out = run / "report"
    tables = json.loads((out / "tables.json").read_text())
    assert set(tables["figures"]) == {"fig2_accuracy.png", "accuracy_breakdown.png", "fig3_vram.png",
                                      "fig4_gpu_speed_energy.png", "fig5_cpu_speed_ram.png", "fig6_load_times.png",
                                      "fig7_cpu_latency.png", "pareto.png", "bandwidth_share.png", "training_curve.png",
                                      "serving.png", "calibration.png"}
    for name in tables["figures"]:
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(tables["figures"]) and "<table>" in page

    scored = {r["label"]: r for r in tables["accuracy"]}
    for variant, em in EM.items():
        label = {"fp16": "FP16", "gptq": "GPTQ 4-bit", "gguf-f16": "GGUF F16"}.get(variant, variant.replace("gguf-", "GGUF "))
        assert scored[label]["exact_match"] == em
    assert scored["FP16"]["constrained"] == 0.915 and scored["FP16"]["paper"] == 0.988
    assert scored["tiny base, 3-shot"]["paper"] == 0.76 and "OPENAI_API_KEY" in scored["gpt-4.1 (API), 3-shot"]["skipped"]

    cpu = {(r["host"], r["variant"]): r for r in tables["cpu"]}
    assert len(cpu) == 8 and cpu[("xeon-8c-bbbbbb", "GGUF Q4_K_M")]["e2e_tok_s"] == 2250.0
    assert cpu[("epyc-2c-aaaaaa", "GGUF Q3_K_M")]["exact_match"] == 0.922
    assert cpu[("epyc-2c-aaaaaa", "GGUF F16")]["modes"]["prefix_cached_constrained"]["vs_naive"] == 0.45
    gpu = {r["variant"]: r for r in tables["gpu"]}
    assert gpu["GPTQ 4-bit"]["kernel"] == "MarlinQuantLinear" and gpu["FP16"]["vram_gb"] == 0.54
    assert gpu["FP16"]["paper_tok_s"] == 44.56

    assert tables["recommendation"]["most_accurate"]["variant"] == "GGUF Q5_K_M"
    assert tables["recommendation"]["smallest_within_margin"]["variant"] == "GGUF Q3_K_M"
    assert tables["recommendation"]["fastest_cpu"]["variant"] == "GGUF Q4_K_M"

    report = (out / "report.md").read_text()
    for heading in ("Table 2: accuracy", "Table 3: CPU trade-offs", "Prefix cache", "GPU: FP16 vs GPTQ",
                    "Deployment recommendation", "Environment", "Out-of-scope messages (no cart operation)",
                    "Confidence (constrained decoding, synthetic test split)"):
        assert f"## {heading}" in report
    assert re.search(r"\| out-of-scope \| constrained \| GGUF Q4_K_M \| 108 \| 0\.972 \| 0\.991 \|", report)
    assert "| GGUF Q4_K_M | 0.312 | 0.050 | validation | 54 | 0.018" in report.replace("0.3125", "0.312")
    assert re.search(r"\| FP16 \| 20 \| 0\.037\d? \| 0\.021", report)
    assert "embedded tiny model" in report and "0c1e57098bba" in report and "NVIDIA H200" in report
    environment = report.split("## Environment")[1]   # the image each stage ran in: name, ID, registry digest
    assert re.search(r"\| gguf \|[^\n]*\| docker \| cart-intent-cpu:0123456789ab \| a{12} \| b{12} \|", environment)
    assert re.search(r"\| base \|[^\n]*\| local \| – \| – \| – \|", environment)
    table2 = report.split("## Table 2")[1].split("##")[0]
    assert re.search(r"\| GGUF Q5_K_M \| 0\.930 \| \[0\.910, 0\.950\] \| 1\.000 \|", table2)
    assert re.search(r"\| classic:char-ngram \(TF-IDF \+ logistic regression, trained in 21\.5 s\) \| 0\.900 \|"
                     r"[^\n]*\| 5,000 \|", table2)
    assert "minus the classic model's (classic:char-ngram, 0.900), in points: FP16 +1.0," in table2
    assert "| xeon-8c-bbbbbb | GGUF Q4_K_M | 0.925 | 2.5 | 0.06 | 4,500 | 2,250 |" in report
    bench = report.split("## llama-bench style rows")[1].split("##")[0]
    assert "| xeon-8c-bbbbbb | tiny | GGUF Q4_K_M | 2.38 MiB | 1.9 M | 2 | pp100 | 2700.00 ± 12.50 |" in bench
    assert "| epyc-2c-aaaaaa | tiny | GGUF Q4_K_M | 2.38 MiB | 1.9 M | 2 | tg32 | 750.00 ± 3.25 |" in bench

    sets = report.split("## Synthetic test split vs other labelled sets")[1].split("##")[0]
    assert "| synthetic test | – | FP16 | 0.910 |" in sets and "| realistic | 180 | FP16 | 0.880 |" in sets
    assert "| 0.880 | 0.780 |" in sets   # per language: en, hr
    training = report.split("## Fine-tuning")[1].split("##")[0]
    assert "| tiny | 900 | 30.0 | 364.0 | 166.0 | 2.19 | 0.0123 | 450: 0.800, 900: 0.950 |" in training
    for key, paper, run_value in (("lora_dropout", "0.15", "0"), ("max_steps", "0", "900"),
                                  ("learning_rate", "0.0002", "0.001"), ("load_in_4bit", "True", "False")):
        assert f"| {key} | {paper} | {run_value} |" in training
    assert "| lora_r |" not in training   # the paper's value: not a deviation
    serving = report.split("## Serving under concurrent clients")[1].split("##")[0]
    assert "| epyc-2c-aaaaaa | tiny Q4_K_M, 8 slots | llama-server | 8 | 400 | 6.00 |" in serving
    assert "| epyc-2c-aaaaaa | llama-server / llama-cpp-python | 8 | 3.00 | 0.33 |" in serving


def test_evaluating_only_a_hand_written_set_again_reruns_the_report(tmp_path):
    run = build_run(tmp_path)
    stage("report", tmp_path)
    assert "0.771" not in (run / "report" / "report.html").read_text()
    results = run / "eval-realistic" / "results.json"
    write(results, {"examples": 180, "rows": [eval_row("fp16", "free", 0.771)]})
    manifest(run / "eval-realistic", "evaluate")
    found = json.loads((run / "eval-realistic" / "manifest.json").read_text())
    found["outputs"] = {"results.json": {"bytes": results.stat().st_size, "sha256": sha256_file(results)}}
    write(run / "eval-realistic" / "manifest.json", found)
    proc = stage("report", tmp_path)
    assert "up to date" not in proc.stdout + proc.stderr
    page = (run / "report" / "report.html").read_text()
    assert "0.771" in page


def test_report_without_eval_names_make_target(tmp_path):
    proc = stage("report", tmp_path, check=False)
    assert proc.returncode == 3 and "make evaluate" in proc.stderr


def html_tables(page: str) -> list[list[list[str]]]:
    """Every <table> of the page as rows of cell texts (header row first)."""
    from html.parser import HTMLParser

    class Tables(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append([])
            elif tag == "tr":
                self.tables[-1].append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.tables[-1][-1].append(self.cell)
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data
    parser = Tables()
    parser.feed(page)
    return parser.tables


def test_every_table_is_also_csv_with_the_same_cells_and_the_chain_is_timed(tmp_path):
    import csv
    run = build_run(tmp_path)
    stage("report", tmp_path)
    out = run / "report"
    names = json.loads((out / "tables.json").read_text())["csv"]
    tables = html_tables((out / "report.html").read_text())
    assert names == sorted(p.name for p in (out / "tables").glob("*.csv")) and len(names) == len(tables)
    for name, table in zip(names, tables):
        with open(out / "tables" / name, newline="", encoding="utf-8") as fh:
            assert list(csv.reader(fh)) == table, name
    [timing] = [name for name in names if name.endswith("-time-per-stage.csv")]
    with open(out / "tables" / timing, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    walls = [json.loads(p.read_text()).get("wall_s") for p in run.glob("**/manifest.json") if p.parent.name != "report"]
    total = sum(w for w in walls if isinstance(w, (int, float)))
    assert rows[-1][0] == "chain total" and float(rows[-1][1].replace(",", "")) == round(total, 1)
    assert len(rows) - 2 == sum(isinstance(w, (int, float)) for w in walls)

"""The report's figures (matplotlib, Agg): one function per figure, each taking the report's tables.

Every figure uses the same variant order and colours (`VARIANT_ORDER`, `color`), labelled axes with
units, and the paper's published value as a hollow black marker where one exists.
"""
from __future__ import annotations

from pathlib import Path

VARIANT_ORDER = ["FP16", "GPTQ 4-bit", "NF4", "GGUF F16", "GGUF Q8_0", "GGUF Q6_K", "GGUF Q5_K_M", "GGUF Q4_K_M",
                 "GGUF Q3_K_M"]
_PALETTE = ["#1f77b4", "#d62728", "#9467bd", "#2ca02c", "#17becf", "#bcbd22", "#ff7f0e", "#8c564b", "#e377c2"]
BASELINE_COLOR, OTHER_COLOR = "#7f7f7f", "#aec7e8"


def color(variant: str) -> str:
    return _PALETTE[VARIANT_ORDER.index(variant)] if variant in VARIANT_ORDER else OTHER_COLOR


def order_key(variant: str) -> int:
    return VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.spines.top": False, "axes.spines.right": False,
                         "figure.dpi": 110, "savefig.dpi": 150})
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def _reference(ax, positions, values, horizontal=False, label="paper (its hardware)"):
    pairs = [(p, v) for p, v in zip(positions, values) if v is not None]
    if pairs:
        ps, vs = zip(*pairs)
        args = (vs, ps) if horizontal else (ps, vs)
        ax.scatter(*args, marker="D", facecolors="none", edgecolors="black", zorder=5, s=36, label=label)
        if horizontal:
            ax.legend(loc="best", fontsize=8, frameon=False)
        else:  # above the plot, clear of bars and labels
            ax.legend(loc="lower right", bbox_to_anchor=(1, 1), fontsize=8, frameon=False, borderaxespad=0)


def _fit_scale(ax, values, refs, horizontal=False) -> None:
    """A log axis when this run's values and the paper's differ by orders of magnitude (tiny model vs 1B),
    so neither is flattened to an invisible bar."""
    numbers = [v for v in [*values, *refs] if isinstance(v, (int, float)) and v > 0]
    if numbers and max(numbers) / min(numbers) > 30:
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
        label = ax.get_xlabel() if horizontal else ax.get_ylabel()
        (ax.set_xlabel if horizontal else ax.set_ylabel)(f"{label} (log scale)")


def accuracy(rows: list[dict], path: Path) -> Path:
    """Figure 2: exact match of every model with its 95% interval; paper values as diamonds."""
    plt = _plt()
    rows = [r for r in rows if r.get("exact_match") is not None]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.4))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        low, high = r["ci95"]
        ax.barh(y, r["exact_match"], color=BASELINE_COLOR if r["group"] == "baseline" else color(r["variant"]), height=0.65)
        ax.errorbar(r["exact_match"], y, xerr=[[r["exact_match"] - low], [high - r["exact_match"]]], color="black",
                    capsize=3, lw=1)
    _reference(ax, ys, [r.get("paper") for r in rows], horizontal=True)
    ax.set_yticks(ys, [r["label"] for r in rows])
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("exact match on the test split (share, 95% Wilson interval)")
    ax.set_title("Accuracy of every model (grey: few-shot baselines)")
    return _save(fig, path)


def _grouped_bars(ax, groups: list[str], series: dict[str, list], ylabel: str, colors: dict[str, str] | None = None):
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [v or 0 for v in values], width=width * 0.95, label=name,
                      color=(colors or {}).get(name), edgecolor="white")
        for bar, v in zip(bars, values):
            if v and len(series) <= 2:
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(groups)), groups, rotation=20 if max(map(len, groups)) > 12 else 0, ha="right" if max(map(len, groups)) > 12 else "center")
    ax.set_ylabel(ylabel)


def _per_variant(ax, rows: list[dict], key: str, ylabel: str, paper_key: str | None = None, title: str = ""):
    """Bars per variant, one bar per host; the paper's value as a diamond per variant."""
    variants = sorted({r["variant"] for r in rows}, key=order_key)
    hosts = sorted({r["host"] for r in rows})
    series = {h: [next((r.get(key) for r in rows if r["host"] == h and r["variant"] == v), None) for v in variants]
              for h in hosts}
    if len(hosts) == 1:  # one host: colour bars by variant
        bars = ax.bar(range(len(variants)), [v or 0 for v in series[hosts[0]]], color=[color(v) for v in variants])
        for bar, v in zip(bars, series[hosts[0]]):
            if v:
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
        ax.set_ylabel(ylabel)
    else:
        _grouped_bars(ax, variants, series, ylabel)
        ax.legend(fontsize=7, frameon=False, title="host", title_fontsize=7)
    refs = [next((r.get(paper_key) for r in rows if r["variant"] == v and r.get(paper_key) is not None), None)
            for v in variants] if paper_key else []
    _fit_scale(ax, [v for values in series.values() for v in values], refs)
    _reference(ax, range(len(variants)), refs)
    ax.set_title(title, loc="left")


def _two_panels(rows: list[dict], path: Path, panels: list[tuple]) -> Path:
    """Side by side per-variant bars; each panel: (key, axis label, paper key or None, title)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, ylabel, paper_key, title) in zip(axes, panels):
        _per_variant(ax, rows, key, ylabel, paper_key, title)
    return _save(fig, path)


def gpu_memory(rows: list[dict], path: Path) -> Path:
    """Figure 3: VRAM in use and the parameters' own footprint, per GPU variant."""
    return _two_panels(rows, path, [("vram_gb", "GB", "paper_vram_gb", "VRAM in use (NVML, process)"),
                                    ("params_gb", "GB", "paper_params_gb", "parameter footprint")])


def gpu_speed_energy(rows: list[dict], path: Path) -> Path:
    """Figure 4: GPU decode speed at batch 1 and energy per generated token."""
    return _two_panels(rows, path, [("e2e_tok_s", "generated tokens / s (batch 1, end to end)", "paper_tok_s", "GPU speed"),
                                    ("j_per_token", "J / generated token", None, "GPU energy per token")])


def cpu_speed_ram(rows: list[dict], path: Path) -> Path:
    """Figure 5: CPU end-to-end speed and peak RAM per GGUF variant."""
    return _two_panels(rows, path, [("e2e_tok_s", "generated tokens / s (end to end)", "paper_tok_s", "CPU speed (llama.cpp)"),
                                    ("ram_gb", "peak RSS, GB", "paper_ram_gb", "CPU memory")])


def load_times(cpu_rows: list[dict], gpu_rows: list[dict], path: Path) -> Path:
    """Figure 6: load time of each variant (CPU: GGUF via llama.cpp; GPU: transformers / gptqmodel)."""
    plt = _plt()
    panels = [(rows, title) for rows, title in ((cpu_rows, "CPU (GGUF)"), (gpu_rows, "GPU")) if rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (rows, title) in zip(axes[0], panels):
        _per_variant(ax, rows, "load_s", "load time, s (page cache warm)", "paper_load_s", title)
    return _save(fig, path)


def cpu_latency(rows: list[dict], path: Path) -> Path:
    """Figure 7: mean and P95 latency per request, naive vs prefix-cached vs prefix-cached + constrained."""
    plt = _plt()
    variants = sorted({r["variant"] for r in rows}, key=order_key)
    hosts = sorted({r["host"] for r in rows})
    fig, axes = plt.subplots(len(hosts), 1, figsize=(max(7, 1.6 * len(variants) + 2), 4.4 * len(hosts)), squeeze=False)
    modes = [("naive", "mean_s"), ("naive", "p95_s"), ("prefix_cached", "mean_s"), ("prefix_cached_constrained", "mean_s")]
    labels = ["naive mean", "naive P95", "prefix-cached mean", "prefix-cached + constrained mean"]
    shades = ["#4c72b0", "#9ab0d8", "#55a868", "#c44e52"]
    for ax, host in zip(axes[:, 0], hosts):
        series = {label: [next((r["modes"].get(mode, {}).get(key) for r in rows if r["host"] == host and r["variant"] == v), None)
                          for v in variants] for label, (mode, key) in zip(labels, modes)}
        _grouped_bars(ax, variants, series, "latency per request, s", dict(zip(labels, shades)))
        refs = [next((r.get("paper_latency_mean_s") for r in rows if r["variant"] == v), None) for v in variants]
        _fit_scale(ax, [v for values in series.values() for v in values], refs)
        _reference(ax, [i - 0.3 for i in range(len(variants))], refs, label="paper mean (its hardware)")
        ax.legend(fontsize=7, frameon=False, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18))
        ax.set_title(f"CPU latency on {host}")
    return _save(fig, path)


def pareto(points: list[dict], path: Path) -> Path:
    """Accuracy vs speed, marker area proportional to memory; the Pareto-optimal variants ringed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    biggest = max(p["memory_gb"] for p in points) or 1
    for p in points:
        ax.scatter(p["tok_s"], p["exact_match"], s=60 + 900 * p["memory_gb"] / biggest, color=color(p["variant"]),
                   alpha=0.75, edgecolors="black" if p["pareto"] else "none", linewidths=1.5)
        ax.annotate(f"{p['variant']}\n{p['memory_gb']:.2g} GB", (p["tok_s"], p["exact_match"]), fontsize=7,
                    xytext=(8, -4), textcoords="offset points")
    ax.set_xlabel(f"generated tokens / s ({points[0]['speed_source']})")
    ax.set_ylabel("exact match (share)")
    ax.set_title("Accuracy vs speed vs memory (area: memory; black ring: Pareto-optimal)")
    ax.margins(x=0.25, y=0.2)
    return _save(fig, path)


def breakdown(rows: list[dict], path: Path) -> Path:
    """Accuracy per language and per noise kind, per fine-tuned variant."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2.6]})
    for ax, key, title in ((axes[0], "by_language", "per language"), (axes[1], "by_noise", "per noise kind")):
        groups = sorted({g for r in rows for g in r[key]})
        series = {r["variant"]: [r[key].get(g, {}).get("exact_match") for g in groups] for r in rows}
        width = 0.8 / max(len(series), 1)
        for i, (variant, values) in enumerate(series.items()):
            ax.bar([g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))], [v or 0 for v in values],
                   width=width * 0.95, color=color(variant), label=variant)
        ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
        ax.set_ylabel("exact match (share)")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"Accuracy {title}")
    axes[1].legend(fontsize=7, frameon=False, ncol=3, loc="upper right")
    return _save(fig, path)


def bandwidth(rows: list[dict], path: Path) -> Path:
    """Share of the host's measured memory bandwidth that batch-1 decoding reaches, per GGUF variant."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    _per_variant(ax, [{**r, "share_pct": 100 * r["bandwidth_share"]} for r in rows], "share_pct",
                 "decode rate x weight bytes per token, % of measured bandwidth", None,
                 "Distance to the memory-bandwidth limit (batch 1)")
    ax.axhline(100, color="black", lw=0.8, ls="--")
    return _save(fig, path)


def serving(rows: list[dict], path: Path) -> Path:
    """Requests/s (left) and P95 latency (right) against concurrent clients, one line per host and engine."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in sorted({(r["host"], r["engine"]) for r in rows}):
        line = sorted((r for r in rows if (r["host"], r["engine"]) == key), key=lambda r: r["clients"])
        label = key[1] if len({r["host"] for r in rows}) == 1 else f"{key[1]} ({key[0]})"
        clients = [r["clients"] for r in line]
        left.plot(clients, [r["requests_per_s"] for r in line], marker="o", label=label)
        right.plot(clients, [r["latency_p95_s"] for r in line], marker="o", label=label)
    for ax, ylabel in ((left, "requests / s"), (right, "P95 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["clients"] for r in rows}), labels=[str(c) for c in sorted({r["clients"] for r in rows})])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    left.legend(frameon=False)
    return _save(fig, path)


def training_curve(curves: dict[str, list[dict]], path: Path) -> Path:
    """Validation exact match (left) and loss (right) against minutes of fine-tuning, one line per model."""
    plt = _plt()
    fig, (em_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for model, rows in curves.items():
        minutes = [r["elapsed_s"] / 60 for r in rows]
        em_ax.plot(minutes, [r["val_exact_match"] for r in rows], marker="o", label=model)
        loss_ax.plot(minutes, [r["eval_loss"] for r in rows], marker="o", label=model)
    em_ax.set(xlabel="minutes of training", ylabel="validation exact match", ylim=(0, 1.02))
    loss_ax.set(xlabel="minutes of training", ylabel="validation loss (completion tokens)")
    em_ax.legend(frameon=False)
    return _save(fig, path)


def calibration(rows: list[dict], path: Path) -> Path:
    """Reliability diagram (left: mean confidence vs exact match per bin) and risk-coverage (right: exact match of
    the answers kept when only the most confident share is answered), one line per variant (constrained decoding)."""
    plt = _plt()
    fig, (rel_ax, cov_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    rel_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for r in rows:
        bins, curve = r["calibration"]["reliability"], r["calibration"]["risk_coverage"]
        label = f"{r['variant']} (ECE {r['calibration']['ece']:.3f})"
        rel_ax.plot([b["confidence"] for b in bins], [b["exact_match"] for b in bins], marker="o", label=label,
                    color=color(r["variant"]))
        cov_ax.plot([p["coverage"] for p in curve], [p["exact_match"] for p in curve], label=r["variant"],
                    color=color(r["variant"]))
    rel_ax.set(xlabel="confidence (mean per bin)", ylabel="exact match", xlim=(0, 1.02), ylim=(0, 1.02))
    cov_ax.set(xlabel="coverage (share answered, most confident first)", ylabel="exact match of those answered",
               xlim=(0, 1.02))
    rel_ax.legend(frameon=False, fontsize=7)
    return _save(fig, path)

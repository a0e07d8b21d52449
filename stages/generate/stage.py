"""generate: the synthetic multilingual cart-intent dataset (offline template backend by default).

backend = "llm" has an OpenAI-compatible model write each message for the same ground truth, "mixed" a
share of them (stages/generate/metaprompt.py: prompts, reply checks, cache, budget); see docs/data.md.

Ground truth is drawn first (language cycling en/hr/es, action, product, weighted
quantity), then a template, a quantity style and the configured noise render the
message. Same config and seed give byte-identical files.

    python -m stages.generate --config configs/tiny.toml
    python -m stages.generate --config configs/smoke.toml --set generate.n_examples=300   # seconds

Writes artifacts/<run>/data/{train,val,test}.jsonl, catalog.json (the catalog used), stats.json and a dataset card
README.md.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text

from stages.generate import metaprompt, out_of_scope
from stages.generate.own_rows import read_own_rows
from stages.generate.noise import NOISE_KINDS, add_noise
from cart_intent import artifacts, cli
from cart_intent.api_client import ApiSettings
from cart_intent.cards import card, dataset_meta
from cart_intent.catalog import (CATALOG_PATH, LANGUAGES, RUN_CATALOG, Catalog, CatalogError, indefinite, load_catalog,
                                quantity_phrase, unit_phrase)
from cart_intent.config import ConfigError, as_dict, require
from cart_intent.task import MAX_QUANTITY, NO_OPERATION, is_cart_operation, text_key

TEMPLATES_PATH = artifacts.data_file(__file__, "templates.json")


@dataclass
class GenerateConfig:
    backend: str = "template"         # "template" (offline), "llm" (metaprompting) or "mixed"
    llm_share: float = 0.5            # mixed: share of examples written by the LLM
    llm_model: str = "gpt-4.1"
    llm_temperature: float = 1.0
    llm_max_tokens: int = 80
    llm_max_attempts: int = 3         # per example; a rejected reply is asked again with a new seed
    llm_price_per_1k_tokens: float = 0.002  # for the cost estimate printed before starting
    # [generate.api]: the LLM's endpoint, key, retries and budget of new requests (chat mode only)
    api: ApiSettings = field(default_factory=lambda: ApiSettings(max_requests=20000))
    n_examples: int = 6000            # generated examples (with data_file: see data_file_share)
    # A labelled JSON Lines file of your own (rows: text, action, product, quantity; lang and id optional), used
    # whole; generated examples are added so that the file's rows are data_file_share of the dataset.
    data_file: str = ""
    data_file_share: float = 1.0
    # A product catalog of your own, shaped like cart_intent/catalog.json ("": the shipped 48 products); it is
    # copied to data/catalog.json, and every later stage, the schema and /v1/intent follow it.
    catalog: str = ""
    seed: int = 1234
    test_fraction: float = 0.10       # held out first, as the paper did
    val_fraction: float = 0.10        # of the rest, split with split_seed
    split_seed: int = 42
    languages: list[str] = field(default_factory=lambda: list(LANGUAGES))
    remove_share: float = 0.5
    # Share of messages that ask for no cart change (order status, questions, thanks, products the shop does not
    # sell: stages/generate/out_of_scope.py), labelled {"action": "none", ...}; 0: cart operations only
    none_share: float = 0.15
    # [low, high, weight]: quantity uniform in [low, high], bucket chosen by weight.
    # 1 dominates real carts; 2-6 are common; a long tail reaches 50.
    quantity_buckets: list[list[int]] = field(default_factory=lambda: [
        [1, 1, 34], [2, 2, 16], [3, 3, 10], [4, 4, 6], [5, 5, 6], [6, 6, 5],
        [7, 10, 9], [11, 12, 4], [13, 20, 5], [21, 50, 5]])
    # How the quantity is written, where it applies (word: 1-20, dozen: 12, implicit: 1, unit: product has units).
    quantity_style: dict[str, float] = field(default_factory=lambda: {
        "word": 0.30, "x": 0.05, "dozen": 0.5, "implicit": 0.5, "unit": 0.15})
    # Probability of each noise kind per example (code_switch: Croatian and Spanish only).
    noise: dict[str, float] = field(default_factory=lambda: {
        "greeting": 0.20, "signoff": 0.15, "slang": 0.15, "brand": 0.05, "unrelated_number": 0.05,
        "code_switch": 0.10, "typo": 0.15, "emoji": 0.10, "casing": 0.10, "punctuation": 0.15})

    def validate(self) -> None:
        require(self.backend in ("template", "llm", "mixed"), "backend", '"template", "llm" or "mixed"')
        require(0 <= self.llm_share <= 1, "llm_share", "a fraction in [0, 1]")
        for key in ("llm_max_tokens", "llm_max_attempts"):
            require(getattr(self, key) >= 1, key, "an integer >= 1")
        require(self.llm_temperature >= 0 and self.llm_price_per_1k_tokens >= 0, "llm_temperature",
                "temperature and price >= 0")
        require(self.api.mode == "chat", "api.mode", '"chat" (the metaprompt is a chat message)')
        require(self.n_examples >= 30, "n_examples", "an integer >= 30")
        require(0 < self.data_file_share <= 1, "data_file_share", "a fraction in (0, 1] (1: only your rows)")
        require(0 < self.test_fraction < 0.5, "test_fraction", "a fraction in (0, 0.5)")
        require(0 < self.val_fraction < 0.5, "val_fraction", "a fraction in (0, 0.5)")
        require(bool(self.languages) and set(self.languages) <= set(LANGUAGES)
                and len(set(self.languages)) == len(self.languages), "languages", f"distinct values of {LANGUAGES}")
        require(0 <= self.remove_share <= 1, "remove_share", "a fraction in [0, 1]")
        require(0 <= self.none_share < 1, "none_share", "a fraction in [0, 1)")
        require(all(len(b) == 3 and 1 <= b[0] <= b[1] <= MAX_QUANTITY and b[2] >= 0 for b in self.quantity_buckets)
                and sum(b[2] for b in self.quantity_buckets) > 0, "quantity_buckets",
                f"[low, high, weight] triples with 1 <= low <= high <= {MAX_QUANTITY} and weights >= 0, not all 0")
        require(set(self.quantity_style) == {"word", "x", "dozen", "implicit", "unit"}
                and all(0 <= p <= 1 for p in self.quantity_style.values()), "quantity_style",
                "probabilities in [0, 1] for exactly word, x, dozen, implicit, unit")
        require(set(self.noise) == set(NOISE_KINDS) and all(0 <= p <= 1 for p in self.noise.values()),
                "noise", f"probabilities in [0, 1] for exactly {', '.join(NOISE_KINDS)}")


def draw_action(rng: random.Random, cfg: GenerateConfig) -> str:
    """none (at none_share; no draw at all when 0, so such a dataset is the one without the none-form), add or remove."""
    if cfg.none_share and rng.random() < cfg.none_share:
        return NO_OPERATION
    return "remove" if rng.random() < cfg.remove_share else "add"


def draw_quantity(rng: random.Random, buckets: list[list[int]]) -> int:
    low, high, _ = rng.choices(buckets, weights=[b[2] for b in buckets])[0]
    return rng.randint(low, high)


def render_item(catalog: Catalog, lang: str, product: str, n: int, cfg: GenerateConfig,
                rng: random.Random, case: str) -> tuple[str, str]:
    """(phrase, style) for n of product, e.g. ('12 lip balms', 'digits')."""
    prod = catalog.product(product)
    forms = rng.choice(prod.names[lang])
    p = cfg.quantity_style
    if prod.units and rng.random() < p["unit"]:
        unit_forms = catalog.units[rng.choice(prod.units)][lang]
        if n == 1 and rng.random() < p["implicit"]:
            return unit_phrase(lang, None, "digits", unit_forms, forms, prod.mass, case), "unit+implicit"
        style = "word" if n <= 20 and rng.random() < p["word"] else "digits"
        return unit_phrase(lang, n, style, unit_forms, forms, prod.mass, case), f"unit+{style}"
    if n == 1 and rng.random() < p["implicit"]:
        return indefinite(lang, forms, prod.mass, case), "implicit"
    if n == 12 and not prod.mass and rng.random() < p["dozen"]:
        return quantity_phrase(lang, n, "dozen", forms, case), "dozen"
    if rng.random() < p["x"]:
        return quantity_phrase(lang, n, "x", forms, case), "x"
    style = "word" if n <= 20 and rng.random() < p["word"] else "digits"
    return quantity_phrase(lang, n, style, forms, case), style


def render_text(gold: dict, catalog: Catalog, lex: dict, cfg: GenerateConfig, rng: random.Random) -> dict:
    lang, action = gold["lang"], gold["action"]
    templates = lex["templates"][lang][action]
    index = rng.randrange(len(templates))
    template = templates[index]
    slot, case = ("{item_nom}", "nom") if "{item_nom}" in template else ("{item}", "acc")
    item, style = render_item(catalog, lang, gold["product"], gold["quantity"], cfg, rng, case)
    text = template.replace(slot, item)
    text = text[0].upper() + text[1:] if template.startswith(slot) and rng.random() < 0.5 else text
    text, applied = add_noise(text, lang, cfg.noise, rng, lex)
    return {"text": " ".join(text.split()), "template_id": f"{lang}-{action}-{index:02d}",
            "quantity_style": style, "noise": applied}


def render_out_of_scope(gold: dict, catalog: Catalog, lex: dict, cfg: GenerateConfig, rng: random.Random) -> dict:
    """A message asking for no cart change, with the same noise as the cart messages."""
    row = out_of_scope.draw(gold["lang"], catalog, lex, rng, gold["quantity"])
    text, applied = add_noise(row["text"], gold["lang"], cfg.noise, rng, lex)
    return {"text": " ".join(text.split()), "template_id": row["template_id"], "quantity_style": NO_OPERATION,
            "noise": applied}


def generate_examples(cfg: GenerateConfig, catalog: Catalog, lex: dict, n: int,
                      taken: set[str] = frozenset()) -> tuple[list[dict], int]:
    """n unique messages, none of them in `taken`; a duplicate text is redrawn. Returns (examples, redrawn)."""
    rng = random.Random(cfg.seed)
    lex = {**lex, "brands": list(catalog.brands)}
    seen, examples, redrawn = set(taken), [], 0
    for i in range(n):
        gold = {"lang": cfg.languages[i % len(cfg.languages)]}
        for attempt in range(200):
            if attempt % 20 == 0:  # after 20 clashes, new ground truth for this slot (same language)
                gold.update(action=draw_action(rng, cfg), product=rng.choice(catalog.names),
                            quantity=draw_quantity(rng, cfg.quantity_buckets))
            render = render_text if is_cart_operation(gold) else render_out_of_scope
            row = render(gold, catalog, lex, cfg, rng)
            if text_key(row["text"]) not in seen:
                break
            redrawn += 1
        else:
            raise ConfigError(f"generate.n_examples = {n}: only {i} distinct messages could be drawn from this catalog "
                              f"and the templates (200 tries for the next one); lower n_examples, or add products, "
                              f"languages or noise")
        seen.add(text_key(row["text"]))
        operation = is_cart_operation(gold)
        examples.append({"id": f"ex-{i:05d}", "lang": gold["lang"], "text": row["text"], "action": gold["action"],
                         "product": gold["product"] if operation else None,
                         "quantity": gold["quantity"] if operation else None,
                         "template_id": row["template_id"], "quantity_style": row["quantity_style"],
                         "noise": row["noise"]})
    return examples, redrawn


def split(examples: list[dict], cfg: GenerateConfig) -> dict[str, list[dict]]:
    """Test held out first, then the rest split train/val, both with split_seed."""
    order = list(range(len(examples)))
    random.Random(cfg.split_seed).shuffle(order)
    n_test = round(len(order) * cfg.test_fraction)
    rest = order[n_test:]
    n_val = round(len(rest) * cfg.val_fraction)
    parts = {"train": rest[n_val:], "val": rest[:n_val], "test": order[:n_test]}
    return {name: [examples[i] for i in sorted(idx)] for name, idx in parts.items()}


def statistics(splits: dict[str, list[dict]], redrawn: int) -> dict:
    rows = [ex for part in splits.values() for ex in part]
    def count(key):
        return dict(sorted(Counter(ex[key] for ex in rows).items()))
    return {"counts": {k: len(v) for k, v in splits.items()}, "total": len(rows), "duplicates_redrawn": redrawn,
            "lang": count("lang"), "action": count("action"), "quantity_style": count("quantity_style"),
            "noise": {k: sum(k in ex["noise"] for ex in rows) for k in NOISE_KINDS},
            "quantity_histogram": {str(k): v for k, v in sorted(Counter(ex["quantity"] for ex in rows
                                                                       if is_cart_operation(ex)).items())},
            "products": len({ex["product"] for ex in rows if is_cart_operation(ex)}), "templates_used": len({ex["template_id"] for ex in rows})}


def dataset_card(stats: dict, cfg: GenerateConfig, run_name: str, llm_section: str = "") -> str:
    def table(title, mapping):
        lines = [f"| {title} | examples |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in mapping.items()]
        return "\n".join(lines)
    return card(dataset_meta(run_name, stats["total"]), "\n\n".join([
        f"# Cart-intent dataset ({cfg.backend} backend"
        + (f", {stats['data_file']['rows']} rows from {stats['data_file']['name']})" if "data_file" in stats else ")"),
        f"{stats['total']} unique messages, seed {cfg.seed}, split seed {cfg.split_seed}; "
        f"{stats['duplicates_redrawn']} duplicate texts were redrawn, so no text appears twice or in two splits. "
        f"{stats['products']} products, {stats['templates_used']} templates used. "
        "Load with `datasets.load_dataset(\"json\", data_files={\"train\": \"train.jsonl\", ...})`.",
        table("split", stats["counts"]), table("language", stats["lang"]), table("action", stats["action"]),
        table("quantity style", stats["quantity_style"]), table("noise kind", stats["noise"]),
        table("quantity", stats["quantity_histogram"]),
        "Fields: id, lang, text, action, product, quantity, template_id, quantity_style, noise.",
    ]) + llm_section)


def run(run_cfg, cfg: GenerateConfig, args) -> int:
    catalog_path = Path(cfg.catalog) if cfg.catalog else CATALOG_PATH
    try:
        catalog = load_catalog(catalog_path)
    except CatalogError as err:
        raise ConfigError(f"generate.catalog: {err}") from None
    own = read_own_rows(Path(cfg.data_file), set(catalog.names)) if cfg.data_file else []
    inputs = {"catalog": artifacts.sha256_file(catalog_path),
              **({"data_file": artifacts.sha256_file(Path(cfg.data_file))} if own else {})}
    stage = artifacts.StageRun("generate", "data", run_cfg.run_dir, as_dict(cfg), inputs,
                               artifacts.code_hash(__file__), ["rich"])
    if cli.already_done(stage, args):
        return 0
    lex = json.loads(TEMPLATES_PATH.read_text(encoding="utf-8"))
    n = round(len(own) * (1 - cfg.data_file_share) / cfg.data_file_share) if own else cfg.n_examples
    with artifacts.timer(stage.results, "generate_s"):
        examples, redrawn = generate_examples(cfg, catalog, lex, n, {text_key(row["text"]) for row in own})
        llm = None
        if cfg.backend != "template":
            llm = metaprompt.run_backend(examples, cfg, catalog, run_cfg.run_dir / ".cache" / "api" / "generate.jsonl",
                                         lambda line: cli.console.print(Text(line)))  # endpoint text, literally
            if llm is None:
                return 1   # endpoint down or budget spent: said so, nothing published, answers so far cached
        splits = split(own + examples, cfg)
    empty = [name for name, rows in splits.items() if not rows]
    if empty:   # every later stage needs rows in each split
        raise ConfigError(f"generate: {len(own) + len(examples)} examples leave {' and '.join(empty)} empty at "
                          f"test_fraction={cfg.test_fraction} and val_fraction={cfg.val_fraction}: give more rows "
                          f"(generate.data_file, generate.n_examples) or larger fractions")
    out = stage.fresh_tmp()
    # the catalog travels with the data it labels (read, then written: an error names the file it concerns)
    (out / RUN_CATALOG).write_bytes(Path(catalog_path).read_bytes())
    for name, rows in splits.items():
        artifacts.write_jsonl(out / f"{name}.jsonl", rows)
    stats = statistics(splits, redrawn)
    if own:
        stats["data_file"] = {"name": Path(cfg.data_file).name, "rows": len(own), "sha256": inputs["data_file"]}
    if llm:
        stats["llm"] = llm
    artifacts.write_json(out / "stats.json", stats)
    (out / "README.md").write_text(dataset_card(stats, cfg, run_cfg.name, metaprompt.card(llm) if llm else ""),
                                   encoding="utf-8")
    stage.results.update(stats)
    stage.publish()
    cli.show_config(f"data · {stats['total']} examples in {stage.results['generate_s']} s",
                    {**stats["counts"], **stats["lang"], "duplicates redrawn": redrawn})
    return 0


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "generate", GenerateConfig, run, argv)

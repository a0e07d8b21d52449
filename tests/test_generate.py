"""The template generator: deterministic, balanced, noisy at the configured rates, no leakage."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stages.generate import stage as generate
from stages.generate.noise import NOISE_KINDS
from cart_intent.artifacts import read_jsonl, read_manifest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")


def run_generate(tmp_path, *sets, force=False):
    argv = ["--config", SMOKE, "--set", f"run.artifacts_dir='{tmp_path}'", *[a for s in sets for a in ("--set", s)]]
    assert generate.main(argv + (["--force"] if force else [])) == 0
    return tmp_path / "smoke" / "data"


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """3000 examples: enough to measure rates within a few points."""
    out = run_generate(tmp_path_factory.mktemp("gen"), "generate.n_examples=3000")
    return {name: read_jsonl(out / f"{name}.jsonl") for name in ("train", "val", "test")}, out


def test_same_config_gives_byte_identical_files(tmp_path):
    a = run_generate(tmp_path / "a")
    b = run_generate(tmp_path / "b")
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "README.md", "stats.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = run_generate(tmp_path / "c", "generate.seed=7")
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()


def test_rerun_is_skipped_unless_forced(tmp_path):
    out = run_generate(tmp_path)
    first = read_manifest(out)["finished"]
    run_generate(tmp_path)
    assert read_manifest(out)["finished"] == first
    run_generate(tmp_path, "generate.n_examples=300")
    assert read_manifest(out)["results"]["total"] == 300


def test_splits_sizes_and_no_leakage(big):
    splits, _ = big
    assert [len(splits[k]) for k in ("test", "val", "train")] == [300, 270, 2430]
    keys = {k: {" ".join(ex["text"].casefold().split()) for ex in v} for k, v in splits.items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    assert sum(len(v) for v in keys.values()) == 3000


def test_languages_balanced_and_fields_valid(big):
    splits, _ = big
    rows = [ex for part in splits.values() for ex in part]
    counts = Counter(ex["lang"] for ex in rows)
    assert max(counts.values()) - min(counts.values()) <= 1
    names = set(generate.load_catalog().names)
    for ex in rows:
        assert set(ex["noise"]) <= set(NOISE_KINDS)
        if ex["action"] == "none":
            assert ex["product"] is None and ex["quantity"] is None and "-none-" in ex["template_id"]
            continue
        assert ex["action"] in ("add", "remove") and ex["product"] in names
        assert isinstance(ex["quantity"], int) and 1 <= ex["quantity"] <= 50
    actions = Counter(ex["action"] for ex in rows)
    assert actions["none"] / len(rows) == pytest.approx(generate.GenerateConfig().none_share, abs=0.03)
    assert actions["remove"] / (len(rows) - actions["none"]) == pytest.approx(0.5, abs=0.05)
    quantities = [ex["quantity"] for ex in rows if ex["action"] != "none"]
    assert Counter(quantities).most_common(1)[0][0] == 1 and max(quantities) >= 40


def test_every_noise_kind_near_its_rate(big):
    splits, out = big
    rows = [ex for part in splits.values() for ex in part]
    rates = generate.GenerateConfig().noise
    for kind in NOISE_KINDS:
        pool = [ex for ex in rows if kind != "code_switch" or ex["lang"] != "en"]
        share = sum(kind in ex["noise"] for ex in pool) / len(pool)
        # typo needs a long word and casing can be a no-op on shouting text: allow a few points under
        assert rates[kind] - 0.04 <= share <= rates[kind] + 0.03, (kind, share)


def test_quantity_styles_all_present(big):
    splits, _ = big
    rows = [ex for part in splits.values() for ex in part]
    styles = Counter(ex["quantity_style"] for ex in rows)
    assert {"digits", "word", "x", "dozen", "implicit"} <= set(styles)
    assert any(s.startswith("unit+") for s in styles)
    for ex in rows:
        if ex["quantity_style"] == "digits":
            assert str(ex["quantity"]) in ex["text"]
        if ex["quantity_style"] == "dozen":
            assert ex["quantity"] == 12


def test_dataset_card_and_datasets_loader(big):
    _, out = big
    card = (out / "README.md").read_text()
    for word in ("language", "noise kind", "quantity", "duplicate"):
        assert word in card
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"] == 3000
    import datasets
    ds = datasets.load_dataset("json", data_files={k: str(out / f"{k}.jsonl") for k in ("train", "val", "test")})
    assert ds["test"].num_rows == 300 and "text" in ds["train"].column_names


def test_own_labelled_file_is_used_whole_and_mixed_by_its_share(tmp_path):
    own = ROOT / "datasets" / "realistic.jsonl"
    out = run_generate(tmp_path, f"generate.data_file='{own}'", "generate.data_file_share=0.5")
    rows = [json.loads(line) for name in ("train", "val", "test") for line in (out / f"{name}.jsonl").open()]
    mine = [json.loads(line) for line in own.open()]
    assert len(rows) == 2 * len(mine)
    by_id = {row["id"]: row for row in rows}
    assert all(by_id[m["id"]]["text"] == m["text"] and by_id[m["id"]]["source"] == "file" for m in mine)
    assert len({" ".join(r["text"].casefold().split()) for r in rows}) == len(rows)   # no text twice
    stats = json.loads((out / "stats.json").read_text())
    assert stats["data_file"]["rows"] == len(mine) and stats["total"] == len(rows)
    assert f"{len(mine)} rows from realistic.jsonl" in (out / "README.md").read_text()
    again = run_generate(tmp_path / "again", f"generate.data_file='{own}'", "generate.data_file_share=0.5")
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()   # the same seeded split


@pytest.mark.parametrize("third_line, needle", [
    ({"text": "buy a unicorn", "action": "add", "product": "Unicorn", "quantity": 1},
     ":3: product 'Unicorn' is not in the catalog"),
    ({"text": "add 3 milk", "action": "add", "product": "Milk", "quantity": 1000}, ":3: quantity must be an integer"),
    ({"text": "ADD  two milks", "action": "add", "product": "Milk", "quantity": 2}, ":3: the same text as line 1"),
    ({"text": "add milk", "action": "add", "product": "Milk", "quantity": 1, "lang": "de"}, ":3: lang must be one of"),
])
def test_a_bad_row_of_your_file_is_one_line_exit_2(tmp_path, third_line, needle):
    path = tmp_path / "mine.jsonl"
    rows = [{"text": "add two milks", "action": "add", "product": "Milk", "quantity": 2},
            {"text": "quita un jabón", "action": "remove", "product": "Hand Soap", "quantity": 1, "lang": "es"},
            third_line]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    argv = ["--config", SMOKE, "--set", f"run.artifacts_dir='{tmp_path}'", "--set", f"generate.data_file='{path}'"]
    proc = subprocess.run([sys.executable, "-m", "stages.generate", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"generate.data_file: {path}{needle}" in proc.stderr.replace("\n", "")
    assert not (tmp_path / "smoke" / "data").exists()


def test_a_file_too_small_for_the_splits_is_one_line_exit_2(tmp_path):
    """Three rows gave empty val and test splits, which every later stage then failed on."""
    path = tmp_path / "mine.jsonl"
    rows = [{"text": f"add {n} milks", "action": "add", "product": "Milk", "quantity": n} for n in (2, 3, 4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    argv = ["--config", SMOKE, "--set", f"run.artifacts_dir='{tmp_path}'", "--set", f"generate.data_file='{path}'"]
    proc = subprocess.run([sys.executable, "-m", "stages.generate", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "empty" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "smoke" / "data").exists()


def test_out_of_scope_messages_cover_every_category_and_the_catalogs_own_foreign_products(big):
    splits, _ = big
    rows = [ex for part in splits.values() for ex in part if ex["action"] == "none"]
    categories = {ex["template_id"].split("-none-")[1].rsplit("-", 1)[0] for ex in rows}
    lex = json.loads(generate.TEMPLATES_PATH.read_text(encoding="utf-8"))
    assert categories == set(lex["out_of_scope"]["en"]) | {"out_of_catalog"}
    foreign = {form["sg"] for form in generate.load_catalog().out_of_catalog["en"]} | \
              {form["pl"] for form in generate.load_catalog().out_of_catalog["en"]}
    requests = [ex["text"].casefold() for ex in rows
                if "out_of_catalog" in ex["template_id"] and ex["lang"] == "en" and "typo" not in ex["noise"]]
    assert requests and all(any(noun in text for noun in foreign) for text in requests)
    assert not any("{" in ex["text"] for ex in rows)   # every slot filled


def test_a_catalog_without_foreign_products_and_none_share_zero(tmp_path):
    catalog = json.loads((ROOT / "cart_intent" / "catalog.json").read_text(encoding="utf-8"))
    del catalog["out_of_catalog"]
    path = tmp_path / "shop.json"
    path.write_text(json.dumps(catalog), encoding="utf-8")
    out = run_generate(tmp_path / "a", f"generate.catalog='{path}'", "generate.n_examples=600")
    rows = [ex for name in ("train", "val", "test") for ex in read_jsonl(out / f"{name}.jsonl")]
    assert any(ex["action"] == "none" for ex in rows)
    assert not any("out_of_catalog" in ex["template_id"] for ex in rows)
    out = run_generate(tmp_path / "b", "generate.none_share=0", "generate.n_examples=600")
    assert not any(ex["action"] == "none" for name in ("train", "val", "test") for ex in read_jsonl(out / f"{name}.jsonl"))


def test_the_hand_written_out_of_scope_set_is_valid_and_not_generated(big):
    from cart_intent.task import read_examples, text_key
    rows = read_examples(ROOT / "datasets" / "out-of-scope.jsonl", set(generate.load_catalog().names))
    assert all(row["action"] == "none" for row in rows)
    assert min(Counter(row["lang"] for row in rows).values()) >= 30
    splits, _ = big
    generated = {text_key(ex["text"]) for part in splits.values() for ex in part}
    assert not generated & {text_key(row["text"]) for row in rows}

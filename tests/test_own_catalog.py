"""A shop's own catalog and labelled rows: generate -> finetune -> gguf -> evaluate -> predict on the smoke
config with a 12-product hardware-store catalog; the data, the schema, the grammar, constrained decoding and
the served answer all follow it. Bad catalogs stop generate with exit 2 and the file."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE, stage
from cart_intent.catalog import load_catalog

HARDWARE = ROOT / "tests" / "data" / "hardware_catalog.json"


def own_rows(path):
    """30 labelled rows in the three languages, written from the catalog's own forms."""
    catalog = load_catalog(HARDWARE)
    verbs = {"en": ("add", "remove"), "hr": ("dodaj", "makni"), "es": ("añade", "quita")}
    rows = []
    for i, product in enumerate(catalog.products * 3):
        lang = ("en", "hr", "es")[i % 3]
        forms, action = product.names[lang][0], ("add", "remove")[i % 2]
        noun = forms.get("pl") or forms["gen_sg"]
        quantity = 2 + i // len(catalog.products)   # each round its own quantity: no text twice
        rows.append({"text": f"{verbs[lang][i % 2]} {quantity} {noun}", "action": action, "product": product.name,
                     "quantity": quantity, "lang": lang, "id": f"shop-{i:03d}"})
    rows = rows[:30]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return rows


@pytest.mark.integration
def test_a_run_on_a_hardware_catalog_follows_it_everywhere(tmp_path):
    data_file = tmp_path / "shop.jsonl"
    rows = own_rows(data_file)
    sets = ["--set", f"generate.catalog='{HARDWARE}'", "--set", f"generate.data_file='{data_file}'",
            "--set", "generate.data_file_share=0.1",
            # what the assertions read, no more: one GGUF type, constrained answers of the first 12 test messages
            "--set", "gguf.types=['Q4_K_M']", "--set", "evaluate.limit=12", "--set", "evaluate.decoding=['constrained']"]
    for name in ("generate", "base", "finetune", "merge", "gptq", "gguf", "evaluate"):
        stage(name, tmp_path, *sets)
    run = tmp_path / "smoke"
    names = load_catalog(HARDWARE).names
    assert (run / "data" / "catalog.json").read_bytes() == HARDWARE.read_bytes()
    data = [json.loads(line) for split in ("train", "val", "test") for line in (run / "data" / f"{split}.jsonl").open()]
    operations = [row for row in data if row["action"] != "none"]   # the rest ask for no cart change
    assert len(data) == 10 * len(rows) and {row["product"] for row in operations} <= set(names)
    schema = json.loads((run / "gguf" / "tiny" / "schema.json").read_text())
    assert schema["anyOf"][0]["properties"]["product"]["enum"] == names
    grammar = (run / "gguf" / "tiny" / "answer.gbnf").read_text()
    assert '"Tape Measure"' in grammar and "Lip Balm" not in grammar
    for predictions in (run / "eval" / "predictions").glob("*__constrained.jsonl"):
        answers = [json.loads(line)["parsed"] for line in predictions.open()]
        assert all(a["product"] in names or a["action"] == "none" for a in answers), predictions.name
    proc = subprocess.run([sys.executable, "-m", "stages.predict", "--config", SMOKE, "--set",
                           f"run.artifacts_dir='{tmp_path}'", "--text", "dodaj 2 čekića"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    answer = json.loads(proc.stdout)
    assert proc.returncode == 0 and (answer["product"] in names or answer["action"] == "none")


@pytest.mark.parametrize("break_it, needle", [
    (lambda d: d["products"].append(dict(d["products"][0])), "product name 'Hammer' is empty or given twice"),
    (lambda d: d["products"][1].pop("es"), "Screwdriver has no es names"),
    (lambda d: d["products"][1]["en"].append({"sg": "hammer", "pl": "hammers"}), "'hammer' names both Hammer and"),
    (lambda d: d.pop("units"), "not shaped like cart_intent/catalog.json"),
])
def test_a_bad_catalog_is_one_line_exit_2(tmp_path, break_it, needle):
    data = json.loads(HARDWARE.read_text())
    break_it(data)
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    proc = subprocess.run([sys.executable, "-m", "stages.generate", "--config", SMOKE, "--set",
                           f"run.artifacts_dir='{tmp_path}'", "--set", f"generate.catalog='{path}'"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"generate.catalog: {path}" in proc.stderr.replace("\n", "") and needle in proc.stderr.replace("\n", "")
    assert not (tmp_path / "smoke" / "data").exists()


def test_more_examples_than_the_catalog_can_phrase_is_one_line_exit_2(tmp_path):
    """Two products, English only, quantity 1, no noise, no quantity styles: a few hundred distinct messages.
    Asking for 3,000 was a RuntimeError traceback."""
    quiet = [f"generate.noise.{kind}=0" for kind in ("greeting", "signoff", "slang", "brand", "unrelated_number",
                                                     "code_switch", "typo", "emoji", "casing", "punctuation")]
    sets = [f"generate.catalog='{HARDWARE}'", "generate.languages=['en']", "generate.quantity_buckets=[[1, 1, 1]]",
            "generate.quantity_style={word=0.0, x=0.0, dozen=0.0, implicit=0.0, unit=0.0}",
            "generate.n_examples=3000", *quiet]
    proc = stage("generate", tmp_path, *(part for item in sets for part in ("--set", item)), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "generate.n_examples = 3000: only" in proc.stderr and "distinct messages" in proc.stderr
    assert not (tmp_path / "smoke" / "data").exists()

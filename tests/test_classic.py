"""The classic baseline (char n-gram TF-IDF + logistic regression per field) on a tiny hand-made split."""
import itertools
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE

from cart_intent.classic import CharNgramModel, first_number
from cart_intent.metrics import score, summarize

WORDS = {2: ("two", "dva", "dos"), 3: ("three", "tri", "tres")}
PRODUCTS = {"Lip Balm": ("lip balms", "balzama za usne", "bálsamos labiales"),
            "Toothpaste": ("toothpastes", "paste za zube", "pastas de dientes"),
            "Shampoo": ("shampoos", "šampona", "champús")}
VERBS = {"add": ("add", "dodaj", "añade"), "remove": ("remove", "ukloni", "quita")}


def rows(quantities) -> list[dict]:
    out = []
    for (action, verbs), (product, names), quantity in itertools.product(VERBS.items(), PRODUCTS.items(), quantities):
        for lang, verb, name in zip(("en", "hr", "es"), verbs, names):
            said = WORDS[quantity][("en", "hr", "es").index(lang)] if quantity in WORDS else str(quantity)
            out.append({"id": f"{len(out)}", "lang": lang, "text": f"{verb} {said} {name}", "action": action,
                        "product": product, "quantity": quantity})
    return out


@pytest.mark.parametrize("text, number", [("add 12 lip balms", 12), ("dodaj 3 paste za zube", 3),
                                          ("add two lip balms", None), ("1.5 l of water", None),
                                          ("500ml shampoo x2", 500), ("0 of them", None), ("12345 cables", None)])
def test_the_number_extractor_reads_the_first_whole_number_in_digits(text, number):
    assert first_number(text) == number


def test_it_learns_action_product_and_word_quantities_and_reads_digits_it_never_saw():
    train = rows([2, 3, 5])
    model = CharNgramModel(seed=0).fit(train)
    assert model.train_s > 0
    scored = score(train, model.answer([r["text"] for r in train]), set(PRODUCTS))
    assert summarize(scored)["exact_match"] == 1.0
    unseen = rows([7, 40])   # digits it was never trained on: the extractor reads them
    assert summarize(score(unseen, model.answer([r["text"] for r in unseen]), set(PRODUCTS)))["exact_match"] == 1.0


def test_the_same_split_and_seed_give_the_same_answers_and_one_class_fields_are_constant():
    train = [r for r in rows([2, 3]) if r["action"] == "add"]
    texts = ["quita dos champús", "add 9 toothpastes"]
    first = [c.text for c in CharNgramModel(seed=1).fit(train).answer(texts)]
    assert first == [c.text for c in CharNgramModel(seed=1).fit(train).answer(texts)]
    assert all('"action": "add"' in text for text in first)   # only `add` was seen


def test_an_unknown_classic_model_is_a_config_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stages.baseline", "--config", SMOKE, "--set",
                           f"run.artifacts_dir='{tmp_path}'", "--set", "baseline.models=['classic:nope']"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "classic:char-ngram" in proc.stderr + proc.stdout, proc.stderr[-1000:]

"""Out-of-scope messages for `generate`: what a shop's assistant hears that asks for no cart change.

Each is labelled with the none-form and drawn like the cart messages (a category, a template, then the same noise):
order status, delivery, payment, returns, product questions, small talk, complaints and account questions from
templates.json's "out_of_scope" (slots: {product}/{bare}/{product_acc}/{product_gen} a catalog product, {products}
its plural, {k} a small number, {n} an order number), and requests to add or remove something the shop does not sell,
written with the cart templates and the catalog's own "out_of_catalog" nouns (so a shop's catalog brings its own).
"""
from __future__ import annotations

import random

from cart_intent.catalog import Catalog, indefinite, noun, quantity_phrase
from cart_intent.task import NO_OPERATION

OUT_OF_CATALOG = "out_of_catalog"
OUT_OF_CATALOG_WEIGHT = 2   # the hardest: phrased exactly like a cart operation, only the product is foreign


def product_slots(lang: str, catalog: Catalog, rng: random.Random, k: int) -> dict[str, str]:
    """The text every product slot of a template takes, for one catalog product drawn at random."""
    forms = rng.choice(catalog.product(rng.choice(catalog.names)).names[lang])
    bare = noun(lang, forms, None, "nom")
    article = {"m": "el", "f": "la"}.get(forms.get("gender"), "el")
    return {"{product}": f"{article} {bare}" if lang == "es" else bare, "{bare}": bare,
            "{product_acc}": noun(lang, forms, None, "acc"), "{product_gen}": forms.get("gen_sg", bare),
            "{products}": noun(lang, forms, k if k else 5)}


def question(lang: str, category: str, catalog: Catalog, lex: dict, rng: random.Random) -> tuple[str, int]:
    """(text, template index) of a message outside the cart from one category's templates."""
    templates = lex["out_of_scope"][lang][category]
    index = rng.randrange(len(templates))
    text, k = templates[index], rng.randint(2, 9)
    for slot, value in {**product_slots(lang, catalog, rng, k), "{k}": str(k),
                        "{n}": str(rng.randint(100, 99999))}.items():
        text = text.replace(slot, value)
    return text, index


def foreign_request(lang: str, catalog: Catalog, lex: dict, rng: random.Random, quantity: int) -> tuple[str, int]:
    """(text, template index) of a cart request for something the catalog does not hold, e.g. "add 2 lawn mowers"."""
    action = rng.choice(("add", "remove"))
    templates = lex["templates"][lang][action]
    index = rng.randrange(len(templates))
    template, forms = templates[index], rng.choice(catalog.out_of_catalog[lang])
    slot, case = ("{item_nom}", "nom") if "{item_nom}" in template else ("{item}", "acc")
    if quantity == 1 and rng.random() < 0.5:
        item = indefinite(lang, forms, False, case)
    else:
        item = quantity_phrase(lang, quantity, "word" if quantity <= 20 and rng.random() < 0.3 else "digits", forms, case)
    return template.replace(slot, item), index


def draw(lang: str, catalog: Catalog, lex: dict, rng: random.Random, quantity: int) -> dict:
    """One out-of-scope message before noise: text, template id, and the none-form's fields."""
    categories = list(lex["out_of_scope"][lang])
    weights = [1] * len(categories)
    if catalog.out_of_catalog.get(lang):
        categories, weights = categories + [OUT_OF_CATALOG], weights + [OUT_OF_CATALOG_WEIGHT]
    category = rng.choices(categories, weights=weights)[0]
    if category == OUT_OF_CATALOG:
        text, index = foreign_request(lang, catalog, lex, rng, quantity)
    else:
        text, index = question(lang, category, catalog, lex, rng)
    return {"text": text, "template_id": f"{lang}-{NO_OPERATION}-{category}-{index:02d}", "category": category}

"""The catalog file and the grammar that agrees a number with a product."""
import pytest

from cart_intent.catalog import (NUMBER_WORDS, hr_count_class, hr_noun, indefinite, load_catalog, number_word,
                                quantity_phrase, unit_phrase)

REQUIRED = ["Lip Balm", "Toothpaste", "Toothbrush", "Shampoo", "Hand Soap", "Sunscreen", "Deodorant",
            "Toilet Paper", "Paper Towels", "Dish Soap", "Laundry Detergent", "Trash Bags", "Battery", "Light Bulb",
            "Phone Charger", "USB Cable", "Headphones", "Notebook", "Pen", "Coffee Beans", "Green Tea", "Olive Oil",
            "Pasta", "Rice", "Milk", "Eggs", "Bread", "Butter", "Cheese", "Apple", "Banana", "Orange Juice",
            "Mineral Water", "Chocolate Bar", "Cereal", "Yogurt", "Honey", "Dog Food", "Cat Litter", "Baby Wipes",
            "Diapers", "T-Shirt", "Socks", "Umbrella", "Water Bottle", "Face Mask", "Vitamins", "Candle"]
CATALOG = load_catalog()


def forms(product, lang, i=0):
    return CATALOG.product(product).names[lang][i]


def test_catalog_has_the_48_canonical_products():
    assert set(REQUIRED) <= set(CATALOG.names)
    assert len(CATALOG.names) == len(set(CATALOG.names))
    assert {"bottle", "pack", "can", "bar", "roll", "pair"} <= set(CATALOG.units)
    assert len(CATALOG.brands) >= 20


def test_every_product_has_names_in_every_language():
    for product in CATALOG.products:
        for lang in ("en", "hr", "es"):
            assert product.names[lang], (product.name, lang)
            for f in product.names[lang]:
                assert not any(ch.isdigit() for ch in str(f.values())), (product.name, f)


@pytest.mark.parametrize("n, cls", [(1, "one"), (21, "one"), (31, "one"), (11, "many"), (2, "few"), (3, "few"),
                                    (4, "few"), (24, "few"), (12, "many"), (14, "many"), (5, "many"),
                                    (7, "many"), (20, "many"), (25, "many"), (50, "many")])
def test_croatian_count_classes(n, cls):
    assert hr_count_class(n) == cls


def test_croatian_forms_after_1_3_and_7():
    toothpaste = {"gender": "f", "nom_sg": "pasta za zube", "acc_sg": "pastu za zube",
                  "gen_sg": "paste za zube", "gen_pl": "pasta za zube"}
    assert hr_noun(toothpaste, 1, "nom") == "pasta za zube"
    assert hr_noun(toothpaste, 1, "acc") == "pastu za zube"
    assert hr_noun(toothpaste, 3) == "paste za zube"
    assert hr_noun(toothpaste, 7) == "pasta za zube"
    assert hr_noun(toothpaste, None) == "pastu za zube"
    assert quantity_phrase("hr", 1, "word", toothpaste) == "jednu pastu za zube"
    assert quantity_phrase("hr", 2, "word", toothpaste) == "dvije paste za zube"
    assert quantity_phrase("hr", 3, "digits", toothpaste) == "3 paste za zube"
    assert quantity_phrase("hr", 7, "word", toothpaste) == "sedam pasta za zube"


def test_catalog_croatian_forms_differ_where_grammar_needs():
    # Feminine a-stems change between nominative, accusative and genitive: the catalog must encode it.
    water = forms("Mineral Water", "hr")
    assert water["gender"] == "f"
    assert len({water["nom_sg"], water["acc_sg"], water["gen_sg"]}) == 3
    for product in CATALOG.products:
        for f in product.names["hr"]:
            if f["gender"] == "m" and not f.get("plurale_tantum"):
                assert f["acc_sg"] == f["nom_sg"], (product.name, f)  # inanimate masculine: acc = nom


def test_spanish_and_english_agreement():
    candle_es = {"gender": "f", "sg": "vela", "pl": "velas"}
    assert quantity_phrase("es", 1, "word", candle_es) == "una vela"
    assert quantity_phrase("es", 2, "digits", candle_es) == "2 velas"
    assert number_word("es", 1, "m") == "un"
    assert indefinite("es", candle_es, mass=False) == "una vela"
    assert indefinite("en", {"sg": "apple", "pl": "apples"}, mass=False) == "an apple"
    assert indefinite("en", {"sg": "honey", "pl": "honey"}, mass=True) == "honey"
    assert quantity_phrase("en", 12, "dozen", {"sg": "egg", "pl": "eggs"}) == "a dozen eggs"
    assert quantity_phrase("en", 2, "x", {"sg": "lip balm", "pl": "lip balms"}) == "2x lip balm"


def test_units_agree_with_number_and_product():
    water_hr, bottle_hr = forms("Mineral Water", "hr"), CATALOG.units["bottle"]["hr"]
    assert unit_phrase("hr", 6, "digits", bottle_hr, water_hr, mass=True) == f"6 {bottle_hr['gen_pl']} " \
        f"{water_hr['gen_sg']}"
    assert unit_phrase("en", 6, "digits", CATALOG.units["bottle"]["en"], {"sg": "mineral water", "pl": "x"},
                       mass=True) == "6 bottles of mineral water"
    assert unit_phrase("es", 1, "word", CATALOG.units["bottle"]["es"], {"sg": "agua", "pl": "aguas"},
                       mass=True) == "una botella de agua"


def test_number_words_cover_1_to_20():
    for lang in ("en", "hr", "es"):
        assert len(NUMBER_WORDS[lang]) == 20
        assert all(number_word(lang, n) for n in range(1, 21))
    assert number_word("en", 21) is None


@pytest.mark.parametrize("change, needle", [
    (lambda d: d["products"][0].update(mass="false"), "mass must be true or false"),
    (lambda d: d["products"][0].update(units="bottle"), "units a list of unit names"),
    (lambda d: d.update(brands="Colgate"), "brands must be a list of brand names"),
    (lambda d: d["products"][0].update(name="Lip\fBalm"), "holds a control character"),
    (lambda d: d["products"][0].update(name="Lip\bBalm"), "holds a control character"),
])
def test_a_catalog_with_wrong_types_is_refused_by_name(tmp_path, change, needle):
    """"mass": "false" was read as true, "brands": "Colgate" as seven one-letter brands, and a name holding \\f
    or \\b gave an answer grammar llama.cpp cannot parse."""
    import json
    from cart_intent.catalog import CATALOG_PATH, CatalogError
    data = json.loads(CATALOG_PATH.read_text(encoding="utf-8"))
    change(data)
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CatalogError, match=needle):
        load_catalog(path)

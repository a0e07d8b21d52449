"""The product catalog (catalog.json) and the grammar that puts a number before a product.

English: singular after 1, plural otherwise. Croatian: the form depends on the last
digits (1, 21, 31: singular; 2-4, 22-24: genitive singular; 5-20, 25-30: genitive
plural) and on the case the sentence needs (accusative object or nominative subject).
Spanish: singular after 1 (un/una by gender), plural otherwise.
"""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import data_file

CATALOG_PATH = data_file(__file__, "catalog.json")   # the shipped 48 products
RUN_CATALOG = "catalog.json"   # the catalog a run uses, in its data/ folder
LANGUAGES = ("en", "hr", "es")

NUMBER_WORDS = {
    "en": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"],
    "hr": ["jedan", "dva", "tri", "četiri", "pet", "šest", "sedam", "osam", "devet", "deset", "jedanaest",
           "dvanaest", "trinaest", "četrnaest", "petnaest", "šesnaest", "sedamnaest", "osamnaest", "devetnaest",
           "dvadeset"],
    "es": ["uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve", "diez", "once", "doce",
           "trece", "catorce", "quince", "dieciséis", "diecisiete", "dieciocho", "diecinueve", "veinte"],
}
# Croatian "one" and "two" agree with the noun's gender (and "one" with its case).
HR_ONE = {("m", "nom"): "jedan", ("f", "nom"): "jedna", ("n", "nom"): "jedno",
          ("m", "acc"): "jedan", ("f", "acc"): "jednu", ("n", "acc"): "jedno"}
HR_TWO = {"m": "dva", "f": "dvije", "n": "dva"}
DOZEN = {"en": "a dozen", "hr": "tucet", "es": "una docena de"}
HR_FORM_KEYS = ("nom_sg", "acc_sg", "gen_sg", "gen_pl")


class CatalogError(Exception):
    pass


@dataclass(frozen=True)
class Product:
    name: str
    mass: bool
    units: tuple[str, ...]
    names: dict  # lang -> list of form dicts, first is the canonical phrasing


@dataclass(frozen=True)
class Catalog:
    products: tuple[Product, ...]
    units: dict
    brands: tuple[str, ...]
    # lang -> noun forms of things this shop does not sell ("lawn mower"): a request for one is no cart operation
    out_of_catalog: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.products]

    def product(self, name: str) -> Product:
        return next(p for p in self.products if p.name == name)


def _check_forms(where: str, forms: dict, lang: str) -> None:
    keys = {"en": ("sg", "pl"), "hr": ("gender", *HR_FORM_KEYS), "es": ("gender", "sg", "pl")}[lang]
    missing = [k for k in keys if not isinstance(forms.get(k), str) or not forms[k]]
    if missing:
        raise CatalogError(f"{where}: missing {', '.join(missing)}")
    if "gender" in forms and forms["gender"] not in ("m", "f", "n"):
        raise CatalogError(f"{where}: gender must be m, f or n")


def load_catalog(path: Path = CATALOG_PATH) -> Catalog:
    """Load and check a catalog file; a malformed one raises CatalogError naming the file and the entry."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return _build(path, data)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CatalogError(f"{path}: not a readable JSON catalog ({err})") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise CatalogError(f"{path}: not shaped like cart_intent/catalog.json ({type(err).__name__}: {err})") from None


def _build(path: Path, data: dict) -> Catalog:
    units = data["units"]
    for unit, langs in units.items():
        for lang in LANGUAGES:
            _check_forms(f"{path}: unit {unit} ({lang})", langs[lang], lang)
    products, seen, names = [], {}, set()
    for entry in data["products"]:
        name = entry["name"]
        if not isinstance(name, str) or not name.strip() or name in names:
            raise CatalogError(f"{path}: product name {name!r} is empty or given twice")
        if any(unicodedata.category(c).startswith("C") for c in name):   # \f, \b: no grammar could spell them
            raise CatalogError(f"{path}: product name {name!r} holds a control character")
        if not isinstance(entry["mass"], bool) or not _strings(entry.get("units", [])):
            raise CatalogError(f"{path}: {name}: mass must be true or false and units a list of unit names")
        names.add(name)
        for lang in LANGUAGES:
            if not entry.get(lang):
                raise CatalogError(f"{path}: {name} has no {lang} names")
            for forms in entry[lang]:
                _check_forms(f"{path}: {name} ({lang})", forms, lang)
                surface = (lang, forms.get("sg") or forms["nom_sg"])
                if seen.setdefault(surface, name) != name:
                    raise CatalogError(f"{path}: {surface[1]!r} names both {seen[surface]} and {name}")
        unknown_units = set(entry.get("units", [])) - set(units)
        if unknown_units:
            raise CatalogError(f"{path}: {name} uses unknown units {sorted(unknown_units)}")
        products.append(Product(name, entry["mass"], tuple(entry.get("units", [])),
                                {lang: entry[lang] for lang in LANGUAGES}))
    if len(products) < 2:
        raise CatalogError(f"{path}: needs at least 2 products")
    if not _strings(data["brands"]):
        raise CatalogError(f"{path}: brands must be a list of brand names (strings), not {data['brands']!r}")
    return Catalog(tuple(products), units, tuple(data["brands"]), _out_of_catalog(path, data, seen))


def _out_of_catalog(path: Path, data: dict, product_surfaces: dict) -> dict:
    """The optional "out_of_catalog" lists (per language, noun forms like a product's), none naming a product."""
    lists = data.get("out_of_catalog", {})
    if not isinstance(lists, dict) or not set(lists) <= set(LANGUAGES):
        raise CatalogError(f"{path}: out_of_catalog must map languages ({', '.join(LANGUAGES)}) to lists of noun forms")
    for lang, entries in lists.items():
        for forms in entries:
            _check_forms(f"{path}: out_of_catalog ({lang})", forms, lang)
            surface = forms.get("sg") or forms["nom_sg"]
            if (lang, surface) in product_surfaces:
                raise CatalogError(f"{path}: out_of_catalog {surface!r} ({lang}) names the product "
                                   f"{product_surfaces[(lang, surface)]}")
    return {lang: list(lists.get(lang, [])) for lang in LANGUAGES}


def _strings(value) -> bool:
    """A JSON list of non-empty strings (a bare string would be read as its letters)."""
    return isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)


def run_catalog(run_dir: Path) -> Catalog:
    """The catalog a run's data was generated from (data/catalog.json, copied there by generate)."""
    path = Path(run_dir) / "data" / RUN_CATALOG
    return load_catalog(path if path.is_file() else CATALOG_PATH)


def hr_count_class(n: int) -> str:
    """Croatian agreement class of a number: 'one' (1, 21, 31…), 'few' (2-4, 22-24…) or 'many'."""
    if n % 10 == 1 and n % 100 != 11:
        return "one"
    if n % 10 in (2, 3, 4) and n % 100 not in (12, 13, 14):
        return "few"
    return "many"


def hr_noun(forms: dict, n: int | None, case: str = "acc") -> str:
    """The Croatian noun form after number n (None: no number) in case 'acc' or 'nom'."""
    cls = "one" if n is None else hr_count_class(n)
    if cls == "one":
        return forms["nom_sg" if case == "nom" else "acc_sg"]
    if forms.get("plurale_tantum") and cls == "few":
        return forms["nom_sg"]  # "3 pelene": plural-only nouns keep the plural nominative after 2-4
    return forms["gen_sg" if cls == "few" else "gen_pl"]


def number_word(lang: str, n: int, gender: str = "m", case: str = "acc") -> str | None:
    """The word for n (1-20) agreeing with the noun, or None where there is none."""
    if not 1 <= n <= 20:
        return None
    if lang == "hr" and n == 1:
        return HR_ONE[(gender, case)]
    if lang == "hr" and n == 2:
        return HR_TWO[gender]
    if lang == "es" and n == 1:
        return "una" if gender == "f" else "un"
    return NUMBER_WORDS[lang][n - 1]


def noun(lang: str, forms: dict, n: int | None, case: str = "acc") -> str:
    if lang == "hr":
        return hr_noun(forms, n, case)
    return forms["sg"] if n in (None, 1) else forms["pl"]


def indefinite(lang: str, forms: dict, mass: bool, case: str = "acc") -> str:
    """One item with the quantity left implicit: 'a candle', 'honey', 'pastu za zube', 'una vela'."""
    if lang == "hr":
        return hr_noun(forms, None, case)
    if mass:
        return forms["sg"]
    if lang == "en":
        vowel_sound = forms["sg"][0].lower() in "aeiou" and not forms["sg"].lower().startswith(("us", "uni", "eu"))
        return ("an " if vowel_sound else "a ") + forms["sg"]
    return ("una " if forms["gender"] == "f" else "un ") + forms["sg"]


def quantity_phrase(lang: str, n: int, style: str, forms: dict, case: str = "acc") -> str:
    """Number + noun in one style: digits, word, dozen (n == 12) or x ('2x lip balm')."""
    if style == "word":
        gender = forms.get("gender", "m")
        if lang == "hr" and forms.get("plurale_tantum") and n == 1:
            return f"jedne {forms['nom_sg']}"
        return f"{number_word(lang, n, gender, case)} {noun(lang, forms, n, case)}"
    if style == "dozen":
        return f"{DOZEN[lang]} {noun(lang, forms, 12 if lang != 'hr' else 5, case)}"
    if style == "x":
        return f"{n}x {forms['sg'] if lang != 'hr' else forms['nom_sg']}"
    return f"{n} {noun(lang, forms, n, case)}"


def unit_phrase(lang: str, n: int | None, style: str, unit_forms: dict, product_forms: dict, mass: bool,
                case: str = "acc") -> str:
    """'6 bottles of mineral water', '6 boca mineralne vode', '6 botellas de agua mineral'."""
    if n is None:
        head = indefinite(lang, unit_forms, False, case)
    else:
        head = quantity_phrase(lang, n, style, unit_forms, case)
    if lang == "hr":
        return f"{head} {product_forms['gen_sg' if mass else 'gen_pl']}"
    joiner = " of " if lang == "en" else " de "
    return head + joiner + product_forms["sg" if mass else "pl"]

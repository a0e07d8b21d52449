"""Text noise for synthetic user messages, each kind a small seeded function.

Every function takes the text, the language, a `random.Random` and the lexicons
from templates.json, and returns the new text. None of them touches a digit or a
number word, so the ground-truth quantity always survives.
"""
from __future__ import annotations

import re

from cart_intent.catalog import NUMBER_WORDS

NOISE_KINDS = ("greeting", "signoff", "slang", "brand", "unrelated_number", "code_switch",
               "typo", "emoji", "casing", "punctuation")

# QWERTY neighbours for keyboard-slip typos.
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
NEIGHBOURS = {}
for r, row in enumerate(KEYBOARD_ROWS):
    for c, ch in enumerate(row):
        near = [row[i] for i in (c - 1, c + 1) if 0 <= i < len(row)]
        near += [KEYBOARD_ROWS[rr][c] for rr in (r - 1, r + 1) if 0 <= rr < 3 and c < len(KEYBOARD_ROWS[rr])]
        NEIGHBOURS[ch] = near

PROTECTED_WORDS = {w for words in NUMBER_WORDS.values() for w in words} | {
    "jedna", "jednu", "jedno", "jedne", "dvije", "un", "una", "dozen", "tucet", "docena"}


def greeting(text, lang, rng, lex):
    return f"{rng.choice(lex['greetings'][lang])} {text}"


def signoff(text, lang, rng, lex):
    return f"{text} {rng.choice(lex['signoffs'][lang])}"


def slang(text, lang, rng, lex):
    """Swap a word for its informal spelling; with none present, tag one on."""
    table = lex["slang"][lang]
    present = [w for w in sorted(table, key=len, reverse=True)
               if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, flags=re.IGNORECASE)]
    if not present:
        return f"{text} {rng.choice(lex['slang_tags'][lang])}"
    word = rng.choice(present)
    return re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", rng.choice(table[word]), text, count=1, flags=re.IGNORECASE)


def _aside(text, clause, rng):
    return f"{clause} {text}" if rng.random() < 0.4 else f"{text} {clause}"


def brand(text, lang, rng, lex):
    return _aside(text, rng.choice(lex["brand_noise"][lang]).replace("{brand}", rng.choice(lex["brands"])), rng)


def unrelated_number(text, lang, rng, lex):
    clause = rng.choice(lex["unrelated_numbers"][lang])
    clause = clause.replace("{n}", str(rng.randint(100, 99999))).replace("{k}", str(rng.randint(2, 9)))
    return _aside(text, clause, rng)


def code_switch(text, lang, rng, lex):
    """An English phrase dropped into a Croatian or Spanish sentence (at an edge: never inside the item)."""
    phrase = rng.choice(lex["code_switch"])
    return f"{phrase} {text}" if rng.random() < 0.4 else f"{text.rstrip('.!?')} {phrase}"


def typo(text, lang, rng, lex):
    """One slip (drop, swap, double or keyboard neighbour) in one longer word."""
    tokens = text.split(" ")
    eligible = [i for i, t in enumerate(tokens)
                if len(t) >= 4 and t.isalpha() and t.lower() not in PROTECTED_WORDS]
    if not eligible:
        return text
    i = rng.choice(eligible)
    word, pos = tokens[i], rng.randrange(1, len(tokens[i]) - 1)
    kind = rng.choice(("drop", "swap", "double", "neighbour"))
    if kind == "drop":
        word = word[:pos] + word[pos + 1:]
    elif kind == "swap":
        word = word[:pos] + word[pos + 1] + word[pos] + word[pos + 2:]
    elif kind == "double":
        word = word[:pos] + word[pos] + word[pos:]
    else:
        near = NEIGHBOURS.get(word[pos].lower())
        word = word[:pos] + (rng.choice(near) if near else word[pos]) + word[pos + 1:]
    tokens[i] = word
    return " ".join(tokens)


def emoji(text, lang, rng, lex):
    marks = "".join(rng.choice(lex["emojis"]) for _ in range(rng.randint(1, 2)))
    return f"{marks} {text}" if rng.random() < 0.25 else f"{text} {marks}"


def casing(text, lang, rng, lex):
    return rng.choice((str.lower, str.upper, str.lower))(text)


def punctuation(text, lang, rng, lex):
    """Strip the punctuation, or shout at the end."""
    stripped = text.translate(str.maketrans("", "", ".,!?¿¡;:")).strip()
    if stripped != text and rng.random() < 0.5:
        return stripped
    return text.rstrip(".!?") + rng.choice(("!!!", "??", "!?", "...", "!!"))


# Applied in this order: additions around the sentence first, character-level noise last.
NOISE_FUNCTIONS = {kind: globals()[kind] for kind in NOISE_KINDS}


def add_noise(text: str, lang: str, probabilities: dict[str, float], rng, lex) -> tuple[str, list[str]]:
    """Each noise kind with its probability (no code-switching in English); the text and the kinds that changed it."""
    applied = []
    for kind in NOISE_KINDS:
        if kind == "code_switch" and lang == "en":
            continue
        if rng.random() < probabilities[kind]:
            new = NOISE_FUNCTIONS[kind](text, lang, rng, lex)
            if new != text:
                text, applied = new, applied + [kind]
    return text, applied

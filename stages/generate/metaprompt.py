"""Metaprompting: the prompt that asks an LLM to write one user message for a fixed ground truth, and the
check every reply must pass before it is kept (the paper's GPT-4.1 recipe).

The script, not the model, decides language, action, product, quantity, a style (formal to bare
imperative) and a noise plan; the model only writes the message. `plan(rng, ...)` draws style and
noise, `build_prompt(...)` writes the request, `check_reply(...)` returns None or a rejection reason.
"""
from __future__ import annotations

import random
import re
import unicodedata

from cart_intent import cli
from cart_intent.api_client import ApiUnavailable, OpenAICompatible, ResponseCache
from cart_intent.catalog import NUMBER_WORDS, Catalog
from cart_intent.task import is_cart_operation, text_key

LANGUAGE_NAMES = {"en": "English", "hr": "Croatian", "es": "Spanish"}
STYLES = {
    "formal": "formal and polite, a complete sentence",
    "polite": "friendly and polite",
    "casual": "casual, like a chat message to a friend",
    "terse": "short and terse",
    "imperative": "a bare imperative command with no pleasantries",
}
NOISE_INSTRUCTIONS = {
    "greeting": "start with a short greeting",
    "signoff": "end with a short sign-off",
    "slang": "use some informal slang",
    "brand": "mention an unrelated brand name in passing",
    "unrelated_number": "mention an unrelated number (for example an order or house number)",
    "code_switch": "mix in a few English words",
    "typo": "include one or two realistic typos (not in the product name or the quantity)",
    "emoji": "add an emoji",
    "casing": "write it all in lowercase",
    "punctuation": "use sloppy punctuation",
}
ACTION_GOALS = {"add": "add {q} of \"{p}\" to their shopping cart", "remove": "remove {q} of \"{p}\" from their cart"}
# Words that ask for the opposite action; a reply containing one contradicts its ground truth.
ACTION_WORDS = {
    "en": {"add": ["add", "put in", "throw in", "buy", "include"],
           "remove": ["remove", "delete", "take out", "take off", "drop", "get rid of", "cancel"]},
    "hr": {"add": ["dodaj", "dodajte", "dodati", "stavi", "stavite", "ubaci", "ubacite", "kupi"],
           "remove": ["makni", "maknite", "ukloni", "uklonite", "izbriši", "izbrišite", "izbaci", "izbacite",
                      "obriši", "obrišite", "ukloniti", "maknuti"]},
    "es": {"add": ["añade", "añadir", "añadid", "agrega", "agregar", "agregue", "añada", "pon", "ponme", "mete"],
           "remove": ["quita", "quitar", "quite", "elimina", "eliminar", "elimine", "borra", "borrar", "saca",
                      "sacar", "retira", "retirar"]},
}
# Frequent function words, enough to tell the three languages apart in one message.
STOPWORDS = {
    "en": {"the", "and", "to", "my", "of", "please", "i", "a", "an", "cart", "some", "want", "need", "from", "can",
           "you", "would", "like", "it", "in", "for", "with", "hi", "hey", "thanks", "it's", "i'd"},
    "hr": {"i", "u", "za", "mi", "molim", "košaricu", "košarice", "iz", "je", "da", "bih", "se", "od", "na",
           "trebam", "želim", "hvala", "bok", "pozdrav", "te", "još", "moju", "mojoj", "iz"},
    "es": {"el", "la", "los", "las", "de", "del", "y", "por", "favor", "mi", "carrito", "al", "quiero", "un",
           "una", "unos", "unas", "hola", "gracias", "me", "en", "que", "para", "con", "necesito"},
}
REJECTIONS = ("empty", "several_messages", "too_long", "wrong_language", "product_missing", "quantity_missing",
              "contradicts_action", "duplicate")
MAX_REPLY_CHARS = 300


def plan(rng: random.Random, lang: str, noise: dict[str, float]) -> tuple[str, list[str]]:
    """(style, noise kinds) for one request; code-switching only outside English."""
    style = rng.choice(list(STYLES))
    kinds = [k for k, p in noise.items() if k in NOISE_INSTRUCTIONS and rng.random() < p
             and not (k == "code_switch" and lang == "en")]
    return style, kinds


def product_forms(catalog: Catalog, product: str, lang: str) -> list[str]:
    """Every surface form of the product in the language (all names, all grammatical forms)."""
    forms = []
    for names in catalog.product(product).names[lang]:
        forms += [v for k, v in names.items() if k != "gender" and isinstance(v, str)]
    return list(dict.fromkeys(forms))


def build_prompt(gold: dict, style: str, noise: list[str], catalog: Catalog) -> str:
    lang, q = gold["lang"], gold["quantity"]
    name = product_forms(catalog, gold["product"], lang)[0]
    lines = [
        f"Write one message that a shopper types to an online shop's assistant, in {LANGUAGE_NAMES[lang]}.",
        "The shopper wants to " + ACTION_GOALS[gold["action"]].format(q=q, p=name) + ".",
        f"Style: {STYLES[style]}.",
        f"Name the product (\"{name}\" or a common synonym) and the quantity {q} (as digits or as a word).",
    ]
    if noise:
        lines.append("Also: " + "; ".join(NOISE_INSTRUCTIONS[k] for k in noise) + ".")
    lines.append("Reply with the message only: no quotes, no explanation, one line.")
    return "\n".join(lines)


def _fold(text: str) -> str:
    return " ".join(text.casefold().split())


def _has(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(_fold(phrase))}(?!\w)", text) is not None


def _quantity_words(lang: str, q: int) -> list[str]:
    words = [str(q)]
    if q <= 20:
        words.append(NUMBER_WORDS[lang][q - 1])
    if q == 1:
        words += {"en": ["a", "an", "one", "single"], "hr": ["jedna", "jednu", "jedno", "jednog"],
                  "es": ["un", "una"]}[lang]
    if q == 2 and lang == "hr":
        words.append("dvije")
    if q == 12:
        words += {"en": ["dozen"], "hr": ["tucet"], "es": ["docena"]}[lang]
    return words


def _language_scores(text: str) -> dict[str, int]:
    words = re.findall(r"[\w']+", text)
    return {lang: sum(w in stop for w in words) for lang, stop in STOPWORDS.items()}


def check_reply(reply: str, gold: dict, catalog: Catalog) -> str | None:
    """None when the reply is one message in the language naming product and quantity, else the reason."""
    text = reply.strip().strip('"“”\'').strip()
    if not text:
        return "empty"
    if len([line for line in text.splitlines() if line.strip()]) > 1:
        return "several_messages"
    if len(text) > MAX_REPLY_CHARS:
        return "too_long"
    folded, lang = _fold(text), gold["lang"]
    scores = _language_scores(folded)
    if max(scores.values()) > scores[lang] + 1:   # code-switching may borrow a word or two
        return "wrong_language"
    forms = product_forms(catalog, gold["product"], lang)
    if not any(_has(folded, f) for f in forms):
        return "product_missing"
    if not any(_has(folded, w) for w in _quantity_words(lang, gold["quantity"])):
        return "quantity_missing"
    opposite = "remove" if gold["action"] == "add" else "add"
    if any(_has(folded, w) for w in ACTION_WORDS[lang][opposite]):
        return "contradicts_action"
    return None


def clean_reply(reply: str) -> str:
    """The kept text: quotes trimmed, whitespace collapsed, Unicode NFC."""
    return unicodedata.normalize("NFC", " ".join(reply.strip().strip('"“”\'').split()))


def estimate(n: int, prompt_chars: int, max_tokens: int, price_per_1k: float) -> dict:
    """Requests and cost of one attempt per example (~4 characters a token); retries add to it."""
    tokens = n * (prompt_chars / 4 + max_tokens)
    return {"requests": n, "tokens": round(tokens), "cost": round(tokens / 1000 * price_per_1k, 4)}


def rewrite_with_llm(examples: list[dict], indices: list[int], cfg, catalog: Catalog, cache_path, log) -> dict:
    """Replace the text of examples[i] for i in indices by an LLM-written message of the same ground truth.

    Rounds: every pending example gets attempt k (a request that depends only on seed, i, k and the ground
    truth); rejected ones go to round k + 1, up to llm_max_attempts. An example never accepted keeps its
    template text (counted as a fallback). Raises api_client.ApiUnavailable when the endpoint or the budget
    gives out: every answer received so far is in the cache, so a rerun resumes there.
    """
    client = OpenAICompatible(cfg.llm_model, cfg.api, ResponseCache(cache_path), "generate.api.max_requests", log=log)
    for ex in examples:
        ex.setdefault("source", "template")
    # every template text counts as taken (a fallback keeps its own), so no text appears twice in the dataset
    seen = {text_key(ex["text"]) for ex in examples}
    rejected = {reason: 0 for reason in REJECTIONS}
    pending, accepted, attempts = list(indices), 0, 0
    for k in range(cfg.llm_max_attempts):
        if not pending:
            break
        requests = []
        for i in pending:
            rng = random.Random(f"{cfg.seed}/{i}/{k}")
            style, noise = plan(rng, examples[i]["lang"], cfg.noise)
            # attempt k of example i: its own sampling seed, so its own cached request
            extra = {"temperature": cfg.llm_temperature, "seed": rng.randrange(2**31)}
            requests.append((style, noise, build_prompt(examples[i], style, noise, catalog), extra))
        with cli.progress(f"LLM messages, attempt {k + 1}", len(requests)) as advance:
            answers = client.answer_all([r[2] for r in requests], cfg.llm_max_tokens, on_done=advance,
                                        extras=[r[3] for r in requests])
        attempts += len(requests)
        still = []
        for i, (style, noise, _, _), answer in zip(pending, requests, answers):
            reason = check_reply(answer.text, examples[i], catalog)
            key = text_key(clean_reply(answer.text))
            if reason is None and key in seen:
                reason = "duplicate"
            if reason:
                rejected[reason] += 1
                still.append(i)
                continue
            seen.add(key)
            accepted += 1
            examples[i].update(text=clean_reply(answer.text), template_id=f"llm-{style}", quantity_style="llm",
                               noise=noise, source="llm", attempt=k)
        pending = still
    return {"model": cfg.llm_model, "endpoint": client.base_url, "examples": len(indices), "accepted": accepted,
            "fallback_to_template": len(pending), "attempts": attempts, "rejected": rejected, **client.stats}


def run_backend(examples: list[dict], cfg, catalog: Catalog, cache_path, log) -> dict | None:
    """The "llm" or "mixed" backend over template-drawn examples: prints the estimate, then rewrites.

    None (after one clear line) when the endpoint or the request budget gives out.
    """
    n = len(examples)
    operations = [i for i, ex in enumerate(examples) if is_cart_operation(ex)]  # out-of-scope rows keep their text
    if cfg.backend == "llm":
        indices = operations
    else:
        indices = sorted(random.Random(f"{cfg.seed}/mixed").sample(operations, round(len(operations) * cfg.llm_share)))
    chars = sum(len(build_prompt(examples[i], "formal", [], catalog)) for i in indices[:50]) / max(1, len(indices[:50]))
    guess = estimate(len(indices), chars, cfg.llm_max_tokens, cfg.llm_price_per_1k_tokens)
    log(f"llm backend: {len(indices)} of {n} examples by {cfg.llm_model}; first attempts ~{guess['requests']} "
        f"requests, ~{guess['tokens']} tokens, ~${guess['cost']} at ${cfg.llm_price_per_1k_tokens}/1k tokens "
        f"(cached answers are free; budget {cfg.api.max_requests} new requests)")
    try:
        result = rewrite_with_llm(examples, indices, cfg, catalog, cache_path, log)
    except ApiUnavailable as err:
        log(f"llm backend stopped: {err}; nothing published, answers so far are cached in "
            f"{cache_path}, so a rerun resumes there")
        return None
    result["estimate"] = guess
    return result


def card(llm: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in llm["rejected"].items())
    return (f"\n## LLM backend (metaprompting)\n\n{llm['accepted']} of {llm['examples']} messages written by "
            f"{llm['model']} and kept after validation, {llm['fallback_to_template']} kept their template text "
            f"after every attempt was rejected; {llm['attempts']} attempts, {llm['requests']} requests "
            f"({llm['retries']} retries), {llm['cache_hits']} answers from the cache.\n\n"
            f"| rejection reason | replies |\n|---|---:|\n{rows}\n")

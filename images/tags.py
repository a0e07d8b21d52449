"""Image names and content tags for compose.yaml, `make images`, `make push` and `make pull`.

An image's tag is a short SHA-256 of everything that goes into it: its Dockerfile, every file that
Dockerfile copies from the build context (the pinned requirement files, the stage code), after
.dockerignore, and its build arguments. Same inputs, same tag: `make push` skips a tag the registry
already has, and a host that pulls a tag runs exactly the code and pins of the checkout that made it.

    python3 images/tags.py env [--digests]   # PROJECT_VERSION=... TAG_CPU=... (DIGEST_CPU=... with --digests)
    python3 images/tags.py tag cpu           # one image's tag
    python3 images/tags.py refs              # <registry>/cart-intent-<image>:<tag>, one per image

Standard library only, as it runs on hosts without .venv; the docker SDK, where installed
(requirements/containers.txt), adds the digest of each image present on this host.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DEFAULT_REGISTRY = "localhost"  # a name no `docker push` can reach by accident: set REGISTRY to publish


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction is not part of it
        pending += " " + stripped
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, rest = pending.strip().partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def split_stages(path: Path) -> list[dict]:
    """The Dockerfile's build stages in order: name (None when unnamed), base image or stage, instructions."""
    result = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            words = rest.split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else None
            result.append({"name": name, "base": words[0], "instructions": []})
        if result:
            result[-1]["instructions"].append((keyword, rest))
    return result


def stage_uses(stage: dict) -> set[str]:
    """The stages a stage builds on: its FROM, and every COPY --from."""
    used = {stage["base"]}
    for keyword, rest in stage["instructions"]:
        found = re.search(r"--from=(\S+)", rest) if keyword == "COPY" else None
        used |= {found.group(1)} if found else set()
    return used


def images() -> dict[str, tuple[Path, str | None]]:
    """Image name -> (Dockerfile, build target). A Dockerfile makes one image named after the file, or, when
    several of its stages are leaves (no other stage builds on them, as in cuda.Dockerfile), one image per
    leaf, named after that stage and built with --target."""
    found = {}
    for path in sorted(IMAGES.glob("*.Dockerfile")):
        stages = split_stages(path)
        used = set().union(*(stage_uses(s) for s in stages))
        leaves = [s["name"] for s in stages if s["name"] not in used]
        if len(leaves) > 1 and all(leaves):
            found |= {leaf: (path, leaf) for leaf in leaves}
        else:
            found[path.name.removesuffix(".Dockerfile")] = (path, None)
    return dict(sorted(found.items()))


def image_names() -> list[str]:
    return list(images())


def dockerfile(name: str) -> Path:
    if name not in images():
        raise SystemExit(f"no image {name!r}: pick one of {', '.join(image_names())}")
    return images()[name][0]


def image_stages(name: str) -> list[dict]:
    """The stages the image is built from, in file order, its final (target) stage last."""
    path, target = dockerfile(name), images()[name][1]
    stages = split_stages(path)
    wanted, todo = set(), [target if target else len(stages) - 1]
    by_name = {s["name"]: i for i, s in enumerate(stages) if s["name"]}
    while todo:
        key = todo.pop()
        index = key if isinstance(key, int) else by_name.get(key)
        if index is None or index in wanted:
            continue   # an external image (FROM ${...}), or seen
        wanted.add(index)
        todo += list(stage_uses(stages[index]))
    return [stages[i] for i in sorted(wanted)]


def copy_sources(name: str) -> list[str]:
    """Build-context paths the image's stages copy (COPY without --from; ADD)."""
    sources = []
    for stage in image_stages(name):
        for keyword, rest in stage["instructions"]:
            if keyword not in ("COPY", "ADD"):
                continue
            words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            if any(w.startswith("--from=") for w in words):
                continue
            sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def build_args() -> dict[str, str]:
    """The build arguments compose.yaml passes to every image (part of each tag)."""
    match = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return {"PROJECT_VERSION": match.group(1) if match else "unknown"}


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def ignore_rules(root: Path = ROOT) -> list[tuple[bool, re.Pattern]]:
    """(re-included?, pattern) for each .dockerignore line, in order."""
    rules = []
    for line in (root / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _glob_regex(line.lstrip("!").strip().strip("/"))))
    return rules


def ignored(relative: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def context_files(name: str) -> list[Path]:
    """Every build-context file the image copies, as Docker sends it (.dockerignore applied)."""
    rules, files = ignore_rules(), set()
    for source in copy_sources(name):
        path = ROOT / source
        if not path.exists():
            raise SystemExit(f"{dockerfile(name).relative_to(ROOT)} copies {source}, which does not exist")
        candidates = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files |= {p for p in candidates if not ignored(p.relative_to(ROOT).as_posix(), rules)}
    return sorted(files)


def tag(name: str) -> str:
    digest = hashlib.sha256()
    for path in [dockerfile(name), *context_files(name)]:
        digest.update(f"{path.relative_to(ROOT).as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(json.dumps({**build_args(), "target": images()[name][1]}, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def ref(name: str) -> str:
    return f"{os.environ.get('REGISTRY') or DEFAULT_REGISTRY}/cart-intent-{name}:{tag(name)}"


def local_digest(image_ref: str) -> str:
    """The image's registry digest (pulled or pushed), else its local ID; "" when unknown here."""
    try:
        import docker
        image = docker.from_env(timeout=5).images.get(image_ref)
    except Exception:  # noqa: BLE001 - no SDK, no engine or no such image: the digest is just not known
        return ""
    return (image.attrs.get("RepoDigests") or [image.id])[0]


def env(digests: bool) -> list[str]:
    """Variables compose.yaml reads: the build arguments, TAG_<IMAGE> and optionally DIGEST_<IMAGE>."""
    lines = [f"{k}={v}" for k, v in build_args().items()]
    for name in image_names():
        lines.append(f"TAG_{name.upper()}={tag(name)}")
        if digests and (found := local_digest(ref(name))):
            lines.append(f"DIGEST_{name.upper()}={found}")
    return lines


def main(argv: list[str]) -> int:
    usage = "usage: images/tags.py env [--digests] | tag IMAGE | refs"
    if argv[:1] == ["env"] and argv[1:] in ([], ["--digests"]):
        print("\n".join(env(digests=argv[1:] == ["--digests"])))
    elif argv[:1] == ["tag"] and len(argv) == 2:
        print(tag(argv[1]))
    elif argv == ["refs"]:
        print("\n".join(ref(name) for name in image_names()))
    else:
        print(usage, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

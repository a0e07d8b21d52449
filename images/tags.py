"""Image names, content tags and builds for compose.yaml, `make images`, `make push` and `make pull`.

An image's tag is a short SHA-256 of everything that goes into it: its Dockerfile, every file that
Dockerfile copies from the build context (the pinned requirement files, the stage code), after
.dockerignore, its build target and the build arguments it is given (base images, package indexes).
Same inputs, same tag: `make push` skips a tag the registry already has, and a host that pulls a tag runs
exactly the code and pins of the checkout that made it.

    python3 images/tags.py env [--digests]   # PROJECT_VERSION=... TAG_CPU=... (ID_CPU=, DIGEST_CPU= with --digests)
    python3 images/tags.py tag cpu           # one image's tag
    python3 images/tags.py refs [IMAGE ...]  # <registry>/cart-intent-<image>:<tag>, one per image
    python3 images/tags.py build [IMAGE ...] # docker build, once per image, skipping tags already here
    python3 images/tags.py push [IMAGE ...]  # docker push to REGISTRY (tagged there from the local build)

Build arguments come from the environment (Make passes its variables): PYTHON_IMAGE, CUDA_BASE_IMAGE,
CUDA_DEVEL_IMAGE, UV_IMAGE, PYTHON_SOURCE, TORCH_INDEX_URL, PIP_INDEX_URL, LLAMA_SERVER_CMAKE_ARGS; a
Dockerfile's own ARG defaults apply to the rest. BASE_IMAGES=debian names a base built from Debian packages
(images/debian-base.sh) for every base, Debian's Python and the package index's torch (nothing from Docker
Hub, ghcr.io, nvcr.io or download.pytorch.org). CA_BUNDLE (a file) is handed to each build as the BuildKit
secret `ca`, never as an argument or a layer. Standard library only, as it runs on hosts without .venv.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DEFAULT_REGISTRY = "localhost"  # a name no `docker push` can reach by accident: set REGISTRY to publish
# build arguments a user may set (Make variables of the same names); each image gets those its Dockerfile declares
BUILD_ARGS = ("PYTHON_IMAGE", "CUDA_BASE_IMAGE", "CUDA_DEVEL_IMAGE", "UV_IMAGE", "PYTHON_SOURCE", "TORCH_INDEX_URL",
              "PIP_INDEX_URL", "LLAMA_SERVER_CMAKE_ARGS")
DEBIAN_BASE = IMAGES / "debian-base.sh"
LLAMA_CPP_PIN = ROOT / "requirements" / "llama-cpp.json"   # the llama.cpp commit the images label themselves with


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


def stage_uses(stage: dict, names: list[str] = ()) -> set[str]:
    """The stages a stage builds on: its FROM, and every COPY --from. A FROM naming a stage through a build
    argument and a name (`FROM python-${PYTHON_SOURCE}`) uses every stage of names it could expand to; one that is
    a build argument alone (`FROM ${PYTHON_IMAGE}`) names an external image."""
    used = {stage["base"]}
    parts = re.split(r"\$\{[A-Za-z_]+\}", stage["base"])
    if len(parts) > 1 and "".join(parts):
        pattern = ".+".join(re.escape(part) for part in parts)
        used |= {name for name in names if name and re.fullmatch(pattern, name)}
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
        names = [s["name"] for s in stages]
        used = set().union(*(stage_uses(s, names) for s in stages))
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
    names = list(by_name)
    while todo:
        key = todo.pop()
        index = key if isinstance(key, int) else by_name.get(key)
        if index is None or index in wanted:
            continue   # an external image (FROM ${...}), or seen
        wanted.add(index)
        todo += list(stage_uses(stages[index], names))
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


def project_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return match.group(1) if match else "unknown"


def debian_base() -> str:
    """The Debian-built base's reference, named by its recipe (images/debian-base.sh)."""
    return f"cart-intent-debian:{hashlib.sha256(DEBIAN_BASE.read_bytes()).hexdigest()[:12]}"


def chosen_args() -> dict[str, str]:
    """The build arguments this environment sets: BASE_IMAGES=debian's presets, then the variables given."""
    mode = os.environ.get("BASE_IMAGES") or "hub"
    if mode not in ("hub", "debian"):
        raise SystemExit(f"BASE_IMAGES must be hub (the Dockerfiles' defaults) or debian, not {mode!r}")
    chosen = {}
    if mode == "debian":
        base = debian_base()
        chosen = {"PYTHON_IMAGE": base, "CUDA_BASE_IMAGE": base, "CUDA_DEVEL_IMAGE": base,
                  "PYTHON_SOURCE": "system", "TORCH_INDEX_URL": ""}
    return chosen | {k: os.environ[k] for k in BUILD_ARGS if os.environ.get(k)}


def declared_args(name: str) -> set[str]:
    return {rest.split("=")[0].strip() for keyword, rest in instructions(dockerfile(name)) if keyword == "ARG"}


def build_args(name: str) -> dict[str, str]:
    """What `make images` passes to one image's build (all of it part of the tag)."""
    pinned = ({"LLAMA_CPP_COMMIT": json.loads(LLAMA_CPP_PIN.read_text())["llama_cpp_commit"]}
              if "requirements/llama-cpp.json" in copy_sources(name) else {})
    return {"PROJECT_VERSION": project_version(),
            **{k: v for k, v in (pinned | chosen_args()).items() if k in declared_args(name)}}


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
    digest.update(json.dumps({**build_args(name), "target": images()[name][1]}, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def ref(name: str, registry: str = "") -> str:
    """<registry>/cart-intent-<name>:<tag>, the registry REGISTRY's unless given."""
    return f"{registry or os.environ.get('REGISTRY') or DEFAULT_REGISTRY}/cart-intent-{name}:{tag(name)}"


def inspect(image_ref: str) -> dict | None:
    """`docker image inspect` of a local image (Id, RepoDigests, Size, ...), None when it is not here."""
    proc = subprocess.run(["docker", "image", "inspect", image_ref], capture_output=True, text=True)
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else None


def env(digests: bool) -> list[str]:
    """Variables compose.yaml reads: TAG_<IMAGE>, and with digests ID_<IMAGE> (the image ID: the same after a
    push and pull, part of each stage's fingerprint) and DIGEST_<IMAGE> (the registry digest, once pushed or
    pulled) of the images present here."""
    lines = [f"PROJECT_VERSION={project_version()}"]
    for name in image_names():
        image_ref = ref(name)
        lines.append(f"TAG_{name.upper()}={image_ref.rsplit(':', 1)[1]}")
        found = inspect(image_ref) if digests else None
        if found:
            lines.append(f"ID_{name.upper()}={found['Id']}")
            prefix = image_ref.rsplit(":", 1)[0] + "@"
            repo_digest = next((d for d in found.get("RepoDigests") or [] if d.startswith(prefix)), "")
            lines.append(f"DIGEST_{name.upper()}={repo_digest}")
    return lines


def build(names: list[str], force: bool) -> int:
    """docker build, once per image (BuildKit shares the layers the CUDA targets have in common), skipping an
    image whose tag is already here unless force; a Debian-built base first when BASE_IMAGES=debian."""
    if (os.environ.get("BASE_IMAGES") or "hub") == "debian":
        subprocess.run([str(DEBIAN_BASE), debian_base()], check=True)
    ca_bundle = os.environ.get("CA_BUNDLE", "")
    if ca_bundle and not Path(ca_bundle).is_file():
        raise SystemExit(f"CA_BUNDLE={ca_bundle} is not a file: give the CA bundle builds should trust, or CA_BUNDLE=")
    for name in names or image_names():
        image_ref = ref(name)
        if not force and inspect(image_ref):
            print(f"{image_ref}: present", flush=True)
            continue
        path, target = images()[name]
        command = ["docker", "build", "-f", str(path.relative_to(ROOT)), "-t", image_ref,
                   "--network", os.environ.get("BUILD_NETWORK") or "host",
                   *(["--target", target] if target else []),
                   *(["--secret", f"id=ca,src={ca_bundle}"] if ca_bundle else []),
                   *[f"--build-arg={k}={v}" for k, v in build_args(name).items()], "."]
        print(f"{image_ref}: building ({' '.join(shlex.quote(c) for c in command[2:-1])})", flush=True)
        began = time.monotonic()
        proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "DOCKER_BUILDKIT": "1"})
        if proc.returncode != 0:
            print(f"{image_ref}: docker build failed (exit code {proc.returncode})", file=sys.stderr)
            return 1
        size = inspect(image_ref)["Size"] / 1e9
        print(f"{image_ref}: built in {time.monotonic() - began:.0f} s, {size:.2f} GB", flush=True)
    return 0


def push(names: list[str]) -> int:
    """docker push of this checkout's images to REGISTRY, each tagged there first from the local build
    (`localhost/...`) when it was built under another name; layers the registry has are not sent again."""
    registry = os.environ.get("REGISTRY") or DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY:
        raise SystemExit("make push needs REGISTRY=<registry>/<namespace>, e.g. registry.example/you")
    for name in names or image_names():
        remote, local = ref(name), ref(name, DEFAULT_REGISTRY)
        if not inspect(remote):
            if not inspect(local):
                raise SystemExit(f"{remote}: not built here (nor {local}): run make images first")
            subprocess.run(["docker", "tag", local, remote], check=True)
        began = time.monotonic()
        subprocess.run(["docker", "push", "-q", remote], check=True)
        print(f"{remote}: pushed in {time.monotonic() - began:.0f} s", flush=True)
    return 0


def main(argv: list[str]) -> int:
    usage = "usage: images/tags.py env [--digests] | tag IMAGE | refs [IMAGE ...] | build [--force] [IMAGE ...] | push [IMAGE ...]"
    if argv[:1] == ["env"] and argv[1:] in ([], ["--digests"]):
        print("\n".join(env(digests=argv[1:] == ["--digests"])))
    elif argv[:1] == ["tag"] and len(argv) == 2:
        print(tag(argv[1]))
    elif argv[:1] == ["refs"]:
        print("\n".join(ref(name) for name in argv[1:] or image_names()))
    elif argv[:1] == ["build"]:
        names = [a for a in argv[1:] if a != "--force"]
        for name in names:
            dockerfile(name)  # an unknown name stops here with the list
        return build(names, force="--force" in argv)
    elif argv[:1] == ["push"]:
        return push(argv[1:])
    else:
        print(usage, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as err:
        sys.exit(f"{err.cmd[0]} failed with exit code {err.returncode}")
    except KeyboardInterrupt:
        sys.exit(130)

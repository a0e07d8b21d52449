"""scripts/gpu-check.sh on a host that reaches no package index, run here on the CPU: pip is given no index and
every network address it could use is a dead port on 127.0.0.1, so any download fails at once. The script must
install what the host python lacks from the wheel folder alone, leave alone what the host has, refuse a broken
folder or host with one line, and without a CUDA device skip the GPU steps with one line and exit 0."""
import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
HELPER = ROOT / "scripts" / "gpu_host.py"
DEAD = "http://127.0.0.1:9"   # the discard port: nothing listens here
HERE = "%d.%d" % sys.version_info[:2]


def load_helper():
    spec = importlib.util.spec_from_file_location("gpu_host", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def offline_env(tmp: Path, lock: Path, wheels: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and "proxy" not in k.lower()}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_INDEX_URL=f"{DEAD}/simple", PIP_RETRIES="0",
               PIP_TIMEOUT="1", HTTP_PROXY=DEAD, HTTPS_PROXY=DEAD, http_proxy=DEAD, https_proxy=DEAD,
               CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, GPU_LOCK=str(lock), GPU_WHEELS=str(wheels),
               GPU_SITE=str(tmp / "site"), RESULTS=str(tmp / "results"))
    return env


@pytest.fixture
def folder(tmp_path):
    """A wheel of a package this python lacks, built here offline, its lock (with a pin the host already has)
    and the folder's wheels.json written by the helper, as `make gpu-wheels` leaves it."""
    source = tmp_path / "src"
    (source / "cartgpu_probe").mkdir(parents=True)
    (source / "cartgpu_probe" / "__init__.py").write_text("VALUE = 'from the wheel folder'\n")
    (source / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n'
                                           'build-backend = "setuptools.build_meta"\n'
                                           '[project]\nname = "cartgpu-probe"\nversion = "1.0"\n')
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps", "--no-build-isolation", "-q",
                    str(source), "-w", str(wheels)], check=True, env=offline_env(tmp_path, tmp_path, wheels),
                   capture_output=True, timeout=120)
    (wheel,) = wheels.glob("*.whl")
    lock = tmp_path / "gpu-host.lock"
    lock.write_text("# host: torch>=2.0 transformers>=5.0 rich\n"
                    f"cartgpu-probe==1.0 --hash=sha256:{load_helper().sha256(wheel)}\n"
                    f"rich=={metadata.version('rich')}\n")
    subprocess.run([sys.executable, str(HELPER), "index", "--wheels", str(wheels), "--lock", str(lock),
                    "--python-version", HERE], check=True, capture_output=True, timeout=60)
    return {"lock": lock, "wheels": wheels, "wheel": wheel, "env": offline_env(tmp_path, lock, wheels)}


def run_check(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_tags_that_install_on_the_gpu_host():
    runs_on = load_helper().runs_on
    for name in ("bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "multiprocess-0.70.19-py312-none-any.whl",
                 "pypcre-0.6.4-cp312-cp312-linux_x86_64.whl", "x-1-cp38-abi3-manylinux2014_x86_64.whl"):
        assert runs_on(name, "3.12"), name
    for name in ("pypcre-0.6.4-cp311-cp311-linux_x86_64.whl", "multiprocess-0.70.19-py311-none-any.whl",
                 "x-1-py3-none-macosx_11_0_arm64.whl", "x-1-cp313-abi3-manylinux2014_x86_64.whl"):
        assert not runs_on(name, "3.12"), name


@pytest.mark.integration
def test_installs_only_what_is_missing_from_the_folder_then_skips_without_cuda(folder, tmp_path):
    proc = run_check(folder["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [line for line in proc.stdout.splitlines() if "skipped" in line]
    assert skipped == ["gpu-check: GPU steps skipped: no CUDA device (torch.cuda.is_available() is False)"]
    assert f"Processing {folder['wheel']}" in proc.stderr            # pip read the file in the folder...
    assert "Downloading" not in proc.stdout + proc.stderr            # ...and fetched nothing
    record = json.loads((tmp_path / "results" / "install.json").read_text())
    assert record["installed"] == [folder["wheel"].name]
    assert record["already_on_host"] == [f"rich=={metadata.version('rich')}"]
    site = tmp_path / "site"
    assert (site / "cartgpu_probe").is_dir() and not (site / "rich").exists()
    probe = subprocess.run([sys.executable, "-c", "import cartgpu_probe; print(cartgpu_probe.VALUE)"],
                           env={**folder["env"], "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "from the wheel folder", probe.stderr
    steps = json.loads((tmp_path / "results" / "steps.json").read_text())
    assert steps == [{"step": "gpu", "skipped": "no CUDA device (torch.cuda.is_available() is False)"}]


@pytest.mark.integration
@pytest.mark.parametrize("break_it, code, says", [
    ("altered wheel", 3, "is missing or altered"),
    ("no wheels.json", 3, "run `make gpu-wheels`"),
    ("made for another python", 3, "was made for Python 3.99"),
    ("host torch too old", 2, "this check needs torch>=99"),
])
def test_a_broken_folder_or_host_stops_with_one_line(folder, tmp_path, break_it, code, says):
    if break_it == "altered wheel":
        with open(folder["wheel"], "ab") as fh:
            fh.write(b"\0")
    elif break_it == "no wheels.json":
        (folder["wheels"] / "wheels.json").unlink()
    elif break_it == "made for another python":
        index = json.loads((folder["wheels"] / "wheels.json").read_text())
        (folder["wheels"] / "wheels.json").write_text(json.dumps({**index, "python": "3.99"}))
    else:
        folder["lock"].write_text(folder["lock"].read_text().replace("torch>=2.0", "torch>=99"))
    proc = run_check(folder["env"])
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert says in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "site").exists()

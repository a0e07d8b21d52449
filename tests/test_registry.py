"""The stage registry is the one statement of the pipeline: the Makefile's prerequisites and each stage's inputs
agree with it (what each stage opens is checked against it in every integration test, tests/conftest.py)."""
import re
from pathlib import Path

import pytest

from cart_intent import artifacts, registry
from test_shape import COMMANDS, name_of
from cart_intent.artifacts import MissingArtifact

ROOT = Path(__file__).resolve().parents[1]


def make_prerequisites() -> dict[str, set[str]]:
    rules = re.findall(r"^([a-z-]+):(.*)$", (ROOT / "Makefile").read_text(), re.M)
    return {target: set(prereqs.split()) - {"$(SETUP)", "$(STAMP)"} for target, prereqs in rules}


def ancestors(name: str) -> set[str]:
    stage = registry.STAGES[name]
    direct = set(stage.reads) | set(stage.make_after)
    return direct.union(*(ancestors(n) for n in direct)) if direct else set()


# evaluate_set is `make evaluate`'s second command; compare reads runs the Makefile does not build
@pytest.mark.parametrize("name", sorted(set(registry.STAGES) - {"evaluate_set", "compare"}))
def test_make_prerequisites_are_the_registry_reads_without_the_implied_ones(name):
    stage = registry.STAGES[name]
    direct = set(stage.reads) | set(stage.make_after)
    implied = set().union(*(ancestors(n) for n in direct))
    expected = {registry.STAGES[n].target for n in direct - implied}
    assert make_prerequisites()[stage.target] == expected


def test_every_stage_module_is_registered_and_every_entry_is_a_module():
    modules = {s.module or s.name for s in registry.STAGES.values()}
    assert modules <= {name_of(p) for p in COMMANDS}
    assert all((ROOT / "stages" / m / "__main__.py").is_file() for m in modules if (ROOT / "stages" / m).is_dir())
    pipeline = {name_of(p) for p in COMMANDS if "StageRun(" in p.read_text()}
    assert "generate" in pipeline and pipeline <= modules


def finished_folder(run_dir: Path, folder: str, content: bytes) -> None:
    stage = artifacts.StageRun("x", folder, run_dir, {}, {}, "code", [])
    (stage.fresh_tmp() / "results.json").write_bytes(content)
    stage.publish()


def test_upstream_requires_what_a_stage_reads_and_adds_what_it_reads_when_present(tmp_path):
    with pytest.raises(MissingArtifact, match="make evaluate"):
        registry.upstream(tmp_path, "report")
    for folder in ("eval", "baseline", "profiles/xeon-2c-abc123/cpu"):
        finished_folder(tmp_path, folder, b"{}")
    (tmp_path / "eval-unfinished").mkdir()
    assert set(registry.upstream(tmp_path, "report")) == {"eval", "baseline", "profiles/xeon-2c-abc123/cpu"}
    before = artifacts.input_fingerprint(registry.upstream(tmp_path, "report"))
    finished_folder(tmp_path, "eval-realistic", b"{}")  # only the hand-written set evaluated again
    after = artifacts.input_fingerprint(registry.upstream(tmp_path, "report"))
    assert set(after) - set(before) == {"eval-realistic"}
    finished_folder(tmp_path, "data", b"{}")
    assert set(registry.upstream(tmp_path, "baseline", skip=("base",))) == {"data"}  # API models only
    with pytest.raises(MissingArtifact, match="make base"):
        registry.upstream(tmp_path, "baseline")

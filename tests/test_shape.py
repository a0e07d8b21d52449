"""The code's shape: short functions, stages that never import each other, a stage's helpers in its own folder,
library code in cart_intent, code hashes that follow the imports."""
import ast
from pathlib import Path

import pytest

from cart_intent import artifacts
from cart_intent.artifacts import code_dependencies, code_hash

REPO = Path(__file__).resolve().parents[1]
STAGES, LIBRARY = REPO / "stages", REPO / "cart_intent"
MAX_FUNCTION_LINES = 60


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def defines_main(path: Path) -> bool:
    return any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree(path).body)


# a command is stages/<name>.py, or stages/<name>/stage.py with its own helpers beside it (python -m stages.<name>)
COMMANDS = sorted([p for p in STAGES.glob("*.py") if p.name != "__init__.py" and defines_main(p)]
                  + list(STAGES.glob("*/stage.py")))
HELPERS = sorted(p for p in STAGES.glob("*/*.py") if p.name not in ("__init__.py", "__main__.py", "stage.py"))


def name_of(command: Path) -> str:
    return command.parent.name if command.name == "stage.py" else command.stem


def test_the_layout_is_what_this_file_expects():
    names = {name_of(p) for p in COMMANDS}
    assert {"generate", "base", "finetune", "merge", "gptq", "gguf", "evaluate", "report", "serve", "predict",
            "transfer", "clean"} <= names
    assert {f"{p.parent.name}/{p.name}" for p in HELPERS} >= {"report/figures.py", "base/tiny.py", "generate/noise.py"}
    assert not [p for p in STAGES.glob("*.py") if p.name != "__init__.py" and not defines_main(p)], \
        "a stage's helper goes in its folder, stages/<stage>/, library code in cart_intent"


@pytest.mark.parametrize("path", sorted([*STAGES.rglob("*.py"), *LIBRARY.glob("*.py")]),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_is_longer_than_a_screen(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long


@pytest.mark.parametrize("path", sorted([*STAGES.rglob("*.py"), *LIBRARY.glob("*.py"), *(REPO / "scripts").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_the_top_of_a_file_names_the_project_modules_it_uses(path):
    inner = [f"line {node.lineno}: {node.module or '.'}" for function in ast.walk(tree(path))
             if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(function)
             if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in artifacts.PROJECT_PACKAGES)]
    assert not inner, f"imports of project modules inside functions (move them to the top): {inner}"


def imported_stage_files(path: Path) -> set[Path]:
    """The files of stages/ that path imports (the library, cart_intent/, is not a stage)."""
    return {p for p in artifacts.imported_modules(tree(path), path.parent) if p.is_file() and STAGES in p.parents}


@pytest.mark.parametrize("path", COMMANDS, ids=name_of)
def test_a_stage_imports_no_other_stage(path):
    own_folder = path.parent if path.name == "stage.py" else None
    assert not {p for p in imported_stage_files(path) if p.parent != own_folder}


@pytest.mark.parametrize("helper", HELPERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_helper_is_used_only_in_its_stage_folder(helper):
    users = {p for p in [*COMMANDS, *HELPERS] if helper in imported_stage_files(p)}
    assert users and {p.parent for p in users} == {helper.parent}, \
        f"{helper.name} is used by {sorted(map(str, users))}: move it to cart_intent if shared, delete it if unused"


def test_every_library_module_is_used_by_a_stage_or_a_script():
    """Library code lives in cart_intent (a stage's own helpers beside it); a module nothing uses is dead code."""
    scripts = sorted((REPO / "scripts").glob("*.py"))
    used = {dependency.name for command in COMMANDS + scripts for dependency in code_dependencies(command)
            if dependency.parent == LIBRARY}
    unused = {p.name for p in LIBRARY.glob("*.py")} - used - {"__init__.py"}
    assert not unused, f"library modules nothing uses: {sorted(unused)}"


def test_editing_a_helper_changes_only_its_stage_code_hash(monkeypatch):
    before = {name_of(p): code_hash(p) for p in COMMANDS}
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file",
                        lambda path: "edited" if Path(path).name == "figures.py" else real(path))
    after = {name_of(p): code_hash(p) for p in COMMANDS}
    assert {name for name in before if before[name] != after[name]} == {"report"}


def test_editing_the_hardware_probes_reruns_only_the_benchmarks(monkeypatch):
    """Every manifest records the host (cart_intent/host.py); the probes (hardware.py) belong to the stages that measure."""
    before = {name_of(p): code_hash(p) for p in COMMANDS}
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file",
                        lambda path: "edited" if Path(path).name == "hardware.py" else real(path))
    changed = {name_of(p) for p in COMMANDS if code_hash(p) != before[name_of(p)]}
    assert changed == {"profile_cpu", "profile_gpu", "loadtest"}


def test_every_shipped_data_file_is_in_the_code_hash_of_the_stages_that_read_it():
    """Found through data_file(__file__, name) calls, not by matching strings that look like file names."""
    shipped = {p for p in [*STAGES.rglob("*.json"), *LIBRARY.glob("*.json")]}
    hashed = {d for command in COMMANDS for d in code_dependencies(command) if d.suffix == ".json"}
    assert shipped and shipped == hashed
    assert {p.name for p in code_dependencies(STAGES / "finetune.py") if p.suffix == ".json"} == {"catalog.json"}


def test_code_hash_follows_helpers_and_their_data_files():
    generate = {p.name for p in code_dependencies(STAGES / "generate" / "stage.py")}
    assert {"noise.py", "metaprompt.py", "own_rows.py", "templates.json", "api_client.py", "catalog.json"} <= generate
    base = {p.name for p in code_dependencies(STAGES / "base" / "stage.py")}
    assert {"tiny.py", "generation.py"} <= base and "figures.py" not in base

"""Config loading: every shipped config loads; bad values give one line and exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.base.stage import BaseConfig
from stages.baseline import BaselineConfig
from stages.finetune import FinetuneConfig
from stages.generate.stage import GenerateConfig
from stages.gguf.stage import GGUFConfig
from stages.gptq import GPTQConfig
from scripts.config_docs import SECTIONS, render
from cart_intent.intent import ServeConfig
from cart_intent.config import KNOWN_SECTIONS, ConfigError, RunConfig, as_dict, load_stage_config, read_tables

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def write(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


STAGE_CONFIGS = {name: cls for name, cls in SECTIONS.items() if name != "run"}


def test_the_configs_page_is_what_the_code_gives():
    assert (ROOT / "docs" / "configs.md").read_text(encoding="utf-8") == render(), \
        "docs/configs.md is out of date: run python scripts/config_docs.py"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    tables = read_tables(path)
    assert set(tables) <= set(KNOWN_SECTIONS)
    assert set(STAGE_CONFIGS) == set(KNOWN_SECTIONS) - {"run"}   # every stage's config class, every file
    for section, cls in STAGE_CONFIGS.items():
        run, _ = load_stage_config(path, section, cls)
        assert run.name == path.stem


def restated_defaults(table: dict, defaults: dict, prefix: str) -> list[str]:
    found = []
    for key, value in table.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            found += restated_defaults(value, defaults[key], f"{prefix}.{key}")
        elif key in defaults and defaults[key] == value:
            found.append(f"{prefix}.{key}")
    return found


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_shipped_config_lists_only_what_it_changes(path):
    classes = {**STAGE_CONFIGS, "run": RunConfig}
    restated = [key for section, table in read_tables(path).items()
                for key in restated_defaults(table, {**as_dict(classes[section]()), "name": path.stem}, section)]
    assert not restated, f"{path.name} restates defaults (delete them): {restated}"


def test_the_defaults_and_paper_toml_are_the_papers_recipe():
    """The recipe is written once (stages/report/paper.json, which the report compares runs with); the finetune,
    GPTQ and GGUF defaults are it, so configs/paper.toml only names the models."""
    paper = json.loads((ROOT / "stages" / "report" / "paper.json").read_text())
    path = ROOT / "configs" / "paper.toml"
    ft = as_dict(load_stage_config(path, "finetune", FinetuneConfig)[1])
    assert {key: ft[key] for key in paper["finetune_recipe"]} == paper["finetune_recipe"]
    gptq = as_dict(load_stage_config(path, "gptq", GPTQConfig)[1])
    assert {key: gptq[key] for key in paper["gptq_recipe"]} == paper["gptq_recipe"]
    assert load_stage_config(path, "gguf", GGUFConfig)[1].types == paper["gguf_types"]
    assert load_stage_config(path, "base", BaseConfig)[1].models == ["meta-llama/Llama-3.2-1B", "google/gemma-3-1b-pt"]
    baseline = load_stage_config(path, "baseline", BaselineConfig)[1]
    assert baseline.api_models == ["gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano"] and len(baseline.models) == 6
    assert baseline.models[-1] == "classic:char-ngram"   # beyond the paper: the classic NLU row


@pytest.mark.parametrize("text, needle", [
    ("[generate]\nn_exampels = 5\n", "generate.n_exampels: unknown key"),
    ("[generate]\nn_examples = 'many'\n", "generate.n_examples: expected int"),
    ("[generate]\nn_examples = 3\n", "generate.n_examples: expected an integer >= 30"),
    ("[generate]\ntest_fraction = 0.9\n", "generate.test_fraction"),
    ("[generate]\nlanguages = ['en', 'de']\n", "generate.languages"),
    ("[generate.noise]\ntypo = 1.5\n", "generate.noise"),
    ("[generate]\nquantity_buckets = [[1, 5000, 1]]\n", "generate.quantity_buckets: expected [low, high, weight] "
     "triples with 1 <= low <= high <= 999"),
    ("[generat]\nn_examples = 5\n", "[generat]: unknown table"),
    ("[generate\n", "not valid TOML"),
    ("[run]\nname = 'a/b'\n", "run.name"),
])
def test_bad_values_name_file_and_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_stage_config(path, "generate", GenerateConfig)
    assert str(path) in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("value", [0, -1, 8])
def test_finetune_max_length_must_hold_an_example(tmp_path, value):
    from stages.finetune import FinetuneConfig
    with pytest.raises(ConfigError, match="finetune.max_length: expected tokens per example, 32 or more"):
        load_stage_config(write(tmp_path, f"[finetune]\nmax_length = {value}\n"), "finetune", FinetuneConfig)


@pytest.mark.parametrize("section, text, override, needle", [
    ("baseline", "[baseline.api]\nbase_url = 'ftp://x'\n", None, "baseline.api.base_url: expected"),
    ("baseline", "", "baseline.api.retries=3", "baseline.api.retries: unknown key"),
    ("baseline", "[baseline]\napi = 3\n", None, "baseline.api: expected a table"),
    ("generate", "", "generate.api.mode='completion'", 'generate.api.mode: expected "chat"'),
    ("generate", "[generate]\nllm_model = \"m\"\n", "generate.llm_model.x=1", "generate.llm_model: not a table"),
    ("generate", "", "generate.llm_model.x=1", "generate.llm_model: expected str"),
])
def test_api_settings_are_one_checked_sub_table(tmp_path, section, text, override, needle):
    with pytest.raises(ConfigError) as err:
        load_stage_config(write(tmp_path, text), section, STAGE_CONFIGS[section], [override] if override else [])
    assert needle in str(err.value)


@pytest.mark.parametrize("section, override, needle", [
    ("serve", "serve.engine='vllm'", "serve.engine: expected one of llama-server, llama-cpp-python"),
    ("serve", "serve.slots=0", "serve.slots: expected an integer in [1, 256]"),
    ("loadtest", "loadtest.engines=['llama-server', 'llama-server']", "loadtest.engines: expected distinct"),
    ("loadtest", "loadtest.clients=[0, 4]", "loadtest.clients: expected distinct client counts"),
    ("loadtest", "loadtest.requests=0", "loadtest.requests"),
    ("base", "base.models=['meta-llama/..']", "base.models: expected model ids or folders whose last part is a name"),
    ("base", "base.models=['./']", "base.models: expected model ids or folders whose last part is a name"),
])
def test_settings_are_checked(tmp_path, section, override, needle):
    with pytest.raises(ConfigError) as err:
        load_stage_config(write(tmp_path, ""), section, STAGE_CONFIGS[section], [override])
    assert needle in str(err.value)


def test_api_sub_table_from_file_and_override(tmp_path):
    path = write(tmp_path, "[baseline.api]\nbase_url = 'http://127.0.0.1:8080/v1'\nconcurrency = 2\n")
    _, cfg = load_stage_config(path, "baseline", BaselineConfig, ["baseline.api.max_retries=1"])
    assert (cfg.api.base_url, cfg.api.concurrency, cfg.api.max_retries, cfg.api.max_requests) == (
        "http://127.0.0.1:8080/v1", 2, 1, 5000)
    _, generate = load_stage_config(path, "generate", GenerateConfig)
    assert generate.api.max_requests == 20000 and generate.api.base_url == ""   # each stage its own table


def test_override_parses_toml_values_and_is_checked(tmp_path):
    path = write(tmp_path, "[run]\nname = 't'\n")
    _, cfg = load_stage_config(path, "generate", GenerateConfig, ["generate.n_examples=600",
                                                                  "generate.languages=['hr']"])
    assert cfg.n_examples == 600 and cfg.languages == ["hr"]
    with pytest.raises(ConfigError, match="generate.n_examples: expected int"):
        load_stage_config(path, "generate", GenerateConfig, ["generate.n_examples=abc"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_stage_config(path, "generate", GenerateConfig, ["n_examples=3"])


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, "[generate]\nn_examples = -1\n")
    proc = subprocess.run([sys.executable, "-m", "stages.generate", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert len(error_lines) == 1 and "generate.n_examples" in error_lines[0]


@pytest.mark.parametrize("model", ["../tiny", "/abs/tiny", "..", "a/b", "x\\\\y"])
def test_serve_model_is_a_folder_name_not_a_path(model):
    with pytest.raises(ConfigError, match="serve.model"):
        load_stage_config(ROOT / "configs" / "smoke.toml", "serve", ServeConfig, [f"serve.model='{model}'"])
    _, cfg = load_stage_config(ROOT / "configs" / "smoke.toml", "serve", ServeConfig, ["serve.model='tiny'"])
    assert cfg.model == "tiny"

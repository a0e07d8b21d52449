"""make compare over two runs (fixed result files): the tables equal each run's numbers, the config difference
is listed, every table is also CSV."""
import csv
import json
import shutil

from conftest import stage
from test_report import EM, build_run


def two_runs(tmp_path):
    build_run(tmp_path / "a")
    build_run(tmp_path / "b")
    root = tmp_path / "artifacts"
    root.mkdir()
    shutil.move(tmp_path / "a" / "smoke", root / "first")
    shutil.move(tmp_path / "b" / "smoke", root / "second")
    finetune = root / "second" / "finetune" / "manifest.json"
    record = json.loads(finetune.read_text())
    record["config"]["lora_r"] = 8
    finetune.write_text(json.dumps(record))
    results = root / "second" / "eval" / "results.json"
    rows = json.loads(results.read_text())
    for row in rows["rows"]:
        if row.get("variant") == "tiny/gguf-Q4_K_M":
            row["exact_match"] = 0.5
            row["by_language"]["hr"]["exact_match"] = 0.25
    results.write_text(json.dumps(rows))
    out_of_scope = root / "second" / "eval-out-of-scope" / "results.json"
    rows = json.loads(out_of_scope.read_text())
    rows["rows"][0]["scope"]["rejected"] = 0.5
    out_of_scope.write_text(json.dumps(rows))
    return root


def test_compare_lists_differences_and_each_runs_numbers(tmp_path):
    root = two_runs(tmp_path)
    stage("compare", root, "--runs", "first", "second")
    out = root / "compare" / "first-vs-second"
    report = (out / "report.md").read_text()
    assert "| finetune.lora_r | 16 | 8 |" in report
    assert "| finetune.learning_rate |" not in report   # the same in both: not a difference
    tables = json.loads((out / "tables.json").read_text())
    overall = {(r[0], r[1]): r[2:] for r in tables["tables"][1]["rows"]}
    for variant, em in EM.items():
        expected = [f"{em:.3f}", "0.500" if variant == "gguf-Q4_K_M" else f"{em:.3f}"]
        assert overall[(variant, "free")] == expected
    per_language = {(r[0], r[1], r[2]): r[3:] for r in tables["tables"][2]["rows"]}
    assert per_language[("gguf-Q4_K_M", "free", "hr")] == [f"{EM['gguf-Q4_K_M'] - 0.1:.3f}", "0.250"]
    scope = {tuple(r[:4]): r[4:] for r in tables["tables"][3]["rows"]}
    assert scope[("out-of-scope", "gguf-Q4_K_M", "constrained", "out-of-scope turned away")] == ["0.972", "0.500"]
    assert scope[("synthetic test", "fp16", "constrained", "ECE (constrained)")] == ["0.037", "0.037"]
    assert ("synthetic test", "fp16", "free", "ECE (constrained)") not in scope   # no confidence: no row
    cost = {(r[0], r[1]): r[2:] for r in tables["tables"][4]["rows"]}
    assert cost[("xeon-8c-bbbbbb", "Q4_K_M")] == ["2,250", "2,250"]
    for name, table in zip(tables["csv"], tables["tables"]):
        with open(out / "tables" / name, newline="", encoding="utf-8") as fh:
            assert list(csv.reader(fh)) == [table["headers"], *table["rows"]]
    assert (out / "figures" / "exact_match.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_needs_two_evaluated_runs(tmp_path):
    root = two_runs(tmp_path)
    shutil.rmtree(root / "second" / "eval")
    proc = stage("compare", root, "--runs", "first", "second", check=False)
    assert proc.returncode == 3 and "make evaluate" in proc.stderr
    proc = stage("compare", root, "--runs", "first", check=False)
    assert proc.returncode == 2 and "two or more run names" in proc.stderr


def test_compare_of_runs_with_long_names(tmp_path):
    """Two 200-character run names: the compare folder's name is cut and hashed (joined, it passed the 255-byte
    limit on a file name: ENAMETOOLONG); a longer run name is a usage error."""
    root = two_runs(tmp_path)
    long_a, long_b = "a" * 200, "b" * 200
    (root / "first").rename(root / long_a)
    (root / "second").rename(root / long_b)
    stage("compare", root, "--runs", long_a, long_b)
    [folder] = [p for p in (root / "compare").iterdir() if not p.name.startswith(".")]
    assert folder.name.startswith(long_a[:100]) and len(folder.name) == 113
    assert (folder / "report.md").is_file()
    proc = stage("compare", root, "--runs", long_a, "c" * 201, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr

"""scripts/benchmark.py end to end on a tiny budget: it runs, prints its table and writes its JSON."""

import json

import pytest

from conftest import run_script
from jaxnorm.cli import run_main
from test_robust import _load_script


def test_benchmark_script_prints_and_writes_every_norm_and_precision(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("benchmark.py", "--norm", "bn", "ln", "--precision", "bf16", "--batch-size", "16",
                        "--steps", "2", "--repeats", "1", "--epoch-images", "64", "--eval-images", "64",
                        "--no-torch", "--json", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    rows = rows.get("results", rows) if isinstance(rows, dict) else rows
    assert [(r["norm"], r["precision"]) for r in rows] == [("bn", "bf16"), ("ln", "bf16")]
    assert all(r["train_images_per_s"] > 0 for r in rows)
    assert "| bn | bf16 |" in result.stdout and "| ln | bf16 |" in result.stdout


def test_benchmark_refuses_more_timed_steps_than_an_epoch_has(capsys):
    # In process (the script's own main and run_main): a refusal needs no process of its own.
    benchmark = _load_script("benchmark.py")
    with pytest.raises(SystemExit) as info:
        run_main(lambda: benchmark.main(["--batch-size", "16", "--steps", "5", "--epoch-images", "64",
                                         "--no-torch"]))
    assert info.value.code == 2
    assert "--steps must be in 1..4" in capsys.readouterr().err.strip().splitlines()[-1]


def test_gpu_check_measures_both_layer_sets_and_times_a_run(tmp_path):
    # The GPU check on a tiny budget: any machine runs it (here the CPU: no device memory figure).
    out = tmp_path / "check.json"
    result = run_script("gpu_check.py", "--norm", "ln", "--run-norm", "ln", "--dataset", "synthetic",
                        "--epochs", "1", "--batch-size", "16", "--steps", "2", "--repeats", "1",
                        "--epoch-images", "64", "--eval-images", "64", "--json", out, timeout=900)
    assert result.returncode == 0, result.stderr
    check = json.loads(out.read_text())
    assert {layers: [r["layers"] for r in b["results"]] for layers, b in check["benchmarks"].items()} == \
        {"flax": ["flax"], "cpu": ["cpu"]}
    assert all(r["train_images_per_s"] > 0 for b in check["benchmarks"].values() for r in b["results"])
    assert check["run"]["epochs"] == 1 and check["run"]["wall_s"] > check["run"]["epochs_s"] > 0
    assert "| flax | ln |" in result.stdout and "| cpu | ln |" in result.stdout
    assert "1 epochs of ln (synthetic" in result.stdout

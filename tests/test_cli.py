import json

import pytest

from conftest import CIFAR_SUBSET, run_script


@pytest.mark.parametrize("args, message", [
    (["--norm", "xn"], "invalid choice: 'xn'"),
    (["--norm", "gn", "--groups", "5"], "--groups 5 does not divide the 24 channels"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--data-dir", "/no/such/place"], "--data-dir /no/such/place does not exist"),
    (["--dataset", "mnist", "--norm", "gn", "--groups", "4"], "--groups 4 does not divide the 10 channels"),
    (["--l1", "-1"], "--l1 must be >= 0"),
])
def test_bad_input_is_one_line_and_non_zero(args, message, tmp_path):
    result = run_script("train.py", *args, "--workdir", tmp_path / "run")
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_help_documents_every_option():
    result = run_script("train.py", "--help")
    assert result.returncode == 0
    for option in ("--norm", "--groups", "--skip", "--data-dir", "--epochs", "--batch-size", "--lr",
                   "--lr-step-epochs", "--lr-gamma", "--weight-decay", "--label-smoothing", "--seed",
                   "--workdir", "--resume", "--dataset", "--l1", "--train-split"):
        assert option in result.stdout


@pytest.mark.skipif(not CIFAR_SUBSET.exists(), reason="../shared/data not present")
def test_trains_on_the_real_subset_end_to_end(tmp_path):
    result = run_script("train.py", "--norm", "gn", "--groups", "4", "--epochs", "1", "--preset", "narrow",
                        "--data-dir", CIFAR_SUBSET, "--workdir", tmp_path, "--no-progress")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert "parameters" in last and "final train" in last and "best train" in last
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert len(history) == 1 and 0.1 < history[0]["test_accuracy"] <= 1  # better than chance on real images

"""scripts/benchmark.py end to end on a tiny budget: it runs, prints its table and writes its JSON."""

import json

from conftest import run_script


def test_benchmark_script_prints_and_writes_every_norm(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("benchmark.py", "--norm", "bn", "ln", "--batch-size", "16", "--steps", "2", "--repeats", "1",
                        "--epoch-images", "64", "--no-torch", "--json", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    rows = rows.get("results", rows) if isinstance(rows, dict) else rows
    assert [r["norm"] for r in rows] == ["bn", "ln"]
    assert all(r["train_images_per_s"] > 0 for r in rows)
    assert "| bn |" in result.stdout and "| ln |" in result.stdout

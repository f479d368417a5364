import json

import jax
import numpy as np
import pytest

from jaxnorm import parallel
from jaxnorm.config import Config, ConfigError
from jaxnorm.data import first_train_images, synthetic_dataset
from jaxnorm.evaluate import make_predict
from jaxnorm.figures import plot_sweep
from jaxnorm.models import build_model
from jaxnorm.state import create_train_state, learning_rate_schedule
from jaxnorm.sweep import (
    batch_stat_logits,
    fixed_steps_epochs,
    format_step_times,
    run_sweep,
    scaled_lr,
    sweep_config,
    sweep_series,
    write_sweep,
)


@pytest.fixture(scope="module")
def sweep_data():
    return synthetic_dataset(64, 36, image_shape=(16, 16, 3))  # 36 test images: batch 8 leaves 4 over


def small_config(**changes):
    return Config(dataset="synthetic", width=8, transition_width=8, groups=4, epochs=1, lr=0.2, dropout=0.1,
                  eval_batch_size=32, **changes)


def test_learning_rate_scales_linearly_with_the_batch_and_the_warm_up_is_the_same_epochs():
    base = small_config().replace(epochs=3)
    assert scaled_lr(0.05, 128, 128) == 0.05 and scaled_lr(0.05, 2, 128) == pytest.approx(0.05 / 64)
    config = sweep_config(base, "gn", 8, seed=3)
    assert (config.norm, config.batch_size, config.seed) == ("gn", 8, 3)
    assert config.lr == pytest.approx(0.2 * 8 / 128)
    assert config.epochs == base.epochs and config.weight_decay == base.weight_decay
    for batch in (2, 128):  # the peak lr is reached after one epoch's steps, however many those are
        config = sweep_config(base, "bn", batch, seed=0)
        per_epoch = 50_000 // batch
        schedule = learning_rate_schedule(config, per_epoch)
        assert float(schedule(per_epoch // 2)) == pytest.approx(config.lr / 2, rel=1e-3)
        assert float(schedule(per_epoch)) == pytest.approx(config.lr)
    assert "lr 0.2 x B / 128 (1-epoch linear warm-up" in base.recipe(lr_scaled_with_batch=True)


def test_fixed_steps_are_whole_epochs_and_at_least_one():
    assert fixed_steps_epochs(50_000, 16, 3125) == 1 and fixed_steps_epochs(50_000, 128, 3125) == 8
    with pytest.raises(ConfigError, match="less than one epoch at batch 16"):
        fixed_steps_epochs(50_000, 16, 1000)


def test_sweep_writes_table_and_figure_and_reuses_its_runs(tmp_path, sweep_data, monkeypatch):
    base, runs, out = small_config(), tmp_path / "runs", tmp_path / "out"
    kwargs = dict(norms=["bn", "gn"], batch_sizes=[4, 16], seeds=[0], runs_root=runs, progress=False)
    records = run_sweep(base, sweep_data, **kwargs)
    assert len(records) == 4 and {(r["norm"], r["batch_size"]) for r in records} == \
        {("bn", 4), ("bn", 16), ("gn", 4), ("gn", 16)}
    saved = json.loads((runs / "bn-b4-e1-s0" / "metrics.json").read_text())
    assert saved[-1]["step"] == 64 // 4  # one epoch at batch 4
    assert [p.name for p in (runs / "bn-b4-e1-s0" / "ckpt").iterdir()] == ["16"]  # the final checkpoint only
    for r in records:  # each run trained at its own scaled learning rate
        assert r["lr"] == pytest.approx(0.2 * r["batch_size"] / 128)
        assert ("final_test_batch_stats" in r) == (r["norm"] == "bn")
    import jaxnorm.sweep
    drawn = []
    monkeypatch.setattr(jaxnorm.sweep, "plot_sweep", lambda *a, **k: drawn.append(plot_sweep(*a, **k)))
    path = write_sweep(records, out, data="synthetic", base=base, command="python scripts/sweep.py ...")
    assert drawn[0].axes[0].get_legend().get_title().get_text() == ""  # one seed: no "mean ± std" legend
    text = path.read_text()
    assert "| 4 | 0.00625 | 16 |" in text and "GroupNorm" in text  # batch, lr, steps per epoch
    assert text.index("BatchNorm, running averages") < text.index("BatchNorm, batch statistics")
    assert base.replace(epochs=1).recipe(lr_scaled_with_batch=True) in text  # the recipe from the config
    assert "4 times as many steps as batch 16" in text and "best" not in text.lower()
    assert "; seed 0. Final test accuracy." in text and "over the seeds" not in text  # one seed: no mean
    # The budget as the runs measured it, on the devices they name.
    speed = text[text.index("## Training speed"):]
    assert f"names it: {parallel.describe_devices(parallel.make_mesh(16))} for {len(records)} runs)" in speed
    assert "| batch | bn images/s | gn images/s | bn minutes | gn minutes |" in speed
    assert f"{len(records)} runs, " in speed and len(speed.strip().splitlines()) == 8  # 2 rows
    assert (out / "batch-sweep.png").stat().st_size > 10_000
    assert len(json.loads((out / "batch-sweep.json").read_text())["runs"]) == 4

    # A second call reuses every run: no training, no re-evaluation, the same numbers.
    import jaxnorm.study

    def refuse(*args, **kwargs):
        raise AssertionError("retrained or re-evaluated a finished run")
    monkeypatch.setattr(jaxnorm.study, "train_and_evaluate", refuse)
    monkeypatch.setattr(jaxnorm.sweep, "restore_run", refuse)
    assert run_sweep(base, sweep_data, **kwargs) == records
    # More seeds, or another epoch count (another run folder): only the missing runs train.
    trained = []
    monkeypatch.setattr(jaxnorm.study, "train_and_evaluate",
                        lambda config, workdir, **kw: trained.append(workdir))
    monkeypatch.setattr(jaxnorm.sweep, "keep_final_checkpoint_only", lambda workdir: None)
    monkeypatch.setattr(jaxnorm.sweep, "read_history", lambda workdir: [{"step": 1, "test_accuracy": 0.5,
                                                                         "seconds": 1.0,
                                                                         "images_per_second": 9.0}])
    monkeypatch.setattr(jaxnorm.sweep, "batch_stat_accuracy", lambda *a: {"accuracy": 0.5})
    run_sweep(base, sweep_data, **{**kwargs, "seeds": [0, 1]})
    run_sweep(base.replace(epochs=2), sweep_data, **{**kwargs, "norms": ["gn"], "batch_sizes": [16]})
    assert sorted(p.name for p in trained) == ["bn-b16-e1-s1", "bn-b4-e1-s1", "gn-b16-e1-s1", "gn-b16-e2-s0",
                                               "gn-b4-e1-s1"]


def test_sweep_figure_reads_as_the_papers(tmp_path):
    records = [{"norm": n, "batch_size": b, "seed": s, "final_test": 0.7 - 0.01 * s,
                **({"final_test_batch_stats": 0.6} if n == "bn" else {})}
               for n in ("bn", "gn") for b in (2, 8, 32) for s in (0, 1)]
    fig = plot_sweep(sweep_series(records), [2, 8, 32], tmp_path / "s.png", title="data: 5 epochs")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis_inverted()  # batch decreasing to the right
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_legend().get_title().get_text() == "mean ± std over seeds"
    assert labels == ["BatchNorm, running averages", "BatchNorm, batch statistics", "GroupNorm"]
    styles = [c.lines[0].get_linestyle() for c in ax.containers]  # one errorbar container per series
    colors = [c.lines[0].get_color() for c in ax.containers]
    assert styles == ["-", "--", "-"] and colors[0] == colors[1] != colors[2]
    errors = ax.containers[0].lines[2][0].get_segments()  # mean ± std of 30% and 31% error
    assert errors[0][:, 1] == pytest.approx([30.5 - 0.7071, 30.5 + 0.7071], abs=1e-3)


def test_step_time_table_gives_the_load_average():
    rows = [{"batch_size": 8, "devices": 2, "step_ms": 10.0, "images_per_second": 800.0,
             "epoch_seconds": 62.0, "load_average": 13.2}]
    text = format_step_times(rows, "gn", 50_000)
    assert "load average" in text and text.splitlines()[-1].endswith("| 13.2 |")


def test_bn_with_batch_statistics_differs_from_running_averages(sweep_data):
    """Running averages: an image's logits do not depend on its batch. Batch statistics: they do,
    and they equal training mode with dropout off; GroupNorm gives the same logits either way."""
    rng = np.random.default_rng(0)
    images = sweep_data.test_images
    mesh = parallel.make_mesh()
    logits = {}
    for norm in ("bn", "gn"):
        config = small_config(norm=norm)
        model = build_model(config, *sweep_data.channel_stats())
        state = jax.device_put(create_train_state(model, config, sweep_data.image_shape, 1),
                               parallel.replicated(mesh))
        # Running averages away from their (0, 1) start, as after training.
        state = state.replace(batch_stats=jax.tree_util.tree_map(
            lambda x: x + rng.uniform(0.5, 1.5, x.shape).astype(x.dtype), state.batch_stats))
        running = make_predict(mesh, 32)(state, images)
        batch = batch_stat_logits(model, state, mesh, images, batch_size=8, chunk=16)
        logits[norm] = (running, batch)
        if norm == "gn":
            np.testing.assert_allclose(batch, running, rtol=1e-4, atol=1e-4)
            continue
        assert batch.shape == running.shape and not np.allclose(batch, running, atol=1e-3)
        # Batch statistics = training mode without dropout, one batch at a time (the last one of 4).
        no_dropout = model.clone(config=model.config.replace(dropout=0.0))
        for start, stop in ((0, 8), (8, 16), (32, 36)):
            expected, _ = no_dropout.apply({"params": state.params, "batch_stats": state.batch_stats},
                                           images[start:stop], train=True, mutable=["batch_stats"])
            np.testing.assert_allclose(batch[start:stop], expected, rtol=1e-4, atol=1e-4)
        # Deterministic, and nothing updated: the running averages give what they gave before.
        np.testing.assert_array_equal(batch_stat_logits(model, state, mesh, images, 8, chunk=16), batch)
        np.testing.assert_array_equal(make_predict(mesh, 32)(state, images), running)


def test_small_batches_split_over_fewer_cpu_devices_and_refuse_on_accelerators(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert parallel.devices_for_batch(2) == 2 and parallel.devices_for_batch(12) == 6  # CPU: divisors
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert parallel.devices_for_batch(16) == 8
    with pytest.raises(ConfigError, match="batch of 2 .* 8 devices"):
        run_sweep(small_config(), None, norms=["bn"], batch_sizes=[16, 2], seeds=[0], runs_root="unused")


def test_train_images_keeps_the_whole_test_set(sweep_data):
    data = first_train_images(sweep_data, 40)
    assert len(data.train_images) == 40 and len(data.test_images) == 36
    assert first_train_images(data, 40) is data and first_train_images(data, None) is data
    with pytest.raises(Exception, match="--train-images 100"):
        first_train_images(sweep_data, 100)


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "0", "4"], "--batch-sizes must be positive"),
    (["--train-images", "1000"], "--train-images 1000 must be between 1 and the 512 training images"),
    (["--batch-sizes", "2", "1024"], "--batch-sizes 1024 exceeds the 512 training images"),
])
def test_sweep_script_bad_input_is_one_line(args, message, tmp_path):
    from conftest import run_script

    result = run_script("sweep.py", "--dataset", "synthetic", *args, "--runs", tmp_path, "--out", tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_report_only_trains_nothing_and_names_the_missing_runs(tmp_path):
    from conftest import run_script

    common = ["--dataset", "synthetic", "--preset", "narrow", "--epochs", "1", "--norms", "gn",
              "--batch-sizes", "32", "--runs", tmp_path / "runs", "--out", tmp_path / "out", "--no-progress"]
    empty = run_script("sweep.py", *common, "--seeds", "0", "--report-only")
    assert empty.returncode == 2 and len(empty.stderr.strip().splitlines()) == 1, empty.stderr
    assert "no finished run" in empty.stderr and not (tmp_path / "runs" / "gn-b32-e1-s0").exists()

    assert run_script("sweep.py", *common, "--seeds", "0").returncode == 0
    result = run_script("sweep.py", *common, "--seeds", "0", "1", "--report-only")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["gn-b32-e1-s0"]  # seed 1 not trained
    text = (tmp_path / "out" / "batch-sweep.md").read_text()
    assert "left out (those cells have fewer seeds): gn-b32-s1." in text and "--report-only" not in text
    assert json.loads((tmp_path / "out" / "batch-sweep.json").read_text())["missing_runs"] == ["gn-b32-s1"]

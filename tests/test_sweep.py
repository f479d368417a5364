import json

import jax
import numpy as np
import pytest

from jaxnorm import parallel
from jaxnorm.config import Config, ConfigError
from jaxnorm.data import first_train_images, synthetic_dataset
from jaxnorm.models import build_model
from jaxnorm.sweep import batch_stat_logits, run_sweep, scaled_lr, sweep_config, write_sweep
from jaxnorm.evaluate import make_predict
from jaxnorm.state import create_train_state


@pytest.fixture(scope="module")
def sweep_data():
    return synthetic_dataset(64, 36, image_shape=(16, 16, 3))  # 36 test images: batch 8 leaves a remainder of 4


def small_config(**changes):
    return Config(dataset="synthetic", width=8, transition_width=8, groups=4, epochs=1, lr=0.2, dropout=0.1,
                  eval_batch_size=32, **changes)


def test_learning_rate_scales_linearly_with_the_batch():
    base = small_config()
    assert scaled_lr(0.05, 128) == 0.05 and scaled_lr(0.05, 2) == pytest.approx(0.05 / 64)
    config = sweep_config(base, "gn", 8, seed=3)
    assert (config.norm, config.batch_size, config.seed) == ("gn", 8, 3)
    assert config.lr == pytest.approx(0.2 * 8 / 128)
    assert config.epochs == base.epochs and config.weight_decay == base.weight_decay


def test_sweep_writes_table_and_figure_and_reuses_its_runs(tmp_path, sweep_data, monkeypatch):
    base, runs, out = small_config(), tmp_path / "runs", tmp_path / "out"
    kwargs = dict(norms=["bn", "gn"], batch_sizes=[4, 16], seeds=[0], runs_root=runs, progress=False)
    records = run_sweep(base, sweep_data, **kwargs)
    assert len(records) == 4 and {(r["norm"], r["batch_size"]) for r in records} == \
        {("bn", 4), ("bn", 16), ("gn", 4), ("gn", 16)}
    saved = json.loads((runs / "bn-b4-s0" / "metrics.json").read_text())
    assert saved[-1]["step"] == 64 // 4  # one epoch at batch 4
    for r in records:  # each run trained at its own scaled learning rate
        assert r["lr"] == pytest.approx(0.2 * r["batch_size"] / 128)
        assert ("final_test_batch_stats" in r) == (r["norm"] == "bn")
    path = write_sweep(records, out, data="synthetic", base=base, command="python scripts/sweep.py ...")
    text = path.read_text()
    assert "| 4 | 0.00625 |" in text and "BatchNorm, batch statistics" in text and "GroupNorm" in text
    assert (out / "batch-sweep.png").stat().st_size > 10_000
    assert len(json.loads((out / "batch-sweep.json").read_text())["runs"]) == 4

    # A second call reuses every run: no training, no re-evaluation, the same numbers.
    import jaxnorm.study
    import jaxnorm.sweep

    def refuse(*args, **kwargs):
        raise AssertionError("retrained or re-evaluated a finished run")
    monkeypatch.setattr(jaxnorm.study, "train_and_evaluate", refuse)
    monkeypatch.setattr(jaxnorm.sweep, "restore_run", refuse)
    assert run_sweep(base, sweep_data, **kwargs) == records


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

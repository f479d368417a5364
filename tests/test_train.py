import numpy as np
import pytest

from jaxnorm import parallel
from jaxnorm.checkpoint import RunCheckpoints, abstract_like
from jaxnorm.config import Config, ConfigError
from jaxnorm.evaluate import logit_metrics, make_predict
from jaxnorm.state import learning_rate_schedule
from jaxnorm.train import TrainingError, compiled_train_step, make_epoch_order, setup_run, train_and_evaluate


@pytest.mark.parametrize("norm,precision", [("bn", "f32"), ("gn", "f32"), ("ln", "f32"), ("bn", "bf16")])
def test_a_few_steps_drive_the_loss_down(norm, precision, tiny_config, tiny_data):
    # The step schedule: no decay to 0 in 20 steps.
    config = tiny_config.replace(norm=norm, batch_size=32, lr=0.1, schedule="step", precision=precision)
    run = setup_run(config, tiny_data)
    state, images, labels = run.state, run.images, run.labels
    step = compiled_train_step(config, run.mesh)
    order = np.arange(32, dtype=np.int32)[None]  # the same batch every step
    losses = []
    for _ in range(20):
        state, metrics = step(state, images, labels, order, 0)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 20
    assert losses[-1] < 0.8 * losses[0], losses


def test_epoch_order_is_a_permutation_that_changes_per_epoch(tiny_config):
    order = make_epoch_order(tiny_config.replace(batch_size=10), parallel.make_mesh(), 64)
    first, second = np.asarray(order(0)), np.asarray(order(1))
    assert first.shape == (6, 10) and len(set(first.ravel())) == 60 and first.max() < 64
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, np.asarray(order(0)))


@pytest.mark.parametrize("alternate", [True, False])
def test_alternating_flips_show_the_next_epoch_each_image_the_other_way(alternate, tiny_config, tiny_data):
    # With alternating flips, a step in epoch 1 on mirrored images sees exactly what the same step sees
    # in epoch 0 on the originals; fresh coins (each step its own) do not.
    import jax
    import jax.numpy as jnp

    config = tiny_config.replace(alternate_flips=alternate, schedule="step")  # the same lr in both epochs
    run = setup_run(config, tiny_data)
    step = compiled_train_step(config, run.mesh)
    order = np.arange(64, dtype=np.int32).reshape(4, 16)
    later = jax.tree.map(jnp.copy, run.state.replace(step=run.state.step + 4))  # the step donates its state
    first, _ = step(run.state, run.images, run.labels, order, 0)
    second, _ = step(later, run.images[:, :, ::-1, :], run.labels, order, 0)
    same = [np.allclose(a, b, atol=1e-6) for a, b in zip(jax.tree.leaves(jax.device_get(first.params)),
                                                        jax.tree.leaves(jax.device_get(second.params)),
                                                        strict=True)]
    assert all(same) is alternate


def test_cutout_reaches_the_training_step(tiny_config, tiny_data):
    import jax

    order = np.arange(16, dtype=np.int32)[None]
    params = []
    for cutout in (0, 8):
        config = tiny_config.replace(cutout=cutout, schedule="step")  # no warm-up: the first step moves
        run = setup_run(config, tiny_data)
        state, _ = compiled_train_step(config, run.mesh)(run.state, run.images, run.labels, order, 0)
        params.append(jax.tree.leaves(jax.device_get(state.params)))
    assert not all(np.allclose(a, b) for a, b in zip(*params, strict=True))


def test_predict_handles_a_ragged_last_batch(tiny_config, tiny_data):
    run = setup_run(tiny_config, tiny_data)
    state, images = run.state, tiny_data.test_images[:13]
    logits = make_predict(run.mesh, 8)(state, images)
    direct = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images)
    np.testing.assert_allclose(logits, direct, atol=1e-5)


def test_logit_metrics_match_a_direct_computation():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    labels = np.array([0, 0, 0])
    m = logit_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(2 / 3)
    expected = -np.mean([np.log(np.exp(r[0]) / np.exp(r).sum()) for r in logits])
    assert m["loss"] == pytest.approx(expected)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_checkpoint_restore_gives_identical_evaluation(norm, tiny_config, tiny_data, tmp_path):
    config = tiny_config.replace(norm=norm, epochs=1)
    result = train_and_evaluate(config, tmp_path, dataset=tiny_data, progress=False)
    fresh = setup_run(config, tiny_data)
    checkpoints = RunCheckpoints(tmp_path, read_only=True)
    target = abstract_like(fresh.state, parallel.replicated(fresh.mesh))
    restored, meta = checkpoints.restore(checkpoints.latest_step(), target)
    predict = make_predict(fresh.mesh, 32)
    np.testing.assert_array_equal(predict(restored, tiny_data.test_images),
                                  predict(result["state"], tiny_data.test_images))
    assert meta["config"]["norm"] == norm and len(meta["history"]) == 1


def test_resume_continues_step_schedule_and_history(tiny_config, tiny_data, tmp_path):
    # The step schedule does not depend on --epochs, so a 1-epoch run resumed to 3 is the 3-epoch run.
    config = tiny_config.replace(epochs=3, schedule="step")
    straight = train_and_evaluate(config, tmp_path / "straight", dataset=tiny_data, progress=False)
    train_and_evaluate(config.replace(epochs=1), tmp_path / "resumed", dataset=tiny_data, progress=False)
    resumed = train_and_evaluate(config, tmp_path / "resumed", resume=True, dataset=tiny_data, progress=False)
    assert int(resumed["state"].step) == int(straight["state"].step) == 3 * 4
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        for key in ("lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_same_seed_same_result(tiny_config, tiny_data, tmp_path):
    config = tiny_config.replace(epochs=1)
    a = train_and_evaluate(config, tmp_path / "a", dataset=tiny_data, progress=False)
    b = train_and_evaluate(config, tmp_path / "b", dataset=tiny_data, progress=False)
    c = train_and_evaluate(config.replace(seed=1), tmp_path / "c", dataset=tiny_data, progress=False)
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    assert a["history"][-1]["train_loss"] != c["history"][-1]["train_loss"]


def test_existing_run_is_never_overwritten_without_resume(tiny_config, tiny_data, tmp_path):
    train_and_evaluate(tiny_config.replace(epochs=1), tmp_path, dataset=tiny_data, progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        train_and_evaluate(tiny_config.replace(epochs=1), tmp_path, dataset=tiny_data, progress=False)


def test_resume_with_another_norm_names_the_difference(tiny_config, tiny_data, tmp_path):
    train_and_evaluate(tiny_config.replace(epochs=1), tmp_path, dataset=tiny_data, progress=False)
    with pytest.raises(ConfigError, match="norm 'bn' -> 'gn'"):
        train_and_evaluate(tiny_config.replace(norm="gn"), tmp_path, resume=True, dataset=tiny_data,
                           progress=False)


def test_batch_larger_than_the_training_set_is_rejected(tiny_config, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="larger than the 64 training images"):
        train_and_evaluate(tiny_config.replace(batch_size=128), tmp_path, dataset=tiny_data, progress=False)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0.0, 2.0])
def test_decaying_schedules_warm_up_peak_and_end_at_zero(schedule, warmup):
    config = Config(schedule=schedule, warmup_epochs=warmup, epochs=10, lr=0.2)
    lr = learning_rate_schedule(config, steps_per_epoch=7)
    values = np.array([float(lr(i)) for i in range(70 + 1)])
    peak = round(warmup * 7)
    assert values[peak] == pytest.approx(0.2)
    assert values.max() == pytest.approx(0.2)
    assert values[-1] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(values[peak:]) <= 1e-7)  # never rises after the peak
    if warmup:
        assert values[0] == 0.0 and np.all(np.diff(values[:peak + 1]) > 0)


def test_a_run_as_short_as_its_warm_up_only_warms_up():
    lr = learning_rate_schedule(Config(epochs=1).validate(), steps_per_epoch=4)  # the default 1-epoch warm-up
    assert [float(lr(i)) for i in range(4)] == pytest.approx([0.0, 0.025, 0.05, 0.075])
    with pytest.raises(ConfigError, match=r"--warmup-epochs must be in \[0, --epochs\], got 2"):
        Config(epochs=1, warmup_epochs=2.0).validate()


def test_step_schedule_is_torch_steplr():
    config = Config(lr=0.1, schedule="step", lr_step_epochs=3, lr_gamma=0.5)
    lr = learning_rate_schedule(config, steps_per_epoch=4)
    assert [float(lr(e * 4)) for e in range(7)] == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025])


@pytest.mark.parametrize("decay_all", [True, False])
def test_weight_decay_reaches_scales_and_offsets_only_when_asked(decay_all):
    import jax
    import jax.numpy as jnp

    from jaxnorm.state import make_optimizer
    config = Config(norm="gn", weight_decay=0.5, lr=1.0, momentum=0.0, nesterov=False, schedule="step",
                    decay_scales_and_biases=decay_all)
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "norm": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    tx = make_optimizer(config, steps_per_epoch=1)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    # Zero gradients: the update is -lr * weight_decay * w where decayed, 0 elsewhere.
    assert np.allclose(updates["conv"]["kernel"], -0.5)
    for name in ("scale", "bias"):
        assert np.allclose(updates["norm"][name], -0.5 if decay_all else 0.0)
    assert ("kernels only" in config.recipe()) is not decay_all


def test_weight_average_follows_its_recurrence_and_is_what_evaluation_uses(tiny_config, tiny_data):
    import jax

    config = tiny_config.replace(norm="gn", ema_decay=0.9)
    run = setup_run(config, tiny_data)
    state, step = run.state, compiled_train_step(config, run.mesh)
    expected = jax.device_get(state.params)
    order = np.arange(64, dtype=np.int32).reshape(4, 16)
    for t in range(1, 5):
        state, _ = step(state, run.images, run.labels, order, t - 1)
        d = min(0.9, (1 + t) / (10 + t))  # after t steps
        expected = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, expected, jax.device_get(state.params))
    for got, want in zip(jax.tree.leaves(state.eval_params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    logits = make_predict(run.mesh, 32)(state, tiny_data.test_images)
    for params, same in ((state.eval_params, True), (state.params, False)):
        direct = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, tiny_data.test_images)
        assert np.allclose(logits, direct, atol=1e-5) is same


@pytest.mark.parametrize("first_conv", ["whitened", "whitened-frozen"])
def test_a_whitened_first_conv_starts_whitened_and_trains_only_unfrozen(first_conv, tiny_config, tiny_data):
    import jax

    from jaxnorm.models import whitening_kernel

    config = tiny_config.replace(first_conv=first_conv, warmup_epochs=0)
    run = setup_run(config, tiny_data)
    whitened = whitening_kernel(tiny_data.train_images, run.input_mean, run.input_std, 3, config.width)
    np.testing.assert_allclose(run.state.params["C1"]["kernel"], whitened, rtol=1e-6)
    before = jax.device_get(run.state.params)  # the step donates the state
    step, order = compiled_train_step(config, run.mesh), np.arange(16, dtype=np.int32)[None]
    state, _ = step(run.state, run.images, run.labels, order, 0)
    frozen = first_conv == "whitened-frozen"
    assert np.array_equal(state.params["C1"]["kernel"], before["C1"]["kernel"]) is frozen
    assert not np.array_equal(state.params["C2"]["kernel"], before["C2"]["kernel"])
    assert f"{first_conv} first conv" in config.recipe()


def test_resume_of_a_frozen_first_conv_is_exact(tiny_config, tiny_data, tmp_path):
    config = tiny_config.replace(first_conv="whitened-frozen")
    straight = train_and_evaluate(config, tmp_path / "straight", dataset=tiny_data, progress=False)
    train_and_evaluate(config.replace(epochs=1), tmp_path / "resumed", dataset=tiny_data, progress=False)
    resumed = train_and_evaluate(config, tmp_path / "resumed", resume=True, dataset=tiny_data, progress=False)
    last, resumed_last = straight["history"][-1], resumed["history"][-1]
    assert resumed_last["test_accuracy"] == last["test_accuracy"]
    assert resumed_last["test_loss"] == pytest.approx(last["test_loss"], rel=1e-5)


def test_resume_with_a_weight_average_is_exact_and_cannot_switch_it(tiny_config, tiny_data, tmp_path):
    config = tiny_config.replace(epochs=2, schedule="step", ema_decay=0.9)
    straight = train_and_evaluate(config, tmp_path / "straight", dataset=tiny_data, progress=False)
    train_and_evaluate(config.replace(epochs=1), tmp_path / "resumed", dataset=tiny_data, progress=False)
    with pytest.raises(ConfigError, match="ema_decay 0.9 -> 0"):
        train_and_evaluate(config.replace(ema_decay=0.0), tmp_path / "resumed", resume=True,
                           dataset=tiny_data, progress=False)
    resumed = train_and_evaluate(config, tmp_path / "resumed", resume=True, dataset=tiny_data, progress=False)
    last, resumed_last = straight["history"][-1], resumed["history"][-1]
    assert resumed_last["test_accuracy"] == last["test_accuracy"]
    assert resumed_last["test_loss"] == pytest.approx(last["test_loss"], rel=1e-5)
    assert "weight moving average 0.9" in config.recipe()
    from jaxnorm.evaluate import restore_run, run_title
    assert "(weight average, step 8)" in run_title(restore_run(tmp_path / "straight"), 0.5)

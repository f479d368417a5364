"""Several steps per compiled call (the GPU/TPU path) train exactly as the step-by-step loop does."""

import dataclasses
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import parallel, train as train_lib
from jaxnorm.config import Config, ConfigError
from jaxnorm.models import build_model
from jaxnorm.state import create_train_state
from jaxnorm.train import (
    TrainingInterrupted,
    compiled_train_calls,
    compiled_train_step,
    make_epoch_order,
    steps_per_call,
    train_and_evaluate,
)

TIMING = ("seconds", "images_per_second")


def _close(a, b, rtol=1e-4, atol=1e-6):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol),
                           jax.device_get(a), jax.device_get(b))


class _Epoch:
    """One epoch of the tiny data (4 steps), on the devices, and fresh states to train through it."""

    def __init__(self, config, data):
        self.config, self.data = config, data
        self.mesh = parallel.make_mesh(config.batch_size)
        self.steps = len(data.train_images) // config.batch_size
        self.images = parallel.put_replicated(data.train_images, self.mesh)
        self.labels = parallel.put_replicated(data.train_labels, self.mesh)
        self.order = make_epoch_order(config, self.mesh, len(data.train_images))(0)

    def fresh(self, layer_set=None):
        model = build_model(self.config, *self.data.channel_stats(), layer_set=layer_set)
        state = create_train_state(model, self.config, self.data.image_shape, self.steps)
        return jax.device_put(state, parallel.replicated(self.mesh))

    def step_by_step(self, layer_set=None):
        """The state after the epoch, each step's loss and the correct count, one compiled step per call."""
        step = compiled_train_step(self.config, self.mesh)
        state, losses, correct = self.fresh(layer_set), [], 0
        for i in range(self.steps):
            state, metrics = step(state, self.images, self.labels, self.order, i)
            losses.append(float(metrics["loss"]))
            correct += int(metrics["correct"])
        return state, losses, correct


def test_calls_of_several_steps_match_the_step_loop(tiny_data, tiny_config):
    epoch = _Epoch(dataclasses.replace(tiny_config, norm="bn"), tiny_data)
    state, losses, correct = epoch.step_by_step()
    images, labels, order, steps = epoch.images, epoch.labels, epoch.order, epoch.steps

    # Calls of 3 from step 0: steps 0-2 in one call, then the epoch's last step alone.
    threes = compiled_train_calls(epoch.config, epoch.mesh, 3)
    part, first3, correct3, n3 = threes(epoch.fresh(), images, labels, order, 0)
    part, last, correct1, n1 = threes(part, images, labels, order, 3)
    assert (n3, n1, int(part.step)) == (3, 1, steps) and int(correct3) + int(correct1) == correct
    np.testing.assert_allclose(np.concatenate([first3, last]), losses, rtol=1e-5)
    _close(part.params, state.params)


@pytest.mark.parametrize("layer_set,precision", [("flax", "f32"), ("flax", "bf16"), ("cpu", "bf16")])
def test_the_accelerator_loop_matches_the_step_loop(tiny_data, tiny_config, monkeypatch, layer_set,
                                                     precision):
    # What a GPU or TPU runs, on the CPU: the whole epoch as one compiled call (--steps-per-call = the
    # epoch's steps) with its loop rolled, as there (the CPU unrolls it), and flax's layers or the CPU's.
    # The CPU's layers in float32 are the test above (a call of 3 steps).
    scan = jax.lax.scan
    monkeypatch.setattr(jax.lax, "scan", lambda *args, unroll=1, **kwargs: scan(*args, unroll=1, **kwargs))
    epoch = _Epoch(tiny_config.replace(norm="bn", precision=precision), tiny_data)
    state, losses, correct = epoch.step_by_step(layer_set)
    whole_epoch = compiled_train_calls(epoch.config, epoch.mesh, epoch.steps)
    start = epoch.fresh(layer_set)
    assert start.apply_fn.__self__.layer_set == layer_set
    called, call_losses, call_correct, n = whole_epoch(start, epoch.images, epoch.labels, epoch.order, 0)
    assert n == epoch.steps and int(called.step) == epoch.steps
    # float32: the same arithmetic, perhaps in another order; bfloat16 keeps 8 bits of each activation
    # (a kernel entry near 0 ends 1.25e-3 apart, unoptimised as in the suite).
    tight = precision == "f32"
    np.testing.assert_allclose(call_losses, losses, rtol=1e-5 if tight else 1e-2)
    assert abs(int(call_correct) - correct) <= (0 if tight else 1)
    _close((called.params, called.batch_stats), (state.params, state.batch_stats),
           **({"rtol": 1e-4, "atol": 1e-6} if tight else {"rtol": 5e-2, "atol": 2e-3}))


def test_the_default_is_one_step_per_call_on_cpu_and_a_value_is_checked():
    assert jax.devices()[0].platform == "cpu"
    assert steps_per_call(Config(), 390) == 1
    assert steps_per_call(Config(steps_per_call=1000), 390) == 390  # never more than an epoch
    with pytest.raises(ConfigError, match="--steps-per-call must be positive"):
        Config(steps_per_call=0).validate()


def test_a_run_of_calls_stops_at_a_calls_end_and_resumes_exactly(tiny_data, tiny_config, tmp_path,
                                                                  monkeypatch):
    chunked = tiny_config.replace(steps_per_call=3, epochs=1)  # a call of 3 steps, then the last one alone
    whole = train_and_evaluate(chunked, tmp_path / "calls", dataset=tiny_data, progress=False)
    assert [h["step"] for h in whole["history"]] == [4]

    # SIGINT during the 1st call (steps 1-3): the call finishes, the checkpoint is at step 3.
    make, calls = train_lib.compiled_train_calls, [0]

    def signalling(config, mesh, count):
        run = make(config, mesh, count)

        def call(*args):
            calls[0] += 1
            if calls[0] == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return run(*args)
        return call
    monkeypatch.setattr(train_lib, "compiled_train_calls", signalling)
    with pytest.raises(TrainingInterrupted, match="SIGINT at epoch 1, step 3"):
        train_and_evaluate(chunked, tmp_path / "stopped", dataset=tiny_data, progress=False)
    monkeypatch.undo()
    resumed = train_and_evaluate(chunked, tmp_path / "stopped", resume=True, dataset=tiny_data,
                                 progress=False)
    assert [{k: v for k, v in h.items() if k not in TIMING} for h in resumed["history"]] == \
        [{k: v for k, v in h.items() if k not in TIMING} for h in whole["history"]]


def test_epoch_call_results_keeps_at_most_two_calls_queued():
    # A whole epoch queued at once deadlocked XLA:CPU's multi-device all-reduce; epoch_call_results
    # waits for the call before last. Fake calls of 3 steps record which calls are still unfinished
    # when the next one is dispatched.
    unfinished = []

    class Pending:
        def __init__(self, index):
            self.index = index

        def block_until_ready(self):
            unfinished.remove(self.index)
            return self

    def train_steps(state, images, labels, order, start):
        assert len(unfinished) <= parallel.MAX_CALLS_IN_FLIGHT == 2  # queued before this call
        unfinished.append(start)
        n = min(3, len(order) - start)
        return state + n, Pending(start), n, n

    calls = list(train_lib.epoch_call_results(train_steps, 0, None, None, order=np.zeros((10, 4)), start=1))
    assert [(state, done) for state, _, _, done in calls] == [(3, 4), (6, 7), (9, 10)]
    assert unfinished == [4, 7]  # the last two calls are left running: the epoch's end fetches them


def test_seconds_per_step_times_the_steps_after_the_warmup():
    # One-step fake calls that each take 10 ms: the warm-up steps are run but not timed, every repeat
    # starts again at the epoch's first step, and the state carries on from call to call.
    starts = []

    def train_steps(state, images, labels, order, start):
        starts.append(start)
        time.sleep(0.01)
        return state + 1, jnp.zeros(1), 0, 1

    seconds, state = train_lib.seconds_per_step(train_steps, 0, None, None, np.zeros((10, 4)), steps=3,
                                                repeats=2, warmup=2)
    assert starts == [0, 1, 0, 1, 2, 0, 1, 2] and state == 8
    assert 0.01 <= seconds < 0.05

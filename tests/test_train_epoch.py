"""The whole epoch as one compiled loop trains exactly as the step-by-step loop does."""

import dataclasses

import jax
import numpy as np

from jaxnorm import parallel
from jaxnorm.models import build_model
from jaxnorm.state import create_train_state
from jaxnorm.train import make_epoch_order, make_train_epoch, make_train_step


def test_epoch_loop_matches_step_loop_including_a_resumed_epoch(tiny_data, tiny_config):
    config = dataclasses.replace(tiny_config, norm="bn")
    mesh = parallel.make_mesh(config.batch_size)
    steps = len(tiny_data.train_images) // config.batch_size
    rep = parallel.replicated(mesh)
    images = parallel.put_replicated(tiny_data.train_images, mesh)
    labels = parallel.put_replicated(tiny_data.train_labels, mesh)
    order = make_epoch_order(config, mesh, len(tiny_data.train_images))(0)

    def fresh():
        model = build_model(config, *tiny_data.channel_stats())
        return jax.device_put(create_train_state(model, config, tiny_data.image_shape, steps), rep)

    step, epoch = make_train_step(config, mesh), make_train_epoch(config, mesh)
    state, losses, correct = fresh(), [], 0
    for i in range(steps):
        state, metrics = step(state, images, labels, order, i)
        losses.append(float(metrics["loss"]))
        correct += int(metrics["correct"])

    whole, whole_losses, whole_correct = epoch(fresh(), images, labels, order, 0)
    np.testing.assert_allclose(np.asarray(whole_losses), losses, rtol=1e-5)
    assert int(whole_correct) == correct
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(whole.params), jax.device_get(state.params))

    # Resuming mid-epoch: the first step by hand, the rest in the loop; skipped steps report loss 0.
    resumed, first = step(fresh(), images, labels, order, 0)
    resumed, rest_losses, _ = epoch(resumed, images, labels, order, 1)
    assert float(rest_losses[0]) == 0.0
    np.testing.assert_allclose(np.asarray(rest_losses[1:]), losses[1:], rtol=1e-5)
    assert int(resumed.step) == steps
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(resumed.params), jax.device_get(state.params))

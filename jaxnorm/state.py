"""The train state and its optimizer: what a checkpoint holds, shared by training and evaluation."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jaxnorm.config import Config
from jaxnorm.models import init_variables, is_conv_kernel, whitening_kernel


class TrainState(train_state.TrainState):
    batch_stats: Any = None  # BatchNorm running statistics; an empty dict for GN and LN

    @property
    def eval_params(self) -> Any:
        """The weights evaluation uses: their moving average with --ema-decay, else the trained ones."""
        return optax.tree_utils.tree_get(self.opt_state, "ema_params", default=self.params)


class WeightAverageState(NamedTuple):
    count: jax.Array
    ema_params: Any


def weight_average(decay: float) -> optax.GradientTransformation:
    """Keeps a moving average of the weights in the optimizer state (so checkpoints without one restore
    unchanged); the updates pass through. The decay starts low, min(decay, (1 + t) / (10 + t)) after t
    steps, as TensorFlow's ExponentialMovingAverage: the random initial weights are soon forgotten."""
    def init(params):
        return WeightAverageState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.copy, params))

    def update(updates, state, params):
        count = state.count + 1
        step_decay = jnp.minimum(decay, (1.0 + count) / (10.0 + count))
        new_params = optax.apply_updates(params, updates)
        return updates, WeightAverageState(count, optax.incremental_update(new_params, state.ema_params,
                                                                           1.0 - step_decay))

    return optax.GradientTransformation(init, update)


def learning_rate_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """step: lr * gamma ** (epoch // lr_step_epochs), as torch's StepLR. linear / cosine: a linear
    warm-up over warmup_epochs, then a linear or cosine decay that reaches 0 at the last step."""
    if config.schedule == "step":
        return optax.exponential_decay(config.lr, transition_steps=config.lr_step_epochs * steps_per_epoch,
                                       decay_rate=config.lr_gamma, staircase=True)
    total, warmup = config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch)
    decay = (optax.cosine_decay_schedule(config.lr, total - warmup) if config.schedule == "cosine" else
             optax.linear_schedule(config.lr, 0.0, total - warmup))
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), decay], [warmup])


def conv_kernels(params) -> Any:
    """The weight-decay mask of --no-decay-scales-and-biases: True at the conv kernels only."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_conv_kernel(path), params)


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    # Weight decay added to the gradient before momentum, as torch.optim.SGD(weight_decay=...).
    mask = None if config.decay_scales_and_biases else conv_kernels
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=mask),
                     optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum,
                               nesterov=config.nesterov))
    if config.first_conv == "whitened-frozen":  # the first conv's kernel gets no update, not even decay
        first = config.layers()[0].name
        def label(path, _):
            return "frozen" if path[0].key == first and is_conv_kernel(path) else "train"
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   lambda params: jax.tree_util.tree_map_with_path(label, params))
    return optax.chain(tx, weight_average(config.ema_decay)) if config.ema_decay else tx


def create_train_state(model: nn.Module, config: Config, image_shape, steps_per_epoch: int,
                       train_images=None) -> TrainState:
    """The initial state of seed `config.seed`. `train_images` (N, H, W, C): the images that a whitened
    first conv (--first-conv) whitens; without them the kernel stays random (enough for a restore's
    template, whose values a checkpoint replaces)."""
    variables = init_variables(model, image_shape, seed=config.seed)
    params = variables["params"]
    if config.first_conv != "random" and train_images is not None:
        first = config.layers()[0]
        kernel = whitening_kernel(np.asarray(train_images[:5000]), model.input_mean, model.input_std,
                                  first.kernel, first.features)
        params = {**params, first.name: {**params[first.name], "kernel": jnp.asarray(kernel)}}
    return TrainState.create(apply_fn=model.apply, params=params,
                             batch_stats=variables.get("batch_stats", {}),
                             tx=make_optimizer(config, steps_per_epoch))

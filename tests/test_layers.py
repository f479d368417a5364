"""The fast layers are flax's: Conv is nn.Conv, GroupNorm nn.GroupNorm, max_pool nn.max_pool, with the same
parameters, outputs and gradients up to float32 rounding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import layers
from jaxnorm.config import Config
from jaxnorm.models import build_model


@pytest.mark.parametrize("cin,kernel,padding,bias", [(3, 3, 1, False), (2, 3, 0, True), (8, 1, 0, True),
                                                     (16, 3, 1, False), (12, 3, 0, True)])
def test_fast_conv_matches_nn_conv_forward_and_gradient(cin, kernel, padding, bias):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 9, 9, cin))
    fast = layers.Conv(5, (kernel, kernel), padding=padding, use_bias=bias)
    plain = nn.Conv(5, (kernel, kernel), padding=padding, use_bias=bias)
    variables = plain.init(jax.random.PRNGKey(1), x)
    fast_variables = fast.init(jax.random.PRNGKey(1), x)
    # The same parameter tree and initial values: checkpoints of either load into the other.
    assert jax.tree_util.tree_structure(fast_variables) == jax.tree_util.tree_structure(variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, fast_variables, variables)

    def loss(module):
        return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))  # a non-linear cotangent

    np.testing.assert_allclose(fast.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-5)
    g_fast = jax.grad(loss(fast), argnums=(0, 1))(variables, x)
    g_plain = jax.grad(loss(plain), argnums=(0, 1))(variables, x)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_fast, g_plain)


@pytest.mark.parametrize("shape,window,stride", [((4, 8, 8, 3), 2, 2), ((2, 7, 9, 5), 2, 2), ((2, 9, 9, 2), 3, 3),
                                                 ((2, 8, 8, 2), 3, 2)])
def test_fast_max_pool_matches_nn_max_pool_forward_and_gradient(shape, window, stride):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)  # no ties
    fast = lambda x: layers.max_pool(x, window, stride)
    plain = lambda x: nn.max_pool(x, (window, window), strides=(stride, stride))
    np.testing.assert_array_equal(fast(x), plain(x))
    grad = lambda pool: jax.grad(lambda x: jnp.sum(jnp.sin(pool(x))))(x)  # a different cotangent per window
    np.testing.assert_array_equal(grad(fast), grad(plain))


def test_fast_max_pool_shares_a_tied_windows_gradient():
    x = jnp.zeros((1, 2, 2, 1)).at[0, 0, 0, 0].set(-1.0)  # three tied maxima (0) in one window
    g = jax.grad(lambda x: jnp.sum(layers.max_pool(x, 2, 2)))(x)
    np.testing.assert_allclose(g[0, :, :, 0], [[0, 1 / 3], [1 / 3, 1 / 3]])  # summed: the window's 1


@pytest.mark.parametrize("groups", [1, 4, 12])
def test_fast_group_norm_matches_nn_group_norm_forward_and_gradient(groups):
    x = 3 * jax.random.normal(jax.random.PRNGKey(0), (4, 5, 6, 12)) + 1  # a mean the statistics must remove
    fast, plain = layers.GroupNorm(num_groups=groups, epsilon=1e-5), nn.GroupNorm(num_groups=groups, epsilon=1e-5)
    variables = plain.init(jax.random.PRNGKey(1), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, fast.init(jax.random.PRNGKey(1), x), variables)
    variables = jax.tree_util.tree_map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), variables)
    np.testing.assert_allclose(fast.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-5)
    grad = lambda module: jax.grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))), argnums=(0, 1))(variables, x)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grad(fast), grad(plain))


def test_fast_group_norm_refuses_groups_that_do_not_divide_the_channels():
    with pytest.raises(ValueError, match=r"Number of groups \(5\) does not divide the number of channels \(12\)"):
        layers.GroupNorm(num_groups=5).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 12)))


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_seed_network_with_fast_convs_matches_nn_conv(norm, monkeypatch):
    # Small widths keep it fast; every conv kind of the seed network is there (RGB 3x3, 3x3, 1x1).
    model = build_model(Config(norm=norm, dropout=0.0, width=8, transition_width=8, groups=4))
    x = jax.random.uniform(jax.random.PRNGKey(2), (4, 16, 16, 3), maxval=255)
    fast_vars = model.init(jax.random.PRNGKey(0), x)
    fast_logits, fast_grads = _logits_and_grads(model, fast_vars, x)
    # The model as it was, with flax's own convolution, GroupNorm and max pool.
    monkeypatch.setattr(layers, "Conv", nn.Conv)
    monkeypatch.setattr(layers, "GroupNorm", nn.GroupNorm)
    monkeypatch.setattr(layers, "max_pool", lambda x, k, s: nn.max_pool(x, (k, k), strides=(s, s)))
    plain_vars = model.init(jax.random.PRNGKey(0), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, fast_vars, plain_vars)
    plain_logits, plain_grads = _logits_and_grads(model, plain_vars, x)
    np.testing.assert_allclose(fast_logits, plain_logits, rtol=1e-4, atol=1e-4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                           fast_grads, plain_grads)


def _logits_and_grads(model, variables, x):
    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(logits ** 2), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return logits, grads

"""The fast CPU layers are flax's: Conv is nn.Conv, GroupNorm nn.GroupNorm, max_pool nn.max_pool, with the
same parameters, outputs and gradients up to float32 rounding; a model built with either set is the same."""

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
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                           g_fast, g_plain)


@pytest.mark.parametrize("shape,window,stride", [((4, 8, 8, 3), 2, 2), ((2, 7, 9, 5), 2, 2),
                                                 ((2, 9, 9, 2), 3, 3), ((2, 8, 8, 2), 3, 2)])
def test_fast_max_pool_matches_nn_max_pool_forward_and_gradient(shape, window, stride):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)  # no ties

    def fast(x):
        return layers.max_pool(x, window, stride)

    def plain(x):
        return nn.max_pool(x, (window, window), strides=(stride, stride))

    def grad(pool):  # a different cotangent per window
        return jax.grad(lambda x: jnp.sum(jnp.sin(pool(x))))(x)

    np.testing.assert_array_equal(fast(x), plain(x))
    np.testing.assert_array_equal(grad(fast), grad(plain))


def test_fast_max_pool_shares_a_tied_windows_gradient():
    x = jnp.zeros((1, 2, 2, 1)).at[0, 0, 0, 0].set(-1.0)  # three tied maxima (0) in one window
    g = jax.grad(lambda x: jnp.sum(layers.max_pool(x, 2, 2)))(x)
    np.testing.assert_allclose(g[0, :, :, 0], [[0, 1 / 3], [1 / 3, 1 / 3]])  # summed: the window's 1


@pytest.mark.parametrize("groups", [1, 4, 12])
def test_fast_group_norm_matches_nn_group_norm_forward_and_gradient(groups):
    x = 3 * jax.random.normal(jax.random.PRNGKey(0), (4, 5, 6, 12)) + 1  # a mean the statistics must remove
    fast = layers.GroupNorm(num_groups=groups, epsilon=1e-5)
    plain = nn.GroupNorm(num_groups=groups, epsilon=1e-5)
    variables = plain.init(jax.random.PRNGKey(1), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, fast.init(jax.random.PRNGKey(1), x), variables)
    variables = jax.tree_util.tree_map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape),
                                       variables)
    np.testing.assert_allclose(fast.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-5)

    def grad(module):
        return jax.grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))), argnums=(0, 1))(variables, x)

    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                           grad(fast), grad(plain))


def test_fast_group_norm_refuses_groups_that_do_not_divide_the_channels():
    with pytest.raises(ValueError,
                       match=r"Number of groups \(5\) does not divide the number of channels \(12\)"):
        layers.GroupNorm(num_groups=5).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 12)))


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_flax_layers_build_the_same_model_as_the_cpu_layers(norm, monkeypatch):
    # What a GPU or TPU host builds, forced here on the CPU: flax's own layers, no custom gradient.
    monkeypatch.setenv("JAXNORM_LAYERS", "flax")
    # Small widths keep it fast; every conv kind of the CPU set is there (im2col for the RGB 3x3 and the
    # 1x1s, the custom gradient for 3x3s over more than MAX_PATCH_CHANNELS channels).
    config = Config(norm=norm, dropout=0.0, width=2 * layers.MAX_PATCH_CHANNELS, transition_width=8, groups=4)
    flax_model, cpu_model = build_model(config), build_model(config, layer_set="cpu")
    assert (flax_model.layer_set, cpu_model.layer_set) == ("flax", "cpu")
    x = jax.random.uniform(jax.random.PRNGKey(2), (4, 16, 16, 3), maxval=255)
    variables = cpu_model.init(jax.random.PRNGKey(0), x)
    # The same parameter tree and initial values: a checkpoint of either restores into the other.
    flax_variables = flax_model.init(jax.random.PRNGKey(0), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, flax_variables, variables)
    flax_logits, flax_grads = _logits_and_grads(flax_model, variables, x)
    cpu_logits, cpu_grads = _logits_and_grads(cpu_model, variables, x)
    np.testing.assert_allclose(flax_logits, cpu_logits, rtol=1e-4, atol=1e-4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                           flax_grads, cpu_grads)
    # Forward and backward passes of flax's set: stock layers only. The CPU set's convolutions are a
    # custom_vjp (in the forward jaxpr; differentiation inlines its rule) with dot_general gradients.
    forward, backward = _jaxprs(flax_model, variables, x)
    assert "custom_vjp" not in forward and "custom_vjp" not in backward
    assert "conv_general_dilated" in backward and "dot_general" not in backward
    assert "select_and_scatter_add" in backward  # nn.max_pool's gradient
    cpu_forward, cpu_backward = _jaxprs(cpu_model, variables, x)
    assert "custom_vjp_call" in cpu_forward and "dot_general" in cpu_backward


def _loss(model, variables, x):
    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(logits ** 2), logits
    return loss


def _jaxprs(model, variables, x) -> tuple[str, str]:
    """The loss's jaxpr and its gradient's, as text."""
    loss = _loss(model, variables, x)
    return (str(jax.make_jaxpr(loss)(variables["params"])),
            str(jax.make_jaxpr(jax.grad(loss, has_aux=True))(variables["params"])))


def _logits_and_grads(model, variables, x):
    value_and_grad = jax.jit(jax.value_and_grad(_loss(model, variables, x), has_aux=True))
    (_, logits), grads = value_and_grad(variables["params"])
    return logits, grads

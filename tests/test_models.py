import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxnorm.config import WIDTH_PRESETS, Config, ConfigError
from jaxnorm.models import build_model, count_params, init_variables, whitening_kernel


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_base_preset_has_exactly_34872_parameters(norm):
    variables = init_variables(build_model(Config(norm=norm)), (32, 32, 3))
    assert count_params(variables["params"]) == 34_872


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
@pytest.mark.parametrize("preset", sorted(WIDTH_PRESETS))
def test_every_preset_stays_under_50k(norm, preset):
    width, transition = WIDTH_PRESETS[preset]
    config = Config(norm=norm, width=width, transition_width=transition, groups=4)
    assert count_params(init_variables(build_model(config), (32, 32, 3))["params"]) < 50_000


def test_skip_connections_keep_the_parameter_count_and_change_the_output():
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), maxval=255)
    plain, skip = build_model(Config(norm="gn")), build_model(Config(norm="gn", skip=True))
    variables = init_variables(plain, (32, 32, 3))
    assert count_params(init_variables(skip, (32, 32, 3))["params"]) == count_params(variables["params"])
    assert not np.allclose(plain.apply(variables, x), skip.apply(variables, x))


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_relu_before_norm_reorders_each_block_with_the_same_parameters(norm):
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3), maxval=255)
    plain = build_model(Config(norm=norm))
    relu_first = build_model(Config(norm=norm, relu_before_norm=True))
    variables = init_variables(plain, (32, 32, 3))
    assert jax.tree_util.tree_structure(init_variables(relu_first, (32, 32, 3))) == \
        jax.tree_util.tree_structure(variables)

    def train_mode(model):  # logits and what C1's block hands on (its dropout is the identity at rate 0)
        logits, state = model.apply(variables, x, train=True, mutable=["intermediates", "batch_stats"],
                                    capture_intermediates=lambda m, _: m.name == "Dropout_0")
        return logits, state["intermediates"]["Dropout_0"]["__call__"][0]

    (plain_logits, plain_block), (relu_first_logits, relu_first_block) = map(train_mode, (plain, relu_first))
    # conv -> norm -> ReLU ends at a ReLU; conv -> ReLU -> norm ends at the norm's centred output.
    assert float(plain_block.min()) == 0.0 and float(relu_first_block.min()) < 0.0
    assert not np.allclose(plain_logits, relu_first_logits)


@pytest.mark.parametrize("relu_before_norm", [False, True])
def test_gelu_replaces_every_relu_with_the_same_parameters(relu_before_norm):
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3), maxval=255)
    relu = build_model(Config(norm="gn", relu_before_norm=relu_before_norm))
    gelu = build_model(Config(norm="gn", relu_before_norm=relu_before_norm, activation="gelu"))
    variables = init_variables(relu, (32, 32, 3))
    assert jax.tree_util.tree_structure(init_variables(gelu, (32, 32, 3))) == \
        jax.tree_util.tree_structure(variables)

    def blocks(model):  # what every block hands on (its dropout is the identity at rate 0)
        _, state = model.apply(variables, x, mutable=["intermediates"],
                               capture_intermediates=lambda m, _: (m.name or "").startswith("Dropout"))
        return [v["__call__"][0] for v in state["intermediates"].values()]

    relu_blocks, gelu_blocks = blocks(relu), blocks(gelu)
    assert len(gelu_blocks) == 8  # C1 C2 C3 C4 C5 C7 C8 C9
    if not relu_before_norm:  # each block ends at its activation: ReLU is never negative, GELU down to -0.17
        assert all(float(b.min()) == 0.0 for b in relu_blocks)
        assert all(-0.18 < float(b.min()) < 0.0 for b in gelu_blocks)
    assert not np.allclose(relu.apply(variables, x), gelu.apply(variables, x))


def test_an_unknown_activation_is_refused():
    with pytest.raises(ConfigError, match="unknown activation 'swish'"):
        Config(activation="swish").validate()


@pytest.mark.parametrize("layer_set", ["cpu", "flax"])
def test_weight_standardization_is_the_plain_network_on_standardised_block_kernels(layer_set):
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), maxval=255)
    plain = build_model(Config(norm="gn"), layer_set=layer_set)
    ws = build_model(Config(norm="gn", weight_standardization=True), layer_set=layer_set)
    variables = init_variables(ws, (32, 32, 3))
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        init_variables(plain, (32, 32, 3)))  # the same parameters: checkpoints and counts unchanged
    # Trained kernels have a mean and per-channel scales of their own (at init they are already close
    # to standardised, up to a scale the norm removes): give them some.
    key = jax.random.PRNGKey(2)
    variables = {"params": jax.tree_util.tree_map_with_path(
        lambda path, w: w * jax.random.uniform(key, w.shape[-1:], minval=0.5, maxval=2.0) + 0.05
        if path[-1].key == "kernel" else w, variables["params"])}
    params = dict(variables["params"])
    for name in params:  # every 3x3 block's kernel standardised by hand; the logits' conv c10 kept
        if name.startswith("C") and "kernel" in params[name]:
            w = params[name]["kernel"]
            mean, var = w.mean(axis=(0, 1, 2)), w.var(axis=(0, 1, 2))
            params[name] = {"kernel": (w - mean) / np.sqrt(var + 1e-5)}
    np.testing.assert_allclose(ws.apply(variables, x), plain.apply({"params": params}, x), rtol=1e-4,
                               atol=1e-4)
    assert not np.allclose(ws.apply(variables, x), plain.apply(variables, x), atol=1e-3)
    # Gradients reach the raw kernels through the standardisation: none is zero.
    grads = jax.grad(lambda p: ws.apply({"params": p}, x).sum())(variables["params"])
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_whitening_kernel_decorrelates_the_patches_and_adds_each_filters_negative():
    # Smooth random images: neighbouring pixels and the channels are strongly correlated.
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(200, 18, 18, 3))
    smooth = sum(noise[:, i:i + 16, j:j + 16] for i in range(3) for j in range(3)) + noise[:, :16, :16, :1]
    images = np.clip(128 + 20 * smooth, 0, 255).astype(np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)
    kernel = whitening_kernel(images, mean, std, kernel=3, features=9)
    assert kernel.shape == (3, 3, 3, 9)
    x = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
    out = jax.lax.conv_general_dilated(jnp.asarray(x, jnp.float32), jnp.asarray(kernel), (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out = np.asarray(out).reshape(-1, 9)
    covariance = out[:, :5].T @ out[:, :5] / len(out)  # the top 5 eigen-directions and 4 negatives
    np.testing.assert_allclose(covariance, np.eye(5), atol=0.02)  # eps is small against these eigenvalues
    np.testing.assert_allclose(kernel[..., 5:], -kernel[..., :4])
    with pytest.raises(ConfigError, match="at most 54 channels"):
        whitening_kernel(images, mean, std, kernel=3, features=56)


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_output_is_one_logit_per_class(norm):
    model = build_model(Config(norm=norm))
    variables = init_variables(model, (32, 32, 3))
    logits = model.apply(variables, jnp.zeros((5, 32, 32, 3), jnp.uint8))
    assert logits.shape == (5, 10) and logits.dtype == jnp.float32


def test_batchnorm_updates_batch_stats_in_training_only():
    model = build_model(Config(norm="bn"))
    variables = init_variables(model, (32, 32, 3))
    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 32, 32, 3), maxval=255)
    _, updates = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                             mutable=["batch_stats"])
    changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                                     updates["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed))
    _, updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
    same = jax.tree_util.tree_map(np.array_equal, variables["batch_stats"], updates["batch_stats"])
    assert all(jax.tree_util.tree_leaves(same))


def test_batchnorm_evaluation_uses_running_statistics():
    model = build_model(Config(norm="bn"))
    variables = init_variables(model, (32, 32, 3))
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3), maxval=255)
    # In evaluation a sample's logits must not depend on the rest of the batch.
    np.testing.assert_allclose(model.apply(variables, x)[:1], model.apply(variables, x[:1]), atol=1e-5)


@pytest.mark.parametrize("norm", ["gn", "ln"])
def test_group_and_layer_norm_have_no_batch_stats(norm):
    assert "batch_stats" not in init_variables(build_model(Config(norm=norm)), (32, 32, 3))


def test_layernorm_normalises_each_sample_over_channels_and_space():
    from jaxnorm.models import norm_layer
    layer = norm_layer("ln", train=True)()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 6)) * 3 + 1
    y = layer.apply(layer.init(jax.random.PRNGKey(0), x), x)
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(1, 2, 3)), 1, atol=1e-3)
    assert layer.init(jax.random.PRNGKey(0), x)["params"]["scale"].shape == (6,)


@pytest.mark.parametrize("groups", [5, 7, 48])
def test_group_count_that_does_not_divide_channels_is_rejected(groups):
    with pytest.raises(ConfigError, match=f"--groups {groups} does not divide"):
        Config(norm="gn", groups=groups).validate()


def test_unknown_norm_is_rejected():
    with pytest.raises(ConfigError, match="unknown norm 'xn'"):
        build_model(Config(norm="xn"))


@pytest.mark.parametrize("norm", ["bn"])  # bfloat16 moves bn's gradient most; one norm keeps the suite short
def test_bf16_computes_in_bfloat16_and_keeps_float32_parameters_and_gradients(norm):
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 16, 16, 3), maxval=255)  # 16x16: a faster test
    y = jnp.arange(8) % 10
    f32, bf16 = build_model(Config(norm=norm)), build_model(Config(norm=norm, precision="bf16"))
    variables = init_variables(f32, (16, 16, 3))
    # The same parameters: a run can switch precision on resume, and init does not depend on it.
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, init_variables(bf16, (16, 16, 3)))

    def loss_and_grads(model):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), y]), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])  # one compile, not per op

    (_, logits32), grads32 = loss_and_grads(f32)
    (_, logits16), grads16 = loss_and_grads(bf16)
    assert logits16.dtype == jnp.float32 and not np.array_equal(logits16, logits32)  # computed in bf16
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * float(jnp.abs(logits32).max()))
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads16))
    # At initialisation on random images the gradient is small and bfloat16's rounding moves it by
    # 5-35% (bn worst); a wrong or missing gradient would be far off.
    (g16, _), (g32, _) = ravel_pytree(grads16), ravel_pytree(grads32)
    assert jnp.vdot(g16, g32) / (jnp.linalg.norm(g16) * jnp.linalg.norm(g32)) > 0.9

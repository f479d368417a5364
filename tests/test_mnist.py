"""The MNIST path: the 10,224-parameter net, --l1, the idx reader and --train-split."""

import gzip

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED_DATA
from jaxnorm import parallel
from jaxnorm.config import Config, ConfigError
from jaxnorm.data import DataError, load_dataset, read_idx, split_train_test, synthetic_dataset
from jaxnorm.models import MnistNet, build_model, count_params, init_variables, l1_penalty
from jaxnorm.state import create_train_state
from jaxnorm.train import compiled_train_step, train_and_evaluate

MNIST_DIR = SHARED_DATA / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                 reason="../shared/data/mnist not present")


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_mnist_net_has_exactly_10224_parameters(norm):
    model = build_model(Config.for_dataset("mnist", norm=norm), (0.13,), (0.31,))
    assert isinstance(model, MnistNet)
    variables = jax.eval_shape(lambda: init_variables(model, (28, 28, 1)))  # shapes only: no compute
    assert count_params(variables["params"]) == 10_224
    assert jax.eval_shape(model.apply, variables, jnp.zeros((3, 28, 28, 1), jnp.uint8)).shape == (3, 10)


def test_mnist_defaults_and_group_check_cover_every_normalised_width():
    config = Config.for_dataset("mnist")
    assert (config.epochs, config.batch_size, config.groups, config.flip) == (15, 64, 2, False)
    assert (config.crop_padding, Config().crop_padding) == (2, 4)  # a 28x28 digit shifts less than a photo
    with pytest.raises(ConfigError, match="--crop-padding must be positive"):
        config.replace(crop_padding=0).validate()
    assert Config.for_dataset("cifar10") == Config()  # CIFAR-10 defaults unchanged
    with pytest.raises(ConfigError, match="--groups 4 does not divide the 10 channels.*divisor of 2"):
        config.replace(norm="gn", groups=4).validate()
    with pytest.raises(ConfigError, match="does not divide the 16, 8 channels"):
        config.replace(norm="gn", groups=5).validate()


def test_channel_dropout_drops_whole_feature_maps():
    model = MnistNet(Config.for_dataset("mnist", norm="gn", dropout=0.5))
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 1), maxval=255)

    @jax.jit
    def dropped_maps(x):  # init and one training forward pass, compiled together (fast)
        variables = model.init(jax.random.PRNGKey(0), x)
        return model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                           capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Dropout))[1]

    inter = dropped_maps(x)
    first = np.asarray(inter["intermediates"]["Dropout_0"]["__call__"][0])  # (2, 28, 28, 10), after conv1
    zero = (first == 0).all(axis=(1, 2))
    assert zero.any() and not zero.all()
    kept = first[~np.broadcast_to(zero[:, None, None, :], first.shape)]
    assert (kept != 0).mean() > 0.3  # kept channels are not sparsified elementwise (ReLU zeros aside)


def test_l1_penalty_is_the_sum_of_absolute_conv_kernels():
    model = MnistNet(Config.for_dataset("mnist"))
    params = init_variables(model, (28, 28, 1))["params"]
    direct = sum(np.abs(np.asarray(layer["kernel"])).sum() for name, layer in params.items()
                 if not name.endswith("_norm"))
    assert float(l1_penalty(params)) == pytest.approx(direct, rel=1e-5)
    tiny = {"a": {"kernel": jnp.array([[-1.0, 2.0]]), "bias": jnp.array([5.0])},
            "a_norm": {"scale": jnp.array([-3.0]), "bias": jnp.array([4.0])}}
    assert float(l1_penalty(tiny)) == 3.0


def _mnist_like(n_train=64, n_test=32):
    return synthetic_dataset(n_train, n_test, image_shape=(28, 28, 1))


@pytest.mark.parametrize("norm, l1", [("bn", 1e-3), ("gn", 0.0), ("ln", 0.0)])
def test_a_few_steps_drive_the_mnist_net_loss_down(norm, l1):
    data = _mnist_like()
    config = Config.for_dataset("mnist", norm=norm, l1=l1, batch_size=32, dropout=0.0, lr=0.1)
    mesh = parallel.make_mesh()
    state = create_train_state(build_model(config, *data.channel_stats()), config, data.image_shape, 2)
    state = jax.device_put(state, parallel.replicated(mesh))
    step = compiled_train_step(config, mesh)
    images, labels = (parallel.put_replicated(a, mesh) for a in (data.train_images, data.train_labels))
    order = np.arange(32, dtype=np.int32)[None]
    losses = []
    for _ in range(20):
        state, metrics = step(state, images, labels, order, 0)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses
    expected_l1 = l1 * float(l1_penalty(state.params))
    assert float(metrics["l1"]) == pytest.approx(expected_l1, rel=0.05)  # the term before the last update


def test_l1_is_recorded_apart_from_the_loss_in_the_history(tmp_path):
    config = Config.for_dataset("mnist", norm="gn", l1=1e-4, epochs=1, batch_size=32, eval_batch_size=32)
    result = train_and_evaluate(config, tmp_path, dataset=_mnist_like(), progress=False)
    record = result["history"][0]
    assert record["train_l1"] == pytest.approx(1e-4 * float(l1_penalty(result["state"].params)), rel=1e-5)
    assert record["train_l1"] > 0 and "train_loss" in record


@needs_mnist
def test_idx_reader_on_the_shared_mnist_test_files():
    images = read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    data = load_dataset("mnist", str(MNIST_DIR), train_split=8000)
    assert data.train_images.shape == (8000, 28, 28, 1) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (2000, 28, 28, 1)
    assert data.train_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the first t10k labels
    assert data.class_names == tuple("0123456789")
    with pytest.raises(DataError, match="--train-split N"):
        load_dataset("mnist", str(MNIST_DIR))  # no training images there: the split must be asked for


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_idx_folder_gz_or_not_and_train_split_sizes(tmp_path):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 256, (12, 28, 28))
    train_y, test_y = rng.integers(0, 10, 30), rng.integers(0, 10, 12)
    _write_idx(tmp_path / "train-images-idx3-ubyte", train_x, compress=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y, compress=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_x, compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y, compress=False)
    data = load_dataset("mnist", str(tmp_path))
    assert (len(data.train_images), len(data.test_images)) == (30, 12)
    np.testing.assert_array_equal(data.test_images[..., 0], test_x)
    np.testing.assert_array_equal(data.train_labels, train_y)
    split = load_dataset("mnist", str(tmp_path), train_split=20)  # asked for: splits the training files
    assert (len(split.train_images), len(split.test_images)) == (20, 10)
    np.testing.assert_array_equal(split.test_images[..., 0], train_x[20:])
    with pytest.raises(DataError, match="between 1 and 29"):
        split_train_test(data, 30)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "t10k-images-idx3-ubyte").write_bytes(b"junk")
    _write_idx(tmp_path / "bad" / "t10k-labels-idx1-ubyte", test_y, compress=False)
    with pytest.raises(DataError, match="not an idx file"):
        load_dataset("mnist", str(tmp_path / "bad"))


def test_offline_mnist_without_local_copy_says_what_to_do(tmp_path, offline):
    with pytest.raises(DataError, match="MNIST is not in .*no network.*idx files.*--data-dir"):
        load_dataset("mnist", str(tmp_path))

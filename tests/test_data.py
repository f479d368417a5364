import io
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CIFAR_SUBSET
from jaxnorm.data import (
    DataError,
    alternating_flips,
    augment,
    cut_out,
    load_dataset,
    read_cifar10_archive,
    rotate,
)

needs_subset = pytest.mark.skipif(not CIFAR_SUBSET.exists(), reason="../shared/data not present")


@needs_subset
def test_reads_the_shared_cifar10_subset_archive():
    data = load_dataset("cifar10", str(CIFAR_SUBSET))
    assert data.train_images.shape == (5085, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (1017, 32, 32, 3)
    assert data.train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert data.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert data.class_names[0] == "airplane" and data.class_names[9] == "truck"
    assert set(np.unique(data.train_labels)) == set(range(10))


@needs_subset
def test_extracted_folder_reads_the_same_as_the_archive(tmp_path):
    with tarfile.open(CIFAR_SUBSET) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = load_dataset("cifar10", str(tmp_path))  # finds cifar-10-batches-bin inside
    archive = read_cifar10_archive(CIFAR_SUBSET)
    np.testing.assert_array_equal(folder.train_images, archive.train_images)
    np.testing.assert_array_equal(folder.test_labels, archive.test_labels)


def _python_archive(path, images, labels):
    import pickle
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            raw = pickle.dumps({b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
                                b"labels": labels.tolist()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_reads_the_python_archive_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    _python_archive(tmp_path / "cifar-10-python.tar.gz", images, np.array([1, 2, 3]))
    data = load_dataset("cifar10", str(tmp_path / "cifar-10-python.tar.gz"))
    assert data.train_images.shape == (15, 32, 32, 3)
    np.testing.assert_array_equal(data.test_images, images)  # the NCHW -> NHWC transpose is right
    assert data.test_labels.tolist() == [1, 2, 3]


def test_missing_path_and_foreign_file_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "nope"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not an archive")
    with pytest.raises(DataError, match="not a CIFAR-10 archive"):
        load_dataset("cifar10", str(junk))


def test_offline_without_local_copy_says_what_to_do(tmp_path, offline):
    with pytest.raises(DataError, match="could not be downloaded .*no network.*--data-dir"):
        load_dataset("cifar10", str(tmp_path))


def test_channel_stats_are_per_channel_in_unit_range(tiny_data):
    mean, std = tiny_data.channel_stats()
    x = tiny_data.train_images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean((0, 1, 2)))
    np.testing.assert_allclose(std, x.std((0, 1, 2)))


def test_flip_mirrors_a_random_half_and_keeps_the_rest():
    images = np.arange(64 * 4 * 4 * 3, dtype=np.float32).reshape(64, 4, 4, 3)
    out = np.asarray(augment(images, jax.random.PRNGKey(0), flip=True))
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48
    again = np.asarray(augment(images, jax.random.PRNGKey(0), flip=True))
    np.testing.assert_array_equal(out, again)  # driven by the key alone


def test_alternating_flips_turn_every_image_the_other_way_each_epoch():
    key, everyone = jax.random.PRNGKey(4), jnp.arange(1000)
    epochs = [np.asarray(alternating_flips(key, 1000, everyone, e)) for e in range(3)]
    assert 400 < epochs[0].sum() < 600  # a random half first
    np.testing.assert_array_equal(epochs[1], ~epochs[0])
    np.testing.assert_array_equal(epochs[2], epochs[0])
    some = jnp.array([7, 3, 999, 3])  # a batch of indices: each image's own choice, wherever it falls
    np.testing.assert_array_equal(alternating_flips(key, 1000, some, 1), epochs[1][np.asarray(some)])


def test_a_flip_mask_mirrors_exactly_the_images_it_names():
    images = np.arange(6 * 4 * 4 * 3, dtype=np.float32).reshape(6, 4, 4, 3)
    mask = np.array([True, False, False, True, True, False])
    out = np.asarray(augment(images, jax.random.PRNGKey(0), flip_mask=jnp.asarray(mask)))
    np.testing.assert_array_equal(out[mask], images[mask][:, :, ::-1])
    np.testing.assert_array_equal(out[~mask], images[~mask])


def test_cutout_fills_one_clipped_square_per_image_with_the_mean_colour():
    images = np.random.default_rng(2).integers(1, 255, (200, 12, 12, 3)).astype(np.float32)
    out = np.asarray(cut_out(jnp.asarray(images), jax.random.PRNGKey(1), 6))
    fill = images.mean((0, 1, 2))
    sizes = []
    for o, i in zip(out, images, strict=True):
        rows, cols = np.nonzero(np.any(o != i, axis=-1))
        top, left, bottom, right = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
        box = o[top:bottom, left:right]
        np.testing.assert_allclose(box, np.broadcast_to(fill, box.shape), rtol=1e-6)  # one filled square
        sizes.append((bottom - top, right - left))
        assert bottom - top == 6 or top == 0 or bottom == 12  # whole, or clipped at an edge
        assert right - left == 6 or left == 0 or right == 12
    assert (6, 6) in sizes and any(h < 6 or w < 6 for h, w in sizes)  # whole squares, and clipped ones
    assert len(set(sizes)) > 3 and np.array_equal(out, np.asarray(cut_out(jnp.asarray(images),
                                                                          jax.random.PRNGKey(1), 6)))


def test_rotate_turns_images_about_their_centre():
    images = np.random.default_rng(0).integers(0, 255, (3, 6, 6, 2)).astype(np.uint8)
    out = np.asarray(rotate(images, jnp.array([0.0, 90.0, -90.0])))
    assert out.shape == images.shape and out.dtype == images.dtype
    np.testing.assert_array_equal(out[0], images[0])
    np.testing.assert_array_equal(out[1], np.rot90(images[1], k=1))  # anticlockwise on screen
    np.testing.assert_array_equal(out[2], np.rot90(images[2], k=-1))
    # In between, bilinear: 45 degrees of a centred blob keeps its centre and its mass about the same.
    blob = np.zeros((1, 9, 9, 1), np.float32)
    blob[0, 3:6, 3:6] = 1
    turned = np.asarray(rotate(blob, jnp.array([45.0])))
    assert turned[0, 4, 4, 0] == 1 and abs(turned.sum() - 9) < 1.5 and not np.array_equal(turned, blob)


def test_rotation_draws_an_angle_per_image():
    images = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype(np.float32)
    key = jax.random.PRNGKey(5)
    plain = np.asarray(augment(images, key, flip=True, crop_padding=2))
    rotated = np.asarray(augment(images, key, flip=True, rotate_degrees=30, crop_padding=2))
    assert not np.allclose(plain, rotated)
    changed = [not np.allclose(p, r) for p, r in zip(plain, rotated, strict=True)]
    assert sum(changed) >= 14  # angles are drawn per image, uniform in [-30, 30]


def test_crop_shifts_images_within_the_padding():
    images = np.random.default_rng(0).integers(0, 255, (32, 8, 8, 3)).astype(np.uint8)
    out = np.asarray(augment(images, jax.random.PRNGKey(3), flip=False, crop_padding=2))
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    shifts = []
    for o, p in zip(out, padded, strict=True):  # each output: the padded image seen through an 8x8 window
        found = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(o, p[dy:dy + 8, dx:dx + 8])]
        assert found, "an output is not a crop within the 2-pixel padding"
        shifts.append(found[0])
    # Every offset of the bound is drawn (key 3, 32 images), not one shift for all.
    assert {dy for dy, _ in shifts} == {dx for _, dx in shifts} == set(range(5))

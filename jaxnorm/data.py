"""Datasets as uint8 NHWC arrays with int32 labels, and augmentation as jittable array functions.

Sources, in the order `load_dataset` tries them:
  * a local copy named by `--data-dir`: for CIFAR-10 the official archives (`cifar-10-binary.tar.gz`,
    `cifar-10-python.tar.gz`), their extracted folders, or a folder holding one of those; for MNIST a
    folder of the official idx files (`train-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`, ...,
    gzipped or not);
  * an image folder (`train/<class>/*`, `test/<class>/*`, or a .tar/.tar.gz/.zip of one; see
    `jaxnorm.imagefolder`): `--dataset folder` for any classes, `--dataset cifar10` when the class
    folders are CIFAR-10's ten names;
  * the official files downloaded before, in `<root>/jaxnorm-downloads/<dataset>/`, where <root> is
    `--data-dir`, `$TFDS_DATA_DIR` or ~/tensorflow_datasets;
  * a prepared TFDS dataset in <root> (`tfds.data_source`, no TensorFlow needed);
  * the official files, downloaded now into that folder (`jaxnorm.download`: checksums, mirrors);
  * `synthetic`: small generated images for smoke runs and tests.

`train_split=N` (`--train-split N`) carves one file set into the first N images for training and the
rest for evaluation: the training files' images, or the test files' when there are no training images
(as in ../shared/data/mnist, which holds only the 10,000 MNIST test images).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import download
from jaxnorm.imagefolder import ImageFolderError, is_image_folder, read_image_folder
from jaxnorm.utils import quiet_absl

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
_CIFAR_BIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
_CIFAR_PY_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

OFFLINE_HELP = ("download the official archive (https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz "
                "or cifar-10-python.tar.gz) on a machine with internet and pass it with --data-dir PATH, "
                "or set JAXNORM_CIFAR10_URL to a mirror")

MNIST_CLASSES = tuple(str(d) for d in range(10))
MNIST_OFFLINE_HELP = ("download the official idx files (train-images-idx3-ubyte.gz, "
                      "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) "
                      "on a machine with internet and pass their folder with --data-dir PATH, "
                      "or set JAXNORM_MNIST_URL to a mirror folder")
# The datasets with official files (downloaded by `jaxnorm.download`, or prepared by TFDS):
# dataset -> (display name, class names, what to do offline)
TFDS_SOURCES = {"cifar10": ("CIFAR-10", CIFAR10_CLASSES, OFFLINE_HELP),
                "mnist": ("MNIST", MNIST_CLASSES, MNIST_OFFLINE_HELP)}


class DataError(RuntimeError):
    """Data that cannot be found or read; the command line prints its message as one line."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple
    source: str  # where it came from, for logs and reports
    copy: str = ""  # "JPEG": a lossy copy of a known dataset, reported as e.g. "CIFAR-10 (JPEG copy)"

    @property
    def image_shape(self) -> tuple:
        return tuple(self.train_images.shape[1:])

    def channel_stats(self) -> tuple[tuple, tuple]:
        """Per-channel mean and std of the training images, in [0, 1] units."""
        x = self.train_images.reshape(-1, self.train_images.shape[-1]).astype(np.float64) / 255.0
        return tuple(x.mean(0).tolist()), tuple(x.std(0).tolist())


def load_dataset(name: str, data_dir: str | None = None, *, train_split: int | None = None,
                 synthetic_size=(512, 256)) -> Dataset:
    """The dataset `name` as uint8 NHWC arrays; `train_split=N`: see `split_train_test`."""
    if data_dir is not None and not Path(data_dir).expanduser().exists():
        raise DataError(f"--data-dir {data_dir} does not exist")
    if name == "synthetic":
        data = synthetic_dataset(*synthetic_size)
    elif name == "cifar10":
        data = _load_cifar10(data_dir)
    elif name == "mnist":
        data = _load_mnist(data_dir)
    elif name == "folder":
        data = _load_folder(data_dir)
    else:
        raise DataError(f"unknown dataset {name!r}")
    check_dataset(data)
    if train_split:
        return split_train_test(data, train_split)
    if len(data.train_images) == 0:
        raise DataError(f"{data.source} has test images only (no training images file): pass --train-split N "
                        f"to train on the first N of its {len(data.test_images)} images and test on the rest")
    return data


def check_split(images: np.ndarray, labels: np.ndarray, num_classes: int, where: str) -> None:
    """DataError naming `where` unless images are (N, H, W, C) uint8 with N labels in [0, num_classes)."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"{where}: images must be (N, height, width, channels) uint8, "
                        f"got {images.shape} {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{where}: {len(images)} images but labels of shape {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(f"{where}: label {int(labels[bad[0]])} of image {int(bad[0])} "
                        f"is outside 0..{num_classes - 1} "
                        f"({len(bad)} such label{'s' if len(bad) > 1 else ''}): a damaged file?")


def check_dataset(data: Dataset) -> None:
    """Labels in range and counts consistent, for every source (the readers also check each file)."""
    n = len(data.class_names)
    check_split(data.train_images, data.train_labels, n, f"{data.source} (training set)")
    check_split(data.test_images, data.test_labels, n, f"{data.source} (test set)")
    if len(data.train_images) and data.train_images.shape[1:] != data.test_images.shape[1:]:
        raise DataError(f"{data.source}: training images are {data.train_images.shape[1:]} but test images "
                        f"{data.test_images.shape[1:]}")


def split_train_test(data: Dataset, num_train: int) -> Dataset:
    """The first `num_train` images of one file set as training data, the rest as test data.

    The file set is the training one, or the test one when there are no training images.
    """
    pool, which = ((data.train_images, data.train_labels), "train") if len(data.train_images) else \
        ((data.test_images, data.test_labels), "test")
    n = len(pool[0])
    if not 0 < num_train < n:
        raise DataError(f"--train-split {num_train} must be between 1 and {n - 1}: the {which} images of "
                        f"{data.source} number {n}")
    return dataclasses.replace(data, train_images=pool[0][:num_train], train_labels=pool[1][:num_train],
                               test_images=pool[0][num_train:], test_labels=pool[1][num_train:],
                               source=f"{data.source} [{which} images split: first {num_train} train, "
                                      f"last {n - num_train} test]")


def first_train_images(data: Dataset, num_train: int | None) -> Dataset:
    """Only the first `num_train` training images (None: all); the test set stays whole. Idempotent."""
    n = len(data.train_images)
    if num_train is None or num_train == n:
        return data
    if not 0 < num_train < n:
        raise DataError(f"--train-images {num_train} must be between 1 and the {n} training images "
                        f"of {data.source}")
    return dataclasses.replace(data, train_images=data.train_images[:num_train],
                               train_labels=data.train_labels[:num_train],
                               source=f"{data.source} [first {num_train} training images]")


def _load_cifar10(data_dir: str | None) -> Dataset:
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if is_image_folder(path):
            return read_folder_dataset(path, CIFAR10_CLASSES)
        local = find_cifar10_archive(path)
        if local is not None:
            return read_cifar10_archive(local)
        if path.is_file():
            raise DataError(f"{data_dir} is not a CIFAR-10 archive (expected cifar-10-binary.tar.gz or "
                            "cifar-10-python.tar.gz, or an image folder train/<class>/*, test/<class>/*)")
    return load_official("cifar10", data_dir)


def _load_folder(data_dir: str | None) -> Dataset:
    path = Path(data_dir).expanduser() if data_dir is not None else None
    if path is None or not is_image_folder(path):
        raise DataError(f"--dataset folder needs --data-dir naming a folder laid out as "
                        f"train/<class>/<image> and test/<class>/<image>, or a .tar/.tar.gz/.zip of one; "
                        f"{data_dir} is not")
    return read_folder_dataset(path)


def read_folder_dataset(path: Path, class_names: Sequence[str] | None = None) -> Dataset:
    """An image folder (see `jaxnorm.imagefolder`); labels follow `class_names` if given, else the sorted
    folder names."""
    try:
        found = read_image_folder(path, class_names)
    except ImageFolderError as e:
        raise DataError(str(e)) from None
    # Lossy files of a known dataset are a copy of it, not it: reports must say so.
    copy = "JPEG" if class_names is not None and "JPEG" in found["formats"] else ""
    return Dataset(*found["train"], *found["test"], class_names=found["class_names"], source=str(path),
                   copy=copy)


# ----------------------------------------------------------------------------------------------
# The official CIFAR-10 archives.


def find_cifar10_archive(path: Path) -> Path | None:
    """`path` itself or a CIFAR-10 archive or extracted batch folder directly inside it."""
    candidates = [path] if path.is_file() else [
        path, path / "cifar-10-batches-bin", path / "cifar-10-batches-py",
        path / "cifar-10-binary.tar.gz", path / "cifar-10-python.tar.gz"]
    for candidate in candidates:
        if candidate.is_file() and tarfile.is_tarfile(candidate):
            return candidate
        if candidate.is_dir() and (any((candidate / f).is_file() for f in _CIFAR_BIN_FILES) or
                                   any((candidate / f).is_file() for f in _CIFAR_PY_FILES)):
            return candidate
    return None


def read_cifar10_archive(path: Path) -> Dataset:
    """Read the official binary or python CIFAR-10 layout, from a .tar.gz or an extracted folder."""
    files = _read_archive_files(path)  # basename -> bytes
    if all(f in files for f in _CIFAR_BIN_FILES):
        batch_files = _CIFAR_BIN_FILES
        splits = [_parse_cifar_bin(files[f], f"{path}: {f}") for f in batch_files]
        meta = files.get("batches.meta.txt", b"").decode().split()
    elif all(f in files for f in _CIFAR_PY_FILES):
        batch_files = _CIFAR_PY_FILES
        splits = [_parse_cifar_py(files[f], f"{path}: {f}") for f in batch_files]
        meta = [n.decode() if isinstance(n, bytes) else n for n in
                _unpickle(files["batches.meta"]).get(b"label_names", [])] if "batches.meta" in files else []
    else:
        raise DataError(f"{path} is not a CIFAR-10 archive: it lacks data_batch_1..5 and test_batch")
    # Checked per file, so that a damaged label byte names its file.
    for name, (images, labels) in zip(batch_files, splits, strict=True):
        check_split(images, labels, 10, f"{path}: {name}")
    train_images = np.concatenate([s[0] for s in splits[:5]])
    train_labels = np.concatenate([s[1] for s in splits[:5]])
    names = tuple(meta) if len(meta) == 10 else CIFAR10_CLASSES
    return Dataset(train_images, train_labels, *splits[5], class_names=names, source=str(path))


def _read_archive_files(path: Path) -> dict:
    wanted = set(_CIFAR_BIN_FILES + _CIFAR_PY_FILES + ["batches.meta.txt", "batches.meta"])
    try:
        if path.is_dir():
            return {f: (path / f).read_bytes() for f in wanted if (path / f).is_file()}
        with tarfile.open(path) as tar:
            return {os.path.basename(m.name): tar.extractfile(m).read() for m in tar.getmembers()
                    if m.isfile() and os.path.basename(m.name) in wanted}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _parse_cifar_bin(raw: bytes, name: str):
    record = 1 + 32 * 32 * 3  # label byte, then R, G and B planes, row-major
    if len(raw) == 0 or len(raw) % record:
        raise DataError(f"{name} is not a CIFAR-10 binary batch ({len(raw)} bytes)")
    rows = np.frombuffer(raw, np.uint8).reshape(-1, record)
    images = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), rows[:, 0].astype(np.int32)


def _unpickle(raw: bytes) -> dict:
    try:
        return pickle.loads(raw, encoding="bytes")
    except Exception as e:  # a corrupt pickle can raise nearly anything
        raise DataError(f"cannot unpickle CIFAR-10 batch: {e}") from None


def _parse_cifar_py(raw: bytes, name: str):
    batch = _unpickle(raw)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{name} is not a CIFAR-10 python batch (no data and labels in it)")
    data = np.asarray(batch[b"data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{name}: data of shape {data.shape}, expected (N, 3072)")
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch[b"labels"], np.int32)


# ----------------------------------------------------------------------------------------------
# The official files without a local copy: a previous download, a prepared TFDS dataset, a download now.


def load_official(name: str, data_dir: str | None) -> Dataset:
    """`cifar10` or `mnist` from a previous download, else a prepared TFDS dataset, else downloaded now."""
    label, _, offline_help = TFDS_SOURCES[name]
    folder = download.cached(name, data_dir)
    if folder is None:
        prepared = load_prepared_tfds(name, data_dir)
        if prepared is not None:
            return prepared
        # The reader vets each file before it is kept: an unreadable one is never cached.
        check = read_idx if name == "mnist" else read_cifar10_archive
        try:
            folder = download.download(name, data_dir, check)
        except download.DownloadError as e:
            raise DataError(f"{label} is not in {download.data_root(data_dir)} and could not be downloaded "
                            f"({e}); {offline_help}") from None
    if name == "mnist":
        return read_mnist_idx(folder)
    return read_cifar10_archive(folder / download.OFFICIAL["cifar10"][0].name)


def load_prepared_tfds(name: str, data_dir: str | None) -> Dataset | None:
    """`name` as prepared by TFDS in the data root (array_record data source: no TensorFlow needed);
    None when there is none."""
    root = download.data_root(data_dir)
    if not (root / name).is_dir():  # TFDS keeps <root>/<name>/<version>/: skip its slow import
        return None
    try:
        import tensorflow_datasets as tfds  # heavy import, only on this path
    except ImportError:
        return None
    with quiet_absl():  # TFDS warns "Variant folder ... has no dataset_info.json" for a half-made folder
        if not tfds.builder(name, data_dir=str(root), file_format="array_record").is_prepared():
            return None
    try:
        sources = tfds.data_source(name, split=["train", "test"], data_dir=str(root), download=False,
                                   builder_kwargs={"file_format": "array_record"})
    except Exception as e:  # a half-prepared folder, another file format, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read the TFDS {name} prepared in {root} ({reason}); move it away to "
                        "download the official files instead") from None
    (train_x, train_y), (test_x, test_y) = [_source_to_arrays(s) for s in sources]
    return Dataset(train_x, train_y, test_x, test_y, TFDS_SOURCES[name][1], source=f"tfds:{name} ({root})")


def _source_to_arrays(source: Sequence[dict]):
    records = source.__getitems__(range(len(source))) if hasattr(source, "__getitems__") else list(source)
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return images, labels


# ----------------------------------------------------------------------------------------------
# MNIST: the official idx files.

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def _load_mnist(data_dir: str | None) -> Dataset:
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        folder = path.parent if path.is_file() else path
        if _find_idx(folder, _MNIST_FILES["test_images"]) or _find_idx(folder, _MNIST_FILES["train_images"]):
            return read_mnist_idx(folder)
        if is_image_folder(path):
            raise DataError(f"{data_dir} is an image folder, not the MNIST idx files: use --dataset folder")
        if path.is_file():
            raise DataError(f"{data_dir} is not an MNIST idx file (expected a folder holding "
                            "t10k-images-idx3-ubyte.gz and friends)")
    return load_official("mnist", data_dir)


def _find_idx(folder: Path, stem: str) -> Path | None:
    """`stem`, `stem.gz`, or the `train-images.idx3-ubyte` spelling some mirrors use."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """One idx file (gzipped or not) as an array: magic 0,0,dtype,ndim; big-endian int32 dims; data."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(f"{path} is truncated or corrupt: dims {dims} need "
                        f"{int(np.prod(dims)) * dtype.itemsize} bytes, found {len(raw) - start}")
    return np.frombuffer(raw, dtype, offset=start).reshape(dims)


def read_mnist_idx(folder: Path) -> Dataset:
    """MNIST from a folder of the official idx files. The training pair is optional (0 images without
    it); the test pair is required."""
    folder = Path(folder)

    def pair(split):
        images_path = _find_idx(folder, _MNIST_FILES[f"{split}_images"])
        labels_path = _find_idx(folder, _MNIST_FILES[f"{split}_labels"])
        if images_path is None:
            return None
        if labels_path is None:
            raise DataError(f"{folder} has {images_path.name} but no {_MNIST_FILES[f'{split}_labels']}(.gz)")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{images_path.name} {images.shape} and {labels_path.name} {labels.shape} "
                            "are not a matching image/label pair")
        images, labels = images.astype(np.uint8)[..., None], labels.astype(np.int32)
        check_split(images, labels, len(MNIST_CLASSES), str(labels_path))
        return images, labels

    test = pair("test")
    if test is None:
        raise DataError(f"{folder} has no {_MNIST_FILES['test_images']}(.gz)")
    train = pair("train") or (np.zeros((0, *test[0].shape[1:]), np.uint8), np.zeros((0,), np.int32))
    return Dataset(*train, *test, class_names=MNIST_CLASSES, source=str(folder))


# ----------------------------------------------------------------------------------------------
# Synthetic data: each class a colour tint plus noise, so a few steps of training make progress.


def synthetic_dataset(num_train: int = 512, num_test: int = 256, image_shape=(32, 32, 3),
                      num_classes: int = 10, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    tints = rng.uniform(40, 215, size=(num_classes, 1, 1, image_shape[-1]))

    def make(n):
        labels = rng.integers(0, num_classes, n).astype(np.int32)
        noise = rng.normal(0, 40, size=(n, *image_shape))
        return np.clip(tints[labels] + noise, 0, 255).astype(np.uint8), labels

    return Dataset(*make(num_train), *make(num_test), tuple(f"class{i}" for i in range(num_classes)),
                   source="synthetic")


# ----------------------------------------------------------------------------------------------
# Augmentation, inside the compiled step.


def augment(images: jax.Array, key: jax.Array, *, flip: bool = True, flip_mask: jax.Array | None = None,
            rotate_degrees: float = 0.0, crop_padding: int = 0, cutout: int = 0) -> jax.Array:
    """Random horizontal flip (then rotation, then pad-and-crop, then cutout) of an NHWC batch, one draw
    per image. `flip_mask` (one bool per image): mirror exactly those instead of drawing
    (`alternating_flips`)."""
    flip_key, crop_key = jax.random.split(key)
    if flip:
        if flip_mask is None:
            do_flip = jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1))
        else:
            do_flip = flip_mask.reshape(-1, 1, 1, 1)
        images = jnp.where(do_flip, images[:, :, ::-1, :], images)
    if rotate_degrees:  # its own key, folded in: flips and crops draw as they did before rotations existed
        angles = jax.random.uniform(jax.random.fold_in(key, 2), (images.shape[0],),
                                    minval=-rotate_degrees, maxval=rotate_degrees)
        images = rotate(images, angles)
    if crop_padding:
        n, h, w, _ = images.shape
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
        offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1)
        images = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1])))(
            padded, offsets)
    if cutout:
        images = cut_out(images, jax.random.fold_in(key, 3), cutout)
    return images


def cut_out(images: jax.Array, key: jax.Array, size: int) -> jax.Array:
    """Cutout (DeVries and Taylor 2017): a size x size square of each NHWC image, centred anywhere in it
    and clipped at its edges, filled with the batch's mean colour (about 0 after the model's input
    normalisation, as in the paper)."""
    n, h, w, _ = images.shape
    top_left = jax.random.randint(key, (n, 2, 1, 1), 0, jnp.array([h, w])[:, None, None]) - size // 2
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    square = ((rows >= top_left[:, 0]) & (rows < top_left[:, 0] + size)
              & (cols >= top_left[:, 1]) & (cols < top_left[:, 1] + size))
    fill = jnp.mean(images, axis=(0, 1, 2), dtype=jnp.float32).astype(images.dtype)
    return jnp.where(square[..., None], fill, images)


def alternating_flips(key: jax.Array, num_images: int, indices: jax.Array, epoch) -> jax.Array:
    """Which of the training images `indices` to mirror in `epoch`, as airbench does: a random half in
    epoch 0, drawn once per image from `key`, then each image the other way round in every next epoch.
    Any two epochs in a row then show every image both ways, where fresh coins show a quarter of them
    one way only."""
    first = jax.random.bernoulli(key, 0.5, (num_images,))
    return first[indices] ^ (epoch % 2 == 1)


def rotate(images: jax.Array, degrees: jax.Array) -> jax.Array:
    """Each NHWC image rotated anticlockwise by its angle about its centre, bilinear; pixels from
    outside the image take the nearest edge pixel's value (background, for digits)."""
    _, h, w, _ = images.shape
    rows, cols = jnp.meshgrid(jnp.arange(h) - (h - 1) / 2, jnp.arange(w) - (w - 1) / 2, indexing="ij")

    def one(image, angle):
        # Inverse mapping: each output pixel reads the input at its position turned back (rows grow
        # downwards; at 90 degrees output (r, c) reads input (c, -r), as np.rot90 does).
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        source = (cos * rows + sin * cols + (h - 1) / 2, -sin * rows + cos * cols + (w - 1) / 2)
        channel = lambda c: jax.scipy.ndimage.map_coordinates(c, source, order=1, mode="nearest")  # noqa: E731
        return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)

    out = jax.vmap(one)(images.astype(jnp.float32), jnp.deg2rad(degrees))
    return (jnp.round(out) if jnp.issubdtype(images.dtype, jnp.integer) else out).astype(images.dtype)

"""Image-folder datasets: train/<class>/*, test/<class>/* as a folder, .tar, .tar.gz or .zip."""

import io
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from jaxnorm.cli import run_main
from jaxnorm.data import CIFAR10_CLASSES, DataError, load_dataset

JPEG_COPY = SHARED_DATA / "cifar10-jpeg" / "cifar-10-jpeg.tar.gz"


def _image(seed, size=(8, 8), mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _make_folder(root, counts, *, ext="png", mode="RGB", test_counts=None):
    """root/train/<class>/NN.ext with counts[class] images (and test/ with test_counts or 2 each);
    returns {(split, class, index): pixels as written}."""
    written = {}
    for split, per_class in (("train", counts), ("test", test_counts or {c: 2 for c in counts})):
        for c, n in per_class.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = _image(zlib.crc32(f"{root.name}/{split}/{c}/{i}".encode()), mode=mode)
                image.save(root / split / c / f"{i:02d}.{ext}")
                written[split, c, i] = np.asarray(image)
    return written


def test_png_folder_reads_exact_pixels_with_sorted_names_and_interleaved_classes(tmp_path):
    written = _make_folder(tmp_path, {"zebra": 2, "ant": 4})
    data = load_dataset("folder", str(tmp_path))
    assert data.class_names == ("ant", "zebra")  # sorted folder names are the labels
    assert data.train_images.shape == (6, 8, 8, 3) and data.train_images.dtype == np.uint8
    # Each class spread in proportion over the order (ant .125 .375 .625 .875, zebra .25 .75).
    np.testing.assert_array_equal(data.train_labels, [0, 1, 0, 0, 1, 0])
    expected = [written["train", "ant", 0], written["train", "zebra", 0], written["train", "ant", 1],
                written["train", "ant", 2], written["train", "zebra", 1], written["train", "ant", 3]]
    np.testing.assert_array_equal(data.train_images, np.stack(expected))  # PNG: lossless
    assert data.test_images.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(data.test_labels, [0, 1, 0, 1])


def test_greyscale_stays_one_channel_and_mixed_modes_become_rgb(tmp_path):
    _make_folder(tmp_path / "grey", {"a": 2, "b": 2}, mode="L")
    grey = load_dataset("folder", str(tmp_path / "grey"))
    assert grey.image_shape == (8, 8, 1)
    written = _make_folder(tmp_path / "mixed", {"a": 2, "b": 2}, mode="L")
    _image(7).save(tmp_path / "mixed" / "test" / "b" / "99.png")  # one colour image
    mixed = load_dataset("folder", str(tmp_path / "mixed"))
    assert mixed.image_shape == (8, 8, 3)
    first = mixed.train_images[0]  # train/a/00.png, greyscale repeated into R, G and B
    np.testing.assert_array_equal(first, np.repeat(written["train", "a", 0][..., None], 3, -1))


def _archive(folder, path, top="my-data"):
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as z:
            for f in files:
                z.write(f, f"{top}/{f.relative_to(folder).as_posix()}")
    else:
        with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
            tar.add(folder, arcname=top)
    return path


@pytest.mark.parametrize("name", ["data.tar.gz", "data.tar", "data.zip"])
def test_archives_with_a_top_folder_read_as_the_folder_does(tmp_path, name):
    _make_folder(tmp_path / "src", {"cat": 3, "dog": 2}, ext="jpg")
    (tmp_path / "src" / "README.txt").write_text("ignored: not under train/ or test/")
    (tmp_path / "src" / "train" / "cat" / ".DS_Store").write_bytes(b"hidden files are skipped")
    folder = load_dataset("folder", str(tmp_path / "src"))
    packed = load_dataset("folder", str(_archive(tmp_path / "src", tmp_path / name)))
    assert packed.class_names == ("cat", "dog")
    np.testing.assert_array_equal(packed.train_images, folder.train_images)
    np.testing.assert_array_equal(packed.train_labels, folder.train_labels)
    np.testing.assert_array_equal(packed.test_images, folder.test_images)


def test_cifar10_reads_a_folder_with_its_ten_class_names_in_cifar_order(tmp_path):
    reversed_names = {c: 1 for c in reversed(CIFAR10_CLASSES)}
    written = _make_folder(tmp_path / "src", reversed_names, ext="png", test_counts=reversed_names)
    data = load_dataset("cifar10", str(_archive(tmp_path / "src", tmp_path / "c.zip")))
    assert data.class_names == CIFAR10_CLASSES
    np.testing.assert_array_equal(data.train_labels, np.arange(10))
    np.testing.assert_array_equal(data.train_images[3], written["train", "cat", 0])  # cat is label 3
    assert data.copy == ""  # PNG is lossless: these are the images themselves
    _make_folder(tmp_path / "other", {"cat": 1, "dog": 1})
    with pytest.raises(DataError, match="not the expected 10 .*use --dataset folder"):
        load_dataset("cifar10", str(tmp_path / "other"))


def test_the_last_conv_follows_the_class_count_through_training_and_restore(tmp_path, tiny_config):
    from jaxnorm.evaluate import dataset_for_run, evaluate_run, restore_run
    from jaxnorm.train import train_and_evaluate

    _make_folder(tmp_path / "data", {"a": 12, "b": 12, "c": 8}, test_counts={"a": 3, "b": 3, "c": 3})
    config = tiny_config.replace(dataset="folder", data_dir=str(tmp_path / "data"), epochs=1, batch_size=8)
    result = train_and_evaluate(config, tmp_path / "run", progress=False)
    assert result["state"].params["c10"]["kernel"].shape[-1] == 3
    run = restore_run(tmp_path / "run")  # rebuilds the model from the saved class names
    metrics = evaluate_run(run, dataset_for_run(run))
    assert metrics["test_logits"].shape == (9, 3)


def _one_line_error(capsys, data_dir, dataset="folder"):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: load_dataset(dataset, str(data_dir)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_folders_fail_in_one_line_naming_the_file_or_class(tmp_path, capsys):
    sizes = tmp_path / "sizes"
    _make_folder(sizes, {"a": 2, "b": 2})
    _image(1, size=(8, 6)).save(sizes / "test" / "b" / "05.png")
    assert "test/b/05.png is 8x6 but train/a/00.png is 8x8" in _one_line_error(capsys, sizes)

    missing = tmp_path / "missing"
    _make_folder(missing, {"a": 2, "b": 2}, test_counts={"a": 2})
    assert "class 'b' has a folder in train/ but none in test/" in _one_line_error(capsys, missing)

    empty = tmp_path / "empty"
    _make_folder(empty, {"a": 2, "b": 2})
    (empty / "train" / "c").mkdir()
    (empty / "test" / "c").mkdir()
    assert "class folder train/c" in _one_line_error(capsys, empty)
    _archive(empty, tmp_path / "empty.tar")  # an archive keeps the empty folders as members
    assert "class folder train/c" in _one_line_error(capsys, tmp_path / "empty.tar")

    not_image = tmp_path / "not_image"
    _make_folder(not_image, {"a": 2, "b": 2})
    (not_image / "train" / "a" / "notes.txt").write_text("not an image")
    assert "train/a/notes.txt is not an image" in _one_line_error(capsys, not_image)

    truncated = tmp_path / "truncated"
    _make_folder(truncated, {"a": 2, "b": 2}, ext="jpg")
    jpeg = truncated / "test" / "a" / "01.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:60])
    assert "test/a/01.jpg" in _one_line_error(capsys, truncated)

    assert "--dataset folder needs --data-dir" in _one_line_error(capsys, tmp_path / "sizes" / "train")


def test_shared_jpeg_copy_of_cifar10_loads_whole():
    if not JPEG_COPY.is_file():
        pytest.skip(f"{JPEG_COPY} not present")
    data = load_dataset("cifar10", str(JPEG_COPY))
    assert data.train_images.shape == (50_000, 32, 32, 3) and data.test_images.shape == (10_000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(data.train_labels), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(data.test_labels), [1000] * 10)
    with tarfile.open(JPEG_COPY) as tar:  # the first cat of the training files, decoded directly
        cat = np.asarray(Image.open(io.BytesIO(tar.extractfile("cifar-10-jpeg/train/cat/0000.jpg").read())))
    assert cat.shape == (32, 32, 3)
    np.testing.assert_array_equal(data.train_images[3], cat)  # classes interleave: label 3 comes fourth
    # --train-split 45000 keeps 4,500 of each class for training and 500 of each for validation.
    np.testing.assert_array_equal(np.bincount(data.train_labels[45_000:]), [500] * 10)
    assert data.copy == "JPEG"


def test_jpeg_files_of_a_known_dataset_are_named_a_copy_in_reports(tmp_path):
    from jaxnorm.data import split_train_test
    from jaxnorm.study import data_title, dataset_name, describe_data
    names = {c: 1 for c in CIFAR10_CLASSES}
    _make_folder(tmp_path / "jpeg", names, ext="jpg", test_counts=names)
    data = load_dataset("cifar10", str(tmp_path / "jpeg"))
    assert data.copy == "JPEG" and data_title("cifar10", data) == "CIFAR-10 (JPEG copy)"
    assert dataset_name("cifar10", data) == "cifar10-jpeg-subset-10"
    assert ("**10-image CIFAR-10 (JPEG copy) subset, not CIFAR-10 (JPEG copy)**"
            in describe_data("cifar10", data))
    assert split_train_test(data, 6).copy == "JPEG"  # a validation split is still the copy
    # --dataset folder: the files are the dataset, whatever their format.
    folder = load_dataset("folder", str(tmp_path / "jpeg"))
    assert folder.copy == "" and data_title("folder", folder) == "image folder"

"""Image-folder datasets: `train/<class>/*` and `test/<class>/*`, in a folder or a .tar, .tar.gz or .zip.

One top-level folder around train/ and test/ is allowed (`cifar-10-jpeg/train/cat/0000.jpg`). Images
(JPEG, PNG or anything else Pillow reads) are decoded into uint8 NHWC arrays: one channel when every
image is greyscale, else RGB (greyscale images repeated to three channels, alpha dropped). Files and
folders whose names start with "." and a zip's `__MACOSX/` are skipped; files outside train/ and test/
(a README) are ignored.

Order: within a class, files sorted by name; the classes are then interleaved in proportion to their
sizes, so that the first N images of a split hold every class in its share (`--train-split 45000` on
CIFAR-10 keeps 4,500 images of each class for training and 500 of each for validation).
"""

from __future__ import annotations

import io
import itertools
import os
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPLITS = ("train", "test")
PEEK = 16  # an archive whose first members include train/ or test/ is taken for an image folder


class ImageFolderError(ValueError):
    """An image folder that cannot be read; the message names the file or class, in one line."""


def is_image_folder(path: Path) -> bool:
    """Whether `path` is laid out as train/<class>/* and test/<class>/* (folder or archive)."""
    path = Path(path)
    if path.is_dir():
        return _split_root(path) is not None
    if not path.is_file():
        return False
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()[:PEEK]
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:  # the first members only: a .tar.gz streams
                names = [m.name for m in itertools.islice(tar, PEEK)]
        else:
            return False
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile):
        return False
    return any(_visible(n) and _relative(n) is not None for n in names)


def read_image_folder(path: Path, class_names: Sequence[str] | None = None) -> dict:
    """{'train': (images, labels), 'test': (images, labels), 'class_names': tuple, 'formats': set of
    Pillow format names ('JPEG', 'PNG', ...)}.

    Labels follow `class_names` when given (the class folders must be exactly those names), else the
    sorted folder names.
    """
    path = Path(path)
    files, classes = _list(path)  # {split: {class: {name: bytes}}}, {split: set of class folders}
    for split in SPLITS:
        if not classes[split]:
            raise ImageFolderError(f"{path} has no class folders in {split}/ "
                                   f"(expected {split}/<class>/<image>)")
    for a, b in (("train", "test"), ("test", "train")):
        missing = sorted(classes[a] - classes[b])
        if missing:
            raise ImageFolderError(f"class {missing[0]!r} has a folder in {a}/ but none in {b}/ of {path}")
    found = sorted(classes["train"])
    if class_names is not None and sorted(class_names) != found:
        raise ImageFolderError(f"the class folders of {path} ({', '.join(found)}) are not the expected "
                               f"{len(class_names)} ({', '.join(class_names)}): use --dataset folder")
    names = tuple(class_names) if class_names is not None else tuple(found)
    for split in SPLITS:
        for c in names:
            if not files[split].get(c):
                raise ImageFolderError(f"class folder {split}/{c} of {path} holds no images")

    out, reference = {"class_names": names, "formats": set()}, None
    for split in SPLITS:
        order = _interleave([[(label, f"{split}/{c}/{name}", files[split][c][name])
                              for name in sorted(files[split][c])] for label, c in enumerate(names)])
        images = []
        for _, rel, data in order:
            image, fmt = _decode(data, rel)
            out["formats"].add(fmt)
            reference = reference or (rel, image.shape[:2])
            if image.shape[:2] != reference[1]:
                raise ImageFolderError(f"{rel} is {_size(image.shape)} but {reference[0]} is "
                                       f"{_size(reference[1])}: every image must have the same size")
            images.append(image)
        out[split] = (images, np.array([label for label, _, _ in order], np.int32))
    rgb = any(im.ndim == 3 for split in SPLITS for im in out[split][0])
    for split in SPLITS:
        images, labels = out[split]
        out[split] = (np.stack([_channels(im, rgb) for im in images]), labels)
    return out


# ----------------------------------------------------------------------------------------------
# Listing: every source becomes {split: {class: {file name: bytes}}}, read in one pass (the 60,000
# CIFAR-10 JPEGs are 90 MB).


def _parts(name: str) -> list:
    return [p for p in name.split("/") if p and p != "."]  # str.split: pathlib is slow for 60,000 names


def _visible(name: str) -> bool:
    return not any(p.startswith(".") or p == "__MACOSX" for p in _parts(name))


def _relative(name: str) -> list | None:
    """(split, class, file) parts of an archive member, the optional top folder removed; None if the
    path is not under train/ or test/ at all."""
    parts = _parts(name)
    if parts and parts[0] not in SPLITS:
        parts = parts[1:]  # the one top-level folder
    if not parts or parts[0] not in SPLITS:
        return None
    return parts


def _split_root(folder: Path) -> Path | None:
    """`folder` if it holds train/ and test/, or its only sub-folder if that one does."""
    if all((folder / s).is_dir() for s in SPLITS):
        return folder
    subfolders = [p for p in folder.iterdir() if p.is_dir() and _visible(p.name)]
    if len(subfolders) == 1 and all((subfolders[0] / s).is_dir() for s in SPLITS):
        return subfolders[0]
    return None


def _list(path: Path):
    members = []  # (posix path relative to the archive or folder, bytes); None for a directory
    try:
        if path.is_dir():
            root = _split_root(path)
            for split in SPLITS:
                for dirpath, dirnames, filenames in os.walk(root / split):
                    dirnames[:] = [d for d in dirnames if _visible(d)]  # no descent into .git and the like
                    rel = Path(dirpath).relative_to(root).as_posix()
                    members += [(f"{rel}/{d}/", None) for d in dirnames]
                    members += [(f"{rel}/{f}", (Path(dirpath) / f).read_bytes())
                                for f in filenames if _visible(f)]
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                members = [(n, None if n.endswith("/") else z.read(n)) for n in z.namelist() if _visible(n)]
        else:
            with tarfile.open(path) as tar:  # a .tar.gz streams: one pass
                for m in tar:
                    if m.isdir():
                        members.append((m.name + "/", None))
                    elif m.isfile() and _visible(m.name):
                        members.append((m.name, tar.extractfile(m).read()))
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise ImageFolderError(f"cannot read {path}: {e}") from None

    members = [(name, data) for name, data in members if _visible(name)]
    tops = {parts[0] for parts in (_parts(n) for n, _ in members)
            if len(parts) > 1 and parts[0] not in SPLITS and parts[1] in SPLITS}
    if len(tops) > 1:
        raise ImageFolderError(f"{path} has train/ and test/ in several top-level folders "
                               f"({', '.join(sorted(tops))}): keep one")
    files = {s: {} for s in SPLITS}
    classes = {s: set() for s in SPLITS}
    for name, data in members:
        parts = _relative(name)
        if parts is None:
            continue  # a README or licence beside train/ and test/
        split = parts[0]
        if data is None:  # a directory: records empty class folders too
            if len(parts) == 2:
                classes[split].add(parts[1])
            continue
        if len(parts) != 3:
            raise ImageFolderError(f"{'/'.join(parts)} in {path} is not at {split}/<class>/<image>")
        classes[split].add(parts[1])
        files[split].setdefault(parts[1], {})[parts[2]] = data
    return files, classes


def _interleave(groups: list[list]) -> list:
    """Merge per-class lists so that every prefix holds each class in proportion to its size."""
    keyed = [((i + 0.5) / len(g), c, item) for c, g in enumerate(groups) for i, item in enumerate(g)]
    return [item for _, _, item in sorted(keyed, key=lambda k: (k[0], k[1]))]


# ----------------------------------------------------------------------------------------------
# Decoding.


def _decode(data: bytes, rel: str) -> tuple[np.ndarray, str]:
    """(H, W) uint8 for a greyscale image, (H, W, 3) for any other; and the file's format ("JPEG")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = "L" if image.mode in ("1", "L", "LA") else "RGB"
            return np.asarray(image if image.mode == mode else image.convert(mode), np.uint8), image.format
    except UnidentifiedImageError:
        raise ImageFolderError(f"{rel} is not an image (Pillow cannot identify it)") from None
    except Exception as e:  # a truncated or corrupt image can raise nearly anything
        raise ImageFolderError(f"{rel} cannot be decoded: {e}") from None


def _channels(image: np.ndarray, rgb: bool) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1) if rgb else image[..., None]
    return image


def _size(shape) -> str:
    return f"{shape[1]}x{shape[0]}"  # width x height, as image viewers say it

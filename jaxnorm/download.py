"""Download the official CIFAR-10 and MNIST files with pooch: no TensorFlow, no retries.

TFDS can read a prepared dataset without TensorFlow, but preparing cifar10 or mnist encodes every image
with TensorFlow, and its download manager retries a dead connection for minutes. So the official
files are fetched here with `pooch.retrieve`, checked against their published sha256 (the values TFDS
itself registers), and kept in `<root>/jaxnorm-downloads/<dataset>/`, where <root> is `--data-dir`,
`$TFDS_DATA_DIR` or ~/tensorflow_datasets. The readers in `jaxnorm.data` then read them as any local copy.

A file is kept under its final name only after its checksum and the caller's reader (`check`) have
accepted it: a file at its final name is trusted and needs no network. Anything that fails is removed.

Mirrors: `JAXNORM_CIFAR10_URL` (the archive's URL), `JAXNORM_MNIST_URL` (the folder holding the four
files); http://, https:// or file://. A mirror may legitimately serve other bytes (MNIST mirrors often
re-gzip the files), so with a mirror the published checksums are not used: `JAXNORM_CIFAR10_SHA256`
(one sha256) and `JAXNORM_MNIST_SHA256` (`sha256sum` output: "<sha256>  <file name>" for each of the
four files) are the checksums checked when set, with or without a mirror.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pooch
import requests  # pooch's HTTP client: its exceptions are what a failed download raises

CACHE_FOLDER = "jaxnorm-downloads"
URL_SCHEMES = ("http", "https", "file")

# pooch's INFO lines advise on `pooch.retrieve`'s own arguments; the line printed here names the URL.
pooch.get_logger().setLevel(logging.WARNING)


class DownloadError(RuntimeError):
    """A download that failed; the message is one line saying why."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    name: str  # file name in the cache folder
    url: str
    sha256: str | None  # None: not checked (a mirror without a checksum given)


# From tensorflow_datasets/url_checksums/{cifar10,mnist}.txt (tensorflow-datasets 4.9.10): the URLs TFDS's
# builders download and the sha256 it checks them against. MNIST: the CVDF mirror of yann.lecun.com that
# TFDS uses (the original site no longer serves the files reliably).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
OFFICIAL = {
    "cifar10": (RemoteFile("cifar-10-binary.tar.gz", CIFAR10_URL,
                           "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),),
    "mnist": tuple(RemoteFile(name, MNIST_URL + name, sha) for name, sha in (
        ("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        ("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        ("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"))),
}
MIRROR_VARIABLES = {"cifar10": ("JAXNORM_CIFAR10_URL", "JAXNORM_CIFAR10_SHA256"),
                    "mnist": ("JAXNORM_MNIST_URL", "JAXNORM_MNIST_SHA256")}


def data_root(data_dir: str | None) -> Path:
    """`--data-dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def cache_folder(dataset: str, data_dir: str | None) -> Path:
    return data_root(data_dir) / CACHE_FOLDER / dataset


def remote_files(dataset: str) -> tuple[RemoteFile, ...]:
    """The files of `dataset`, from the mirror and with the checksums the environment names, if any."""
    url_var, sha_var = MIRROR_VARIABLES[dataset]
    mirror, sha_text = os.environ.get(url_var, "").strip(), os.environ.get(sha_var, "").strip()
    files = OFFICIAL[dataset]
    if mirror:
        if urllib.parse.urlparse(mirror).scheme not in URL_SCHEMES:
            raise DownloadError(f"{url_var}: {mirror[:200]!r} is not an http://, https:// or file:// URL")
        if dataset == "cifar10":  # the archive's URL
            files = (RemoteFile(files[0].name, mirror, sha256=None),)
        else:  # the folder holding the files; its trailing slash is optional
            folder = mirror if mirror.endswith("/") else mirror + "/"
            files = tuple(RemoteFile(f.name, urllib.parse.urljoin(folder, f.name), None) for f in files)
    if sha_text:
        sums = _parse_checksums(dataset, sha_text, sha_var)
        files = tuple(dataclasses.replace(f, sha256=sums[f.name]) for f in files)
    return files


def _parse_checksums(dataset: str, text: str, variable: str) -> dict:
    if dataset == "cifar10":  # one digest
        sums = {OFFICIAL["cifar10"][0].name: text.lower()}
    else:
        words = text.split()  # sha256sum output: "<digest> [*]<name>" per line
        pairs = zip(words[::2], words[1::2], strict=False)  # an odd count is reported below
        sums = {name.lstrip("*"): digest.lower() for digest, name in pairs}
        missing = [f.name for f in OFFICIAL[dataset] if f.name not in sums]
        if len(words) % 2 or missing:
            raise DownloadError(f"{variable} must be sha256sum output naming all four files; it lacks "
                                f"{', '.join(missing) or 'a file name'}")
    bad = [d for d in sums.values() if not re.fullmatch("[0-9a-f]{64}", d)]
    if bad:
        raise DownloadError(f"{variable}: {bad[0][:80]!r} is not a sha256 (64 hex digits)")
    return sums


def cached(dataset: str, data_dir: str | None) -> Path | None:
    """The cache folder if every file of `dataset` is in it (files there were verified when they came)."""
    folder = cache_folder(dataset, data_dir)
    return folder if all((folder / f.name).is_file() for f in OFFICIAL[dataset]) else None


def download(dataset: str, data_dir: str | None, check: Callable[[Path], object]) -> Path:
    """Fetch the files of `dataset` that are not cached yet; returns the cache folder.

    `check(path)` reads a downloaded file and raises if it is unreadable; the file is kept only if it passes.
    """
    files = remote_files(dataset)  # a malformed mirror variable fails before anything is created
    folder = cache_folder(dataset, data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {folder}: {e.strerror or e}") from None
    for remote in files:
        if not (folder / remote.name).is_file():
            fetch(remote, folder, check)
    return folder


def fetch(remote: RemoteFile, folder: Path, check: Callable[[Path], object] = lambda path: None) -> Path:
    """Download `remote` into `folder`, under its final name once its checksum and `check` accept it."""
    # pooch renames its download into place once the checksum matches; the reader's check comes after
    # that, so pooch writes to a staging name and the file is renamed only when the reader accepts it too.
    staging, final = folder / f"{remote.name}.part", folder / remote.name
    try:
        staging.unlink(missing_ok=True)  # a leftover there would count, for pooch, as already downloaded
        print(f"downloading {remote.url} into {folder}", file=sys.stderr)
        _retrieve(remote, staging)
        try:
            check(staging)
        except Exception as e:  # the reader's own error, whatever its type
            raise DownloadError(f"the file downloaded from {remote.url} cannot be read ({e}); "
                                "it was removed") from None
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o666 & ~umask)  # pooch's temporary file is 0600: it would hide a shared data folder
        os.replace(staging, final)
    finally:
        staging.unlink(missing_ok=True)  # after a failure, or an interrupt: nothing half-written stays
    return final


def _retrieve(remote: RemoteFile, dest: Path) -> None:
    """`pooch.retrieve` of `remote` into `dest`, its exceptions turned into one-line DownloadErrors."""
    known_hash = f"sha256:{remote.sha256}" if remote.sha256 else None
    try:
        pooch.retrieve(remote.url, known_hash=known_hash, fname=dest.name, path=dest.parent,
                       downloader=_downloader(remote.url))
    except requests.HTTPError as e:
        raise DownloadError(f"cannot download {remote.url}: HTTP {e.response.status_code} "
                            f"{e.response.reason}") from None
    except requests.exceptions.ChunkedEncodingError as e:  # the connection closed before Content-Length
        raise DownloadError(f"the download of {remote.url} was cut short ({_innermost_reason(e)})") from None
    except requests.RequestException as e:  # DNS failure, refused connection, timeout
        raise DownloadError(f"cannot download {remote.url}: {_innermost_reason(e)} (no network?)") from None
    except OSError as e:  # a missing file:// path, or the cache's disk
        raise DownloadError(f"cannot download {remote.url}: {e.strerror or e}") from None
    except ValueError:  # pooch's checksum mismatch (the URL's scheme was checked before): file deleted
        raise DownloadError(f"checksum mismatch for {remote.url}: its sha256 is not the expected "
                            f"{remote.sha256}; the download was removed") from None


def _downloader(url: str) -> Callable:
    if url.startswith("file:"):
        return _copy_local_file
    # pooch's default 1 KiB chunks cost six times the CPU time of 1 MiB ones.
    return pooch.HTTPDownloader(progressbar=True, chunk_size=1 << 20)


def _copy_local_file(url: str, output_file: str, pooch_instance: object) -> None:
    """A pooch downloader for file:// URLs (a mirror on a local or mounted disk), which pooch lacks."""
    shutil.copyfile(urllib.request.url2pathname(urllib.parse.urlparse(url).path), output_file)


def _innermost_reason(e: BaseException) -> str:
    """The first line of the innermost exception's message: requests wraps urllib3's, which wraps the
    socket's ("Connection refused", "IncompleteRead(... bytes read, ... more expected)")."""
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return reason.strip().splitlines()[0]

"""Download the official CIFAR-10 and MNIST files with the standard library: no TensorFlow, no retries.

TFDS can read a prepared dataset without TensorFlow, but preparing cifar10 or mnist encodes every image
with TensorFlow, and its download manager retries a dead connection for minutes. So the official
files are fetched here, checked against their published size and sha256 (the values TFDS itself
registers), and kept in `<root>/jaxnorm-downloads/<dataset>/`, where <root> is `--data-dir`,
`$TFDS_DATA_DIR` or ~/tensorflow_datasets. The readers in `jaxnorm.data` then read them as any local copy.

A file is written under a temporary name and renamed into place only after its size, its checksum and
the caller's reader (`check`) have accepted it: a file at its final name is trusted and needs no
network. Anything that fails is removed.

Mirrors: `JAXNORM_CIFAR10_URL` (the archive's URL), `JAXNORM_MNIST_URL` (the folder holding the four
files). A mirror may legitimately serve other bytes (MNIST mirrors often re-gzip the files), so with a
mirror the published checksums are not used: `JAXNORM_CIFAR10_SHA256` (one sha256) and
`JAXNORM_MNIST_SHA256` (`sha256sum` output: "<sha256>  <file name>" for each of the four files) are the
checksums checked when set, with or without a mirror.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

TIMEOUT_S = 60  # per socket operation: a stalled server fails instead of hanging for ever
CACHE_FOLDER = "jaxnorm-downloads"


class DownloadError(RuntimeError):
    """A download that failed; the message is one line saying why."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    name: str  # file name in the cache folder
    url: str
    sha256: Optional[str]  # None: not checked (a mirror without a checksum given)
    size: Optional[int]  # the published size in bytes, None for a mirror


# From tensorflow_datasets/url_checksums/{cifar10,mnist}.txt (tensorflow-datasets 4.9.10): the URLs TFDS's
# builders download, and the sizes and sha256 it checks them against. MNIST: the CVDF mirror of
# yann.lecun.com that TFDS uses (the original site no longer serves the files reliably).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
OFFICIAL = {
    "cifar10": (RemoteFile("cifar-10-binary.tar.gz", CIFAR10_URL,
                           "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", 170052171),),
    "mnist": tuple(RemoteFile(name, MNIST_URL + name, sha, size) for name, sha, size in (
        ("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422),
        ("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881),
        ("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877),
        ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542))),
}
MIRROR_VARIABLES = {"cifar10": ("JAXNORM_CIFAR10_URL", "JAXNORM_CIFAR10_SHA256"),
                    "mnist": ("JAXNORM_MNIST_URL", "JAXNORM_MNIST_SHA256")}


def data_root(data_dir: Optional[str]) -> Path:
    """`--data-dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def cache_folder(dataset: str, data_dir: Optional[str]) -> Path:
    return data_root(data_dir) / CACHE_FOLDER / dataset


def remote_files(dataset: str) -> tuple[RemoteFile, ...]:
    """The files of `dataset`, from the mirror and with the checksums the environment names, if any."""
    url_var, sha_var = MIRROR_VARIABLES[dataset]
    mirror, sha_text = os.environ.get(url_var, "").strip(), os.environ.get(sha_var, "").strip()
    files = OFFICIAL[dataset]
    if mirror:
        folder = mirror if mirror.endswith("/") else mirror + "/"
        files = tuple(RemoteFile(f.name, mirror if dataset == "cifar10" else urllib.parse.urljoin(folder, f.name),
                                 None, None) for f in files)
    if sha_text:
        sums = _parse_checksums(dataset, sha_text, sha_var)
        files = tuple(dataclasses.replace(f, sha256=sums[f.name], size=None if mirror else f.size) for f in files)
    return files


def _parse_checksums(dataset: str, text: str, variable: str) -> dict:
    if dataset == "cifar10":  # one digest
        sums = {OFFICIAL["cifar10"][0].name: text.lower()}
    else:
        words = text.split()  # sha256sum output: "<digest> [*]<name>" per line
        sums = {name.lstrip("*"): digest.lower() for digest, name in zip(words[::2], words[1::2])}
        missing = [f.name for f in OFFICIAL[dataset] if f.name not in sums]
        if len(words) % 2 or missing:
            raise DownloadError(f"{variable} must be sha256sum output naming all four files; it lacks "
                                f"{', '.join(missing) or 'a file name'}")
    bad = [d for d in sums.values() if not re.fullmatch("[0-9a-f]{64}", d)]
    if bad:
        raise DownloadError(f"{variable}: {bad[0][:80]!r} is not a sha256 (64 hex digits)")
    return sums


def cached(dataset: str, data_dir: Optional[str]) -> Optional[Path]:
    """The cache folder if every file of `dataset` is in it (files there were verified when they came)."""
    folder = cache_folder(dataset, data_dir)
    return folder if all((folder / f.name).is_file() for f in OFFICIAL[dataset]) else None


def download(dataset: str, data_dir: Optional[str], check: Callable[[Path], object]) -> Path:
    """Fetch the files of `dataset` that are not cached yet; returns the cache folder.

    `check(path)` reads a downloaded file and raises if it is unreadable; it runs before the rename.
    """
    folder = cache_folder(dataset, data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {folder}: {e.strerror or e}") from None
    for remote in remote_files(dataset):
        if not (folder / remote.name).is_file():
            fetch(remote, folder / remote.name, check)
    return folder


def fetch(remote: RemoteFile, dest: Path, check: Callable[[Path], object] = lambda path: None) -> Path:
    """Download `remote` to `dest` through a temporary file that is renamed only once it is verified."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise DownloadError(f"cannot write to {dest.parent}: {e.strerror or e}") from None
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = _stream(remote, out)
        except OSError as e:  # network errors are DownloadErrors already: this is the disk
            raise DownloadError(f"cannot write {tmp}: {e.strerror or e}") from None
        if remote.size is not None and size != remote.size:
            raise DownloadError(f"the download of {remote.url} has {size} bytes, the published size is "
                                f"{remote.size}; it was removed")
        if remote.sha256 is not None and digest != remote.sha256:
            raise DownloadError(f"checksum mismatch for {remote.url}: sha256 {digest}, expected {remote.sha256}; "
                                "the download was removed")
        try:
            check(tmp)
        except Exception as e:  # the reader's own error, whatever its type
            raise DownloadError(f"the file downloaded from {remote.url} cannot be read ({e}); it was removed") from None
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 would hide a shared data folder from other users
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure, or an interrupt: nothing half-written stays
    return dest


def _stream(remote: RemoteFile, out) -> tuple[str, int]:
    """Copy the response body of `remote.url` into `out`; returns (sha256 hex, byte count)."""
    request = urllib.request.Request(remote.url, headers={"User-Agent": "jaxnorm"})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download {remote.url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:  # DNS failure, refused connection, a missing file:// path
        reason = getattr(e.reason, "strerror", None) or e.reason
        hint = " (no network?)" if remote.url.startswith(("http:", "https:")) else ""
        raise DownloadError(f"cannot download {remote.url}: {reason}{hint}") from None
    except (OSError, http.client.HTTPException) as e:  # a timeout while connecting
        raise DownloadError(f"cannot download {remote.url}: {e or type(e).__name__} (no network?)") from None
    sha, size = hashlib.sha256(), 0
    length = response.headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else remote.size
    with response, tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                        desc=f"downloading {remote.name}") as bar:
        while True:
            try:
                chunk = response.read(1 << 20)
            except (OSError, http.client.HTTPException) as e:  # reset or timed out mid-transfer
                raise DownloadError(f"the download of {remote.url} was cut short after {size} bytes "
                                    f"({e or type(e).__name__})") from None
            if not chunk:
                break
            out.write(chunk)
            sha.update(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    if length and length.isdigit() and size < int(length):
        raise DownloadError(f"the download of {remote.url} was cut short: {size} of {length} bytes")
    return sha.hexdigest(), size

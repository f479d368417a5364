"""The official files downloaded over HTTP, from a local server on 127.0.0.1 standing in for the internet."""

import gzip
import hashlib
import http.server
import json
import threading

import numpy as np
import pytest

from conftest import CIFAR_SUBSET, run_script
from jaxnorm import download
from jaxnorm.data import DataError, load_dataset

needs_subset = pytest.mark.skipif(not CIFAR_SUBSET.is_file(), reason=f"{CIFAR_SUBSET} not present")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))  # the whole length, even when cut short
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.path in self.server.cut else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """An HTTP server in a thread: `files` maps URL paths to bytes; paths in `cut` stop half-way."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.cut = {}, set()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """An empty $TFDS_DATA_DIR and no mirror variables from the environment."""
    for variables in download.MIRROR_VARIABLES.values():
        for v in variables:
            monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    return tmp_path / "tfds"


def _cache_files(root, dataset="cifar10"):
    folder = root / download.CACHE_FOLDER / dataset
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@needs_subset
def test_official_path_checks_the_published_checksum_then_reads_the_cache_offline(server, data_root,
                                                                                   monkeypatch):
    archive = CIFAR_SUBSET.read_bytes()
    server.files["/kriz/cifar-10-binary.tar.gz"] = archive
    official = download.RemoteFile("cifar-10-binary.tar.gz", server.url + "/kriz/cifar-10-binary.tar.gz",
                                   hashlib.sha256(archive).hexdigest())
    monkeypatch.setitem(download.OFFICIAL, "cifar10", (official,))  # the official URL, served locally
    first = load_dataset("cifar10")
    assert first.train_images.shape == (5085, 32, 32, 3) and first.test_images.shape == (1017, 32, 32, 3)
    np.testing.assert_array_equal(first.train_labels[:10], [6, 9, 9, 4, 1, 1, 2, 7, 8, 3])
    assert _cache_files(data_root) == ["cifar-10-binary.tar.gz"]  # no temporary file left
    server.shutdown()
    server.server_close()
    second = load_dataset("cifar10")  # no server now: the cached file
    assert second.source == first.source == str(data_root / download.CACHE_FOLDER / "cifar10" /
                                                 "cifar-10-binary.tar.gz")
    np.testing.assert_array_equal(second.test_images, first.test_images)


@needs_subset
def test_a_mirror_is_checked_only_against_the_checksum_it_is_given(server, data_root, monkeypatch):
    archive = CIFAR_SUBSET.read_bytes()
    server.files["/mirror/c10.tar.gz"] = archive
    monkeypatch.setenv("JAXNORM_CIFAR10_URL", server.url + "/mirror/c10.tar.gz")
    monkeypatch.setenv("JAXNORM_CIFAR10_SHA256", "0" * 64)
    with pytest.raises(DataError, match="checksum mismatch .* expected 0000.*the download was removed") as e:
        load_dataset("cifar10")
    assert "\n" not in str(e.value) and _cache_files(data_root) == []
    monkeypatch.setenv("JAXNORM_CIFAR10_SHA256", "c4a38c50")  # a typo fails before any download
    with pytest.raises(DataError, match="JAXNORM_CIFAR10_SHA256: 'c4a38c50' is not a sha256"):
        load_dataset("cifar10")
    monkeypatch.setenv("JAXNORM_CIFAR10_SHA256", hashlib.sha256(archive).hexdigest().upper())
    assert len(load_dataset("cifar10").train_images) == 5085
    assert _cache_files(data_root) == ["cifar-10-binary.tar.gz"]


@needs_subset
def test_each_failure_is_one_line_and_leaves_nothing_behind(server, data_root, monkeypatch, offline):
    archive = CIFAR_SUBSET.read_bytes()
    server.files["/cut.tar.gz"] = server.files["/half.tar.gz"] = archive
    server.files["/half.tar.gz"] = archive[: len(archive) // 2]  # served whole: a truncated file
    server.cut.add("/cut.tar.gz")
    cases = {"/cut.tar.gz": "was cut short .*8650019 bytes read",
             "/half.tar.gz": "downloaded from .*/half.tar.gz cannot be read .* it was removed",
             "/missing.tar.gz": "HTTP 404"}
    for path, message in cases.items():
        monkeypatch.setenv("JAXNORM_CIFAR10_URL", server.url + path)
        with pytest.raises(DataError, match=message) as e:
            load_dataset("cifar10")
        assert "\n" not in str(e.value) and str(e.value).startswith("CIFAR-10 is not in ")
        assert "--data-dir" in str(e.value) and _cache_files(data_root) == [], path
    monkeypatch.setenv("JAXNORM_CIFAR10_URL", offline + "cifar-10-binary.tar.gz")  # nothing listens there
    with pytest.raises(DataError, match="Connection refused.*no network"):
        load_dataset("cifar10")


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _mnist_arrays():
    """Small random arrays under the four official MNIST file names."""
    rng = np.random.default_rng(0)
    return {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (30, 28, 28)),
            "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 30),
            "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (20, 28, 28)),
            "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 20)}


def test_mnist_from_a_mirror_folder_with_sha256sum_checksums(server, data_root, monkeypatch):
    arrays = _mnist_arrays()
    files = {name: _idx(a) for name, a in arrays.items()}
    server.files.update({f"/mnist/{name}": body for name, body in files.items()})
    monkeypatch.setenv("JAXNORM_MNIST_URL", server.url + "/mnist")  # a folder; the slash is optional
    sums = {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    wrong = {**sums, "t10k-labels-idx1-ubyte.gz": "f" * 64}
    monkeypatch.setenv("JAXNORM_MNIST_SHA256", "\n".join(f"{s}  {n}" for n, s in wrong.items()))
    with pytest.raises(DataError, match="checksum mismatch for .*/mnist/t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist")
    # The files that passed are kept; the bad one is not.
    assert _cache_files(data_root, "mnist") == sorted(n for n in files if n != "t10k-labels-idx1-ubyte.gz")
    one_sum = f"{sums['t10k-images-idx3-ubyte.gz']}  t10k-images-idx3-ubyte.gz"
    monkeypatch.setenv("JAXNORM_MNIST_SHA256", one_sum)
    with pytest.raises(DataError, match="MNIST_SHA256 must be sha256sum output .* lacks train-images"):
        load_dataset("mnist")
    monkeypatch.setenv("JAXNORM_MNIST_SHA256", "\n".join(f"{s} *{n}" for n, s in sums.items()))  # binary mode
    data = load_dataset("mnist")
    np.testing.assert_array_equal(data.train_images[..., 0], arrays["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(data.test_labels, arrays["t10k-labels-idx1-ubyte.gz"])
    server.shutdown()
    server.server_close()
    assert load_dataset("mnist").source == str(data_root / download.CACHE_FOLDER / "mnist")


def test_a_file_url_mirror_and_a_url_of_another_scheme(tmp_path, data_root, monkeypatch):
    arrays = _mnist_arrays()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("JAXNORM_MNIST_URL", mirror.as_uri())
    for name, a in list(arrays.items())[:3]:
        (mirror / name).write_bytes(_idx(a))
    with pytest.raises(DataError, match="cannot download file://.*/t10k-labels-idx1-ubyte.gz: No such file"):
        load_dataset("mnist")
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx(arrays["t10k-labels-idx1-ubyte.gz"]))
    np.testing.assert_array_equal(load_dataset("mnist").test_labels, arrays["t10k-labels-idx1-ubyte.gz"])
    monkeypatch.setenv("JAXNORM_CIFAR10_URL", "ftp://example.org/cifar-10-binary.tar.gz")
    with pytest.raises(DataError, match="JAXNORM_CIFAR10_URL: 'ftp://.*' is not an http://, https:// or file://"):
        load_dataset("cifar10")
    assert _cache_files(data_root) == []


@needs_subset
def test_the_readme_first_command_downloads_trains_and_evaluates(server, tmp_path):
    # One process pays for both: the README's first command (download, train, evaluate) and a real
    # training run on real images, end to end: better than chance after one epoch of the narrow net.
    server.files["/cifar-10-binary.tar.gz"] = CIFAR_SUBSET.read_bytes()
    env = {"TFDS_DATA_DIR": str(tmp_path / "tfds"),
           "JAXNORM_CIFAR10_URL": server.url + "/cifar-10-binary.tar.gz"}
    result = run_script("train.py", "--norm", "gn", "--groups", "4", "--epochs", "1", "--preset", "narrow",
                        "--workdir", tmp_path / "run", "--no-progress", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "epoch   1 | lr 0 -> 0.09" in result.stdout  # the lr over the epoch: the warm-up, from 0
    downloads = tmp_path / "tfds" / "jaxnorm-downloads"
    assert f"5085 train / 1017 test images from {downloads}" in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert "parameters" in last and "final train" in last and "best" not in last  # nothing chosen on test
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(history) == 1 and 0.1 < history[0]["test_accuracy"] <= 1  # better than chance on real images

"""1 device and 8 (emulated CPU) devices train the same model: data parallelism changes no result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multidevice_worker.py")


def _start_worker(devices, out, *extra):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "XLA_FLAGS": flags}
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *map(str, extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # Both workers at once (each compiles on one core most of the time); the 1-device worker restores the
    # 8-device checkpoint once the 8-device worker has finished.
    root = tmp_path_factory.mktemp("multidevice")
    one, eight = root / "one", root / "eight"
    workers = [_start_worker(8, eight), _start_worker(1, one, eight / "run-bn")]
    try:
        for worker in workers:
            _, err = worker.communicate(timeout=900)
            assert worker.returncode == 0, err[-3000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    return one, eight


def test_workers_really_ran_on_1_and_8_devices(runs):
    one, eight = runs
    assert int(np.load(one / "step.npz")["device_count"]) == 1
    assert int(np.load(eight / "step.npz")["device_count"]) == 8


def test_one_step_gives_the_same_parameters_and_batch_stats(runs):
    one, eight = (np.load(r / "step.npz") for r in runs)
    keys = [k for k in one.files if k != "device_count"]
    assert any("batch_stats" in k for k in keys) and any(k.startswith("ln") for k in keys)
    for key in keys:
        np.testing.assert_allclose(one[key], eight[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_short_batchnorm_run_has_the_same_metrics(runs):
    one, eight = (json.loads((r / "run-bn" / "metrics.json").read_text()) for r in runs)
    assert len(one) == len(eight) == 1
    for a, b in zip(one, eight, strict=True):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key


def test_an_8_device_checkpoint_restores_on_one_device(runs):
    one, eight = runs
    logits = np.load(one / "restored_logits.npy")
    assert logits.shape == (32, 10) and np.all(np.isfinite(logits))
    # The restored model reproduces the test accuracy the 8-device run recorded.
    from jaxnorm.data import synthetic_dataset
    labels = synthetic_dataset(64, 32, image_shape=(16, 16, 3)).test_labels
    recorded = json.loads((eight / "run-bn" / "metrics.json").read_text())[-1]["test_accuracy"]
    assert (logits.argmax(-1) == labels).mean() == pytest.approx(recorded)

"""Faults that used to lose or mix runs (issue 14): two processes on one folder, a failed save, an
unreadable or silently changed checkpoint, damaged data, out-of-range numbers.

In-process on the tiny data (4 steps per epoch); the slow multi-process cases are in
test_fault_injection.py (marker `faults`).
"""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, Config, run_script
from jaxnorm import evaluate, runlock
from jaxnorm.checkpoint import CheckpointError, CheckpointSaveError, RunCheckpoints, UnreadableCheckpoint
from jaxnorm.data import DataError, load_dataset
from jaxnorm.runlock import LOCK_NAME, RunLock
from jaxnorm.train import train_and_evaluate
from test_robust import TINY, _load_script, cli, without_timing

CONFIG = Config(dataset="synthetic", width=8, transition_width=8, groups=4, batch_size=16, epochs=2,
                lr=0.05, dropout=0.0, eval_batch_size=32)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, tiny_data):
    """A finished 2-epoch run (checkpoints 4 and 8), trained with a relative --data-dir."""
    root = tmp_path_factory.mktemp("faults")
    (root / "data").mkdir()
    cwd = os.getcwd()
    os.chdir(root)  # the relative data path below is relative to here
    try:
        result = train_and_evaluate(CONFIG.replace(data_dir="data"), root / "run", dataset=tiny_data,
                                    progress=False)
    finally:
        os.chdir(cwd)
    return root / "run", result


@pytest.fixture
def run_copy(two_epochs, tmp_path):
    return Path(shutil.copytree(two_epochs[0], tmp_path / "run"))


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------------------------
# The run-folder lock.


def test_a_second_process_on_a_run_folder_stops_at_once_naming_the_holder(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        holder_record = {"pid": holder.pid, "host": socket.gethostname()}
        (tmp_path / "run" / LOCK_NAME).write_text(json.dumps(holder_record))
        code, out, err = cli(capsys, *TINY, "--epochs", "1", "--workdir", tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"run is in use by PID {holder.pid} on host {socket.gethostname()}" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing written


def test_lock_is_exclusive_nests_in_one_process_and_is_released(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        record = json.loads(lock.path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with RunLock(tmp_path / "run"):  # a study holding the folder while training it
            pass
        assert lock.path.exists()
        other = subprocess.run([sys.executable, "-c", "import sys; from jaxnorm.runlock import RunLock; "
                                "RunLock(sys.argv[1]).acquire()", str(tmp_path / "run")],
                               cwd=ROOT, capture_output=True, text=True)
        assert other.returncode != 0 and f"in use by PID {os.getpid()}" in other.stderr
    assert not lock.path.exists()
    assert not (tmp_path / "run").exists()  # created by the lock, left empty: removed


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert "which no longer runs: taking the folder over" in capsys.readouterr().err


def _lock_of_another_host(workdir, untouched_seconds):
    """The lock a machine that is gone left behind (a Colab VM after a disconnect: the new VM has
    another host name), last refreshed `untouched_seconds` ago."""
    workdir.mkdir(exist_ok=True)
    lock = workdir / LOCK_NAME
    lock.write_text(json.dumps({"pid": 4242, "host": "lost-vm", "since": "2026-05-04 10:00:00"}))
    then = time.time() - untouched_seconds
    os.utime(lock, (then, then))
    return lock


def test_a_fresh_lock_of_another_host_is_refused_in_one_line(tmp_path, capsys):
    lock = _lock_of_another_host(tmp_path / "run", untouched_seconds=runlock.STALE_SECONDS - 120)
    code, out, err = cli(capsys, *TINY, "--epochs", "1", "--workdir", tmp_path / "run", "--resume")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    holder = f"error: {tmp_path / 'run'} is in use by PID 4242 on host lost-vm (since 2026-05-04 10:00:00, "
    assert err.startswith(holder) and re.match(r"lock refreshed \d+ minutes ago\); a lock untouched for 10 "
                                               "minutes is taken over automatically", err[len(holder):]), err
    assert err.endswith(f", or if that process has stopped, delete {lock} and try again\n"), err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing written, lock kept
    assert json.loads(lock.read_text())["host"] == "lost-vm"


def test_a_stale_lock_of_another_host_is_taken_over_with_a_note(tmp_path, capsys):
    _lock_of_another_host(tmp_path, untouched_seconds=runlock.STALE_SECONDS + 60)
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    holder = f"note: {tmp_path} was locked by PID 4242 on host lost-vm (since 2026-05-04 10:00:00), "
    assert err.startswith(holder) and re.fullmatch(r"untouched for \d+ minutes: taking the folder over\n",
                                                   err[len(holder):]), err
    assert not (tmp_path / LOCK_NAME).exists()


def _wait_until(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("lost", ["taken over", "deleted"])
def test_the_holder_refreshes_its_lock_and_never_touches_one_no_longer_its(lost, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setattr(runlock, "REFRESH_SECONDS", 0.01)
    long_ago = time.time_ns() - 3600 * 10**9
    with RunLock(tmp_path) as lock:
        os.utime(lock.path, ns=(long_ago, long_ago))
        assert _wait_until(lambda: lock.path.stat().st_mtime_ns > long_ago + 1800 * 10**9)  # refreshed
        # Another host took the folder over (this holder looked lost; a new file, as RunLock makes it), or
        # a user deleted the lock.
        foreign = json.dumps({"pid": 4242, "host": "new-vm", "since": "2026-05-04 10:20:00"})
        if lost == "deleted":
            lock.path.unlink()
        else:
            (tmp_path / "new").write_text(foreign)
            os.utime(tmp_path / "new", ns=(long_ago, long_ago))
            os.replace(tmp_path / "new", lock.path)
        heartbeat = runlock._HEARTBEATS[lock.path]._thread
        heartbeat.join(timeout=60)
        assert not heartbeat.is_alive()  # it saw the lock is not its own and stopped
        assert f"warning: the lock {lock.path} is no longer this process's" in capsys.readouterr().err
    if lost == "deleted":
        assert not lock.path.exists()  # never recreated
    else:  # neither touched nor removed on release
        assert lock.path.read_text() == foreign and lock.path.stat().st_mtime_ns == long_ago


# ----------------------------------------------------------------------------------------------
# Unreadable and damaged checkpoints.


def _damage(run, step):
    """Overwrite the largest array data file of checkpoint `step` (what a bad disk sector does)."""
    data = max((run / "ckpt" / str(step) / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(os.urandom(data.stat().st_size))


def _tamper_checksum(run, step):
    """A changed byte that still decodes: the saved checksum of one array no longer matches."""
    path = run / "ckpt" / str(step) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    key = next(k for k in meta["checksums"] if "opt_state" in k)
    meta["checksums"][key] = meta["checksums"][key][:-8] + "00000000"
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, why", [(_damage, "is unreadable (its files are damaged or incomplete)"),
                                         (_tamper_checksum, "is damaged: 1 of")])
def test_readers_fall_back_past_a_bad_latest_checkpoint_and_resume_continues(
        damage, why, run_copy, two_epochs, tiny_data, capsys):
    damage(run_copy, 8)
    run = evaluate.restore_run(run_copy)
    err = capsys.readouterr().err
    assert run.step == 4 and len(err.strip().splitlines()) == 1, err
    assert f"warning: checkpoint step 8 in {run_copy / 'ckpt'} {why}" in err and "using step 4" in err
    assert "pybind11" not in err and (run_copy / "ckpt" / "8").is_dir()  # never deleted by a reader
    with pytest.raises(UnreadableCheckpoint, match="step 8 .* (unreadable|damaged)"):
        evaluate.restore_run(run_copy, step=8)  # asked for by name: an error, not a fallback
    # --resume continues from step 4, keeps step 8 aside, and ends as the uninterrupted run.
    resumed = train_and_evaluate(CONFIG.replace(epochs=3), run_copy, resume=True, dataset=tiny_data,
                                 progress=False)
    reference = train_and_evaluate(CONFIG.replace(epochs=3), run_copy.parent / "straight", dataset=tiny_data,
                                   progress=False)
    # The same steps, and the same losses up to float32 rounding (a restored state's first compiled
    # call may sum in another order).
    got, want = without_timing(resumed["history"]), without_timing(reference["history"])
    assert got == [{k: pytest.approx(v, rel=1e-6) if isinstance(v, float) else v for k, v in w.items()}
                   for w in want]  # numbers within float32 rounding, the rest (e.g. the device) exactly
    assert (run_copy / "unreadable" / "8" / "state").is_dir()


def test_restore_checks_every_array_against_its_checksum(run_copy):
    checkpoints = RunCheckpoints(run_copy, read_only=True)
    meta = checkpoints.restore_meta(8)
    assert any("opt_state" in k for k in meta["checksums"]) and any("params" in k for k in meta["checksums"])
    _tamper_checksum(run_copy, 4)
    _damage(run_copy, 8)
    with pytest.raises(CheckpointError, match="no readable checkpoint in .*steps 8, 4 are unreadable"):
        evaluate.restore_run(run_copy)


# ----------------------------------------------------------------------------------------------
# Failed saves: a full disk (a small tmpfs when this user may mount one, else a failing writer).


def _fail_saves_from(monkeypatch, step):
    """Saves of checkpoint `step` and later fail as the file system reports a full disk."""
    import orbax.checkpoint as ocp
    original = ocp.CheckpointManager.save

    def save(self, at_step, *args, **kwargs):
        if at_step >= step:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, at_step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def test_a_failed_save_is_one_line_keeps_the_good_checkpoint_and_resume_continues(
        two_epochs, tiny_data, tmp_path, monkeypatch, capsys):
    _fail_saves_from(monkeypatch, 8)
    with pytest.raises(CheckpointSaveError) as info:
        train_and_evaluate(CONFIG, tmp_path / "run", dataset=tiny_data, progress=False)
    message = str(info.value)
    assert message.startswith(f"could not save step 8 in {tmp_path / 'run' / 'ckpt'}: no space left on the "
                              "device; the last good checkpoint is step 4") and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released
    monkeypatch.undo()  # space freed
    resumed = train_and_evaluate(CONFIG, tmp_path / "run", resume=True, dataset=tiny_data, progress=False)
    assert without_timing(resumed["history"]) == without_timing(two_epochs[1]["history"])


def _resize(disk, kilobytes):
    subprocess.run(["mount", "-o", f"remount,size={kilobytes}k", str(disk)], check=True)


def _kilobytes(path):
    """Disk use of `path` in KB, as the file system counts it (whole blocks)."""
    du = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(du.stdout.split()[0])


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own (8 MB until a test shrinks it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the monkeypatched test covers the logic")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_through_the_command_line(small_disk):
    run_folder = small_disk / "run"
    # One epoch with room to spare, then a disk with free space for a quarter of that checkpoint: the next
    # save cannot fit. (Sized from the measured checkpoint: Orbax's OCDBT splits the same arrays into a
    # varying number of files, so a fixed disk size may not hold even the first one.)
    _load_script().main([*TINY, "--epochs", "1", "--workdir", str(run_folder)])
    (first,) = [path for path in (run_folder / "ckpt").iterdir() if path.name.isdigit()]
    _resize(small_disk, _kilobytes(small_disk) + _kilobytes(first) // 4)
    # A process of its own: Orbax's and TensorStore's threads report in it until the interpreter exits,
    # and its whole stderr is what the user sees.
    run = run_script("train.py", *TINY, "--epochs", "3", "--workdir", run_folder, "--resume", timeout=900)
    # One error line, the last: nothing after it. (A loaded machine may get warnings before it: Orbax's
    # on a save that waited, XLA's on a slow compile.)
    lines = run.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert run.returncode == 2 and errors == lines[-1:], run.stderr
    noise = ("Traceback", "Exception", "exception", "Event loop is closed", "ERROR:", "RESOURCE_EXHAUSTED")
    assert not any(text in run.stderr for text in noise), run.stderr
    assert errors[0].startswith("error: could not save step ") and "no space left on the device" in errors[0]
    assert f"the last good checkpoint is step {first.name} " in errors[0]
    assert RunCheckpoints(run_folder, read_only=True).require_latest_step() == int(first.name)
    # Free space again, then --resume finishes the run.
    _resize(small_disk, 8 * 1024)
    _load_script().main([*TINY, "--epochs", "3", "--workdir", str(run_folder), "--resume"])
    assert len(json.loads((run_folder / "metrics.json").read_text())) == 3


def test_os_errors_outside_saves_are_one_line(capsys):
    def fail():
        raise OSError(errno.ENOSPC, "No space left on device", "/x/metrics.json")
    from jaxnorm.cli import run_main
    with pytest.raises(SystemExit) as info:
        run_main(fail)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: No space left on device (/x/metrics.json)\n"


# ----------------------------------------------------------------------------------------------
# Data: validated where it is read; the run folder's data path.


def _cifar_bin_folder(path, bad_file=None, bad_label=200):
    path.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rows = np.zeros((2, 1 + 32 * 32 * 3), np.uint8)
        rows[:, 0] = [3, 7]
        if name == bad_file:
            rows[1, 0] = bad_label
        (path / name).write_bytes(rows.tobytes())
    return path


def test_a_corrupt_label_byte_names_the_file(tmp_path):
    assert len(load_dataset("cifar10", str(_cifar_bin_folder(tmp_path / "ok"))).train_images) == 10
    with pytest.raises(DataError, match=r"data_batch_3.bin: label 200 of image 1 is outside 0..9"):
        load_dataset("cifar10", str(_cifar_bin_folder(tmp_path / "bad", "data_batch_3.bin")))


def test_mnist_labels_out_of_range_name_the_file(tmp_path):
    def idx(name, array, dtype_code):
        header = bytes([0, 0, dtype_code, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
        (tmp_path / name).write_bytes(header + array.tobytes())
    idx("t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8), 0x08)
    idx("t10k-labels-idx1-ubyte", np.array([1, 12, 3], np.uint8), 0x08)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: label 12 of image 1 is outside 0..9"):
        load_dataset("mnist", str(tmp_path), train_split=2)


def test_the_run_records_an_absolute_data_path_and_a_reader_says_where_it_looked(two_epochs):
    run_dir, _ = two_epochs
    run = evaluate.restore_run(run_dir)
    recorded = run.config.data_dir
    assert Path(recorded).is_absolute() and recorded == str(run_dir.parent / "data")
    moved = run_dir.parent / "data-moved"
    (run_dir.parent / "data").rename(moved)
    try:
        with pytest.raises(DataError, match=f"is not at {recorded}: pass --data-dir PATH"):
            evaluate.dataset_for_run(run)
    finally:
        moved.rename(run_dir.parent / "data")


# ----------------------------------------------------------------------------------------------
# Numbers out of range: one line, before anything starts.


@pytest.mark.parametrize("args, message", [
    (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1), got 2.0"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr-gamma", "0"], "--lr-gamma must be in (0, 1]"),
    (["--weight-decay=-1e-4"], "--weight-decay must be >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
])
def test_numeric_options_out_of_range_are_one_line(args, message, tmp_path, capsys):
    code, out, err = cli(capsys, *TINY, *args, "--workdir", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()

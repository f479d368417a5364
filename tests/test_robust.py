"""Interruptions, divergence, broken run folders and bad input (issue 6).

In-process tests use the tiny data (4 steps per epoch); the signal tests run scripts/train.py in
subprocesses on the CLI's synthetic data and compare with an uninterrupted run of the same seed.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import jaxnorm.train as train_lib
from conftest import CIFAR_SUBSET, ROOT, copy_of_cache
from jaxnorm import runlock
from jaxnorm.checkpoint import CheckpointError, RunCheckpoints, check_writable_workdir
from jaxnorm.cli import run_main
from jaxnorm.config import ConfigError
from jaxnorm.runlock import LOCK_NAME
from jaxnorm.train import TrainingError, TrainingInterrupted, train_and_evaluate

TIMING = ("seconds", "images_per_second")


def without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_data):
    """An uninterrupted 3-epoch run (4 steps per epoch) of the tiny config."""
    from conftest import Config
    config = Config(dataset="synthetic", width=8, transition_width=8, groups=4, batch_size=16, epochs=3,
                    lr=0.05, dropout=0.0, eval_batch_size=32)
    return config, train_and_evaluate(config, tmp_path_factory.mktemp("straight"), dataset=tiny_data,
                                      progress=False)


@pytest.fixture(scope="module")
def one_epoch_run(straight, tiny_data, tmp_path_factory):
    """A run folder holding the first epoch of `straight` (checkpoint at step 4): the same run, stopped
    by a SIGTERM in the epoch's last step. (A 1-epoch run is another run: its learning-rate schedule
    may round its steps' rates differently.)"""
    config, _ = straight
    workdir = tmp_path_factory.mktemp("one_epoch") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        signal_at_step(monkeypatch, signal.SIGTERM, at_call=4)
        with pytest.raises(TrainingInterrupted, match="after epoch 1, step 4"):
            train_and_evaluate(config, workdir, dataset=tiny_data, progress=False)
    return workdir


@pytest.fixture
def one_epoch(one_epoch_run, tmp_path):
    """A private copy of `one_epoch_run`."""
    return Path(shutil.copytree(one_epoch_run, tmp_path / "run"))


def signal_at_step(monkeypatch, signum, at_call):
    """Make the train step send `signum` to this process while running its `at_call`-th call."""
    make = train_lib.compiled_train_step

    def make_signalling(config, mesh):
        step, calls = make(config, mesh), [0]

        def signalling(*args):
            calls[0] += 1
            if calls[0] == at_call:
                os.kill(os.getpid(), signum)
            return step(*args)
        return signalling
    monkeypatch.setattr(train_lib, "compiled_train_step", make_signalling)


# ----------------------------------------------------------------------------------------------
# Signals, in process: deterministic step of arrival.


def test_sigint_mid_epoch_saves_there_and_resume_is_exact(straight, tiny_data, tmp_path, monkeypatch):
    config, reference = straight
    before = signal.getsignal(signal.SIGINT)
    signal_at_step(monkeypatch, signal.SIGINT, at_call=6)  # epoch 2, its 2nd of 4 steps
    with pytest.raises(TrainingInterrupted, match="SIGINT at epoch 2, step 6: saved a checkpoint at step 6"):
        train_and_evaluate(config, tmp_path, dataset=tiny_data, progress=False)
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
    checkpoints = RunCheckpoints(tmp_path, read_only=True)
    assert checkpoints.all_steps() == [4, 6]
    assert checkpoints.latest_step() == 6 and checkpoints.best_step() == 4  # best = best end of epoch
    with pytest.raises(CheckpointError, match="no validation split"):  # best by test accuracy: never chosen
        checkpoints.require_best_validation_step()
    partial = checkpoints.restore_meta(6)["partial"]
    assert partial["epoch"] == 1 and len(partial["losses"]) == 2
    monkeypatch.undo()
    resumed = train_and_evaluate(config, tmp_path, resume=True, dataset=tiny_data, progress=False)
    assert without_timing(resumed["history"]) == without_timing(reference["history"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert without_timing(saved) == without_timing(reference["history"])
    # The mid-epoch checkpoint ages out like any other; "best" stays an end-of-epoch one.
    after = RunCheckpoints(tmp_path, read_only=True)
    assert after.latest_step() == 12 and after.best_step() in (4, 8, 12)
    assert after.best_step() == 4 * max(reference["history"], key=lambda h: h["test_accuracy"])["epoch"]


def test_sigterm_in_the_last_step_of_an_epoch_saves_that_epoch(straight, tiny_data, tmp_path, monkeypatch):
    config, reference = straight
    signal_at_step(monkeypatch, signal.SIGTERM, at_call=4)
    with pytest.raises(TrainingInterrupted, match="SIGTERM after epoch 1, step 4") as info:
        train_and_evaluate(config, tmp_path, dataset=tiny_data, progress=False)
    assert info.value.signum == signal.SIGTERM and info.value.step == 4
    assert RunCheckpoints(tmp_path, read_only=True).all_steps() == [4]
    monkeypatch.undo()
    resumed = train_and_evaluate(config, tmp_path, resume=True, dataset=tiny_data, progress=False)
    assert without_timing(resumed["history"]) == without_timing(reference["history"])


# ----------------------------------------------------------------------------------------------
# Kills: half-written checkpoints and a metrics.json ahead of the checkpoints.


def test_resume_ignores_a_half_written_checkpoint_and_rewrites_metrics(straight, tiny_data, one_epoch):
    config, reference = straight
    tmp_path = one_epoch
    # What a kill during the save of epoch 2 leaves: Orbax's temporary folder, and possibly
    # metrics.json already listing epoch 2.
    junk = tmp_path / "ckpt" / "8.orbax-checkpoint-tmp-1763690000000000"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "half").write_bytes(b"\0" * 100)
    history = json.loads((tmp_path / "metrics.json").read_text())
    (tmp_path / "metrics.json").write_text(json.dumps(history + [{**history[0], "epoch": 2}]))
    checkpoints = RunCheckpoints(tmp_path, read_only=True)
    assert checkpoints.all_steps() == [4] and checkpoints.require_latest_step() == 4
    resumed = train_and_evaluate(config, tmp_path, resume=True, dataset=tiny_data, progress=False)
    assert without_timing(resumed["history"]) == without_timing(reference["history"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert without_timing(saved) == without_timing(reference["history"])


def test_a_run_left_locked_by_a_lost_machine_resumes_exactly_on_a_new_host(straight, tiny_data, one_epoch,
                                                                           capsys):
    # A Colab disconnect: the old VM (host lost-vm) stopped refreshing its lock after epoch 1; the new VM
    # has another host name and finds the run folder on Drive as the old one left it.
    config, reference = straight
    lock = one_epoch / LOCK_NAME
    lock.write_text(json.dumps({"pid": 4242, "host": "lost-vm", "since": "2026-05-04 10:00:00"}))
    then = time.time() - runlock.STALE_SECONDS - 60
    os.utime(lock, (then, then))
    resumed = train_and_evaluate(config, one_epoch, resume=True, dataset=tiny_data, progress=False)
    note = "was locked by PID 4242 on host lost-vm (since 2026-05-04 10:00:00), untouched for"
    assert note in capsys.readouterr().err
    assert without_timing(resumed["history"]) == without_timing(reference["history"])
    assert not lock.exists()  # released at the end like any other


# ----------------------------------------------------------------------------------------------
# Divergence.


def test_non_finite_loss_names_the_step_and_keeps_the_good_checkpoint(straight, tiny_data, one_epoch):
    config, _ = straight
    tmp_path = one_epoch
    good = json.loads((tmp_path / "metrics.json").read_text())
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 2, step [5-8]; the last good "
                                            r"checkpoint is step 4 in"):
        train_and_evaluate(config.replace(lr=1e6), tmp_path, resume=True, dataset=tiny_data, progress=False)
    assert RunCheckpoints(tmp_path, read_only=True).all_steps() == [4]
    assert json.loads((tmp_path / "metrics.json").read_text()) == good


def test_non_finite_loss_in_the_first_epoch_saves_nothing(straight, tiny_data, tmp_path):
    config, _ = straight
    message = r"non-finite loss at epoch 1, step [1-4]; no checkpoint was saved"
    with pytest.raises(TrainingError, match=message):
        train_and_evaluate(config.replace(lr=1e6), tmp_path, dataset=tiny_data, progress=False)
    assert RunCheckpoints(tmp_path, read_only=True).all_steps() == []


# ----------------------------------------------------------------------------------------------
# Run folders for readers (scripts/evaluate.py): one CheckpointError line each.


def _foreign(path):
    (path / "ckpt" / "5" / "weights").mkdir(parents=True)


def _tmp_only(path):
    (path / "ckpt" / "4.orbax-checkpoint-tmp-1763690000000000" / "state").mkdir(parents=True)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "holds no checkpoints (no ckpt/ folder): is it a training run folder?"),
    (lambda p: (p / "ckpt").mkdir(parents=True), "holds no checkpoints (ckpt/ is empty)"),
    (_tmp_only, "holds only a half-written checkpoint"),
    (_foreign, "is not a jaxnorm training checkpoint"),
])
def test_unusable_run_folders_raise_one_line(make, message, tmp_path):
    run = tmp_path / "run"
    make(run)
    with pytest.raises(CheckpointError) as info:
        RunCheckpoints(run, read_only=True).require_latest_step()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_complete_run_folder_passes_the_reader_checks(one_epoch_run):
    checkpoints = RunCheckpoints(one_epoch_run, read_only=True)
    assert checkpoints.require_latest_step() == 4


# ----------------------------------------------------------------------------------------------
# Bad input: one `error:` line, non-zero exit, nothing done. In process (fast); the script's own
# main() and run_main, exactly what the command line runs.


def _load_script(name="train.py"):
    spec = importlib.util.spec_from_file_location(name[:-3] + "_script", ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--dataset", "synthetic", "--width", "8", "--transition-width", "8", "--groups", "4",
        "--batch-size", "16", "--no-progress"]


def cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: _load_script().main([str(a) for a in args]))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _not_an_archive(tmp_path):
    path = tmp_path / "notes.tar.gz"
    path.write_text("not a tar file")
    return path


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--norm", "xn"], "invalid choice: 'xn'"),
    (["--norm", "gn", "--groups", "0"], "--groups must be positive"),
    (["--norm", "gn", "--groups", "7"], "--groups 7 does not divide the 24 channels"),
    (["--dataset", "mnist", "--norm", "gn", "--groups", "4"], "--groups 4 does not divide the 10 channels"),
    (["--width", "0"], "--width must be positive, got 0"),
    (["--l1", "-1"], "--l1 must be >= 0"),
    (["--epochs", "-2"], "--epochs must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--batch-size", "-16"], "--batch-size must be positive"),
    ([*TINY, "--batch-size", "1024"], "--batch-size 1024 is larger than the 512 training images"),
    (["--data-dir", "{tmp}/nowhere"], "/nowhere does not exist"),
    (["--data-dir", "{archive}"], "is not a CIFAR-10 archive"),
    ([*TINY, "--workdir", "{file}/run"], "is a file, not a folder"),
    ([*TINY, "--workdir", "/proc/jaxnorm-run"], "is not writable"),
])
def test_bad_input_is_one_line_before_any_work(args, message, tmp_path, capsys):
    (tmp_path / "file").write_text("in the way")
    values = {"tmp": tmp_path, "archive": _not_an_archive(tmp_path), "file": tmp_path / "file"}
    args = [a.format(**values) for a in args]
    if "--workdir" not in args:
        args += ["--workdir", tmp_path / "run"]
    code, out, err = cli(capsys, *args)
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_workdir_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="is not writable"):
            check_writable_workdir(tmp_path / "run")
    finally:
        tmp_path.chmod(0o755)


def test_a_file_named_ckpt_in_the_workdir_is_refused(tmp_path):
    (tmp_path / "ckpt").write_text("")
    with pytest.raises(CheckpointError, match="is in the way"):
        check_writable_workdir(tmp_path)


def test_resume_without_a_checkpoint_starts_fresh_with_a_note(straight, tiny_data, tmp_path, capsys):
    config, reference = straight
    result = train_and_evaluate(config.replace(epochs=1), tmp_path, resume=True, dataset=tiny_data,
                                progress=False)
    out = capsys.readouterr().out
    assert "note: " in out and "holds no checkpoint yet: starting a new run" in out
    assert without_timing(result["history"]) == without_timing(reference["history"][:1])


def test_resume_prints_no_second_model_table(straight, tiny_data, one_epoch, capsys):
    config, _ = straight
    train_and_evaluate(config.replace(epochs=2), one_epoch, resume=True, dataset=tiny_data, progress=False)
    out = capsys.readouterr().out
    assert "resumed" in out and "total trainable parameters" not in out


def test_an_interrupted_study_exits_like_train(tmp_path, monkeypatch, capsys):
    signal_at_step(monkeypatch, signal.SIGINT, at_call=2)  # 8 steps per epoch: mid-epoch
    study = _load_script("study.py")
    args = ["--dataset", "synthetic", "--epochs", "1", "--seeds", "0", "--norms", "bn", "--preset", "narrow",
            "--batch-size", "64", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--no-progress"]
    with pytest.raises(SystemExit) as info:
        run_main(lambda: study.main(args), resume_with="python scripts/study.py ...")
    err = capsys.readouterr().err
    assert info.value.code == 128 + signal.SIGINT, err
    assert "interrupted: SIGINT at epoch 1, step 2" in err and "resume with: python scripts/study.py" in err
    assert RunCheckpoints(tmp_path / "runs" / "bn-s0", read_only=True).all_steps() == [2]


def test_resume_with_another_batch_size_is_refused(straight, tiny_data, one_epoch):
    config, _ = straight
    with pytest.raises(ConfigError, match="4 steps per epoch were saved, this config gives 2"):
        train_and_evaluate(config.replace(batch_size=32), one_epoch, resume=True, dataset=tiny_data,
                           progress=False)


# ----------------------------------------------------------------------------------------------
# The command line, in subprocesses: SIGKILL and SIGINT mid-run, then --resume; a contradicting
# resume. The reference and both victims run at the same time to keep the wall time down.

# 32 steps per epoch. The victims are stopped once epoch 1's checkpoint is on disk. The save finishes in
# the background, and a whole epoch takes half a second here, so three epochs must remain: with one, a
# loaded machine finished the run before the SIGINT arrived (exit 0).
SIGNAL_EPOCHS = 4
SIGNAL_RUN = [*TINY, "--epochs", str(SIGNAL_EPOCHS), "--seed", "3"]


def _start(workdir, cache, *extra):
    # A compilation cache shared by the processes of this test only (a copy of the run's, see
    # conftest.copy_of_cache): later processes skip compiling, and a SIGKILL mid-write spoils no other test.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *SIGNAL_RUN, *extra,
                             "--workdir", str(workdir)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_first_checkpoint(workdir, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not (workdir / "ckpt" / "32").is_dir():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    runs = {name: root / name for name in ("reference", "killed", "interrupted")}
    cache = copy_of_cache(root / "jax-cache")
    procs = {"reference": _start(runs["reference"], cache)}
    try:
        _wait_for_first_checkpoint(runs["reference"], procs["reference"])  # compiled: cache filled
        procs.update({name: _start(runs[name], cache) for name in ("killed", "interrupted")})
        _wait_for_first_checkpoint(runs["killed"], procs["killed"])
        procs["killed"].kill()  # SIGKILL: no handler, no cleanup
        procs["killed"].communicate()
        _wait_for_first_checkpoint(runs["interrupted"], procs["interrupted"])
        procs["interrupted"].send_signal(signal.SIGINT)
        interrupted = procs["interrupted"].communicate(timeout=120)
        interrupted_code = procs["interrupted"].returncode
        resumed = {name: _start(runs[name], cache, "--resume") for name in ("killed", "interrupted")}
        outputs = {name: p.communicate(timeout=180) + (p.returncode,) for name, p in resumed.items()}
        reference = procs["reference"].communicate(timeout=180) + (procs["reference"].returncode,)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return {"runs": runs, "reference": reference, "interrupted": interrupted + (interrupted_code,),
            "resumed": outputs}


def _metrics(workdir):
    return without_timing(json.loads((workdir / "metrics.json").read_text()))


def test_sigkill_then_resume_matches_an_uninterrupted_run(signal_runs):
    out, err, code = signal_runs["reference"]
    assert code == 0, err
    out, err, code = signal_runs["resumed"]["killed"]
    assert code == 0, err
    assert "resumed" in out
    reference = _metrics(signal_runs["runs"]["reference"])
    assert len(reference) == SIGNAL_EPOCHS and _metrics(signal_runs["runs"]["killed"]) == reference


def test_sigint_saves_prints_the_resume_command_and_resume_matches(signal_runs):
    out, err, code = signal_runs["interrupted"]
    assert code == 130, err
    assert "interrupted: SIGINT " in err and "saved a checkpoint at step" in err and "Traceback" not in err
    hint = [line for line in err.splitlines() if line.startswith("resume with: ")]
    assert hint and hint[0].endswith("--resume") and "--workdir" in hint[0], err
    out, err, code = signal_runs["resumed"]["interrupted"]
    assert code == 0, err
    assert _metrics(signal_runs["runs"]["interrupted"]) == _metrics(signal_runs["runs"]["reference"])


def test_resume_with_a_contradicting_config_is_refused_by_the_cli(signal_runs, capsys):
    workdir = signal_runs["runs"]["reference"]
    args = [*SIGNAL_RUN, "--resume", "--workdir", workdir]
    for change, message in [(["--norm", "gn"], "norm 'bn' -> 'gn'"),
                            (["--width", "12"], "width 8 -> 12"),
                            (["--skip"], "skip False -> True"),
                            *([(["--dataset", "cifar10", "--data-dir", CIFAR_SUBSET],
                                "dataset 'synthetic' -> 'cifar10'")]
                              if CIFAR_SUBSET.exists() else [])]:
        code, out, err = cli(capsys, *args, *change)
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err

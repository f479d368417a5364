"""Fault injection, kept out of the quick suite (marker `faults`; `.ci/run` runs it with -m faults).

SIGKILL at random moments of a short command-line run, some of them during an asynchronous save,
each followed by `--resume`: the run must end with exactly the metrics of an uninterrupted one.
Two emulated hosts: SIGTERM reaching one of them makes both save the same step and stop (no save
one host never joins). The quick suite keeps one SIGKILL case (test_robust.py).
"""

import functools
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TEST_XLA_FLAGS, copy_of_cache
from jaxnorm.checkpoint import RunCheckpoints
from test_robust import _metrics, _start, _wait_for_first_checkpoint

pytestmark = pytest.mark.faults

SAVING = ".orbax-checkpoint-tmp"
LONGER = ("--epochs", "4")  # test_robust's signal run, twice as long: room for six kills and resumes


def _saving(workdir):
    ckpt = workdir / "ckpt"
    return ckpt.is_dir() and any(SAVING in p.name for p in ckpt.iterdir())


def _kill_when(process, ready, timeout=90):
    """SIGKILL `process` as soon as `ready()`: True; False if it finished first, which it must do cleanly."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.kill()
            process.communicate()
            return True
        time.sleep(0.002)
    _, err = process.communicate()
    assert process.returncode == 0, err
    return False


def _after_taking(workdir, process, delay):
    """A test that turns true `delay` seconds after `process` has written its PID into the run lock."""
    since = []

    def ready():
        if not since:
            try:
                text = (workdir / "jaxnorm.lock").read_text()
            except FileNotFoundError:  # not taken yet, or released as the process ends
                return False
            if f'"pid": {process.pid}' in text:
                since.append(time.monotonic())
            return False
        return time.monotonic() - since[0] > delay
    return ready


def test_random_sigkills_including_during_saves_then_resume_match_an_uninterrupted_run(tmp_path):
    rng = random.Random(int(os.environ.get("JAXNORM_FAULT_SEED", "0")))
    cache, reference = copy_of_cache(tmp_path / "jax-cache"), tmp_path / "reference"
    ref = _start(reference, cache, *LONGER)
    _wait_for_first_checkpoint(reference, ref)  # compiled once: later processes read the cache
    tried = []  # the moments at which a SIGKILL landed on a running process
    # A process that ends before its kill lands has finished the run: that run is checked like the last
    # one, and the next kill goes to a new run, so that a fast machine cannot run out of kills.
    finished, victim = [], tmp_path / "victim-0"
    try:
        for attempt in range(12):  # until 6 kills landed
            if len(tried) == 6:
                break
            moment = ("save", "random")[attempt % 2]
            process = _start(victim, cache, *LONGER, *(["--resume"] if victim.exists() else []))
            if moment == "save":  # the moment Orbax's temporary folder of an asynchronous save exists
                landed = _kill_when(process, functools.partial(_saving, victim))
            else:  # a random moment after the process has taken the run folder
                landed = _kill_when(process, _after_taking(victim, process, rng.uniform(0, 4)))
            if not landed:
                finished.append(victim)
                victim = tmp_path / f"victim-{len(finished)}"
                continue
            tried.append(moment)
            if (victim / "ckpt").is_dir():
                checkpoints = RunCheckpoints(victim, read_only=True)
                if checkpoints.latest_step() is not None:
                    checkpoints.require_latest_step()  # a usable folder each time
        if victim.exists():  # the last run, killed: finished by one more resume
            final = _start(victim, cache, *LONGER, "--resume")
            out, err = final.communicate(timeout=300)
            assert final.returncode == 0, err
            finished.append(victim)
        ref_out, ref_err = ref.communicate(timeout=300)
        assert ref.returncode == 0, ref_err
    finally:
        for p in (ref,):
            if p.poll() is None:
                p.kill()
    print(f"\nSIGKILLs survived: {len(tried)} of {len(tried)} tried ({', '.join(tried)}), "
          f"over {len(finished)} run(s)")
    assert tried.count("save") >= 1 and len(tried) >= 4, tried  # some kills landed during a save
    for run in finished:
        assert _metrics(run) == _metrics(reference), run.name


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_on_one_of_two_hosts_makes_both_save_the_same_step(tmp_path):
    port, workdir = _free_port(), tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # one device per process, none forced; only the suite's flags
    hosts = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(port), str(i),
                               str(workdir)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "ckpt" / "32").is_dir():  # epoch 1 saved: both are in the loop
            assert all(h.poll() is None for h in hosts), [h.communicate()[0][-2000:] for h in hosts]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        hosts[1].send_signal(signal.SIGTERM)  # the other host never sees a signal
        outputs = [h.communicate(timeout=120)[0] for h in hosts]
    finally:
        for h in hosts:
            if h.poll() is None:
                h.kill()
    steps = [[line for line in out.splitlines() if line.startswith("interrupted at step")] for out in outputs]
    assert [h.returncode for h in hosts] == [128 + signal.SIGTERM] * 2, outputs
    assert steps[0] == steps[1] and len(steps[0]) == 1, outputs
    step = int(steps[0][0].split()[-1])
    assert step in RunCheckpoints(workdir, read_only=True).all_steps()

"""One process per run folder: `<workdir>/jaxnorm.lock`, taken before anything is written.

    with RunLock(workdir):          # RunLocked: "... is in use by PID 4242 on host-a ..."
        train(...)

The lock is a file created with O_CREAT | O_EXCL, holding the holder's PID, host and process start
time. Why not fcntl.flock: flock is advisory per open file, silently local-only or unsupported on
several network and FUSE file systems (NFS setups, Colab's Google Drive mount) where run folders
often live, and a flock cannot say who holds it. An exclusive create is atomic on every POSIX file
system, and the file names the holder for the error message.

The price is stale locks: a SIGKILLed process, or a lost machine (a Colab VM gone after a
disconnect, its run folder on Drive), cannot remove its file. So the holder refreshes the file's
modification time every REFRESH_SECONDS while it holds the lock (a daemon thread), and a lock is
stale when
- its holder is on this host and no longer runs (the PID is gone, or now belongs to a process
  started at another time): taken over at once;
- its holder is on another host and the file has not been refreshed for STALE_SECONDS: nothing here
  can ask that host, but a holder that runs would have refreshed it.
A stale lock is taken over with a one-line note naming the old holder. A fresh lock of another host
is refused with one line saying when it will count as stale and which file to delete once the user
knows its process has stopped. A live holder on this host is refused however old its file (an older
jaxnorm did not refresh it). The heartbeat never recreates or touches a file that is no longer this
process's (removed, or taken over by another after going stale): it warns once and stops.

Nested locks of one folder in one process are one lock (a study holds a run folder while it trains
and evaluates it). In a multi-host job only process 0 takes the lock (all processes write the same
folder).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = "jaxnorm.lock"
REFRESH_SECONDS = 60  # the holder touches its lock this often...
STALE_SECONDS = 600  # ...and another host takes over a lock untouched this long
_HELD: dict = {}  # lock path -> nesting depth, for the locks this process holds
_HEARTBEATS: dict = {}  # lock path -> its _Heartbeat


class RunLocked(RuntimeError):
    """Another process holds the run folder; the command line prints its message as one line."""


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started = _process_start(pid)
    return started is None or holder.get("started") in (None, started)


class RunLock:
    """Exclusive use of `workdir` by this process, as a context manager (or `acquire`/`release`)."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.workdir = Path(workdir).expanduser().absolute()
        self.path = self.workdir / LOCK_NAME
        self.enabled = enabled
        self._record: str | None = None
        self._created_folder = False

    def acquire(self) -> RunLock:
        if not self.enabled:
            return self
        if self.path in _HELD:  # already ours: nested use
            _HELD[self.path] += 1
            self._record = "nested"
            return self
        self._created_folder = not self.workdir.exists()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunLocked(f"--workdir {self.workdir} cannot be created: {e.strerror or e}") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        record = json.dumps(me)
        for _ in range(3):  # a takeover race with another process costs at most a retry or two
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as e:
                if not isinstance(e, FileExistsError):
                    raise RunLocked(f"cannot create the lock {self.path}: {e.strerror or e}") from None
                holder_text = self._read()
                if holder_text is None:
                    continue  # released between our create and our read
                holder = _parse(holder_text)
                if not holder:  # created but not yet written, or torn by a kill: look again once
                    time.sleep(0.2)
                    holder_text = self._read()
                    if holder_text is None:
                        continue
                    holder = _parse(holder_text)
                    if not holder:
                        holder = {"host": me["host"]}  # still empty: a killed writer on this host
                self._take_over_if_stale(holder_text, holder, me["host"])
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self._record = record
            _HELD[self.path] = 1
            _HEARTBEATS[self.path] = _Heartbeat(self.path, record)
            return self
        raise RunLocked(f"{self.workdir}: could not take its lock {self.path} "
                        "(another process keeps taking it)")

    def _take_over_if_stale(self, text: str, holder: dict, this_host: str) -> None:
        """Take over the lock file holding `text` (`holder`, parsed) with a note if it is stale, else
        RunLocked. Returns without a takeover if the file went away meanwhile: the caller creates again."""
        who = f"PID {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')}"
        if holder.get("host") == this_host:
            if _alive(holder):
                raise RunLocked(f"{self.workdir} is in use by {who}): wait for it to finish or choose "
                                "another --workdir") from None
            self._take_over(text)
            print(f"note: {self.workdir} was locked by PID {holder.get('pid')}, which no longer runs: "
                  "taking the folder over", file=sys.stderr)
            return
        touched = self._mtime()
        if touched is None:
            return
        untouched = max(0.0, time.time() - touched)  # two hosts' clocks may differ a little
        if untouched < STALE_SECONDS:
            raise RunLocked(f"{self.workdir} is in use by {who}, lock refreshed {_duration(untouched)} "
                            f"ago); a lock untouched for {_duration(STALE_SECONDS)} is taken over "
                            f"automatically, or if that process has stopped, delete {self.path} and try "
                            "again") from None
        self._take_over(text)
        print(f"note: {self.workdir} was locked by {who}), untouched for {_duration(untouched)}: taking the "
              "folder over", file=sys.stderr)

    def _read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def _mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def _take_over(self, stale_text: str) -> None:
        """Move the stale lock aside; if another process replaced it meanwhile, put theirs back."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process moved it first: retry the create
        try:
            if aside.read_text() != stale_text:  # we moved a fresh lock: restore it unless re-taken
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self._record is None:
            return
        _HELD[self.path] -= 1
        if _HELD[self.path]:
            self._record = None
            return
        del _HELD[self.path]
        _HEARTBEATS.pop(self.path).stop()
        try:
            if self._read() == self._record:  # never remove a lock that is not ours
                self.path.unlink()
            if self._created_folder and not any(self.workdir.iterdir()):
                self.workdir.rmdir()  # a run that failed before writing anything leaves no folder
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                print(f"warning: could not remove the lock {self.path}: {e.strerror}", file=sys.stderr)
        self._record = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def holding_run_lock(fn):
    """Decorator: call `fn(config, workdir, ...)` holding `workdir`'s lock (process 0 of a multi-host
    job takes it). Errors before anything is written leave no folder behind."""
    import functools

    @functools.wraps(fn)
    def locked(config, workdir, *args, **kwargs):
        import jax

        from jaxnorm.checkpoint import check_writable_workdir
        check_writable_workdir(workdir)  # a clear message before the lock tries to create anything
        with RunLock(workdir, enabled=jax.process_index() == 0):
            return fn(config, workdir, *args, **kwargs)
    return locked


def _parse(text: str) -> dict:
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}  # an empty or torn lock file (killed while writing it): stale on this host, unknown host


class _Heartbeat:
    """Refreshes the lock file's modification time every REFRESH_SECONDS while this process holds it,
    so other hosts can tell a running holder from a lost machine. Stops on `stop()` (release), or by
    itself, with a warning, once the file is no longer this process's."""

    def __init__(self, path: Path, record: str):
        self.path, self.record = path, record
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"refresh {path}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(REFRESH_SECONDS):
            if not _touch_if_ours(self.path, self.record):
                if not self._stopping.is_set():
                    print(f"warning: the lock {self.path} is no longer this process's (deleted, or taken "
                          "over after going stale): another process may now write this run folder",
                          file=sys.stderr)
                return

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


def _touch_if_ours(path: Path, record: str) -> bool:
    """Set the lock file's modification time to now if it still holds `record`; False if it does not
    (gone or replaced). The check and the touch go through one open file, so a lock that replaced ours
    in between is never touched, and a missing one is never recreated. A passing I/O error (a network
    file system's hiccup) counts as ours: the next refresh tries again."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        with os.fdopen(fd) as f:
            if f.read() != record:
                return False
            os.utime(f.fileno())
    except OSError:
        pass
    return True


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} minutes"

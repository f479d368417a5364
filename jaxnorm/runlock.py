"""One process per run folder: `<workdir>/jaxnorm.lock`, taken before anything is written.

    with RunLock(workdir):          # RunLocked: "... is in use by PID 4242 on host-a ..."
        train(...)

The lock is a file created with O_CREAT | O_EXCL, holding the holder's PID, host and process start
time. Why not fcntl.flock: flock is advisory per open file, silently local-only or unsupported on
several network and FUSE file systems (NFS setups, Colab's Google Drive mount) where run folders
often live, and a flock cannot say who holds it. An exclusive create is atomic on every POSIX file
system, and the file names the holder for the error message.

The price is stale locks: a SIGKILLed process cannot remove its file. A lock is stale when its
holder is on this host and no longer runs (the PID is gone, or now belongs to a process started at
another time). It is then taken over, with a note. A lock held on another host is never taken over
automatically, since nothing here can tell whether that process still runs: the message says which
file to delete once the user knows it has stopped.

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
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = "jaxnorm.lock"
_HELD: dict = {}  # lock path -> nesting depth, for the locks this process holds


class RunLocked(RuntimeError):
    """Another process holds the run folder; the command line prints its message as one line."""


def _process_start(pid: int) -> Optional[str]:
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
        self._record: Optional[str] = None
        self._created_folder = False

    def acquire(self) -> "RunLock":
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
                if holder.get("host") != me["host"]:
                    raise RunLocked(f"{self.workdir} is in use by PID {holder.get('pid')} on host "
                                    f"{holder.get('host')} (since {holder.get('since')}); if that process "
                                    f"has stopped, delete {self.path} and try again") from None
                if _alive(holder):
                    raise RunLocked(f"{self.workdir} is in use by PID {holder.get('pid')} on host "
                                    f"{holder.get('host')} (since {holder.get('since')}): wait for it to "
                                    "finish or choose another --workdir") from None
                self._take_over(holder_text)
                print(f"note: {self.workdir} was locked by PID {holder.get('pid')}, which no longer runs: "
                      "taking the folder over", file=sys.stderr)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self._record = record
            _HELD[self.path] = 1
            return self
        raise RunLocked(f"{self.workdir}: could not take its lock {self.path} (another process keeps taking it)")

    def _read(self) -> Optional[str]:
        try:
            return self.path.read_text()
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
        try:
            if self._read() == self._record:  # never remove a lock that is not ours
                self.path.unlink()
            if self._created_folder and not any(self.workdir.iterdir()):
                self.workdir.rmdir()  # a run that failed before writing anything leaves no folder
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                print(f"warning: could not remove the lock {self.path}: {e.strerror}", file=sys.stderr)
        self._record = None

    def __enter__(self) -> "RunLock":
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

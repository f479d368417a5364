"""Shared command-line plumbing: errors the user can fix become one line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from jaxnorm.checkpoint import CheckpointError
from jaxnorm.config import ConfigError
from jaxnorm.data import DataError
from jaxnorm.devices import setup_cpu_devices
from jaxnorm.runlock import RunLocked

USER_ERRORS = (ConfigError, DataError, CheckpointError, RunLocked)


def run_main(main: Callable[[], object], extra_errors: tuple = ()) -> None:
    """Set up the CPU devices, call `main`; print known errors as `error: ...` on stderr and exit 2
    (130 on Ctrl-C). Every script runs through here, so each one gets one JAX device per CPU core
    (`jaxnorm.devices`) before anything starts JAX's backend."""
    try:
        setup_cpu_devices()
        main()
    except USER_ERRORS + extra_errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the machine, not the program: a full disk, a lost permission, an I/O error
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one `error:` line (usage stays in --help)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")

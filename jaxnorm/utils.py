"""Small helpers below everything else: atomic JSON files and quieter absl logging."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path


def write_json(path: str | Path, value) -> None:
    """Write atomically, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def read_history(workdir: str | Path) -> list[dict]:
    """A run folder's per-epoch metrics (metrics.json), [] before its first epoch."""
    path = Path(workdir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else []


@contextlib.contextmanager
def quiet_absl():
    """Silence absl warnings (Orbax on read-only managers, TFDS on missing dataset_info.json) within."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

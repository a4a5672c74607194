"""Atomic writes: a file is written next to its target, flushed to disk and renamed over it, so an interrupted
write (a kill, a full disk) leaves the previous file whole and no half-written one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes(data: bytes, path: str | Path) -> Path:
    """``data`` into ``path`` atomically (``<file>.tmp`` in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(text: str, path: str | Path) -> Path:
    return write_bytes(text.encode("utf-8"), path)


def write_json(data: Any, path: str | Path, indent: int | None = 2) -> Path:
    """``data`` as JSON, written atomically."""
    return write_text(json.dumps(data, indent=indent), path)

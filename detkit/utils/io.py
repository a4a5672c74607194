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


class UnsafeFile(ValueError):
    """A file that would run code when unpickled (it references Python classes or functions)."""


def torch_load_data(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code. Raises
    :class:`UnsafeFile` for a file that references Python objects, ``ValueError`` (one line) for one that is not
    a readable torch file."""
    import pickle
    import struct

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "global" in text.lower():  # a class or function reference: what a pickle uses to run code
            raise UnsafeFile(f"{path}: refused: the file holds Python objects besides tensors and plain data, and "
                             f"loading it could run code (detkit reads such files with weights_only=True)") from None
        detail = next((line.strip() for line in text.splitlines() if "Unsupported" in line), _first_line(text))
        raise ValueError(f"{path}: not a readable torch file (UnpicklingError: {detail})") from None
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError, ImportError, IndexError, KeyError,
            TypeError, OverflowError, struct.error) as e:
        raise ValueError(f"{path}: not a readable torch file ({type(e).__name__}: {_first_line(str(e))})") from None


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:300] if text else ""

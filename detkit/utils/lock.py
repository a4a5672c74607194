"""``FolderLock``: one process at a time in a folder (a study's), with stale-lock detection.

The lock is ``<folder>/.lock``, created exclusively (``O_CREAT | O_EXCL``) and holding the owner's pid, host and
start time. A second process is refused with one line naming the owner. A lock whose owner is gone (same host, no
such process) is stale: it is taken over, with a warning. A lock from another host cannot be checked: the line says
which host and how to clear it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from detkit.errors import ConfigError

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class FolderLock:
    """``with FolderLock(folder, "study"):`` -- see the module docstring."""

    def __init__(self, folder: str | Path, what: str = "study") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / ".lock"
        self.held = False

    def owner(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half written (its owner died while writing it) or garbled

    def _stale(self, owner: dict[str, Any]) -> bool:
        if not owner:  # unreadable: stale once it is older than a few seconds (a writer needs less)
            try:
                return time.time() - self.path.stat().st_mtime > 5
            except FileNotFoundError:
                return True
        return owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", -1)))

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released meanwhile
                if not self._stale(owner):
                    raise ConfigError(
                        f"{self.folder}: another detkit {self.what} is running in this folder (process "
                        f"{owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('since', '?')}); wait "
                        f"for it to end, or remove {self.path} if that process is gone") from None
                log.warning("%s: taking over a stale lock of process %s (not running)", self.folder, owner.get("pid"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.held = True
            return
        raise ConfigError(f"{self.folder}: cannot take the {self.what} lock {self.path}")

    def release(self) -> None:
        if self.held:
            owner = self.owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

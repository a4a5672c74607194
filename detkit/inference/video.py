"""Frames of video files, streams and cameras (OpenCV's FFmpeg reader), and the annotated video written back.

``read_frames(source, vid_stride=1, max_frames=None, stall_timeout=10.0)`` yields :class:`Frame` (``index`` in the
source, ``time`` in seconds, ``image`` RGB uint8) for a video file, a stream URL (``rtsp://``, ``rtmp://``,
``http(s)://``), a camera index (``0`` or ``"0"``), or any object with OpenCV's ``read() -> (ok, BGR array)``.
Frames are read by a background thread, so a stream that stalls is noticed: no frame for ``stall_timeout``
seconds raises :class:`StreamStalled` (a one-line :class:`~detkit.errors.DataError`) after every frame read
before it was yielded. A source that ends simply ends the iteration. ``vid_stride`` keeps every n-th frame (the
others are grabbed, not decoded); ``max_frames`` bounds the frames yielded.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detkit.errors import DataError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".gif")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


@dataclass
class Frame:
    index: int  # the frame's number in the source (0-based, counting the frames skipped by vid_stride)
    time: float  # seconds from the source's start (its timestamps; a camera's: the time it was read)
    image: np.ndarray  # H x W x 3 uint8 RGB


class StreamStalled(DataError):
    """A stream gave no frame for ``stall_timeout`` seconds."""


def is_video_source(item: str) -> bool:
    """A video file (by suffix), a stream URL, or a camera index (digits that are not a file or folder here)."""
    s = str(item)
    return ((s.isdigit() and not Path(s).exists()) or s.lower().startswith(STREAM_SCHEMES)
            or Path(s).suffix.lower() in VIDEO_SUFFIXES)


def source_name(source: Any) -> str:
    """A file-name stem for a source's outputs: the file's stem, ``camera<N>``, or the URL's last part."""
    s = str(source)
    if s.isdigit():
        return f"camera{s}"
    if s.lower().startswith(STREAM_SCHEMES):
        tail = re.sub(r"[^A-Za-z0-9_.-]+", "_", s.split("://", 1)[1]).strip("_.")
        return (tail[-60:] or "stream").lstrip("_.") or "stream"
    return Path(s).stem


def open_capture(source: Any) -> tuple[Any, float]:
    """(a capture with ``read()``, its frames per second or 0 when unknown)."""
    if hasattr(source, "read") and not isinstance(source, str | Path):
        fps = float(source.get(5)) if hasattr(source, "get") else 0.0  # cv2.CAP_PROP_FPS == 5
        return source, fps if np.isfinite(fps) and fps > 0 else 0.0
    import cv2

    s = str(source)
    if not s.isdigit() and not s.lower().startswith(STREAM_SCHEMES) and not Path(s).is_file():
        raise DataError(f"{s}: no such video file")
    cap = cv2.VideoCapture(int(s) if s.isdigit() else s)
    if not cap.isOpened():
        raise DataError(f"{s}: cannot be opened as a video or stream (OpenCV/FFmpeg could not read it)")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    return cap, fps if np.isfinite(fps) and 0 < fps < 1000 else 0.0


def read_frames(source: Any, vid_stride: int = 1, max_frames: int | None = None, stall_timeout: float = 10.0,
                ) -> Iterator[Frame]:
    """The frames of ``source`` (see the module docstring)."""
    if int(vid_stride) < 1:
        raise DataError(f"vid_stride = {vid_stride}: must be >= 1")
    if max_frames is not None and int(max_frames) < 1:
        raise DataError(f"max_frames = {max_frames}: must be >= 1")
    if not float(stall_timeout) > 0:
        raise DataError(f"stall_timeout = {stall_timeout}: must be > 0 seconds")
    cap, fps = open_capture(source)
    camera = str(source).isdigit()
    frames: queue.Queue = queue.Queue(maxsize=8)
    stop = threading.Event()
    started = time.monotonic()

    def reader() -> None:
        index = 0
        try:
            while not stop.is_set():
                keep = index % vid_stride == 0
                if keep:
                    ok, image = cap.read()
                else:
                    ok = cap.grab() if hasattr(cap, "grab") else cap.read()[0]
                    image = None
                if not ok:
                    break
                if keep:
                    msec = float(cap.get(0)) if hasattr(cap, "get") else 0.0  # cv2.CAP_PROP_POS_MSEC == 0
                    t = (time.monotonic() - started if camera else
                         msec / 1000.0 if msec > 0 or index == 0 else index / fps if fps else float(index))
                    _put(frames, stop, ("frame", index, t, image))
                index += 1
        except Exception as e:  # noqa: BLE001 - reported to the consumer, which raises it in one line
            _put(frames, stop, ("error", e))
        finally:  # released by the thread that reads (never while a read is in progress)
            if hasattr(cap, "release"):
                cap.release()
        _put(frames, stop, ("end",))

    thread = threading.Thread(target=reader, name="detkit-video-reader", daemon=True)
    thread.start()
    yielded = last = 0
    try:
        while max_frames is None or yielded < int(max_frames):
            try:
                item = frames.get(timeout=float(stall_timeout))
            except queue.Empty:
                raise StreamStalled(f"{source}: no frame for {stall_timeout:g} s after {yielded} frames (frame "
                                    f"{last}): the stream stalled; the results so far are kept") from None
            if item[0] == "end":
                return
            if item[0] == "error":
                raise DataError(f"{source}: reading frame {last + 1} failed: {item[1]}")
            _, index, t, image = item
            if image is None or image.ndim != 3 or image.shape[2] < 3:
                raise DataError(f"{source}: frame {index} is not a colour image (shape "
                                f"{getattr(image, 'shape', None)})")
            last = index
            yielded += 1
            yield Frame(index, t, np.ascontiguousarray(image[:, :, 2::-1]))  # BGR -> RGB
    finally:
        stop.set()


def _put(q: queue.Queue, stop: threading.Event, item: tuple) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


class VideoWriter:
    """An MP4 (``mp4v``) file of RGB frames at ``fps``; ``close()`` (or the context manager) finishes it."""

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int]) -> None:
        import cv2

        self.path = Path(path)
        w, h = size
        self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (int(w), int(h)))
        if not self._writer.isOpened():
            raise DataError(f"{self.path}: cannot write a video here (OpenCV's mp4v writer failed)")
        self.size, self.frames = (int(w), int(h)), 0

    def write(self, rgb: np.ndarray) -> None:
        import cv2

        if (rgb.shape[1], rgb.shape[0]) != self.size:  # a stream that changes size mid-way: fitted to the first
            rgb = cv2.resize(rgb, self.size, interpolation=cv2.INTER_AREA)
        self._writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
        self.frames += 1

    def close(self) -> None:
        self._writer.release()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

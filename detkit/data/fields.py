"""Checks of untrusted values shared by the readers: one-line errors that name the file, the field and the value;
image headers read (never decoded) under a pixel limit; COCO segmentations checked before pycocotools sees them.

Integers: a JSON integer, or a finite float with an integral value (``3.0``, lossless); never a bool, a string
(``"3"``), ``1.5``, NaN or infinity. Ids are integers in ``0..2**63-1``; image sides in ``1..MAX_SIDE``.
Numbers in text formats (XML, txt) are parsed with ``float``: ``"nan"``, ``"inf"`` and overflowing ``"1e999"``
are not finite numbers.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from detkit.errors import DataError

MAX_ID = 2**63 - 1  # ids must fit an int64 (pycocotools, numpy)
MAX_SIDE = 2**20  # an image side (width, height) no real image exceeds
SEGMENT_MARGIN = 1.0  # polygon vertices may lie this many image sizes outside the image (pycocotools' rasteriser
# allocates memory in proportion to the edges' lengths: a vertex at 1e12 would take it all)


def show(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile value can be a megabyte long)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int of over 4300 digits, a container nested too deeply
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def bad_value(file: Any, field: str, value: Any, expected: str) -> DataError:
    """``<file>: <field> = <value>: expected <expected>``."""
    return DataError(f"{file}: {field} = {show(value)}: expected {expected}")


def as_int(value: Any) -> int | None:
    """``value`` as an int when it is one (an int, or a finite integral float), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def is_real(value: Any) -> bool:
    """An int or float (not a bool, not a string): a JSON number."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def require_int(value: Any, file: Any, field: str, lo: int = 0, hi: int = MAX_ID) -> int:
    """``value`` as an int in ``lo..hi``, or a :class:`DataError` naming the file, the field and the value."""
    n = as_int(value)
    if n is None or not lo <= n <= hi:
        raise bad_value(file, field, value, f"an integer in {lo}..{hi}")
    return n


def text_number(text: str | None) -> float | None:
    """A finite number from text (``" 12.5 "``), or ``None`` (empty, not a number, NaN, infinite, overflowing)."""
    if text is None:
        return None
    try:
        x = float(text)
    except (ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def text_int(text: str) -> int | None:
    """An integer from text: ``"3"``, ``"3.0"``; ``None`` for ``"0.7"``, ``"abc"``, ``"nan"``."""
    stripped = text.strip()
    try:
        return int(stripped)
    except ValueError:  # "3.0", "0.7", "abc", or over Python's 4300 digits
        pass
    x = text_number(stripped)
    return int(x) if x is not None and x.is_integer() else None


def int_key(key: Any) -> Any:
    """A mapping key (of ``classes``) as an int when it is one (``3``, ``"3"``, ``"-1"``), else as it is (a name)."""
    if isinstance(key, bool) or not isinstance(key, int | str):
        return key
    try:
        return int(key)
    except ValueError:
        return key


def exists(path: Path) -> bool:
    """``path.is_file()``, false for names the OS refuses (too long, a NUL byte) instead of raising."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


# ---- images: the header is read first, its size checked, then (maybe) the pixels decoded

class ImageTooLarge(DataError):
    """An image (or mask) header claims more pixels than the limit: refused before it is decoded."""


def pixel_limit(max_pixels: int | None) -> int | None:
    """The limit in force: ``max_pixels``, or Pillow's ``Image.MAX_IMAGE_PIXELS`` when it is ``None``."""
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)


@contextmanager
def open_image(path: Path, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """``Image.open(path)`` (lazy: the header only) with detkit's pixel limit in place of Pillow's warning and
    error: an image whose header claims more than :func:`pixel_limit` pixels raises :class:`ImageTooLarge`
    naming the file, its size and the limit, before anything is decoded.

    A limit above Pillow's raises Pillow's ``Image.MAX_IMAGE_PIXELS`` to it, for the process (Pillow would
    otherwise refuse, at twice its own limit, images that ``data.max_image_pixels`` allows).
    """
    limit = pixel_limit(max_pixels)
    source = "Pillow's MAX_IMAGE_PIXELS" if max_pixels is None else "data.max_image_pixels"
    if limit is not None and Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below replaces it
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:  # over twice Pillow's limit, so over ours too
            found = re.search(r"\((\d+) pixels\)", str(e))
            claims = f"{found.group(1)} pixels" if found else "more pixels"
            raise ImageTooLarge(f"{path}: image header claims {claims}, over the limit of {limit} "
                                f"({source}): not decoded") from None
    with im:
        w, h = im.size
        if limit is not None and w * h > limit:
            raise ImageTooLarge(f"{path}: image header claims {w}x{h} = {w * h} pixels, over the limit of {limit} "
                                f"({source}): not decoded")
        yield im


def header_size(path: Path, max_pixels: int | None = None) -> tuple[int, int] | None:
    """``(width, height)`` from the image header; ``None`` when the header cannot be read (the image then fails
    when it is loaded); :class:`ImageTooLarge` over the pixel limit."""
    try:
        with open_image(path, max_pixels) as im:
            return im.size
    except ImageTooLarge:
        raise
    except (OSError, SyntaxError, ValueError, DataError):
        return None


# ---- COCO segmentations (checked at load, before pycocotools, whose C code trusts its input)

def rle_string_counts(s: bytes) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``), ``None`` if malformed."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n or not 48 <= s[p] < 112:  # truncated, or a byte the encoder never writes
                return None
            c = s[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
            if k > 13:  # more than 64 bits
                return None
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def check_segmentation(seg: Any, height: int, width: int) -> None:
    """Raise :class:`DataError` for a segmentation pycocotools cannot decode safely: polygons that are not
    lists of an even number of finite numbers or reach further than ``SEGMENT_MARGIN`` image sizes outside the
    image; RLE whose ``size`` is not ``[height, width]`` or whose run lengths are negative or do not add up to
    ``height * width``."""
    if isinstance(seg, list):
        for part in seg:
            if not isinstance(part, list) or len(part) % 2 or not all(is_real(v) and math.isfinite(v) for v in part):
                raise DataError(f"polygon {show(part)}: expected an even number of finite numbers")
            xs, ys = part[0::2], part[1::2]
            if xs and (min(xs) < -SEGMENT_MARGIN * width or max(xs) > (1 + SEGMENT_MARGIN) * width
                       or min(ys) < -SEGMENT_MARGIN * height or max(ys) > (1 + SEGMENT_MARGIN) * height):
                raise DataError(f"polygon reaches far outside the {width}x{height} image")
        return
    if not isinstance(seg, dict):
        raise DataError(f"unsupported segmentation of type {type(seg).__name__}")
    size, counts = seg.get("size"), seg.get("counts")
    if not isinstance(size, list) or [as_int(v) for v in size] != [height, width]:
        raise DataError(f"RLE 'size' = {show(size)}: expected [{height}, {width}], the image's [height, width]")
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise DataError("RLE 'counts' is not ASCII") from None
    if isinstance(counts, bytes):
        runs = rle_string_counts(counts)
        if runs is None:
            raise DataError(f"RLE 'counts' = {show(counts)}: not a COCO RLE string")
    elif isinstance(counts, list):
        runs = [as_int(v) for v in counts]
        if any(r is None for r in runs):
            raise DataError(f"RLE 'counts' = {show(counts)}: expected integers")
    else:
        raise DataError(f"RLE 'counts' = {show(counts)}: expected a string or a list of integers")
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise DataError(f"RLE run lengths add up to {sum(runs)} (or are negative), not {height} x {width}")

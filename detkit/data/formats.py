"""The dataset-format registry: every format's reader, its options and its traits, registered once.

``data.<split>.format`` names an entry of :data:`FORMATS`; nothing else in detkit keeps a list of formats. The
config schema, ``detkit data ...``'s ``--format`` and its option flags, and ``detkit data convert`` all read it.

A format is a reader class (a :class:`~detkit.data.dataset.DetectionDataset`) registered with its
:class:`FormatTraits`. The reader's constructor takes the keys every dataset block has (``images``,
``annotations``, ``split``, ``classes``, ``name``) plus ``transform`` and ``max_pixels``; the format's own options
(``label_suffix``, ``ignore_index``, ...) are the fields of the reader's ``Options`` dataclass (each with its default
and, in the field's metadata, a ``help`` line), set in the same block (``data.train.label_suffix: _mask``) and
passed to the constructor as keyword arguments. Adding a format is one reader file plus one line below.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from detkit.config.schema import DatasetConfig
from detkit.errors import ConfigError
from detkit.utils.params import check_value
from detkit.utils.registry import Registry, import_target

COMMON_KEYS = tuple(f.name for f in dataclasses.fields(DatasetConfig))  # what every dataset block has


@dataclass(frozen=True)
class FormatTraits:
    """What the rest of detkit asks about a format, declared when it is registered.

    ``annotations``: what ``data.<split>.annotations`` names (``"the JSON file"``, ``"the annotation folder"``), or
    ``None`` where it may be left out. ``masks``: the files can hold instance masks (the reader takes
    ``with_masks``: decoded when the head's traits ask for them). ``semantic``: per-pixel label maps (U-Net's
    data), not objects. ``writer``: ``"module:function"`` writing any object dataset in this format
    (``detkit data convert --to``), ``None`` when detkit cannot write it.
    """

    annotations: str | None = "the annotation folder"
    masks: bool = False
    semantic: bool = False
    writer: str | None = None

    @property
    def task(self) -> str:
        """The dataset task its readers give: ``semantic``, ``instance`` (with masks) or ``detection``."""
        return "semantic" if self.semantic else "instance" if self.masks else "detection"

    def write(self) -> Any:
        """The writer: ``write(dataset, out, images_root) -> counts`` (``detkit data convert``)."""
        if self.writer is None:
            raise ConfigError("this dataset format has no writer")
        return import_target(self.writer)


FORMATS: Registry = Registry("dataset format", "data.<split>.format", hint="see docs/data.md")

# name               reader                                            traits
FORMATS.register("coco", "detkit.data.coco:CocoDataset",
                 FormatTraits("the JSON file", masks=True, writer="detkit.data.to_coco:to_coco"))
FORMATS.register("voc", "detkit.data.voc:VocDataset", FormatTraits(writer="detkit.data.writers:to_voc"))
FORMATS.register("yolo", "detkit.data.yolo:YoloDataset",
                 FormatTraits(None, masks=True, writer="detkit.data.writers:to_yolo"))
FORMATS.register("masks", "detkit.data.masks:SemanticMaskDataset", FormatTraits(semantic=True))
FORMATS.register("instance_masks", "detkit.data.masks:InstanceMaskDataset", FormatTraits(masks=True))


def convert_sources() -> list[str]:
    """Formats ``detkit data convert`` reads: those of objects (boxes, instance masks), not label maps."""
    return FORMATS.names(lambda e: not e.traits.semantic)


def convert_targets() -> list[str]:
    """Formats ``detkit data convert --to`` writes: those with a writer."""
    return FORMATS.names(lambda e: e.traits.writer is not None)


def format_traits(name: Any, key: str = "data.<split>") -> FormatTraits:
    """The traits of format ``name`` (one line naming ``key``.format for an unknown one)."""
    return FORMATS.traits(known_format(name, key))


def known_format(fmt: Any, key: str = "data.<split>") -> str:
    """``fmt`` when it is a registered format name, else one :class:`ConfigError` line naming ``key``.format."""
    if isinstance(fmt, str) and fmt in FORMATS:
        return fmt
    known = FORMATS.names()
    if fmt is None:
        raise ConfigError(f"{key}.format is not set: one of {', '.join(known)}")
    close = difflib.get_close_matches(str(fmt), known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{key}.format = {fmt!r}: {hint}expected one of {', '.join(known)}")


def options_of(name: str) -> type | None:
    """The ``Options`` dataclass of format ``name``'s reader (``None``: the format has no options)."""
    return getattr(FORMATS.get(name), "Options", None)


def option_fields(name: str) -> dict[str, dataclasses.Field]:
    options = options_of(name)
    return {f.name: f for f in dataclasses.fields(options)} if options is not None else {}


def all_options() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every option of every registered format: name -> (its field, the formats that take it)."""
    found: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name in FORMATS.names():
        for option, f in option_fields(name).items():
            found.setdefault(option, (f, []))[1].append(name)
    return found


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _is_legacy(option: str, value: Any) -> bool:
    """Configs written before formats declared their own options list every format's options at their defaults
    (``label_suffix: ''`` in a COCO block): such a key says nothing and is accepted."""
    known = all_options().get(option)
    return known is not None and value == _default(known[0])


def check_dataset_config(block: Any, key: str = "data") -> dict[str, Any] | None:
    """A ``data.<split>`` block (a config node or a dict) against its format: the format is registered, its
    annotations are named, and every key beyond :data:`COMMON_KEYS` is an option of that format with a value of the
    option's type. Returns the reader's options (defaults filled in), or ``None`` for an unset block. Every mistake is
    one :class:`ConfigError` line naming ``key``."""
    items = _items(block)
    fmt = items.get("format")
    fields = option_fields(known_format(fmt, key)) if fmt is not None else {}
    options: dict[str, Any] = {}
    for option, value in items.items():
        if option in COMMON_KEYS:
            continue
        if option in fields:
            check_value(f"{key}.{option}", value, typing.get_type_hints(options_of(fmt))[option])
            options[option] = value
        elif not _is_legacy(option, value):
            raise ConfigError(_unknown(option, value, fmt, fields, key))
    if fmt is None:
        return None
    traits = format_traits(fmt, key)
    if not items.get("images"):
        raise ConfigError(f"{key}.images is not set: the image folder")
    if traits.annotations is not None and not items.get("annotations"):
        raise ConfigError(f"{key}.annotations is not set ({fmt}: {traits.annotations})")
    return {**{n: _default(f) for n, f in fields.items()}, **options}


def _unknown(option: str, value: Any, fmt: str | None, fields: Mapping[str, Any], key: str) -> str:
    takers = all_options().get(option)
    if takers is not None:
        where = f"format {fmt}" if fmt else "a block without a format"
        return (f"{key}.{option} = {value!r}: {where} has no option {option!r} (it is an option of "
                f"{', '.join(takers[1])})")
    close = difflib.get_close_matches(option, [*COMMON_KEYS, *fields], n=1, cutoff=0.6)
    hint = f"did you mean '{key}.{close[0]}'?" if close else f"known keys here: {', '.join([*COMMON_KEYS, *fields])}"
    return f"unknown config key '{key}.{option}' ({hint})"


def _items(block: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(block):
        return OmegaConf.to_container(block, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(block):
        return dataclasses.asdict(block)  # type: ignore[arg-type]
    return dict(block or {})


def check_data_config(data: Any) -> None:
    """Every dataset block of ``data`` (``train``, ``val``, ``test``): :func:`check_dataset_config`."""
    for split in ("train", "val", "test"):
        check_dataset_config(data[split], f"data.{split}")

"""One registry class for every kind of part (backbones, necks, heads).

A registry maps the name a config uses (``model.head.name: yolo``) to what builds the part and to the part's
*traits*: what the rest of the code needs to know about it without building it (a head's task, how it exports).
The registry is the only list of names: configs, checks, the data module, evaluation and export ask it.

An entry's target is an object, or a ``"module:attribute"`` string imported on first use, so that a registry can
list its built-in parts (and their traits) without importing their code. ``Registry.contract`` is a
``typing.Protocol`` (the part's contract): :meth:`Registry.check` tells, in one line, which attribute a built part
lacks.

    HEADS.register("toy", build_toy_head, HeadTraits(task="detection", export="flat"))
    HEADS.get("toy")(params, channels, strides, num_classes, image_size)
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from detkit.errors import ConfigError

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    """One registered part: its ``name``, its ``target`` (the object, or ``"module:attribute"``) and ``traits``."""

    name: str
    target: T | str
    traits: Any = None

    def load(self) -> T:
        if isinstance(self.target, str):
            self.target = import_target(self.target)
        return self.target  # type: ignore[return-value]


def import_target(spec: str) -> Any:
    """The object a ``"module:attribute"`` string names (imported now)."""
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Registry(Generic[T]):
    """Names of one ``kind`` of part (``"head"``), set by the config key ``key`` (``"model.head.name"``).

    ``prefixes`` are families reached by a name prefix (``"timm:"`` + any timm model): ``get`` returns the
    family's target for every such name.
    """

    def __init__(self, kind: str, key: str, contract: type | None = None, hint: str = "") -> None:
        self.kind, self.key, self.contract, self.hint = kind, key, contract, hint
        self._entries: dict[str, Entry[T]] = {}
        self._prefixes: dict[str, Entry[T]] = {}

    # ------------------------------------------------------------------------------------------ registering
    def register(self, name: str, target: T | str | None = None, traits: Any = None, *,
                 replace: bool = False) -> Any:
        """Add ``name``; without ``target``, a decorator: ``@HEADS.register("x", traits=...)``."""
        if target is None:
            def decorate(obj: T) -> T:
                self.register(name, obj, traits, replace=replace)
                return obj

            return decorate
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is registered already (replace=True to replace it)")
        self._entries[name] = Entry(name, target, traits)
        return target

    def register_prefix(self, prefix: str, target: T | str, traits: Any = None) -> None:
        """Every name starting with ``prefix`` (e.g. ``"timm:"``) resolves to ``target``."""
        self._prefixes[prefix] = Entry(prefix, target, traits)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (or the prefix ``name``)."""
        self._entries.pop(name, None)
        self._prefixes.pop(name, None)

    # --------------------------------------------------------------------------------------------- lookups
    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or self._prefix(name) is not None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, where: Callable[[Entry[T]], bool] | None = None) -> list[str]:
        """Registered names in registration order (those whose entry passes ``where``)."""
        return [n for n, e in self._entries.items() if where is None or where(e)]

    def entry(self, name: str) -> Entry[T]:
        """The entry of ``name``; an unknown name is one :class:`ConfigError` line with the nearest names."""
        if name in self._entries:
            return self._entries[name]
        prefixed = self._prefix(name) if isinstance(name, str) else None
        if prefixed is not None:
            return prefixed
        known = list(self._entries)
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        listed = f"known: {', '.join(known)}" if len(known) <= 12 else f"{len(known)} known"
        families = "".join(f", or {p}<name>" for p in self._prefixes)
        hint = f"; {self.hint}" if self.hint else ""
        raise ConfigError(f"{self.key} = {name!r}: unknown {self.kind} ("
                          f"{f'did you mean {close[0]!r}? ' if close else ''}{listed}{families}{hint})")

    def get(self, name: str) -> T:
        """What ``name`` builds (imported on first use when registered as ``"module:attribute"``)."""
        return self.entry(name).load()

    def traits(self, name: str) -> Any:
        return self.entry(name).traits

    def _prefix(self, name: str) -> Entry[T] | None:
        return next((e for p, e in self._prefixes.items() if name.startswith(p) and len(name) > len(p)), None)

    # ------------------------------------------------------------------------------------------- contracts
    def check(self, name: str, part: Any) -> Any:
        """``part`` (built for ``name``) has every attribute of :attr:`contract`, else a one-line ``TypeError``."""
        missing = [a for a in contract_attributes(self.contract) if not hasattr(part, a)] if self.contract else []
        if missing:
            raise TypeError(f"{self.kind} {name!r} ({type(part).__name__}) does not keep the {self.kind} contract "
                            f"({self.contract.__name__}): it has no {', '.join(missing)}")
        return part


def contract_attributes(protocol: type) -> list[str]:
    """The public attributes and methods a ``typing.Protocol`` declares (its own and its bases')."""
    names: list[str] = []
    for cls in reversed(protocol.__mro__):
        if cls is object or cls.__name__ in ("Protocol", "Generic"):
            continue
        for name in [*getattr(cls, "__annotations__", {}), *vars(cls)]:
            if not name.startswith("_") and name not in names:
                names.append(name)
    return names

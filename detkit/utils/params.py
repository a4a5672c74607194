"""A part's own settings checked against its parameter dataclass.

Every head declares its settings (``model.head.params``) as a dataclass, and every dataset format its options
(``data.<split>.<option>``): field = constructor argument, with its default. The config's free-form mapping is
validated against it: unknown keys get a "did you mean", values of the wrong type a one-line error naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from detkit.errors import ConfigError

P = TypeVar("P")


def _plain(value: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def check_type(value: Any, tp: Any) -> bool:
    if tp is Any or value is None and _optional(tp):
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(check_type(value, a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return isinstance(value, list | tuple) and all(check_type(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, Mapping)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _numbers(value: Any) -> list[Any]:
    """Every number inside ``value`` (nested lists included)."""
    if isinstance(value, list | tuple):
        return [n for v in value for n in _numbers(v)]
    return [value]


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def parse_params(cls: type[P], params: Mapping[str, Any] | None, where: str = "model.head.params",
                 also: tuple[str, ...] = ()) -> P:
    """An instance of the dataclass ``cls`` from ``params`` (missing keys keep their defaults); ``where`` is the
    config node they come from, ``also`` other keys of that node (offered by "did you mean", not passed on)."""
    params = dict(_plain(params) or {})
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in params.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), [*names, *also], n=1, cutoff=0.6)
            known = ", ".join(names) or "none"
            hint = f" (did you mean '{where}.{close[0]}'?)" if close else f" (known: {known})"
            raise ConfigError(f"unknown config key '{where}.{key}'{hint}")
        check_value(f"{where}.{key}", value, typing.get_type_hints(cls)[key])
    return cls(**params)


def check_value(key: str, value: Any, tp: Any) -> None:
    """``value`` of config key ``key`` has type ``tp`` and holds finite numbers only, else one line."""
    if any(isinstance(v, float) and not math.isfinite(v) for v in _numbers(value)):
        raise ConfigError(f"config key '{key}' = {value!r}: expected finite numbers")
    if not check_type(value, tp):
        expected = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
        raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")

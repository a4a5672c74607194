"""Loading, composing and validating configs.

A config is a YAML file. It may build on other files with a ``_base_`` key (a path or a list of paths,
relative to the file that names them); bases are merged in order, then the file itself, then the
command-line overrides (``a.b.c=value``). The result is merged onto the typed schema
(:mod:`detkit.config.schema`), so that every key is known and typed, then interpolations (``${...}``) are
resolved.

Every mistake becomes one :class:`~detkit.errors.ConfigError` line naming the source, the key and the value.
"""

from __future__ import annotations

import difflib
import math
import typing
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detkit.config.schema import Config
from detkit.errors import ConfigError

BASE_KEY = "_base_"

def _now(fmt: str = "%Y%m%d-%H%M%S") -> str:
    return datetime.now().strftime(fmt)


# ``${now:FORMAT}``: the time the config was loaded. register_new_resolver exists in omegaconf 2.1-2.4
# (2.4 deprecates it in favour of a register_resolver whose 2.3 namesake has another signature).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    OmegaConf.register_new_resolver("now", _now, replace=True, use_cache=True)


def _schema() -> DictConfig:
    schema = OmegaConf.structured(Config)
    _open(schema)
    return schema


def _open(node: DictConfig) -> None:
    """Nodes whose dataclass declares ``open_keys`` (a dataset block) accept keys the schema does not list."""
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not _is_free_form(child):
            if _is_open(child):
                OmegaConf.set_struct(child, False)
            _open(child)


def _is_open(node: Any) -> bool:
    return isinstance(node, DictConfig) and bool(getattr(OmegaConf.get_type(node), "open_keys", None))


# --------------------------------------------------------------------------------------------- reading files
def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"bad YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"bad config {path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _collect_sources(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """Return ``[(source name, dict), ...]`` in merge order: bases first (depth first), then the file."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"circular {BASE_KEY} in configs: {chain}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a path or a list of paths, got {bases!r}")
    sources: list[tuple[str, dict]] = []
    for base in bases:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: base config not found: {base} (looked for {base_path})")
        sources += _collect_sources(base_path, (*stack, path))
    sources.append((str(path), data))
    return sources


def _parse_overrides(overrides: Iterable[str]) -> dict:
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"bad override {item!r}: expected key=value, e.g. model.backbone.name=resnet50")
    for item in overrides:  # each alone first, so that the error names the override at fault
        try:
            OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            reason = " ".join(str(e).split("\n")[0:1] + [ln.strip() for ln in str(e).splitlines()[2:3]])
            raise ConfigError(f"bad override {item!r}: its value is not YAML ({reason}); a mapping needs a space "
                              f"after each colon, e.g. key={{a: 1}}, or set its keys one by one (key.a=1)") from None
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(overrides))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None


# -------------------------------------------------------------------------------------------------- checks
def _is_free_form(node: Any) -> bool:
    """True for schema dicts that take any key (``Dict[str, Any]`` fields)."""
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict


def _check_keys(data: dict, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Fail on the first key of ``data`` that the schema does not declare, suggesting the nearest one."""
    for key, value in data.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str):
            raise ConfigError(f"{source}: config key {full!r} must be a string")
        if key not in schema:
            if _is_open(schema):
                continue  # the part's own option: its part checks it (e.g. detkit.data.formats)
            known = [str(k) for k in schema.keys()]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys here: {', '.join(known)})"
            raise ConfigError(f"{source}: unknown config key '{full}'{hint}")
        child = schema._get_node(key)
        if isinstance(child, DictConfig) and not _is_free_form(child):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key '{full}' = {value!r}: expected a mapping of keys")
            _check_keys(value, child, source, prefix=f"{full}.")


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin in (list, list):
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(arg)}"
    if origin in (dict, dict):
        return "a mapping"
    if isinstance(tp, type):
        if tp.__name__ in ("int", "float", "str", "bool"):
            return tp.__name__
        return f"a mapping ({tp.__name__})"
    return str(tp).replace("typing.", "")


def _expected_type(schema: DictConfig, full_key: str) -> str:
    node: Any = schema
    for part in str(full_key).replace("[", ".").replace("]", "").split("."):
        if not isinstance(node, (DictConfig, ListConfig)):
            break
        try:
            node = node._get_node(int(part) if isinstance(node, ListConfig) else part)
        except (KeyError, ValueError, OmegaConfBaseException):
            return "a valid value"
        if node is None:
            return "a valid value"
    if node is None:
        return "a valid value"
    name = _type_name(node._metadata.ref_type)
    nullable = node._metadata.optional and not name.endswith("or null") and name != "any value"
    return f"{name} or null" if nullable else name


RANGE_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
RANGE_TESTS = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def _check_value(key: str, value: Any, metadata: Any, source: str) -> None:
    """One key's value against its ``choices`` or ``range`` metadata; every float must be finite."""
    if "choices" in metadata and value not in metadata["choices"]:
        allowed = ", ".join("null" if c is None else str(c) for c in metadata["choices"])
        raise ConfigError(f"{source}: config key '{key}' = {value!r}: expected one of {allowed}")
    values = list(value) if isinstance(value, ListConfig | list) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{source}: config key '{key}' = {_plain(value)!r}: expected a finite number")
        bounds = metadata.get("range") or {}
        if isinstance(v, int | float) and not isinstance(v, bool) and bounds:
            if not all(RANGE_TESTS[k](v, b) for k, b in bounds.items()):
                want = " and ".join(f"{RANGE_WORDS[k]} {b}" for k, b in bounds.items())
                what = "values" if isinstance(value, ListConfig | list) else "a value"
                raise ConfigError(f"{source}: config key '{key}' = {_plain(value)!r}: expected {what} {want}")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


def _check_choices(cfg: DictConfig, source: str) -> None:
    """``choices`` and ``range`` metadata of the schema, and finite floats, over the whole config."""
    from dataclasses import fields, is_dataclass

    def walk(node: DictConfig, prefix: str) -> None:
        cls = OmegaConf.get_type(node)
        if not (isinstance(cls, type) and is_dataclass(cls)):
            return
        for f in fields(cls):
            value = node._get_node(f.name)
            if isinstance(value, DictConfig) and not _is_free_form(value):
                walk(value, f"{prefix}{f.name}.")
            elif not OmegaConf.is_interpolation(node, f.name) and not isinstance(value, DictConfig):
                _check_value(f"{prefix}{f.name}", node[f.name], f.metadata, source)

    walk(cfg, "")


def _merge(cfg: DictConfig, data: dict, source: str, schema: DictConfig) -> DictConfig:
    _check_keys(data, schema, source)
    try:
        merged: DictConfig = OmegaConf.merge(cfg, data)  # type: ignore[assignment]
    except TypeError as e:  # e.g. a mapping where a list is expected
        raise ConfigError(f"{source}: {str(e).splitlines()[0]} (check the types of the keys you set)") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        value = getattr(e, "value", None)
        raise ConfigError(
            f"{source}: config key '{key}' = {value!r}: expected {_expected_type(schema, key)}"
        ) from None
    _check_choices(merged, source)
    return merged


# ---------------------------------------------------------------------------------------------------- API
def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *, resolve: bool = True) -> DictConfig:
    """Load ``path`` (with its ``_base_`` files), apply ``overrides`` (``["a.b=c", ...]``) and validate.

    With ``path=None`` the schema's defaults are used. ``name`` defaults to the config file's stem.
    Raises :class:`ConfigError` (one line) on any unknown key, wrong type, bad value, bad YAML or missing file.
    """
    schema = _schema()
    cfg = schema.copy()
    sources = _collect_sources(Path(path)) if path is not None else []
    if path is not None and not any("name" in d for _, d in sources):
        sources.insert(0, ("<default name>", {"name": Path(path).stem}))
    for source, data in sources:
        cfg = _merge(cfg, data, source, schema)
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), "command line", schema)
    if resolve:
        try:
            OmegaConf.resolve(cfg)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(f"config key '{key}': cannot resolve interpolation: {str(e).splitlines()[0]}") from None
        _check_choices(cfg, "config")  # values that came from interpolations
    OmegaConf.set_readonly(cfg, False)
    return cfg


def validate(cfg: DictConfig | dict) -> DictConfig:
    """Validate an in-memory config (a dict or DictConfig built in Python) against the schema."""
    data = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    schema = _schema()
    return _merge(schema.copy(), data, "config", schema)  # type: ignore[arg-type]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)

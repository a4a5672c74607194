"""Typed YAML configs with ``_base_`` composition, interpolation and ``a.b=c`` overrides."""

from detkit.config.loader import load_config, to_yaml, validate
from detkit.config.schema import Config

__all__ = ["Config", "load_config", "to_yaml", "validate"]

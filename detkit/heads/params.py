"""Head parameters: ``model.head.params`` checked against a head's parameter dataclass
(:func:`detkit.utils.params.parse_params`, with ``where`` = :data:`WHERE`)."""

from __future__ import annotations

from detkit.utils.params import parse_params

WHERE = "model.head.params"  # where every head's settings live in a config

__all__ = ["WHERE", "parse_params"]

"""Analysis tools: complexity counting (more to come: transfer studies, design spaces)."""

from detkit.analysis.complexity import Complexity, count_built, count_complexity

__all__ = ["Complexity", "count_built", "count_complexity"]

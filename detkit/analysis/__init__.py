"""Analysis: what detkit measures about networks and runs, above the engine.

- :mod:`~detkit.analysis.complexity`: params, FLOPs (multiply-adds) and activations of any module, counted on the
  meta device (``count_complexity``, ``count_built``);
- :mod:`~detkit.analysis.backbone_table`: the rows of ``detkit backbones``;
- :mod:`~detkit.analysis.study`: the runner both studies share (trials, results, resume, reports);
- :mod:`~detkit.analysis.transfer` (``detkit transfer``), :mod:`~detkit.analysis.design_space` and
  :mod:`~detkit.analysis.design_study` (``detkit design-space``), :mod:`~detkit.analysis.lineage` (the CNN lineage),
  :mod:`~detkit.analysis.study_plots` (their plots).
"""

from detkit.analysis.complexity import Complexity, count_built, count_complexity

__all__ = ["Complexity", "count_built", "count_complexity"]

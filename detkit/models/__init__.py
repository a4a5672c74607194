"""Whole models: backbone -> neck -> head with their input normalisation, built from config or loaded from a file.

- :class:`Model` (:mod:`.base`): what every model shares (normalisation buffers, ``losses``, ``predict``);
- :class:`Detector` / :class:`Segmenter`: detection and semantic heads' outputs in original image pixels;
- :func:`build_model` (config -> model), :func:`load_model` (run directory or checkpoint -> model, no Lightning);
- :func:`load_weights` (``model.weights``: a trained detector's weights, torchvision's through the head's layout).
"""

from detkit.models.base import Model
from detkit.models.build import build_model, check_model_config
from detkit.models.detector import DETECTION_OUTPUTS, Detector, train_targets
from detkit.models.load import load_model, read_checkpoint, resolve_checkpoint, run_dir_of
from detkit.models.segmenter import Segmenter
from detkit.models.weights import WeightsReport, load_weights

__all__ = ["DETECTION_OUTPUTS", "Detector", "Model", "Segmenter", "build_model", "check_model_config",
           "load_model", "read_checkpoint", "resolve_checkpoint", "run_dir_of", "train_targets", "WeightsReport",
           "load_weights"]

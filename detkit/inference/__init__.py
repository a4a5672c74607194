"""Inference: the Predictor (checkpoint -> detections in original pixels), drawing, and prediction files."""

from detkit.inference.predictor import Predictor, expand_inputs, to_rgb_array
from detkit.utils.draw import draw_detections, draw_semantic

__all__ = ["Predictor", "draw_detections", "draw_semantic", "expand_inputs", "to_rgb_array"]

#!/usr/bin/env python
"""Run a trained model over images through the Python API (what `detkit predict` does, in a few lines).

    python tools/infer.py RUN_DIR|CHECKPOINT IMAGE_OR_FOLDER... [--out DIR] [--score-threshold T]
"""

import argparse

from detkit.inference import Predictor, expand_inputs
from detkit.inference.run import predict_files

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("checkpoint")
parser.add_argument("inputs", nargs="+")
parser.add_argument("--out", default="runs/infer")
parser.add_argument("--score-threshold", type=float, default=0.3)
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, score_threshold=args.score_threshold)
summary = predict_files(predictor, expand_inputs(args.inputs), args.out)
found = "label maps" if summary["task"] == "semantic" else f"{summary['detections']} detections"
print(f"{summary['images']} images, {found} -> {summary['out']}")

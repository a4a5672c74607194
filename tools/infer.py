#!/usr/bin/env python
"""Run a trained model over images through the Python API (what `detkit predict` does, in a few lines).

    python tools/infer.py RUN_DIR|CHECKPOINT IMAGE|FOLDER|GLOB... [--out DIR] [--score-threshold T]
                          [--batch-size B] [--device cpu|cuda] [--classes a,b]
"""

import argparse
import sys

from detkit.cli import positive_int
from detkit.errors import DetkitError
from detkit.inference import Predictor, expand_inputs
from detkit.inference.run import format_summary, predict_files

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("checkpoint")
parser.add_argument("inputs", nargs="+")
parser.add_argument("--out", default="runs/infer")
parser.add_argument("--score-threshold", type=float, default=0.3)
parser.add_argument("--batch-size", type=positive_int, default=4)
parser.add_argument("--device", default="cpu")
parser.add_argument("--classes", default=None, help="comma-separated class names to keep (default: all)")
args = parser.parse_args()

try:
    files = expand_inputs(args.inputs)
    if not files:
        raise DetkitError(f"no images found in {' '.join(args.inputs)}")
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size,
                                          score_threshold=args.score_threshold, classes=args.classes)
    summary = predict_files(predictor, files, args.out)
except DetkitError as e:
    sys.exit(f"infer.py: error: {e}")
print(format_summary(summary))

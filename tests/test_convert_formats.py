"""`detkit data convert --to yolo|voc`: written files read back to the same boxes (within rounding)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shapes_cfg
from detkit.cli import main
from detkit.data.build import build_dataset
from detkit.data.to_coco import dataset_to_coco


def _boxes(gt):
    """file name -> sorted rows of (category, x, y, w, h)."""
    names = {img["id"]: img["file_name"].split("/")[-1] for img in gt["images"]}
    out = {}
    for a in gt["annotations"]:
        out.setdefault(names[a["image_id"]], []).append([a["category_id"], *a["bbox"]])
    return {k: np.array(sorted(v)) for k, v in out.items()}


@pytest.mark.parametrize("fmt,atol", [("yolo", 1e-3), ("voc", 0.006)])
def test_coco_to_yolo_or_voc_and_back_keeps_every_box(shapes_dir, tmp_path, fmt, atol, capsys):
    source = shapes_cfg(shapes_dir, "val")
    out = tmp_path / fmt
    assert main(["data", "convert", "--format", "coco", "--images", source["images"], "--annotations",
                 source["annotations"], "--to", fmt, str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "dataset.yaml").is_file()
    original = build_dataset({**source, "format": "coco"})
    back = build_dataset({"format": fmt, "images": source["images"],
                          "annotations": str(out / "labels" if fmt == "yolo" else out),
                          "classes": list(original.classes)})
    a, b = _boxes(dataset_to_coco(original)), _boxes(dataset_to_coco(back))
    assert a.keys() == b.keys() and sum(len(v) for v in a.values()) > 10
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=atol, rtol=0, err_msg=name)
    if fmt == "yolo":  # and again to COCO, as `detkit data convert` does it
        coco = tmp_path / "back.json"
        assert main(["data", "convert", "--format", "yolo", "--images", source["images"], "--annotations",
                     str(out / "labels"), "--classes", ",".join(original.classes), "--to", "coco", str(coco)]) == 0
        import json

        again = json.loads(coco.read_text())
        assert len(again["annotations"]) == sum(len(v) for v in a.values())

"""Dataset formats are registered once (detkit.data.formats.FORMATS): the schema, the CLI and ``data convert`` read
the registry, each format's options are checked in one line, and a new format is one reader plus one registry line
away from training through the CLI."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, ROOT
from detkit.config import load_config
from detkit.data.dataset import DetectionDataset, Record, list_images, resolve_classes
from detkit.data.formats import (
    FORMATS,
    FormatTraits,
    all_options,
    check_data_config,
    check_dataset_config,
    convert_sources,
    convert_targets,
)
from detkit.errors import ConfigError

RACCOON = {"format": "voc", "images": str(FIXTURES / "raccoon_mini/images"),
           "annotations": str(FIXTURES / "raccoon_mini/annotations")}


def test_the_registry_holds_every_format_with_its_traits_and_options():
    assert FORMATS.names() == ["coco", "voc", "yolo", "masks", "instance_masks"]
    assert [n for n in FORMATS.names() if FORMATS.traits(n).semantic] == ["masks"]
    assert convert_sources() == ["coco", "voc", "yolo", "instance_masks"]
    assert convert_targets() == ["coco", "voc", "yolo"]
    options = all_options()
    assert options["label_suffix"][0].default == "" and options["label_suffix"][1] == ["masks", "instance_masks"]
    assert options["ignore_index"][0].default == 255 and options["ignore_index"][1] == ["masks"]
    # the schema lists no format and no option: they are the registry's
    from detkit.config.schema import DatasetConfig

    assert "choices" not in DatasetConfig.__dataclass_fields__["format"].metadata
    assert not {"label_suffix", "ignore_index"} & set(DatasetConfig.__dataclass_fields__)


def test_options_are_checked_against_the_format_in_one_line():
    assert check_dataset_config({**RACCOON}, "data.train") == {}
    masks = {"format": "masks", "images": "i", "annotations": "a"}
    assert check_dataset_config({**masks, "ignore_index": 11}, "data.val") == {"label_suffix": "", "ignore_index": 11}
    cases = [
        ({**masks, "label_sufix": "_m"}, r"unknown config key 'data.val.label_sufix' \(did you mean "
                                         r"'data.val.label_suffix'\?\)"),
        ({**RACCOON, "imags": "x"}, r"unknown config key 'data.val.imags' \(did you mean 'data.val.images'\?\)"),
        ({**RACCOON, "ignore_index": 3}, r"data.val.ignore_index = 3: format voc has no option 'ignore_index' \(it "
                                         r"is an option of masks\)"),
        ({**masks, "label_suffix": 3}, r"config key 'data.val.label_suffix' = 3: expected str"),
        ({**masks, "ignore_index": float("nan")}, r"'data.val.ignore_index' = nan: expected finite numbers"),
        ({**RACCOON, "format": "vco"}, r"data.val.format = 'vco': did you mean 'voc'\? expected one of coco, voc, "),
        ({"format": "coco", "images": "i"}, r"data.val.annotations is not set \(coco: the JSON file\)"),
    ]
    for block, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_dataset_config(block, "data.val")
    check_dataset_config({"format": "yolo", "images": "i"}, "data.val")  # yolo: labels/ found beside the images


def test_configs_and_checkpoints_written_before_the_registry_still_load():
    """Old configs list every option at its default in every block (COCO ones too): accepted; a non-default value
    of another format's option is still an error."""
    old = {"format": "coco", "images": "i", "annotations": "a.json", "label_suffix": "", "ignore_index": 255}
    assert check_dataset_config(old, "data.train") == {}
    assert check_dataset_config({"format": None, "label_suffix": "", "ignore_index": 255}, "data.test") is None
    with pytest.raises(ConfigError, match="format coco has no option 'label_suffix'"):
        check_dataset_config({**old, "label_suffix": "_mask"}, "data.train")
    checkpoint_config = load_config(None, ["data.train.label_suffix=''", "data.train.ignore_index=255"])
    check_data_config(checkpoint_config.data)


def test_the_engine_and_config_show_check_formats_before_anything_runs(tmp_path, capsys):
    from detkit.cli import main

    config = str(ROOT / "configs/faster_rcnn/shapes.yaml")
    for override, message in (("data.val.format=cocoo", "data.val.format = 'cocoo': did you mean 'coco'?"),
                              ("data.train.label_suffix=_m", "format coco has no option 'label_suffix'")):
        assert main(["config", "show", config, override]) == 2
        assert message in capsys.readouterr().err
        assert main(["train", config, override, f"output_dir={tmp_path / 'run'}"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_the_cli_takes_formats_and_options_from_the_registry(capsys):
    from detkit.cli import main

    mini = ["--images", str(FIXTURES / "raccoon_mini/images"), "--annotations",
            str(FIXTURES / "raccoon_mini/annotations")]
    assert main(["data", "stats", "--format", "voc", *mini, "--json", "--no-check-images"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] > 0
    assert main(["data", "stats", "--format", "voc", *mini, "--ignore-index", "3"]) == 2
    assert "--ignore-index: --format voc has no such option (it is one of masks)" in capsys.readouterr().err
    assert main(["data", "stats", str(ROOT / "configs/_base_/data/camvid.yaml"), "--ignore-index", "3"]) == 2
    assert "give either CONFIG or --format/--images/--annotations/--ignore-index, not both" in capsys.readouterr().err
    assert main(["data", "convert", "--format", "masks", *mini, "out"]) == 2
    assert "convert takes coco, voc, yolo, instance_masks" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a new format, from a test file
@dataclass
class CsvOptions:
    delimiter: str = field(default=",", metadata={"help": "the column separator"})


class CsvDataset(DetectionDataset):
    """A toy format: one CSV row per object, ``file,x1,y1,x2,y2,class`` (an image without a row has no object)."""

    Options = CsvOptions

    def __init__(self, images, annotations, split=None, classes=None, name=None, transform=None, max_pixels=None,
                 delimiter=","):
        super().__init__(name or Path(annotations).stem, transform, max_pixels)
        rows = list(csv.reader(Path(annotations).read_text().splitlines(), delimiter=delimiter))
        given = resolve_classes(classes)
        self.classes = list(given[0]) if given else sorted({r[5] for r in rows})
        self.cat_ids = list(self.classes)
        label = {c: i + 1 for i, c in enumerate(self.classes)}
        objects: dict[str, list[list[str]]] = {}
        for row in rows:
            objects.setdefault(row[0], []).append(row)
        for i, file in enumerate(list_images(Path(images))):
            mine = objects.get(file.name, [])
            self.records.append(Record(
                image_id=i, file=file, boxes=np.array([[float(v) for v in r[1:5]] for r in mine], np.float32
                                                      ).reshape(-1, 4),
                labels=np.array([label[r[5]] for r in mine], np.int64), iscrowd=np.zeros(len(mine), bool),
                difficult=np.zeros(len(mine), bool), source=Path(annotations)))


def _write_csv(shapes_dir: Path, split: str, out: Path, delimiter: str) -> Path:
    coco = json.loads((shapes_dir / "annotations" / f"instances_{split}.json").read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    lines = [delimiter.join([files[a["image_id"]], *(f"{v:.1f}" for v in (a["bbox"][0], a["bbox"][1],
                             a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])), names[a["category_id"]]])
             for a in coco["annotations"]]
    out.write_text("\n".join(lines) + "\n")
    return out


def test_a_format_registered_from_a_test_file_trains_through_the_cli(shapes_dir, tmp_path, capsys):
    import detkit
    from detkit.cli import main

    train = _write_csv(shapes_dir, "train", tmp_path / "train.csv", ";")
    val = _write_csv(shapes_dir, "val", tmp_path / "val.csv", ";")
    config = tmp_path / "csv.yaml"
    config.write_text(f"""
_base_: [{ROOT / 'configs/yolo/shapes.yaml'}]
data:
  generate: null
  train: {{format: csv, images: {shapes_dir}/images/train, annotations: {train}, delimiter: ';', name: csv-train}}
  val: {{format: csv, images: {shapes_dir}/images/val, annotations: {val}, delimiter: ';', name: csv-val}}
  image_size: 64
  batch_size: 4
  num_workers: 0
model: {{backbone: {{name: resnet18}}, neck: {{out_channels: 16}}}}
train: {{epochs: 1, warmup_iters: 1}}
trainer: {{max_steps: 2, limit_val_batches: 2, enable_progress_bar: false, enable_model_summary: false,
          accelerator: cpu}}
output_dir: {tmp_path / 'run'}
""")
    FORMATS.register("csv", CsvDataset, FormatTraits("the CSV file"))  # the one line
    try:
        assert main(["data", "stats", "--format", "csv", "--images", f"{shapes_dir}/images/train", "--annotations",
                     str(train), "--delimiter", ";", "--json", "--no-check-images"]) == 0
        stats = json.loads(capsys.readouterr().out)
        assert stats["instances"] == len(train.read_text().splitlines())
        assert main(["train", str(config)]) == 0
        run = tmp_path / "run"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["bbox_AP"] is not None
        model = detkit.load_model(run)
        assert model.classes == sorted({line.split(";")[5] for line in train.read_text().splitlines()})
        with pytest.raises(ConfigError, match=r"unknown config key 'data.train.delimter' \(did you mean "
                                              r"'data.train.delimiter'\?\)"):
            check_data_config(load_config(config, ["data.train.delimter=;"]).data)
    finally:
        FORMATS.unregister("csv")
    assert "csv" not in FORMATS

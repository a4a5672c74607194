"""detkit.data: datasets from files to batches.

- formats: one reader per dataset format, registered once in :data:`detkit.data.formats.FORMATS` with its options
  and traits (COCO JSON, Pascal VOC XML, YOLO txt, mask folders); :func:`detkit.data.build.build_dataset` builds
  a ``data.<split>`` block;
- :mod:`~detkit.data.dataset`: the sample format, ``Record``, the ``DetectionDataset`` base, counted repairs;
- :mod:`~detkit.data.transforms`, :mod:`~detkit.data.collate`, :mod:`~detkit.data.datamodule`: albumentations
  pipelines, batches, the Lightning data module and its samplers;
- :mod:`~detkit.data.writers`, :mod:`~detkit.data.to_coco`: datasets written in another format;
- :mod:`~detkit.data.shapes`: the generated default dataset; ``stats``, ``show``, ``anchors``: ``detkit data ...``.

See docs/data.md and docs/architecture.md.
"""

"""The ground floor: small helpers every other package may use, importing nothing from detkit but ``errors``.

- :mod:`detkit.utils.io`: atomic file writes (JSON, text, bytes).
- :mod:`detkit.utils.registry`: the one ``Registry`` class behind the backbone, neck and head registries.
- :mod:`detkit.utils.draw`: boxes, instance masks and label maps drawn on images (``data show``, ``predict``).
"""

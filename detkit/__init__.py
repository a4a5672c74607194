"""detkit: object detection and segmentation on swappable backbones."""

__version__ = "0.1.0"

from detkit.config import load_config
from detkit.errors import ConfigError, DetkitError, PretrainedError


def build_backbone(*args, **kwargs):
    """See :func:`detkit.backbones.build_backbone` (imported lazily: torch is heavy)."""
    from detkit.backbones import build_backbone as _build

    return _build(*args, **kwargs)


__all__ = ["ConfigError", "DetkitError", "PretrainedError", "__version__", "build_backbone", "load_config"]

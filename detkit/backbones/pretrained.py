"""Loading pretrained weights into a backbone's network: from a file, or by the library's own name.

``pretrained`` is ``None`` (random init), a path to a state dict (``.pth``/``.pt``/``.bin``/``.safetensors``,
possibly wrapped in ``{"state_dict": ...}`` or ``{"model": ...}``), or named weights that the library itself
downloads (torchvision's ``IMAGENET1K_V1``/``DEFAULT``, timm's pretrained tags). Offline, named weights fail
in one line that suggests a local file.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from detkit.errors import PretrainedError
from detkit.utils.io import torch_load_data

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_WRAPPERS = ("state_dict", "model", "model_state", "module", "params")
_PREFIXES = ("module.", "model.", "backbone.", "backbone.network.", "network.", "backbone.body.", "body.")


def looks_like_path(value: str) -> bool:
    return (os.sep in value or "/" in value or value.endswith(WEIGHT_SUFFIXES) or Path(value).exists())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"model.backbone.pretrained: weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch_load_data(path)
    except ValueError as e:  # a corrupt file, a pickle that would run code (UnsafeFile)
        raise PretrainedError(f"cannot read weights file {e}") from None
    except Exception as e:  # safetensors' own errors
        reason = str(e).splitlines()[0] if str(e) else ""
        raise PretrainedError(f"cannot read weights file {path}: {type(e).__name__}: {reason}") from None
    for key in _WRAPPERS:
        if isinstance(data, Mapping) and key in data and isinstance(data[key], Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise PretrainedError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(data)


def _best_key_mapping(state: dict[str, torch.Tensor], target: Iterable[str]) -> dict[str, torch.Tensor]:
    """Strip or add the usual wrapper prefixes (``module.``, ``backbone.`` ...) so that most keys match."""
    target = set(target)
    candidates = [state]
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state):
            candidates.append({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        candidates.append({prefix + k: v for k, v in state.items()})
    return max(candidates, key=lambda s: len(target & s.keys()))


def load_into(
    network: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    name: str,
    ignored_prefixes: tuple[str, ...] = (),
) -> dict[str, list[str]]:
    """Load ``state`` into ``network`` non-strictly, failing on shape mismatches and reporting the rest.

    Keys under ``ignored_prefixes`` (the classifier head the backbone dropped) are expected to be unused.
    Returns ``{"missing": [...], "unexpected": [...], "ignored": [...]}``.
    """
    own = network.state_dict()
    state = _best_key_mapping(state, own.keys())
    matched = [k for k in state if k in own]
    if not matched:
        example = next(iter(state), "<empty>")
        raise PretrainedError(
            f"{source}: no key matches backbone {name} (file has e.g. {example!r}, backbone has e.g. "
            f"{next(iter(own))!r}): is it the right file?"
        )
    for key in matched:
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise PretrainedError(
                f"{source}: shape mismatch for key '{key}': {tuple(state[key].shape)} in the file, "
                f"{tuple(own[key].shape)} in backbone {name}"
            )
    unexpected_all = [k for k in state if k not in own]
    ignored = [k for k in unexpected_all if k.startswith(ignored_prefixes)] if ignored_prefixes else []
    # BN's step counter has no counterpart in frozen BN: not worth a warning
    unexpected = [k for k in unexpected_all if k not in ignored and not k.endswith("num_batches_tracked")]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    network.load_state_dict({k: state[k] for k in matched}, strict=False)
    log.info("loaded %d tensors from %s into %s (%d classifier keys not used)", len(matched), source, name,
             len(ignored))
    if missing:
        log.warning("%s: %d keys of %s are not in the file and keep their initial values: %s", source, len(missing),
                    name, _short(missing))
    if unexpected:
        log.warning("%s: %d keys in the file are not in %s and were not used: %s", source, len(unexpected), name,
                    _short(unexpected))
    return {"missing": missing, "unexpected": unexpected, "ignored": ignored}


def _short(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (a fast offline check)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def fetch_named(name: str, weights: str, download: Callable[[], dict[str, torch.Tensor]] | Callable[[], nn.Module],
                host: str | None = None, cached: bool = False):
    """Run a library's download of named weights; any failure becomes one line suggesting a local file.

    When ``host`` (where the library downloads from) cannot be reached and the weights are not ``cached``,
    fail at once instead of waiting for the library's retries.
    """
    hint = "download them elsewhere and set model.backbone.pretrained=/path/to/weights.pth"
    if host and not cached and not host_reachable(host):
        raise PretrainedError(f"cannot fetch named weights {weights!r} for {name}: {host} is not reachable "
                              f"(offline?); {hint}")
    try:
        return download()
    except PretrainedError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PretrainedError(
            f"cannot fetch named weights {weights!r} for {name} (offline? {type(e).__name__}: {reason[:160]}); {hint}"
        ) from None


def torchvision_weights(model: str, tag: str, label: str) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict, description)`` of torchvision's named weights ``tag`` of classifier ``model`` (``label``: the
    backbone's name in messages); downloaded when online, from torch's hub cache when there, else one line
    suggesting a file. An unknown tag is one line listing the names."""
    from urllib.parse import urlparse

    from torchvision.models import get_model_weights

    enum = get_model_weights(model)
    names = [w.name for w in enum] + ["DEFAULT"]
    if tag not in names:
        raise PretrainedError(f"model.backbone.pretrained = {tag!r}: not a file and not named weights of {label} "
                              f"(named: {', '.join(names)})")
    weights = enum[tag]
    state = fetch_named(label, tag, lambda: weights.get_state_dict(progress=False, check_hash=True),
                        host=urlparse(weights.url).hostname, cached=in_torch_hub_cache(weights.url))
    return state, f"torchvision weights {weights}"


def in_torch_hub_cache(url: str) -> bool:
    """torch's hub cache holds the file of ``url`` (named weights load offline)."""
    from urllib.parse import urlparse

    import torch.hub

    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path)))

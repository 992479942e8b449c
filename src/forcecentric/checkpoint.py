"""Self-contained model checkpoints: ``save_model`` / ``load``.

A checkpoint carries the model config, the weights (EMA weights when EMA was on), the
normalization (energy scale and shift, per-element reference energies), the element set, the
package version and a description of the training data, so ``load(path)`` needs nothing else.
``load`` also accepts the Lightning checkpoints of a run directory (``checkpoints/*.ckpt``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import ModelConfig, validate
from .errors import CheckpointError, ConfigError

FORMAT = "forcecentric-model"
FORMAT_VERSION = 1


def model_payload(model, **extra: Any) -> dict[str, Any]:
    """The metadata part of a checkpoint (everything except the weights).

    ``model_kind`` is ``"force_field"`` (a ``ForceField``) or ``"property"`` (a
    ``PropertyModel``, whose ``targets`` are recorded; its priors travel in the weights)."""
    from .nn.properties import PropertyModel

    meta = dict(getattr(model, "metadata", {}) or {})
    meta.update(extra)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "model_kind": "property" if isinstance(model, PropertyModel) else "force_field",
        "model_config": model.config.model_dump(mode="json"),
        "elements": sorted(int(z) for z in getattr(model, "elements", []) or []),
        "metadata": meta,
    }
    if isinstance(model, PropertyModel):
        payload["targets"] = list(model.targets)
    else:
        payload["normalization"] = {
            "energy_scale": float(model.energy_scale),
            "energy_shift": float(model.energy_shift),
            "atomref": {int(z): float(v) for z, v in enumerate(model.atomref.tolist()) if v != 0.0},
        }
    return payload


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model, path: str | Path, **metadata: Any) -> Path:
    """Write ``model`` (a ``ForceField``) with its metadata to ``path``."""
    payload = model_payload(model, **metadata)
    payload["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(payload, path)
    return Path(path)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); "
            "is it a forcecentric checkpoint, and complete?"
        ) from exc


def _check_version(payload: dict[str, Any], path: Path) -> None:
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a forcecentric model checkpoint")
    fv = payload.get("format_version")
    if not isinstance(fv, int) or fv > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {fv!r} (written by forcecentric "
            f"{payload.get('package_version')}); this forcecentric {__version__} reads format "
            f"versions up to {FORMAT_VERSION}: upgrade forcecentric to load it"
        )
    major = str(payload.get("package_version", "0")).split(".")[0]
    if major != __version__.split(".")[0]:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by forcecentric {payload.get('package_version')}, "
            f"incompatible with this forcecentric {__version__}"
        )


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
    """Load a model checkpoint (or a run's Lightning checkpoint) and return the ``ForceField``.

    The returned model (a ``ForceField``, or a ``PropertyModel`` for a property checkpoint) is in
    eval mode, with ``model.elements`` (atomic numbers it was trained
    on) and ``model.metadata`` (training data description, metrics, version) attached. A frozen
    artifact written by ``forcecentric export`` loads as a :class:`~forcecentric.export.FrozenModel`
    (inference only, same call signature).
    """
    from .export import is_exported, load_exported
    from .nn.model import ForceField
    from .nn.properties import PropertyModel

    path = Path(path)
    if is_exported(path):
        return load_exported(path, device=device, dtype=dtype)
    raw = _read(path)
    if "forcecentric" in raw and "state_dict" in raw:  # Lightning checkpoint of a run
        payload = dict(raw["forcecentric"])
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
        payload["state_dict"] = state
    else:
        payload = raw
    if not isinstance(payload, dict):
        raise CheckpointError(f"{str(path)!r} is not a forcecentric model checkpoint")
    _check_version(payload, path)
    try:
        cfg = validate(ModelConfig, payload["model_config"], source=f"in checkpoint {str(path)!r}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    kind = payload.get("model_kind", "force_field")
    if kind == "property":
        try:
            model = PropertyModel(cfg, payload["targets"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"property checkpoint {str(path)!r} has bad targets: {exc}") from None
    elif kind == "force_field":
        model = ForceField(cfg)
    else:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a model of unknown kind {kind!r}")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {str(path)!r} do not fit the model config: {exc}") from None
    model.elements = list(payload.get("elements", []))
    model.metadata = dict(payload.get("metadata", {}))
    model.metadata.setdefault("package_version", payload.get("package_version"))
    model.eval()
    if dtype is not None:
        model.to(resolve_dtype(dtype))
    return model.to(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float64": torch.float64, "32": torch.float32, "64": torch.float64,
             "float": torch.float32, "double": torch.float64}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use 'float32' or 'float64'")
    return table[dtype]

"""Frozen inference artifacts: a TorchScript file that runs without the training code.

``forcecentric export --model CKPT --out model.pt`` (or :func:`export`) writes one file holding the
scripted force field, its own neighbour search and a JSON metadata record (elements, cutoff,
units, dtype, model hyper-parameters, package version). Anything that runs TorchScript can use
it: :func:`forcecentric.load` and :class:`forcecentric.Calculator` here, ``torch.jit.load`` in a
bare Python with only torch, or C++ (LibTorch, OpenMM-Torch).

The artifact's ``forward(z, pos, batch=None, edge_index=None)`` returns ``{"energy": [B] eV,
"forces": [N, 3] eV/Å}``. Without ``edge_index`` it searches neighbours itself with a dense
``O(N^2)`` distance matrix (fine up to a few thousand atoms per call); larger systems pass a
precomputed full radius graph, as the calculator does (cell lists, reused with a skin).
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from . import __version__
from .errors import CheckpointError

__all__ = ["export", "artifact_metadata", "is_exported", "load_exported", "FrozenModel", "dense_radius_graph"]

METADATA_FILE = "forcecentric.json"
# torch 2.13 marks TorchScript deprecated in favour of torch.export, but TorchScript is what
# LAMMPS, OpenMM-Torch and LibTorch load today, and torch.export cannot yet trace the autograd
# call that makes the forces; the warning says nothing actionable to our users
_JIT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"
ARTIFACT_FORMAT = "forcecentric-torchscript"
ARTIFACT_VERSION = 1


def dense_radius_graph(pos: Tensor, batch: Tensor, cutoff: float) -> Tensor:
    """Full radius graph ``[2, E]`` (no self loops, pairs within a molecule) by dense distances.

    TorchScript-compatible; the same pairs as :func:`forcecentric.nn.radius_graph`.
    """
    diff = pos.unsqueeze(1) - pos.unsqueeze(0)
    d2 = (diff * diff).sum(-1)
    mask = (d2 < cutoff * cutoff) & (batch.unsqueeze(1) == batch.unsqueeze(0))
    mask.fill_diagonal_(False)
    return mask.nonzero().t().contiguous()


class _Frozen(nn.Module):
    """What the artifact scripts: the force field plus its own neighbour search."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cutoff = float(model.cutoff)

    def forward(
        self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None, edge_index: Optional[Tensor] = None
    ) -> Dict[str, Tensor]:
        if batch is None:
            batch = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        n_graphs = int(batch.max()) + 1 if z.shape[0] > 0 else 1
        if edge_index is None:
            edge_index = dense_radius_graph(pos, batch, self.cutoff)
        return self.model(z, pos, batch, n_graphs, True, False, edge_index)


def export(model, out: str | Path, dtype: str | torch.dtype = "float32") -> Path:
    """Script ``model`` (a ``ForceField`` or a checkpoint path) and write the artifact atomically."""
    import copy

    from .checkpoint import load, resolve_dtype

    source = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        model = load(model)
    if isinstance(model, FrozenModel):
        raise CheckpointError(f"{source!r} is already an exported artifact: export its training checkpoint")
    from .errors import ModelKindError
    from .nn.properties import PropertyModel

    if isinstance(model, PropertyModel):
        raise ModelKindError(f"{source!r} is a molecular-property model; export writes force fields only")
    dt = resolve_dtype(dtype)
    # script an eager copy; a compiled energy (compile_inference) stays on the caller's model
    compiled = model.__dict__.pop("_atom_energy", None)
    try:
        eager = copy.deepcopy(model)
    finally:
        if compiled is not None:
            model.__dict__["_atom_energy"] = compiled
    model = eager.to(device="cpu", dtype=dt).eval()
    model.representation.fused = False  # the fused kernels are Python-side: not in TorchScript
    meta = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "package_version": __version__,
        "torch_version": torch.__version__,
        "source": source,
        "elements": [int(e) for e in (getattr(model, "elements", None) or [])],
        "cutoff": float(model.cutoff),
        "dtype": str(dt).replace("torch.", ""),
        "units": {"positions": "Angstrom", "energy": "eV", "forces": "eV/Angstrom"},
        "model_config": model.config.model_dump(mode="json"),
        "metadata": json.loads(json.dumps(getattr(model, "metadata", {}) or {}, default=str)),
        "inputs": "forward(z [N] long, pos [N, 3], batch [N] long = None, edge_index [2, E] long = None)",
        "outputs": {"energy": "[B] eV", "forces": "[N, 3] eV/Angstrom"},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=DeprecationWarning)
            scripted = torch.jit.script(_Frozen(model))
            torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(meta, indent=2)})
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def artifact_metadata(path: str | Path) -> dict[str, Any] | None:
    """The JSON record of an artifact written by :func:`export`, read from the file without
    loading the model; None for anything else (a training checkpoint, not a zip file)."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith(f"extra/{METADATA_FILE}")), None)
            return None if name is None else json.loads(zf.read(name))
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` is an artifact written by :func:`export` (not a training checkpoint)."""
    return artifact_metadata(path) is not None


class FrozenModel(nn.Module):
    """A loaded artifact with the ``ForceField`` call signature (inference only).

    ``elements``, ``metadata`` (the artifact's JSON record) and ``cutoff`` are attributes.
    """

    def __init__(self, scripted: torch.jit.ScriptModule, meta: dict[str, Any]) -> None:
        super().__init__()
        self.scripted = scripted
        self.meta = meta
        self.elements = list(meta.get("elements", []))
        self.metadata = dict(meta.get("metadata", {}))
        self.cutoff = float(meta["cutoff"])

    def forward(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None, n_graphs: Optional[int] = None,
                compute_forces: bool = True, create_graph: Optional[bool] = None,
                edge_index: Optional[Tensor] = None) -> Dict[str, Tensor]:
        if create_graph:
            raise RuntimeError("an exported model is for inference only: train from the checkpoint")
        out = self.scripted(z, pos, batch, edge_index)
        if n_graphs is not None and out["energy"].shape[0] != n_graphs:
            raise ValueError(f"n_graphs={n_graphs} but batch holds {out['energy'].shape[0]} molecules")
        return {k: v.detach() for k, v in out.items()}


def load_exported(path: str | Path, device: str | torch.device = "cpu",
                  dtype: str | torch.dtype | None = None) -> FrozenModel:
    """Load an artifact written by :func:`export` (no training code involved)."""
    from .checkpoint import resolve_dtype

    path = Path(path)
    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=DeprecationWarning)
            scripted = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = json.loads(extra[METADATA_FILE])
    except Exception as exc:  # noqa: BLE001 - report any read failure with the file name
        raise CheckpointError(f"exported model {str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != ARTIFACT_FORMAT or not isinstance(meta.get("format_version"), int) \
            or meta["format_version"] > ARTIFACT_VERSION:
        raise CheckpointError(f"{str(path)!r}: unsupported artifact format {meta.get('format')!r} version "
                              f"{meta.get('format_version')!r} (this forcecentric reads version {ARTIFACT_VERSION})")
    model = FrozenModel(scripted, meta).eval()
    if dtype is not None:
        model.to(resolve_dtype(dtype))
    return model.to(device)

"""ASE calculator backed by a forcecentric model (energy in eV, forces in eV/A)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import all_changes

from ..checkpoint import load, resolve_dtype
from ..errors import DataError, ElementError
from ..evaluation import unknown_elements
from ..nn.kernels import use_fused_if_available
from ..nn.neighbors import VerletList, radius_graph


class Calculator(_AseCalculator):
    """``forcecentric.Calculator(model, device="cpu", dtype="float32", skin=0.5, compile=False, fused="auto")``.

    ``model`` is a checkpoint, a frozen artifact from ``forcecentric export`` or a model object.
    Works with ASE's optimizers and molecular dynamics. Structures are treated as isolated
    molecules (no periodic images). Raises :class:`ElementError` for elements the model was not
    trained on and :class:`DataError` when the prediction is not finite.

    Fast paths (each gives the plain path's results to float rounding):

    * ``skin`` (Å): the neighbour list is a Verlet list, searched with ``cutoff + skin`` and reused
      until an atom has moved more than ``skin / 2``; ``skin=0`` searches at every call;
    * ``compile=True``: ``torch.compile`` of the energy (a checkpoint's model only, compiled in
      place when a model object is passed; the first call compiles, which takes a while; on a
      CPU it pays off for the smallest molecules and the largest systems only, see
      docs/results.md);
    * ``fused``: on a CPU, the message passing runs through fused C++ kernels
      (:mod:`forcecentric.nn.kernels`, built with the system's C++ compiler on first use, about
      half a minute, then cached). ``"auto"`` (default) uses them when the device is a CPU and
      they build, and otherwise warns once and stays eager; ``True`` requires them; ``False`` is
      the eager path. Ignored with ``compile=True`` (the compiled graph is used instead);
    * :meth:`predict` evaluates many structures in batches of ``batch_size`` model calls.

    Inference keeps no autograd graph beyond the forces.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 skin: float = 0.5, compile: bool = False, fused: bool | str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        if isinstance(model, (str, Path)):
            self.source = str(model)
            model = load(model)
        else:
            self.source = type(model).__name__
        from ..errors import ModelKindError
        from ..nn.properties import PropertyModel

        if isinstance(model, PropertyModel):
            raise ModelKindError(f"{self.source!r} is a molecular-property model (targets {model.targets}); "
                             "the calculator needs a force field (a pre-training or energy + force fine-tuning)")
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if compile:
            if not hasattr(self.model, "compile_inference"):
                raise ValueError(f"compile=True needs a checkpoint's model, not {type(self.model).__name__} "
                                 f"({self.source!r}); an exported artifact is already frozen")
            self.model.compile_inference()
        elif hasattr(self.model, "use_fused_kernels"):
            self._set_fused(fused)
        self.elements = set(getattr(model, "elements", []) or [])
        self.neighbors = VerletList(self.model.cutoff, skin=skin)

    def _set_fused(self, fused: bool | str) -> None:
        if fused not in (True, False, "auto"):
            raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
        if fused is False or (fused == "auto" and self.device.type != "cpu"):
            self.model.use_fused_kernels(False)
            return
        if fused is True and self.device.type != "cpu":
            raise ValueError(f"fused=True needs device='cpu' (the kernels are CPU kernels), got {self.device}")
        use_fused_if_available(self.model, required=fused is True)

    def _check(self, atoms) -> None:
        problem = unknown_elements(self.elements, atoms.numbers)
        if problem:
            raise ElementError(f"structure {atoms.get_chemical_formula()} (model {self.source!r}): {problem}")
        if atoms.pbc.any():
            raise DataError("periodic structures are not supported yet: set atoms.pbc = False")

    @staticmethod
    def _finite(energies: np.ndarray, forces: np.ndarray, what: str) -> None:
        if not np.all(np.isfinite(energies)) or not np.all(np.isfinite(forces)):
            raise DataError(
                f"model predicted a non-finite energy or forces for {what} "
                "(atoms too close or far outside the training data?)"
            )

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self._check(self.atoms)
        zt = torch.as_tensor(self.atoms.numbers, dtype=torch.long, device=self.device)
        pos = torch.as_tensor(self.atoms.positions, dtype=self.dtype, device=self.device)
        batch = torch.zeros(len(zt), dtype=torch.long, device=self.device)
        edge_index = self.neighbors(pos, None)
        out = self.model(zt, pos, batch, 1, compute_forces=True, edge_index=edge_index)
        energy = out["energy"].detach().double().cpu().numpy()
        forces = out["forces"].detach().double().cpu().numpy()
        self._finite(energy, forces, self.atoms.get_chemical_formula())
        self.results["energy"] = float(energy[0])
        self.results["free_energy"] = float(energy[0])
        self.results["forces"] = forces

    def predict(self, structures: Sequence, batch_size: int = 32) -> tuple[np.ndarray, list[np.ndarray]]:
        """Energies ``[M]`` (eV) and forces (``[N_m, 3]`` eV/Å each) of many ``ase.Atoms``, with
        ``batch_size`` structures per model call (the structures may differ in size)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        energies: list[np.ndarray] = []
        forces: list[np.ndarray] = []
        for start in range(0, len(structures), batch_size):
            chunk = structures[start:start + batch_size]
            for k, atoms in enumerate(chunk):
                try:
                    self._check(atoms)
                except (ElementError, DataError) as exc:
                    raise type(exc)(f"structure {start + k}: {exc}") from None
            counts = [len(a) for a in chunk]
            zt = torch.as_tensor(np.concatenate([a.numbers for a in chunk]), dtype=torch.long, device=self.device)
            pos = torch.as_tensor(np.concatenate([a.positions for a in chunk]), dtype=self.dtype, device=self.device)
            batch = torch.repeat_interleave(torch.arange(len(chunk), device=self.device),
                                            torch.as_tensor(counts, device=self.device))
            edge_index = radius_graph(pos, batch, self.model.cutoff)
            out = self.model(zt, pos, batch, len(chunk), compute_forces=True, edge_index=edge_index)
            e = out["energy"].detach().double().cpu().numpy()
            f = out["forces"].detach().double().cpu().numpy()
            self._finite(e, f, f"structures {start}..{start + len(chunk) - 1}")
            energies.append(e)
            forces.extend(np.split(f, np.cumsum(counts)[:-1]))
        return (np.concatenate(energies) if energies else np.zeros(0)), forces

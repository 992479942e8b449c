"""ASE calculator backed by a forcecentric model (energy in eV, forces in eV/A)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import all_changes

from ..checkpoint import load, resolve_dtype
from ..errors import DataError, ElementError
from ..evaluation import unknown_elements


class Calculator(_AseCalculator):
    """``forcecentric.Calculator(path_or_model, device="cpu", dtype="float32")``.

    Works with ASE's optimizers and molecular dynamics. Structures are treated as isolated
    molecules (no periodic images). Raises :class:`ElementError` for elements the model was not
    trained on and :class:`DataError` when the prediction is not finite.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", **kwargs):
        super().__init__(**kwargs)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        if isinstance(model, (str, Path)):
            self.source = str(model)
            model = load(model)
        else:
            self.source = type(model).__name__
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.elements = set(getattr(model, "elements", []) or [])

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        z = self.atoms.numbers
        problem = unknown_elements(self.elements, z)
        if problem:
            raise ElementError(
                f"structure {self.atoms.get_chemical_formula()} (model {self.source!r}): {problem}"
            )
        if self.atoms.pbc.any():
            raise DataError("periodic structures are not supported yet: set atoms.pbc = False")
        zt = torch.as_tensor(z, dtype=torch.long, device=self.device)
        pos = torch.as_tensor(self.atoms.positions, dtype=self.dtype, device=self.device)
        batch = torch.zeros(len(z), dtype=torch.long, device=self.device)
        out = self.model(zt, pos, batch, 1, compute_forces=True)
        energy = float(out["energy"].detach().double().cpu()[0])
        forces = out["forces"].detach().double().cpu().numpy()
        if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
            raise DataError(
                f"model predicted a non-finite energy or forces for {self.atoms.get_chemical_formula()} "
                "(atoms too close or far outside the training data?)"
            )
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = forces

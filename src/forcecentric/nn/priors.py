"""Energy standardization and per-element atom reference energies.

Per-atom energy ``e_i = energy_scale * y_i + energy_shift + atomref[z_i]`` where ``y_i`` is the
network's raw per-atom output; the molecular energy is the sum of ``e_i`` over the atoms of the
molecule. The three quantities are buffers (saved in the ``state_dict`` and moved by ``.to()``
/ ``.double()``), not trained parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from ..errors import ElementError

__all__ = ["EnergyPrior", "AtomrefLike"]

AtomrefLike = Union[Mapping[int, float], Tensor, Sequence[float]]


class EnergyPrior(nn.Module):
    """Affine standardization of per-atom outputs plus element reference energies (eV)."""

    def __init__(self, max_z: int) -> None:
        super().__init__()
        self.max_z = int(max_z)
        dtype = torch.get_default_dtype()
        self.register_buffer("energy_scale", torch.tensor(1.0, dtype=dtype))
        self.register_buffer("energy_shift", torch.tensor(0.0, dtype=dtype))
        self.register_buffer("atomref", torch.zeros(self.max_z + 1, dtype=dtype))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """Per-atom energies ``[N]`` from raw outputs ``y [N]`` and atomic numbers ``z [N]``."""
        return y * self.energy_scale + self.energy_shift + self.atomref.index_select(0, z)

    # ------------------------------------------------------------------ setters
    @torch.no_grad()
    def set(
        self,
        scale: float | Tensor | None = None,
        shift: float | Tensor | None = None,
        atomref: AtomrefLike | None = None,
    ) -> None:
        """Set any of the three quantities; ``None`` leaves the current value."""
        if scale is not None:
            value = _finite_scalar(scale, "scale")
            if value == 0.0:
                raise ValueError("energy scale must be non-zero")
            self.energy_scale.fill_(value)
        if shift is not None:
            self.energy_shift.fill_(_finite_scalar(shift, "shift"))
        if atomref is not None:
            self.atomref.copy_(self._atomref_tensor(atomref))

    def _atomref_tensor(self, atomref: AtomrefLike) -> Tensor:
        out = torch.zeros(self.max_z + 1, dtype=torch.float64)
        if isinstance(atomref, Mapping):
            for key, value in atomref.items():
                zi = int(key)
                if not 0 <= zi <= self.max_z:
                    raise ElementError(
                        f"atomref has an entry for Z={zi}, outside the model's range "
                        f"0..{self.max_z}"
                    )
                out[zi] = _finite_scalar(value, f"atomref[{zi}]")
        else:
            values = torch.as_tensor(atomref, dtype=torch.float64).detach().cpu().flatten()
            if values.numel() > self.max_z + 1:
                tail = values[self.max_z + 1 :]
                if bool((tail != 0).any()):
                    raise ElementError(
                        f"atomref has {values.numel()} entries with non-zero values beyond "
                        f"Z={self.max_z}, the largest atomic number the model holds"
                    )
                values = values[: self.max_z + 1]
            if not bool(torch.isfinite(values).all()):
                raise ValueError("atomref contains NaN or Inf")
            out[: values.numel()] = values
        return out.to(self.atomref)

    def extra_repr(self) -> str:
        return f"max_z={self.max_z}"


def _finite_scalar(value: float | Tensor, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value

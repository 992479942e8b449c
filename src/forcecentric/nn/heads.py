"""Output heads on top of the ET representation ``(x [N, F], vec [N, 3, F])``.

* :class:`EnergyHead` - invariant per-atom scalar through gated equivariant blocks
  (PaiNN-style, as TorchMD-Net's ``EquivariantScalar``).
* :class:`VectorHead` - equivariant per-atom vector ``[N, 3]`` through gated equivariant blocks
  (as TorchMD-Net's ``EquivariantVectorOutput``); used by the optional denoising head and for
  vector properties (e.g. dipoles).
* :class:`ScalarHead` - a plain MLP on the invariant scalars for per-atom properties.
* :class:`ScalarVectorHead` - an invariant scalar and an equivariant vector per atom from one
  stack of gated blocks: atomic charges and atomic dipoles for the molecular dipole, isotropic
  and anisotropic atomic polarizabilities (see :mod:`forcecentric.nn.properties`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .et import activation

__all__ = ["GatedEquivariantBlock", "EnergyHead", "VectorHead", "ScalarHead", "ScalarVectorHead"]

def _vector_norm(v: Tensor) -> Tensor:
    """Norm over the spatial axis 1 of ``[N, 3, C]``.

    A small epsilon (1e-8 under the root) keeps it differentiable, also twice, when a vector
    channel is exactly zero (isolated atoms have ``vec == 0``).
    """
    return torch.sqrt((v * v).sum(dim=1) + 1e-8)


class GatedEquivariantBlock(nn.Module):
    """Gated equivariant block (Schütt et al., PaiNN, 2021).

    ``s = [x, ||W1 v||]``; ``(x', g) = MLP(s)``; ``v' = g * (W2 v)``. With ``vector_output=False``
    only the scalar output is produced (no unused parameters).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        intermediate_channels: int | None = None,
        activation_name: str = "silu",
        scalar_activation: bool = False,
        vector_output: bool = True,
    ) -> None:
        super().__init__()
        if intermediate_channels is None:
            intermediate_channels = in_channels
        self.out_channels = out_channels
        self.vector_output = bool(vector_output)
        self.vec1_proj = nn.Linear(in_channels, in_channels, bias=False)
        # the second projection only exists when a vector is produced
        self.vec2_proj: nn.Module = (
            nn.Linear(in_channels, out_channels, bias=False) if vector_output else nn.Identity()
        )
        n_out = 2 * out_channels if vector_output else out_channels
        self.update_net = nn.Sequential(
            nn.Linear(2 * in_channels, intermediate_channels),
            activation(activation_name),
            nn.Linear(intermediate_channels, n_out),
        )
        self.act = activation(activation_name) if scalar_activation else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.vec1_proj.weight)
        if isinstance(self.vec2_proj, nn.Linear):
            nn.init.xavier_uniform_(self.vec2_proj.weight)
        for m in self.update_net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.cat([x, _vector_norm(self.vec1_proj(v))], dim=-1)
        out = self.update_net(s)
        if self.vector_output:
            x_out, gate = torch.split(out, self.out_channels, dim=-1)
            v_out = gate.unsqueeze(1) * self.vec2_proj(v)
        else:
            x_out = out
            v_out = v.new_zeros(v.shape[0], 3, 0)
        return self.act(x_out), v_out


class EnergyHead(nn.Module):
    """Invariant per-atom scalar ``[N]`` from ``(x, vec)``."""

    def __init__(self, hidden_channels: int, activation_name: str = "silu") -> None:
        super().__init__()
        mid = max(hidden_channels // 2, 1)
        self.block1 = GatedEquivariantBlock(
            hidden_channels, mid, activation_name=activation_name, scalar_activation=True
        )
        self.block2 = GatedEquivariantBlock(
            mid, 1, activation_name=activation_name, vector_output=False
        )

    def reset_parameters(self) -> None:
        self.block1.reset_parameters()
        self.block2.reset_parameters()

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        x, vec = self.block1(x, vec)
        x, _ = self.block2(x, vec)
        return x.squeeze(-1)

    @torch.jit.unused
    def fused_parameters(self) -> list[Tensor]:
        """The parameters in the order :func:`forcecentric.nn.kernels.energy_head` reads."""
        b1, b2 = self.block1, self.block2
        return [b1.vec1_proj.weight, b1.vec2_proj.weight, b1.update_net[0].weight, b1.update_net[0].bias,
                b1.update_net[2].weight, b1.update_net[2].bias, b2.vec1_proj.weight, b2.update_net[0].weight,
                b2.update_net[0].bias, b2.update_net[2].weight, b2.update_net[2].bias]


class ScalarVectorHead(nn.Module):
    """Per-atom invariant scalar ``[N]`` and equivariant vector ``[N, 3]`` from ``(x, vec)``."""

    def __init__(self, hidden_channels: int, activation_name: str = "silu") -> None:
        super().__init__()
        mid = max(hidden_channels // 2, 1)
        self.block1 = GatedEquivariantBlock(
            hidden_channels, mid, activation_name=activation_name, scalar_activation=True
        )
        self.block2 = GatedEquivariantBlock(mid, 1, activation_name=activation_name)

    def reset_parameters(self) -> None:
        self.block1.reset_parameters()
        self.block2.reset_parameters()

    def forward(self, x: Tensor, vec: Tensor) -> tuple[Tensor, Tensor]:
        x, vec = self.block1(x, vec)
        x, vec = self.block2(x, vec)
        return x.squeeze(-1), vec.squeeze(-1)


class VectorHead(ScalarVectorHead):
    """Equivariant per-atom vector ``[N, 3]`` from ``(x, vec)`` (the vector of :class:`ScalarVectorHead`)."""

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:  # type: ignore[override]
        # written out: TorchScript (export) does not script super() calls
        x, vec = self.block1(x, vec)
        _, vec = self.block2(x, vec)
        return vec.squeeze(-1)


class ScalarHead(nn.Module):
    """MLP on invariant scalars: ``[N, F] -> [N, out_channels]`` (``[N]`` if ``out_channels=1``
    and ``squeeze=True``)."""

    def __init__(
        self,
        hidden_channels: int,
        out_channels: int = 1,
        activation_name: str = "silu",
        squeeze: bool = True,
    ) -> None:
        super().__init__()
        mid = max(hidden_channels // 2, 1)
        self.squeeze = bool(squeeze and out_channels == 1)
        self.net = nn.Sequential(
            nn.Linear(hidden_channels, mid),
            activation(activation_name),
            nn.Linear(mid, out_channels),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, vec: Tensor | None = None) -> Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.squeeze else out

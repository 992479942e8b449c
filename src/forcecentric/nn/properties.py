"""Molecular property prediction on the ET representation (QM9-style targets).

:class:`PropertyModel` is the same Equivariant Transformer representation as
:class:`~forcecentric.nn.model.ForceField` (so a pre-trained force field's ``representation.*``
weights load into it unchanged) with one output head per target:

=================  ==========================================================================
kind               molecular output from per-atom outputs ``(s_i, v_i)`` of the head
=================  ==========================================================================
``intensive``      ``y = mean_i s_i``: orbital energies (homo, lumo, gap)
``extensive``      ``y = sum_i s_i``: energies U0, U, H, G (with per-element references), zpve, Cv
``dipole``         ``mu = |sum_i q_i (r_i - R) + sum_i m_i|`` from atomic charges ``q_i`` (shifted so
                   they add up to the molecule's total charge) and atomic dipoles ``m_i``;
                   ``R`` is the centre of mass (Thölke & De Fabritiis 2022; Schütt et al. 2021)
``spatial_extent`` ``<R^2> = sum_i w_i |r_i - R|^2`` with invariant atomic weights ``w_i``
``polarizability`` isotropic part (trace / 3) of ``alpha = sum_i a_i I + m_i (x) r_i + r_i (x) m_i``,
                   i.e. ``sum_i a_i + 2/3 sum_i m_i . (r_i - R)``
=================  ==========================================================================

Every invariant per-atom output goes through an affine prior ``s_i = scale * y_i + shift +
ref[z_i]`` (:class:`~forcecentric.nn.priors.EnergyPrior`) whose values are fitted on the training
targets before training (:func:`forcecentric.properties.fit_priors`): per-element references
for U0, U, H and G, standardization (one shift, one scale) for the rest.

Units: inputs in Angstrom; each output in the unit of :data:`TARGETS` (the units of the QM9
reader and of the GFN2-xTB property labels): eV, Debye, Bohr^3, Bohr^2, cal/(mol K).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from ase import units as _units
from torch import Tensor, nn

from ..config import ModelConfig, validate
from .et import ETRepresentation
from .heads import EnergyHead, ScalarVectorHead
from .model import molecule_inputs
from .neighbors import radius_graph
from .priors import EnergyPrior

__all__ = ["Target", "TARGETS", "QM9_TARGETS", "target", "PropertyModel", "atom_features", "centered_positions", "dipole_moment"]

_BOHR = float(_units.Bohr)  # Angstrom
_DEBYE = float(_units.Debye)  # e * Angstrom


@dataclass(frozen=True)
class Target:
    """A molecular property the model can learn."""

    name: str
    kind: str  # intensive | extensive | dipole | spatial_extent | polarizability
    unit: str  # unit of the data and of the model's output
    report_unit: str  # unit the metrics are reported in (the unit QM9 papers use)
    report_factor: float  # value in report_unit = value in unit * report_factor
    references: bool = False  # per-element reference values fitted on the training set
    description: str = ""


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("mu", "dipole", "D", "D", 1.0, description="dipole moment (magnitude)"),
        Target("alpha", "polarizability", "a0^3", "a0^3", 1.0, description="isotropic polarizability"),
        Target("homo", "intensive", "eV", "meV", 1000.0, description="HOMO energy"),
        Target("lumo", "intensive", "eV", "meV", 1000.0, description="LUMO energy"),
        Target("gap", "intensive", "eV", "meV", 1000.0, description="HOMO-LUMO gap"),
        Target("r2", "spatial_extent", "a0^2", "a0^2", 1.0, description="electronic spatial extent <R^2>"),
        Target("zpve", "extensive", "eV", "meV", 1000.0, description="zero-point vibrational energy"),
        Target("U0", "extensive", "eV", "meV", 1000.0, True, "internal energy at 0 K"),
        Target("U", "extensive", "eV", "meV", 1000.0, True, "internal energy at 298.15 K"),
        Target("H", "extensive", "eV", "meV", 1000.0, True, "enthalpy at 298.15 K"),
        Target("G", "extensive", "eV", "meV", 1000.0, True, "free energy at 298.15 K"),
        Target("Cv", "extensive", "cal/(mol K)", "cal/(mol K)", 1.0, description="heat capacity at 298.15 K"),
    )
}

#: The 12 standard QM9 regression targets.
QM9_TARGETS = tuple(TARGETS)


def target(name: str) -> Target:
    """The :class:`Target` called ``name``; an unknown name raises ``KeyError`` listing the valid ones."""
    if name not in TARGETS:
        raise KeyError(f"unknown property target {name!r}; valid targets: {', '.join(TARGETS)}")
    return TARGETS[name]


def _atomic_masses(max_z: int) -> Tensor:
    from ase.data import atomic_masses

    m = torch.as_tensor(atomic_masses[: max_z + 1], dtype=torch.get_default_dtype()).clone()
    m[0] = 1.0
    return m


def centered_positions(pos: Tensor, z: Tensor, batch: Tensor, n_graphs: int, masses: Tensor) -> Tensor:
    """Positions relative to each molecule's centre of mass ``[N, 3]``."""
    m = masses.index_select(0, z).to(pos.dtype)
    total = pos.new_zeros(n_graphs).index_add(0, batch, m)
    com = pos.new_zeros(n_graphs, 3).index_add(0, batch, pos * m.unsqueeze(-1)) / total.unsqueeze(-1)
    return pos - com.index_select(0, batch)


def dipole_moment(
    q: Tensor,
    m: Tensor,
    rel: Tensor,
    batch: Tensor,
    n_graphs: int,
    charge: Optional[Tensor] = None,
) -> Tensor:
    """Molecular dipoles ``[B, 3]`` in Debye from atomic charges ``q [N]`` (e) and atomic dipoles
    ``m [N, 3]`` (e*Angstrom): ``sum_i q_i (r_i - R) + m_i`` about the centre of mass ``R``, with
    ``rel = r_i - R`` from :func:`centered_positions`.

    The charges are first shifted equally within each molecule so that they add up to the
    molecule's total ``charge`` (0 when ``None``); the dipole of a neutral molecule then does not
    depend on the origin.
    """
    total = q.new_zeros(n_graphs).index_add(0, batch, q)
    count = q.new_zeros(n_graphs).index_add(0, batch, torch.ones_like(q))
    want = q.new_zeros(n_graphs) if charge is None else charge.to(q.dtype)
    q = q - ((total - want) / count).index_select(0, batch)
    return rel.new_zeros(n_graphs, 3).index_add(0, batch, q.unsqueeze(-1) * rel + m) / _DEBYE


def atom_features(kind: str, z: Tensor, pos: Tensor, batch: Tensor, n_graphs: int, masses: Tensor) -> Tensor:
    """``phi_i`` such that a target's prior part is ``sum_i phi_i * (shift + ref[z_i])``: 1 for
    sums, ``1 / n_atoms`` for means, ``|r_i - R|^2`` in Bohr^2 for the spatial extent; the
    least-squares fit of the priors uses these (dipoles have no prior: zeros)."""
    if kind in ("extensive", "polarizability"):
        return pos.new_ones(z.shape[0])
    if kind == "intensive":
        n = pos.new_zeros(n_graphs).index_add(0, batch, pos.new_ones(z.shape[0]))
        return 1.0 / n.index_select(0, batch)
    if kind == "spatial_extent":
        rel = centered_positions(pos, z, batch, n_graphs, masses)
        return (rel * rel).sum(-1) / _BOHR**2
    return pos.new_zeros(z.shape[0])


class PropertyModel(nn.Module):
    """ET representation + one head per molecular property target.

    ``forward(z, pos, batch, n_graphs, charge)`` returns ``{target: [B]}`` in each target's unit,
    plus ``dipole [B, 3]`` (Debye) when ``mu`` is a target.
    """

    def __init__(self, config: ModelConfig, targets: Sequence[str]) -> None:
        super().__init__()
        if isinstance(config, Mapping):
            config = validate(ModelConfig, dict(config), "<model config>")
        targets = list(targets)
        if not targets:
            raise ValueError("a PropertyModel needs at least one target")
        for name in targets:
            target(name)
        if len(set(targets)) != len(targets):
            raise ValueError(f"duplicate targets in {targets}")
        self.config = config
        self.targets = targets
        self.cutoff = float(config.cutoff)
        self.representation = ETRepresentation(config)
        h, act = config.hidden_channels, config.activation
        self.heads = nn.ModuleDict()
        self.priors = nn.ModuleDict()
        for name in targets:
            kind = TARGETS[name].kind
            if kind in ("dipole", "polarizability"):
                self.heads[name] = ScalarVectorHead(h, act)
            else:
                self.heads[name] = EnergyHead(h, act)
            if kind != "dipole":
                self.priors[name] = EnergyPrior(config.max_z)
        self.register_buffer("masses", _atomic_masses(config.max_z))
        self._uses_positions = any(TARGETS[n].kind in ("dipole", "spatial_extent", "polarizability") for n in targets)
        # spread of each target on the training set: the loss divides errors by it
        self.register_buffer("target_std", torch.ones(len(targets), dtype=torch.get_default_dtype()))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(
        self,
        z: Tensor,
        pos: Tensor,
        batch: Optional[Tensor] = None,
        n_graphs: Optional[int] = None,
        charge: Optional[Tensor] = None,
        edge_index: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        batch, n_graphs = molecule_inputs(z, pos, batch, n_graphs, self.masses.dtype)
        if edge_index is None:
            edge_index = radius_graph(pos.detach(), batch, self.cutoff)
        x, vec = self.representation(z, pos, batch, edge_index)
        # positions about the centre of mass: only the dipole, <R^2> and polarizability use them
        rel = centered_positions(pos, z, batch, n_graphs, self.masses) if self._uses_positions else pos
        out: Dict[str, Tensor] = {}
        for name in self.targets:
            kind = TARGETS[name].kind
            head = self.heads[name]
            if kind == "dipole":
                q, m = head(x, vec)
                d = dipole_moment(q, m, rel, batch, n_graphs, charge)
                out["dipole"] = d
                out[name] = torch.sqrt((d * d).sum(-1) + 1e-12)
                continue
            prior = self.priors[name]
            if kind == "polarizability":
                a, m = head(x, vec)
                per_atom = prior(a, z) + (2.0 / 3.0) * (m * rel).sum(-1)
            else:
                s = prior(head(x, vec), z)
                if kind == "spatial_extent":
                    per_atom = s * (rel * rel).sum(-1) / _BOHR**2
                else:
                    per_atom = s
            y = per_atom.new_zeros(n_graphs).index_add(0, batch, per_atom)
            if kind == "intensive":
                count = per_atom.new_zeros(n_graphs).index_add(0, batch, torch.ones_like(per_atom))
                y = y / count
            out[name] = y
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"targets={self.targets}, hidden_channels={c.hidden_channels}, "
            f"num_layers={c.num_layers}, cutoff={c.cutoff}"
        )

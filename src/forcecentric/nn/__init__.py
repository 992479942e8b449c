"""Neural network: radius graph, Equivariant Transformer, heads, priors and the ForceField."""

from __future__ import annotations

from .et import ETRepresentation
from .heads import EnergyHead, ScalarHead, VectorHead
from .model import ForceField
from .neighbors import VerletList, radius_graph
from .priors import EnergyPrior

__all__ = [
    "ForceField",
    "radius_graph",
    "ETRepresentation",
    "EnergyHead",
    "VectorHead",
    "ScalarHead",
    "EnergyPrior",
]

"""Shared fixtures: tiny models and small labelled datasets made by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from forcecentric.config import ModelConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def edge_set(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    """The pairs of a ``[2, E]`` edge index (on any device) as a set of ``(i, j)``."""
    return set(map(tuple, edge_index.cpu().t().tolist()))


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(hidden_channels=32, num_layers=2, num_heads=4, num_rbf=16, cutoff=5.0)


def morse_frames(n: int, seed: int = 0, equilibrium_every: int = 0):
    """Ethanol-like frames labelled with ASE's Morse potential (fast, smooth, conservative)."""
    from ase.build import molecule
    from ase.calculators.morse import MorsePotential
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    base = molecule("CH3CH2OH")
    frames = []
    for i in range(n):
        a = base.copy()
        eq = bool(equilibrium_every and i % equilibrium_every == 0)
        if not eq:
            a.positions += rng.normal(scale=0.08, size=a.positions.shape)
        a.calc = MorsePotential(epsilon=1.0, r0=1.3, rho0=4.0, rcut1=3.0, rcut2=4.0)
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        a.info["equilibrium"] = eq
        a.info["mol_id"] = "ethanol"
        a.info["source"] = "morse-test"
        frames.append(a)
    return frames


@pytest.fixture
def morse_file(tmp_path) -> Path:
    import ase.io

    path = tmp_path / "morse.extxyz"
    ase.io.write(path, morse_frames(40, equilibrium_every=5), format="extxyz")
    return path


@pytest.fixture
def model_path(tmp_path, tiny_config) -> Path:
    """An untrained tiny ET for H, C, O saved as a model checkpoint (random but smooth forces)."""
    from forcecentric.checkpoint import save_model
    from forcecentric.nn.model import ForceField

    torch.manual_seed(0)
    model = ForceField(tiny_config)
    model.set_normalization(scale=0.5, atomref={1: -13.0, 6: -1000.0, 8: -2000.0})
    model.elements = [1, 6, 8]
    return save_model(model, tmp_path / "model.ckpt")

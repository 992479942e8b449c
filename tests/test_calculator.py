"""The ASE calculator and the public API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.md.velocitydistribution import thermalize_momenta
from ase.build import molecule
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

import forcecentric
from forcecentric.errors import ElementError
from forcecentric.nn.model import ForceField


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_calculator_matches_the_model(model_path, dtype):
    atoms = molecule("CH3CH2OH")
    atoms.calc = forcecentric.Calculator(model_path, device="cpu", dtype=dtype)
    e = atoms.get_potential_energy()
    f = atoms.get_forces()
    model = forcecentric.load(model_path, dtype=dtype)
    dt = torch.float64 if dtype == "float64" else torch.float32
    out = model(torch.tensor(atoms.numbers), torch.tensor(atoms.positions, dtype=dt))
    assert e == pytest.approx(float(out["energy"][0]), rel=1e-6)
    np.testing.assert_allclose(f, out["forces"].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert f.shape == (9, 3) and np.isfinite(f).all()


def test_forces_are_the_energy_gradient_through_ase(model_path):
    atoms = molecule("CH3OH")
    atoms.calc = forcecentric.Calculator(model_path, dtype="float64")
    f = atoms.get_forces()
    h = 1e-5
    num = np.zeros_like(f)
    for i in range(len(atoms)):
        for k in range(3):
            p = atoms.positions.copy()
            atoms.positions[i, k] = p[i, k] + h
            ep = atoms.get_potential_energy()
            atoms.positions[i, k] = p[i, k] - h
            em = atoms.get_potential_energy()
            atoms.positions = p
            num[i, k] = -(ep - em) / (2 * h)
    np.testing.assert_allclose(f, num, atol=1e-6)


def test_works_with_ase_optimizer_and_md(model_path):
    atoms = molecule("CH3CH2OH")
    atoms.calc = forcecentric.Calculator(model_path, dtype="float64")
    e0 = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=30)
    assert atoms.get_potential_energy() <= e0 + 1e-9
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=0.25 * units.fs)
    etot0 = atoms.get_potential_energy() + atoms.get_kinetic_energy()
    dyn.run(20)
    etot1 = atoms.get_potential_energy() + atoms.get_kinetic_energy()
    assert atoms.get_kinetic_energy() > 0 and np.isfinite(etot1) and abs(etot1 - etot0) < 5e-3


def test_unknown_element_is_refused(model_path):
    atoms = Atoms("ClH", positions=[[0, 0, 0], [1.27, 0, 0]])
    atoms.calc = forcecentric.Calculator(model_path)
    with pytest.raises(ElementError, match=r"\['Cl'\].*not trained on"):
        atoms.get_potential_energy()


def test_calculator_accepts_a_model_object(tiny_config):
    model = ForceField(tiny_config)
    atoms = molecule("H2O")
    atoms.calc = forcecentric.Calculator(model, dtype="float64")
    assert np.isfinite(atoms.get_potential_energy())

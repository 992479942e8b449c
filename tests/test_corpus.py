"""The bundled default pre-training corpus meets its data card."""

from __future__ import annotations

import numpy as np
import pytest

from forcecentric.data.store import Store
from forcecentric.train.datamodule import resolve_path


@pytest.fixture(scope="module")
def corpus() -> Store:
    return Store(resolve_path("bundled:corpus"))


def test_corpus_size_kinds_and_elements(corpus):
    st = corpus.statistics()
    assert len(corpus) >= 20_000
    assert len(set(corpus.mol_ids().tolist())) >= 1000
    assert st["n_equilibrium"] >= 1000 and st["n_off_equilibrium"] >= 20_000
    assert {int(z) for z in st["elements"]} == {1, 6, 7, 8, 9, 16, 17}
    assert set(st["levels_of_theory"]) == {"GFN2-xTB"}
    assert 0.5 < st["force_rms"] < 2.0


def test_corpus_records_are_valid_and_labelled(corpus):
    rng = np.random.default_rng(0)
    for i in rng.choice(len(corpus), 200, replace=False):
        r = corpus[int(i)]
        r.validate()
        assert r.forces is not None and r.energy is not None
        if r.equilibrium:  # optimized minima: forces near zero
            assert np.abs(r.forces).max() < 0.02
        else:
            assert np.abs(r.forces).max() <= 10.0


def test_held_out_molecules_are_not_in_the_corpus():
    from rdkit import Chem

    smiles = resolve_path("bundled:corpus_molecules").read_text().split()[2::2]
    canon = {Chem.MolToSmiles(Chem.MolFromSmiles(s), isomericSmiles=False) for s in smiles}
    for held in ("CC(=O)Oc1ccccc1C(=O)O", "CCO", "Nc1ncccc1OCc1ccccc1", "O=CCC=O"):
        assert Chem.MolToSmiles(Chem.MolFromSmiles(held), isomericSmiles=False) not in canon

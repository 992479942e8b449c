"""Competitor force fields (MACE, NequIP, TorchMD-Net's ET) with random weights, for speed runs.

    from speed_peers import PEERS, build
    peer = build("mace", device="cpu", dtype="float32", size="paper")
    energy, forces = peer.energy_forces(numbers, positions)               # eV, eV/A [N, 3]
    energies, forces_list = peer.energy_forces_batch(numbers_list, positions_list)

Each peer runs in its own virtual environment (their e3nn pins conflict), so this module imports
only torch, numpy, ase and, lazily inside its builder, the one library it builds; it never imports
forcecentric. Speed does not depend on the weights, so every model is freshly initialised (seeded).
Every call is end to end for one isolated (non-periodic) molecule or a batch of them: numpy
positions (A) -> the library's own data conversion and neighbour list (what its ASE calculator
does each MD step) -> model -> energy (eV) and forces (eV/A, autograd) back as numpy. Parameters
are frozen (requires_grad False) as MACECalculator and TMDNETCalculator do. `build` makes one
smoke call (single and batch, on water) so a library that cannot run fails at build time with a
RuntimeError carrying the underlying error, and first-call costs (kernel JIT) are paid there.

Settings (all: cutoff 5.0 A, float32 by default, float64 accepted, elements H C N O, zero
reference energies; every value is also in `Peer.settings`, with the library versions):

* ``torchmd-net-et`` -- ET of Thoelke & De Fabritiis (ICLR 2022), MD17 settings, built by
  ``torchmdnet.models.model.create_model``: model equivariant-transformer, embedding_dimension
  128, num_layers 6, num_heads 8, num_rbf 32, rbf_type expnorm, trainable_rbf True, activation
  silu, attn_activation silu, distance_influence both, neighbor_embedding True, cutoff 0-5 A,
  max_z 100, derivative True, no prior, no standardisation, reduce_op add, output_model Scalar
  (EquivariantScalar head). max_num_neighbors 128: for the ET this sizes the pair buffer (128 x N
  pairs, self-loops included); it truncates nothing, and a system with more pairs raises
  "Found num_pairs > max_num_pairs" instead (bulk water at 5 A has ~53 neighbours per atom, a
  1,000-atom water cluster ~42 on average). size="demo": embedding 64, 3 layers, 4 heads,
  32 RBFs. Path: ``torch.tensor`` of z/pos (as ``TMDNETCalculator``) ->
  ``model(z, pos, batch)``, whose forward builds the neighbour list (warp "brute" kernel,
  ``OptimizedDistance``) and returns (energy, forces); batches are collated by
  ``torch_geometric.data.Batch.from_data_list`` (TorchMD-Net's data pipeline is PyG's).
* ``mace`` -- MACE (Batatia et al., NeurIPS 2022) as built by ``mace_run_train --model MACE``
  (a ``ScaleShiftMACE``, scale 1, shift 0), hidden_irreps "128x0e + 128x1o", max_ell 3,
  correlation 3, num_interactions 2, num_bessel 8, num_polynomial_cutoff 5, r_max 5.0,
  MLP_irreps "16x0e", radial_MLP [64, 64, 64], gate silu, RealAgnosticInteractionBlock first then
  RealAgnosticResidualInteractionBlock, z table [1, 6, 7, 8], atomic energies zeros,
  avg_num_neighbors 20 (a constant; training would compute it from data), use_reduced_cg False
  and the other mace_run_train defaults. ("128x0e + 128x1o" is the common 128-channel, L=1
  setting of MACE's examples; the paper's rMD17 models were, as we recall but have not verified
  here, larger: 256 channels with L=2.) Path, as ``MACECalculator.calculate`` per step:
  ``ase.Atoms`` -> ``mace.data.config_from_atoms`` -> ``mace.data.AtomicData.from_config``
  (matscipy neighbour list) -> ``mace.tools.torch_geometric.Batch.from_data_list`` (the collate
  of MACE's data loader, also used for batches) -> ``model(batch.to_dict(), compute_force=True,
  training=False)``. Unlike the calculator we do not ask for stress (no cell).
* ``nequip`` -- NequIP (Batzner et al., Nat. Commun. 2022) MD17 settings via nequip 0.19.1's
  ``nequip.model.NequIPGNNModel``: num_layers 5, l_max 2, parity True, num_features 64 (so
  64x0e+64x0o+64x1o+64x1e+64x2e+64x2o hidden features), r_max 5.0, num_bessels 8,
  polynomial_cutoff_p 6, radial MLP depth 2 width 64, type names H C N O, per-type energy shifts
  0 and scales 1, avg_num_neighbors 20 (a constant), eager mode (no nequip-compile), seed 0;
  type_embed_num_features is the library default (= num_features, 64), which also sizes the
  self-connection. Path, as ``NequIPCalculator.calculate`` per step:
  ``nequip.data.from_ase`` -> ``ChemicalSpeciesToAtomTypeMapper`` -> ``NeighborListTransform``
  (matscipy backend; both from ``nequip.integrations.utils.basic_transforms``) -> model, whose
  output carries ``total_energy`` and ``forces`` (it also computes stress, as it always does);
  batches: the same per frame, then ``nequip.data.AtomicDataDict.batched_from_list``.
  NequIP keeps positions and energies in float64 even for a float32 model (its design).

Only the TorchMD-Net ET has a "demo" size; ``build("mace"|"nequip", size="demo")`` raises
ValueError.

Side effects in the importing process (each peer is meant to live in its own worker process):
importing mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (needed for e3nn 0.4.4's torch.load);
nequip's ``set_global_state`` sets torch's default dtype to float64, seeds the global RNGs and
disables TF32; the TorchMD-Net builder sets ``warp.config.log_level`` to LOG_WARNING, and warp
caches its compiled kernels under ~/.cache/warp. No extra packages were installed into any peer
environment.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from importlib import metadata
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

PEERS = ("mace", "nequip", "torchmd-net-et")
CUTOFF = 5.0
ELEMENTS = (1, 6, 7, 8)  # H C N O
SYMBOLS = ("H", "C", "N", "O")
AVG_NUM_NEIGHBORS = 20.0

ET_SIZES: dict[str, dict[str, int]] = {
    "paper": dict(embedding_dimension=128, num_layers=6, num_heads=8, num_rbf=32),
    "demo": dict(embedding_dimension=64, num_layers=3, num_heads=4, num_rbf=32),
}
ET_MAX_NUM_NEIGHBORS = 128

MACE_PAPER: dict[str, Any] = dict(
    model="ScaleShiftMACE (mace_run_train --model MACE)",
    hidden_irreps="128x0e + 128x1o",
    max_ell=3,
    correlation=3,
    num_interactions=2,
    num_bessel=8,
    num_polynomial_cutoff=5,
    r_max=CUTOFF,
    MLP_irreps="16x0e",
    radial_MLP=[64, 64, 64],
    gate="silu",
    interaction_cls_first="RealAgnosticInteractionBlock",
    interaction_cls="RealAgnosticResidualInteractionBlock",
    atomic_numbers=list(ELEMENTS),
    atomic_energies=[0.0] * len(ELEMENTS),
    avg_num_neighbors=AVG_NUM_NEIGHBORS,
    atomic_inter_scale=1.0,
    atomic_inter_shift=0.0,
    use_reduced_cg=False,
    use_so3=False,
    apply_cutoff=True,
    pair_repulsion=False,
    distance_transform="None",
    radial_type="bessel",
)

NEQUIP_PAPER: dict[str, Any] = dict(
    num_layers=5,
    l_max=2,
    parity=True,
    num_features=64,
    r_max=CUTOFF,
    num_bessels=8,
    polynomial_cutoff_p=6,
    radial_mlp_depth=2,
    radial_mlp_width=64,
    type_names=list(SYMBOLS),
    per_type_energy_shifts={s: 0.0 for s in SYMBOLS},
    per_type_energy_scales={s: 1.0 for s in SYMBOLS},
    avg_num_neighbors=AVG_NUM_NEIGHBORS,
)

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# A 3-atom water for the smoke call inside `build`.
_SMOKE_NUMBERS = np.array([8, 1, 1])
_SMOKE_POSITIONS = np.array([[0.0, 0.0, 0.119], [0.0, 0.763, -0.477], [0.0, -0.763, -0.477]])


class Peer:
    """A built peer model with a uniform energy+forces interface (see the module docstring)."""

    name: str
    settings: dict[str, Any]
    num_parameters: int

    def __init__(self, name: str, model: torch.nn.Module, settings: dict[str, Any], device: str,
                 dtype: str) -> None:
        self.name = name
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype
        self.torch_dtype = _TORCH_DTYPES[dtype]
        self.num_parameters = int(sum(p.numel() for p in model.parameters()))
        self.settings = dict(settings, num_parameters=self.num_parameters, device=device, dtype=dtype)

    def energy_forces(self, numbers: np.ndarray, positions: np.ndarray) -> tuple[float, np.ndarray]:
        """Energy (eV) and forces (eV/A, [N, 3]) of one isolated molecule, end to end."""
        energies, forces = self._run([_as_numbers(numbers)], [_as_positions(positions)], single=True)
        return float(energies[0]), forces[0]

    def energy_forces_batch(self, numbers_list: Sequence[np.ndarray], positions_list: Sequence[np.ndarray]
                            ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Energies [B] and per-molecule forces for a batch of molecules in one model call."""
        if len(numbers_list) != len(positions_list) or not numbers_list:
            raise ValueError("numbers_list and positions_list must be non-empty and of equal length")
        numbers = [_as_numbers(z) for z in numbers_list]
        positions = [_as_positions(r) for r in positions_list]
        return self._run(numbers, positions, single=False)

    def _run(self, numbers: list[np.ndarray], positions: list[np.ndarray], single: bool
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Peer({self.name!r}, {self.num_parameters} parameters, {self.device}, {self.dtype})"


def _as_numbers(numbers: np.ndarray) -> np.ndarray:
    z = np.asarray(numbers, dtype=np.int64).reshape(-1)
    unknown = sorted(set(z.tolist()) - set(ELEMENTS))
    if unknown:
        raise ValueError(f"elements {unknown} not supported (models are built for H C N O)")
    return z


def _as_positions(positions: np.ndarray) -> np.ndarray:
    return np.asarray(positions, dtype=np.float64).reshape(-1, 3)


def _split(energy: torch.Tensor, forces: torch.Tensor, numbers: list[np.ndarray]
           ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Energies [B] and forces split per molecule (all three libraries keep the input atom order)."""
    e = energy.detach().reshape(-1).cpu().numpy().astype(np.float64)
    f = forces.detach().cpu().numpy().astype(np.float64)
    if e.shape[0] != len(numbers) or f.shape[0] != sum(len(z) for z in numbers):
        raise RuntimeError(f"unexpected output shapes: energy {tuple(e.shape)}, forces {tuple(f.shape)}")
    return e, np.split(f, np.cumsum([len(z) for z in numbers])[:-1])


def _atoms(numbers: np.ndarray, positions: np.ndarray) -> Any:
    import ase

    return ase.Atoms(numbers=numbers, positions=positions, pbc=False)


def _versions(*packages: str) -> dict[str, str]:
    out = {}
    for p in ("torch", "numpy", "ase", *packages):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence import/construction-time warnings (TorchScript annotations, e3nn's torch.load) and
    send the libraries' import-time prints (mace's cuequivariance notice) to stderr, not stdout."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        yield


# --- TorchMD-Net equivariant transformer -------------------------------------------------------


class _TorchMDNetPeer(Peer):
    def _run(self, numbers: list[np.ndarray], positions: list[np.ndarray], single: bool
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        if single:  # what TMDNETCalculator.calculate does: tensors, batch of zeros
            z = torch.tensor(numbers[0], dtype=torch.long, device=self.device)
            pos = torch.tensor(positions[0], dtype=self.torch_dtype, device=self.device)
            batch = torch.zeros_like(z)
        else:  # TorchMD-Net's data pipeline: PyG Data objects collated into a Batch
            from torch_geometric.data import Batch, Data

            data = [Data(z=torch.from_numpy(zi), pos=torch.from_numpy(ri).to(self.torch_dtype))
                    for zi, ri in zip(numbers, positions)]
            b = Batch.from_data_list(data).to(self.device)
            z, pos, batch = b.z, b.pos, b.batch
        energy, forces = self.model(z, pos, batch)
        return _split(energy, forces, numbers)


def _build_torchmdnet(device: str, dtype: str, size: str, seed: int) -> Peer:
    import warp

    warp.config.log_level = warp.LOG_WARNING  # before torchmdnet's wp.init(): no banner / kernel-load lines
    with _quiet():
        from torchmdnet.models.model import create_model

    args: dict[str, Any] = dict(
        model="equivariant-transformer",
        **ET_SIZES[size],
        rbf_type="expnorm",
        trainable_rbf=True,
        activation="silu",
        attn_activation="silu",
        distance_influence="both",
        neighbor_embedding=True,
        cutoff_lower=0.0,
        cutoff_upper=CUTOFF,
        max_z=100,
        max_num_neighbors=ET_MAX_NUM_NEIGHBORS,
        derivative=True,
        prior_model=None,
        atom_filter=-1,
        standardize=False,
        output_model="Scalar",
        reduce_op="add",
        precision={"float32": 32, "float64": 64}[dtype],
    )
    torch.manual_seed(seed)
    with _quiet():
        model = create_model(dict(args))  # no mean/std: standardize False
    model = _freeze(model).to(device)
    settings = dict(
        peer="torchmd-net-et", size=size, seed=seed, builder="torchmdnet.models.model.create_model",
        args=args, head="EquivariantScalar",
        data_path="torch tensors (z, pos, batch) [batches: torch_geometric.data.Batch.from_data_list] -> "
                  "model(z, pos, batch): neighbour list inside forward (OptimizedDistance, warp brute-force "
                  "kernel, self-loops), forces by autograd (derivative=True)",
        versions=_versions("torchmd-net", "torch-geometric", "warp-lang"),
    )
    return _TorchMDNetPeer("torchmd-net-et", model, settings, device, dtype)


# --- MACE --------------------------------------------------------------------------------------


class _MacePeer(Peer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from mace import data as mace_data
        from mace import tools
        from mace.tools import torch_geometric, torch_tools

        self._data = mace_data
        self._collate: Callable[[list[Any]], Any] = torch_geometric.Batch.from_data_list
        self._default_dtype = torch_tools.default_dtype
        self._z_table = tools.AtomicNumberTable(list(ELEMENTS))
        # MACECalculator's default key specification
        self._keyspec = mace_data.KeySpecification(
            info_keys={"total_spin": "spin", "total_charge": "charge", "external_field": "external_field"},
            arrays_keys={"Qs": "charges"},
        )

    def _graph(self, numbers: np.ndarray, positions: np.ndarray) -> Any:
        config = self._data.config_from_atoms(_atoms(numbers, positions), key_specification=self._keyspec,
                                              head_name="Default")
        return self._data.AtomicData.from_config(config, z_table=self._z_table, cutoff=CUTOFF,
                                                 heads=["Default"])

    def _run(self, numbers: list[np.ndarray], positions: list[np.ndarray], single: bool
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        with self._default_dtype(self.dtype):  # as MACECalculator._atoms_to_batch
            graphs = [self._graph(z, r) for z, r in zip(numbers, positions)]
        batch = self._collate(graphs).to(self.device)
        out = self.model(batch.to_dict(), compute_force=True, training=False)
        return _split(out["energy"], out["forces"], numbers)


def _build_mace(device: str, dtype: str, size: str, seed: int) -> Peer:
    with _quiet():
        import mace  # noqa: F401  (first: sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD before e3nn loads)
        from e3nn import o3
        from mace import modules
        from mace.tools import torch_tools

    s = MACE_PAPER
    torch.manual_seed(seed)
    with _quiet(), torch_tools.default_dtype(dtype):
        model = modules.ScaleShiftMACE(
            r_max=s["r_max"],
            num_bessel=s["num_bessel"],
            num_polynomial_cutoff=s["num_polynomial_cutoff"],
            max_ell=s["max_ell"],
            interaction_cls=modules.interaction_classes[s["interaction_cls"]],
            interaction_cls_first=modules.interaction_classes[s["interaction_cls_first"]],
            num_interactions=s["num_interactions"],
            num_elements=len(ELEMENTS),
            hidden_irreps=o3.Irreps(s["hidden_irreps"]),
            MLP_irreps=o3.Irreps(s["MLP_irreps"]),
            atomic_energies=np.array(s["atomic_energies"]),
            avg_num_neighbors=s["avg_num_neighbors"],
            atomic_numbers=s["atomic_numbers"],
            correlation=s["correlation"],
            gate=modules.gate_dict[s["gate"]],
            radial_MLP=s["radial_MLP"],
            radial_type=s["radial_type"],
            use_reduced_cg=s["use_reduced_cg"],
            use_so3=s["use_so3"],
            apply_cutoff=s["apply_cutoff"],
            pair_repulsion=s["pair_repulsion"],
            distance_transform=s["distance_transform"],
            atomic_inter_scale=s["atomic_inter_scale"],
            atomic_inter_shift=s["atomic_inter_shift"],
        )
    model = _freeze(model).to(device)
    settings = dict(
        peer="mace", size=size, seed=seed, builder="mace.modules.ScaleShiftMACE", args=dict(s),
        data_path="mace.data.config_from_atoms -> AtomicData.from_config (matscipy) -> "
                  "mace.tools.torch_geometric.Batch.from_data_list -> model(batch.to_dict(), "
                  "compute_force=True, training=False)",
        versions=_versions("mace-torch", "e3nn", "matscipy"),
    )
    return _MacePeer("mace", model, settings, device, dtype)


# --- NequIP ------------------------------------------------------------------------------------


class _NequipPeer(Peer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from nequip.data import AtomicDataDict
        from nequip.integrations.ase import NequIPCalculator
        from nequip.integrations.utils import basic_transforms

        self._add = AtomicDataDict
        transforms = basic_transforms(self.model.metadata, CUTOFF, list(SYMBOLS), {s: s for s in SYMBOLS},
                                      neighborlist_backend="matscipy")
        self._calc = NequIPCalculator(self.model, device=str(self.device), transforms=transforms)

    def _run(self, numbers: list[np.ndarray], positions: list[np.ndarray], single: bool
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        add = self._add
        if single:  # NequIPCalculator.calculate: atoms_to_data (from_ase + transforms) -> call_model
            out = self._calc.call_model(self._calc.atoms_to_data(_atoms(numbers[0], positions[0])))
        else:
            frames = [self._calc.atoms_to_data(_atoms(z, r)) for z, r in zip(numbers, positions)]
            out = self.model(add.batched_from_list(frames))
        return _split(out[add.TOTAL_ENERGY_KEY], out[add.FORCE_KEY], numbers)


def _build_nequip(device: str, dtype: str, size: str, seed: int) -> Peer:
    with _quiet():
        from nequip.model import NequIPGNNModel
        from nequip.utils.global_state import set_global_state

    set_global_state(allow_tf32=False)
    with _quiet():
        model = NequIPGNNModel(seed=seed, model_dtype=dtype, **NEQUIP_PAPER)
    model = _freeze(model).to(device)
    settings = dict(
        peer="nequip", size=size, seed=seed, builder="nequip.model.NequIPGNNModel",
        args=dict(NEQUIP_PAPER, model_dtype=dtype, compile_mode="eager",
                  type_embed_num_features="library default (= num_features, 64)"),
        data_path="nequip.data.from_ase -> ChemicalSpeciesToAtomTypeMapper -> NeighborListTransform "
                  "(matscipy) [-> AtomicDataDict.batched_from_list] -> model",
        versions=_versions("nequip", "e3nn", "matscipy"),
    )
    return _NequipPeer("nequip", model, settings, device, dtype)


_BUILDERS: dict[str, Callable[[str, str, str, int], Peer]] = {
    "mace": _build_mace,
    "nequip": _build_nequip,
    "torchmd-net-et": _build_torchmdnet,
}
SIZES: dict[str, tuple[str, ...]] = {
    "mace": ("paper",), "nequip": ("paper",), "torchmd-net-et": tuple(ET_SIZES),
}


def build(name: str, device: str = "cpu", dtype: str = "float32", size: str = "paper", seed: int = 0) -> Peer:
    """Random-weight model at the settings above, smoke-tested; RuntimeError if the library fails."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, not {dtype!r}")
    if size not in SIZES[name]:
        raise ValueError(f"{name}: size must be one of {SIZES[name]}, not {size!r}")
    try:
        peer = _BUILDERS[name](device, dtype, size, seed)
    except Exception as exc:  # noqa: BLE001  (report the library's own error verbatim)
        raise RuntimeError(f"{name}: building the model failed: {type(exc).__name__}: {exc}") from exc
    try:
        peer.energy_forces(_SMOKE_NUMBERS, _SMOKE_POSITIONS)
        peer.energy_forces_batch([_SMOKE_NUMBERS] * 2, [_SMOKE_POSITIONS] * 2)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"{name}: the model was built but running it failed: {type(exc).__name__}: {exc}"
                           ) from exc
    return peer


if __name__ == "__main__":
    import json

    for n in sys.argv[1:] or PEERS:
        p = build(n)
        print(json.dumps(p.settings, indent=1))

"""The force field: ET representation + energy head + priors; forces = -dE/dpos by autograd."""

from collections.abc import Mapping
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import ModelConfig, validate
from .et import ETRepresentation
from .heads import EnergyHead, VectorHead
from .neighbors import radius_graph
from .priors import AtomrefLike, EnergyPrior

__all__ = ["ForceField"]


def molecule_inputs(z: Tensor, pos: Tensor, batch: Optional[Tensor], n_graphs: Optional[int],
                    dtype: torch.dtype) -> Tuple[Tensor, int]:
    """Checks ``pos`` (shape ``[N, 3]``, the model's ``dtype``) and fills in the defaults of a
    model's inputs: ``batch`` (one molecule) and ``n_graphs`` (``batch.max() + 1``)."""
    n_atoms = z.shape[0]
    if pos.dim() != 2 or pos.shape[0] != n_atoms or pos.shape[1] != 3:
        raise ValueError(f"pos must have shape [{n_atoms}, 3], got {list(pos.shape)}")
    if pos.dtype != dtype:
        raise TypeError(
            f"pos is {pos.dtype} but the model is {dtype}; cast the positions or convert the model "
            "(e.g. model.double())"
        )
    if batch is None:
        batch = torch.zeros(n_atoms, dtype=torch.long, device=z.device)
    if n_graphs is None:
        n_graphs = int(batch.max()) + 1 if n_atoms > 0 else 1
    return batch, n_graphs


class ForceField(nn.Module):
    """Conservative machine-learned force field (Equivariant Transformer).

    ``forward(z, pos, batch)`` returns a dict with ``energy [B]`` (eV), ``forces [N, 3]``
    (eV/Å, ``-dE/dpos``) and, with ``config.denoise_head``, ``noise_pred [N, 3]`` from a separate
    equivariant head on the shared representation.
    """

    __jit_unused_properties__ = ["energy_scale", "energy_shift", "atomref", "is_compiled"]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if isinstance(config, Mapping):
            config = validate(ModelConfig, dict(config), "<model config>")
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.cutoff = float(config.cutoff)
        self.representation = ETRepresentation(config)
        self.energy_head = EnergyHead(config.hidden_channels, config.activation)
        self.denoise_head: Optional[VectorHead] = (
            VectorHead(config.hidden_channels, config.activation) if config.denoise_head else None
        )
        self.prior = EnergyPrior(config.max_z)
        #: run the energy head in C++ too where the layers run as one C++ call (fused CPU inference
        #: whose results leave without a graph; see ETRepresentation.fused_stack)
        self.fused_head = True

    # ------------------------------------------------------------------ prior buffers
    @property
    def energy_scale(self) -> Tensor:
        return self.prior.energy_scale

    @property
    def energy_shift(self) -> Tensor:
        return self.prior.energy_shift

    @property
    def atomref(self) -> Tensor:
        return self.prior.atomref

    def set_normalization(
        self,
        scale: "float | Tensor | None" = None,
        shift: "float | Tensor | None" = None,
        atomref: "AtomrefLike | None" = None,
    ) -> None:
        """Set the energy standardization (``scale``, per-atom ``shift``, eV) and/or the
        per-element reference energies (``{Z: eV}`` or a tensor indexed by Z). ``None`` keeps
        the current value."""
        self.prior.set(scale=scale, shift=shift, atomref=atomref)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        z: Tensor,
        pos: Tensor,
        batch: Optional[Tensor] = None,
        n_graphs: Optional[int] = None,
        compute_forces: bool = True,
        create_graph: Optional[bool] = None,
        edge_index: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """Energies and forces.

        Args:
            z: ``[N]`` atomic numbers (long).
            pos: ``[N, 3]`` positions in Å, same dtype as the model.
            batch: ``[N]`` molecule index per atom; ``None`` = one molecule.
            n_graphs: number of molecules ``B`` (default ``batch.max() + 1``).
            compute_forces: compute ``forces = -dE/dpos``.
            create_graph: keep the graph of the forces (for force losses / second backward).
                Default: ``self.training and torch.is_grad_enabled()``.
            edge_index: optional precomputed full radius graph ``[2, E]`` (as returned by
                :func:`~forcecentric.nn.radius_graph` with ``config.cutoff``); built from
                ``pos`` when omitted (a TorchScript-compiled model needs it given).

        Returns:
            ``energy [B]`` (eV), ``forces [N, 3]`` (eV/Å) when ``compute_forces``, and
            ``noise_pred [N, 3]`` when the model has a denoising head.

        Graph handling: when ``create_graph`` is false the returned tensors keep an autograd
        graph only if gradients are enabled and either the caller's ``pos`` requires grad (the
        caller's graph is never cut: ``energy`` stays differentiable w.r.t. it) or the model is in
        training mode; otherwise they are detached, so inference holds no graph. Works under
        ``torch.no_grad()`` (grad is enabled locally for the positions only).
        """
        batch, n_graphs = molecule_inputs(z, pos, batch, n_graphs, self.prior.atomref.dtype)
        outer_grad = torch.is_grad_enabled()
        if create_graph is None:
            make_graph = self.training and outer_grad
        else:
            make_graph = create_graph
        if edge_index is None:
            edge_index = self._radius_graph(pos, batch)

        if not compute_forces:
            return self._energy(z, pos, batch, n_graphs, edge_index)

        caller_pos_grad = pos.requires_grad
        keep_graph = make_graph or (outer_grad and (caller_pos_grad or self.training))
        if torch.jit.is_scripting():
            # TorchScript has no ``torch.enable_grad()`` context manager
            torch.set_grad_enabled(True)
            out = self._energy_and_forces(
                z, pos, batch, n_graphs, edge_index, make_graph, keep_graph
            )
            torch.set_grad_enabled(outer_grad)
        else:
            out = self._energy_and_forces_eager(
                z, pos, batch, n_graphs, edge_index, make_graph, keep_graph
            )
        if not keep_graph:
            out = {k: v.detach() for k, v in out.items()}
        return out

    @torch.jit.unused
    def compile_inference(self, **compile_kwargs) -> "ForceField":
        """Compile the energy with ``torch.compile`` (dynamic shapes) for inference: MD, evaluation.

        Forces stay ``-dE/dpos`` by autograd through the compiled graph. The first call compiles
        (tens of seconds to minutes on a CPU; Inductor caches the kernels on disk for later
        processes); new atom and edge counts do not recompile. Training through a compiled model
        (forces with ``create_graph``) is refused: call :meth:`disable_compile` first. Export
        (TorchScript) an uncompiled model.

        The first call with forces also runs the eager model and compares: Inductor (torch 2.13,
        CPU, dynamic shapes) generated code that gave wrong forces (energies right) for some ET
        sizes, e.g. 0.006-0.033 eV/A off for F=64 with 3 layers. If the forces differ by more
        than float rounding, a ``RuntimeWarning`` says so and the model goes back to the eager
        path for good. :attr:`compile_check` holds the comparison. On a CPU the fused kernels
        (the calculator's default) are faster than the compiled graph anyway.
        """
        # per-atom energies only: the sum over molecules stays eager (Inductor's CPU code for a
        # scatter into a one-element output fails with several threads, torch 2.13)
        self.__dict__["_atom_energy"] = torch.compile(
            ForceField._atom_energy.__get__(self), dynamic=True, **compile_kwargs
        )
        self.__dict__["_compile_check"] = None
        return self

    @torch.jit.unused
    def _compiled_forces_ok(
        self, z: Tensor, pos: Tensor, batch: Tensor, n_graphs: int, edge_index: Tensor, out: Dict[str, Tensor]
    ) -> bool:
        """The first compiled call's forces against the eager model's (see compile_inference); on a
        mismatch the model goes back to the eager path and this returns False."""
        import warnings

        compiled = self.__dict__.pop("_atom_energy")
        try:  # called with grad enabled (_energy_and_forces_eager)
            ref = self._energy_and_forces(z, pos, batch, n_graphs, edge_index, False, False)
        finally:
            self.__dict__["_atom_energy"] = compiled
        dev = float((out["forces"].detach() - ref["forces"].detach()).abs().max()) if pos.numel() else 0.0
        scale = float(ref["forces"].detach().abs().max()) if pos.numel() else 0.0
        rel = 1e-4 if pos.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        tolerance = rel * (1.0 + scale)
        passed = dev <= tolerance  # a NaN fails too
        self.__dict__["_compile_check"] = {
            "max_abs_force_deviation": dev, "tolerance": tolerance, "passed": passed, "torch": torch.__version__,
        }
        if passed:
            return True
        self.disable_compile()
        warnings.warn(
            f"torch.compile gave forces {dev:.2e} eV/A away from the eager model's on the first call "
            f"(tolerance {tolerance:.1e}; torch {torch.__version__}, {pos.device.type}): the model is back on "
            f"the eager path (model.compile_check has the numbers)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False

    @torch.jit.unused
    def use_fused_kernels(self, enabled: bool = True) -> "ForceField":
        """Run the message passing of CPU inference through the fused C++ kernels of
        :mod:`forcecentric.nn.kernels` (compiled on first use; raises ``RuntimeError`` naming the
        cause when they cannot be built). Calls whose results come back without a graph (energies
        and forces for MD, evaluation, prediction) run the representation's front, all the
        layers and the energy head as three C++ calls, each with its analytic backward; calls
        that keep a graph run one kernel call per layer and keep every parameter gradient.
        Energies and forces equal the eager path's to float rounding. Other devices, autocast and
        ``torch.compile`` take the eager path; training forces (``create_graph``) are refused
        while enabled: call ``use_fused_kernels(False)``."""
        if enabled:
            from .kernels import load_extension

            load_extension()
        self.representation.fused = bool(enabled)
        return self

    @property
    @torch.jit.unused
    def uses_fused_kernels(self) -> bool:
        return bool(self.representation.fused)

    @torch.jit.unused
    def disable_compile(self) -> "ForceField":
        """Back to the eager energy (see :meth:`compile_inference`)."""
        self.__dict__.pop("_atom_energy", None)
        return self

    @property
    @torch.jit.unused
    def is_compiled(self) -> bool:
        return "_atom_energy" in self.__dict__

    @property
    @torch.jit.unused
    def compile_check(self) -> Optional[Dict[str, object]]:
        """The first compiled call's comparison with the eager model (``None`` before it):
        ``max_abs_force_deviation`` (eV/A), ``tolerance``, ``passed``, ``torch``."""
        return self.__dict__.get("_compile_check")

    @torch.jit.unused
    def _energy_and_forces_eager(
        self,
        z: Tensor,
        pos: Tensor,
        batch: Tensor,
        n_graphs: int,
        edge_index: Tensor,
        make_graph: bool,
        keep_graph: bool,
    ) -> Dict[str, Tensor]:
        if torch.is_inference_mode_enabled():
            # inference tensors cannot enter an autograd graph: leave inference mode locally
            # and work on ordinary copies (the results are plain tensors without graph)
            with torch.inference_mode(False):
                return self._energy_and_forces_eager(
                    z.clone(), pos.clone(), batch.clone(), n_graphs, edge_index.clone(), False, False
                )
        if make_graph and self.representation.fused:
            raise RuntimeError(
                "this model runs the fused inference kernels (use_fused_kernels); forces with "
                "create_graph (training) need the eager model: call model.use_fused_kernels(False) first"
            )
        if make_graph and self.is_compiled:
            raise RuntimeError(
                "this model is compiled for inference (compile_inference); forces with create_graph "
                "(training) need the eager model: call model.disable_compile() first"
            )
        # grad enabled; a compiled model's first call is checked against the eager model and, if
        # it fails, computed again on the eager path. Results without a graph let the fused path
        # run its layers as one node without parameter gradients (ETRepresentation.detached_call)
        self.representation.detached_call = not keep_graph
        try:
            with torch.enable_grad():
                out = self._energy_and_forces(z, pos, batch, n_graphs, edge_index, make_graph, keep_graph)
                if self.is_compiled and self.compile_check is None \
                        and not self._compiled_forces_ok(z, pos, batch, n_graphs, edge_index, out):
                    out = self._energy_and_forces(z, pos, batch, n_graphs, edge_index, make_graph, keep_graph)
        finally:
            self.representation.detached_call = False
        return out

    def _energy_and_forces(
        self,
        z: Tensor,
        pos: Tensor,
        batch: Tensor,
        n_graphs: int,
        edge_index: Tensor,
        make_graph: bool,
        keep_graph: bool,
    ) -> Dict[str, Tensor]:
        # positions the forces are taken with respect to; the caller's tensor itself when it
        # already requires grad (so the caller's graph stays connected)
        p = pos if pos.requires_grad else pos.detach().requires_grad_(True)
        out = self._energy(z, p, batch, n_graphs, edge_index)
        energy = out["energy"]
        grad: Optional[Tensor] = None
        if energy.requires_grad:
            grads = torch.autograd.grad(
                [energy.sum()],
                [p],
                retain_graph=keep_graph,
                create_graph=make_graph,
                allow_unused=True,
            )
            grad = grads[0]
        if grad is None:
            out["forces"] = torch.zeros_like(pos)
        else:
            out["forces"] = -grad
        return out

    @torch.jit.unused
    def _radius_graph(self, pos: Tensor, batch: Tensor) -> Tensor:
        # not scriptable (vesin + Python); a scripted model needs ``torch.jit.ignore`` here
        return radius_graph(pos.detach(), batch, self.cutoff)

    def _energy(
        self, z: Tensor, pos: Tensor, batch: Tensor, n_graphs: int, edge_index: Tensor
    ) -> Dict[str, Tensor]:
        atom_energy, x, vec = self._atom_energy(z, pos, batch, edge_index)
        energy = atom_energy.new_zeros(n_graphs).index_add(0, batch, atom_energy)
        out = {"energy": energy}
        if self.denoise_head is not None:
            out["noise_pred"] = self.denoise_head(x, vec)
        return out

    def _atom_energy(self, z: Tensor, pos: Tensor, batch: Tensor, edge_index: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-atom energies (eV) and the representation ``(x, vec)``; what compile_inference compiles."""
        x, vec = self.representation(z, pos, batch, edge_index)
        if not torch.jit.is_scripting() and self._head_fused(x):
            y = self._energy_head_fused(x, vec)
        else:
            y = self.energy_head(x, vec)
        return self.prior(y, z), x, vec

    @torch.jit.unused
    def _head_fused(self, x: Tensor) -> bool:
        # the energy head in C++ (no parameter gradients): for the calls that run the layer stack
        return self.fused_head and self.representation._stack_inference(x)

    @torch.jit.unused
    def _energy_head_fused(self, x: Tensor, vec: Tensor) -> Tensor:
        from .kernels import energy_head

        return energy_head(x, vec, self.energy_head.fused_parameters(), self.config.activation)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden_channels={c.hidden_channels}, num_layers={c.num_layers}, "
            f"num_heads={c.num_heads}, num_rbf={c.num_rbf}, cutoff={c.cutoff}, "
            f"denoise_head={c.denoise_head}"
        )

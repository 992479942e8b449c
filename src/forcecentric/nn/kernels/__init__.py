"""Fused CPU kernels for the Equivariant Transformer's message passing (inference fast path).

The eager ET spends its time on many small per-edge tensor operations: on a CPU, per-operation
overhead for small molecules and memory traffic for large ones (every multiply of an
``[E, 3, F]`` edge tensor streams it through DRAM, forward and backward). ``torch.compile``'s
CPU code turns the scatters into atomic adds and does not help. :func:`et_message` instead runs
one layer's attention, messages and aggregation in one C++ pass over the edges (sorted by
receiver), and its backward (the forces) in two more: one over receivers, one over senders.
The per-edge messages are never stored (only the attention activation and its slope per edge
and head), and no thread writes where another does.

For calls whose results leave without a graph (energies and forces for MD, evaluation,
prediction: :class:`~forcecentric.nn.ForceField` says so through ``detached_call``), the whole
call runs as three C++ pieces, each with its analytic backward: :func:`et_front` (geometry,
radial basis, embeddings; backward to the positions), :func:`et_stack` (all the layers: layer
norms, projections, distance filters, message passing and residual updates) and
:func:`energy_head`. One autograd node per piece instead of a few dozen per layer, no Python
between the operations, and the per-atom updates in single loops. They give no parameter
gradients, so calls that keep a graph use :func:`et_message` once per layer.

The extension is compiled on first use with the C++ compiler PyTorch's inductor also needs
(``torch.utils.cpp_extension``; about half a minute, then cached under ``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). Its backward is not differentiable again, so it serves
inference (energies and forces: MD, evaluation, prediction), not force-matching training.
CUDA tensors take the eager path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "MessageGraph", "energy_head", "et_front", "et_message", "et_stack", "load_extension",
    "use_fused_if_available", "ACTIVATION_CODES",
]

#: activation name -> code understood by the kernel
ACTIVATION_CODES = {"silu": 0, "ssp": 1, "tanh": 2, "gelu": 3}

_SOURCE = Path(__file__).with_name("et_message_cpu.cpp")
# versioned: a changed kernel interface gets a new cache entry instead of a stale module
_NAME = "forcecentric_et_message_v6"
_lock = threading.Lock()
_ext = None
_error: RuntimeError | None = None  # a failed build is not retried in this process
_warned = False


def load_extension():
    """Compile (first time) and import the C++ extension; raises ``RuntimeError`` naming the
    cause when it cannot be built (no C++ compiler, no ninja, ...)."""
    global _ext, _error
    if _ext is not None:
        return _ext
    with _lock:
        if _error is not None:
            raise _error
        if _ext is None:
            from torch.utils import cpp_extension

            _ninja_on_path()
            try:
                with _build_lock(cpp_extension):
                    _ext = cpp_extension.load(
                        name=_NAME,
                        sources=[str(_SOURCE)],
                        # OpenMP: at::parallel_for's threads and the `omp simd` loops
                        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=fast"],
                        extra_ldflags=["-fopenmp"],
                        verbose=False,
                    )
            except Exception as exc:  # noqa: BLE001 - re-raised with the cause named
                detail = str(exc).strip()
                if len(detail) > 1500:  # compiler logs: the end names the error
                    detail = "..." + detail[-1500:]
                _error = RuntimeError(
                    f"could not build forcecentric's fused CPU kernels from {_SOURCE} "
                    f"({type(exc).__name__}: {detail}); they need a C++ compiler and ninja, the "
                    "same as torch.compile on CPU. Use the eager model instead "
                    "(model.use_fused_kernels(False))"
                )
                raise _error from exc
    return _ext


@contextlib.contextmanager
def _build_lock(cpp_extension):
    """Serialize the build across processes with a lock the operating system releases when its
    holder dies, and clear the lock file a killed build left behind.

    ``cpp_extension.load`` guards its build with a plain ``lock`` file in the build directory
    and waits, without a time limit, for it to disappear: a process killed while it compiled
    (a timeout, Ctrl-C, a batch system) left every later process waiting for ever, silently.
    Under this ``flock`` no other process of ours is building, so a ``lock`` file found there is
    such a leftover and is removed. Where ``fcntl`` is missing (Windows) the build runs as before.
    """
    try:
        import fcntl

        build_dir = Path(cpp_extension._get_build_directory(_NAME, verbose=False))
    except (ImportError, AttributeError):  # pragma: no cover - Windows, or a torch without the helper
        yield
        return
    with open(build_dir.parent / f"{_NAME}.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                warnings.warn(f"removing {stale}, left behind by a build of the fused kernels that was "
                              "killed; building again", RuntimeWarning, stacklevel=4)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def use_fused_if_available(model, required: bool = False) -> bool:
    """Switch ``model`` (a :class:`~forcecentric.nn.ForceField`) to the fused kernels; when they
    cannot be built, raise if ``required`` and otherwise warn once per process and keep the
    eager path. Returns whether the kernels are on."""
    global _warned
    try:
        model.use_fused_kernels(True)
        return True
    except RuntimeError as exc:
        if required:
            raise
        if not _warned:
            _warned = True
            warnings.warn(f"fused CPU kernels unavailable, using the eager model: {exc}", RuntimeWarning,
                          stacklevel=3)
        model.use_fused_kernels(False)
        return False


def _ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the pip package's binary sits in the environment's
    bin directory, which is not on PATH when the interpreter is called without activation."""
    if shutil.which("ninja") is not None:
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        if (folder / "ninja").exists():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return


class MessageGraph(NamedTuple):
    """Edges of one forward pass in receiver order, with the sender grouping the backward uses.

    ``perm`` puts the caller's edges into receiver order; ``rowptr``/``col`` are the CSR
    (receiver -> senders) structure, ``colptr``/``colperm`` group the same edges by sender and
    ``row`` is each edge's receiver.
    """

    perm: Tensor
    rowptr: Tensor
    col: Tensor
    row: Tensor
    colptr: Tensor
    colperm: Tensor

    @staticmethod
    def build(idx_i: Tensor, idx_j: Tensor, n: int) -> "MessageGraph":
        idx_i = idx_i.detach()
        idx_j = idx_j.detach()
        perm = torch.argsort(idx_i, stable=True)
        row = idx_i.index_select(0, perm).contiguous()
        col = idx_j.index_select(0, perm).contiguous()
        rowptr = _pointer(row, n)
        colperm = torch.argsort(col, stable=True)
        colptr = _pointer(col, n)
        return MessageGraph(perm, rowptr, col, row, colptr, colperm)


def _pointer(sorted_or_not: Tensor, n: int) -> Tensor:
    counts = torch.bincount(sorted_or_not, minlength=n)
    out = torch.zeros(n + 1, dtype=torch.long, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


class _ETMessage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, vec, filt, cut, unit, graph, heads, act, vector_cutoff):
        ext = load_extension()
        # acts [E, 2H]: the attention activation and its slope, all the backward needs of it
        x_agg, vec_agg, acts = ext.forward(
            qkv, vec, filt, cut, unit, graph.rowptr, graph.col, heads, act, vector_cutoff
        )
        ctx.save_for_backward(qkv, vec, filt, cut, unit, acts)
        ctx.graph, ctx.heads, ctx.vector_cutoff = graph, heads, vector_cutoff
        return x_agg, vec_agg

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x, grad_vec):
        # (autograd materialises an unused output's gradient as zeros: never None here)
        qkv, vec, filt, cut, unit, acts = ctx.saved_tensors
        g = ctx.graph
        grads = load_extension().backward(
            grad_x.contiguous(), grad_vec.contiguous(), qkv, vec, filt, cut, unit, acts,
            g.rowptr, g.col, g.colptr, g.colperm, g.row, ctx.heads, ctx.vector_cutoff,
        )
        return (*grads, None, None, None, None)


def et_message(
    qkv: Tensor,
    vec: Tensor,
    filt: Tensor,
    cut: Tensor,
    unit: Tensor,
    graph: MessageGraph,
    heads: int,
    activation: str,
    vector_cutoff: bool,
) -> tuple[Tensor, Tensor]:
    """``(x_agg [N, F], vec_agg [N, 3, F])`` of one ET layer.

    ``qkv [N, 5F]`` holds the projections ``q | k | v`` (``v`` per head as value, vector gate,
    direction gate), ``vec [N, 3, F]`` the vector features, ``filt [E, 4F]`` the activated
    distance filters ``dk | dv``; ``filt``, ``cut [E]`` and ``unit [E, 3]`` are in ``graph``'s
    receiver order."""
    return _ETMessage.apply(
        qkv.contiguous(), vec.contiguous(), filt.contiguous(), cut.contiguous(),
        unit.contiguous(), graph, int(heads), ACTIVATION_CODES[activation], bool(vector_cutoff),
    )


class _ETStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, vec, rbf, cut, unit, rbf_index, graph, params, heads, act, filter_act, vector_cutoff, eps):
        out = load_extension().stack_forward(
            x, vec, rbf, rbf_index, cut, unit, graph.rowptr, graph.col, params, heads, act, filter_act,
            vector_cutoff, eps,
        )
        # the layers' intermediates (no autograd history: kept on ctx, not save_for_backward)
        ctx.saved = out[2:]
        ctx.save_for_backward(rbf, rbf_index, cut, unit)
        ctx.graph, ctx.params = graph, params
        ctx.heads, ctx.filter_act, ctx.vector_cutoff = heads, filter_act, vector_cutoff
        return out[0], out[1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x, grad_vec):
        rbf, rbf_index, cut, unit = ctx.saved_tensors
        g = ctx.graph
        grads = load_extension().stack_backward(
            grad_x, grad_vec, ctx.saved, rbf, rbf_index, cut, unit, g.rowptr, g.col, g.colptr, g.colperm,
            g.row, ctx.params, ctx.heads, ctx.filter_act, ctx.vector_cutoff,
        )
        return (*grads, None, None, None, None, None, None, None, None)


def et_stack(
    x: Tensor,
    vec: Tensor,
    rbf: Tensor,
    cut: Tensor,
    unit: Tensor,
    rbf_index: Tensor | None,
    graph: MessageGraph,
    params: list[Tensor],
    heads: int,
    activation: str,
    filter_activation: str,
    vector_cutoff: bool,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """All the ET's attention layers at once, with the residual updates: ``(x, vec)`` after the
    last layer, for inference. One autograd node for the stack: its backward (the forces) gives
    the gradients of ``x``, ``vec``, ``rbf``, ``cut`` and ``unit`` and **none for the
    parameters**, so call it only where nobody differentiates with respect to them.

    ``params`` holds 9 tensors per layer: layer norm weight and bias, ``qkv`` weight and bias,
    vector projection weight, filter weight and bias, output weight and bias (see
    :class:`~forcecentric.nn.et.EquivariantAttention`). ``rbf`` has one row per edge in
    ``graph``'s receiver order, or one per atom pair with ``rbf_index [E]`` giving each edge's
    row; ``cut`` and ``unit`` are in receiver order."""
    index = rbf_index.contiguous() if rbf_index is not None else rbf.new_empty(0, dtype=torch.long)
    return _ETStack.apply(
        x.contiguous(), vec.contiguous(), rbf.contiguous(), cut.contiguous(), unit.contiguous(), index, graph,
        [p.contiguous() for p in params], int(heads), ACTIVATION_CODES[activation],
        ACTIVATION_CODES[filter_activation], bool(vector_cutoff), float(eps),
    )


class _EnergyHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, vec, params, act):
        out = load_extension().head_forward(x, vec, params, act)
        ctx.saved, ctx.params, ctx.act = out[1:], params, act
        return out[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        gx, gvec = load_extension().head_backward(grad_y.contiguous(), ctx.saved, ctx.params, ctx.act)
        return gx, gvec, None, None


def energy_head(x: Tensor, vec: Tensor, params: list[Tensor], activation: str) -> Tensor:
    """:class:`~forcecentric.nn.heads.EnergyHead` in C++: per-atom outputs ``[N]`` from ``x [N, F]``
    and ``vec [N, 3, F]``, with ``params`` from its ``fused_parameters()``. Like :func:`et_stack`
    its backward gives the gradients of ``x`` and ``vec`` and **none for the parameters**."""
    return _EnergyHead.apply(x, vec, params, ACTIVATION_CODES[activation])


class _ETFront(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pos, z, idx_i, idx_j, params, cutoff, alpha):
        x, rbf, cut, unit, r, cut_e, lin = load_extension().front_forward(pos, z, idx_i, idx_j, params, cutoff, alpha)
        ctx.save_for_backward(pos, z, idx_i, idx_j, r, unit, cut_e, lin)
        ctx.params, ctx.cutoff, ctx.alpha = params, cutoff, alpha
        return x, rbf, cut, unit

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_x, g_rbf, g_cut, g_unit):
        pos, z, idx_i, idx_j, r, unit, cut_e, lin = ctx.saved_tensors
        g_pos = load_extension().front_backward(
            g_x.contiguous(), g_rbf.contiguous(), g_cut.contiguous(), g_unit.contiguous(), pos, z, idx_i, idx_j, r,
            unit, cut_e, lin, ctx.params, ctx.cutoff, ctx.alpha,
        )
        return g_pos, None, None, None, None, None, None


def et_front(
    pos: Tensor, z: Tensor, idx_i: Tensor, idx_j: Tensor, params: list[Tensor], cutoff: float, alpha: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ET representation's front in C++: the initial scalars ``x [N, F]`` (embedding, and the
    neighbour embedding when ``params`` has its five tensors) and, for the real edges ``i <- j``
    followed by one self loop per atom, the radial basis ``[E + N, K]``, the cosine cutoff
    ``[E + N]`` and the unit vectors ``[E + N, 3]``. ``params``: the embedding, the radial
    basis' means and betas, then the neighbour embedding's embedding, distance projection
    weight and bias, and combination weight and bias. Like :func:`et_stack` its backward gives
    the gradient of ``pos`` and **none for the parameters**."""
    return _ETFront.apply(pos.contiguous(), z, idx_i.contiguous(), idx_j.contiguous(), params, float(cutoff),
                          float(alpha))

"""Equivariant Transformer representation (after TorchMD-Net ET, Thölke & De Fabritiis, 2022).

Every atom carries invariant scalar features ``x [N, F]`` and equivariant vector features
``vec [N, 3, F]`` (zero at the start). Interatomic distances are expanded in trainable
exponential-normal radial basis functions multiplied by a cosine cutoff. Each layer is an
equivariant multi-head attention block without softmax: the attention weight of the pair
``(i, j)`` is ``act(sum_head q_i * k_j * dk(r_ij)) * cutoff(r_ij)``; scalar messages are the
filtered values weighted by attention, vector messages combine the neighbour's vectors and the
unit bond direction, both gated by filtered values. The update mixes scalars and vectors only
through invariant quantities (dot products of linear combinations of vectors), which keeps the
scalars invariant and the vectors equivariant under rotations, reflections and translations.

Edge convention: ``edge_index[0] = i`` (receiver), ``edge_index[1] = j`` (sender), edge vector
``pos[j] - pos[i]``; messages are summed at ``i``. As in the reference implementation, every
atom also attends to itself (a self loop with distance 0 and zero bond direction), and the
neighbour embedding uses only the real neighbours.
"""


import math
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .kernels import MessageGraph, et_front, et_message, et_stack
from .neighbors import radius_graph

__all__ = [
    "ShiftedSoftplus",
    "activation",
    "CosineCutoff",
    "ExpNormalSmearing",
    "NeighborEmbedding",
    "EquivariantAttention",
    "ETRepresentation",
]


class ShiftedSoftplus(nn.Module):
    """``softplus(x) - log 2`` (zero at the origin)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = math.log(2.0)

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x) - self.shift


def activation(name: str) -> nn.Module:
    """Activation module by config name (``silu``, ``ssp``, ``tanh``, ``gelu``)."""
    if name == "silu":
        return nn.SiLU()
    if name == "ssp":
        return ShiftedSoftplus()
    if name == "tanh":
        return nn.Tanh()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r} (expected silu, ssp, tanh or gelu)")


class CosineCutoff(nn.Module):
    """``0.5 (cos(pi r / r_c) + 1)`` for ``r < r_c``, else 0; value and slope vanish at ``r_c``."""

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, r: Tensor) -> Tensor:
        inside = (r < self.cutoff).to(r.dtype)
        return 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0) * inside


class ExpNormalSmearing(nn.Module):
    """Exponential-normal radial basis ``exp(-beta_k (exp(-alpha r) - mu_k)^2) * cutoff(r)``.

    ``alpha = 5 / r_c``; centres ``mu_k`` are spaced evenly in ``[exp(-r_c), 1]`` and the widths
    ``beta_k`` start at ``(2 (1 - exp(-r_c)) / K)^-2``; both are trainable by default.
    """

    def __init__(self, cutoff: float, num_rbf: int, trainable: bool = True) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.num_rbf = int(num_rbf)
        self.alpha = 5.0 / self.cutoff
        self.cutoff_fn = CosineCutoff(cutoff)
        start = math.exp(-self.cutoff)
        means = torch.linspace(start, 1.0, self.num_rbf)
        betas = torch.full((self.num_rbf,), (2.0 / self.num_rbf * (1.0 - start)) ** -2)
        if trainable:
            self.means = nn.Parameter(means)
            self.betas = nn.Parameter(betas)
        else:
            self.register_buffer("means", means)
            self.register_buffer("betas", betas)

    def forward(self, r: Tensor) -> Tensor:
        r = r.unsqueeze(-1)
        return self.cutoff_fn(r) * torch.exp(
            -self.betas * (torch.exp(-self.alpha * r) - self.means) ** 2
        )


def _xavier(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class NeighborEmbedding(nn.Module):
    """``x_i <- W_c [x_i, sum_j emb(z_j) * (W_d rbf(r_ij)) * cutoff(r_ij)]``."""

    def __init__(self, hidden_channels: int, num_rbf: int, cutoff: float, max_z: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_z + 1, hidden_channels)
        self.distance_proj = nn.Linear(num_rbf, hidden_channels)
        self.combine = nn.Linear(2 * hidden_channels, hidden_channels)
        self.cutoff = CosineCutoff(cutoff)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.embedding.reset_parameters()
        _xavier(self.distance_proj)
        _xavier(self.combine)

    def forward(
        self, z: Tensor, x: Tensor, idx_i: Tensor, idx_j: Tensor, r: Tensor, rbf: Tensor
    ) -> Tensor:
        w = self.distance_proj(rbf) * self.cutoff(r).unsqueeze(-1)
        msg = self.embedding(z).index_select(0, idx_j) * w
        # accumulate in the messages' dtype (under bf16 autocast they may differ from x's)
        agg = msg.new_zeros(x.shape).index_add(0, idx_i, msg)
        return self.combine(torch.cat([x, agg], dim=-1))


class EquivariantAttention(nn.Module):
    """One equivariant multi-head attention layer; returns the residual updates ``(dx, dvec)``."""

    def __init__(
        self,
        hidden_channels: int,
        num_rbf: int,
        num_heads: int,
        activation_name: str = "silu",
        attn_activation_name: str = "silu",
        vector_cutoff: bool = True,
    ) -> None:
        super().__init__()
        if hidden_channels % num_heads != 0:
            raise ValueError(
                f"hidden_channels ({hidden_channels}) must be divisible by num_heads ({num_heads})"
            )
        self.hidden_channels = hidden_channels
        self.num_heads = num_heads
        self.head_dim = hidden_channels // num_heads
        self.vector_cutoff = bool(vector_cutoff)

        self.layernorm = nn.LayerNorm(hidden_channels)
        self.act = activation(activation_name)
        self.attn_act = activation(attn_activation_name)
        self.activation_name = activation_name
        self.attn_activation_name = attn_activation_name
        # query | key | value in one matrix (rows [F | F | 3F]) and the key | value distance
        # filters in another ([F | 3F]): one GEMM each instead of three and two
        self.qkv_proj = nn.Linear(hidden_channels, 5 * hidden_channels)
        self.o_proj = nn.Linear(hidden_channels, 3 * hidden_channels)
        self.vec_proj = nn.Linear(hidden_channels, 3 * hidden_channels, bias=False)
        self.filter_proj = nn.Linear(num_rbf, 4 * hidden_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights per block (q, k, v, o, vec, dk, dv: the reference ET's separate
        projections, in its order) and zero biases."""
        f = self.hidden_channels
        self.layernorm.reset_parameters()
        with torch.no_grad():
            for w in torch.split(self.qkv_proj.weight, [f, f, 3 * f]):
                nn.init.xavier_uniform_(w)
            self.qkv_proj.bias.zero_()
            _xavier(self.o_proj)
            _xavier(self.vec_proj)
            for w in torch.split(self.filter_proj.weight, [f, 3 * f]):
                nn.init.xavier_uniform_(w)
            self.filter_proj.bias.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the projections were fused hold q/k/v_proj and dk/dv_proj
        renamed = (
            ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
            ("filter_proj", ("dk_proj", "dv_proj")),
        )
        for fused, parts in renamed:
            for kind in ("weight", "bias"):
                keys = [f"{prefix}{part}.{kind}" for part in parts]
                if all(k in state_dict for k in keys):
                    state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _project(
        self, x: Tensor, vec: Tensor, rbf: Tensor, rbf_index: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-atom projections ``qkv [N, 5F]`` (q | k | v), ``vec3 [N, 3, F]``, the invariant
        ``vec_dot [N, F]``, and the activated distance filters ``[E, 4F]`` (dk | dv). With
        ``rbf_index [E]``, ``rbf`` holds one row per atom pair and edge ``e`` reads row
        ``rbf_index[e]``: the filters are computed once for ``i <- j`` and ``j <- i``, which
        share their distance."""
        f = self.hidden_channels
        qkv = self.qkv_proj(self.layernorm(x))
        vec1, vec2, vec3 = torch.split(self.vec_proj(vec), f, dim=-1)
        vec_dot = (vec1 * vec2).sum(dim=1)  # [N, F], invariant
        filt = self.act(self.filter_proj(rbf))
        if rbf_index is not None:
            filt = filt.index_select(0, rbf_index)
        return qkv, vec3, vec_dot, filt

    def _update(
        self, x_agg: Tensor, vec_agg: Tensor, vec3: Tensor, vec_dot: Tensor
    ) -> tuple[Tensor, Tensor]:
        o1, o2, o3 = torch.split(self.o_proj(x_agg), self.hidden_channels, dim=-1)
        dx = vec_dot * o2 + o3
        dvec = vec3 * o1.unsqueeze(1) + vec_agg
        return dx, dvec

    def forward(
        self,
        x: Tensor,
        vec: Tensor,
        idx_i: Tensor,
        idx_j: Tensor,
        cut: Tensor,
        rbf: Tensor,
        unit: Tensor,
        rbf_index: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """``x [N, F]``, ``vec [N, 3, F]``; per edge ``(i <- j)``: cosine cutoff ``cut [E]``,
        radial basis ``rbf [E, K]`` and unit vector ``unit [E, 3]`` from ``i`` towards ``j``.
        With ``rbf_index [E]``, ``rbf`` has one row per atom pair (see :meth:`_project`)."""
        n = x.shape[0]
        h, d, f = self.num_heads, self.head_dim, self.hidden_channels
        qkv, vec3, vec_dot, filt = self._project(x, vec, rbf, rbf_index)
        q, k, v = torch.split(qkv, [f, f, 3 * f], dim=-1)
        q = q.reshape(n, h, d)
        k = k.reshape(n, h, d)
        v = v.reshape(n, h, 3 * d)
        dk, dv = torch.split(filt, [f, 3 * f], dim=-1)
        dk = dk.reshape(-1, h, d)
        dv = dv.reshape(-1, h, 3 * d)

        # --- messages j -> i
        attn = (q.index_select(0, idx_i) * k.index_select(0, idx_j) * dk).sum(dim=-1)
        attn = self.attn_act(attn) * cut.unsqueeze(-1)  # [E, H]
        v_j = v.index_select(0, idx_j) * dv
        x_msg, gate_vec, gate_dir = torch.split(v_j, d, dim=-1)  # each [E, H, D]
        x_msg = x_msg * attn.unsqueeze(-1)
        if self.vector_cutoff:
            # cutoff on the vector messages, applied to the (smaller) gates
            cut_g = cut.reshape(-1, 1, 1)
            gate_vec = gate_vec * cut_g
            gate_dir = gate_dir * cut_g
        vec_j = vec.index_select(0, idx_j).reshape(-1, 3, h, d)
        vec_msg = vec_j * gate_vec.unsqueeze(1) + gate_dir.unsqueeze(1) * unit.reshape(-1, 3, 1, 1)

        # --- aggregation at i
        # (in the messages' dtype: under bf16 autocast it may differ from x's and vec's)
        x_agg = x_msg.new_zeros(n, h, d).index_add(0, idx_i, x_msg).reshape(n, f)
        vec_agg = vec_msg.new_zeros(n, 3, h, d).index_add(0, idx_i, vec_msg).reshape(n, 3, f)
        return self._update(x_agg, vec_agg, vec3, vec_dot)

    @torch.jit.unused
    def stack_parameters(self) -> list[Tensor]:
        """The layer's parameters in the order :func:`~forcecentric.nn.kernels.et_stack` reads."""
        return [
            self.layernorm.weight, self.layernorm.bias, self.qkv_proj.weight, self.qkv_proj.bias,
            self.vec_proj.weight, self.filter_proj.weight, self.filter_proj.bias, self.o_proj.weight,
            self.o_proj.bias,
        ]

    @torch.jit.unused
    def forward_fused(
        self,
        x: Tensor,
        vec: Tensor,
        graph: MessageGraph,
        cut: Tensor,
        rbf: Tensor,
        unit: Tensor,
        rbf_index: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` through the fused CPU kernel (:mod:`forcecentric.nn.kernels`); the
        edge tensors are in ``graph``'s receiver order. With ``rbf_index [E]``, ``rbf`` holds one
        row per atom pair and edge ``e`` reads row ``rbf_index[e]``: the filters are computed
        once for ``i <- j`` and ``j <- i``, which share their distance."""
        qkv, vec3, vec_dot, filt = self._project(x, vec, rbf, rbf_index)
        x_agg, vec_agg = et_message(
            qkv, vec, filt, cut, unit, graph, self.num_heads, self.attn_activation_name,
            self.vector_cutoff,
        )
        return self._update(x_agg, vec_agg, vec3, vec_dot)


# per thread: the representations inside a call whose results their model detaches
_detached_calls = threading.local()


class ETRepresentation(nn.Module):
    """Equivariant Transformer: ``(z, pos, batch) -> (x [N, F], vec [N, 3, F])``."""

    __jit_unused_properties__ = ["detached_call"]

    @property
    def detached_call(self) -> bool:
        """Whether this thread is inside a :class:`~forcecentric.nn.ForceField` call whose results
        the model detaches (inference: nobody can differentiate them with respect to the
        parameters), set by the model for the call's duration. Per thread, so that a model
        shared between threads never lends one call's state to another."""
        return id(self) in getattr(_detached_calls, "ids", ())

    @detached_call.setter
    def detached_call(self, value: bool) -> None:
        ids = getattr(_detached_calls, "ids", None)
        if ids is None:
            ids = _detached_calls.ids = set()
        if value:
            ids.add(id(self))
        else:
            ids.discard(id(self))

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        f = config.hidden_channels
        self.hidden_channels = f
        self.cutoff = float(config.cutoff)
        self.max_z = int(config.max_z)
        self.embedding = nn.Embedding(config.max_z + 1, f)
        self.distance_expansion = ExpNormalSmearing(config.cutoff, config.num_rbf, trainable=True)
        self.cutoff_fn = CosineCutoff(config.cutoff)
        self.neighbor_embedding = (
            NeighborEmbedding(f, config.num_rbf, config.cutoff, config.max_z)
            if config.neighbor_embedding
            else None
        )
        self.layers = nn.ModuleList(
            [
                EquivariantAttention(
                    f,
                    config.num_rbf,
                    config.num_heads,
                    config.activation,
                    config.attn_activation,
                    config.vector_cutoff,
                )
                for _ in range(config.num_layers)
            ]
        )
        self.out_norm = nn.LayerNorm(f)
        #: run the layers' message passing through the fused CPU kernel (inference on CPU,
        #: float32/float64; other devices and dtypes take the eager path). Set it with
        #: :meth:`forcecentric.nn.ForceField.use_fused_kernels`.
        self.fused = False
        #: compute the layers' distance filters once per atom pair rather than once per directed
        #: edge, from ``pair_filters_min_edges`` edges (self loops included) up, on a CPU (fused
        #: and eager paths; not under torch.compile or TorchScript): the same numbers; below it
        #: the bookkeeping costs more than it saves (fused call on 2 CPU cores: 0.96x for
        #: ethanol's 81 edges, 1.06x for 3BPA's 479, 1.14x for deca-alanine's 2,485, 1.41x for
        #: 1,029 waters; benchmarks/speed_filters.py)
        self.pair_filters = True
        self.pair_filters_min_edges = 256
        #: on the fused path, run all layers as one C++ call (one autograd node, whose backward
        #: gives the forces but no parameter gradients) when the call's outputs leave without a
        #: graph; see :attr:`detached_call`
        self.fused_stack = True
        #: with the stack, also the front (geometry, radial basis, embeddings) as one C++ call
        self.fused_front = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.embedding.reset_parameters()
        if self.neighbor_embedding is not None:
            self.neighbor_embedding.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()
        self.out_norm.reset_parameters()

    @torch.jit.unused
    def _radius_graph(self, pos: Tensor, batch: Optional[Tensor]) -> Tensor:
        return radius_graph(pos.detach(), batch, self.cutoff)

    def forward(
        self,
        z: Tensor,
        pos: Tensor,
        batch: Optional[Tensor] = None,
        edge_index: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Scalars ``[N, F]`` and vectors ``[N, 3, F]``; the radius graph is built from ``pos``
        when ``edge_index`` is not given (TorchScript needs it given)."""
        n = z.shape[0]
        if edge_index is None:
            edge_index = self._radius_graph(pos, batch)
        if not torch.jit.is_scripting() and self._whole_inference(pos):
            return self._forward_inference(z, pos, edge_index)
        idx_i, idx_j = edge_index[0], edge_index[1]

        # geometry of the real edges (differentiable w.r.t. pos)
        edge_vec = pos.index_select(0, idx_j) - pos.index_select(0, idx_i)
        r = torch.linalg.vector_norm(edge_vec, dim=-1)
        unit = edge_vec / r.unsqueeze(-1)

        # self loops for the attention layers: distance 0, zero direction
        att_i, att_j = self._with_self_loops(idx_i, idx_j, n)
        att_r = torch.cat([r, r.new_zeros(n)])
        att_unit = torch.cat([unit, unit.new_zeros(n, 3)])
        att_rbf = self.distance_expansion(att_r)
        att_cut = self.cutoff_fn(att_r)

        x = self.embedding(z)
        if self.neighbor_embedding is not None:
            n_edges = idx_i.shape[0]
            x = self.neighbor_embedding(z, x, idx_i, idx_j, r, att_rbf[:n_edges])

        vec = x.new_zeros(n, 3, self.hidden_channels)
        pairs: Optional[Tuple[Tensor, Tensor]] = None
        if not torch.jit.is_scripting():
            pairs = self._pairs(att_i, att_j, n)
        if self.fused and not torch.jit.is_scripting() and self._fused_applies(x):
            x, vec = self._layers_fused(x, vec, att_i, att_j, att_cut, att_rbf, att_unit, pairs)
        else:
            rbf = att_rbf
            rbf_index: Optional[Tensor] = None
            if pairs is not None:
                rbf, rbf_index = att_rbf.index_select(0, pairs[0]), pairs[1]
            for layer in self.layers:
                dx, dvec = layer(x, vec, att_i, att_j, att_cut, rbf, att_unit, rbf_index)
                x = x + dx
                vec = vec + dvec
        x = self.out_norm(x)
        return x, vec

    def _with_self_loops(self, idx_i: Tensor, idx_j: Tensor, n: int) -> Tuple[Tensor, Tensor]:
        """The attention layers' edges: the real ones, then one self loop per atom."""
        loops = torch.arange(n, device=idx_i.device, dtype=idx_i.dtype)
        return torch.cat([idx_i, loops]), torch.cat([idx_j, loops])

    @torch.jit.unused
    def _stack_inference(self, x: Tensor) -> bool:
        # the layers as one C++ call without parameter gradients (and the model's energy head):
        # fused CPU calls whose results leave without a graph
        return self.fused and self.fused_stack and self.detached_call and self._fused_applies(x)

    @torch.jit.unused
    def _whole_inference(self, pos: Tensor) -> bool:
        # the front in C++ as well
        return self.fused_front and self._stack_inference(pos)

    @torch.jit.unused
    def _forward_inference(self, z: Tensor, pos: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` for the calls :attr:`detached_call` marks, on the fused path: the front
        (geometry, radial basis, embeddings) and the layers each one C++ call."""
        n = z.shape[0]
        idx_i, idx_j = edge_index[0].long(), edge_index[1].long()
        params = [self.embedding.weight, self.distance_expansion.means, self.distance_expansion.betas]
        if self.neighbor_embedding is not None:
            ne = self.neighbor_embedding
            params += [ne.embedding.weight, ne.distance_proj.weight, ne.distance_proj.bias, ne.combine.weight,
                       ne.combine.bias]
        x, att_rbf, att_cut, att_unit = et_front(
            pos, z, idx_i, idx_j, params, self.cutoff, self.distance_expansion.alpha
        )
        att_i, att_j = self._with_self_loops(idx_i, idx_j, n)
        vec = x.new_zeros(n, 3, self.hidden_channels)
        x, vec = self._layers_fused(x, vec, att_i, att_j, att_cut, att_rbf, att_unit, self._pairs(att_i, att_j, n))
        return self.out_norm(x), vec

    @torch.jit.unused
    def _pairs(self, att_i: Tensor, att_j: Tensor, n: int) -> Optional[Tuple[Tensor, Tensor]]:
        if self.pair_filters and self._pairs_apply(att_i):
            return self._filter_pairs(att_i, att_j, n)
        return None

    @torch.jit.unused
    def _fused_applies(self, x: Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        )

    @torch.jit.unused
    def _pairs_apply(self, att_i: Tensor) -> bool:
        # CPU only: on a GPU, torch.unique waits for the device (its output size is data
        # dependent), and the trade has not been measured there
        return (
            att_i.device.type == "cpu"
            and att_i.shape[0] >= self.pair_filters_min_edges
            and not torch.compiler.is_compiling()
        )

    @torch.jit.unused
    def _filter_pairs(self, att_i: Tensor, att_j: Tensor, n: int) -> Tuple[Tensor, Tensor]:
        """The atom pairs of the edge list, for the distance filters, the layers' largest
        per-edge cost: ``i <- j`` and ``j <- i`` share their distance (bit for bit), so they
        share their filters. Returns ``(edge_of_pair [P], pair_of_edge [E])``: one edge that
        stands for each pair, and each edge's pair."""
        lo, hi = torch.minimum(att_i, att_j).long(), torch.maximum(att_i, att_j).long()
        key = lo * n + hi  # int64: no overflow for int32 edge lists of large systems
        pairs, pair_of_edge = torch.unique(key, return_inverse=True)
        edge_of_pair = torch.empty_like(pairs).scatter_(
            0, pair_of_edge, torch.arange(key.shape[0], device=key.device)
        )
        return edge_of_pair, pair_of_edge

    @torch.jit.unused
    def _layers_fused(
        self,
        x: Tensor,
        vec: Tensor,
        att_i: Tensor,
        att_j: Tensor,
        att_cut: Tensor,
        att_rbf: Tensor,
        att_unit: Tensor,
        pairs: Optional[Tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, Tensor]:
        graph = MessageGraph.build(att_i, att_j, x.shape[0])
        cut = att_cut.index_select(0, graph.perm)
        unit = att_unit.index_select(0, graph.perm)
        rbf_index: Optional[Tensor] = None
        if pairs is not None:
            edge_of_pair, pair_of_edge = pairs
            rbf = att_rbf.index_select(0, edge_of_pair)
            rbf_index = pair_of_edge.index_select(0, graph.perm)
        else:
            rbf = att_rbf.index_select(0, graph.perm)
        if self._stack_inference(x):
            first = self.layers[0]
            params = [t for layer in self.layers for t in layer.stack_parameters()]
            return et_stack(
                x, vec, rbf, cut, unit, rbf_index, graph, params, first.num_heads, first.attn_activation_name,
                first.activation_name, first.vector_cutoff, first.layernorm.eps,
            )
        for layer in self.layers:
            dx, dvec = layer.forward_fused(x, vec, graph, cut, rbf, unit, rbf_index)
            x = x + dx
            vec = vec + dvec
        return x, vec

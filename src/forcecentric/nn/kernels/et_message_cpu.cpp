// Fused CPU kernels of the Equivariant Transformer's edge work (forcecentric.nn.kernels).
//
// One layer's attention, messages and aggregation in one pass over the edges, and the
// analytic backward pass in two more, without materialising any per-edge feature tensor and
// without atomics:
//
//   forward   (parallel over receivers i, CSR order):  x_agg, vec_agg, and act(a), act'(a) of
//                                                     the attention logits a (for the backward)
//   backward 1 (parallel over receivers i):  grads of q, and of the per-edge filters, cutoff,
//                                            unit vectors; dL/da per edge and head
//   backward 2 (parallel over senders j, CSC order):  grads of k, v, vec
//
// Layouts (row-major, contiguous), F = H * D:
//   qkv [N, 5F]: q (columns 0..F), k (F..2F), v (2F..5F, as [H, 3, D]: value, vector gate,
//   direction gate per head); vec [N, 3, F]; filt [E, 4F]: dk (0..F), dv (F..4F, like v);
//   cut [E]; unit [E, 3];
//   edges sorted by receiver: rowptr [N + 1], col [E] = sender of edge e;
//   for the sender pass: colptr [N + 1] and colperm [E] (edges grouped by sender),
//   row [E] = receiver of edge e.
//
// Message of edge e = (i <- j), head h, channel d (c = cut[e], g = c if vector_cutoff else 1):
//   a      = sum_d q[i] k[j] dk[e]               s = act(a)
//   x_agg[i]      += v_x[j] dv_x[e] s c
//   vec_agg[i, m] += vec[j, m] v_g[j] dv_g[e] g + v_d[j] dv_d[e] g unit[e, m]
// which is exactly forcecentric.nn.et.EquivariantAttention's eager message passing.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

enum Act { SILU = 0, SSP = 1, TANH = 2, GELU = 3 };

template <typename T>
inline T act_value(T x, int act) {
  switch (act) {
    case SILU: return x / (T(1) + std::exp(-x));
    case SSP: {
      // softplus(x) - log 2, stable for large |x|
      T sp = x > T(20) ? x : std::log1p(std::exp(x));
      return sp - T(0.69314718055994530942);
    }
    case TANH: return std::tanh(x);
    default: return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
  }
}

template <typename T>
inline T act_grad(T x, int act) {
  switch (act) {
    case SILU: {
      T sig = T(1) / (T(1) + std::exp(-x));
      return sig * (T(1) + x * (T(1) - sig));
    }
    case SSP: return T(1) / (T(1) + std::exp(-x));
    case TANH: {
      T t = std::tanh(x);
      return T(1) - t * t;
    }
    default: {
      T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
      T pdf = std::exp(T(-0.5) * x * x) * T(0.39894228040143267794);
      return cdf + x * pdf;
    }
  }
}

// value and slope of the attention activation at once (one exp for silu / ssp)
template <typename T>
inline void act_both(T x, int act, T& value, T& slope) {
  if (act == SILU) {
    const T sig = T(1) / (T(1) + std::exp(-x));
    value = x * sig;
    slope = sig * (T(1) + x * (T(1) - sig));
  } else {
    value = act_value(x, act);
    slope = act_grad(x, act);
  }
}

void check_inputs(const torch::Tensor& qkv, const torch::Tensor& vec, const torch::Tensor& filt,
                  const torch::Tensor& cut, const torch::Tensor& unit, const torch::Tensor& rowptr,
                  const torch::Tensor& col, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) % 5 == 0, "et_message: qkv must be [N, 5F]");
  const auto n = qkv.size(0), f = qkv.size(1) / 5, e = col.size(0);
  TORCH_CHECK(qkv.device().is_cpu(), "et_message: CPU tensors expected");
  TORCH_CHECK(heads > 0 && f % heads == 0, "et_message: F=", f, " not divisible by heads=", heads);
  TORCH_CHECK(vec.dim() == 3 && vec.size(0) == n && vec.size(1) == 3 && vec.size(2) == f,
              "et_message: vec must be [N, 3, F]");
  TORCH_CHECK(filt.dim() == 2 && filt.size(0) == e && filt.size(1) == 4 * f,
              "et_message: filt must be [E, 4F]");
  TORCH_CHECK(cut.dim() == 1 && cut.size(0) == e, "et_message: cut must be [E]");
  TORCH_CHECK(unit.dim() == 2 && unit.size(0) == e && unit.size(1) == 3, "et_message: unit must be [E, 3]");
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) == n + 1, "et_message: rowptr must be [N + 1]");
  TORCH_CHECK(rowptr.scalar_type() == torch::kLong && col.scalar_type() == torch::kLong,
              "et_message: int64 indices expected");
  for (const auto* t : {&qkv, &vec, &filt, &cut, &unit, &rowptr, &col}) {
    TORCH_CHECK(t->is_contiguous(), "et_message: contiguous tensors expected");
  }
  for (const auto* t : {&vec, &filt, &cut, &unit}) {
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type(), "et_message: one floating dtype expected");
  }
}

// the per-edge view both receiver passes start from: sender j, cutoff c, vector-gate cutoff g,
// unit vector u, the sender's key / value / vector rows and the edge's filters
#define FC_EDGE_LOCALS(e)                                                  \
  const int64_t j = COL[e];                                                \
  const T c = CUT[e];                                                      \
  const T g = vector_cutoff ? c : T(1);                                    \
  const T u0 = UNIT[3 * (e)], u1 = UNIT[3 * (e) + 1], u2 = UNIT[3 * (e) + 2]; \
  const T* __restrict__ kj = QKV + j * qs + f;                             \
  const T* __restrict__ vj = QKV + j * qs + 2 * f;                         \
  const T* __restrict__ vecj = VEC + j * 3 * f;                            \
  const T* __restrict__ dke = FILT + (e) * fs;                             \
  const T* __restrict__ dve = FILT + (e) * fs + f;

// DH: head dimension as a compile-time constant (0: read at run time), so that the per-head
// loops unroll into whole vector instructions
template <typename T, int DH>
void forward_impl(const T* __restrict__ QKV, const T* __restrict__ VEC, const T* __restrict__ FILT,
                  const T* __restrict__ CUT, const T* __restrict__ UNIT, const int64_t* RP,
                  const int64_t* COL, T* __restrict__ XA, T* __restrict__ VA, T* __restrict__ A,
                  int64_t n, int64_t f, int64_t heads, int act, bool vector_cutoff) {
  const int64_t dh = DH > 0 ? DH : f / heads, qs = 5 * f, fs = 4 * f;
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* __restrict__ qi = QKV + i * qs;
      T* __restrict__ xa = XA + i * f;
      T* __restrict__ va = VA + i * 3 * f;
      for (int64_t e = RP[i]; e < RP[i + 1]; ++e) {
        FC_EDGE_LOCALS(e)
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t o = h * dh;
          T a = 0;
#pragma omp simd reduction(+ : a)
          for (int64_t d = 0; d < dh; ++d) a += qi[o + d] * kj[o + d] * dke[o + d];
          T sv, sd;
          act_both(a, act, sv, sd);
          A[e * 2 * heads + h] = sv;
          A[e * 2 * heads + heads + h] = sd;
          const T sc = sv * c;
          const T* __restrict__ vh = vj + 3 * o;
          const T* __restrict__ dvh = dve + 3 * o;
#pragma omp simd
          for (int64_t d = 0; d < dh; ++d) {
            xa[o + d] += vh[d] * dvh[d] * sc;
            const T gv = vh[dh + d] * dvh[dh + d] * g;
            const T gd = vh[2 * dh + d] * dvh[2 * dh + d] * g;
            va[o + d] += vecj[o + d] * gv + gd * u0;
            va[f + o + d] += vecj[f + o + d] * gv + gd * u1;
            va[2 * f + o + d] += vecj[2 * f + o + d] * gv + gd * u2;
          }
        }
      }
    }
  });
}

template <typename T, int DH>
void backward_impl(const T* __restrict__ GX, const T* __restrict__ GVEC, const T* __restrict__ QKV,
                   const T* __restrict__ VEC, const T* __restrict__ FILT, const T* __restrict__ CUT,
                   const T* __restrict__ UNIT, const T* __restrict__ A, const int64_t* RP,
                   const int64_t* COL, const int64_t* CP, const int64_t* CPERM, const int64_t* ROW,
                   T* __restrict__ GQKV, T* __restrict__ GVC, T* __restrict__ GFILT,
                   T* __restrict__ GCUT, T* __restrict__ GUNIT, T* __restrict__ GA, int64_t n,
                   int64_t f, int64_t heads, bool vector_cutoff) {
  const int64_t dh = DH > 0 ? DH : f / heads, qs = 5 * f, fs = 4 * f;

  // pass 1: receivers. Everything owned by the receiver (grad of q) or by the edge.
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* __restrict__ qi = QKV + i * qs;
      const T* __restrict__ gxi = GX + i * f;
      const T* __restrict__ gvi = GVEC + i * 3 * f;
      T* __restrict__ gqi = GQKV + i * qs;
      for (int64_t e = RP[i]; e < RP[i + 1]; ++e) {
        FC_EDGE_LOCALS(e)
        T* __restrict__ gdke = GFILT + e * fs;
        T* __restrict__ gdve = GFILT + e * fs + f;
        const T vcf = vector_cutoff ? T(1) : T(0);
        T gc = 0, gu0 = 0, gu1 = 0, gu2 = 0;
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t o = h * dh;
          const T s = A[e * 2 * heads + h];
          const T* __restrict__ vh = vj + 3 * o;
          const T* __restrict__ dvh = dve + 3 * o;
          T* __restrict__ gdvh = gdve + 3 * o;
          T gs = 0;  // dL/ds, s = act(a) before the cutoff
#pragma omp simd reduction(+ : gs, gc, gu0, gu1, gu2)
          for (int64_t d = 0; d < dh; ++d) {
            const T gxd = gxi[o + d];
            const T g0 = gvi[o + d], g1 = gvi[f + o + d], g2 = gvi[2 * f + o + d];
            const T vx = vh[d], vg = vh[dh + d], vd = vh[2 * dh + d];
            const T fg = dvh[dh + d], fd = dvh[2 * dh + d];
            gs += gxd * vx * dvh[d];
            gdvh[d] = gxd * s * c * vx;
            const T t1 = g0 * vecj[o + d] + g1 * vecj[f + o + d] + g2 * vecj[2 * f + o + d];
            const T t2 = g0 * u0 + g1 * u1 + g2 * u2;
            gdvh[dh + d] = t1 * g * vg;
            gdvh[2 * dh + d] = t2 * g * vd;
            gc += vcf * (t1 * vg * fg + t2 * vd * fd);
            const T gdg = vd * fd * g;
            gu0 += g0 * gdg;
            gu1 += g1 * gdg;
            gu2 += g2 * gdg;
          }
          gc += gs * s;
          const T ga = gs * c * A[e * 2 * heads + heads + h];
          GA[e * heads + h] = ga;
#pragma omp simd
          for (int64_t d = 0; d < dh; ++d) {
            gqi[o + d] += ga * kj[o + d] * dke[o + d];
            gdke[o + d] = ga * qi[o + d] * kj[o + d];
          }
        }
        GCUT[e] = gc;
        GUNIT[3 * e] = gu0;
        GUNIT[3 * e + 1] = gu1;
        GUNIT[3 * e + 2] = gu2;
      }
    }
  });

  // pass 2: senders. Gradients of k, v and vec, summed over the edges leaving j.
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const T* __restrict__ vj = QKV + j * qs + 2 * f;
      const T* __restrict__ vecj = VEC + j * 3 * f;
      T* __restrict__ gkj = GQKV + j * qs + f;
      T* __restrict__ gvj = GQKV + j * qs + 2 * f;
      T* __restrict__ gvecj = GVC + j * 3 * f;
      for (int64_t p = CP[j]; p < CP[j + 1]; ++p) {
        const int64_t e = CPERM[p];
        const int64_t i = ROW[e];
        const T c = CUT[e];
        const T g = vector_cutoff ? c : T(1);
        const T u0 = UNIT[3 * e], u1 = UNIT[3 * e + 1], u2 = UNIT[3 * e + 2];
        const T* __restrict__ qi = QKV + i * qs;
        const T* __restrict__ gxi = GX + i * f;
        const T* __restrict__ gvi = GVEC + i * 3 * f;
        const T* __restrict__ dke = FILT + e * fs;
        const T* __restrict__ dve = FILT + e * fs + f;
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t o = h * dh;
          const T sc = A[e * 2 * heads + h] * c;
          const T ga = GA[e * heads + h];
          const T* __restrict__ vh = vj + 3 * o;
          const T* __restrict__ dvh = dve + 3 * o;
          T* __restrict__ gvh = gvj + 3 * o;
#pragma omp simd
          for (int64_t d = 0; d < dh; ++d) {
            const T g0 = gvi[o + d], g1 = gvi[f + o + d], g2 = gvi[2 * f + o + d];
            gkj[o + d] += ga * qi[o + d] * dke[o + d];
            gvh[d] += gxi[o + d] * sc * dvh[d];
            const T t1 = g0 * vecj[o + d] + g1 * vecj[f + o + d] + g2 * vecj[2 * f + o + d];
            const T t2 = g0 * u0 + g1 * u1 + g2 * u2;
            gvh[dh + d] += t1 * g * dvh[dh + d];
            gvh[2 * dh + d] += t2 * g * dvh[2 * dh + d];
            const T gate = vh[dh + d] * dvh[dh + d] * g;
            gvecj[o + d] += g0 * gate;
            gvecj[f + o + d] += g1 * gate;
            gvecj[2 * f + o + d] += g2 * gate;
          }
        }
      }
    }
  });
}

}  // namespace

#define FC_DISPATCH_HEAD_DIM(dh, fn, ...)      \
  switch (dh) {                                \
    case 8: fn<scalar_t, 8>(__VA_ARGS__); break;   \
    case 16: fn<scalar_t, 16>(__VA_ARGS__); break; \
    case 32: fn<scalar_t, 32>(__VA_ARGS__); break; \
    default: fn<scalar_t, 0>(__VA_ARGS__);     \
  }

std::vector<torch::Tensor> et_message_forward(torch::Tensor qkv, torch::Tensor vec,
                                              torch::Tensor filt, torch::Tensor cut,
                                              torch::Tensor unit, torch::Tensor rowptr,
                                              torch::Tensor col, int64_t heads, int64_t act,
                                              bool vector_cutoff) {
  check_inputs(qkv, vec, filt, cut, unit, rowptr, col, heads);
  const int64_t n = qkv.size(0), f = qkv.size(1) / 5, e = col.size(0);
  auto x_agg = torch::zeros({n, f}, qkv.options());
  auto vec_agg = torch::zeros({n, 3, f}, qkv.options());
  auto acts = torch::empty({e, 2 * heads}, qkv.options());  // act(a), act'(a)
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "et_message_forward", [&] {
    FC_DISPATCH_HEAD_DIM(f / heads, forward_impl, qkv.data_ptr<scalar_t>(), vec.data_ptr<scalar_t>(),
                           filt.data_ptr<scalar_t>(), cut.data_ptr<scalar_t>(),
                           unit.data_ptr<scalar_t>(), rowptr.data_ptr<int64_t>(),
                           col.data_ptr<int64_t>(), x_agg.data_ptr<scalar_t>(),
                           vec_agg.data_ptr<scalar_t>(), acts.data_ptr<scalar_t>(), n, f, heads,
                           static_cast<int>(act), vector_cutoff);
  });
  return {x_agg, vec_agg, acts};
}

std::vector<torch::Tensor> et_message_backward(
    torch::Tensor grad_x, torch::Tensor grad_vec, torch::Tensor qkv, torch::Tensor vec,
    torch::Tensor filt, torch::Tensor cut, torch::Tensor unit, torch::Tensor acts,
    torch::Tensor rowptr, torch::Tensor col, torch::Tensor colptr, torch::Tensor colperm,
    torch::Tensor row, int64_t heads, bool vector_cutoff) {
  check_inputs(qkv, vec, filt, cut, unit, rowptr, col, heads);
  const int64_t n = qkv.size(0), f = qkv.size(1) / 5, e = col.size(0);
  TORCH_CHECK(grad_x.dim() == 2 && grad_x.size(0) == n && grad_x.size(1) == f &&
                  grad_x.is_contiguous() && grad_x.scalar_type() == qkv.scalar_type(),
              "et_message: grad_x");
  TORCH_CHECK(grad_vec.sizes() == vec.sizes() && grad_vec.is_contiguous() &&
                  grad_vec.scalar_type() == qkv.scalar_type(),
              "et_message: grad_vec");
  TORCH_CHECK(acts.dim() == 2 && acts.size(0) == e && acts.size(1) == 2 * heads &&
                  acts.is_contiguous(),
              "et_message: acts");
  TORCH_CHECK(colptr.size(0) == n + 1 && colperm.size(0) == e && row.size(0) == e,
              "et_message: colptr / colperm / row");
  auto gqkv = torch::zeros_like(qkv), gvec = torch::zeros_like(vec);
  auto gfilt = torch::empty_like(filt), gcut = torch::empty_like(cut),
       gunit = torch::empty_like(unit), ga = torch::empty({e, heads}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "et_message_backward", [&] {
    FC_DISPATCH_HEAD_DIM(f / heads, backward_impl,
        grad_x.data_ptr<scalar_t>(), grad_vec.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(),
        vec.data_ptr<scalar_t>(), filt.data_ptr<scalar_t>(), cut.data_ptr<scalar_t>(),
        unit.data_ptr<scalar_t>(), acts.data_ptr<scalar_t>(), rowptr.data_ptr<int64_t>(),
        col.data_ptr<int64_t>(), colptr.data_ptr<int64_t>(), colperm.data_ptr<int64_t>(),
        row.data_ptr<int64_t>(), gqkv.data_ptr<scalar_t>(), gvec.data_ptr<scalar_t>(),
        gfilt.data_ptr<scalar_t>(), gcut.data_ptr<scalar_t>(), gunit.data_ptr<scalar_t>(),
        ga.data_ptr<scalar_t>(), n, f, heads, vector_cutoff);
  });
  return {gqkv, gvec, gfilt, gcut, gunit};
}

// ---------------------------------------------------------------------------------------------
// The whole layer stack in one call, forward and analytic backward (inference: energies and
// forces). Per layer, with x [N, F], vec [N, 3, F] and the per-layer weights
//   xn = LayerNorm(x);  qkv = xn Wqkv^T + bqkv;  [vec1 | vec2 | vec3] = vec Wvec^T
//   filt = act(rbf Wf^T + bf)  (rows per atom pair, gathered per edge through rbf_index)
//   x_agg, vec_agg = message passing (the kernels above);  [o1 | o2 | o3] = x_agg Wo^T + bo
//   x' = x + (sum_m vec1 vec2) o2 + o3;   vec' = vec + vec3 o1 + vec_agg
// which is EquivariantAttention.forward_fused's arithmetic, without an autograd node per
// operation. The backward gives the gradients of the stack's input x, vec, rbf, cut and unit
// only: no parameter gradients (the caller guarantees nobody asks for them).

namespace {

constexpr int kStackParams = 9;  // ln_w, ln_b, qkv_w, qkv_b, vec_w, filt_w, filt_b, o_w, o_b
constexpr int kStackSaved = 12;  // per layer, see et_stack_forward

// an activation over a whole tensor, with ATen's vectorised ops, and its backward
torch::Tensor act_tensor(const torch::Tensor& pre, int64_t act) {
  switch (act) {
    case SILU: return at::silu(pre);
    case SSP: return at::softplus(pre, 1, 20) - 0.69314718055994530942;
    case TANH: return at::tanh(pre);
    default: return at::gelu(pre);
  }
}

torch::Tensor act_tensor_backward(const torch::Tensor& grad, const torch::Tensor& pre,
                                  const torch::Tensor& out, int64_t act) {
  switch (act) {
    case SILU: return at::silu_backward(grad, pre);
    case SSP: return at::softplus_backward(grad, pre, 1, 20);
    case TANH: return at::tanh_backward(grad, out);
    default: return at::gelu_backward(grad, pre);
  }
}

// x' = x + vdot o2 + o3, vec' = vec + vec3 o1 + vec_agg, with vdot = sum_m vec1 vec2 (also
// written out: the backward needs it)
template <typename T>
void update_impl(const T* __restrict__ X, const T* __restrict__ VEC, const T* __restrict__ VP,
                 const T* __restrict__ O, const T* __restrict__ VA, T* __restrict__ XN,
                 T* __restrict__ VECN, T* __restrict__ VDOT, int64_t n, int64_t f) {
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* __restrict__ o = O + i * 3 * f;
      const T* __restrict__ vp = VP + i * 9 * f;
#pragma omp simd
      for (int64_t c = 0; c < f; ++c) {
        const T vd = vp[c] * vp[f + c] + vp[3 * f + c] * vp[4 * f + c] + vp[6 * f + c] * vp[7 * f + c];
        VDOT[i * f + c] = vd;
        XN[i * f + c] = X[i * f + c] + (vd * o[f + c] + o[2 * f + c]);
      }
      for (int64_t m = 0; m < 3; ++m) {
        const int64_t b = (i * 3 + m) * f;
#pragma omp simd
        for (int64_t c = 0; c < f; ++c) {
          VECN[b + c] = VEC[b + c] + (vp[3 * m * f + 2 * f + c] * o[c] + VA[b + c]);
        }
      }
    }
  });
}

// gradients of o = [o1 | o2 | o3] and of the vector projection [vec1 | vec2 | vec3] from those
// of x' and vec' (see update_impl)
template <typename T>
void update_backward_impl(const T* __restrict__ GX, const T* __restrict__ GVEC,
                          const T* __restrict__ VP, const T* __restrict__ O,
                          const T* __restrict__ VDOT, T* __restrict__ GO, T* __restrict__ GVP,
                          int64_t n, int64_t f) {
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* __restrict__ o = O + i * 3 * f;
      const T* __restrict__ vp = VP + i * 9 * f;
      const T* __restrict__ gx = GX + i * f;
      const T* __restrict__ gv = GVEC + i * 3 * f;
      T* __restrict__ go = GO + i * 3 * f;
      T* __restrict__ gvp = GVP + i * 9 * f;
#pragma omp simd
      for (int64_t c = 0; c < f; ++c) {
        const T gvd = gx[c] * o[f + c];  // d vdot
        go[c] = gv[c] * vp[2 * f + c] + gv[f + c] * vp[5 * f + c] + gv[2 * f + c] * vp[8 * f + c];
        go[f + c] = gx[c] * VDOT[i * f + c];
        go[2 * f + c] = gx[c];
        for (int64_t m = 0; m < 3; ++m) {
          gvp[3 * m * f + c] = gvd * vp[3 * m * f + f + c];
          gvp[3 * m * f + f + c] = gvd * vp[3 * m * f + c];
          gvp[3 * m * f + 2 * f + c] = gv[m * f + c] * o[c];
        }
      }
    }
  });
}

void check_stack(const torch::Tensor& x, const std::vector<torch::Tensor>& params,
                 const torch::Tensor& rbf, const torch::Tensor& rbf_index, int64_t edges) {
  TORCH_CHECK(!params.empty() && params.size() % kStackParams == 0,
              "et_stack: ", kStackParams, " parameters per layer expected, got ", params.size());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "et_stack: x must be a contiguous [N, F]");
  TORCH_CHECK(rbf.dim() == 2 && rbf.is_contiguous() && rbf.scalar_type() == x.scalar_type(),
              "et_stack: rbf must be a contiguous [P, K] of x's dtype");
  if (rbf_index.numel() > 0 || rbf.size(0) != edges) {
    TORCH_CHECK(rbf_index.dim() == 1 && rbf_index.size(0) == edges &&
                    rbf_index.scalar_type() == torch::kLong,
                "et_stack: rbf_index must be an int64 [E] when rbf has one row per atom pair");
  }
  // (called under autograd's no-grad mode of a Function's forward and backward: parameters that
  // require grad record nothing here)
  for (const auto& p : params) {
    TORCH_CHECK(p.is_contiguous() && p.scalar_type() == x.scalar_type(),
                "et_stack: parameters must be contiguous and of x's dtype");
  }
}

}  // namespace

// returns {x_out, vec_out, then per layer: x, mean, rstd, qkv, vec, vp, pre, filt, filt_e, acts, o, vdot}
std::vector<torch::Tensor> et_stack_forward(torch::Tensor x, torch::Tensor vec, torch::Tensor rbf,
                                            torch::Tensor rbf_index, torch::Tensor cut,
                                            torch::Tensor unit, torch::Tensor rowptr,
                                            torch::Tensor col, std::vector<torch::Tensor> params,
                                            int64_t heads, int64_t act, int64_t filter_act_code,
                                            bool vector_cutoff, double eps) {
  const int64_t n = x.size(0), f = x.size(1), e = col.size(0);
  check_stack(x, params, rbf, rbf_index, e);
  const bool pairs = rbf_index.numel() > 0;
  const int64_t layers = static_cast<int64_t>(params.size()) / kStackParams;
  std::vector<torch::Tensor> out(2);
  out.reserve(2 + layers * kStackSaved);
  for (int64_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = params.data() + l * kStackParams;
    auto ln = at::native_layer_norm(x, {f}, w[0], w[1], eps);
    const auto& xn = std::get<0>(ln);
    auto qkv = at::addmm(w[3], xn, w[2].t());
    auto vp = at::mm(vec.view({3 * n, f}), w[4].t()).view({n, 3, 3 * f});
    auto pre = at::addmm(w[6], rbf, w[5].t());
    auto filt = act_tensor(pre, filter_act_code);
    auto filt_e = pairs ? filt.index_select(0, rbf_index) : filt;
    auto msg = et_message_forward(qkv, vec, filt_e, cut, unit, rowptr, col, heads, act, vector_cutoff);
    auto o = at::addmm(w[8], msg[0], w[7].t());
    auto x_next = torch::empty_like(x), vec_next = torch::empty_like(vec), vdot = torch::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "et_stack_update", [&] {
      update_impl<scalar_t>(x.data_ptr<scalar_t>(), vec.data_ptr<scalar_t>(), vp.data_ptr<scalar_t>(),
                            o.data_ptr<scalar_t>(), msg[1].data_ptr<scalar_t>(),
                            x_next.data_ptr<scalar_t>(), vec_next.data_ptr<scalar_t>(),
                            vdot.data_ptr<scalar_t>(), n, f);
    });
    for (const auto& t : {x, std::get<1>(ln), std::get<2>(ln), qkv, vec, vp, pre, filt, filt_e, msg[2], o, vdot}) {
      out.push_back(t);
    }
    x = x_next;
    vec = vec_next;
  }
  out[0] = x;
  out[1] = vec;
  return out;
}

// gradients {x, vec, rbf, cut, unit} of the stack's inputs from those of its outputs
std::vector<torch::Tensor> et_stack_backward(
    torch::Tensor grad_x, torch::Tensor grad_vec, std::vector<torch::Tensor> saved,
    torch::Tensor rbf, torch::Tensor rbf_index, torch::Tensor cut, torch::Tensor unit,
    torch::Tensor rowptr, torch::Tensor col, torch::Tensor colptr, torch::Tensor colperm,
    torch::Tensor row, std::vector<torch::Tensor> params, int64_t heads, int64_t filter_act_code,
    bool vector_cutoff) {
  const int64_t layers = static_cast<int64_t>(params.size()) / kStackParams;
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == layers * kStackSaved, "et_stack: saved tensors");
  const bool pairs = rbf_index.numel() > 0;
  auto gx = grad_x.contiguous(), gvec = grad_vec.contiguous();
  auto g_rbf = torch::zeros_like(rbf), g_cut = torch::zeros_like(cut), g_unit = torch::zeros_like(unit);
  for (int64_t l = layers - 1; l >= 0; --l) {
    const torch::Tensor* w = params.data() + l * kStackParams;
    const torch::Tensor* s = saved.data() + l * kStackSaved;
    const auto &x = s[0], &mean = s[1], &rstd = s[2], &qkv = s[3], &vec = s[4], &vp = s[5],
               &pre = s[6], &filt = s[7], &filt_e = s[8], &acts = s[9], &o = s[10], &vdot = s[11];
    const int64_t n = x.size(0), f = x.size(1);
    auto go = torch::empty_like(o), gvp = torch::empty_like(vp);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "et_stack_update_backward", [&] {
      update_backward_impl<scalar_t>(gx.data_ptr<scalar_t>(), gvec.data_ptr<scalar_t>(),
                                     vp.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                     vdot.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(),
                                     gvp.data_ptr<scalar_t>(), n, f);
    });
    auto g_xagg = at::mm(go, w[7]);
    // vec_agg enters vec' unchanged: its gradient is grad_vec
    auto g = et_message_backward(g_xagg, gvec, qkv, vec, filt_e, cut, unit, acts, rowptr, col,
                                 colptr, colperm, row, heads, vector_cutoff);
    g_cut.add_(g[3]);
    g_unit.add_(g[4]);
    auto g_filt = pairs ? torch::zeros_like(filt).index_add_(0, rbf_index, g[2]) : g[2];
    auto g_pre = act_tensor_backward(g_filt, pre, filt, filter_act_code);
    g_rbf.addmm_(g_pre, w[5]);
    // vec: the residual, the messages' senders and the vector projection
    auto gvec_next = g[1].add_(gvec);
    gvec_next.view({3 * n, f}).addmm_(gvp.view({3 * n, 3 * f}), w[4]);
    // x: the residual and the layer norm under the q/k/v projection
    auto g_xn = at::mm(g[0], w[2]);
    auto g_ln = at::native_layer_norm_backward(g_xn, x, {f}, mean, rstd, w[0], w[1],
                                               {true, false, false});
    gx = std::get<0>(g_ln).add_(gx);
    gvec = gvec_next;
  }
  return {gx, gvec, g_rbf, g_cut, g_unit};
}

// ---------------------------------------------------------------------------------------------
// The energy head (forcecentric.nn.heads.EnergyHead: two gated equivariant blocks) forward and
// backward to its inputs, for the same inference calls as the stack: no parameter gradients.
//   block 1: v1 = vec W1^T, n = sqrt(sum_m v1^2 + 1e-8), h = act([x, n] Wa^T + ba),
//            [xo | gate] = h Wb^T + bb, x1 = act(xo), vo = gate * (vec W2^T)
//   block 2: u1 = vo U1^T, n2 = sqrt(sum_m u1^2 + 1e-8), h2 = act([x1, n2] Ua^T + ua),
//            y = h2 Ub^T + ub
// params: W1, W2, Wa, ba, Wb, bb, U1, Ua, ua, Ub, ub

namespace {

constexpr int kHeadParams = 11;
constexpr int kHeadSaved = 12;  // see energy_head_forward

// sqrt(sum over the spatial axis of v^2 + 1e-8) for v [N, 3, C]
torch::Tensor spatial_norm(const torch::Tensor& v) {
  return (v * v).sum(1).add_(1e-8).sqrt_();
}

}  // namespace

// returns {y [N], then v1, n, h, ha, xo, x1, gate, v2, u1, n2, h2, ha2}
std::vector<torch::Tensor> energy_head_forward(torch::Tensor x, torch::Tensor vec,
                                               std::vector<torch::Tensor> w, int64_t act) {
  TORCH_CHECK(static_cast<int64_t>(w.size()) == kHeadParams, "energy_head: ", kHeadParams,
              " parameters expected, got ", w.size());
  TORCH_CHECK(x.dim() == 2 && vec.dim() == 3 && vec.size(0) == x.size(0) && vec.size(1) == 3 &&
                  vec.size(2) == x.size(1),
              "energy_head: x [N, F] and vec [N, 3, F] expected");
  for (const auto& p : w) {
    TORCH_CHECK(p.scalar_type() == x.scalar_type(), "energy_head: parameters must be of x's dtype");
  }
  const int64_t n = x.size(0), f = x.size(1), mid = w[1].size(0);
  auto vflat = vec.reshape({3 * n, f});
  auto v1 = at::mm(vflat, w[0].t()).view({n, 3, f});
  auto nrm = spatial_norm(v1);
  auto h = at::addmm(w[3], at::cat({x, nrm}, 1), w[2].t());
  auto ha = act_tensor(h, act);
  auto out = at::addmm(w[5], ha, w[4].t());
  auto xo = out.narrow(1, 0, mid).contiguous();
  auto gate = out.narrow(1, mid, mid).contiguous();
  auto x1 = act_tensor(xo, act);
  auto v2 = at::mm(vflat, w[1].t()).view({n, 3, mid});
  auto vo = gate.unsqueeze(1) * v2;
  auto u1 = at::mm(vo.view({3 * n, mid}), w[6].t()).view({n, 3, mid});
  auto n2 = spatial_norm(u1);
  auto h2 = at::addmm(w[8], at::cat({x1, n2}, 1), w[7].t());
  auto ha2 = act_tensor(h2, act);
  auto y = at::addmm(w[10], ha2, w[9].t()).view({n});
  return {y, v1, nrm, h, ha, xo, x1, gate, v2, u1, n2, h2, ha2};
}

// gradients {x, vec} of the head's inputs from that of y
std::vector<torch::Tensor> energy_head_backward(torch::Tensor grad_y, std::vector<torch::Tensor> s,
                                                std::vector<torch::Tensor> w, int64_t act) {
  TORCH_CHECK(static_cast<int64_t>(s.size()) == kHeadSaved && static_cast<int64_t>(w.size()) == kHeadParams,
              "energy_head: saved tensors");
  const auto &v1 = s[0], &nrm = s[1], &h = s[2], &ha = s[3], &xo = s[4], &x1 = s[5], &gate = s[6],
             &v2 = s[7], &u1 = s[8], &n2 = s[9], &h2 = s[10], &ha2 = s[11];
  const int64_t n = v1.size(0), f = v1.size(2), mid = gate.size(1);
  // block 2
  auto g_h2 = act_tensor_backward(at::mm(grad_y.reshape({n, 1}), w[9]), h2, ha2, act);
  auto g_s2 = at::mm(g_h2, w[7]);
  auto g_x1 = g_s2.narrow(1, 0, mid);
  auto g_u1 = (g_s2.narrow(1, mid, mid) / n2).unsqueeze(1) * u1;
  auto g_vo = at::mm(g_u1.view({3 * n, mid}), w[6]).view({n, 3, mid});
  // block 1
  auto g_out = at::cat({act_tensor_backward(g_x1, xo, x1, act), (g_vo * v2).sum(1)}, 1);
  auto g_v2 = g_vo * gate.unsqueeze(1);
  auto g_h = act_tensor_backward(at::mm(g_out, w[4]), h, ha, act);
  auto g_s = at::mm(g_h, w[2]);
  auto g_v1 = (g_s.narrow(1, f, f) / nrm).unsqueeze(1) * v1;
  auto g_vec = at::mm(g_v1.view({3 * n, f}), w[0]);
  g_vec.addmm_(g_v2.view({3 * n, mid}), w[1]);
  return {g_s.narrow(1, 0, f).contiguous(), g_vec.view({n, 3, f})};
}

// ---------------------------------------------------------------------------------------------
// The front of the representation (forcecentric.nn.et.ETRepresentation.forward up to the
// layers), forward and backward to the positions, for the same inference calls as the stack.
// Per real edge e = (i <- j): d = pos[j] - pos[i], r = |d|, unit = d / r,
//   cut(r) = 0.5 (cos(pi r / rc) + 1) [r < rc],  rbf_k = cut(r) exp(-beta_k (exp(-alpha r) - mu_k)^2)
// then one self loop per atom (r = 0, unit = 0) after the real edges. Scalars:
//   x = emb[z], and with the neighbour embedding
//   x <- [x, sum_j nemb[z_j] (rbf_e Wd^T + bd) cut(r_e)] Wc^T + bc
// params: emb, means, betas, then (neighbour embedding) nemb, Wd, bd, Wc, bc

namespace {

// the cosine cutoff 0.5 (cos(pi r / rc) + 1) for r < rc (else 0); its slope too when asked
template <typename T>
inline T cosine_cutoff(T r, T rc, T* slope = nullptr) {
  const T w = T(3.14159265358979323846) / rc;
  const bool inside = r < rc;
  if (slope != nullptr) *slope = inside ? T(-0.5) * w * std::sin(r * w) : T(0);
  return inside ? T(0.5) * (std::cos(r * w) + T(1)) : T(0);
}

template <typename T>
void front_edges_impl(const T* __restrict__ POS, const int64_t* I, const int64_t* J,
                      const T* __restrict__ MU, const T* __restrict__ BETA, T* __restrict__ R,
                      T* __restrict__ UNIT, T* __restrict__ CUT, T* __restrict__ RBF, int64_t e,
                      int64_t k, T rc, T alpha) {
  at::parallel_for(0, e, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const T* pi_ = POS + 3 * I[q];
      const T* pj = POS + 3 * J[q];
      const T d0 = pj[0] - pi_[0], d1 = pj[1] - pi_[1], d2 = pj[2] - pi_[2];
      const T r = std::sqrt(d0 * d0 + d1 * d1 + d2 * d2);
      R[q] = r;
      UNIT[3 * q] = d0 / r;
      UNIT[3 * q + 1] = d1 / r;
      UNIT[3 * q + 2] = d2 / r;
      const T c = cosine_cutoff(r, rc);
      CUT[q] = c;
      const T ex = std::exp(-alpha * r);
      for (int64_t b = 0; b < k; ++b) {
        const T t = ex - MU[b];
        RBF[q * k + b] = c * std::exp(-BETA[b] * t * t);
      }
    }
  });
}

// dL/dr of each real edge (from rbf, cut and r itself), then dL/d(edge vector) from it and from
// dL/dunit: written per edge, summed into the positions afterwards
template <typename T>
void front_edges_backward_impl(const T* __restrict__ R, const T* __restrict__ UNIT,
                               const T* __restrict__ MU, const T* __restrict__ BETA,
                               const T* __restrict__ GRBF, const T* __restrict__ GCUT,
                               const T* __restrict__ GUNIT, T* __restrict__ GD, int64_t e,
                               int64_t k, T rc, T alpha) {
  at::parallel_for(0, e, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const T r = R[q];
      T dc;
      const T c = cosine_cutoff(r, rc, &dc);
      const T ex = std::exp(-alpha * r);
      T gr = GCUT[q] * dc;
      for (int64_t b = 0; b < k; ++b) {
        const T t = ex - MU[b];
        const T g = std::exp(-BETA[b] * t * t);
        // d/dr [c g] = dc g + c g (-2 beta t) (-alpha ex)
        gr += GRBF[q * k + b] * g * (dc + c * T(2) * BETA[b] * t * alpha * ex);
      }
      const T u0 = UNIT[3 * q], u1 = UNIT[3 * q + 1], u2 = UNIT[3 * q + 2];
      const T g0 = GUNIT[3 * q], g1 = GUNIT[3 * q + 1], g2 = GUNIT[3 * q + 2];
      const T ug = u0 * g0 + u1 * g1 + u2 * g2;
      // unit = d / r: d unit / d d = (1 - u u^T) / r;  r: d r / d d = u
      GD[3 * q] = (g0 - u0 * ug) / r + gr * u0;
      GD[3 * q + 1] = (g1 - u1 * ug) / r + gr * u1;
      GD[3 * q + 2] = (g2 - u2 * ug) / r + gr * u2;
    }
  });
}

}  // namespace

// returns {x, att_rbf [E + N, K], att_cut [E + N], att_unit [E + N, 3], then r, cut_e, lin}
std::vector<torch::Tensor> et_front_forward(torch::Tensor pos, torch::Tensor z, torch::Tensor idx_i,
                                            torch::Tensor idx_j, std::vector<torch::Tensor> w,
                                            double cutoff, double alpha) {
  TORCH_CHECK(w.size() == 3 || w.size() == 8, "et_front: 3 or 8 parameters expected, got ", w.size());
  TORCH_CHECK(pos.dim() == 2 && pos.size(1) == 3 && pos.is_contiguous(), "et_front: pos must be a contiguous [N, 3]");
  TORCH_CHECK(idx_i.scalar_type() == torch::kLong && idx_j.scalar_type() == torch::kLong &&
                  idx_i.is_contiguous() && idx_j.is_contiguous() && idx_i.size(0) == idx_j.size(0),
              "et_front: int64 edge indices expected");
  const int64_t n = pos.size(0), e = idx_i.size(0), k = w[1].size(0);
  auto opts = pos.options();
  auto r = torch::empty({e}, opts);
  auto unit = torch::zeros({e + n, 3}, opts);
  auto cut = torch::empty({e + n}, opts);
  auto rbf = torch::empty({e + n, k}, opts);
  auto means = w[1].contiguous(), betas = w[2].contiguous();
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "et_front_edges", [&] {
    front_edges_impl<scalar_t>(pos.data_ptr<scalar_t>(), idx_i.data_ptr<int64_t>(),
                               idx_j.data_ptr<int64_t>(), means.data_ptr<scalar_t>(),
                               betas.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
                               unit.data_ptr<scalar_t>(), cut.data_ptr<scalar_t>(),
                               rbf.data_ptr<scalar_t>(), e, k, static_cast<scalar_t>(cutoff),
                               static_cast<scalar_t>(alpha));
  });
  // the self loops: r = 0 (cut = 1, rbf from the same formula), unit = 0
  cut.narrow(0, e, n).fill_(1);
  rbf.narrow(0, e, n).copy_(torch::exp(-betas * (1 - means).pow(2)).expand({n, k}));
  auto x = w[0].index_select(0, z);
  if (w.size() == 3) {
    return {x, rbf, cut, unit, r, torch::empty({0}, opts), torch::empty({0}, opts)};  // (no neighbour embedding)
  }
  auto cut_e = cut.narrow(0, 0, e);
  auto lin = at::addmm(w[5], rbf.narrow(0, 0, e), w[4].t());
  auto msg = w[3].index_select(0, z.index_select(0, idx_j)) * (lin * cut_e.unsqueeze(1));
  auto agg = torch::zeros_like(x).index_add_(0, idx_i, msg);
  auto x0 = at::addmm(w[7], at::cat({x, agg}, 1), w[6].t());
  return {x0, rbf, cut, unit, r, cut_e, lin};
}

// gradient of the positions from those of x, att_rbf, att_cut and att_unit
torch::Tensor et_front_backward(torch::Tensor g_x, torch::Tensor g_rbf, torch::Tensor g_cut,
                                torch::Tensor g_unit, torch::Tensor pos, torch::Tensor z,
                                torch::Tensor idx_i, torch::Tensor idx_j, torch::Tensor r,
                                torch::Tensor unit, torch::Tensor cut_e, torch::Tensor lin,
                                std::vector<torch::Tensor> w, double cutoff, double alpha) {
  const int64_t e = idx_i.size(0), k = w[1].size(0), f = w[0].size(1);
  auto grbf = g_rbf.narrow(0, 0, e).contiguous();
  auto gcut = g_cut.narrow(0, 0, e).contiguous();
  if (w.size() == 8) {
    // x0 = [x, agg] Wc^T + bc;  agg_i = sum_e nemb[z_j] lin_e cut_e
    auto g_agg = at::mm(g_x, w[6]).narrow(1, f, f);
    auto g_w = g_agg.index_select(0, idx_i).mul_(w[3].index_select(0, z.index_select(0, idx_j)));  // d (lin cut)
    gcut = gcut + (g_w * lin).sum(1);
    grbf = grbf.addmm(g_w.mul_(cut_e.unsqueeze(1)), w[4]);
  }
  auto gunit = g_unit.narrow(0, 0, e).contiguous();
  auto gd = torch::empty({e, 3}, pos.options());
  auto means = w[1].contiguous(), betas = w[2].contiguous();
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "et_front_edges_backward", [&] {
    front_edges_backward_impl<scalar_t>(
        r.data_ptr<scalar_t>(), unit.data_ptr<scalar_t>(), means.data_ptr<scalar_t>(),
        betas.data_ptr<scalar_t>(), grbf.data_ptr<scalar_t>(), gcut.data_ptr<scalar_t>(),
        gunit.data_ptr<scalar_t>(), gd.data_ptr<scalar_t>(), e, k, static_cast<scalar_t>(cutoff),
        static_cast<scalar_t>(alpha));
  });
  return torch::zeros_like(pos).index_add_(0, idx_j, gd).index_add_(0, idx_i, -gd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &et_message_forward, "fused ET message passing, forward (CPU)");
  m.def("backward", &et_message_backward, "fused ET message passing, backward (CPU)");
  m.def("stack_forward", &et_stack_forward, "the ET's layer stack, forward (CPU inference)");
  m.def("stack_backward", &et_stack_backward, "the ET's layer stack, backward to its inputs (CPU)");
  m.def("front_forward", &et_front_forward, "the representation's front, forward (CPU inference)");
  m.def("front_backward", &et_front_backward, "the representation's front, backward to the positions (CPU)");
  m.def("head_forward", &energy_head_forward, "the energy head, forward (CPU inference)");
  m.def("head_backward", &energy_head_backward, "the energy head, backward to its inputs (CPU)");
}

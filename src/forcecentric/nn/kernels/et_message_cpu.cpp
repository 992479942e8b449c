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

torch::Tensor filter_act(const torch::Tensor& pre, int64_t act) {
  switch (act) {
    case SILU: return at::silu(pre);
    case SSP: return at::softplus(pre, 1, 20) - 0.69314718055994530942;
    case TANH: return at::tanh(pre);
    default: return at::gelu(pre);
  }
}

torch::Tensor filter_act_backward(const torch::Tensor& grad, const torch::Tensor& pre,
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
  for (const auto& p : params) {
    TORCH_CHECK(p.is_contiguous() && p.scalar_type() == x.scalar_type() && !p.requires_grad(),
                "et_stack: parameters must be contiguous, of x's dtype and detached");
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
    auto filt = filter_act(pre, filter_act_code);
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
  const int64_t per = kStackSaved;
  const int64_t layers = static_cast<int64_t>(params.size()) / kStackParams;
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == layers * per, "et_stack: saved tensors");
  const bool pairs = rbf_index.numel() > 0;
  auto gx = grad_x.contiguous(), gvec = grad_vec.contiguous();
  auto g_rbf = torch::zeros_like(rbf), g_cut = torch::zeros_like(cut), g_unit = torch::zeros_like(unit);
  for (int64_t l = layers - 1; l >= 0; --l) {
    const torch::Tensor* w = params.data() + l * kStackParams;
    const torch::Tensor* s = saved.data() + l * per;
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
    auto g_pre = filter_act_backward(g_filt, pre, filt, filter_act_code);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &et_message_forward, "fused ET message passing, forward (CPU)");
  m.def("backward", &et_message_backward, "fused ET message passing, backward (CPU)");
  m.def("stack_forward", &et_stack_forward, "the ET's layer stack, forward (CPU inference)");
  m.def("stack_backward", &et_stack_backward, "the ET's layer stack, backward to its inputs (CPU)");
}

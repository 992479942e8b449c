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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &et_message_forward, "fused ET message passing, forward (CPU)");
  m.def("backward", &et_message_backward, "fused ET message passing, backward (CPU)");
}

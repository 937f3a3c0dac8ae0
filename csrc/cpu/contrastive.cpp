// Contrastive (InfoNCE) sweep on CPU: logits = scale * a @ b.T recomputed tile by tile, never B x B.
// Forward: per-row (and per-column when symmetric) max-stable logsumexp, max, argmax and positive
// logit, merged online across tiles, both directions from the same tile. Backward: recomputes
// each tile and turns it in place into d loss / d logits,
//   G = g_row (P - pos_weight onehot(labels_row) - smooth_row)
//     + g_col (Q - pos_weight onehot(labels_col) - smooth_col)   (column terms when symmetric),
// then accumulates G @ b and G.T @ a. Each product is an ATen matmul (all cores; the narrow
// gradient ones in fixed blocks of rows, see addmm_rows) plus fused, vectorized passes over the
// tile while it is in cache (2 exps per logit forward, 2 backward).
// Extra memory: one tile buffer plus O(B) statistics. a, b are the prepared (normalized,
// fp32/fp64, contiguous) rows; a label of -1 has no positive among these columns.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <tuple>

namespace wmkernels {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WMK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define WMK_CLONES
#endif
#define WMK_INLINE inline __attribute__((always_inline))

// exp for fp32 in plain arithmetic so the compiler vectorizes it: Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial (about 1 ulp), 2^n from the exponent
// bits. GCC vectorizes the loops using it in the avx512f clones. Inputs here are logit - max <= 0;
// below -87 the result is the smallest normal, which no sum of at least exp(0) = 1 notices.
WMK_INLINE float exp_acc(float x) {
  x = std::max(std::min(x, 88.0f), -87.0f);
  // round to nearest by adding and removing 1.5 * 2^23 (no floor call: that would stop vectorization)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}
WMK_INLINE double exp_acc(double x) { return std::exp(x); }

// Row pass: scales the row in place and returns its max; the argmax is the first index of it.
template <typename T>
WMK_INLINE T scale_max_impl(T* x, int64_t n, T s) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    x[j] *= s;
    m = x[j] > m ? x[j] : m;
  }
  return m;
}
template <typename T>
WMK_INLINE T exp_sum_impl(const T* x, int64_t n, T m) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += exp_acc(x[j] - m);
  return acc;
}
// Column pass over one row of the tile: running column max / first argmax, then exp sums.
template <typename T>
WMK_INLINE void col_max_impl(const T* x, int64_t n, T* cm, int64_t* carg, int64_t row) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const bool up = x[j] > cm[j];
    cm[j] = up ? x[j] : cm[j];
    carg[j] = up ? row : carg[j];
  }
}
template <typename T>
WMK_INLINE void col_exp_impl(const T* x, int64_t n, const T* cm, T* cs) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) cs[j] += exp_acc(x[j] - cm[j]);
}
#define WMK_KERNELS(T)                                                                                   \
  WMK_CLONES T scale_max(T* x, int64_t n, T s) { return scale_max_impl<T>(x, n, s); }                    \
  WMK_CLONES T exp_sum(const T* x, int64_t n, T m) { return exp_sum_impl<T>(x, n, m); }                  \
  WMK_CLONES void col_max(const T* x, int64_t n, T* cm, int64_t* carg, int64_t row) {                    \
    col_max_impl<T>(x, n, cm, carg, row);                                                                \
  }                                                                                                      \
  WMK_CLONES void col_exp(const T* x, int64_t n, const T* cm, T* cs) { col_exp_impl<T>(x, n, cm, cs); }
WMK_KERNELS(float)
WMK_KERNELS(double)

// The backward recomputes each logit as the forward rounded it (s * x, then minus the logsumexp):
// contracted into a fused multiply-add, s * x - lse would skip the product's rounding, an error of
// ulp(logit) that a large scale turns into a wrong probability.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
// Backward: x <- g_r (exp(s x - lse_r) - sr) [+ g_c[j] (exp(s x - lse_c[j]) - sc)], in place.
// Exponents capped at 0 (a probability is at most 1) as a guard: an ulp of difference between the
// forward's logits and these, times a scale of 1e6+, would otherwise overflow the exp.
template <typename T, bool SYM>
WMK_INLINE void grad_row_impl(T* x, int64_t n, T s, T lse_r, T g_r, T sr, const T* lse_c, const T* g_c, T sc) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T v = s * x[j];
    T g = g_r * (exp_acc(std::min(v - lse_r, T(0))) - sr);
    if constexpr (SYM) g += g_c[j] * (exp_acc(std::min(v - lse_c[j], T(0))) - sc);
    x[j] = g;
  }
}

#define WMK_GRAD_KERNEL(T)                                                                               \
  WMK_CLONES void grad_row(T* x, int64_t n, T s, T lr, T gr, T sr, const T* lc, const T* gc, T sc,       \
                           bool sym) {                                                                   \
    if (sym) {                                                                                           \
      grad_row_impl<T, true>(x, n, s, lr, gr, sr, lc, gc, sc);                                           \
    } else {                                                                                             \
      grad_row_impl<T, false>(x, n, s, lr, gr, sr, lc, gc, sc);                                          \
    }                                                                                                    \
  }
WMK_GRAD_KERNEL(float)
WMK_GRAD_KERNEL(double)
#pragma GCC pop_options

// out[rows] += a[rows] @ b in fixed blocks of kMmRows rows, one
// single-threaded BLAS call each, spread over an OpenMP team. Given all threads, BLAS splits the
// reduction dimension when the output is narrow (G @ b is tile x D): the rounding then depends on
// the thread count (sgemm 2048 x 2048 x 40: 1 vs 3 threads differ). Inside an active team BLAS runs
// sequentially, and the fixed blocks make every result bitwise the same whatever the thread count.
constexpr int64_t kMmRows = 128;  // 16 blocks per 2048-row tile: every core of a 16-core box busy

void addmm_rows(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const int64_t m = out.size(0), blocks = (m + kMmRows - 1) / kMmRows;
  std::exception_ptr error;
  const at::ThreadLocalState state;  // grad mode and the like, for the team's threads (as at::parallel_for)
  // the team is formed even for one block: outside a team BLAS would use every thread again
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < blocks; ++k) {
    try {
      at::ThreadLocalStateGuard guard(state);
      const int64_t r0 = k * kMmRows, r = std::min(kMmRows, m - r0);
      out.narrow(0, r0, r).addmm_(a.narrow(0, r0, r), b);
    } catch (...) {
#pragma omp critical(wmk_addmm_rows)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

constexpr int64_t kColChunk = 128;  // columns per task in the column pass: ti x 128 stays in L2

template <typename T>
int64_t first_index(const T* x, int64_t n, T m) {
  for (int64_t j = 0; j < n; ++j)
    if (x[j] == m) return j;
  return 0;
}

// Merges one scaled tile S (ti x tj, row stride ld) into the running row statistics of its rows.
template <typename T>
void rows_update(T* S, int64_t ti, int64_t tj, int64_t ld, T s, int64_t j0, const int64_t* lab, T* rm, T* rs,
                 int64_t* rarg, T* rpos) {
  at::parallel_for(0, ti, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T* x = S + i * ld;
      const T tmax = scale_max(x, tj, s);
      const int64_t y = lab[i] - j0;
      if (y >= 0 && y < tj) rpos[i] = x[y];
      const T m = std::max(rm[i], tmax);
      const T sum = exp_sum(x, tj, m);
      if (tmax > rm[i]) rarg[i] = j0 + first_index(x, tj, tmax);
      rs[i] = rs[i] * exp_acc(rm[i] - m) + sum;
      rm[i] = m;
    }
  });
}

// Merges the (already scaled) tile into the running statistics of its columns.
template <typename T>
void cols_update(const T* S, int64_t ti, int64_t tj, int64_t ld, int64_t i0, const int64_t* lab, T* cm, T* cs,
                 int64_t* carg, T* cpos) {
  for (int64_t j = 0; j < tj; ++j) {
    const int64_t y = lab[j] - i0;
    if (y >= 0 && y < ti) cpos[j] = S[y * ld + j];
  }
  const int64_t chunks = (tj + kColChunk - 1) / kColChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    T tm[kColChunk];
    int64_t targ[kColChunk];
    for (int64_t c = b; c < e; ++c) {
      const int64_t c0 = c * kColChunk, w = std::min(kColChunk, tj - c0);
      std::fill(tm, tm + w, -std::numeric_limits<T>::infinity());
      for (int64_t i = 0; i < ti; ++i) col_max(S + i * ld + c0, w, tm, targ, i);
      for (int64_t j = 0; j < w; ++j) {
        const T m = std::max(cm[c0 + j], tm[j]);
        if (tm[j] > cm[c0 + j]) carg[c0 + j] = i0 + targ[j];
        cs[c0 + j] *= exp_acc(cm[c0 + j] - m);
        cm[c0 + j] = m;
      }
      for (int64_t i = 0; i < ti; ++i) col_exp(S + i * ld + c0, w, cm + c0, cs + c0);
    }
  });
}

// Eight tensors in a fixed tuple, not a Tensor[]: torch.func.vmap's per-sample fallback handles the former only.
using SweepStats =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SweepStats contrastive_sweep_fwd_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                                     const at::Tensor& labels_row, const at::Tensor& labels_col, bool symmetric,
                                     int64_t tile) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && a.is_contiguous() && b.is_contiguous() &&
                  a.scalar_type() == b.scalar_type(),
              "contrastive_sweep_fwd: expected contiguous (M, D), (N, D) rows of one dtype");
  const int64_t M = a.size(0), N = b.size(0), T = std::max<int64_t>(tile, 1);
  TORCH_CHECK(labels_row.numel() == M && (!symmetric || labels_col.numel() == N),
              "contrastive_sweep_fwd: expected one label per row (and per column when symmetric)");
  const at::Tensor lr = labels_row.to(at::kLong).contiguous();
  const at::Tensor lc = symmetric ? labels_col.to(at::kLong).contiguous() : lr;
  const auto opt = a.options();
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t nc = symmetric ? N : 0;
  at::Tensor rm = at::full({M}, -inf, opt), rs = at::zeros({M}, opt), rarg = at::zeros({M}, opt.dtype(at::kLong));
  at::Tensor rpos = at::zeros({M}, opt);
  at::Tensor cm = at::full({nc}, -inf, opt), cs = at::zeros({nc}, opt), carg = at::zeros({nc}, opt.dtype(at::kLong));
  at::Tensor cpos = at::zeros({nc}, opt);
  at::Tensor buf = at::empty({std::min(T, M), std::min(T, N)}, opt);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "contrastive_sweep_fwd", [&] {
    const scalar_t s = scale.item<double>();
    for (int64_t i0 = 0; i0 < M; i0 += T) {
      const int64_t ti = std::min(T, M - i0);
      const at::Tensor ai = a.narrow(0, i0, ti);
      for (int64_t j0 = 0; j0 < N; j0 += T) {
        const int64_t tj = std::min(T, N - j0);
        at::Tensor S = buf.narrow(0, 0, ti).narrow(1, 0, tj);
        at::mm_out(S, ai, b.narrow(0, j0, tj).t());  // a wide output: BLAS splits rows and columns
        scalar_t* sp = buf.data_ptr<scalar_t>();
        const int64_t ld = buf.size(1);
        rows_update<scalar_t>(sp, ti, tj, ld, s, j0, lr.data_ptr<int64_t>() + i0, rm.data_ptr<scalar_t>() + i0,
                              rs.data_ptr<scalar_t>() + i0, rarg.data_ptr<int64_t>() + i0,
                              rpos.data_ptr<scalar_t>() + i0);
        if (symmetric)
          cols_update<scalar_t>(sp, ti, tj, ld, i0, lc.data_ptr<int64_t>() + j0, cm.data_ptr<scalar_t>() + j0,
                                cs.data_ptr<scalar_t>() + j0, carg.data_ptr<int64_t>() + j0,
                                cpos.data_ptr<scalar_t>() + j0);
      }
    }
  });
  return SweepStats{rm + rs.log(), rm, rarg, rpos, cm + cs.log(), cm, carg, cpos};
}

std::tuple<at::Tensor, at::Tensor> contrastive_sweep_bwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& lse_r,
    const at::Tensor& lse_c, const at::Tensor& g_r, const at::Tensor& g_c, const at::Tensor& labels_row,
    const at::Tensor& labels_col, double pos_weight, double smooth_row, double smooth_col, bool symmetric,
    int64_t tile) {
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && lse_r.is_contiguous() && g_r.is_contiguous() &&
                  (!symmetric || (lse_c.is_contiguous() && g_c.is_contiguous())),
              "contrastive_sweep_bwd: expected contiguous inputs");
  const int64_t M = a.size(0), N = b.size(0), T = std::max<int64_t>(tile, 1);
  const at::Tensor lab_r = labels_row.to(at::kLong).contiguous();
  const at::Tensor lab_c = symmetric ? labels_col.to(at::kLong).contiguous() : lab_r;
  at::Tensor ga = at::zeros_like(a), gb = at::zeros_like(b);
  at::Tensor buf = at::empty({std::min(T, M), std::min(T, N)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "contrastive_sweep_bwd", [&] {
    const scalar_t s = scale.item<double>(), pw = pos_weight, sr = smooth_row, sc = smooth_col;
    const scalar_t* lr = lse_r.data_ptr<scalar_t>();
    const scalar_t* gr = g_r.data_ptr<scalar_t>();
    const scalar_t* lc = symmetric ? lse_c.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gc = symmetric ? g_c.data_ptr<scalar_t>() : nullptr;
    const int64_t* yr = lab_r.data_ptr<int64_t>();
    const int64_t* yc = lab_c.data_ptr<int64_t>();
    for (int64_t i0 = 0; i0 < M; i0 += T) {
      const int64_t ti = std::min(T, M - i0);
      const at::Tensor ai = a.narrow(0, i0, ti);
      at::Tensor ga_i = ga.narrow(0, i0, ti);
      for (int64_t j0 = 0; j0 < N; j0 += T) {
        const int64_t tj = std::min(T, N - j0);
        const at::Tensor bj = b.narrow(0, j0, tj);
        at::Tensor S = buf.narrow(0, 0, ti).narrow(1, 0, tj);
        at::mm_out(S, ai, bj.t());
        scalar_t* sp = buf.data_ptr<scalar_t>();
        const int64_t ld = buf.size(1);
        at::parallel_for(0, ti, 16, [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) {
            scalar_t* x = sp + i * ld;
            grad_row(x, tj, s, lr[i0 + i], gr[i0 + i], sr, symmetric ? lc + j0 : nullptr,
                     symmetric ? gc + j0 : nullptr, sc, symmetric);
            const int64_t y = yr[i0 + i] - j0;
            if (y >= 0 && y < tj) x[y] -= gr[i0 + i] * pw;
          }
        });
        if (symmetric) {
          for (int64_t j = 0; j < tj; ++j) {
            const int64_t y = yc[j0 + j] - i0;
            if (y >= 0 && y < ti) sp[y * ld + j] -= gc[j0 + j] * pw;
          }
        }
        addmm_rows(ga_i, S, bj);
        addmm_rows(gb.narrow(0, j0, tj), S.t(), ai);
      }
    }
  });
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(wmkernels_C, m) {
  m.def("contrastive_sweep_fwd(Tensor a, Tensor b, Tensor scale, Tensor labels_row, Tensor labels_col, "
        "bool symmetric, int tile) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_sweep_bwd(Tensor a, Tensor b, Tensor scale, Tensor lse_row, Tensor lse_col, "
        "Tensor g_row, Tensor g_col, Tensor labels_row, Tensor labels_col, float pos_weight, float smooth_row, "
        "float smooth_col, bool symmetric, int tile) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(wmkernels_C, CPU, m) {
  m.impl("contrastive_sweep_fwd", &contrastive_sweep_fwd_cpu);
  m.impl("contrastive_sweep_bwd", &contrastive_sweep_bwd_cpu);
}

}  // namespace wmkernels

// Contrastive (InfoNCE) sweep on CPU: logits = scale * a @ b.T recomputed tile by tile, never B x B.
// Forward: per-row (and per-column when symmetric) online max-stable logsumexp, max and argmax in
// one sweep over (row tile, column tile) pairs. Backward: recomputes each tile, forms the softmax
// part of d loss / d logits, G = g_row P + g_col Q, and accumulates G @ b and G.T @ a.
// Each tile is an ATen matmul (MKL/oneDNN, all cores) plus vectorized elementwise passes over a
// tile-sized buffer; extra memory is three tile buffers plus O(B) statistics. a, b are the
// prepared (normalized, fp32/fp64, contiguous) rows; label and smoothing terms are O(B D) and
// handled by the caller.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

namespace wmkernels {
namespace {

struct Online {
  at::Tensor m, s, arg;  // running max, sum of exp(x - m), argmax
};

Online online_init(int64_t n, const at::TensorOptions& opt) {
  return {at::full({n}, -std::numeric_limits<double>::infinity(), opt), at::zeros({n}, opt),
          at::zeros({n}, opt.dtype(at::kLong))};
}

// Merges one tile into the running statistics along `dim` (1: rows, 0: columns). `st` holds views
// into the full-length statistics, updated in place; `offset` turns tile indices into global ones.
void online_update(Online& st, const at::Tensor& tile, int64_t dim, int64_t offset, at::Tensor& buf) {
  auto [tmax, targ] = tile.max(dim);
  const at::Tensor upd = tmax > st.m;  // strict: ties keep the earlier (first) index, like argmax
  st.arg.copy_(at::where(upd, targ + offset, st.arg));
  const at::Tensor new_m = at::maximum(st.m, tmax);
  at::sub_out(buf, tile, dim == 1 ? new_m.unsqueeze(1) : new_m.unsqueeze(0));
  buf.exp_();
  st.s.mul_((st.m - new_m).exp_()).add_(buf.sum(dim));
  st.m.copy_(new_m);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_sweep_fwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, bool symmetric, int64_t tile) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "contrastive_sweep_fwd: bad shapes");
  const int64_t M = a.size(0), N = b.size(0);
  const auto opt = a.options();
  const double s = scale.item<double>();
  Online row = online_init(M, opt);
  Online col = symmetric ? online_init(N, opt) : Online{};
  const int64_t T = std::max<int64_t>(tile, 1);
  at::Tensor logits_buf = at::empty({std::min(T, M), std::min(T, N)}, opt);
  at::Tensor exp_buf = at::empty_like(logits_buf);
  for (int64_t i0 = 0; i0 < M; i0 += T) {
    const int64_t ti = std::min(T, M - i0);
    const at::Tensor ai = a.narrow(0, i0, ti);
    Online r{row.m.narrow(0, i0, ti), row.s.narrow(0, i0, ti), row.arg.narrow(0, i0, ti)};
    for (int64_t j0 = 0; j0 < N; j0 += T) {
      const int64_t tj = std::min(T, N - j0);
      at::Tensor S = logits_buf.narrow(0, 0, ti).narrow(1, 0, tj);
      at::Tensor E = exp_buf.narrow(0, 0, ti).narrow(1, 0, tj);
      at::mm_out(S, ai, b.narrow(0, j0, tj).t());
      S.mul_(s);
      online_update(r, S, 1, j0, E);
      if (symmetric) {
        Online c{col.m.narrow(0, j0, tj), col.s.narrow(0, j0, tj), col.arg.narrow(0, j0, tj)};
        online_update(c, S, 0, i0, E);
      }
    }
  }
  at::Tensor lse_r = row.m + row.s.log();
  if (!symmetric) {
    at::Tensor e = at::empty({0}, opt);
    return {lse_r, row.m, row.arg, e, e.clone(), e.to(at::kLong)};
  }
  return {lse_r, row.m, row.arg, col.m + col.s.log(), col.m, col.arg};
}

std::tuple<at::Tensor, at::Tensor> contrastive_sweep_bwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& lse_r,
    const at::Tensor& lse_c, const at::Tensor& g_r, const at::Tensor& g_c, bool symmetric, int64_t tile) {
  const int64_t M = a.size(0), N = b.size(0);
  const auto opt = a.options();
  const double s = scale.item<double>();
  at::Tensor ga = at::zeros_like(a), gb = at::zeros_like(b);
  const int64_t T = std::max<int64_t>(tile, 1);
  at::Tensor logits_buf = at::empty({std::min(T, M), std::min(T, N)}, opt);
  at::Tensor g_buf = at::empty_like(logits_buf);
  at::Tensor q_buf = symmetric ? at::empty_like(logits_buf) : at::Tensor();
  for (int64_t i0 = 0; i0 < M; i0 += T) {
    const int64_t ti = std::min(T, M - i0);
    const at::Tensor ai = a.narrow(0, i0, ti);
    at::Tensor ga_i = ga.narrow(0, i0, ti);
    const at::Tensor lr = lse_r.narrow(0, i0, ti).unsqueeze(1), gr = g_r.narrow(0, i0, ti).unsqueeze(1);
    for (int64_t j0 = 0; j0 < N; j0 += T) {
      const int64_t tj = std::min(T, N - j0);
      const at::Tensor bj = b.narrow(0, j0, tj);
      at::Tensor S = logits_buf.narrow(0, 0, ti).narrow(1, 0, tj);
      at::Tensor G = g_buf.narrow(0, 0, ti).narrow(1, 0, tj);
      at::mm_out(S, ai, bj.t());
      S.mul_(s);
      at::sub_out(G, S, lr);
      G.exp_().mul_(gr);  // g_row_i * P_ij
      if (symmetric) {
        at::Tensor Q = q_buf.narrow(0, 0, ti).narrow(1, 0, tj);
        at::sub_out(Q, S, lse_c.narrow(0, j0, tj).unsqueeze(0));
        Q.exp_().mul_(g_c.narrow(0, j0, tj).unsqueeze(0));
        G.add_(Q);
      }
      ga_i.addmm_(G, bj);
      gb.narrow(0, j0, tj).addmm_(G.t(), ai);
    }
  }
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(wmkernels_C, m) {
  m.def("contrastive_sweep_fwd(Tensor a, Tensor b, Tensor scale, bool symmetric, int tile) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_sweep_bwd(Tensor a, Tensor b, Tensor scale, Tensor lse_row, Tensor lse_col, "
        "Tensor g_row, Tensor g_col, bool symmetric, int tile) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(wmkernels_C, CPU, m) {
  m.impl("contrastive_sweep_fwd", &contrastive_sweep_fwd_cpu);
  m.impl("contrastive_sweep_bwd", &contrastive_sweep_bwd_cpu);
}

}  // namespace wmkernels

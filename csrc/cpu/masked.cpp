// Masked video modeling on CPU: tubelet patches read straight from the raw (strided) video.
//
// masked_gather: out[b, k, :] = patch ids[b, k] of the video, `(pt ph pw) c` order, optionally
//   (x - mean[c]) / std[c]. Reads the gathered patches once, writes them once.
// masked_mse_fwd: per masked patch, load the patch (strided reads of pw-long runs), normalize it
//   (norm_pix), and sum (pred - target)^2; with write_grad also write d loss / d pred in the same
//   pass. Bytes per masked element (fp32): 8 read (video, pred) + 4 written (grad). Extra memory:
//   one double per row (the per-row losses, summed in row order: deterministic).
// masked_mse_bwd: the same recomputation at grad_out, writing d pred and/or d video.
// masked_unshuffle: out[b, n] = (r < K ? visible[b, r] : mask_token) + pos[b, n], r = ids_restore[b, n].
// Video gradients are scattered with one task per (sample, channel), each walking its rows in
// order: repeated ids add up, without races, in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "masked_common.h"

namespace wmkernels {
namespace {

// A video viewed as (B, C, T, H, W) through its strides, cut into (pt, ph, pw) tubelets.
struct Geom {
  int64_t B, C, gt, gh, gw, pt, ph, pw;
  int64_t sb, sc, st, sh, sw;  // element strides of b, c, t, h, w
  int64_t P() const { return pt * ph * pw * C; }
  int64_t N() const { return gt * gh * gw; }
  // Element offset of the first value of token n of sample b.
  int64_t origin(int64_t b, int64_t n) const {
    const int64_t w = n % gw, h = (n / gw) % gh, t = n / (gw * gh);
    return b * sb + t * pt * st + h * ph * sh + w * pw * sw;
  }
};

template <typename acc_t>
struct Stats {
  const acc_t* mean;  // C values or null
  const acc_t* std;   // C values or null
};

template <typename acc_t>
Stats<acc_t> stats_of(const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std) {
  return {mean.has_value() ? mean->const_data_ptr<acc_t>() : nullptr,
          std.has_value() ? std->const_data_ptr<acc_t>() : nullptr};
}

// Patches are loaded in groups of consecutive rows, and within a group one (c, i, j) image row
// at a time across the group's patches: neighbouring tokens (ids are usually sorted) then read
// neighbouring stretches of the same image row, a stream the hardware prefetchers follow,
// instead of pt*ph*C short runs scattered over the video per patch.
constexpr int64_t kGroup = 16;

// buf[g][((i * ph + j) * pw + k) * C + c] = (video[origin[g] + c, i, j, k] - mean[c]) / std[c]
// for g < count with origin[g] >= 0 (patches of rows to skip are left untouched).
template <typename v_t, typename acc_t>
inline void load_patches(const v_t* v, const Geom& g, const int64_t* origin, int64_t count, Stats<acc_t> s,
                         acc_t* buf) {
  const int64_t P = g.P();
  const bool norm = s.mean || s.std;
  for (int64_t c = 0; c < g.C; ++c) {
    const acc_t m = s.mean ? s.mean[c] : acc_t(0);
    const acc_t sd = s.std ? s.std[c] : acc_t(1);
    for (int64_t i = 0; i < g.pt; ++i) {
      for (int64_t j = 0; j < g.ph; ++j) {
        const int64_t src_off = c * g.sc + i * g.st + j * g.sh;
        const int64_t dst_off = (i * g.ph + j) * g.pw * g.C + c;
        for (int64_t q = 0; q < count; ++q) {
          if (origin[q] < 0) continue;
          const v_t* row = v + origin[q] + src_off;
          acc_t* o = buf + q * P + dst_off;
          if (norm) {
            for (int64_t k = 0; k < g.pw; ++k) o[k * g.C] = (static_cast<acc_t>(row[k * g.sw]) - m) / sd;
          } else {
            for (int64_t k = 0; k < g.pw; ++k) o[k * g.C] = static_cast<acc_t>(row[k * g.sw]);
          }
        }
      }
    }
  }
}

// video[b, c, ...] += rows[b, r, ...] / std[c] for every row r with token(b, r) >= 0; `out` is a
// contiguous acc_t buffer viewed through `g` (its strides). One task per (b, c).
template <typename r_t, typename acc_t, typename TokenFn>
void scatter_rows(const r_t* rows, int64_t R, const Geom& g, const acc_t* std, acc_t* out, TokenFn token) {
  const int64_t P = g.P();
  at::parallel_for(0, g.B * g.C, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / g.C, c = task % g.C;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = token(b, r);
        if (n < 0) continue;
        const r_t* src = rows + (b * R + r) * P + c;
        acc_t* p0 = out + g.origin(b, n) + c * g.sc;
        for (int64_t i = 0; i < g.pt; ++i) {
          for (int64_t j = 0; j < g.ph; ++j) {
            acc_t* row = p0 + i * g.st + j * g.sh;
            const r_t* s = src + (i * g.ph + j) * g.pw * g.C;
            if (std) {
              for (int64_t k = 0; k < g.pw; ++k) row[k * g.sw] += static_cast<acc_t>(s[k * g.C]) / std[c];
            } else {
              for (int64_t k = 0; k < g.pw; ++k) row[k * g.sw] += static_cast<acc_t>(s[k * g.C]);
            }
          }
        }
      }
    }
  });
}

at::ScalarType acc_of(at::ScalarType a, at::ScalarType b) {
  return (a == at::kDouble || b == at::kDouble) ? at::kDouble : at::kFloat;
}

#define WM_DISPATCH_VIDEO(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kBFloat16, at::kHalf, at::kByte, TYPE, NAME, __VA_ARGS__)
#define WM_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// ------------------------------------------------------------------------------------------ gather

at::Tensor masked_gather_cpu(const at::Tensor& video, const at::Tensor& ids, at::IntArrayRef tubelet,
                             c10::string_view layout, const c10::optional<at::Tensor>& mean,
                             const c10::optional<at::Tensor>& std, at::ScalarType out_dtype) {
  const Geom g = make_geom<Geom>(video.sizes(), video.strides(), tubelet, layout);
  const at::Tensor idx = ids.contiguous();
  const int64_t B = g.B, K = idx.size(1), P = g.P();
  at::Tensor out = at::empty({B, K, P}, video.options().dtype(out_dtype));
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const auto acc = acc_of(out_dtype, video.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(acc, "masked_gather_acc", [&] {
    using acc_t = scalar_t;
    const Stats<acc_t> s = stats_of<acc_t>(mean, std);
    WM_DISPATCH_VIDEO(video.scalar_type(), "masked_gather_v", [&] {
      using v_t = scalar_t;
      const v_t* vp = video.const_data_ptr<v_t>();
      WM_DISPATCH_FLOAT(out_dtype, "masked_gather_o", [&] {
        using o_t = scalar_t;
        o_t* op = out.mutable_data_ptr<o_t>();
        at::parallel_for(0, B * K, kGroup, [&](int64_t r0, int64_t r1) {
          std::vector<acc_t> buf(kGroup * P);
          int64_t origin[kGroup];
          for (int64_t q0 = r0; q0 < r1; q0 += kGroup) {
            const int64_t count = std::min(kGroup, r1 - q0);
            for (int64_t q = 0; q < count; ++q) origin[q] = g.origin((q0 + q) / K, ip[q0 + q]);
            load_patches<v_t, acc_t>(vp, g, origin, count, s, buf.data());
            o_t* o = op + q0 * P;
            for (int64_t i = 0; i < count * P; ++i) o[i] = static_cast<o_t>(buf[i]);
          }
        });
      });
    });
  });
  return out;
}

// Video-shaped contiguous gradient from (B, R, P) rows; accumulated in acc_t, cast to video_dtype.
template <typename r_t, typename TokenFn>
at::Tensor scatter_to_video(const r_t* rows, int64_t R, at::IntArrayRef video_shape, at::ScalarType video_dtype,
                            at::IntArrayRef tubelet, c10::string_view layout, const c10::optional<at::Tensor>& std,
                            at::ScalarType acc, const at::TensorOptions& opts, TokenFn token) {
  const bool direct = video_dtype == acc;
  at::Tensor out = at::zeros(video_shape, opts.dtype(acc));
  const Geom g = make_geom<Geom>(out.sizes(), out.strides(), tubelet, layout);
  AT_DISPATCH_FLOATING_TYPES(acc, "masked_scatter", [&] {
    const scalar_t* sp = std.has_value() ? std->const_data_ptr<scalar_t>() : nullptr;
    scatter_rows<r_t, scalar_t>(rows, R, g, sp, out.mutable_data_ptr<scalar_t>(), token);
  });
  return direct ? out : out.to(video_dtype);
}

at::Tensor masked_gather_bwd_cpu(const at::Tensor& grad, const at::Tensor& ids, at::IntArrayRef video_shape,
                                 at::ScalarType video_dtype, at::IntArrayRef tubelet, c10::string_view layout,
                                 const c10::optional<at::Tensor>& std) {
  const at::Tensor gr = grad.contiguous();
  const at::Tensor idx = ids.contiguous();
  const int64_t K = idx.size(1);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const auto acc = acc_of(grad.scalar_type(), video_dtype);
  at::Tensor out;
  WM_DISPATCH_FLOAT(gr.scalar_type(), "masked_gather_bwd", [&] {
    out = scatter_to_video<scalar_t>(gr.const_data_ptr<scalar_t>(), K, video_shape, video_dtype, tubelet, layout,
                                     std, acc, gr.options(), [&](int64_t b, int64_t r) { return ip[b * K + r]; });
  });
  return out;
}

// -------------------------------------------------------------------------------------------- loss

struct LossArgs {
  bool norm_pix, videomae;
  double eps;
};

// Normalizes buf (P values, channel innermost) in place per patch (MAE) or per channel
// (VideoMAE); keeps in inv[] / sigma[] what the backward needs (1 or C entries).
template <typename acc_t>
inline void normalize(acc_t* buf, int64_t P, int64_t C, const LossArgs& a, acc_t* inv, acc_t* sigma) {
  if (!a.norm_pix) return;
  const int64_t groups = a.videomae ? C : 1;
  const int64_t stride = a.videomae ? C : 1;
  const int64_t n = P / groups;
  for (int64_t c = 0; c < groups; ++c) {
    acc_t* x = buf + c;
    // the mean of the values shifted by the group's first one: exact for a flat patch (mean = its
    // value, target 0), where sum / n rounds and eps = 1e-6 on sigma turns the rounding into 0.3
    const acc_t k = x[0];
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += x[i * stride] - k;
    const acc_t mu = k + sum / static_cast<acc_t>(n);
    acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = x[i * stride] - mu;
      ss += d * d;
    }
    const acc_t var = ss / static_cast<acc_t>(n - 1);
    acc_t iv;
    if (a.videomae) {
      sigma[c] = std::sqrt(var);
      iv = acc_t(1) / (sigma[c] + static_cast<acc_t>(a.eps));
    } else {
      iv = acc_t(1) / std::sqrt(var + static_cast<acc_t>(a.eps));
    }
    inv[c] = iv;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i * stride] = (x[i * stride] - mu) * iv;
  }
}

// In place: gy (d loss / d normalized target) -> d loss / d x, given the normalized y.
template <typename acc_t>
inline void normalize_backward(acc_t* gy, const acc_t* y, int64_t P, int64_t C, const LossArgs& a,
                               const acc_t* inv, const acc_t* sigma) {
  if (!a.norm_pix) return;
  const int64_t groups = a.videomae ? C : 1;
  const int64_t stride = a.videomae ? C : 1;
  const int64_t n = P / groups;
  for (int64_t c = 0; c < groups; ++c) {
    acc_t* g = gy + c;
    const acc_t* yy = y + c;
    acc_t sg = 0, dot = 0;
#pragma omp simd reduction(+ : sg, dot)
    for (int64_t i = 0; i < n; ++i) {
      sg += g[i * stride];
      dot += g[i * stride] * yy[i * stride];
    }
    const acc_t mg = sg / static_cast<acc_t>(n);
    const acc_t nm1 = static_cast<acc_t>(n - 1);
    if (a.videomae) {
      // a constant group (sigma = 0) takes the std's gradient there as 0, as torch.std's autograd does
      const acc_t k = sigma[c] > 0 ? dot / (sigma[c] * nm1) : acc_t(0);
      for (int64_t i = 0; i < n; ++i) g[i * stride] = (g[i * stride] - mg) * inv[c] - yy[i * stride] * k;
    } else {
      const acc_t k = dot / nm1;
      for (int64_t i = 0; i < n; ++i) g[i * stride] = (g[i * stride] - mg - yy[i * stride] * k) * inv[c];
    }
  }
}

// One routine for the forward (with or without the fused pred gradient) and the backward.
// Rows: ids mode -> (b, m) with token ids[b, m]; mask mode -> every (b, n), skipped unless masked.
// Writes: row_loss[r] (forward), gp rows (scale * (pred - y)), gx rows (d video, backward).
template <typename p_t, typename v_t, typename acc_t>
void loss_rows(const p_t* pred, const v_t* video, const Geom& g, const int64_t* ids, const bool* mask, int64_t R,
               Stats<acc_t> s, const LossArgs& a, double* row_loss, p_t* gp, acc_t grad_scale, acc_t* gx) {
  const int64_t P = g.P(), C = g.C;
  at::parallel_for(0, g.B * R, kGroup, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> ys(kGroup * P), work(P), inv(C), sigma(C);
    int64_t origin[kGroup];
    for (int64_t q0 = r0; q0 < r1; q0 += kGroup) {
      const int64_t count = std::min(kGroup, r1 - q0);
      for (int64_t q = 0; q < count; ++q) {
        const int64_t r = q0 + q;
        origin[q] = (mask && !mask[r]) ? -1 : g.origin(r / R, ids ? ids[r] : r % R);
      }
      load_patches<v_t, acc_t>(video, g, origin, count, s, ys.data());
      for (int64_t q = 0; q < count; ++q) {
        const int64_t r = q0 + q;
        if (origin[q] < 0) {
          if (row_loss) row_loss[r] = 0.0;
          if (gp) std::fill(gp + r * P, gp + (r + 1) * P, static_cast<p_t>(0));
          continue;
        }
        acc_t* yp = ys.data() + q * P;
        acc_t* wp = work.data();
        normalize<acc_t>(yp, P, C, a, inv.data(), sigma.data());
        const p_t* pr = pred + r * P;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < P; ++i) {
          const acc_t d = static_cast<acc_t>(pr[i]) - yp[i];
          sum += d * d;
          wp[i] = d;
        }
        if (row_loss) row_loss[r] = static_cast<double>(sum) / static_cast<double>(P);
        if (gp) {
          p_t* o = gp + r * P;
#pragma omp simd
          for (int64_t i = 0; i < P; ++i) o[i] = static_cast<p_t>(grad_scale * wp[i]);
        }
        if (gx) {
          for (int64_t i = 0; i < P; ++i) wp[i] = -grad_scale * wp[i];
          normalize_backward<acc_t>(wp, yp, P, C, a, inv.data(), sigma.data());
          std::copy(wp, wp + P, gx + r * P);
        }
      }
    }
  });
}

struct LossCall {
  Geom g;
  at::Tensor index;
  const int64_t* ids = nullptr;
  const bool* mask = nullptr;
  int64_t R = 0;
  double denom = 0;
};

LossCall loss_call(const at::Tensor& video, const at::Tensor& index, at::IntArrayRef tubelet,
                   c10::string_view layout) {
  LossCall c;
  c.g = make_geom<Geom>(video.sizes(), video.strides(), tubelet, layout);
  c.index = index.contiguous();
  c.R = c.index.size(1);
  if (c.index.scalar_type() == at::kBool) {
    c.mask = c.index.const_data_ptr<bool>();
    c.denom = static_cast<double>(c.index.sum().item<int64_t>());
  } else {
    c.ids = c.index.const_data_ptr<int64_t>();
    c.denom = static_cast<double>(c.index.numel());
  }
  return c;
}

template <typename Fn>
void dispatch_loss(const at::Tensor& pred, const at::Tensor& video, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES(acc_of(pred.scalar_type(), video.scalar_type()), "masked_mse_acc", [&] {
    using acc_t = scalar_t;
    WM_DISPATCH_FLOAT(pred.scalar_type(), "masked_mse_p", [&] {
      using p_t = scalar_t;
      WM_DISPATCH_VIDEO(video.scalar_type(), "masked_mse_v", [&] {
        using v_t = scalar_t;
        fn(p_t(), v_t(), acc_t());
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> masked_mse_fwd_cpu(const at::Tensor& pred_in, const at::Tensor& video,
                                                      const at::Tensor& index, at::IntArrayRef tubelet,
                                                      c10::string_view layout, bool norm_pix, bool videomae,
                                                      double eps, const c10::optional<at::Tensor>& mean,
                                                      const c10::optional<at::Tensor>& std, at::ScalarType out_dtype,
                                                      bool write_grad) {
  const at::Tensor pred = pred_in.contiguous();
  const LossCall c = loss_call(video, index, tubelet, layout);
  const LossArgs a{norm_pix, videomae, eps};
  std::vector<double> row_loss(static_cast<size_t>(c.g.B * c.R));
  at::Tensor gp = write_grad ? at::empty_like(pred) : at::empty({0}, pred.options());
  const double scale = 2.0 / (static_cast<double>(c.g.P()) * c.denom);
  dispatch_loss(pred, video, [&](auto p0, auto v0, auto a0) {
    using p_t = decltype(p0);
    using v_t = decltype(v0);
    using acc_t = decltype(a0);
    loss_rows<p_t, v_t, acc_t>(pred.const_data_ptr<p_t>(), video.const_data_ptr<v_t>(), c.g, c.ids, c.mask, c.R,
                               stats_of<acc_t>(mean, std), a, row_loss.data(),
                               write_grad ? gp.mutable_data_ptr<p_t>() : nullptr, static_cast<acc_t>(scale), nullptr);
  });
  double total = 0.0;
  for (double v : row_loss) total += v;
  at::Tensor loss = at::scalar_tensor(total / c.denom, pred.options().dtype(at::kDouble)).to(out_dtype);
  return {loss, gp};
}

std::tuple<at::Tensor, at::Tensor> masked_mse_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& pred_in,
                                                      const at::Tensor& video, const at::Tensor& index,
                                                      at::IntArrayRef tubelet, c10::string_view layout, bool norm_pix,
                                                      bool videomae, double eps, const c10::optional<at::Tensor>& mean,
                                                      const c10::optional<at::Tensor>& std, bool need_pred,
                                                      bool need_video) {
  const at::Tensor pred = pred_in.contiguous();
  const LossCall c = loss_call(video, index, tubelet, layout);
  const LossArgs a{norm_pix, videomae, eps};
  const double scale = 2.0 * grad_out.item<double>() / (static_cast<double>(c.g.P()) * c.denom);
  const auto acc = acc_of(pred.scalar_type(), video.scalar_type());
  at::Tensor gp = need_pred ? at::empty_like(pred) : at::empty({0}, pred.options());
  at::Tensor gx = need_video ? at::empty({c.g.B, c.R, c.g.P()}, pred.options().dtype(acc)) : at::Tensor();
  dispatch_loss(pred, video, [&](auto p0, auto v0, auto a0) {
    using p_t = decltype(p0);
    using v_t = decltype(v0);
    using acc_t = decltype(a0);
    loss_rows<p_t, v_t, acc_t>(pred.const_data_ptr<p_t>(), video.const_data_ptr<v_t>(), c.g, c.ids, c.mask, c.R,
                               stats_of<acc_t>(mean, std), a, nullptr,
                               need_pred ? gp.mutable_data_ptr<p_t>() : nullptr, static_cast<acc_t>(scale),
                               need_video ? gx.mutable_data_ptr<acc_t>() : nullptr);
  });
  at::Tensor gv = at::empty({0}, video.options());
  if (need_video) {
    const int64_t R = c.R;
    const int64_t* ids = c.ids;
    const bool* mask = c.mask;
    AT_DISPATCH_FLOATING_TYPES(acc, "masked_mse_scatter", [&] {
      gv = scatter_to_video<scalar_t>(gx.const_data_ptr<scalar_t>(), R, video.sizes(), video.scalar_type(), tubelet,
                                      layout, std, acc, video.options(), [&](int64_t b, int64_t r) -> int64_t {
                                        if (ids) return ids[b * R + r];
                                        return mask[b * R + r] ? r : -1;
                                      });
    });
  }
  return {gp, gv};
}

// --------------------------------------------------------------------------------------- unshuffle

template <typename o_t>
using add_t = std::conditional_t<std::is_same_v<o_t, double>, double, float>;

at::Tensor masked_unshuffle_cpu(const at::Tensor& visible, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                                const c10::optional<at::Tensor>& pos_embed, at::ScalarType out_dtype) {
  const at::Tensor vis = visible.to(out_dtype).contiguous();
  const at::Tensor tok = mask_token.to(out_dtype).contiguous();
  const at::Tensor idx = ids_restore.contiguous();
  const int64_t B = vis.size(0), K = vis.size(1), D = vis.size(2), N = idx.size(1);
  at::Tensor pos;
  if (pos_embed.has_value()) pos = pos_embed->to(out_dtype).expand({B, N, D});
  at::Tensor out = at::empty({B, N, D}, vis.options());
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  WM_DISPATCH_FLOAT(out_dtype, "masked_unshuffle", [&] {
    using o_t = scalar_t;
    using a_t = add_t<o_t>;
    const o_t* vp = vis.const_data_ptr<o_t>();
    const o_t* tp = tok.const_data_ptr<o_t>();
    const o_t* pp = pos.defined() ? pos.const_data_ptr<o_t>() : nullptr;
    const int64_t psb = pos.defined() ? pos.stride(0) : 0, psn = pos.defined() ? pos.stride(1) : 0;
    const int64_t psd = pos.defined() ? pos.stride(2) : 0;
    o_t* op = out.mutable_data_ptr<o_t>();
    at::parallel_for(0, B * N, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / N, n = r % N, src = ip[r];
        const o_t* s = src < K ? vp + (b * K + src) * D : tp;
        o_t* o = op + r * D;
        if (pp) {
          const o_t* p = pp + b * psb + n * psn;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<o_t>(static_cast<a_t>(s[d]) + static_cast<a_t>(p[d * psd]));
        } else {
          std::copy(s, s + D, o);
        }
      }
    });
  });
  return out;
}

// (d visible, d mask_token (D,)); the pos_embed gradient is a plain sum, done by the caller.
std::tuple<at::Tensor, at::Tensor> masked_unshuffle_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& ids_restore,
                                                            int64_t num_visible, at::ScalarType visible_dtype,
                                                            at::ScalarType token_dtype, bool need_visible,
                                                            bool need_token) {
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor idx = ids_restore.contiguous();
  const int64_t B = grad.size(0), N = grad.size(1), D = grad.size(2), K = num_visible;
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gv = need_visible ? at::empty({B, K, D}, grad.options()) : at::empty({0}, grad.options());
  at::Tensor partial = at::zeros({B, D}, grad.options().dtype(acc));
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  WM_DISPATCH_FLOAT(grad.scalar_type(), "masked_unshuffle_bwd", [&] {
    using g_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(acc, "masked_unshuffle_bwd_acc", [&] {
      using a_t = scalar_t;
      const g_t* gp = grad.const_data_ptr<g_t>();
      g_t* vp = need_visible ? gv.mutable_data_ptr<g_t>() : nullptr;
      a_t* tp = partial.mutable_data_ptr<a_t>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t n = 0; n < N; ++n) {
            const int64_t r = ip[b * N + n];
            const g_t* src = gp + (b * N + n) * D;
            if (r < K) {
              if (vp) std::copy(src, src + D, vp + (b * K + r) * D);
            } else if (need_token) {
              a_t* t = tp + b * D;
              for (int64_t d = 0; d < D; ++d) t[d] += static_cast<a_t>(src[d]);
            }
          }
        }
      });
    });
  });
  if (need_visible && visible_dtype != grad.scalar_type()) gv = gv.to(visible_dtype);
  at::Tensor gt = need_token ? partial.sum(0).to(token_dtype) : at::empty({0}, grad.options());
  return {gv, gt};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(wmkernels_C, m) {
  m.def("masked_gather(Tensor video, Tensor ids, int[] tubelet, str layout, Tensor? mean, Tensor? std, "
        "ScalarType out_dtype) -> Tensor");
  m.def("masked_gather_bwd(Tensor grad, Tensor ids, int[] video_shape, ScalarType video_dtype, int[] tubelet, "
        "str layout, Tensor? std) -> Tensor");
  m.def("masked_mse_fwd(Tensor pred, Tensor video, Tensor index, int[] tubelet, str layout, bool norm_pix, "
        "bool videomae, float eps, Tensor? mean, Tensor? std, ScalarType out_dtype, bool write_grad) "
        "-> (Tensor, Tensor)");
  m.def("masked_mse_bwd(Tensor grad_out, Tensor pred, Tensor video, Tensor index, int[] tubelet, str layout, "
        "bool norm_pix, bool videomae, float eps, Tensor? mean, Tensor? std, bool need_pred, bool need_video) "
        "-> (Tensor, Tensor)");
  m.def("masked_unshuffle(Tensor visible, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed, "
        "ScalarType out_dtype) -> Tensor");
  m.def("masked_unshuffle_bwd(Tensor grad, Tensor ids_restore, int num_visible, ScalarType visible_dtype, "
        "ScalarType token_dtype, bool need_visible, bool need_token) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(wmkernels_C, CPU, m) {
  m.impl("masked_gather", &masked_gather_cpu);
  m.impl("masked_gather_bwd", &masked_gather_bwd_cpu);
  m.impl("masked_mse_fwd", &masked_mse_fwd_cpu);
  m.impl("masked_mse_bwd", &masked_mse_bwd_cpu);
  m.impl("masked_unshuffle", &masked_unshuffle_cpu);
  m.impl("masked_unshuffle_bwd", &masked_unshuffle_bwd_cpu);
}

}  // namespace wmkernels

// Fused MSE on CPU: one pass over input, target (and the broadcast weight) that sums
// w (x - y)^2 and, when asked, writes the input gradient 2 w (x - y) / denom in the same pass.
// Bytes per fp32 element: forward 8 read (+4 written with the gradient); backward 8 read,
// 4 written per gradient. Reductions are deterministic (fixed chunk order, see strided.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "strided.h"

namespace wmkernels {
namespace {

template <typename x_t, typename y_t, typename acc_t>
using RangeFn = double (*)(const StridedLayout&, int64_t, int64_t, const x_t*, const y_t*, const acc_t*, x_t*, y_t*,
                           acc_t);

// The inner loops are compiled twice, for AVX2+FMA and for the baseline, and chosen at run time:
// a source build stays portable and still uses the wide vectors where the CPU has them.
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "mse_kernel.inc"
#pragma GCC pop_options
}  // namespace avx2
namespace baseline {
#include "mse_kernel.inc"
}  // namespace baseline

// mode: see range_for_mode.
template <typename x_t, typename y_t, typename acc_t, bool HAS_W>
double mse_launch(int mode, const StridedLayout& lay, const at::Tensor& x, const at::Tensor& y,
                  const at::Tensor& w, const at::Tensor& gx, const at::Tensor& gy, double scale) {
  const x_t* xp = x.const_data_ptr<x_t>();
  const y_t* yp = y.const_data_ptr<y_t>();
  const acc_t* wp = HAS_W ? w.const_data_ptr<acc_t>() : nullptr;
  x_t* gxp = gx.defined() ? gx.mutable_data_ptr<x_t>() : nullptr;
  y_t* gyp = gy.defined() ? gy.mutable_data_ptr<y_t>() : nullptr;
  const acc_t sc = static_cast<acc_t>(scale);
  static const bool wide = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const RangeFn<x_t, y_t, acc_t> fn = wide ? avx2::range_for_mode<x_t, y_t, acc_t, HAS_W>(mode)
                                           : baseline::range_for_mode<x_t, y_t, acc_t, HAS_W>(mode);
  return chunked_sum(lay.numel, [&](int64_t b, int64_t e) { return fn(lay, b, e, xp, yp, wp, gxp, gyp, sc); });
}

double mse_dispatch(int mode, const at::Tensor& x, const at::Tensor& y, const at::Tensor& w,
                    const at::Tensor& gx, const at::Tensor& gy, double scale) {
  std::vector<at::Tensor> ops{x, y, w.defined() ? w : x, gx.defined() ? gx : x, gy.defined() ? gy : y};
  const StridedLayout lay = make_layout(x.sizes(), ops);
  if (lay.numel == 0) return 0.0;
  // the weight is already in the accumulation type (acc_type)
  const bool wide = x.scalar_type() == at::kDouble || y.scalar_type() == at::kDouble ||
                    (w.defined() && w.scalar_type() == at::kDouble);
  double out = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mse_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "mse_y", [&] {
      using y_t = scalar_t;
      if (wide) {
        out = w.defined() ? mse_launch<x_t, y_t, double, true>(mode, lay, x, y, w, gx, gy, scale)
                          : mse_launch<x_t, y_t, double, false>(mode, lay, x, y, w, gx, gy, scale);
      } else {
        out = w.defined() ? mse_launch<x_t, y_t, float, true>(mode, lay, x, y, w, gx, gy, scale)
                          : mse_launch<x_t, y_t, float, false>(mode, lay, x, y, w, gx, gy, scale);
      }
    });
  });
  return out;
}

// fp64 when any operand is (an fp64 weight too: the result is fp64 by type promotion, and rounding the
// weight to fp32 would give it fp32 precision)
at::ScalarType acc_type(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& weight) {
  const bool wide = x.scalar_type() == at::kDouble || y.scalar_type() == at::kDouble ||
                    (weight.has_value() && weight->scalar_type() == at::kDouble);
  return wide ? at::kDouble : at::kFloat;
}

// Sum of the weight broadcast to x (never materialized), or the element count.
double denominator(const at::Tensor& x, const c10::optional<at::Tensor>& weight) {
  if (!weight.has_value()) return static_cast<double>(x.numel());
  const int64_t repeat = x.numel() / std::max<int64_t>(weight->numel(), 1);
  return weight->sum(at::kDouble).item<double>() * static_cast<double>(repeat);
}

at::Tensor weight_as_acc(const c10::optional<at::Tensor>& weight, at::ScalarType acc) {
  return weight.has_value() ? weight->to(acc) : at::Tensor();
}

// Returns (loss, grad): grad = d loss / d x for grad_output = 1 when write_grad, else empty.
std::tuple<at::Tensor, at::Tensor> mse_fwd_cpu(const at::Tensor& x, const at::Tensor& y,
                                               const c10::optional<at::Tensor>& weight,
                                               c10::string_view reduction, at::ScalarType out_dtype,
                                               bool write_grad) {
  const auto acc = acc_type(x, y, weight);
  const at::Tensor w = weight_as_acc(weight, acc);
  const bool mean = reduction == "mean";
  const double denom = mean ? denominator(x, weight) : 1.0;
  at::Tensor gx = write_grad ? at::empty_like(x) : at::Tensor();
  const double total = mse_dispatch(write_grad ? 1 : 0, x, y, w, gx, at::Tensor(), 2.0 / denom);
  at::Tensor loss = at::scalar_tensor(mean ? total / denom : total, x.options().dtype(out_dtype));
  return {loss, write_grad ? gx : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> mse_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                               const at::Tensor& y, const c10::optional<at::Tensor>& weight,
                                               c10::string_view reduction, bool need_x, bool need_y) {
  const auto acc = acc_type(x, y, weight);
  const at::Tensor w = weight_as_acc(weight, acc);
  const double denom = reduction == "mean" ? denominator(x, weight) : 1.0;
  const double scale = 2.0 * grad_out.item<double>() / denom;
  at::Tensor gx = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor gy = need_y ? at::empty_like(y) : at::Tensor();
  const int mode = need_x && need_y ? 4 : (need_x ? 2 : 3);
  if (need_x || need_y) mse_dispatch(mode, x, y, w, gx, gy, scale);
  return {need_x ? gx : at::empty({0}, x.options()), need_y ? gy : at::empty({0}, y.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(wmkernels_C, m) {
  m.def("mse_fwd(Tensor input, Tensor target, Tensor? weight, str reduction, ScalarType out_dtype, "
        "bool write_grad) -> (Tensor, Tensor)");
  m.def("mse_bwd(Tensor grad_out, Tensor input, Tensor target, Tensor? weight, str reduction, "
        "bool need_input, bool need_target) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(wmkernels_C, CPU, m) {
  m.impl("mse_fwd", &mse_fwd_cpu);
  m.impl("mse_bwd", &mse_bwd_cpu);
}

}  // namespace wmkernels

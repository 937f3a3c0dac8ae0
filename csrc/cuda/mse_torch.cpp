// Torch-facing glue of the CUDA MSE kernels (csrc/cuda/mse.cu): layouts, dtypes, buffers,
// and the CUDA registrations of wmkernels_C::mse_fwd / mse_bwd (schemas in csrc/cpu/mse.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cpu/strided.h"
#include "launch.h"

namespace wmkernels {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "wmkernels mse: unsupported dtype ", t);
  }
}

// The layout of operands (x, y, w, gx, gy) padded to five dims; operands that do not merge to
// five dims are replaced by contiguous copies (reads) or contiguous buffers (gradients). A
// broadcast weight can still split six or more dims (stride 0 alternating with its own): it is
// then materialized at the full shape, since dims past five would be dropped.
Strided5 layout5(at::IntArrayRef shape, std::vector<at::Tensor>& ops) {
  StridedLayout lay = make_layout(shape, ops);
  if (lay.sizes.size() > static_cast<size_t>(kDims)) {
    for (auto& t : ops) t = t.contiguous();
    lay = make_layout(shape, ops);
  }
  if (lay.sizes.size() > static_cast<size_t>(kDims)) {
    ops[2] = ops[2].expand(shape).contiguous();
    lay = make_layout(shape, ops);
  }
  Strided5 out{};
  const int pad = kDims - static_cast<int>(lay.sizes.size());
  out.contiguous = true;
  for (int d = 0; d < kDims; ++d) out.sizes[d] = d < pad ? 1 : lay.sizes[d - pad];
  for (int k = 0; k < lay.n_operands; ++k) {
    for (int d = 0; d < kDims; ++d) out.strides[k][d] = d < pad ? 0 : lay.strides[k][d - pad];
    int64_t expect = 1;
    for (int d = kDims - 1; d >= 0; --d) {
      if (k != 2 && out.sizes[d] != 1 && out.strides[k][d] != expect) out.contiguous = false;
      expect *= out.sizes[d];
    }
  }
  return out;
}

// fp64 when any operand is (an fp64 weight too: the result is fp64 by type promotion, and rounding the
// weight to fp32 would give it fp32 precision)
at::ScalarType acc_type(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& weight) {
  const bool wide = x.scalar_type() == at::kDouble || y.scalar_type() == at::kDouble ||
                    (weight.has_value() && weight->scalar_type() == at::kDouble);
  return wide ? at::kDouble : at::kFloat;
}

at::Tensor denominator(const at::Tensor& x, const c10::optional<at::Tensor>& weight, at::ScalarType acc) {
  if (!weight.has_value()) return at::scalar_tensor(static_cast<double>(x.numel()), x.options().dtype(acc));
  const int64_t repeat = x.numel() / std::max<int64_t>(weight->numel(), 1);
  return weight->sum(acc) * static_cast<double>(repeat);
}

std::tuple<at::Tensor, at::Tensor> mse_fwd_cuda_op(const at::Tensor& x, const at::Tensor& y,
                                                   const c10::optional<at::Tensor>& weight, c10::string_view reduction,
                                                   at::ScalarType out_dtype, bool write_grad) {
  TORCH_CHECK(!write_grad, "wmkernels mse: the CUDA backend recomputes the gradient in backward");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x, y, weight);
  at::Tensor w = weight.has_value() ? weight->to(acc) : at::Tensor();
  std::vector<at::Tensor> ops{x, y, w.defined() ? w : x};
  const Strided5 lay = layout5(x.sizes(), ops);
  const int64_t n = x.numel();
  const int64_t blocks = mse_fwd_blocks(n);
  at::Tensor partial = at::zeros({blocks}, x.options().dtype(acc));
  if (n > 0) {
    mse_fwd_cuda(to_dtype(x.scalar_type()), to_dtype(y.scalar_type()), acc == at::kDouble, ops[0].const_data_ptr(),
                 ops[1].const_data_ptr(), w.defined() ? ops[2].const_data_ptr() : nullptr, lay, n,
                 partial.mutable_data_ptr(), blocks, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor loss = partial.sum();
  if (reduction == "mean") loss = loss / denominator(x, weight, acc);
  return {loss.to(out_dtype), at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> mse_bwd_cuda_op(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& y, const c10::optional<at::Tensor>& weight,
                                                   c10::string_view reduction, bool need_x, bool need_y) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x, y, weight);
  at::Tensor scale = grad_out.to(acc) * 2.0;
  if (reduction == "mean") scale = scale / denominator(x, weight, acc);
  at::Tensor w = weight.has_value() ? weight->to(acc) : at::Tensor();
  at::Tensor gx = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor gy = need_y ? at::empty_like(y) : at::Tensor();
  std::vector<at::Tensor> ops{x, y, w.defined() ? w : x, gx.defined() ? gx : x, gy.defined() ? gy : y};
  const Strided5 lay = layout5(x.sizes(), ops);
  if (need_x && !ops[3].is_same(gx)) gx = ops[3];  // reallocated contiguous by layout5
  if (need_y && !ops[4].is_same(gy)) gy = ops[4];
  mse_bwd_cuda(to_dtype(x.scalar_type()), to_dtype(y.scalar_type()), acc == at::kDouble, ops[0].const_data_ptr(),
               ops[1].const_data_ptr(), w.defined() ? ops[2].const_data_ptr() : nullptr, scale.const_data_ptr(),
               need_x ? gx.mutable_data_ptr() : nullptr, need_y ? gy.mutable_data_ptr() : nullptr, lay, x.numel(),
               c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {need_x ? gx : at::empty({0}, x.options()), need_y ? gy : at::empty({0}, y.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(wmkernels_C, CUDA, m) {
  m.impl("mse_fwd", &mse_fwd_cuda_op);
  m.impl("mse_bwd", &mse_bwd_cuda_op);
}

}  // namespace wmkernels

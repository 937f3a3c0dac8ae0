// Torch-facing glue of the CUDA masked video modeling kernels (csrc/cuda/masked.cu): geometry,
// dtypes, buffers, and the CUDA registrations of wmkernels_C::masked_gather / masked_gather_bwd /
// masked_mse_fwd / masked_mse_bwd (schemas in csrc/cpu/masked.cpp). Nothing is read on the host:
// loss denominators and gradient scales stay device scalars.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cpu/masked_common.h"
#include "masked.h"

namespace wmkernels {
namespace {

DType float_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "wmkernels masked: unsupported dtype ", t);
  }
}

VDType video_dtype(at::ScalarType t) {
  if (t == at::kByte) return VDType::kUInt8;
  return static_cast<VDType>(static_cast<int>(float_dtype(t)));
}

at::ScalarType acc_of(at::ScalarType a, at::ScalarType b) {
  return (a == at::kDouble || b == at::kDouble) ? at::kDouble : at::kFloat;
}

// mean and std as acc-dtype device vectors, both or neither (a missing one is the identity).
std::pair<at::Tensor, at::Tensor> affine(const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std,
                                         int64_t channels, at::ScalarType acc, const at::TensorOptions& opts) {
  if (!mean.has_value() && !std.has_value()) return {at::Tensor(), at::Tensor()};
  at::Tensor m = mean.has_value() ? mean->to(acc).contiguous() : at::zeros({channels}, opts.dtype(acc));
  at::Tensor s = std.has_value() ? std->to(acc).contiguous() : at::ones({channels}, opts.dtype(acc));
  return {m, s};
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor masked_gather_cuda_op(const at::Tensor& video, const at::Tensor& ids, at::IntArrayRef tubelet,
                                 c10::string_view layout, const c10::optional<at::Tensor>& mean,
                                 const c10::optional<at::Tensor>& std, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(video.device());
  const VideoGeom g = make_geom<VideoGeom>(video.sizes(), video.strides(), tubelet, layout);
  const at::Tensor idx = ids.contiguous();
  const int64_t K = idx.size(1), P = g.pt * g.ph * g.pw * g.C;
  auto [m, s] = affine(mean, std, g.C, acc_of(out_dtype, video.scalar_type()), video.options());
  at::Tensor out = at::empty({g.B, K, P}, video.options().dtype(out_dtype));
  masked_gather_cuda(video_dtype(video.scalar_type()), float_dtype(out_dtype), video.const_data_ptr(), g,
                     idx.const_data_ptr<int64_t>(), K, ptr_or_null(m), ptr_or_null(s), out.mutable_data_ptr(),
                     c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor masked_gather_bwd_cuda_op(const at::Tensor& grad_in, const at::Tensor& ids, at::IntArrayRef video_shape,
                                     at::ScalarType video_dtype_, at::IntArrayRef tubelet, c10::string_view layout,
                                     const c10::optional<at::Tensor>& std) {
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor idx = ids.contiguous();
  const auto acc = acc_of(grad.scalar_type(), video_dtype_);
  at::Tensor gv = at::zeros(video_shape, grad.options().dtype(acc));
  const VideoGeom g = make_geom<VideoGeom>(gv.sizes(), gv.strides(), tubelet, layout);
  auto [m, s] = affine(c10::nullopt, std, g.C, acc, grad.options());
  masked_scatter_cuda(float_dtype(grad.scalar_type()), acc == at::kDouble, grad.const_data_ptr(), g,
                      idx.const_data_ptr<int64_t>(), idx.size(1), ptr_or_null(s), gv.mutable_data_ptr(),
                      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gv.scalar_type() == video_dtype_ ? gv : gv.to(video_dtype_);
}

// The row kernel holds a whole patch in shared memory: a patch too large for the device is refused
// here, by name, rather than failing at launch with "invalid argument".
void check_patch_fits(int64_t P, int64_t G, at::ScalarType acc, int device) {
  const size_t need = masked_loss_rows_smem(P, G, acc == at::kDouble ? sizeof(double) : sizeof(float));
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK_VALUE(need <= static_cast<size_t>(limit), "tubelet: a patch of ", P, " values (", acc,
                    " accumulation) needs ", need, " bytes of shared memory on the cuda backend, this GPU allows ",
                    limit, " per block; use a smaller tubelet or backend=\"triton\"");
}

// Runs the row kernel; returns (loss sum / denom as a device scalar in acc, d pred, d video).
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_rows(const at::Tensor& grad_out, const at::Tensor& pred_in,
                                                         const at::Tensor& video, const at::Tensor& index,
                                                         at::IntArrayRef tubelet, c10::string_view layout,
                                                         bool norm_pix, bool videomae, double eps,
                                                         const c10::optional<at::Tensor>& mean,
                                                         const c10::optional<at::Tensor>& std, bool write_gp,
                                                         bool write_gv) {
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor idx = index.contiguous();
  const auto acc = acc_of(pred.scalar_type(), video.scalar_type());
  MaskedLossArgs a{};
  a.geom = make_geom<VideoGeom>(video.sizes(), video.strides(), tubelet, layout);
  a.R = idx.size(1);
  const bool is_mask = idx.scalar_type() == at::kBool;
  a.ids = is_mask ? nullptr : idx.const_data_ptr<int64_t>();
  a.mask = is_mask ? idx.const_data_ptr<bool>() : nullptr;
  at::Tensor denom = is_mask ? idx.sum(acc) : at::scalar_tensor(static_cast<double>(idx.numel()), pred.options().dtype(acc));
  const int64_t P = a.geom.pt * a.geom.ph * a.geom.pw * a.geom.C;
  check_patch_fits(P, videomae && norm_pix ? a.geom.C : 1, acc, pred.get_device());
  at::Tensor scale = grad_out.to(acc) * (2.0 / static_cast<double>(P)) / denom;
  auto [m, s] = affine(mean, std, a.geom.C, acc, video.options());
  a.mean = ptr_or_null(m);
  a.std = ptr_or_null(s);
  a.scale = scale.const_data_ptr();
  a.norm_mode = norm_pix ? (videomae ? 2 : 1) : 0;
  a.eps = eps;
  at::Tensor row_loss = at::empty({a.geom.B * a.R}, pred.options().dtype(acc));
  at::Tensor gp = write_gp ? at::empty_like(pred) : at::empty({0}, pred.options());
  at::Tensor gv = write_gv ? at::zeros(video.sizes(), video.options().dtype(acc)) : at::empty({0}, video.options());
  a.grad_geom = write_gv ? make_geom<VideoGeom>(gv.sizes(), gv.strides(), tubelet, layout) : a.geom;
  a.row_loss = row_loss.mutable_data_ptr();
  a.gp = write_gp ? gp.mutable_data_ptr() : nullptr;
  a.gv = write_gv ? gv.mutable_data_ptr() : nullptr;
  masked_loss_rows_cuda(float_dtype(pred.scalar_type()), video_dtype(video.scalar_type()), pred.const_data_ptr(),
                        video.const_data_ptr(), a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (write_gv && gv.scalar_type() != video.scalar_type()) gv = gv.to(video.scalar_type());
  return {row_loss.sum() / denom, gp, gv};
}

std::tuple<at::Tensor, at::Tensor> masked_mse_fwd_cuda_op(const at::Tensor& pred, const at::Tensor& video,
                                                          const at::Tensor& index, at::IntArrayRef tubelet,
                                                          c10::string_view layout, bool norm_pix, bool videomae,
                                                          double eps, const c10::optional<at::Tensor>& mean,
                                                          const c10::optional<at::Tensor>& std,
                                                          at::ScalarType out_dtype, bool write_grad) {
  const at::Tensor one = at::ones({}, pred.options().dtype(at::kFloat));
  auto [loss, gp, gv] = loss_rows(one, pred, video, index, tubelet, layout, norm_pix, videomae, eps, mean, std,
                                  write_grad, false);
  return {loss.to(out_dtype), gp};
}

std::tuple<at::Tensor, at::Tensor> masked_mse_bwd_cuda_op(const at::Tensor& grad_out, const at::Tensor& pred,
                                                          const at::Tensor& video, const at::Tensor& index,
                                                          at::IntArrayRef tubelet, c10::string_view layout,
                                                          bool norm_pix, bool videomae, double eps,
                                                          const c10::optional<at::Tensor>& mean,
                                                          const c10::optional<at::Tensor>& std, bool need_pred,
                                                          bool need_video) {
  auto [loss, gp, gv] = loss_rows(grad_out, pred, video, index, tubelet, layout, norm_pix, videomae, eps, mean, std,
                                  need_pred, need_video);
  return {gp, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(wmkernels_C, CUDA, m) {
  m.impl("masked_gather", &masked_gather_cuda_op);
  m.impl("masked_gather_bwd", &masked_gather_bwd_cuda_op);
  m.impl("masked_mse_fwd", &masked_mse_fwd_cuda_op);
  m.impl("masked_mse_bwd", &masked_mse_bwd_cuda_op);
}

}  // namespace wmkernels

// Plain-C++ declarations of the CUDA masked video modeling kernels (csrc/cuda/masked.cu, CUDA
// headers only) for their torch glue (masked_torch.cpp). Nothing here includes torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace wmkernels {

enum class VDType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3, kUInt8 = 4 };

// A video viewed as (B, C, T, H, W) through element strides, cut into (pt, ph, pw) tubelets over a
// (gt, gh, gw) token grid. Patch values are ordered ((i * ph + j) * pw + k) * C + c.
struct VideoGeom {
  int64_t B, C, gt, gh, gw, pt, ph, pw;
  int64_t sb, sc, st, sh, sw;
};

// Rows r in [0, B * R): ids mode (mask == null): token ids[r] of sample r / R; mask mode: token
// r % R, skipped unless mask[r]. Per row: the loss (row_loss[r], acc dtype), optionally the pred
// gradient scale * (pred - y) (gp, pred dtype) and the video gradient (atomically added into gv, a
// contiguous acc-dtype video laid out by `grad_geom`). `scale` is a device scalar in acc dtype
// (2 grad_output / (P * denom)), so nothing is read on the host. acc is double when pred or video
// is fp64, else float. norm_mode: 0 none, 1 MAE per patch, 2 VideoMAE per channel.
struct MaskedLossArgs {
  VideoGeom geom, grad_geom;
  int64_t R;
  const int64_t* ids;
  const bool* mask;
  const void* mean;  // C acc values or null
  const void* std;   // C acc values or null
  const void* scale;
  int norm_mode;
  double eps;
  void* row_loss;
  void* gp;
  void* gv;
};

// Dynamic shared memory of one row block: P patch values, 5 G group statistics, the block
// reduction's partials (acc_bytes each). The glue checks it against the device before launching.
size_t masked_loss_rows_smem(int64_t P, int64_t G, size_t acc_bytes);

void masked_loss_rows_cuda(DType pred_dtype, VDType video_dtype, const void* pred, const void* video,
                           const MaskedLossArgs& a, cudaStream_t stream);

// out[r, q] = (video value q of token ids[r] of sample r / K - mean[c]) / std[c], in out dtype.
void masked_gather_cuda(VDType video_dtype, DType out_dtype, const void* video, const VideoGeom& g, const int64_t* ids,
                        int64_t K, const void* mean, const void* std, void* out, cudaStream_t stream);

// gv (contiguous acc-dtype video laid out by g) += grad[r, q] / std[c] at the gathered positions.
void masked_scatter_cuda(DType grad_dtype, bool wide, const void* grad, const VideoGeom& g, const int64_t* ids,
                         int64_t K, const void* std, void* gv, cudaStream_t stream);

}  // namespace wmkernels

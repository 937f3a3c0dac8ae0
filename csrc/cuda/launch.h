// Plain-C++ declarations shared by the CUDA kernels (*.cu, CUDA headers only) and their torch
// glue (*_torch.cpp). Nothing here includes torch, so nvcc checks the kernels fast.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace wmkernels {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

constexpr int kDims = 5;

// Up to five operands viewed over one shape of five (merged, left-padded) dims; strides in elements.
struct Strided5 {
  int64_t sizes[kDims];
  int64_t strides[5][kDims];
  bool contiguous;  // every operand read or written is dense row-major (stride-0 weight aside)
};

// Forward: per-block partial sums of w (x - y)^2 into `partial` (acc dtype: double when `wide`, which
// the host sets when input, target or weight is fp64; else float). `w` is in the acc dtype or null.
// Deterministic for a given n.
void mse_fwd_cuda(DType xd, DType yd, bool wide, const void* x, const void* y, const void* w, const Strided5& lay,
                  int64_t n, void* partial, int64_t blocks, cudaStream_t stream);

// Backward: gx = scale * w (x - y), gy = -gx (each written only when non-null), `scale` a device
// scalar in the acc dtype (2 grad_output / denom), so no host sync.
void mse_bwd_cuda(DType xd, DType yd, bool wide, const void* x, const void* y, const void* w, const void* scale,
                  void* gx, void* gy, const Strided5& lay, int64_t n, cudaStream_t stream);

int64_t mse_fwd_blocks(int64_t n);

}  // namespace wmkernels

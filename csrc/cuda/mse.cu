// Fused MSE on CUDA. Forward: one pass reading x, y (and the broadcast weight), a block-level
// tree reduction into one partial per block (8 bytes/fp32 element read). Backward recomputes the
// gradient from x and y (8 read + 4 written per gradient, bytes/fp32 element): as many bytes as
// saving it in the forward and scaling it by grad_output, and no buffer held in between.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "launch.h"

namespace wmkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // elements per thread per block-tile
constexpr int64_t kMaxBlocks = 2048;

__device__ __forceinline__ int64_t offset(const Strided5& lay, int k, int64_t idx) {
  int64_t off = 0;
  for (int d = kDims - 1; d >= 0; --d) {
    const int64_t i = idx % lay.sizes[d];
    idx /= lay.sizes[d];
    off += i * lay.strides[k][d];
  }
  return off;
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename x_t, typename y_t, typename acc_t, bool HAS_W>
__global__ void __launch_bounds__(kThreads) mse_fwd_kernel(const x_t* __restrict__ x, const y_t* __restrict__ y,
                                                           const acc_t* __restrict__ w, Strided5 lay, int64_t n,
                                                           acc_t* __restrict__ partial) {
  acc_t s = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += step) {
    const int64_t xo = lay.contiguous ? i : offset(lay, 0, i);
    const int64_t yo = lay.contiguous ? i : offset(lay, 1, i);
    const acc_t d = to_acc<acc_t>(x[xo]) - to_acc<acc_t>(y[yo]);
    const acc_t wd = HAS_W ? w[offset(lay, 2, i)] * d : d;
    s += wd * d;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <typename x_t, typename y_t, typename acc_t, bool HAS_W>
__global__ void __launch_bounds__(kThreads) mse_bwd_kernel(const x_t* __restrict__ x, const y_t* __restrict__ y,
                                                           const acc_t* __restrict__ w, const acc_t* __restrict__ scale,
                                                           x_t* __restrict__ gx, y_t* __restrict__ gy, Strided5 lay,
                                                           int64_t n) {
  const acc_t sc = *scale;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += step) {
    const int64_t xo = lay.contiguous ? i : offset(lay, 0, i);
    const int64_t yo = lay.contiguous ? i : offset(lay, 1, i);
    // weight times scale first: 2 (x - y) alone can overflow where the gradient does not
    const acc_t c = HAS_W ? sc * w[offset(lay, 2, i)] : sc;
    const acc_t g = (to_acc<acc_t>(x[xo]) - to_acc<acc_t>(y[yo])) * c;
    if (gx != nullptr) gx[lay.contiguous ? i : offset(lay, 3, i)] = from_acc<x_t>(g);
    if (gy != nullptr) gy[lay.contiguous ? i : offset(lay, 4, i)] = from_acc<y_t>(-g);
  }
}

// Calls f(x_t{}, y_t{}, acc_t{}) for the element types of xd and yd; acc_t is double when `wide` (the host's
// choice: any of input, target and weight fp64).
template <typename F>
void dispatch_xy(DType xd, DType yd, bool wide, F&& f) {
  dispatch_float(xd, [&](auto xv) {
    dispatch_float(yd, [&](auto yv) {
      if (wide) f(xv, yv, double{}); else f(xv, yv, float{});
    });
  });
}

}  // namespace

int64_t mse_fwd_blocks(int64_t n) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kItems;
  const int64_t b = (n + per_block - 1) / per_block;
  return b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b);
}

void mse_fwd_cuda(DType xd, DType yd, bool wide, const void* x, const void* y, const void* w, const Strided5& lay,
                  int64_t n, void* partial, int64_t blocks, cudaStream_t stream) {
  dispatch_xy(xd, yd, wide, [&](auto xv, auto yv, auto accv) {
    using x_t = decltype(xv);
    using y_t = decltype(yv);
    using acc_t = decltype(accv);
    const auto* xp = static_cast<const x_t*>(x);
    const auto* yp = static_cast<const y_t*>(y);
    const auto* wp = static_cast<const acc_t*>(w);
    auto* pp = static_cast<acc_t*>(partial);
    if (w != nullptr) {
      mse_fwd_kernel<x_t, y_t, acc_t, true><<<blocks, kThreads, 0, stream>>>(xp, yp, wp, lay, n, pp);
    } else {
      mse_fwd_kernel<x_t, y_t, acc_t, false><<<blocks, kThreads, 0, stream>>>(xp, yp, wp, lay, n, pp);
    }
  });
}

void mse_bwd_cuda(DType xd, DType yd, bool wide, const void* x, const void* y, const void* w, const void* scale,
                  void* gx, void* gy, const Strided5& lay, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t per_block = static_cast<int64_t>(kThreads) * kItems;
  int64_t blocks = (n + per_block - 1) / per_block;
  if (blocks > 65535LL * 16) blocks = 65535LL * 16;
  dispatch_xy(xd, yd, wide, [&](auto xv, auto yv, auto accv) {
    using x_t = decltype(xv);
    using y_t = decltype(yv);
    using acc_t = decltype(accv);
    const auto* xp = static_cast<const x_t*>(x);
    const auto* yp = static_cast<const y_t*>(y);
    const auto* wp = static_cast<const acc_t*>(w);
    const auto* sp = static_cast<const acc_t*>(scale);
    auto* gxp = static_cast<x_t*>(gx);
    auto* gyp = static_cast<y_t*>(gy);
    if (w != nullptr) {
      mse_bwd_kernel<x_t, y_t, acc_t, true><<<blocks, kThreads, 0, stream>>>(xp, yp, wp, sp, gxp, gyp, lay, n);
    } else {
      mse_bwd_kernel<x_t, y_t, acc_t, false><<<blocks, kThreads, 0, stream>>>(xp, yp, wp, sp, gxp, gyp, lay, n);
    }
  });
}

}  // namespace wmkernels

// Device helpers shared by the CUDA kernels (*.cu): element conversions to/from the accumulation
// type and the host-side dtype dispatch. CUDA headers only, no torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.h"

namespace wmkernels {

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

// A stored value in the accumulation type (via fp32, except fp64 stays exact).
template <typename acc_t, typename T> __device__ __forceinline__ acc_t to_acc(T v) {
  return static_cast<acc_t>(to_f(v));
}
template <> __device__ __forceinline__ double to_acc<double, double>(double v) { return v; }

template <typename T, typename acc_t> __device__ __forceinline__ T from_acc(acc_t v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc(double v) { return __double2bfloat16(v); }
template <> __device__ __forceinline__ __half from_acc(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __half from_acc(double v) { return __double2half(v); }

// Calls f with a value of the C++ type of floating dtype d.
template <typename F>
void dispatch_float(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
  }
}

}  // namespace wmkernels

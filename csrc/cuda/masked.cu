// Masked video modeling on CUDA: tubelet patches read straight from the raw (strided) video.
//
// masked_loss_rows_kernel: one block per patch row. The patch is read once into shared memory
// (P values in the acc dtype), normalized per patch or per channel with block reductions, compared
// with its prediction; writes the row loss, optionally the pred gradient, and in the backward the
// video gradient (atomic adds: ids may repeat). Bytes per fp32 element: 4 video + 4 pred read,
// 4 written for the pred gradient. Row losses are reduced in a fixed order: deterministic.
// masked_gather_kernel / masked_scatter_kernel: one thread per gathered value.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "masked.h"

namespace wmkernels {
namespace {

constexpr int kThreads = 256;

// Element offset of value q of token n of sample b; c receives the value's channel.
__device__ __forceinline__ int64_t patch_offset(const VideoGeom& g, int64_t b, int64_t n, int64_t q, int64_t& c) {
  c = q % g.C;
  int64_t r = q / g.C;
  const int64_t k = r % g.pw;
  r /= g.pw;
  const int64_t j = r % g.ph;
  const int64_t i = r / g.ph;
  const int64_t tw = n % g.gw, th = (n / g.gw) % g.gh, tt = n / (g.gw * g.gh);
  return b * g.sb + (tt * g.pt + i) * g.st + (th * g.ph + j) * g.sh + (tw * g.pw + k) * g.sw + c * g.sc;
}

// Sum over the block; every thread gets the result. `scratch` holds kThreads / 32 values.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

// Sum over the values of one normalization group: group g of G (G = 1: all P values;
// G = C: channel g, values g, g + C, ...).
template <typename acc_t, typename F>
__device__ acc_t group_sum(int64_t P, int64_t G, int64_t g, acc_t* scratch, F&& f) {
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < P / G; i += kThreads) s += f(G == 1 ? i : i * G + g);
  return block_sum(s, scratch);
}

template <typename p_t, typename v_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) masked_loss_rows_kernel(const p_t* __restrict__ pred,
                                                                    const v_t* __restrict__ video, MaskedLossArgs a) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const VideoGeom& g = a.geom;
  const int64_t P = g.pt * g.ph * g.pw * g.C;
  const int64_t G = a.norm_mode == 2 ? g.C : 1;
  acc_t* x = smem;                 // P patch values, later the normalized targets
  acc_t* mean = x + P;             // G group means
  acc_t* inv = mean + G;           // G 1 / scale of each group
  acc_t* sigma = inv + G;          // G standard deviations (VideoMAE)
  acc_t* mg = sigma + G;           // G means of the target gradient
  acc_t* dot = mg + G;             // G sums of target gradient x target
  acc_t* scratch = dot + G;        // kThreads / 32 partials
  const int64_t row = blockIdx.x;
  const int64_t b = row / a.R;
  acc_t* row_loss = static_cast<acc_t*>(a.row_loss);
  p_t* gp = static_cast<p_t*>(a.gp);
  const p_t* pr = pred + row * P;
  if (a.mask != nullptr && !a.mask[row]) {
    if (threadIdx.x == 0) row_loss[row] = 0;
    if (gp != nullptr) {
      for (int64_t q = threadIdx.x; q < P; q += kThreads) gp[row * P + q] = from_acc<p_t>(acc_t(0));
    }
    return;
  }
  const int64_t n = a.mask != nullptr ? row % a.R : a.ids[row];
  const acc_t* mp = static_cast<const acc_t*>(a.mean);
  const acc_t* sp = static_cast<const acc_t*>(a.std);
  for (int64_t q = threadIdx.x; q < P; q += kThreads) {
    int64_t c;
    const int64_t off = patch_offset(g, b, n, q, c);
    acc_t v = to_acc<acc_t>(video[off]);
    if (mp != nullptr) v = (v - mp[c]) / sp[c];
    x[q] = v;
  }
  __syncthreads();
  const acc_t eps = static_cast<acc_t>(a.eps);
  const acc_t cnt = static_cast<acc_t>(P / G);
  if (a.norm_mode != 0) {
    for (int64_t gi = 0; gi < G; ++gi) {
      // shifted by the group's first value (x[gi]): a flat patch gets its exact value as mean
      const acc_t k = x[gi];
      const acc_t mu = k + group_sum<acc_t>(P, G, gi, scratch, [&](int64_t q) { return x[q] - k; }) / cnt;
      const acc_t ss = group_sum<acc_t>(P, G, gi, scratch, [&](int64_t q) {
        const acc_t d = x[q] - mu;
        return d * d;
      });
      const acc_t var = ss / (cnt - 1);
      if (threadIdx.x == 0) {
        mean[gi] = mu;
        sigma[gi] = sqrt(var);
        inv[gi] = a.norm_mode == 2 ? acc_t(1) / (sqrt(var) + eps) : acc_t(1) / sqrt(var + eps);
      }
    }
    __syncthreads();
    for (int64_t q = threadIdx.x; q < P; q += kThreads) {
      const int64_t gi = G == 1 ? 0 : q % G;
      x[q] = (x[q] - mean[gi]) * inv[gi];
    }
    __syncthreads();
  }
  const acc_t scale = *static_cast<const acc_t*>(a.scale);
  acc_t sq = 0;
  for (int64_t q = threadIdx.x; q < P; q += kThreads) {
    const acc_t d = to_acc<acc_t>(pr[q]) - x[q];
    sq += d * d;
    if (gp != nullptr) gp[row * P + q] = from_acc<p_t>(scale * d);
  }
  sq = block_sum(sq, scratch);
  if (threadIdx.x == 0) row_loss[row] = sq / static_cast<acc_t>(P);
  if (a.gv == nullptr) return;
  // Video gradient: gy = -scale (pred - y) through the normalization and the affine map.
  auto gy = [&](int64_t q) { return -scale * (to_acc<acc_t>(pr[q]) - x[q]); };
  if (a.norm_mode != 0) {
    for (int64_t gi = 0; gi < G; ++gi) {
      const acc_t s = group_sum<acc_t>(P, G, gi, scratch, gy);
      const acc_t d = group_sum<acc_t>(P, G, gi, scratch, [&](int64_t q) { return gy(q) * x[q]; });
      if (threadIdx.x == 0) {
        mg[gi] = s / cnt;
        dot[gi] = d;
      }
    }
    __syncthreads();
  }
  acc_t* gv = static_cast<acc_t*>(a.gv);
  for (int64_t q = threadIdx.x; q < P; q += kThreads) {
    int64_t c;
    const int64_t off = patch_offset(a.grad_geom, b, n, q, c);
    acc_t v = gy(q);
    if (a.norm_mode == 1) {
      v = (v - mg[0] - x[q] * dot[0] / (cnt - 1)) * inv[0];
    } else if (a.norm_mode == 2) {
      // a constant group (sigma = 0) takes the std's gradient there as 0, as torch.std's autograd does
      const acc_t k = sigma[c] > 0 ? dot[c] / (sigma[c] * (cnt - 1)) : acc_t(0);
      v = (v - mg[c]) * inv[c] - x[q] * k;
    }
    if (sp != nullptr) v /= sp[c];
    atomicAdd(gv + off, v);
  }
}

template <typename v_t, typename o_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) masked_gather_kernel(const v_t* __restrict__ video, VideoGeom g,
                                                                 const int64_t* __restrict__ ids, int64_t K,
                                                                 const acc_t* __restrict__ mean,
                                                                 const acc_t* __restrict__ std, o_t* __restrict__ out,
                                                                 int64_t total) {
  const int64_t P = g.pt * g.ph * g.pw * g.C;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += step) {
    const int64_t row = i / P, q = i % P;
    int64_t c;
    const int64_t off = patch_offset(g, row / K, ids[row], q, c);
    acc_t v = to_acc<acc_t>(video[off]);
    if (mean != nullptr) v = (v - mean[c]) / std[c];
    out[i] = from_acc<o_t>(v);
  }
}

template <typename g_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) masked_scatter_kernel(const g_t* __restrict__ grad, VideoGeom g,
                                                                  const int64_t* __restrict__ ids, int64_t K,
                                                                  const acc_t* __restrict__ std, acc_t* gv,
                                                                  int64_t total) {
  const int64_t P = g.pt * g.ph * g.pw * g.C;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += step) {
    const int64_t row = i / P, q = i % P;
    int64_t c;
    const int64_t off = patch_offset(g, row / K, ids[row], q, c);
    acc_t v = to_acc<acc_t>(grad[i]);
    if (std != nullptr) v /= std[c];
    atomicAdd(gv + off, v);
  }
}

template <typename F>
void dispatch_video(VDType d, F&& f) {
  switch (d) {
    case VDType::kFloat32: f(float{}); break;
    case VDType::kFloat64: f(double{}); break;
    case VDType::kBFloat16: f(__nv_bfloat16{}); break;
    case VDType::kFloat16: f(__half{}); break;
    case VDType::kUInt8: f(uint8_t{}); break;
  }
}

// The accumulation type is double exactly when an operand is: only that pairing is instantiated.
template <typename A, typename B>
constexpr bool kWide = std::is_same_v<A, double> || std::is_same_v<B, double>;

int64_t flat_blocks(int64_t total) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 65535LL * 32) blocks = 65535LL * 32;
  return blocks < 1 ? 1 : blocks;
}

}  // namespace

size_t masked_loss_rows_smem(int64_t P, int64_t G, size_t acc_bytes) {
  return static_cast<size_t>(P + 5 * G + kThreads / 32) * acc_bytes;
}

void masked_loss_rows_cuda(DType pred_dtype, VDType video_dtype, const void* pred, const void* video,
                           const MaskedLossArgs& a, cudaStream_t stream) {
  const int64_t rows = a.geom.B * a.R;
  if (rows == 0) return;
  const int64_t P = a.geom.pt * a.geom.ph * a.geom.pw * a.geom.C;
  const int64_t G = a.norm_mode == 2 ? a.geom.C : 1;
  dispatch_float(pred_dtype, [&](auto pv) {
    using p_t = decltype(pv);
    dispatch_video(video_dtype, [&](auto vv) {
      using v_t = decltype(vv);
      auto run = [&](auto accv) {
        using acc_t = decltype(accv);
        const size_t smem = masked_loss_rows_smem(P, G, sizeof(acc_t));
        auto kernel = masked_loss_rows_kernel<p_t, v_t, acc_t>;
        if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
        kernel<<<static_cast<unsigned>(rows), kThreads, smem, stream>>>(
            static_cast<const p_t*>(pred), static_cast<const v_t*>(video), a);
      };
      if constexpr (kWide<p_t, v_t>) run(double{}); else run(float{});
    });
  });
}

void masked_gather_cuda(VDType video_dtype, DType out_dtype, const void* video, const VideoGeom& g, const int64_t* ids,
                        int64_t K, const void* mean, const void* std, void* out, cudaStream_t stream) {
  const int64_t total = g.B * K * g.pt * g.ph * g.pw * g.C;
  if (total == 0) return;
  dispatch_video(video_dtype, [&](auto vv) {
    using v_t = decltype(vv);
    dispatch_float(out_dtype, [&](auto ov) {
      using o_t = decltype(ov);
      auto run = [&](auto accv) {
        using acc_t = decltype(accv);
        masked_gather_kernel<v_t, o_t, acc_t><<<flat_blocks(total), kThreads, 0, stream>>>(
            static_cast<const v_t*>(video), g, ids, K, static_cast<const acc_t*>(mean), static_cast<const acc_t*>(std),
            static_cast<o_t*>(out), total);
      };
      if constexpr (kWide<v_t, o_t>) run(double{}); else run(float{});
    });
  });
}

void masked_scatter_cuda(DType grad_dtype, bool wide, const void* grad, const VideoGeom& g, const int64_t* ids,
                         int64_t K, const void* std, void* gv, cudaStream_t stream) {
  const int64_t total = g.B * K * g.pt * g.ph * g.pw * g.C;
  if (total == 0) return;
  dispatch_float(grad_dtype, [&](auto gv0) {
    using g_t = decltype(gv0);
    auto run = [&](auto accv) {
      using acc_t = decltype(accv);
      masked_scatter_kernel<g_t, acc_t><<<flat_blocks(total), kThreads, 0, stream>>>(
          static_cast<const g_t*>(grad), g, ids, K, static_cast<const acc_t*>(std), static_cast<acc_t*>(gv), total);
    };
    if (wide || grad_dtype == DType::kFloat64) run(double{}); else run(float{});
  });
}

}  // namespace wmkernels

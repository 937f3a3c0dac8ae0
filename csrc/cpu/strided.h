// Strided iteration for CPU elementwise kernels: several operands viewed over one shape,
// dims ordered by the first operand's strides and merged where every operand is contiguous.
// Work is split into fixed-size chunks of the flat index so that reductions combine per-chunk
// partials in a fixed order: the result does not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <vector>

namespace wmkernels {

constexpr int kMaxOperands = 5;
constexpr int64_t kChunk = 16384;

struct StridedLayout {
  std::vector<int64_t> sizes;                               // merged sizes, outermost first
  std::array<std::vector<int64_t>, kMaxOperands> strides;  // per operand, in elements
  int n_operands = 0;
  int64_t numel = 1;
};

// `operands` must all broadcast to `shape` (expand is a view: stride 0 for broadcast dims).
inline StridedLayout make_layout(at::IntArrayRef shape, const std::vector<at::Tensor>& operands) {
  StridedLayout lay;
  lay.n_operands = static_cast<int>(operands.size());
  TORCH_CHECK(lay.n_operands <= kMaxOperands, "wmkernels: too many operands");
  std::vector<std::vector<int64_t>> st;
  for (const auto& t : operands) {
    auto e = t.expand(shape);
    st.emplace_back(e.strides().begin(), e.strides().end());
  }
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < static_cast<int64_t>(shape.size()); ++d) {
    if (shape[d] != 1) dims.push_back(d);
  }
  std::stable_sort(dims.begin(), dims.end(),
                   [&](int64_t a, int64_t b) { return std::abs(st[0][a]) > std::abs(st[0][b]); });
  for (int64_t d : dims) {
    bool merge = !lay.sizes.empty();
    for (int k = 0; merge && k < lay.n_operands; ++k) {
      merge = lay.strides[k].back() == st[k][d] * shape[d];
    }
    if (merge) {
      lay.sizes.back() *= shape[d];
      for (int k = 0; k < lay.n_operands; ++k) lay.strides[k].back() = st[k][d];
    } else {
      lay.sizes.push_back(shape[d]);
      for (int k = 0; k < lay.n_operands; ++k) lay.strides[k].push_back(st[k][d]);
    }
  }
  if (lay.sizes.empty()) {  // a scalar or all-ones shape
    lay.sizes.push_back(1);
    for (int k = 0; k < lay.n_operands; ++k) lay.strides[k].push_back(0);
  }
  lay.numel = std::accumulate(lay.sizes.begin(), lay.sizes.end(), int64_t{1}, std::multiplies<>());
  for (int64_t s : shape) {
    if (s == 0) lay.numel = 0;
  }
  return lay;
}

// Calls fn(offsets, inner_strides, count) for every innermost-contiguous run of the flat range
// [begin, end), with offsets (in elements) of the run's first element in each operand.
template <typename Fn>
inline void for_each_run(const StridedLayout& lay, int64_t begin, int64_t end, Fn&& fn) {
  const int nd = static_cast<int>(lay.sizes.size());
  std::vector<int64_t> idx(nd);
  int64_t rem = begin;
  for (int d = nd - 1; d >= 0; --d) {
    idx[d] = rem % lay.sizes[d];
    rem /= lay.sizes[d];
  }
  std::array<int64_t, kMaxOperands> off{};
  std::array<int64_t, kMaxOperands> inner{};
  for (int k = 0; k < lay.n_operands; ++k) inner[k] = lay.strides[k][nd - 1];
  int64_t pos = begin;
  while (pos < end) {
    for (int k = 0; k < lay.n_operands; ++k) {
      int64_t o = 0;
      for (int d = 0; d < nd; ++d) o += idx[d] * lay.strides[k][d];
      off[k] = o;
    }
    const int64_t count = std::min(lay.sizes[nd - 1] - idx[nd - 1], end - pos);
    fn(off, inner, count);
    pos += count;
    idx[nd - 1] += count;
    for (int d = nd - 1; d > 0 && idx[d] == lay.sizes[d]; --d) {
      idx[d] = 0;
      ++idx[d - 1];
    }
  }
}

// Runs fn(begin, end) -> double over fixed chunks in parallel and sums the results in chunk order.
template <typename Fn>
inline double chunked_sum(int64_t numel, Fn&& fn) {
  const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(n_chunks), 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      partial[c] = fn(c * kChunk, std::min(numel, (c + 1) * kChunk));
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace wmkernels

// Shape logic of the masked video modeling ops shared by the CPU kernels (csrc/cpu/masked.cpp) and
// the CUDA glue (csrc/cuda/masked_torch.cpp). ATen only.
#pragma once

#include <ATen/ATen.h>

namespace wmkernels {

// A (B, C, T, H, W) or (B, T, C, H, W) video of `shape` / element `strides` cut into `tubelet`
// (pt, ph, pw) patches: fills the fields B, C, gt, gh, gw, pt, ph, pw, sb, sc, st, sh, sw of a G.
template <typename G>
G make_geom(at::IntArrayRef shape, at::IntArrayRef strides, at::IntArrayRef tubelet, c10::string_view layout) {
  const bool bcthw = layout == "BCTHW";
  TORCH_CHECK(bcthw || layout == "BTCHW", "wmkernels: layout must be BCTHW or BTCHW");
  const int cd = bcthw ? 1 : 2, td = bcthw ? 2 : 1;
  G g{};
  g.B = shape[0];
  g.C = shape[cd];
  g.pt = tubelet[0];
  g.ph = tubelet[1];
  g.pw = tubelet[2];
  g.gt = shape[td] / g.pt;
  g.gh = shape[3] / g.ph;
  g.gw = shape[4] / g.pw;
  g.sb = strides[0];
  g.sc = strides[cd];
  g.st = strides[td];
  g.sh = strides[3];
  g.sw = strides[4];
  return g;
}

}  // namespace wmkernels

// The Python module object of the compiled extension. The kernels register themselves with the
// dispatcher as `wmkernels_C::*` (see TORCH_LIBRARY_FRAGMENT in each op's file); importing this
// module loads them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wmkernels compiled kernels (registered as torch.ops.wmkernels_C)";
}

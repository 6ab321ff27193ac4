// Launcher API of the CUDA kernels: plain pointers and Params, no torch headers, so that nvcc never
// parses ATen. The torch binding (dcnv4_cuda.cpp, compiled by the host compiler) calls these.
#pragma once

#include <cuda_runtime.h>

#include "../dcnv4.h"

namespace dcnv4 {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// output (N, Ho, Wo, C) = dcnv4(value, offset_mask). Returns the launch's error code.
cudaError_t forward_cuda(const Params& p, DType dtype, const void* value, const void* offset_mask, void* output,
                         cudaStream_t stream);

}  // namespace dcnv4

// Launcher API of the CUDA kernels: plain pointers and Params, no torch headers, so that nvcc never
// parses ATen. The torch binding (dcnv4_cuda.cpp, compiled by the host compiler) calls these.
#pragma once

#include <cuda_runtime.h>

#include "../dcnv4.h"

namespace dcnv4 {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// output (N, Ho, Wo, C) = dcnv4(value (N, H, W, C), offset_mask (N, Ho, Wo, P)), all contiguous and of
// `dtype`. Launches nothing when the output is empty. Returns the launch's error code.
cudaError_t forward_cuda(const Params& p, DType dtype, const void* value, const void* offset_mask, void* output,
                         cudaStream_t stream);

// How the backward accumulates grad_value: kAtomic sends every contribution to global memory with
// atomics; kTiled accumulates a tile of output pixels' contributions in shared memory first and adds
// each block's region to global memory once (falling back to kAtomic where the region does not fit).
// Both give the same gradients up to the order of float additions.
enum class BackwardVariant : int { kAtomic = 0, kTiled = 1 };

// Whether this build accumulates the 16-bit types' grad_value in their own type (built with
// -DDCNV4_BWD16_ACC16) rather than in float.
bool backward16_accumulates_in_16bit();

// Gradients of dcnv4 given grad_output (N, Ho, Wo, C):
// - grad_value_acc (N, H, W, C) is ACCUMULATED into with atomics, so it must be zero-filled; it is
//   double for kFloat64, float for kFloat32, and float for the 16-bit types (converted afterwards) unless
//   backward16_accumulates_in_16bit(), when it is of `dtype`;
// - grad_offset_mask (N, Ho, Wo, P), of `dtype`: channels [0, 3GK) of each pixel are written, the
//   padding channels [3GK, P) are left to the caller.
// Returns the launch's error code.
cudaError_t backward_cuda(const Params& p, DType dtype, const void* grad_output, const void* value,
                          const void* offset_mask, void* grad_value_acc, void* grad_offset_mask,
                          cudaStream_t stream, BackwardVariant variant = BackwardVariant::kAtomic);

}  // namespace dcnv4

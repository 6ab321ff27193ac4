// The CUDA kernels of csrc/cuda/dcnv4_cuda.cu compiled for the CPU emulator (emulator.h), with a
// binding that takes CPU tensors. Built by tests/test_cuda_emulated.py; not part of the package.
#include <torch/extension.h>

#include <map>

#include "emulator.h"

// Compile the kernels as for a Hopper GPU (16-byte float atomics), after the CUDA headers have been
// read for the host.
#define __CUDA_ARCH__ 900
#define DCNV4_EMULATED 1  // no inline PTX: the kernels take their portable paths where they have one
#include "cuda/dcnv4_cuda.cu"
#undef __CUDA_ARCH__

#include "dcnv4_torch.h"

namespace {

dcnv4::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return dcnv4::DType::kFloat32;
    case at::kHalf:
      return dcnv4::DType::kFloat16;
    case at::kBFloat16:
      return dcnv4::DType::kBFloat16;
    case at::kDouble:
      return dcnv4::DType::kFloat64;
    default:
      TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

emu::Range range_of(const at::Tensor& t) {
  const auto b = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {b, b + static_cast<uintptr_t>(t.numel() * t.element_size())};
}

void check_layout(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

// Both functions write into the given (pre-allocated) outputs and return the launch's error ("" if
// none), so the caller can surround the outputs with guard zones and check them afterwards.
std::string forward(const at::Tensor& value, const at::Tensor& offset_mask, at::Tensor& output,
                    std::vector<int64_t> kernel_size, std::vector<int64_t> stride, std::vector<int64_t> padding,
                    std::vector<int64_t> dilation, int64_t groups, double offset_scale, bool remove_center) {
  check_layout(value, "value");
  check_layout(offset_mask, "offset_mask");
  check_layout(output, "output");
  const dcnv4::Params p = dcnv4::make_params(value, offset_mask, kernel_size, stride, padding, dilation, groups,
                                             offset_scale, remove_center);
  TORCH_CHECK(output.sizes() == at::IntArrayRef({p.N, p.Ho, p.Wo, p.G * p.D}) &&
                  output.scalar_type() == value.scalar_type(),
              "output has the wrong shape or dtype");
  emu::readable = {range_of(value), range_of(offset_mask)};
  emu::atomic_writable.clear();
  emu::Launcher::last_error.clear();
  const cudaError_t err = dcnv4::forward_cuda(p, dtype_of(value), value.const_data_ptr(),
                                              offset_mask.const_data_ptr(), output.mutable_data_ptr(), nullptr);
  if (err != cudaSuccess && emu::Launcher::last_error.empty()) return "launcher returned an error";
  return emu::Launcher::last_error;
}

std::string backward(const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& offset_mask,
                     at::Tensor& grad_value_acc, at::Tensor& grad_offset_mask, std::vector<int64_t> kernel_size,
                     std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                     int64_t groups, double offset_scale, bool remove_center, const std::string& variant) {
  TORCH_CHECK(variant == "atomic" || variant == "tiled", "variant must be 'atomic' or 'tiled', got ", variant);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_output, "grad_output"},
                                {value, "value"},
                                {offset_mask, "offset_mask"},
                                {grad_value_acc, "grad_value_acc"},
                                {grad_offset_mask, "grad_offset_mask"}}) {
    check_layout(t, name);
  }
  const dcnv4::Params p = dcnv4::make_params(value, offset_mask, kernel_size, stride, padding, dilation, groups,
                                             offset_scale, remove_center);
  dcnv4::check_grad_output(grad_output, value, p);
  const auto acc_type = dcnv4::grad_value_acc_type(value.scalar_type(), dcnv4::backward16_accumulates_in_16bit());
  TORCH_CHECK(grad_value_acc.sizes() == value.sizes() && grad_value_acc.scalar_type() == acc_type,
              "grad_value_acc must have value's shape and the accumulation dtype");
  TORCH_CHECK(grad_offset_mask.sizes() == offset_mask.sizes() &&
                  grad_offset_mask.scalar_type() == offset_mask.scalar_type(),
              "grad_offset_mask must have offset_mask's shape and dtype");
  emu::readable = {range_of(grad_output), range_of(value), range_of(offset_mask)};
  emu::atomic_writable = {range_of(grad_value_acc)};
  emu::Launcher::last_error.clear();
  const cudaError_t err = dcnv4::backward_cuda(
      p, dtype_of(value), grad_output.const_data_ptr(), value.const_data_ptr(), offset_mask.const_data_ptr(),
      grad_value_acc.mutable_data_ptr(), grad_offset_mask.mutable_data_ptr(), nullptr,
      variant == "tiled" ? dcnv4::BackwardVariant::kTiled : dcnv4::BackwardVariant::kAtomic);
  if (err != cudaSuccess && emu::Launcher::last_error.empty()) return "launcher returned an error";
  return emu::Launcher::last_error;
}

// Kernels that break the rules on purpose, to show that the emulator catches them.
__global__ void divergent_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 != 5) v = __shfl_xor_sync(0xffffffffu, v, 1);  // lane 5 never arrives
  out[threadIdx.x] = v;
}

__global__ void out_of_bounds_kernel(const float* in, float* out) {
  out[threadIdx.x] = __ldg(in + threadIdx.x + 1);  // the last thread reads one element past the end
}

__global__ void misaligned_vector_kernel(const float* in, float* out) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(in + 1));
  out[threadIdx.x] = v.x;
}

__global__ void shuffle_sum_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Runs one of the kernels above on 64 threads; returns the emulator's error ("" when none) and the
// output.
std::pair<std::string, std::vector<float>> selftest(const std::string& which, int64_t timeout_ms) {
  const auto saved = emu::timeout;
  emu::timeout = std::chrono::milliseconds(timeout_ms);
  std::vector<float> in(64, 1.0f), out(128, 0.0f);
  emu::readable = {{reinterpret_cast<uintptr_t>(in.data()), reinterpret_cast<uintptr_t>(in.data() + 64)}};
  emu::atomic_writable.clear();
  std::string err;
  if (which == "divergent_shuffle") {
    err = emu::launch(1, 64, 0, divergent_shuffle_kernel, out.data());
  } else if (which == "out_of_bounds") {
    err = emu::launch(1, 64, 0, out_of_bounds_kernel, static_cast<const float*>(in.data()), out.data());
  } else if (which == "misaligned_vector") {
    err = emu::launch(1, 64, 0, misaligned_vector_kernel, static_cast<const float*>(in.data()), out.data());
  } else if (which == "shuffle_sum") {
    err = emu::launch(2, 64, 0, shuffle_sum_kernel, out.data());
  } else {
    err = "unknown self-test " + which;
  }
  emu::timeout = saved;
  return {err, out};
}

std::map<std::string, int64_t> counters() {
  return {{"loads16", emu::counters.loads16.load()},
          {"loads_scalar", emu::counters.loads_scalar.load()},
          {"atomics16", emu::counters.atomics16.load()},
          {"atomics_scalar", emu::counters.atomics_scalar.load()},
          {"atomics_shared", emu::counters.atomics_shared.load()},
          {"barriers", emu::counters.barriers.load()},
          {"shuffles", emu::counters.shuffles.load()}};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "the CUDA forward kernel, emulated on the CPU");
  m.def("backward", &backward, "the CUDA backward kernel, emulated on the CPU");
  m.def("accumulates_16bit", &dcnv4::backward16_accumulates_in_16bit,
        "whether the 16-bit backward accumulates grad_value in its own type (-DDCNV4_BWD16_ACC16)");
  m.def("selftest", &selftest, "run a rule-breaking kernel (or a correct one) under the emulator");
  m.def("counters", &counters,
        "what the last launch did: 16-byte and scalar loads, global and shared atomics, shuffles, barriers");
}

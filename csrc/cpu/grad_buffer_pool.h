// The pool of CPU gradient buffers used by the CPU ops (cpu/dense_kd_cpu_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace hdkd_fast::cpu {

// An uninitialized CPU tensor of `sizes` for a gradient that the kernel writes in full; its memory
// comes from, and goes back to, a two-slot pool (see grad_buffer_pool.cpp).
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace hdkd_fast::cpu

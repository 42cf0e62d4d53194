// Launchers of the fused dense-KD CUDA kernels. Torch-free: dense_kd_kernels.cu compiles with a bare
// `nvcc -c` (scripts/check_cuda_compile.sh); the torch binding is dense_kd_cuda.cpp.
//
// Every pointer in Problem / LossArgs / JvpArgs (including the pointer tables) is a device pointer.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../dense_kd_args.h"

namespace hdkd_fast::cuda {

// Per-row losses (ce_rows [K, B], kl_rows [P, B]) and, when la.compute_grad, the gradient rows.
// `vectorized`: every exit's base pointer and row stride allow 16-byte loads.
cudaError_t launch_losses_and_grad(const Problem& pb, const LossArgs& la, bool vectorized, cudaStream_t stream);

// Per-row JVP values (dce_rows [K, B], dkd_rows [P, B]); `vectorized` covers logits and tangents.
cudaError_t launch_jvp(const Problem& pb, const JvpArgs& ja, bool vectorized, cudaStream_t stream);

// n_valid[0] = number of target entries != ignore_index.
cudaError_t launch_count_valid(const int64_t* target, int64_t B, int64_t ignore_index, int64_t* n_valid,
                               cudaStream_t stream);

// Reduce per-row values over the batch in a fixed order (deterministic):
//   ce: out[k] = sum_b rows[k, b] * scale / (n_valid ? max(*n_valid, 1) : 1)           (mean / sum)
//   kd: out[i * K + j] = scale * sum_b rows[p, b] for pair p = (i, j)                  (mean / sum)
//       out[(i * K + j) * B + b] = scale * rows[p, b]                                   (none)
// `double_acc`: the buffers hold double (float64 input) instead of float.
cudaError_t launch_reduce_ce(const void* rows, int64_t K, int64_t B, double scale, const int64_t* n_valid,
                             void* out, bool double_acc, cudaStream_t stream);
cudaError_t launch_reduce_kd(const void* rows, const int32_t* pairs, int64_t P, int64_t K, int64_t B, double scale,
                             bool keep_rows, void* out, bool double_acc, cudaStream_t stream);

// The SASS/PTX version the kernels run as on `device` (e.g. 90), for `python -m hdkd_fast.info`.
int kernel_binary_version(int device);

}  // namespace hdkd_fast::cuda

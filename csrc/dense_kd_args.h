// Plain-C++ description of one call of the fused dense-KD op (no torch headers: the CUDA kernel
// sources include it and must compile with a bare `nvcc -c`).
//
// Math (docs/design.md §Math), per row b, with u_k = z_k - max(z_k), e_k = exp(u_k / T), sT_k = sum_c e_k,
// p_k = e_k / sT_k, log p_k = u_k / T - log sT_k, q_k = softmax(z_k):
//   ce[k]   = log sum_c exp(u_k) - u_k[y]                       (0 on ignored rows)
//   KL[i,j] = sum_c p_j (log p_j - log p_i)
//           = (X_jj - X_ij) / (T sT_j) - log sT_j + log sT_i,  X_ij = sum_c e_j u_i
// For an integer temperature T, exp(u) = e^T, so one exp per logit serves both temperatures.
#pragma once

#include <cstdint>

namespace hdkd_fast {

enum class Dtype : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };
enum Reduction : int { kMean = 0, kSum = 1, kNone = 2 };

// The inputs shared by both ops. Pointer tables live in host memory for the CPU kernel and in
// device memory for the CUDA kernel.
struct Problem {
  int64_t K = 0, B = 0, C = 0;
  const void* const* logits = nullptr;  // K pointers to [B, C] blocks, last dim contiguous
  const int64_t* row_stride = nullptr;  // K row strides, in elements
  const int64_t* target = nullptr;      // [B] int64 labels, or nullptr (no CE)
  int64_t ignore_index = -100;
  const int32_t* pairs = nullptr;  // P selected (student, teacher) pairs, flattened [2P]
  int64_t P = 0;
  double T = 1.0;
  bool detach_teacher = true;
  Dtype dtype = Dtype::kFloat;
};

// losses_and_grad: per-row losses (reduced afterwards in a fixed order) and the gradient of the
// weighted objective L = sum_k a_k ce_k + sum_ij g_ij kd_ij.
struct LossArgs {
  const void* ce_w = nullptr;  // accumulation dtype, [K] or per row [K, B]; nullptr: no CE gradient
  bool ce_w_rows = false;
  const void* kd_w = nullptr;  // accumulation dtype, [K, K] or per row [K, K, B]; nullptr: no KD gradient
  bool kd_w_rows = false;
  int reduction = kMean;
  const int64_t* n_valid = nullptr;  // CUDA only: device count of non-ignored rows (mean CE scale)
  double r_ce = 1.0;                 // CPU: CE row scale of the reduction
  double r_kd = 1.0;                 // KD row scale of the reduction (1/B for mean)
  bool compute_grad = false;
  void* ce_rows = nullptr;  // out, accumulation dtype [K, B] (with a target)
  void* kl_rows = nullptr;  // out, accumulation dtype [P, B]: unscaled KL of each selected pair
  void* grad = nullptr;     // out, input dtype, contiguous [K, B, C] (when compute_grad)
};

// jvp: per-row directional derivatives along the tangents (same layout as the logits).
struct JvpArgs {
  const void* const* tangents = nullptr;
  const int64_t* tangent_stride = nullptr;
  void* dce_rows = nullptr;  // out [K, B] (with a target)
  void* dkd_rows = nullptr;  // out [P, B]
};

// Integer temperatures in [1, kMaxIntPow] reuse exp(u / T) for the T = 1 softmax.
constexpr int kMaxIntPow = 8;
inline int integer_power(double T) {
  const int t = static_cast<int>(T);
  return (static_cast<double>(t) == T && t >= 1 && t <= kMaxIntPow) ? t : 0;
}

}  // namespace hdkd_fast

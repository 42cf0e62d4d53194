// CUDA registration of the hdkd_fast ops: argument handling with torch, then the torch-free
// launchers of dense_kd_kernels.cu on the current stream. No host synchronization: the mean CE
// scale (number of labelled rows) is counted on the device and read by the kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../dense_kd_host.h"
#include "dense_kd_kernels.cuh"

namespace hdkd_fast::cuda {
namespace {

void check(cudaError_t err, const char* what, const Prepared& p) {
  TORCH_CHECK(err == cudaSuccess, "hdkd_fast CUDA kernel (", what, ", K=", p.pb.K, ", C=", p.pb.C,
              "): ", cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (too many exits for one block's shared memory)" : "");
}

bool aligned16(const std::vector<const void*>& ptrs, const std::vector<int64_t>& strides, size_t elem) {
  for (size_t k = 0; k < ptrs.size(); ++k) {
    if (reinterpret_cast<std::uintptr_t>(ptrs[k]) % 16 != 0) return false;
    if ((static_cast<size_t>(strides[k]) * elem) % 16 != 0) return false;
  }
  return true;
}

// Copy the pointer tables and the pairs to the device (one pinned buffer, one async copy) and point
// pb (and ja) at the device copies. The returned tensor must outlive the launches.
at::Tensor upload(const Prepared& p, Problem& pb, JvpArgs* ja) {
  const int64_t K = pb.K, P = pb.P;
  const int64_t slots = 2 * K + (ja ? 2 * K : 0) + P + 1;  // 2P int32 pairs fill P int64 slots
  at::Tensor host = at::empty({slots}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    h[k] = static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(p.ptrs[k]));
    h[K + k] = p.strides[k];
  }
  int64_t off = 2 * K;
  if (ja) {
    for (int64_t k = 0; k < K; ++k) {
      h[off + k] = static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(p.tangent_ptrs[k]));
      h[off + K + k] = p.tangent_strides[k];
    }
    off += 2 * K;
  }
  if (P > 0) std::memcpy(h + off, p.pairs.data(), 2 * P * sizeof(int32_t));
  at::Tensor dev = host.to(p.keep[0].device(), /*non_blocking=*/true);
  int64_t* d = dev.data_ptr<int64_t>();
  pb.logits = reinterpret_cast<const void* const*>(d);
  pb.row_stride = d + K;
  if (ja) {
    ja->tangents = reinterpret_cast<const void* const*>(d + 2 * K);
    ja->tangent_stride = d + 3 * K;
  }
  pb.pairs = reinterpret_cast<const int32_t*>(d + off);
  return dev;
}

// Counts the labelled rows on the device when the mean CE needs them.
at::Tensor count_valid(const Prepared& p, cudaStream_t stream) {
  at::Tensor n_valid = at::empty({1}, p.keep[0].options().dtype(at::kLong));
  check(launch_count_valid(p.pb.target, p.pb.B, p.pb.ignore_index, n_valid.data_ptr<int64_t>(), stream),
        "count_valid", p);
  return n_valid;
}

// Batch reduction of the per-row values into the op's outputs.
std::tuple<at::Tensor, at::Tensor> reduce(const Prepared& p, const Problem& pb, const at::Tensor& ce_rows,
                                          const at::Tensor& kd_rows, const at::Tensor& n_valid, double kd_scale,
                                          cudaStream_t stream) {
  const int64_t K = pb.K, B = pb.B;
  const bool none = p.reduction == kNone;
  const bool dbl = p.acc == at::kDouble;
  at::Tensor ce = at::empty({0}, p.acc_options);
  if (ce_rows.defined()) {
    if (none) {
      ce = ce_rows;
    } else {
      ce = at::empty({K}, p.acc_options);
      check(launch_reduce_ce(ce_rows.data_ptr(), K, B, 1.0, n_valid.defined() ? n_valid.data_ptr<int64_t>() : nullptr,
                             ce.data_ptr(), dbl, stream),
            "reduce_ce", p);
    }
  }
  at::Tensor kd = none ? at::zeros({K, K, B}, p.acc_options) : at::zeros({K, K}, p.acc_options);
  check(launch_reduce_kd(kd_rows.data_ptr(), pb.pairs, pb.P, K, B, kd_scale, none, kd.data_ptr(), dbl, stream),
        "reduce_kd", p);
  return {ce, kd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> losses_and_grad_cuda(
    at::TensorList logits, const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& ce_weight,
    const std::optional<at::Tensor>& kd_weight, at::IntArrayRef pairs, double temperature, bool detach_teacher,
    int64_t ignore_index, c10::string_view reduction, bool compute_grad) {
  Prepared p = prepare(logits, target, pairs, temperature, detach_teacher, ignore_index, reduction);
  const c10::cuda::CUDAGuard guard(p.keep[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t K = p.pb.K, B = p.pb.B, C = p.pb.C;
  LossArgs la;
  at::Tensor ce_w = prepare_weight(p, ce_weight, 1, "ce_weight", la.ce_w_rows);
  at::Tensor kd_w = prepare_weight(p, kd_weight, 2, "kd_weight", la.kd_w_rows);
  const bool has_target = p.target.defined();
  Problem pb = p.pb;
  const at::Tensor tables = upload(p, pb, nullptr);
  at::Tensor n_valid;
  if (has_target && p.reduction == kMean) {
    n_valid = count_valid(p, stream);
    la.n_valid = n_valid.data_ptr<int64_t>();
  }
  la.reduction = p.reduction;
  la.r_ce = 1.0;
  la.r_kd = p.reduction == kMean ? 1.0 / static_cast<double>(B) : 1.0;
  la.compute_grad = compute_grad;
  la.ce_w = ce_w.defined() ? ce_w.data_ptr() : nullptr;
  la.kd_w = kd_w.defined() ? kd_w.data_ptr() : nullptr;
  at::Tensor ce_rows = has_target ? at::empty({K, B}, p.acc_options) : at::Tensor();
  at::Tensor kd_rows = at::empty({pb.P, B}, p.acc_options);
  at::Tensor grad = compute_grad ? at::empty({K, B, C}, p.keep[0].options()) : at::empty({0}, p.keep[0].options());
  la.ce_rows = has_target ? ce_rows.data_ptr() : nullptr;
  la.kl_rows = kd_rows.data_ptr();
  la.grad = compute_grad ? grad.data_ptr() : nullptr;
  const bool vec = aligned16(p.ptrs, p.strides, c10::elementSize(p.dtype));
  check(launch_losses_and_grad(pb, la, vec, stream), "losses_and_grad", p);
  auto [ce, kd] = reduce(p, pb, ce_rows, kd_rows, n_valid, temperature * temperature * la.r_kd, stream);
  return {ce, kd, grad};
}

std::tuple<at::Tensor, at::Tensor> jvp_cuda(at::TensorList logits, at::TensorList tangents,
                                            const std::optional<at::Tensor>& target, at::IntArrayRef pairs,
                                            double temperature, bool detach_teacher, int64_t ignore_index,
                                            c10::string_view reduction) {
  Prepared p = prepare(logits, target, pairs, temperature, detach_teacher, ignore_index, reduction);
  add_tangents(p, tangents);
  const c10::cuda::CUDAGuard guard(p.keep[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t K = p.pb.K, B = p.pb.B;
  const bool has_target = p.target.defined();
  Problem pb = p.pb;
  JvpArgs ja;
  const at::Tensor tables = upload(p, pb, &ja);
  at::Tensor n_valid;
  if (has_target && p.reduction == kMean) n_valid = count_valid(p, stream);
  at::Tensor dce_rows = has_target ? at::empty({K, B}, p.acc_options) : at::Tensor();
  at::Tensor dkd_rows = at::empty({pb.P, B}, p.acc_options);
  ja.dce_rows = has_target ? dce_rows.data_ptr() : nullptr;
  ja.dkd_rows = dkd_rows.data_ptr();
  const size_t elem = c10::elementSize(p.dtype);
  const bool vec = aligned16(p.ptrs, p.strides, elem) && aligned16(p.tangent_ptrs, p.tangent_strides, elem);
  check(launch_jvp(pb, ja, vec, stream), "jvp", p);
  const double kd_scale = p.reduction == kMean ? 1.0 / static_cast<double>(B) : 1.0;
  auto [dce, dkd] = reduce(p, pb, dce_rows, dkd_rows, n_valid, kd_scale, stream);
  return {dce, dkd};
}

}  // namespace

std::string device_info() {
  int runtime = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  std::string out = "CUDA runtime " + std::to_string(runtime / 1000) + "." + std::to_string((runtime % 1000) / 10);
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the error state
    return out + "; no device visible";
  }
  for (int d = 0; d < count; ++d) {
    const int v = kernel_binary_version(d);
    out += "; device " + std::to_string(d) + ": " +
           (v > 0 ? "kernels run as sm_" + std::to_string(v) : std::string("no kernel image for this device"));
  }
  cudaGetLastError();
  return out;
}

}  // namespace hdkd_fast::cuda

TORCH_LIBRARY_IMPL(hdkd_fast, CUDA, m) {
  m.impl("losses_and_grad", &hdkd_fast::cuda::losses_and_grad_cuda);
  m.impl("jvp", &hdkd_fast::cuda::jvp_cuda);
}

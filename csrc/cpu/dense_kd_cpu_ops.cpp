// The CPU implementation of the ops (registered here for the CPU dispatch key): argument preparation
// (dense_kd_host.h), the kernel (dense_kd_cpu.h, ISA chosen at run time), the batch reduction in a
// fixed order, and the gradient buffer from the pool (grad_buffer_pool.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../dense_kd_host.h"
#include "dense_kd_cpu.h"
#include "grad_buffer_pool.h"

namespace hdkd_fast {
namespace {

int64_t count_valid_cpu(const Prepared& p) {
  int64_t n = 0;
  const int64_t* y = p.pb.target;
  for (int64_t b = 0; b < p.pb.B; ++b) n += y[b] != p.pb.ignore_index;
  return n;
}

// Sum the per-row values over the batch in a fixed order (float64 accumulation), scale, and scatter
// the pairs into the K x K matrix. "none" keeps the rows.
template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> reduce_cpu(const Prepared& p, const at::Tensor& ce_rows,
                                              const at::Tensor& kd_rows, double ce_div, double kd_scale) {
  const int64_t K = p.pb.K, B = p.pb.B, P = p.pb.P;
  const bool none = p.reduction == kNone;
  at::Tensor ce;
  if (ce_rows.defined()) {
    if (none) {
      ce = ce_rows;
    } else {
      ce = at::empty({K}, p.acc_options);
      const acc_t* r = ce_rows.data_ptr<acc_t>();
      acc_t* o = ce.data_ptr<acc_t>();
      for (int64_t k = 0; k < K; ++k) {
        double s = 0;
        for (int64_t b = 0; b < B; ++b) s += r[k * B + b];
        o[k] = static_cast<acc_t>(s / ce_div);
      }
    }
  }
  at::Tensor kd = none ? at::zeros({K, K, B}, p.acc_options) : at::zeros({K, K}, p.acc_options);
  const acc_t* r = kd_rows.data_ptr<acc_t>();
  acc_t* o = kd.data_ptr<acc_t>();
  for (int64_t q = 0; q < P; ++q) {
    const int64_t flat = p.pairs[2 * q] * K + p.pairs[2 * q + 1];
    if (none) {
      for (int64_t b = 0; b < B; ++b) o[flat * B + b] = static_cast<acc_t>(kd_scale * r[q * B + b]);
    } else {
      double s = 0;
      for (int64_t b = 0; b < B; ++b) s += r[q * B + b];
      o[flat] = static_cast<acc_t>(kd_scale * s);
    }
  }
  return {ce, kd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> losses_and_grad_cpu(
    at::TensorList logits, const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& ce_weight,
    const std::optional<at::Tensor>& kd_weight, at::IntArrayRef pairs, double temperature, bool detach_teacher,
    int64_t ignore_index, c10::string_view reduction, bool compute_grad) {
  Prepared p = prepare(logits, target, pairs, temperature, detach_teacher, ignore_index, reduction);
  const int64_t K = p.pb.K, B = p.pb.B, C = p.pb.C;
  LossArgs la;
  at::Tensor ce_w = prepare_weight(p, ce_weight, 1, "ce_weight", la.ce_w_rows);
  at::Tensor kd_w = prepare_weight(p, kd_weight, 2, "kd_weight", la.kd_w_rows);
  const bool has_target = p.target.defined();
  const int64_t n_valid = has_target ? count_valid_cpu(p) : 0;
  const double ce_div = p.reduction == kMean ? static_cast<double>(std::max<int64_t>(n_valid, 1)) : 1.0;
  la.reduction = p.reduction;
  la.r_ce = 1.0 / ce_div;
  la.r_kd = p.reduction == kMean ? 1.0 / static_cast<double>(B) : 1.0;
  la.compute_grad = compute_grad;
  la.ce_w = ce_w.defined() ? ce_w.data_ptr() : nullptr;
  la.kd_w = kd_w.defined() ? kd_w.data_ptr() : nullptr;
  at::Tensor ce_rows = has_target ? at::empty({K, B}, p.acc_options) : at::Tensor();
  at::Tensor kd_rows = at::empty({p.pb.P, B}, p.acc_options);
  at::Tensor grad = compute_grad ? cpu::pooled_empty({K, B, C}, p.keep[0].options())
                                 : at::empty({0}, p.keep[0].options());
  la.ce_rows = has_target ? ce_rows.data_ptr() : nullptr;
  la.kl_rows = kd_rows.data_ptr();
  la.grad = compute_grad ? grad.data_ptr() : nullptr;
  cpu::losses_and_grad(p.pb, la);
  const double kd_scale = temperature * temperature * la.r_kd;
  auto [ce, kd] = p.acc == at::kDouble ? reduce_cpu<double>(p, ce_rows, kd_rows, ce_div, kd_scale)
                                       : reduce_cpu<float>(p, ce_rows, kd_rows, ce_div, kd_scale);
  if (!ce.defined()) ce = at::empty({0}, p.acc_options);
  return {ce, kd, grad};
}

std::tuple<at::Tensor, at::Tensor> jvp_cpu(at::TensorList logits, at::TensorList tangents,
                                           const std::optional<at::Tensor>& target, at::IntArrayRef pairs,
                                           double temperature, bool detach_teacher, int64_t ignore_index,
                                           c10::string_view reduction) {
  Prepared p = prepare(logits, target, pairs, temperature, detach_teacher, ignore_index, reduction);
  add_tangents(p, tangents);
  const int64_t K = p.pb.K, B = p.pb.B;
  const bool has_target = p.target.defined();
  const int64_t n_valid = has_target ? count_valid_cpu(p) : 0;
  const double ce_div = p.reduction == kMean ? static_cast<double>(std::max<int64_t>(n_valid, 1)) : 1.0;
  const double kd_scale = p.reduction == kMean ? 1.0 / static_cast<double>(B) : 1.0;
  JvpArgs ja;
  ja.tangents = p.tangent_ptrs.data();
  ja.tangent_stride = p.tangent_strides.data();
  at::Tensor dce_rows = has_target ? at::empty({K, B}, p.acc_options) : at::Tensor();
  at::Tensor dkd_rows = at::empty({p.pb.P, B}, p.acc_options);
  ja.dce_rows = has_target ? dce_rows.data_ptr() : nullptr;
  ja.dkd_rows = dkd_rows.data_ptr();
  cpu::jvp(p.pb, ja);
  auto [dce, dkd] = p.acc == at::kDouble ? reduce_cpu<double>(p, dce_rows, dkd_rows, ce_div, kd_scale)
                                         : reduce_cpu<float>(p, dce_rows, dkd_rows, ce_div, kd_scale);
  if (!dce.defined()) dce = at::empty({0}, p.acc_options);
  return {dce, dkd};
}

}  // namespace
}  // namespace hdkd_fast

TORCH_LIBRARY_IMPL(hdkd_fast, CPU, m) {
  m.impl("losses_and_grad", &hdkd_fast::losses_and_grad_cpu);
  m.impl("jvp", &hdkd_fast::jvp_cpu);
}

// Host-side argument preparation shared by the CPU and CUDA implementations of the ops (declared in
// dense_kd_host.h): dtype and reduction codes, shape/device/label checks, the pointer tables of a call.
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dense_kd_host.h"

namespace hdkd_fast {

namespace {
Dtype dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kFloat: return Dtype::kFloat;
    case at::kDouble: return Dtype::kDouble;
    default: TORCH_CHECK(false, "hdkd_fast: logits must be float16, bfloat16, float32 or float64; got ", t);
  }
}

int reduction_code(c10::string_view r) {
  if (r == "mean") return kMean;
  if (r == "sum") return kSum;
  if (r == "none") return kNone;
  TORCH_CHECK(false, "hdkd_fast: reduction must be 'mean', 'sum' or 'none'; got '", std::string(r), "'");
}

// A [B, C] view whose last dimension is contiguous (row stride free).
at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}
}  // namespace

Prepared prepare(at::TensorList logits, const std::optional<at::Tensor>& target, at::IntArrayRef pairs,
                 double temperature, bool detach_teacher, int64_t ignore_index, c10::string_view reduction) {
  Prepared p;
  const int64_t K = static_cast<int64_t>(logits.size());
  TORCH_CHECK(K >= 1, "hdkd_fast: logits must hold at least one exit");
  const at::Tensor& first = logits[0];
  TORCH_CHECK(first.dim() == 2, "hdkd_fast: every exit must be a Tensor[B, C]; got ", first.sizes());
  const int64_t B = first.size(0), C = first.size(1);
  TORCH_CHECK(B >= 1 && C >= 1, "hdkd_fast: logits need B >= 1 and C >= 1");
  p.dtype = first.scalar_type();
  p.pb.dtype = dtype_code(p.dtype);
  p.acc = p.dtype == at::kDouble ? at::kDouble : at::kFloat;
  p.acc_options = first.options().dtype(p.acc);
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& x = logits[k];
    TORCH_CHECK(x.sizes() == first.sizes(), "hdkd_fast: logits[", k, "] has shape ", x.sizes(), ", logits[0] ",
                first.sizes());
    TORCH_CHECK(x.scalar_type() == p.dtype, "hdkd_fast: logits[", k, "] has dtype ", x.scalar_type());
    TORCH_CHECK(x.device() == first.device(), "hdkd_fast: logits[", k, "] is on ", x.device());
    at::Tensor xc = rows_contiguous(x);
    p.ptrs.push_back(xc.data_ptr());
    p.strides.push_back(xc.stride(0));
    p.keep.push_back(std::move(xc));
  }
  TORCH_CHECK(pairs.size() % 2 == 0, "hdkd_fast: pairs must be a flat list of (student, teacher) indices");
  for (int64_t v : pairs) {
    TORCH_CHECK(v >= 0 && v < K, "hdkd_fast: pair index ", v, " is outside [0, ", K, ")");
    p.pairs.push_back(static_cast<int32_t>(v));
  }
  for (size_t q = 0; q < pairs.size(); q += 2) {
    TORCH_CHECK(pairs[q] != pairs[q + 1], "hdkd_fast: an exit cannot distil from itself");
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "hdkd_fast: temperature must be finite and > 0");
  if (target.has_value() && target->defined()) {
    const at::Tensor& t = *target;
    TORCH_CHECK(!t.is_floating_point() && t.dim() == 1 && t.size(0) == B,
                "hdkd_fast: target must be an integer Tensor[B]");
    TORCH_CHECK(t.device() == first.device(), "hdkd_fast: target is on ", t.device(), ", logits on ",
                first.device());
    p.target = t.to(at::kLong).contiguous();
  }
  p.reduction = reduction_code(reduction);
  p.pb.K = K;
  p.pb.B = B;
  p.pb.C = C;
  p.pb.logits = p.ptrs.data();
  p.pb.row_stride = p.strides.data();
  p.pb.target = p.target.defined() ? p.target.data_ptr<int64_t>() : nullptr;
  p.pb.ignore_index = ignore_index;
  p.pb.pairs = p.pairs.data();
  p.pb.P = static_cast<int64_t>(p.pairs.size() / 2);
  p.pb.T = temperature;
  p.pb.detach_teacher = detach_teacher;
  return p;
}

void add_tangents(Prepared& p, at::TensorList tangents) {
  TORCH_CHECK(static_cast<int64_t>(tangents.size()) == p.pb.K, "hdkd_fast: need one tangent per exit");
  const std::vector<int64_t> shape{p.pb.B, p.pb.C};
  const at::Device device = p.keep[0].device();  // (p.keep grows below: no reference into it)
  for (size_t k = 0; k < tangents.size(); ++k) {
    const at::Tensor& t = tangents[k];
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "hdkd_fast: tangents[", k, "] has shape ", t.sizes());
    TORCH_CHECK(t.device() == device, "hdkd_fast: tangents[", k, "] is on ", t.device());
    at::Tensor tc = rows_contiguous(t.to(p.dtype));
    p.tangent_ptrs.push_back(tc.data_ptr());
    p.tangent_strides.push_back(tc.stride(0));
    p.keep.push_back(std::move(tc));
  }
}

at::Tensor prepare_weight(const Prepared& p, const std::optional<at::Tensor>& w, int64_t dims, const char* name,
                          bool& rows) {
  rows = false;
  if (!w.has_value() || !w->defined()) return at::Tensor();
  const int64_t K = p.pb.K, B = p.pb.B;
  std::vector<int64_t> shape(dims, K);
  std::vector<int64_t> shape_rows = shape;
  shape_rows.push_back(B);
  rows = w->sizes() == at::IntArrayRef(shape_rows) && w->sizes() != at::IntArrayRef(shape);
  TORCH_CHECK(rows || w->sizes() == at::IntArrayRef(shape), "hdkd_fast: ", name, " must have shape ", shape,
              " or ", shape_rows, "; got ", w->sizes());
  TORCH_CHECK(w->device() == p.keep[0].device(), "hdkd_fast: ", name, " is on ", w->device());
  return w->to(p.acc).contiguous();
}

}  // namespace hdkd_fast

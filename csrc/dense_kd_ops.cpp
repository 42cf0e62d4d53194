// The op schemas (TORCH_LIBRARY hdkd_fast), their CPU implementation, and the Python module
// hdkd_fast._C (build information). The CUDA implementation is registered by
// cuda/dense_kd_cuda.cpp when the extension is built with CUDA.
#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <cmath>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/dense_kd_cpu.h"
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

namespace {

// A two-slot pool for the CPU gradient buffers ([K, B, C], written in full by the kernel, so never
// zeroed). A training loop frees the previous step's gradient before (or while) the next one is
// made; handing its memory back out skips the ~2000 page faults of a fresh 8 MB buffer that the C
// allocator returns when it has trimmed the heap in between. The buffers go back to the pool only
// when the tensor and every view of its storage are gone (the storage's deleter), so a live tensor
// is never reused. At most kSlots buffers are kept, and only sizes in [kMinBytes, kMaxBytes]. (Like
// any from_blob tensor, such a gradient cannot be resize_()d beyond its size.)
class GradBufferPool {
 public:
  static GradBufferPool& instance() {
    static auto* pool = new GradBufferPool();  // never destroyed: tensors may outlive static destructors
    return *pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
    if (bytes < kMinBytes || bytes > kMaxBytes) return at::empty(sizes, options);
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second == bytes) {
          ptr = it->first;
          free_.erase(it);
          break;
        }
      }
    }
    if (ptr == nullptr) ptr = c10::alloc_cpu(bytes);
    try {
      return at::from_blob(ptr, sizes, [bytes](void* q) { GradBufferPool::instance().give_back(q, bytes); },
                           options);
    } catch (...) {
      c10::free_cpu(ptr);
      throw;
    }
  }

 private:
  static constexpr size_t kSlots = 2;
  static constexpr size_t kMinBytes = size_t(1) << 20;
  static constexpr size_t kMaxBytes = size_t(1) << 30;

  void give_back(void* ptr, size_t bytes) {
    std::pair<void*, size_t> evicted{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.emplace_back(ptr, bytes);
      if (free_.size() > kSlots) {  // drop the oldest
        evicted = free_.front();
        free_.erase(free_.begin());
      }
    }
    if (evicted.first != nullptr) c10::free_cpu(evicted.first);
  }

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> free_;
};

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
  at::Tensor grad = compute_grad ? GradBufferPool::instance().empty({K, B, C}, p.keep[0].options())
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

TORCH_LIBRARY(hdkd_fast, m) {
  m.def(
      "losses_and_grad(Tensor[] logits, Tensor? target, Tensor? ce_weight, Tensor? kd_weight, int[] pairs, "
      "float temperature, bool detach_teacher, int ignore_index, str reduction, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "jvp(Tensor[] logits, Tensor[] tangents, Tensor? target, int[] pairs, float temperature, "
      "bool detach_teacher, int ignore_index, str reduction) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hdkd_fast, CPU, m) {
  m.impl("losses_and_grad", &hdkd_fast::losses_and_grad_cpu);
  m.impl("jvp", &hdkd_fast::jvp_cpu);
}

#define HDKD_XSTR(x) #x
#define HDKD_STR(x) HDKD_XSTR(x)

#ifdef HDKD_WITH_CUDA
namespace hdkd_fast::cuda {
std::string device_info();
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hdkd_fast._C: fused dense-KD kernels (ops registered as torch.ops.hdkd_fast.*)";
  m.def("cpu_capability", []() { return std::string(hdkd_fast::cpu::capability()); },
        "The CPU instruction-set variant in use (DEFAULT, AVX2 or AVX512)");
  m.def("compiled_cpu_capabilities", &hdkd_fast::cpu::compiled_capabilities,
        "Every CPU instruction-set variant compiled into this build");
  m.def("requested_cpu_capability", &hdkd_fast::cpu::requested_capability,
        "PyTorch's CPU capability (ATEN_CPU_CAPABILITY when set, else what the CPU supports)");
  m.def("supported_cpu_capability", &hdkd_fast::cpu::cpu_supported_capability,
        "The best instruction-set variant this CPU can run (CPUID)");
  m.def("choose_cpu_capability", &hdkd_fast::cpu::choose_capability, "The variant run for a request and a CPU",
        pybind11::arg("requested"), pybind11::arg("supported"));
#ifdef HDKD_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_info", &hdkd_fast::cuda::device_info, "CUDA build information");
#else
  m.attr("with_cuda") = false;
#endif
#ifdef HDKD_CUDA_ARCHS  // e.g. 80_90 (setup.py: TORCH_CUDA_ARCH_LIST without dots, '_'-joined)
  m.attr("cuda_archs") = std::string(HDKD_STR(HDKD_CUDA_ARCHS));
#else
  m.attr("cuda_archs") = std::string();
#endif
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}

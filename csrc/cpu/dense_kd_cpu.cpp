// Run-time choice among the instruction-set variants of dense_kd_cpu_kernel.cpp that setup.py
// compiled (HDKD_HAVE_AVX2 / HDKD_HAVE_AVX512), following PyTorch's own choice
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY=default|avx2|avx512).
#include "dense_kd_cpu.h"

#include <ATen/Version.h>

#include <string>

namespace hdkd_fast::cpu {

#define HDKD_DECLARE_VARIANT(cap)                              \
  namespace cap {                                              \
  void losses_and_grad(const Problem& pb, const LossArgs& la); \
  void jvp(const Problem& pb, const JvpArgs& ja);              \
  }
HDKD_DECLARE_VARIANT(DEFAULT)
#ifdef HDKD_HAVE_AVX2
HDKD_DECLARE_VARIANT(AVX2)
#endif
#ifdef HDKD_HAVE_AVX512
HDKD_DECLARE_VARIANT(AVX512)
#endif
#undef HDKD_DECLARE_VARIANT

namespace {
struct Variant {
  const char* name;
  void (*losses_and_grad)(const Problem&, const LossArgs&);
  void (*jvp)(const Problem&, const JvpArgs&);
};

Variant choose() {
  const std::string torch_cap = at::get_cpu_capability();
#ifdef HDKD_HAVE_AVX512
  if (torch_cap == "AVX512") return {"AVX512", &AVX512::losses_and_grad, &AVX512::jvp};
#endif
#ifdef HDKD_HAVE_AVX2
  if (torch_cap == "AVX512" || torch_cap == "AVX2") return {"AVX2", &AVX2::losses_and_grad, &AVX2::jvp};
#endif
  return {"DEFAULT", &DEFAULT::losses_and_grad, &DEFAULT::jvp};
}

const Variant& variant() {
  static const Variant v = choose();
  return v;
}
}  // namespace

const char* capability() { return variant().name; }

std::vector<std::string> compiled_capabilities() {
  std::vector<std::string> out{"DEFAULT"};
#ifdef HDKD_HAVE_AVX2
  out.emplace_back("AVX2");
#endif
#ifdef HDKD_HAVE_AVX512
  out.emplace_back("AVX512");
#endif
  return out;
}

void losses_and_grad(const Problem& pb, const LossArgs& la) { variant().losses_and_grad(pb, la); }
void jvp(const Problem& pb, const JvpArgs& ja) { variant().jvp(pb, ja); }

}  // namespace hdkd_fast::cpu

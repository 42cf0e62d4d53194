// Run-time choice among the instruction-set variants of dense_kd_cpu_kernel.cpp that were compiled
// (HDKD_HAVE_AVX2 / HDKD_HAVE_AVX512). It follows PyTorch's own choice (at::get_cpu_capability(), which
// honours ATEN_CPU_CAPABILITY=default|avx2|avx512) but never goes above what the CPU reports through
// CPUID: PyTorch trusts ATEN_CPU_CAPABILITY blindly, and an AVX-512 request on an AVX2-only CPU would
// otherwise die of SIGILL inside this kernel.
#include "dense_kd_cpu.h"

#include <ATen/Version.h>

#include <algorithm>
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

int rank(const std::string& cap) { return cap == "AVX512" ? 2 : cap == "AVX2" ? 1 : 0; }

Variant variant_named(const std::string& name) {
#ifdef HDKD_HAVE_AVX512
  if (name == "AVX512") return {"AVX512", &AVX512::losses_and_grad, &AVX512::jvp};
#endif
#ifdef HDKD_HAVE_AVX2
  if (name == "AVX2") return {"AVX2", &AVX2::losses_and_grad, &AVX2::jvp};
#endif
  return {"DEFAULT", &DEFAULT::losses_and_grad, &DEFAULT::jvp};
}

const Variant& variant() {
  static const Variant v = variant_named(choose_capability(requested_capability(), cpu_supported_capability()));
  return v;
}
}  // namespace

std::string requested_capability() { return at::get_cpu_capability(); }

std::string cpu_supported_capability() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  // The flags the variants are compiled with (setup: hdkd_fast/_ext_spec.py ISA_VARIANTS).
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? "AVX512" : avx2 ? "AVX2" : "DEFAULT";
#else
  return "DEFAULT";
#endif
}

std::string choose_capability(const std::string& requested, const std::string& supported) {
  // The highest compiled variant at or below both the request and what the CPU supports.
  const int limit = std::min(rank(requested), rank(supported));
  std::string best = "DEFAULT";
  for (const std::string& name : compiled_capabilities()) {
    if (rank(name) <= limit && rank(name) > rank(best)) best = name;
  }
  return best;
}

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

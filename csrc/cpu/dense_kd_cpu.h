// CPU entry points of the fused dense-KD op (dispatching to the best compiled ISA variant).
#pragma once

#include <string>
#include <vector>

#include "../dense_kd_args.h"

namespace hdkd_fast::cpu {

void losses_and_grad(const Problem& pb, const LossArgs& la);
void jvp(const Problem& pb, const JvpArgs& ja);
const char* capability();                          // the variant in use: DEFAULT, AVX2 or AVX512
std::vector<std::string> compiled_capabilities();  // every variant in this build
std::string requested_capability();                // PyTorch's choice (ATEN_CPU_CAPABILITY or CPUID)
std::string cpu_supported_capability();            // the best variant this CPU can run (CPUID)
// The variant run for a request and a CPU: the highest compiled one at or below both.
std::string choose_capability(const std::string& requested, const std::string& supported);

}  // namespace hdkd_fast::cpu

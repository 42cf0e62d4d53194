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

}  // namespace hdkd_fast::cpu

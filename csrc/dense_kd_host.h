// Host-side argument handling shared by the CPU and CUDA registrations of the op (torch headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

#include "dense_kd_args.h"

namespace hdkd_fast {

// Checked, normalized arguments of one call: the tensors are kept alive here and pb points into
// the host tables below (the CUDA binding copies the tables to the device).
struct Prepared {
  std::vector<at::Tensor> keep;
  std::vector<const void*> ptrs, tangent_ptrs;
  std::vector<int64_t> strides, tangent_strides;
  std::vector<int32_t> pairs;
  at::Tensor target;  // int64, contiguous; undefined without labels
  at::ScalarType dtype = at::kFloat, acc = at::kFloat;
  at::TensorOptions acc_options;
  int reduction = kMean;
  Problem pb;
};

Prepared prepare(at::TensorList logits, const std::optional<at::Tensor>& target, at::IntArrayRef pairs,
                 double temperature, bool detach_teacher, int64_t ignore_index, c10::string_view reduction);
void add_tangents(Prepared& p, at::TensorList tangents);
// ce_weight ([K] / [K, B]) or kd_weight ([K, K] / [K, K, B]) in the accumulation dtype, contiguous;
// undefined when absent. `rows` tells whether it is per row.
at::Tensor prepare_weight(const Prepared& p, const std::optional<at::Tensor>& w, int64_t dims, const char* name,
                          bool& rows);

}  // namespace hdkd_fast

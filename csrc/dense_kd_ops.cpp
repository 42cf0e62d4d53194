// The op schemas (TORCH_LIBRARY hdkd_fast) and the Python module hdkd_fast._C (build information).
// The implementations register themselves per dispatch key: cpu/dense_kd_cpu_ops.cpp (CPU) and
// cuda/dense_kd_cuda.cpp (CUDA, when the extension is built with CUDA).
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "cpu/dense_kd_cpu.h"

TORCH_LIBRARY(hdkd_fast, m) {
  m.def(
      "losses_and_grad(Tensor[] logits, Tensor? target, Tensor? ce_weight, Tensor? kd_weight, int[] pairs, "
      "float temperature, bool detach_teacher, int ignore_index, str reduction, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "jvp(Tensor[] logits, Tensor[] tangents, Tensor? target, int[] pairs, float temperature, "
      "bool detach_teacher, int ignore_index, str reduction) -> (Tensor, Tensor)");
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

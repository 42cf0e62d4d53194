// The portable (DEFAULT) variant of the CPU kernel; setup.py compiles dense_kd_cpu_kernel.cpp again
// with -mavx2 / -mavx512* for the AVX2 / AVX512 variants on x86-64.
#define CPU_CAPABILITY DEFAULT
#include "dense_kd_cpu_kernel.cpp"  // NOLINT(bugprone-suspicious-include)

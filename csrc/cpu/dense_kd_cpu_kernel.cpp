// Fused dense-KD CPU kernel. This file is compiled once per instruction set (DEFAULT, AVX2,
// AVX512 on x86-64; see setup.py) with CPU_CAPABILITY naming the variant, like PyTorch's own
// kernels; dense_kd_cpu.cpp picks the variant at run time.
//
// Work split: at::parallel_for over rows (one contiguous range per thread); each row is
// independent and writes its own per-row losses (reduced afterwards in a fixed order, so results
// do not depend on the thread count) and its own gradient rows.
//
// losses_and_grad, per row, three sweeps over the K exits (u_k = z_k - max z_k, e_k = exp(u_k / T)):
//   1. the max of every exit: the row's read of the logits from memory (with a gradient, it is
//      folded into the previous row's sweep 3);
//   2. per column block (a block of u and e of every exit stays in L1): u and e, the sums at T and
//      at 1 (e^T for an integer T: one exp per logit serves both temperatures), and the block's
//      share of every dot product X_ij = <e_j, u_i> that the pair KLs need (vector accumulators
//      carried across blocks); e is kept for the whole row (the gradient needs the sums first);
//   3. per column block: every exit's gradient, written exactly once, from the L1-resident block of
//      the e rows: a weighted sum of them (for dense pairs with a weight per student, e.g. a scalar
//      kd_weight, through suffix sums instead), + the CE term, + the teacher term when
//      detach_teacher=False.
// All scratch is 64-byte aligned (unaligned 512-bit loads cost two cache accesses). The exp is a
// short polynomial with 1/T folded into its constants (ExpDiv): sweep 2 is arithmetic-bound.
//
// Masked classes (-inf logits; also finite ones so far below the max that u = z - max overflows):
// u = -inf and e = 0 there, so e_j u_i = 0 · (-inf) = NaN in a dot product where the convention is
// 0 · log 0 = 0 (a class of probability 0 adds nothing). The hot loops do not test for it: a row whose
// dot products come out non-finite is swept again with masked products (MASKED: 0 where e_j = 0),
// and its teacher term masked the same way. A -inf dot product that remains is a true +inf KL (the
// teacher puts mass on a class at -inf in the student); an exit with every class at -inf has no
// softmax (m = -inf, u = NaN) and gives NaN.
//
// jvp: per row, the softmax pass into a whole-row scratch, then dot products with the tangents.
#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must name the instruction-set variant (DEFAULT, AVX2, AVX512)"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "../dense_kd_args.h"

namespace hdkd_fast::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename acc_t>
constexpr int64_t kV = Vec<acc_t>::size();

// Sum of the lanes (a fixed shuffle tree).
template <typename acc_t>
inline acc_t hsum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const Vec<acc_t>& a, const Vec<acc_t>& b) { return a + b; }, v);
}

// ---- exp ----------------------------------------------------------------------------------------
//
// ExpDiv(T)(u) = exp(u / T) per lane, for the kernel's u = z - max <= 0 (-inf gives 0, NaN stays
// NaN). The float AVX512 / AVX2 versions fold 1/T into the constants: n = round(u log2(e) / T),
// r = u - n T ln2 (T ln2 split in a 12-bit head, so n * head is exact, and a tail), and
// exp(u / T) = 2^n p(r) with p the degree-5 minimax polynomial of e^(r/T) (relative error
// 8e-8, 1.3 * 2^-24, on |r / T| <= 1.01 ln2 / 2). Measured against exp(u / T) in double, for
// u / T in [-69, 0] and T from 0.1 to 100: <= 3 ulp (at::vec's exp_u20 of the rounded u * (1/T):
// 4 ulp for a power-of-two T, up to 90 otherwise). 11 vector operations per exp, against 16.
// 2^n: AVX512's scalef (gradual underflow to 0); AVX2 builds it in the exponent bits and flushes
// results below FLT_MIN to 0. Other types / instruction sets: at::vec's exp of u * (1/T).
constexpr double kExpPoly[6] = {1.000000075987787011, 0.99999967311906468291, 0.4999885043547887852,
                                0.16667611508324577545, 0.041920350060956946712, 0.0082969393842151956073};

template <typename acc_t>
struct ExpDiv {
  Vec<acc_t> invT;
  explicit ExpDiv(double T) : invT(acc_t(1) / static_cast<acc_t>(T)) {}
  Vec<acc_t> operator()(const Vec<acc_t>& u) const {
    const Vec<acc_t> x = u * invT;
    if constexpr (std::is_same_v<acc_t, float>) {
      return x.exp_u20();
    } else {
      return x.exp();
    }
  }
};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
struct ExpDivConsts {
  float k, hi, lo, umin, c[6];
  explicit ExpDivConsts(double T, double umin_over_T) {
    const double v = T * 0.693147180559945309417232121458;  // T ln2
    int e = 0;
    std::frexp(v, &e);
    const double q = std::ldexp(1.0, e - 12);  // 12 significant bits in the head
    const double h = std::nearbyint(v / q) * q;
    k = static_cast<float>(1.4426950408889634074 / T);
    hi = static_cast<float>(h);
    lo = static_cast<float>(v - h);
    umin = static_cast<float>(std::max(umin_over_T * T, -static_cast<double>(std::numeric_limits<float>::max())));
    double tk = 1;
    for (int i = 0; i < 6; ++i, tk *= T) c[i] = static_cast<float>(kExpPoly[i] / tk);
  }
};
#endif

#if defined(CPU_CAPABILITY_AVX512)
template <>
struct ExpDiv<float> {
  __m512 k, hi, lo, umin, c0, c1, c2, c3, c4, c5;
  explicit ExpDiv(double T) {
    const ExpDivConsts s(T, -104.0);  // exp(-104) is below the smallest denormal
    k = _mm512_set1_ps(s.k);
    hi = _mm512_set1_ps(s.hi);
    lo = _mm512_set1_ps(s.lo);
    umin = _mm512_set1_ps(s.umin);
    c0 = _mm512_set1_ps(s.c[0]);
    c1 = _mm512_set1_ps(s.c[1]);
    c2 = _mm512_set1_ps(s.c[2]);
    c3 = _mm512_set1_ps(s.c[3]);
    c4 = _mm512_set1_ps(s.c[4]);
    c5 = _mm512_set1_ps(s.c[5]);
  }
  Vec<float> operator()(const Vec<float>& u) const {
    const __m512 x = _mm512_max_ps(umin, u);  // -inf -> umin; NaN (second operand) stays NaN
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, hi, x);
    r = _mm512_fnmadd_ps(n, lo, r);
    __m512 p = _mm512_fmadd_ps(c5, r, c4);
    p = _mm512_fmadd_ps(p, r, c3);
    p = _mm512_fmadd_ps(p, r, c2);
    p = _mm512_fmadd_ps(p, r, c1);
    p = _mm512_fmadd_ps(p, r, c0);
    return _mm512_scalef_ps(p, n);
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
template <>
struct ExpDiv<float> {
  __m256 k, hi, lo, umin, c0, c1, c2, c3, c4, c5;
  explicit ExpDiv(double T) {
    const ExpDivConsts s(T, -87.33654475055310898657);  // ln(FLT_MIN): below, the result is 0
    k = _mm256_set1_ps(s.k);
    hi = _mm256_set1_ps(s.hi);
    lo = _mm256_set1_ps(s.lo);
    umin = _mm256_set1_ps(s.umin);
    c0 = _mm256_set1_ps(s.c[0]);
    c1 = _mm256_set1_ps(s.c[1]);
    c2 = _mm256_set1_ps(s.c[2]);
    c3 = _mm256_set1_ps(s.c[3]);
    c4 = _mm256_set1_ps(s.c[4]);
    c5 = _mm256_set1_ps(s.c[5]);
  }
  Vec<float> operator()(const Vec<float>& u) const {
    const __m256 x = _mm256_max_ps(umin, u);  // NaN (second operand) stays NaN
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, hi, x);
    r = _mm256_fnmadd_ps(n, lo, r);
    __m256 p = _mm256_fmadd_ps(c5, r, c4);
    p = _mm256_fmadd_ps(p, r, c3);
    p = _mm256_fmadd_ps(p, r, c2);
    p = _mm256_fmadd_ps(p, r, c1);
    p = _mm256_fmadd_ps(p, r, c0);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(_mm256_cmp_ps(u, umin, _CMP_LT_OQ), res);  // below ln(FLT_MIN) T: 0
  }
};
#endif

// e^n for a small positive integer n (n >= 1).
template <typename acc_t>
inline Vec<acc_t> ipow(const Vec<acc_t>& e, int n) {
  switch (n) {
    case 1: return e;
    case 2: return e * e;
    case 3: return e * e * e;
    case 4: { auto e2 = e * e; return e2 * e2; }
    default: {
      Vec<acc_t> r(acc_t(1)), b = e;
      while (n) {
        if (n & 1) r = r * b;
        b = b * b;
        n >>= 1;
      }
      return r;
    }
  }
}

// e^TP for a compile-time power TP >= 1.
template <int TP, typename acc_t>
inline Vec<acc_t> cpow(const Vec<acc_t>& e) {
  if constexpr (TP == 1) {
    return e;
  } else if constexpr (TP % 2 == 0) {
    const Vec<acc_t> h = cpow<TP / 2>(e);
    return h * h;
  } else {
    return cpow<TP - 1>(e) * e;
  }
}

template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t C, int64_t Cp) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, C * sizeof(acc_t));
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<acc_t>(src[c]);
  }
  std::fill(dst + C, dst + Cp, acc_t(0));
}

template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t C) {
  constexpr int64_t V = kV<acc_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t c = 0;
  if (C >= V) {
    Vec<acc_t> vm = Vec<acc_t>::loadu(x);
    for (c = V; c + V <= C; c += V) vm = at::vec::maximum(vm, Vec<acc_t>::loadu(x + c));
    alignas(64) acc_t lanes[V];
    vm.store(lanes);
    for (int64_t i = 0; i < V; ++i) m = std::max(m, lanes[i]);
  }
  for (; c < C; ++c) m = std::max(m, x[c]);
  return m;
}

// acc + a * b, except acc where a = 0 (MASKED: 0 · b = 0 even for b = -inf, see the top of the file).
template <bool MASKED, typename acc_t>
inline Vec<acc_t> mul_add(const Vec<acc_t>& a, const Vec<acc_t>& b, const Vec<acc_t>& acc) {
  if constexpr (MASKED) {
    const Vec<acc_t> zero(acc_t(0));
    return acc + Vec<acc_t>::blendv(a * b, zero, a == zero);
  } else {
    return at::vec::fmadd(a, b, acc);
  }
}

template <typename acc_t>
inline bool all_finite(const acc_t* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(v[i])) return false;
  }
  return true;
}

// ---- jvp helpers --------------------------------------------------------------------------------

// out[n] = <a, b[n]> over Cp (a multiple of the vector width) for N rows b at once; two column
// vectors per step so that even N = 1 has independent accumulator chains.
template <int N, bool MASKED, typename acc_t>
inline void dots_n(const acc_t* a, const acc_t* const* b, int64_t Cp, acc_t* out) {
  constexpr int64_t V = kV<acc_t>;
  Vec<acc_t> acc0[N], acc1[N];
  for (int n = 0; n < N; ++n) acc0[n] = acc1[n] = Vec<acc_t>(acc_t(0));
  int64_t c = 0;
  for (; c + 2 * V <= Cp; c += 2 * V) {
    const Vec<acc_t> x0 = Vec<acc_t>::loadu(a + c), x1 = Vec<acc_t>::loadu(a + c + V);
    for (int n = 0; n < N; ++n) {
      acc0[n] = mul_add<MASKED>(x0, Vec<acc_t>::loadu(b[n] + c), acc0[n]);
      acc1[n] = mul_add<MASKED>(x1, Vec<acc_t>::loadu(b[n] + c + V), acc1[n]);
    }
  }
  if (c < Cp) {
    const Vec<acc_t> x0 = Vec<acc_t>::loadu(a + c);
    for (int n = 0; n < N; ++n) acc0[n] = mul_add<MASKED>(x0, Vec<acc_t>::loadu(b[n] + c), acc0[n]);
  }
  for (int n = 0; n < N; ++n) out[n] = hsum(acc0[n] + acc1[n]);
}

template <bool MASKED = false, typename acc_t>
inline void dots(const acc_t* a, const acc_t* const* b, int64_t n, int64_t Cp, acc_t* out) {
  for (int64_t s = 0; s < n; s += 6) {
    switch (std::min<int64_t>(6, n - s)) {
      case 1: dots_n<1, MASKED>(a, b + s, Cp, out + s); break;
      case 2: dots_n<2, MASKED>(a, b + s, Cp, out + s); break;
      case 3: dots_n<3, MASKED>(a, b + s, Cp, out + s); break;
      case 4: dots_n<4, MASKED>(a, b + s, Cp, out + s); break;
      case 5: dots_n<5, MASKED>(a, b + s, Cp, out + s); break;
      default: dots_n<6, MASKED>(a, b + s, Cp, out + s); break;
    }
  }
}

// dots(a, b) of a probability-weighted row a (0 where p = 0) with rows b that may hold -inf (u at a
// masked class): redone with masked products where they came out non-finite.
template <typename acc_t>
inline void dots_zero_log_zero(const acc_t* a, const acc_t* const* b, int64_t n, int64_t Cp, acc_t* out) {
  dots(a, b, n, Cp, out);
  if (!all_finite(out, n)) dots<true>(a, b, n, Cp, out);
}

// <e^n, b> (or <e1, b> when e1 is given).
template <typename acc_t>
inline acc_t dot_pow(const acc_t* e, const acc_t* e1, int tpow, const acc_t* b, int64_t Cp) {
  constexpr int64_t V = kV<acc_t>;
  Vec<acc_t> acc(acc_t(0));
  for (int64_t c = 0; c < Cp; c += V) {
    const Vec<acc_t> q = e1 ? Vec<acc_t>::loadu(e1 + c) : ipow(Vec<acc_t>::loadu(e + c), tpow);
    acc = at::vec::fmadd(q, Vec<acc_t>::loadu(b + c), acc);
  }
  return hsum(acc);
}

// Per-thread scratch of the jvp: K zero-padded rows of u, e, (exp(u) for non-integer T),
// tangents, and small per-row tables.
template <typename acc_t>
struct Scratch {
  int64_t K, Cp;
  std::vector<acc_t> U, E, E1, DZ, tmp;
  std::vector<acc_t> lnsT, sT, lns1, s1;
  std::vector<acc_t> vals;
  std::vector<const acc_t*> ptrs;
  std::vector<int64_t> idx;
  Scratch(int64_t K_, int64_t C, bool e1, bool dz) : K(K_) {
    constexpr int64_t V = kV<acc_t>;
    Cp = (C + V - 1) / V * V;
    U.resize(K * Cp + V);
    E.resize(K * Cp + V);
    if (e1) E1.resize(K * Cp + V);
    if (dz) DZ.resize(K * Cp + V);
    tmp.resize(Cp + V);
    lnsT.resize(K); sT.resize(K); lns1.resize(K); s1.resize(K);
    vals.resize(2 * K * K + 2 * K);
    ptrs.resize(2 * K + 2);
    idx.resize(2 * K + 2);
  }
  acc_t* u(int64_t k) { return U.data() + k * Cp; }
  acc_t* e(int64_t k) { return E.data() + k * Cp; }
  acc_t* e1(int64_t k) { return E1.empty() ? nullptr : E1.data() + k * Cp; }
  acc_t* dz(int64_t k) { return DZ.data() + k * Cp; }
};

// The softmax pass of the jvp for one row: u, e (and exp(u) when stored), the log-sums.
template <typename scalar_t, typename acc_t>
inline void softmax_pass(const Problem& pb, int64_t b, Scratch<acc_t>& s, bool want_s1, int tpow,
                         const ExpDiv<acc_t>& expT, const ExpDiv<acc_t>& exp1) {
  constexpr int64_t V = kV<acc_t>;
  const int64_t K = pb.K, C = pb.C, Cp = s.Cp;
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* z = static_cast<const scalar_t*>(pb.logits[k]) + b * pb.row_stride[k];
    acc_t* U = s.u(k);
    acc_t* E = s.e(k);
    acc_t* E1 = s.e1(k);
    // Same-type input is read in place (its tail vector with a partial load); reduced-precision
    // input is converted into U first.
    const acc_t* src;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      src = z;
    } else {
      load_row<scalar_t, acc_t>(z, U, C, Cp);
      src = U;
    }
    const acc_t m = row_max(src, C);
    const Vec<acc_t> vm(m), zero(acc_t(0));
    Vec<acc_t> aT(acc_t(0)), a1(acc_t(0));
    for (int64_t c = 0; c < Cp; c += V) {
      const Vec<acc_t> x = c + V <= C ? Vec<acc_t>::loadu(src + c) : Vec<acc_t>::loadu(src + c, static_cast<int>(C - c));
      Vec<acc_t> u = x - vm;
      Vec<acc_t> e = expT(u);
      if (c + V > C) {  // the padded tail: u = e = 0
        u = Vec<acc_t>::set(zero, u, C - c);
        e = Vec<acc_t>::set(zero, e, C - c);
      }
      u.store(U + c);
      e.store(E + c);
      aT = aT + e;
      if (want_s1) {
        Vec<acc_t> e1;
        if (tpow) {
          e1 = ipow(e, tpow);
        } else {
          e1 = exp1(u);
          if (c + V > C) e1 = Vec<acc_t>::set(zero, e1, C - c);
        }
        if (E1) e1.store(E1 + c);
        a1 = a1 + e1;
      }
    }
    s.sT[k] = hsum(aT);
    s.lnsT[k] = std::log(s.sT[k]);
    if (want_s1) {
      s.s1[k] = hsum(a1);
      s.lns1[k] = std::log(s.s1[k]);
    }
  }
}

// KL of every selected pair of the row, into kl[p] (teachers grouped: one e_j load per column for
// all of teacher j's students and for X_jj).
template <typename acc_t>
inline void pair_kl(const Problem& pb, Scratch<acc_t>& s, acc_t* kl) {
  const int64_t K = pb.K, P = pb.P;
  const acc_t T = static_cast<acc_t>(pb.T);
  acc_t* x = s.vals.data();
  for (int64_t j = 0; j < K; ++j) {
    int64_t n = 0;
    for (int64_t p = 0; p < P; ++p) {
      if (pb.pairs[2 * p + 1] == j) {
        s.idx[n] = p;
        s.ptrs[n++] = s.u(pb.pairs[2 * p]);
      }
    }
    if (n == 0) continue;
    s.ptrs[n] = s.u(j);
    dots_zero_log_zero(s.e(j), s.ptrs.data(), n + 1, s.Cp, x);
    const acc_t xjj = x[n];
    for (int64_t t = 0; t < n; ++t) {
      const int64_t i = pb.pairs[2 * s.idx[t]];
      kl[s.idx[t]] = (xjj - x[t]) / (T * s.sT[j]) - s.lnsT[j] + s.lnsT[i];
    }
  }
}

// ---- losses_and_grad -------------------------------------------------------------------------------

// The selected pairs grouped by teacher with the slots of their dot products, and each student's
// gradient terms (row-independent; built once per call).
struct PairPlan {
  std::vector<int64_t> begin;    // [K + 1]: teacher j's entries are [begin[j], begin[j + 1])
  std::vector<int64_t> student;  // per entry
  std::vector<int64_t> pair;     // per entry
  std::vector<int64_t> slot;     // [K]: first dot slot of teacher j (its students, then X_jj); -1: none
  int64_t nslots = 0;
  std::vector<int64_t> tbegin;   // [K + 1]: student i's teacher terms are [tbegin[i], tbegin[i + 1])
  std::vector<int64_t> tpair;    // per term: the pair
  explicit PairPlan(const Problem& pb) : begin(pb.K + 1, 0), slot(pb.K, -1), tbegin(pb.K + 1, 0) {
    for (int64_t j = 0; j < pb.K; ++j) {
      begin[j] = static_cast<int64_t>(student.size());
      for (int64_t p = 0; p < pb.P; ++p) {
        if (pb.pairs[2 * p + 1] == j) {
          student.push_back(pb.pairs[2 * p]);
          pair.push_back(p);
        }
      }
      const int64_t n = static_cast<int64_t>(student.size()) - begin[j];
      if (n > 0) {
        slot[j] = nslots;
        nslots += n + 1;
      }
    }
    begin[pb.K] = static_cast<int64_t>(student.size());
    for (int64_t i = 0; i < pb.K; ++i) {
      tbegin[i] = static_cast<int64_t>(tpair.size());
      for (int64_t p = 0; p < pb.P; ++p) {
        if (pb.pairs[2 * p] == i) tpair.push_back(p);
      }
    }
    tbegin[pb.K] = static_cast<int64_t>(tpair.size());
  }
};

// acc[n] += <a, b[n]> over len (a multiple of the vector width) columns; acc holds two vector
// accumulators per product (even / odd column vectors), carried across calls.
template <int N, bool MASKED, typename acc_t>
inline void dots_acc_n(const acc_t* a, const acc_t* const* b, int64_t len, acc_t* acc) {
  constexpr int64_t V = kV<acc_t>;
  Vec<acc_t> acc0[N], acc1[N];
  for (int n = 0; n < N; ++n) {
    acc0[n] = Vec<acc_t>::loadu(acc + 2 * n * V);
    acc1[n] = Vec<acc_t>::loadu(acc + (2 * n + 1) * V);
  }
  int64_t c = 0;
  for (; c + 2 * V <= len; c += 2 * V) {
    const Vec<acc_t> x0 = Vec<acc_t>::loadu(a + c), x1 = Vec<acc_t>::loadu(a + c + V);
    for (int n = 0; n < N; ++n) {
      acc0[n] = mul_add<MASKED>(x0, Vec<acc_t>::loadu(b[n] + c), acc0[n]);
      acc1[n] = mul_add<MASKED>(x1, Vec<acc_t>::loadu(b[n] + c + V), acc1[n]);
    }
  }
  if (c < len) {
    const Vec<acc_t> x0 = Vec<acc_t>::loadu(a + c);
    for (int n = 0; n < N; ++n) acc0[n] = mul_add<MASKED>(x0, Vec<acc_t>::loadu(b[n] + c), acc0[n]);
  }
  for (int n = 0; n < N; ++n) {
    acc0[n].store(acc + 2 * n * V);
    acc1[n].store(acc + (2 * n + 1) * V);
  }
}

template <bool MASKED, typename acc_t>
inline void dots_acc(const acc_t* a, const acc_t* const* b, int64_t n, int64_t len, acc_t* acc) {
  constexpr int64_t V = kV<acc_t>;
  for (int64_t s = 0; s < n; s += 8) {
    acc_t* o = acc + 2 * s * V;
    switch (std::min<int64_t>(8, n - s)) {
      case 1: dots_acc_n<1, MASKED>(a, b + s, len, o); break;
      case 2: dots_acc_n<2, MASKED>(a, b + s, len, o); break;
      case 3: dots_acc_n<3, MASKED>(a, b + s, len, o); break;
      case 4: dots_acc_n<4, MASKED>(a, b + s, len, o); break;
      case 5: dots_acc_n<5, MASKED>(a, b + s, len, o); break;
      case 6: dots_acc_n<6, MASKED>(a, b + s, len, o); break;
      case 7: dots_acc_n<7, MASKED>(a, b + s, len, o); break;
      default: dots_acc_n<8, MASKED>(a, b + s, len, o); break;
    }
  }
}

// Column-block width: a multiple of 4 vectors, with a block of u and e of every exit within ~24 KB.
template <typename acc_t>
inline int64_t column_block(int64_t K, int64_t Cp) {
  constexpr int64_t V = kV<acc_t>;
  const int64_t budget = (24 * 1024) / (2 * K * static_cast<int64_t>(sizeof(acc_t)));
  const int64_t cb = std::max<int64_t>(4 * V, budget / (4 * V) * (4 * V));
  return std::min<int64_t>(cb, (Cp + 4 * V - 1) / (4 * V) * (4 * V));
}

// Sweep 2 for one exit, columns [c0, c1) of its zero-padded row x (real columns below C):
// u = x - m and e = exp(u / T) stored at U[c - c0] / E[c - c0] and summed into aT; with TP >= 0 the
// T = 1 terms summed into a1: e^TP (integer T = TP) or exp(u) (TP = 0; stored at E1[c] when E1 is
// given). Padded lanes: u = e = 0.
template <int TP, typename acc_t>
inline void exp_cols(const acc_t* x, int64_t c0, int64_t c1, int64_t C, acc_t m, const ExpDiv<acc_t>& expT,
                     const ExpDiv<acc_t>& exp1, acc_t* U, acc_t* E, acc_t* E1, Vec<acc_t>& aT, Vec<acc_t>& a1) {
  constexpr int64_t V = kV<acc_t>;
  const Vec<acc_t> vm(m), zero(acc_t(0));
  auto one = [&](int64_t c, const Vec<acc_t>& xv, int64_t valid, Vec<acc_t>& sT, Vec<acc_t>& s1) {
    Vec<acc_t> u = xv - vm;
    Vec<acc_t> e = expT(u);
    if (valid < V) {
      u = Vec<acc_t>::set(zero, u, valid);
      e = Vec<acc_t>::set(zero, e, valid);
    }
    u.store(U + (c - c0));
    e.store(E + (c - c0));
    sT = sT + e;
    if constexpr (TP >= 2) {
      if constexpr (TP % 2 == 0) {
        const Vec<acc_t> h = cpow<TP / 2>(e);
        s1 = at::vec::fmadd(h, h, s1);
      } else {
        s1 = at::vec::fmadd(cpow<TP - 1>(e), e, s1);
      }
    } else if constexpr (TP == 1) {
      s1 = s1 + e;
    } else if constexpr (TP == 0) {
      Vec<acc_t> q = exp1(u);
      if (valid < V) q = Vec<acc_t>::set(zero, q, valid);
      if (E1) q.store(E1 + c);
      s1 = s1 + q;
    }
  };
  const int64_t full = std::min(c1, C / V * V);  // whole vectors of real columns
  Vec<acc_t> sT0 = aT, s10 = a1, sT1(acc_t(0)), s11(acc_t(0));
  int64_t c = c0;
  for (; c + 2 * V <= full; c += 2 * V) {
    one(c, Vec<acc_t>::loadu(x + c), V, sT0, s10);
    one(c + V, Vec<acc_t>::loadu(x + c + V), V, sT1, s11);
  }
  for (; c < c1; c += V) {
    const int64_t valid = std::min<int64_t>(V, std::max<int64_t>(C - c, 0));
    const Vec<acc_t> xv = valid == V  ? Vec<acc_t>::loadu(x + c)
                          : valid > 0 ? Vec<acc_t>::loadu(x + c, static_cast<int>(valid))
                                      : zero;
    one(c, xv, valid, sT0, s10);
  }
  aT = sT0 + sT1;
  a1 = s10 + s11;
}

// Sweep 3 for one exit i, columns [c, c1) (only those below C are written): column c of the
// gradient, out[c - oo] = sum_t coef[t] src[t][c] + cq e_i[c]^TP (TP >= 1; TP = 0: cq E1[c];
// TP = -1: no CE term).
template <int TP, typename acc_t>
inline void grad_cols(int64_t c, int64_t c1, int64_t C, int64_t n, const acc_t* const* srcs, const acc_t* coefv,
                      const acc_t* Ei, const acc_t* E1, acc_t cq, acc_t* out, int64_t oo) {
  constexpr int64_t V = kV<acc_t>;
  const Vec<acc_t> wq(cq);
  auto ce_term = [&](int64_t cc) {
    if constexpr (TP >= 1) {
      return cpow<TP>(Vec<acc_t>::loadu(Ei + cc));
    } else {
      return Vec<acc_t>::loadu(E1 + cc);
    }
  };
  const int64_t hi = std::min(c1, C);
  for (; c + 4 * V <= hi; c += 4 * V) {
    Vec<acc_t> a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0));
    for (int64_t t = 0; t < n; ++t) {
      const Vec<acc_t> w(coefv[t]);
      const acc_t* s = srcs[t] + c;
      a0 = at::vec::fmadd(w, Vec<acc_t>::loadu(s), a0);
      a1 = at::vec::fmadd(w, Vec<acc_t>::loadu(s + V), a1);
      a2 = at::vec::fmadd(w, Vec<acc_t>::loadu(s + 2 * V), a2);
      a3 = at::vec::fmadd(w, Vec<acc_t>::loadu(s + 3 * V), a3);
    }
    if constexpr (TP >= 0) {
      a0 = at::vec::fmadd(wq, ce_term(c), a0);
      a1 = at::vec::fmadd(wq, ce_term(c + V), a1);
      a2 = at::vec::fmadd(wq, ce_term(c + 2 * V), a2);
      a3 = at::vec::fmadd(wq, ce_term(c + 3 * V), a3);
    }
    acc_t* o = out + (c - oo);
    a0.store(o);
    a1.store(o + V);
    a2.store(o + 2 * V);
    a3.store(o + 3 * V);
  }
  for (; c < hi; c += V) {
    Vec<acc_t> a0(acc_t(0));
    for (int64_t t = 0; t < n; ++t) a0 = at::vec::fmadd(Vec<acc_t>(coefv[t]), Vec<acc_t>::loadu(srcs[t] + c), a0);
    if constexpr (TP >= 0) a0 = at::vec::fmadd(wq, ce_term(c), a0);
    if (c + V <= C) {
      a0.store(out + (c - oo));
    } else {
      a0.store(out + (c - oo), static_cast<int>(C - c));
    }
  }
}

// Sweep 3 for dense pairs (the teachers of exit i are exactly i+1..K-1, detached) whose weights
// depend on the student only (a scalar kd_weight, the default): grad_i = d_i e_i + cS_i S_i
// (+ cq_i e_i^TP, the CE term, where cq_i != 0), with the suffix sums S_i = sum_{j>i} e_j / sT_j
// accumulated from the last exit down: ~3 operations per exit and column vector instead of the
// (K + 1) / 2 multiply-adds (and loads) of grad_cols. Columns [c, c1) below C; out[i][c] (same type).
template <int TP, typename acc_t>
inline void grad_cols_suffix(int64_t c, int64_t c1, int64_t C, int64_t K, const acc_t* E, int64_t es, const acc_t* E1,
                             int64_t e1s, const acc_t* d, const acc_t* cS, const acc_t* inv, const acc_t* cq,
                             acc_t* const* out) {
  constexpr int64_t V = kV<acc_t>;
  auto ce_term = [&](int64_t i, int64_t cc, const Vec<acc_t>& e) {
    if constexpr (TP >= 1) {
      return cpow<TP>(e);
    } else {
      return Vec<acc_t>::loadu(E1 + i * e1s + cc);
    }
  };
  const int64_t hi = std::min(c1, C);
  for (; c + 4 * V <= hi; c += 4 * V) {
    Vec<acc_t> S0(acc_t(0)), S1(acc_t(0)), S2(acc_t(0)), S3(acc_t(0));
    for (int64_t i = K - 1; i >= 0; --i) {
      const acc_t* e = E + i * es + c;
      const Vec<acc_t> e0 = Vec<acc_t>::loadu(e), e1 = Vec<acc_t>::loadu(e + V), e2 = Vec<acc_t>::loadu(e + 2 * V),
                       e3 = Vec<acc_t>::loadu(e + 3 * V);
      const Vec<acc_t> vd(d[i]), vs(cS[i]), vi(inv[i]);
      Vec<acc_t> g0 = at::vec::fmadd(vs, S0, vd * e0), g1 = at::vec::fmadd(vs, S1, vd * e1);
      Vec<acc_t> g2 = at::vec::fmadd(vs, S2, vd * e2), g3 = at::vec::fmadd(vs, S3, vd * e3);
      if constexpr (TP >= 0) {
        if (cq[i] != acc_t(0)) {
          const Vec<acc_t> vq(cq[i]);
          g0 = at::vec::fmadd(vq, ce_term(i, c, e0), g0);
          g1 = at::vec::fmadd(vq, ce_term(i, c + V, e1), g1);
          g2 = at::vec::fmadd(vq, ce_term(i, c + 2 * V, e2), g2);
          g3 = at::vec::fmadd(vq, ce_term(i, c + 3 * V, e3), g3);
        }
      }
      acc_t* o = out[i] + c;
      g0.store(o);
      g1.store(o + V);
      g2.store(o + 2 * V);
      g3.store(o + 3 * V);
      S0 = at::vec::fmadd(vi, e0, S0);
      S1 = at::vec::fmadd(vi, e1, S1);
      S2 = at::vec::fmadd(vi, e2, S2);
      S3 = at::vec::fmadd(vi, e3, S3);
    }
  }
  for (; c < hi; c += V) {
    Vec<acc_t> S0(acc_t(0));
    for (int64_t i = K - 1; i >= 0; --i) {
      const Vec<acc_t> e0 = Vec<acc_t>::loadu(E + i * es + c);
      Vec<acc_t> g0 = at::vec::fmadd(Vec<acc_t>(cS[i]), S0, Vec<acc_t>(d[i]) * e0);
      if constexpr (TP >= 0) {
        if (cq[i] != acc_t(0)) g0 = at::vec::fmadd(Vec<acc_t>(cq[i]), ce_term(i, c, e0), g0);
      }
      if (c + V <= C) {
        g0.store(out[i] + c);
      } else {
        g0.store(out[i] + c, static_cast<int>(C - c));
      }
      S0 = at::vec::fmadd(Vec<acc_t>(inv[i]), e0, S0);
    }
  }
}

// The teacher-side term of exit i when it teaches with detach_teacher=False, columns [c, c1) below C:
// out[c - oo] += gt e_i[c] (cteach + sum_t beta[t] u_src[t][c]); MASKED: nothing where e_i = 0.
template <bool MASKED, typename acc_t>
inline void teacher_cols(int64_t c, int64_t c1, int64_t C, int64_t nb, const acc_t* const* usrcs, const acc_t* betav,
                         acc_t cteach, acc_t gt, const acc_t* Ei, acc_t* out, int64_t oo) {
  constexpr int64_t V = kV<acc_t>;
  const Vec<acc_t> wg(gt);
  const int64_t hi = std::min(c1, C);
  for (; c < hi; c += V) {
    Vec<acc_t> v(cteach);
    for (int64_t t = 0; t < nb; ++t) v = at::vec::fmadd(Vec<acc_t>(betav[t]), Vec<acc_t>::loadu(usrcs[t] + c), v);
    const int cnt = static_cast<int>(std::min<int64_t>(V, C - c));
    acc_t* o = out + (c - oo);
    const Vec<acc_t> prev = cnt == V ? Vec<acc_t>::loadu(o) : Vec<acc_t>::loadu(o, cnt);
    const Vec<acc_t> r = mul_add<MASKED>(wg * Vec<acc_t>::loadu(Ei + c), v, prev);
    if (cnt == V) {
      r.store(o);
    } else {
      r.store(o, cnt);
    }
  }
}

// Compile-time dispatch of the power TP (-1: none, 0: non-integer T, 1..kMaxIntPow) to F<TP>::run.
template <template <int> class F, typename... Args>
inline void with_power(int tp, Args&&... args) {
  static_assert(kMaxIntPow == 8, "with_power covers the integer powers up to 8");
  switch (tp) {
    case -1: return F<-1>::run(std::forward<Args>(args)...);
    case 0: return F<0>::run(std::forward<Args>(args)...);
    case 1: return F<1>::run(std::forward<Args>(args)...);
    case 2: return F<2>::run(std::forward<Args>(args)...);
    case 3: return F<3>::run(std::forward<Args>(args)...);
    case 4: return F<4>::run(std::forward<Args>(args)...);
    case 5: return F<5>::run(std::forward<Args>(args)...);
    case 6: return F<6>::run(std::forward<Args>(args)...);
    case 7: return F<7>::run(std::forward<Args>(args)...);
    default: return F<8>::run(std::forward<Args>(args)...);
  }
}

template <int TP>
struct ExpCols {
  template <typename... Args>
  static void run(Args&&... args) { exp_cols<TP>(std::forward<Args>(args)...); }
};
template <int TP>
struct GradColsSuffix {
  template <typename... Args>
  static void run(Args&&... args) { grad_cols_suffix<TP>(std::forward<Args>(args)...); }
};
template <int TP>
struct GradCols {
  template <typename... Args>
  static void run(Args&&... args) { grad_cols<TP>(std::forward<Args>(args)...); }
};

// A zero-initialized buffer aligned to 64 bytes (whole cache lines: unaligned 512-bit loads cost
// two cache accesses, which halves the throughput of the L1-bound loops).
template <typename T>
class AlignedBuf {
 public:
  AlignedBuf() = default;
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  AlignedBuf(AlignedBuf&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  AlignedBuf& operator=(AlignedBuf&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~AlignedBuf() { release(); }
  void resize(int64_t n) {
    release();
    if (n <= 0) return;
    p_ = static_cast<T*>(::operator new(static_cast<size_t>(n) * sizeof(T), std::align_val_t{64}));
    n_ = n;
    std::fill(p_, p_ + n, T(0));
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  T* begin() { return p_; }
  T* end() { return p_ + n_; }
  T& operator[](int64_t i) { return p_[i]; }

 private:
  void release() {
    if (p_) ::operator delete(p_, std::align_val_t{64});
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  int64_t n_ = 0;
};

// Per-worker scratch of losses_and_grad.
template <typename acc_t>
struct RowScratch {
  AlignedBuf<acc_t> E, U, E1, Z, tmp;   // e rows, u rows (or blocks), exp(u) rows, converted input, out block
  AlignedBuf<acc_t> accT, acc1, D;      // vector sums at T and 1, dot accumulators
  AlignedBuf<acc_t> MX;                 // next row's vector maxes
  int64_t mx_row = -1;
  std::vector<acc_t> X;                 // dots
  std::vector<acc_t> m, sT, lnsT, s1, lns1, inv, kl;
  std::vector<acc_t> coef, beta, cteach, cq, wce, gt, sd, scS;
  std::vector<acc_t*> outs;
  std::vector<const acc_t*> srcs, usrcs, ptrs, src;
  std::vector<int64_t> nterm, nbeta;
  std::vector<char> teach;
};

template <typename scalar_t, typename acc_t>
void losses_and_grad_impl(const Problem& pb, const LossArgs& la) {
  constexpr int64_t V = kV<acc_t>;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const int64_t K = pb.K, B = pb.B, C = pb.C, P = pb.P;
  const int64_t Cp = (C + V - 1) / V * V;
  const int64_t CB = column_block<acc_t>(K, Cp);
  const int tpow = integer_power(pb.T);
  const bool has_target = pb.target != nullptr;
  const bool ce_grad = la.compute_grad && has_target && la.ce_w;
  const bool kd_grad = la.compute_grad && la.kd_w;
  const bool teacher_grad = kd_grad && !pb.detach_teacher;
  const bool store_e1 = ce_grad && !tpow;
  const int tp2 = has_target ? tpow : -1;  // sweep 2's T = 1 terms: none without a target
  // Whole-row scratch rows only where sweep 3 reads them; else one column block per exit.
  const bool full_e = la.compute_grad, full_u = teacher_grad;
  const int64_t es = full_e ? Cp : CB, us = full_u ? Cp : CB;  // row strides of the E / U scratch
  acc_t* ce_rows = static_cast<acc_t*>(la.ce_rows);
  acc_t* kl_rows = static_cast<acc_t*>(la.kl_rows);
  scalar_t* grad = static_cast<scalar_t*>(la.grad);
  const acc_t* ce_w = static_cast<const acc_t*>(la.ce_w);
  const acc_t* kd_w = static_cast<const acc_t*>(la.kd_w);
  const acc_t T = static_cast<acc_t>(pb.T);
  const acc_t skd = T * static_cast<acc_t>(la.r_kd);  // d kd_ij / d z_i = T r (p_i - p_j)
  const acc_t r_ce = static_cast<acc_t>(la.r_ce);
  const ExpDiv<acc_t> expT(pb.T), exp1(1.0);
  const PairPlan plan(pb);
  // Dense pairs (every i < j exactly once, detached) with a weight per student only (a scalar
  // kd_weight, the default): sweep 3 uses suffix sums (grad_cols_suffix). a[i]: student i's weight.
  std::vector<acc_t> suffix_a(K, acc_t(0));
  bool suffix = same_type && kd_grad && !teacher_grad && !la.kd_w_rows && K >= 2 && P == K * (K - 1) / 2;
  if (suffix) {
    std::vector<char> seen(K * K, 0);
    for (int64_t p = 0; p < P && suffix; ++p) {
      const int64_t i = pb.pairs[2 * p], j = pb.pairs[2 * p + 1];
      suffix = i < j && !seen[i * K + j];
      if (suffix) seen[i * K + j] = 1;
    }
    for (int64_t i = 0; i + 1 < K && suffix; ++i) {
      suffix_a[i] = kd_w[i * K + i + 1];
      for (int64_t j = i + 2; j < K && suffix; ++j) suffix = kd_w[i * K + j] == suffix_a[i];
    }
  }
  // Rows per task, at least (at::parallel_for splits the rows into one contiguous range per
  // thread: long ranges keep each exit's rows one stream for the hardware prefetchers; handing
  // rows out dynamically in chunks of a few rows was ~15% slower, in chunks of 16+ rows ~3%).
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * C));

  auto init = [&]() {
    RowScratch<acc_t> s;
    s.E.resize(K * es + V);
    s.U.resize(K * us + V);
    if (store_e1) s.E1.resize(K * Cp + V);
    if (!same_type) {
      s.Z.resize(K * Cp + V);
      s.tmp.resize(CB + V);
    }
    s.accT.resize(K * V);
    s.acc1.resize(K * V);
    s.MX.resize(K * V);
    s.D.resize(std::max<int64_t>(plan.nslots, 1) * 2 * V);
    s.X.resize(plan.nslots + 1);
    for (auto* v : {&s.m, &s.sT, &s.lnsT, &s.s1, &s.lns1, &s.inv, &s.cteach, &s.cq, &s.wce, &s.gt, &s.sd, &s.scS}) {
      v->resize(K);
    }
    s.outs.resize(K);
    s.kl.resize(std::max<int64_t>(P, 1));
    s.coef.resize(K * (K + 1));
    s.beta.resize(K * K);
    s.srcs.resize(K * (K + 1));
    s.usrcs.resize(K * K);
    s.ptrs.resize(K + 1);
    s.src.resize(K);
    s.nterm.resize(K);
    s.nbeta.resize(K);
    s.teach.resize(K);
    return s;
  };

  auto body = [&](RowScratch<acc_t>& s, int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t y = has_target ? pb.target[b] : 0;
      const bool valid = has_target && y != pb.ignore_index;
      // Sweep 1: the max of every exit (reduced precision: converted once into Z).
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* z = static_cast<const scalar_t*>(pb.logits[k]) + b * pb.row_stride[k];
        if constexpr (same_type) {
          s.src[k] = z;
        } else {
          load_row<scalar_t, acc_t>(z, s.Z.data() + k * Cp, C, Cp);
          s.src[k] = s.Z.data() + k * Cp;
        }
        if (s.mx_row == b) {  // folded into the previous row's sweep 3 (whole vectors; the tail here)
          s.m[k] = at::vec::vec_reduce_all<acc_t>(
              [](const Vec<acc_t>& a, const Vec<acc_t>& c) { return at::vec::maximum(a, c); },
              Vec<acc_t>::loadu(s.MX.data() + k * V));
          for (int64_t c = C / V * V; c < C; ++c) s.m[k] = std::max(s.m[k], s.src[k][c]);
        } else {
          s.m[k] = row_max(s.src[k], C);
        }
      }
      // Sweep 2, per column block: u, e (exp(u) too for a non-integer T), the sums, the dots. Swept
      // again with masked dot products where they came out non-finite (a class at -inf).
      auto sweep2 = [&](auto masked) {
        std::fill(s.accT.begin(), s.accT.end(), acc_t(0));
        std::fill(s.acc1.begin(), s.acc1.end(), acc_t(0));
        std::fill(s.D.begin(), s.D.end(), acc_t(0));
        for (int64_t c0 = 0; c0 < Cp; c0 += CB) {
          const int64_t c1 = std::min(c0 + CB, Cp);
          const int64_t eoff = full_e ? c0 : 0, uoff = full_u ? c0 : 0;  // the block in the scratch rows
          for (int64_t k = 0; k < K; ++k) {
            Vec<acc_t> aT = Vec<acc_t>::loadu(s.accT.data() + k * V), a1 = Vec<acc_t>::loadu(s.acc1.data() + k * V);
            acc_t* E1k = store_e1 ? s.E1.data() + k * Cp : static_cast<acc_t*>(nullptr);
            with_power<ExpCols>(tp2, s.src[k], c0, c1, C, s.m[k], expT, exp1, s.U.data() + k * us + uoff,
                                s.E.data() + k * es + eoff, E1k, aT, a1);
            aT.store(s.accT.data() + k * V);
            a1.store(s.acc1.data() + k * V);
          }
          for (int64_t j = 0; j < K; ++j) {
            if (plan.slot[j] < 0) continue;
            const int64_t n = plan.begin[j + 1] - plan.begin[j];
            for (int64_t t = 0; t < n; ++t) s.ptrs[t] = s.U.data() + plan.student[plan.begin[j] + t] * us + uoff;
            s.ptrs[n] = s.U.data() + j * us + uoff;
            dots_acc<decltype(masked)::value>(static_cast<const acc_t*>(s.E.data() + j * es + eoff), s.ptrs.data(),
                                              n + 1, c1 - c0, s.D.data() + plan.slot[j] * 2 * V);
          }
        }
        for (int64_t q = 0; q < plan.nslots; ++q) {
          s.X[q] = hsum(Vec<acc_t>::loadu(s.D.data() + 2 * q * V) + Vec<acc_t>::loadu(s.D.data() + (2 * q + 1) * V));
        }
      };
      sweep2(std::false_type{});
      const bool masked_row = !all_finite(s.X.data(), plan.nslots);
      if (masked_row) sweep2(std::true_type{});
      // The row's sums, CE and pair KLs.
      for (int64_t k = 0; k < K; ++k) {
        s.sT[k] = hsum(Vec<acc_t>::loadu(s.accT.data() + k * V));
        s.lnsT[k] = std::log(s.sT[k]);
        s.inv[k] = acc_t(1) / s.sT[k];
        if (has_target) {
          s.s1[k] = hsum(Vec<acc_t>::loadu(s.acc1.data() + k * V));
          s.lns1[k] = std::log(s.s1[k]);
          ce_rows[k * B + b] = valid ? s.lns1[k] - (s.src[k][y] - s.m[k]) : acc_t(0);
        }
      }
      for (int64_t j = 0; j < K; ++j) {
        if (plan.slot[j] < 0) continue;
        const int64_t n = plan.begin[j + 1] - plan.begin[j];
        const acc_t xjj = s.X[plan.slot[j] + n], f = s.inv[j] / T;
        for (int64_t t = 0; t < n; ++t) {
          const int64_t q = plan.begin[j] + t;
          const acc_t v = (xjj - s.X[plan.slot[j] + t]) * f - s.lnsT[j] + s.lnsT[plan.student[q]];
          s.kl[plan.pair[q]] = v;
          kl_rows[plan.pair[q] * B + b] = v;
        }
      }
      if (!la.compute_grad) continue;

      // Gradient of exit i: sum of the terms coef * e_j (its own e_i and each of its teachers'; or
      // the suffix form), + cq_i e_i^T (CE), + gt_i e_i (sum_s beta[i, s] u_s + cteach_i) (teacher
      // side, not detached).
      for (int64_t i = 0; i < K; ++i) {
        acc_t* coef = s.coef.data() + i * (K + 1);
        const acc_t** srcs = s.srcs.data() + i * (K + 1);
        int64_t n = 0;
        if (kd_grad && !suffix) {
          acc_t wsum = 0;
          for (int64_t t = plan.tbegin[i]; t < plan.tbegin[i + 1]; ++t) {
            const int64_t p = plan.tpair[t], j = pb.pairs[2 * p + 1];
            const acc_t w = kd_w[la.kd_w_rows ? (i * K + j) * B + b : i * K + j];
            if (w == acc_t(0)) continue;
            wsum += w;
            coef[n] = -skd * w * s.inv[j];
            srcs[n++] = s.E.data() + j * es;
          }
          if (wsum != acc_t(0)) {
            coef[n] = skd * wsum * s.inv[i];
            srcs[n++] = s.E.data() + i * es;
          }
        }
        s.nterm[i] = n;
        if (suffix) {
          s.sd[i] = skd * suffix_a[i] * static_cast<acc_t>(K - 1 - i) * s.inv[i];
          s.scS[i] = -skd * suffix_a[i];
        }
        s.wce[i] = (ce_grad && valid) ? ce_w[la.ce_w_rows ? i * B + b : i] * r_ce : acc_t(0);
        s.cq[i] = has_target ? s.wce[i] / s.s1[i] : acc_t(0);
        s.gt[i] = skd * s.inv[i];
        s.nbeta[i] = 0;
        s.cteach[i] = 0;
      }
      if (teacher_grad) {
        std::fill(s.beta.begin(), s.beta.end(), acc_t(0));
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = pb.pairs[2 * p], j = pb.pairs[2 * p + 1];
          const acc_t w = kd_w[la.kd_w_rows ? (i * K + j) * B + b : i * K + j];
          if (w == acc_t(0)) continue;
          s.beta[j * K + j] += w / T;  // exit j is the teacher of pair p
          s.beta[j * K + i] -= w / T;
          s.cteach[j] += w * (s.lnsT[i] - s.lnsT[j] - s.kl[p]);
        }
        for (int64_t i = 0; i < K; ++i) {
          int64_t nb = 0;
          for (int64_t j = 0; j < K; ++j) {
            if (s.beta[i * K + j] != acc_t(0)) {
              s.beta[i * K + nb] = s.beta[i * K + j];  // compacted in place (nb <= j)
              s.usrcs[i * K + nb++] = s.U.data() + j * us;
            }
          }
          s.nbeta[i] = nb;
        }
      }
      for (int64_t i = 0; i < K; ++i) s.teach[i] = teacher_grad && (s.nbeta[i] > 0 || s.cteach[i] != acc_t(0));
      // Sweep 3, per column block: every exit's gradient, written once; with the next row's sweep 1
      // (its maxes) folded in, so that its logits come in from memory while this row's gradient is
      // computed and written (same-type input; ~7% on the benchmark shape).
      const bool fuse_max = same_type && b + 1 < end;
      if (fuse_max) {
        for (int64_t k = 0; k < K; ++k) Vec<acc_t>(-std::numeric_limits<acc_t>::infinity()).store(s.MX.data() + k * V);
        s.mx_row = b + 1;
      }
      for (int64_t c0 = 0; c0 < Cp; c0 += CB) {
        const int64_t c1 = std::min(c0 + CB, Cp);
        if (fuse_max) {
          const int64_t hi = std::min(c1, C / V * V);
          for (int64_t k = 0; k < K; ++k) {
            const acc_t* zn =
                reinterpret_cast<const acc_t*>(static_cast<const scalar_t*>(pb.logits[k]) + (b + 1) * pb.row_stride[k]);
            Vec<acc_t> mv = Vec<acc_t>::loadu(s.MX.data() + k * V);
            for (int64_t c = c0; c < hi; c += V) mv = at::vec::maximum(mv, Vec<acc_t>::loadu(zn + c));
            mv.store(s.MX.data() + k * V);
          }
        }
        if (suffix) {
          if constexpr (same_type) {
            for (int64_t i = 0; i < K; ++i) s.outs[i] = reinterpret_cast<acc_t*>(grad + (i * B + b) * C);
            const int tp3 = (ce_grad && valid) ? tpow : -1;
            with_power<GradColsSuffix>(tp3, c0, c1, C, K, static_cast<const acc_t*>(s.E.data()), es,
                                       static_cast<const acc_t*>(store_e1 ? s.E1.data() : nullptr), Cp,
                                       static_cast<const acc_t*>(s.sd.data()), static_cast<const acc_t*>(s.scS.data()),
                                       static_cast<const acc_t*>(s.inv.data()), static_cast<const acc_t*>(s.cq.data()),
                                       static_cast<acc_t* const*>(s.outs.data()));
            for (int64_t i = 0; i < K; ++i) {
              if (s.wce[i] != acc_t(0) && y >= c0 && y < c1) s.outs[i][y] -= s.wce[i];
            }
          }
          continue;
        }
        for (int64_t i = 0; i < K; ++i) {
          scalar_t* g = grad + (i * B + b) * C;
          // column c of the gradient row is out[c - oo] (reduced precision: the block buffer tmp)
          acc_t* out = same_type ? reinterpret_cast<acc_t*>(g) : s.tmp.data();
          const int64_t oo = same_type ? 0 : c0;
          const acc_t* Ei = s.E.data() + i * es;
          const int tp3 = s.wce[i] != acc_t(0) ? tpow : -1;
          with_power<GradCols>(tp3, c0, c1, C, s.nterm[i],
                               static_cast<const acc_t* const*>(s.srcs.data() + i * (K + 1)),
                               static_cast<const acc_t*>(s.coef.data() + i * (K + 1)), Ei,
                               static_cast<const acc_t*>(store_e1 ? s.E1.data() + i * Cp : nullptr), s.cq[i], out, oo);
          if (s.teach[i]) {
            auto teach = [&](auto masked) {
              teacher_cols<decltype(masked)::value>(c0, c1, C, s.nbeta[i],
                                                    static_cast<const acc_t* const*>(s.usrcs.data() + i * K),
                                                    static_cast<const acc_t*>(s.beta.data() + i * K), s.cteach[i],
                                                    s.gt[i], Ei, out, oo);
            };
            masked_row ? teach(std::true_type{}) : teach(std::false_type{});
          }
          if (s.wce[i] != acc_t(0) && y >= c0 && y < c1) out[y - oo] -= s.wce[i];
          if constexpr (!same_type) {
            for (int64_t cc = c0; cc < std::min(c1, C); ++cc) g[cc] = static_cast<scalar_t>(out[cc - c0]);
          }
        }
      }
    }
  };
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    RowScratch<acc_t> s = init();
    body(s, begin, end);
  });
}

template <typename scalar_t, typename acc_t>
void jvp_impl(const Problem& pb, const JvpArgs& ja) {
  const int64_t K = pb.K, B = pb.B, C = pb.C, P = pb.P;
  const int tpow = integer_power(pb.T);
  const bool has_target = pb.target != nullptr;
  const acc_t T = static_cast<acc_t>(pb.T);
  acc_t* dce_rows = static_cast<acc_t*>(ja.dce_rows);
  acc_t* dkd_rows = static_cast<acc_t*>(ja.dkd_rows);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, K * C));
  const ExpDiv<acc_t> expT(pb.T), exp1(1.0);

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(K, C, has_target && !tpow, true);
    constexpr int64_t V = kV<acc_t>;
    const int64_t Cp = s.Cp;
    std::vector<acc_t> own(K), kl(std::max<int64_t>(P, 1)), cross(std::max<int64_t>(P, 1));
    std::vector<acc_t> dd(std::max<int64_t>(P, 1)), x(K + 1);
    std::vector<acc_t> ddiag(K, acc_t(0));
    for (int64_t b = begin; b < end; ++b) {
      softmax_pass<scalar_t, acc_t>(pb, b, s, has_target, tpow, expT, exp1);
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* t = static_cast<const scalar_t*>(ja.tangents[k]) + b * ja.tangent_stride[k];
        load_row<scalar_t, acc_t>(t, s.dz(k), C, Cp);
      }
      // own_k = <p_k, dz_k>; cross_p = <p_j, dz_i> for pair p = (i, j), grouped by teacher j.
      for (int64_t j = 0; j < K; ++j) {
        int64_t n = 0;
        for (int64_t p = 0; p < P; ++p) {
          if (pb.pairs[2 * p + 1] == j) {
            s.idx[n] = p;
            s.ptrs[n++] = s.dz(pb.pairs[2 * p]);
          }
        }
        s.ptrs[n] = s.dz(j);
        dots(s.e(j), s.ptrs.data(), n + 1, Cp, x.data());
        own[j] = x[n] / s.sT[j];
        for (int64_t t = 0; t < n; ++t) cross[s.idx[t]] = x[t] / s.sT[j];
      }
      if (has_target) {
        const int64_t y = pb.target[b];
        const bool valid = y != pb.ignore_index;
        for (int64_t k = 0; k < K; ++k) {
          acc_t v = 0;
          if (valid) v = dot_pow(s.e(k), s.e1(k), tpow, s.dz(k), Cp) / s.s1[k] - s.dz(k)[y];
          dce_rows[k * B + b] = v;
        }
      }
      if (!pb.detach_teacher) {
        pair_kl(pb, s, kl.data());
        // D_ij = <e_j dz_j, u_i> for pair p = (i, j) and D_jj, grouped by teacher j.
        for (int64_t j = 0; j < K; ++j) {
          int64_t n = 0;
          for (int64_t p = 0; p < P; ++p) {
            if (pb.pairs[2 * p + 1] == j) {
              s.idx[n] = p;
              s.ptrs[n++] = s.u(pb.pairs[2 * p]);
            }
          }
          if (n == 0) continue;
          s.ptrs[n] = s.u(j);
          const acc_t* Ej = s.e(j);
          const acc_t* DZj = s.dz(j);
          acc_t* F = s.tmp.data();
          for (int64_t c = 0; c < Cp; c += V) (Vec<acc_t>::loadu(Ej + c) * Vec<acc_t>::loadu(DZj + c)).store(F + c);
          dots_zero_log_zero(static_cast<const acc_t*>(F), s.ptrs.data(), n + 1, Cp, x.data());
          ddiag[j] = x[n];
          for (int64_t t = 0; t < n; ++t) dd[s.idx[t]] = x[t];
        }
      }
      for (int64_t p = 0; p < P; ++p) {
        const int64_t i = pb.pairs[2 * p], j = pb.pairs[2 * p + 1];
        acc_t v = T * (own[i] - cross[p]);
        if (!pb.detach_teacher) {
          const acc_t a = (ddiag[j] - dd[p]) / (T * s.sT[j]) + (s.lnsT[i] - s.lnsT[j]) * own[j];
          v += T * (a - kl[p] * own[j]);
        }
        dkd_rows[p * B + b] = v;
      }
    }
  });
}

}  // namespace

void losses_and_grad(const Problem& pb, const LossArgs& la) {
  switch (pb.dtype) {
    case Dtype::kHalf: return losses_and_grad_impl<c10::Half, float>(pb, la);
    case Dtype::kBFloat16: return losses_and_grad_impl<c10::BFloat16, float>(pb, la);
    case Dtype::kFloat: return losses_and_grad_impl<float, float>(pb, la);
    case Dtype::kDouble: return losses_and_grad_impl<double, double>(pb, la);
  }
}

void jvp(const Problem& pb, const JvpArgs& ja) {
  switch (pb.dtype) {
    case Dtype::kHalf: return jvp_impl<c10::Half, float>(pb, ja);
    case Dtype::kBFloat16: return jvp_impl<c10::BFloat16, float>(pb, ja);
    case Dtype::kFloat: return jvp_impl<float, float>(pb, ja);
    case Dtype::kDouble: return jvp_impl<double, double>(pb, ja);
  }
}

}  // namespace hdkd_fast::cpu::CPU_CAPABILITY

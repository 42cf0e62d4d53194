// Fused dense-KD CPU kernel. This file is compiled once per instruction set (DEFAULT, AVX2,
// AVX512 on x86-64; see setup.py) with CPU_CAPABILITY naming the variant, like PyTorch's own
// kernels; dense_kd_cpu.cpp picks the variant at run time.
//
// Work split: at::parallel_for over rows; each row is independent and writes its own per-row
// losses (reduced afterwards in a fixed order, so results do not depend on the thread count) and
// its own gradient rows. Per row and exit, into a per-thread scratch (zero-padded to whole
// vectors):
//   pass 1: max of z_k, then u_k = z_k - max and e_k = exp(u_k / T) with their sums at T and at 1
//           (e_k^T for integer T, else a second exp); CE of the row;
//   pass 2: the KL of every selected pair from dot products X_ij = <e_j, u_i> (grouped by teacher,
//           so each e_j is loaded once for all its students), then each exit's gradient written
//           exactly once as a weighted sum of the e rows (+ the teacher term, which needs the
//           pair's KL from the dot products, when detach_teacher=False).
#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must name the instruction-set variant (DEFAULT, AVX2, AVX512)"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../dense_kd_args.h"

namespace hdkd_fast::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename acc_t>
constexpr int64_t kV = Vec<acc_t>::size();

template <typename acc_t>
inline acc_t hsum(const Vec<acc_t>& v) {
  alignas(64) acc_t lanes[Vec<acc_t>::size()];
  v.store(lanes);
  acc_t s = 0;
  for (int64_t i = 0; i < Vec<acc_t>::size(); ++i) s += lanes[i];
  return s;
}

template <typename acc_t>
inline Vec<acc_t> vexp(const Vec<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

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

// out[n] = <a, b[n]> over Cp (a multiple of the vector width) for N rows b at once; two column
// vectors per step so that even N = 1 has independent accumulator chains.
template <int N, typename acc_t>
inline void dots_n(const acc_t* a, const acc_t* const* b, int64_t Cp, acc_t* out) {
  constexpr int64_t V = kV<acc_t>;
  Vec<acc_t> acc0[N], acc1[N];
  for (int n = 0; n < N; ++n) acc0[n] = acc1[n] = Vec<acc_t>(acc_t(0));
  int64_t c = 0;
  for (; c + 2 * V <= Cp; c += 2 * V) {
    const Vec<acc_t> x0 = Vec<acc_t>::loadu(a + c), x1 = Vec<acc_t>::loadu(a + c + V);
    for (int n = 0; n < N; ++n) {
      acc0[n] = at::vec::fmadd(x0, Vec<acc_t>::loadu(b[n] + c), acc0[n]);
      acc1[n] = at::vec::fmadd(x1, Vec<acc_t>::loadu(b[n] + c + V), acc1[n]);
    }
  }
  if (c < Cp) {
    const Vec<acc_t> x0 = Vec<acc_t>::loadu(a + c);
    for (int n = 0; n < N; ++n) acc0[n] = at::vec::fmadd(x0, Vec<acc_t>::loadu(b[n] + c), acc0[n]);
  }
  for (int n = 0; n < N; ++n) out[n] = hsum(acc0[n] + acc1[n]);
}

template <typename acc_t>
inline void dots(const acc_t* a, const acc_t* const* b, int64_t n, int64_t Cp, acc_t* out) {
  for (int64_t s = 0; s < n; s += 6) {
    switch (std::min<int64_t>(6, n - s)) {
      case 1: dots_n<1>(a, b + s, Cp, out + s); break;
      case 2: dots_n<2>(a, b + s, Cp, out + s); break;
      case 3: dots_n<3>(a, b + s, Cp, out + s); break;
      case 4: dots_n<4>(a, b + s, Cp, out + s); break;
      case 5: dots_n<5>(a, b + s, Cp, out + s); break;
      default: dots_n<6>(a, b + s, Cp, out + s); break;
    }
  }
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

// Per-thread scratch: K zero-padded rows of u, e, (exp(u) for non-integer T), tangents, and
// small per-row tables.
template <typename acc_t>
struct Scratch {
  int64_t K, Cp;
  std::vector<acc_t> U, E, E1, DZ, tmp;
  std::vector<acc_t> lnsT, sT, lns1, s1;
  std::vector<acc_t> coef, beta;         // K x K coefficient tables of the gradient
  std::vector<acc_t> cteach, vals;        // per exit / per pair values
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
    coef.resize(K * K); beta.resize(K * K); cteach.resize(K);
    vals.resize(2 * K * K + 2 * K);
    ptrs.resize(2 * K + 2);
    idx.resize(2 * K + 2);
  }
  acc_t* u(int64_t k) { return U.data() + k * Cp; }
  acc_t* e(int64_t k) { return E.data() + k * Cp; }
  acc_t* e1(int64_t k) { return E1.empty() ? nullptr : E1.data() + k * Cp; }
  acc_t* dz(int64_t k) { return DZ.data() + k * Cp; }
};

// Pass 1 for one row: u, e (and exp(u) when stored), the log-sums, and the row's CE.
template <typename scalar_t, typename acc_t>
inline void softmax_pass(const Problem& pb, int64_t b, Scratch<acc_t>& s, bool want_s1, int tpow, acc_t* ce_rows) {
  constexpr int64_t V = kV<acc_t>;
  const int64_t K = pb.K, B = pb.B, C = pb.C, Cp = s.Cp;
  const acc_t invT = acc_t(1) / static_cast<acc_t>(pb.T);
  const int64_t y = pb.target ? pb.target[b] : 0;
  const bool valid = pb.target && y != pb.ignore_index;
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
    const Vec<acc_t> vm(m), vit(invT), zero(acc_t(0));
    Vec<acc_t> aT(acc_t(0)), a1(acc_t(0));
    for (int64_t c = 0; c < Cp; c += V) {
      const Vec<acc_t> x = c + V <= C ? Vec<acc_t>::loadu(src + c) : Vec<acc_t>::loadu(src + c, static_cast<int>(C - c));
      Vec<acc_t> u = x - vm;
      Vec<acc_t> e = vexp(u * vit);
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
          e1 = vexp(u);
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
    if (ce_rows) ce_rows[k * B + b] = valid ? s.lns1[k] - U[y] : acc_t(0);
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
    dots(s.e(j), s.ptrs.data(), n + 1, s.Cp, x);
    const acc_t xjj = x[n];
    for (int64_t t = 0; t < n; ++t) {
      const int64_t i = pb.pairs[2 * s.idx[t]];
      kl[s.idx[t]] = (xjj - x[t]) / (T * s.sT[j]) - s.lnsT[j] + s.lnsT[i];
    }
  }
}

template <typename scalar_t, typename acc_t>
void losses_and_grad_impl(const Problem& pb, const LossArgs& la) {
  const int64_t K = pb.K, B = pb.B, C = pb.C, P = pb.P;
  const int tpow = integer_power(pb.T);
  const bool has_target = pb.target != nullptr;
  const bool ce_grad = la.compute_grad && has_target && la.ce_w;
  const bool kd_grad = la.compute_grad && la.kd_w;
  const bool teacher_grad = kd_grad && !pb.detach_teacher;
  const bool store_e1 = ce_grad && !tpow;
  acc_t* ce_rows = static_cast<acc_t*>(la.ce_rows);
  acc_t* kl_rows = static_cast<acc_t*>(la.kl_rows);
  scalar_t* grad = static_cast<scalar_t*>(la.grad);
  const acc_t* ce_w = static_cast<const acc_t*>(la.ce_w);
  const acc_t* kd_w = static_cast<const acc_t*>(la.kd_w);
  const acc_t T = static_cast<acc_t>(pb.T);
  const acc_t skd = T * static_cast<acc_t>(la.r_kd);  // d kd_ij / d z_i = T r (p_i - p_j)
  const acc_t r_ce = static_cast<acc_t>(la.r_ce);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * C));

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(K, C, store_e1, false);
    constexpr int64_t V = kV<acc_t>;
    const int64_t Cp = s.Cp;
    std::vector<acc_t> kl(std::max<int64_t>(P, 1));
    std::vector<acc_t> coefv(K);
    std::vector<const acc_t*> srcs(K), usrcs(K);
    std::vector<acc_t> betav(K);
    for (int64_t b = begin; b < end; ++b) {
      softmax_pass<scalar_t, acc_t>(pb, b, s, has_target, tpow, ce_rows);
      pair_kl(pb, s, kl.data());
      for (int64_t p = 0; p < P; ++p) kl_rows[p * B + b] = kl[p];
      if (!la.compute_grad) continue;

      // Gradient coefficients of the row: grad_i = sum_j coef[i, j] e_j + cq_i e_i^T
      //   + gt_i e_i (sum_s beta[i, s] u_s + cteach_i)          (teacher side, not detached)
      std::fill(s.coef.begin(), s.coef.end(), acc_t(0));
      std::fill(s.beta.begin(), s.beta.end(), acc_t(0));
      std::fill(s.cteach.begin(), s.cteach.end(), acc_t(0));
      if (kd_grad) {
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = pb.pairs[2 * p], j = pb.pairs[2 * p + 1];
          const acc_t w = kd_w[la.kd_w_rows ? (i * K + j) * B + b : i * K + j];
          if (w == acc_t(0)) continue;
          s.coef[i * K + i] += skd * w / s.sT[i];
          s.coef[i * K + j] -= skd * w / s.sT[j];
          if (teacher_grad) {  // exit j is the teacher of pair p
            s.beta[j * K + j] += w / T;
            s.beta[j * K + i] -= w / T;
            s.cteach[j] += w * (s.lnsT[i] - s.lnsT[j] - kl[p]);
          }
        }
      }
      const int64_t y = has_target ? pb.target[b] : 0;
      const bool valid = has_target && y != pb.ignore_index;
      for (int64_t i = 0; i < K; ++i) {
        int64_t n = 0, nb = 0;
        for (int64_t j = 0; j < K; ++j) {
          if (s.coef[i * K + j] != acc_t(0)) {
            coefv[n] = s.coef[i * K + j];
            srcs[n++] = s.e(j);
          }
          if (teacher_grad && s.beta[i * K + j] != acc_t(0)) {
            betav[nb] = s.beta[i * K + j];
            usrcs[nb++] = s.u(j);
          }
        }
        const acc_t wce = (ce_grad && valid) ? ce_w[la.ce_w_rows ? i * B + b : i] * r_ce : acc_t(0);
        const acc_t cq = wce / s.s1[i];
        const bool teach = teacher_grad && (nb > 0 || s.cteach[i] != acc_t(0));
        const acc_t gt = skd / s.sT[i];
        const acc_t* Ei = s.e(i);
        const acc_t* E1i = s.e1(i);
        scalar_t* g = grad + (i * B + b) * C;
        acc_t* out = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(g) : s.tmp.data();
        // R column vectors at a time: independent accumulator chains, one load per term and vector.
        auto block = [&](int64_t c, auto unroll) {
          constexpr int R = decltype(unroll)::value;
          Vec<acc_t> acc[R];
          for (int r = 0; r < R; ++r) acc[r] = Vec<acc_t>(acc_t(0));
          for (int64_t t = 0; t < n; ++t) {
            const Vec<acc_t> w(coefv[t]);
            const acc_t* src = srcs[t] + c;
            for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(w, Vec<acc_t>::loadu(src + r * V), acc[r]);
          }
          if (wce != acc_t(0)) {
            const Vec<acc_t> w(cq);
            for (int r = 0; r < R; ++r) {
              const int64_t cc = c + r * V;
              const Vec<acc_t> q = E1i ? Vec<acc_t>::loadu(E1i + cc) : ipow(Vec<acc_t>::loadu(Ei + cc), tpow);
              acc[r] = at::vec::fmadd(w, q, acc[r]);
            }
          }
          if (teach) {
            Vec<acc_t> v[R];
            for (int r = 0; r < R; ++r) v[r] = Vec<acc_t>(s.cteach[i]);
            for (int64_t t = 0; t < nb; ++t) {
              const Vec<acc_t> w(betav[t]);
              const acc_t* src = usrcs[t] + c;
              for (int r = 0; r < R; ++r) v[r] = at::vec::fmadd(w, Vec<acc_t>::loadu(src + r * V), v[r]);
            }
            const Vec<acc_t> w(gt);
            for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(w * Vec<acc_t>::loadu(Ei + c + r * V), v[r], acc[r]);
          }
          for (int r = 0; r < R; ++r) {
            const int64_t cc = c + r * V;
            if (cc + V <= C) {
              acc[r].store(out + cc);
            } else if (cc < C) {
              acc[r].store(out + cc, static_cast<int>(C - cc));
            }
          }
        };
        int64_t c = 0;
        for (; c + 4 * V <= Cp; c += 4 * V) block(c, std::integral_constant<int, 4>{});
        for (; c < Cp; c += V) block(c, std::integral_constant<int, 1>{});
        if (wce != acc_t(0)) out[y] -= wce;
        if constexpr (!std::is_same_v<scalar_t, acc_t>) {
          for (int64_t c = 0; c < C; ++c) g[c] = static_cast<scalar_t>(out[c]);
        }
      }
    }
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

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(K, C, has_target && !tpow, true);
    constexpr int64_t V = kV<acc_t>;
    const int64_t Cp = s.Cp;
    std::vector<acc_t> own(K), kl(std::max<int64_t>(P, 1)), cross(std::max<int64_t>(P, 1));
    std::vector<acc_t> dd(std::max<int64_t>(P, 1)), x(K + 1);
    std::vector<acc_t> ddiag(K, acc_t(0));
    for (int64_t b = begin; b < end; ++b) {
      softmax_pass<scalar_t, acc_t>(pb, b, s, has_target, tpow, nullptr);
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
          dots(F, s.ptrs.data(), n + 1, Cp, x.data());
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

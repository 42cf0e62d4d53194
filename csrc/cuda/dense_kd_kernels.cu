// Fused dense-KD CUDA kernels (no torch headers: `nvcc -c` compiles this file on its own).
//
// One 256-thread block per row b (all K exits of the row):
//   pass 1: per exit, an online max / sum-exp at T and at 1 over 16-byte vector loads, merged
//           across the warp with shuffles and across warps in shared memory (fixed order);
//   pass 2: the row in column tiles staged in shared memory as p = softmax(z / T) and u = z - max
//           for every exit; the KL of every selected pair accumulates there (work items = pair x
//           column segment, each owned by one thread, summed in a fixed order), and every exit's
//           gradient is written exactly once per column (coalesced). With detach_teacher=False
//           the teacher term needs each pair's KL first: pass 2 then runs twice (KL, then grad).
// The per-row losses are reduced over the batch by small deterministic kernels (no atomics), so
// results are run-to-run identical.
//
// Masked classes (-inf logits, or u = z - max overflowing to -inf) follow 0 · log 0 = 0: they add
// nothing to the sums of pass 1, and every product with p_j = 0 (or a teacher's p_i = 0) is skipped
// rather than formed as 0 · (-inf) = NaN; what remains infinite is true (a class at -inf in the student
// where the teacher has p_j > 0 gives KL = +inf). An exit with every class at -inf gives NaN.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "dense_kd_kernels.cuh"

namespace hdkd_fast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTile = 256;
constexpr int kDefaultSmem = 48 * 1024;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  static __device__ __forceinline__ float cvt(float x) { return x; }
};
template <>
struct FromAcc<double> {
  static __device__ __forceinline__ double cvt(double x) { return x; }
};
template <>
struct FromAcc<__half> {
  static __device__ __forceinline__ __half cvt(float x) { return __float2half_rn(x); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 cvt(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

// 16 bytes of scalar_t.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(scalar_t);
  scalar_t v[N];
};

// Load Pack<scalar_t>::N consecutive values of a row starting at `col` (a multiple of N) into
// x; lanes at or beyond C get `fill`.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ rowp, int64_t col, int64_t C, bool vec,
                                           acc_t* x, acc_t fill) {
  constexpr int N = Pack<scalar_t>::N;
  if (vec && col + N <= C) {
    const Pack<scalar_t> pk = *reinterpret_cast<const Pack<scalar_t>*>(rowp + col);
#pragma unroll
    for (int v = 0; v < N; ++v) x[v] = static_cast<acc_t>(to_acc(pk.v[v]));
  } else {
#pragma unroll
    for (int v = 0; v < N; ++v) x[v] = (col + v < C) ? static_cast<acc_t>(to_acc(rowp[col + v])) : fill;
  }
}

// Online max / sum-exp at 1/T (a) and at 1 (b).
template <typename acc_t>
struct Stat {
  acc_t m, a, b;
};

template <typename acc_t>
__device__ __forceinline__ void stat_add(Stat<acc_t>& s, acc_t x, acc_t invT, bool want_b) {
  if (x == neg_inf<acc_t>()) return;  // exp(-inf) = 0 (and x - s.m could be -inf - (-inf))
  if (x > s.m) {
    const acc_t d = s.m - x;  // -inf on the first element: exp(-inf) = 0
    s.a = s.a * dexp(d * invT) + acc_t(1);
    if (want_b) s.b = s.b * dexp(d) + acc_t(1);
    s.m = x;
  } else {
    const acc_t d = x - s.m;
    s.a += dexp(d * invT);
    if (want_b) s.b += dexp(d);
  }
}

template <typename acc_t>
__device__ __forceinline__ void stat_merge(Stat<acc_t>& s, const Stat<acc_t>& o, acc_t invT, bool want_b) {
  if (o.m == neg_inf<acc_t>()) return;
  if (s.m == neg_inf<acc_t>()) {
    s = o;
    return;
  }
  const acc_t M = s.m > o.m ? s.m : o.m;
  s.a = s.a * dexp((s.m - M) * invT) + o.a * dexp((o.m - M) * invT);
  if (want_b) s.b = s.b * dexp(s.m - M) + o.b * dexp(o.m - M);
  s.m = M;
}

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* exit_row(const Problem& pb, int k, int64_t row) {
  return static_cast<const scalar_t*>(pb.logits[k]) + row * pb.row_stride[k];
}

// Pass 1 of one row: st_m[k], st_lnsT[k] = log sum exp(u / T), st_lns1[k] = log sum exp(u).
// `red` is scratch of 3 * K * kWarps values. Ends with __syncthreads().
template <typename scalar_t, typename acc_t>
__device__ void row_stats(const Problem& pb, int64_t row, bool vec, bool want_b, acc_t* red, acc_t* st_m,
                          acc_t* st_lnsT, acc_t* st_lns1) {
  constexpr int N = Pack<scalar_t>::N;
  const int K = static_cast<int>(pb.K);
  const int64_t C = pb.C;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const acc_t invT = acc_t(1) / static_cast<acc_t>(pb.T);
  for (int k = 0; k < K; ++k) {
    const scalar_t* z = exit_row<scalar_t>(pb, k, row);
    Stat<acc_t> s{neg_inf<acc_t>(), acc_t(0), acc_t(0)};
    for (int64_t col = static_cast<int64_t>(t) * N; col < C; col += static_cast<int64_t>(kThreads) * N) {
      acc_t x[N];
      load_chunk<scalar_t, acc_t>(z, col, C, vec, x, neg_inf<acc_t>());
#pragma unroll
      for (int v = 0; v < N; ++v) {
        if (col + v < C) stat_add(s, x[v], invT, want_b);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      Stat<acc_t> o;
      o.m = __shfl_down_sync(0xffffffffu, s.m, off);
      o.a = __shfl_down_sync(0xffffffffu, s.a, off);
      o.b = __shfl_down_sync(0xffffffffu, s.b, off);
      stat_merge(s, o, invT, want_b);
    }
    if (lane == 0) {
      red[(0 * K + k) * kWarps + warp] = s.m;
      red[(1 * K + k) * kWarps + warp] = s.a;
      red[(2 * K + k) * kWarps + warp] = s.b;
    }
  }
  __syncthreads();
  if (t < K) {
    Stat<acc_t> s{neg_inf<acc_t>(), acc_t(0), acc_t(0)};
    for (int w = 0; w < kWarps; ++w) {
      const Stat<acc_t> o{red[(0 * K + t) * kWarps + w], red[(1 * K + t) * kWarps + w], red[(2 * K + t) * kWarps + w]};
      stat_merge(s, o, invT, want_b);
    }
    st_m[t] = s.m;
    st_lnsT[t] = dlog(s.a);
    st_lns1[t] = want_b ? dlog(s.b) : acc_t(0);
  }
  __syncthreads();
}

// Stage columns [c0, c0 + tile) of every exit: sp = softmax(z / T), su = z - max (0 past C);
// optionally sdz = the tangents.
template <typename scalar_t, typename acc_t>
__device__ void stage_tile(const Problem& pb, const void* const* tangents, const int64_t* tangent_stride,
                           int64_t row, int64_t c0, int tile, int ld, bool vec, const acc_t* st_m,
                           const acc_t* st_lnsT, acc_t* sp, acc_t* su, acc_t* sdz) {
  constexpr int N = Pack<scalar_t>::N;
  const int K = static_cast<int>(pb.K);
  const int64_t C = pb.C;
  const acc_t invT = acc_t(1) / static_cast<acc_t>(pb.T);
  const int chunks = tile / N;
  for (int idx = threadIdx.x; idx < K * chunks; idx += kThreads) {
    const int k = idx / chunks;
    const int v0 = (idx - k * chunks) * N;
    const int64_t col = c0 + v0;
    if (col >= C) continue;
    acc_t x[N];
    load_chunk<scalar_t, acc_t>(exit_row<scalar_t>(pb, k, row), col, C, vec, x, acc_t(0));
    const acc_t m = st_m[k], lT = st_lnsT[k];
#pragma unroll
    for (int v = 0; v < N; ++v) {
      const bool ok = col + v < C;
      const acc_t u = ok ? x[v] - m : acc_t(0);
      su[k * ld + v0 + v] = u;
      sp[k * ld + v0 + v] = ok ? dexp(u * invT - lT) : acc_t(0);
    }
    if (sdz) {
      const scalar_t* dz = static_cast<const scalar_t*>(tangents[k]) + row * tangent_stride[k];
      load_chunk<scalar_t, acc_t>(dz, col, C, vec, x, acc_t(0));
#pragma unroll
      for (int v = 0; v < N; ++v) sdz[k * ld + v0 + v] = x[v];
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    losses_kernel(Problem pb, LossArgs la, bool vec, int tile, int ld, int nseg) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int K = static_cast<int>(pb.K), P = static_cast<int>(pb.P);
  const int64_t B = pb.B, C = pb.C, row = blockIdx.x;
  const int t = threadIdx.x;
  const int nitems = P * nseg;
  acc_t* sp = reinterpret_cast<acc_t*>(smem_raw);  // [K][ld]
  acc_t* su = sp + K * ld;                          // [K][ld]
  acc_t* coef = su + K * ld;                        // [K][K]
  acc_t* beta = coef + K * K;                       // [K][K]
  acc_t* st_m = beta + K * K;
  acc_t* st_lnsT = st_m + K;
  acc_t* st_lns1 = st_lnsT + K;
  acc_t* wce = st_lns1 + K;
  acc_t* cteach = wce + K;
  acc_t* part = cteach + K;  // [nitems]
  acc_t* kl = part + nitems;  // [P]
  int* spairs = reinterpret_cast<int*>(kl + P);  // [2P]

  const bool has_target = pb.target != nullptr;
  const bool kd_grad = la.compute_grad && la.kd_w != nullptr;
  const bool teacher = kd_grad && !pb.detach_teacher;
  const bool ce_grad = la.compute_grad && has_target && la.ce_w != nullptr;
  const acc_t T = static_cast<acc_t>(pb.T), invT = acc_t(1) / T;
  const acc_t skd = T * static_cast<acc_t>(la.r_kd);
  acc_t r_ce = static_cast<acc_t>(la.r_ce);
  if (la.reduction == kMean && la.n_valid != nullptr) {
    const int64_t nv = *la.n_valid;
    r_ce = acc_t(1) / static_cast<acc_t>(nv > 1 ? nv : 1);
  }
  const int64_t y = has_target ? pb.target[row] : 0;
  const bool valid = has_target && y != pb.ignore_index;
  const acc_t* ce_w = static_cast<const acc_t*>(la.ce_w);
  const acc_t* kd_w = static_cast<const acc_t*>(la.kd_w);
  acc_t* ce_rows = static_cast<acc_t*>(la.ce_rows);
  acc_t* kl_rows = static_cast<acc_t*>(la.kl_rows);
  scalar_t* grad = static_cast<scalar_t*>(la.grad);

  for (int q = t; q < 2 * P; q += kThreads) spairs[q] = pb.pairs[q];
  row_stats<scalar_t, acc_t>(pb, row, vec, has_target, sp, st_m, st_lnsT, st_lns1);

  if (t < K) {  // the row's gradient coefficients of exit i = t, and its CE
    const int i = t;
    for (int j = 0; j < K; ++j) {
      coef[i * K + j] = acc_t(0);
      beta[i * K + j] = acc_t(0);
    }
    if (kd_grad) {
      acc_t W = 0, Wt = 0;
      for (int q = 0; q < P; ++q) {
        const int si = spairs[2 * q], tj = spairs[2 * q + 1];
        if (si != i && tj != i) continue;
        const acc_t w = kd_w[la.kd_w_rows ? (static_cast<int64_t>(si) * K + tj) * B + row : si * K + tj];
        if (si == i) {
          coef[i * K + tj] -= skd * w;
          W += w;
        } else if (teacher) {
          beta[i * K + si] -= w * invT;
          Wt += w;
        }
      }
      coef[i * K + i] += skd * W;
      beta[i * K + i] += Wt * invT;
    }
    wce[i] = (ce_grad && valid) ? ce_w[la.ce_w_rows ? static_cast<int64_t>(i) * B + row : i] * r_ce : acc_t(0);
    cteach[i] = acc_t(0);
    if (has_target) {
      acc_t ce = acc_t(0);
      if (valid) ce = st_lns1[i] - (static_cast<acc_t>(to_acc(exit_row<scalar_t>(pb, i, row)[y])) - st_m[i]);
      ce_rows[static_cast<int64_t>(i) * B + row] = ce;
    }
  }
  for (int w = t; w < nitems; w += kThreads) part[w] = acc_t(0);
  __syncthreads();

  const int passes = teacher ? 2 : 1;
  for (int pass = 0; pass < passes; ++pass) {
    const bool do_kl = pass == 0;
    const bool do_grad = la.compute_grad && pass == passes - 1;
    for (int64_t c0 = 0; c0 < C; c0 += tile) {
      const int n = static_cast<int>(C - c0 < tile ? C - c0 : tile);
      __syncthreads();  // the previous tile is consumed
      stage_tile<scalar_t, acc_t>(pb, nullptr, nullptr, row, c0, tile, ld, vec, st_m, st_lnsT, sp, su, nullptr);
      __syncthreads();
      if (do_kl) {
        for (int w = t; w < nitems; w += kThreads) {
          const int q = w % P, seg = w / P;
          const acc_t* pj = sp + spairs[2 * q + 1] * ld;
          const acc_t* uj = su + spairs[2 * q + 1] * ld;
          const acc_t* ui = su + spairs[2 * q] * ld;
          acc_t acc = part[w];
          for (int c = seg; c < n; c += nseg) {
            if (pj[c] != acc_t(0)) acc += pj[c] * (uj[c] - ui[c]);
          }
          part[w] = acc;
        }
      }
      if (do_grad) {
        for (int idx = t; idx < K * n; idx += kThreads) {
          const int i = idx / n, c = idx - i * n;
          acc_t g = acc_t(0);
          for (int j = 0; j < K; ++j) g += coef[i * K + j] * sp[j * ld + c];
          if (wce[i] != acc_t(0)) {
            g += wce[i] * dexp(su[i * ld + c] - st_lns1[i]);
            if (c0 + c == y) g -= wce[i];
          }
          if (teacher && sp[i * ld + c] != acc_t(0)) {
            acc_t v = cteach[i];
            for (int s = 0; s < K; ++s) {
              if (beta[i * K + s] != acc_t(0)) v += beta[i * K + s] * su[s * ld + c];
            }
            g += skd * sp[i * ld + c] * v;
          }
          grad[(static_cast<int64_t>(i) * B + row) * C + c0 + c] = FromAcc<scalar_t>::cvt(g);
        }
      }
    }
    if (do_kl) {
      __syncthreads();
      for (int q = t; q < P; q += kThreads) {
        acc_t d = acc_t(0);
        for (int s = 0; s < nseg; ++s) d += part[q + s * P];
        const int i = spairs[2 * q], j = spairs[2 * q + 1];
        const acc_t v = d * invT - st_lnsT[j] + st_lnsT[i];
        kl[q] = v;
        kl_rows[static_cast<int64_t>(q) * B + row] = v;
      }
      __syncthreads();
      if (teacher && t < K) {
        acc_t c = acc_t(0);
        for (int q = 0; q < P; ++q) {
          if (spairs[2 * q + 1] != t) continue;
          const int si = spairs[2 * q];
          const acc_t w = kd_w[la.kd_w_rows ? (static_cast<int64_t>(si) * K + t) * B + row : si * K + t];
          if (w != acc_t(0)) c += w * (st_lnsT[si] - st_lnsT[t] - kl[q]);  // a zero weight drops an infinite KL
        }
        cteach[t] = c;
      }
      __syncthreads();
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    jvp_kernel(Problem pb, JvpArgs ja, bool vec, int tile, int ld, int nseg) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int K = static_cast<int>(pb.K), P = static_cast<int>(pb.P);
  const int64_t B = pb.B, C = pb.C, row = blockIdx.x;
  const int t = threadIdx.x;
  const int Q = P + K;  // work item kinds: the pairs, then the exits
  const int nitems = Q * nseg;
  acc_t* sp = reinterpret_cast<acc_t*>(smem_raw);  // [K][ld]
  acc_t* su = sp + K * ld;
  acc_t* sdz = su + K * ld;
  acc_t* st_m = sdz + K * ld;
  acc_t* st_lnsT = st_m + K;
  acc_t* st_lns1 = st_lnsT + K;
  acc_t* part = st_lns1 + K;  // [3][nitems]
  acc_t* fin = part + 3 * nitems;  // [3][Q]
  int* spairs = reinterpret_cast<int*>(fin + 3 * Q);

  const bool has_target = pb.target != nullptr;
  const bool full = !pb.detach_teacher;
  const acc_t T = static_cast<acc_t>(pb.T), invT = acc_t(1) / T;
  const int64_t y = has_target ? pb.target[row] : 0;
  const bool valid = has_target && y != pb.ignore_index;

  for (int q = t; q < 2 * P; q += kThreads) spairs[q] = pb.pairs[q];
  row_stats<scalar_t, acc_t>(pb, row, vec, has_target, sp, st_m, st_lnsT, st_lns1);
  for (int w = t; w < 3 * nitems; w += kThreads) part[w] = acc_t(0);

  for (int64_t c0 = 0; c0 < C; c0 += tile) {
    const int n = static_cast<int>(C - c0 < tile ? C - c0 : tile);
    __syncthreads();
    stage_tile<scalar_t, acc_t>(pb, ja.tangents, ja.tangent_stride, row, c0, tile, ld, vec, st_m, st_lnsT, sp, su,
                                sdz);
    __syncthreads();
    for (int w = t; w < nitems; w += kThreads) {
      const int q = w % Q, seg = w / Q;
      acc_t a0 = part[w], a1 = part[nitems + w], a2 = part[2 * nitems + w];
      if (q < P) {
        const int i = spairs[2 * q], j = spairs[2 * q + 1];
        const acc_t *pj = sp + j * ld, *dzi = sdz + i * ld;
        for (int c = seg; c < n; c += nseg) a0 += pj[c] * dzi[c];  // <p_j, dz_i>
        if (full) {
          const acc_t *uj = su + j * ld, *ui = su + i * ld, *dzj = sdz + j * ld;
          for (int c = seg; c < n; c += nseg) {
            if (pj[c] == acc_t(0)) continue;
            const acc_t d = pj[c] * (uj[c] - ui[c]);
            a1 += d * dzj[c];  // <p_j (u_j - u_i), dz_j>
            a2 += d;           // sum p_j (u_j - u_i)
          }
        }
      } else {
        const int k = q - P;
        const acc_t *pk = sp + k * ld, *dzk = sdz + k * ld, *uk = su + k * ld;
        for (int c = seg; c < n; c += nseg) a0 += pk[c] * dzk[c];  // <p_k, dz_k>
        if (has_target) {
          for (int c = seg; c < n; c += nseg) a1 += dexp(uk[c] - st_lns1[k]) * dzk[c];  // <q_k, dz_k>
        }
      }
      part[w] = a0;
      part[nitems + w] = a1;
      part[2 * nitems + w] = a2;
    }
  }
  __syncthreads();
  for (int q = t; q < Q; q += kThreads) {
    acc_t f0 = 0, f1 = 0, f2 = 0;
    for (int s = 0; s < nseg; ++s) {
      f0 += part[q + s * Q];
      f1 += part[nitems + q + s * Q];
      f2 += part[2 * nitems + q + s * Q];
    }
    fin[q] = f0;
    fin[Q + q] = f1;
    fin[2 * Q + q] = f2;
  }
  __syncthreads();
  acc_t* dkd_rows = static_cast<acc_t*>(ja.dkd_rows);
  for (int q = t; q < P; q += kThreads) {
    const int i = spairs[2 * q], j = spairs[2 * q + 1];
    const acc_t own_i = fin[P + i], own_j = fin[P + j];
    acc_t v = T * (own_i - fin[q]);
    if (full) {
      const acc_t klv = fin[2 * Q + q] * invT - st_lnsT[j] + st_lnsT[i];
      const acc_t a = fin[Q + q] * invT + (st_lnsT[i] - st_lnsT[j]) * own_j;
      v += T * (a - klv * own_j);
    }
    dkd_rows[static_cast<int64_t>(q) * B + row] = v;
  }
  if (has_target && t < K) {
    acc_t v = acc_t(0);
    if (valid) {
      const scalar_t* dz = static_cast<const scalar_t*>(ja.tangents[t]) + row * ja.tangent_stride[t];
      v = fin[Q + P + t] - static_cast<acc_t>(to_acc(dz[y]));
    }
    static_cast<acc_t*>(ja.dce_rows)[static_cast<int64_t>(t) * B + row] = v;
  }
}

// ---- deterministic batch reductions -------------------------------------------------------

__device__ __forceinline__ double block_sum(double v, double* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double s = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) s += red[w];
  }
  return s;  // valid in thread 0
}

__global__ void __launch_bounds__(kThreads) count_valid_kernel(const int64_t* target, int64_t B, int64_t ignore,
                                                               int64_t* out) {
  __shared__ double red[kWarps];
  double n = 0;
  for (int64_t b = threadIdx.x; b < B; b += kThreads) n += target[b] != ignore ? 1.0 : 0.0;
  const double s = block_sum(n, red);
  if (threadIdx.x == 0) *out = static_cast<int64_t>(s + 0.5);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) reduce_ce_kernel(const acc_t* rows, int64_t B, double scale,
                                                             const int64_t* n_valid, acc_t* out) {
  __shared__ double red[kWarps];
  const int64_t k = blockIdx.x;
  double v = 0;
  for (int64_t b = threadIdx.x; b < B; b += kThreads) v += static_cast<double>(rows[k * B + b]);
  const double s = block_sum(v, red);
  if (threadIdx.x == 0) {
    double d = 1;
    if (n_valid != nullptr) d = *n_valid > 1 ? static_cast<double>(*n_valid) : 1.0;
    out[k] = static_cast<acc_t>(s * scale / d);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) reduce_kd_kernel(const acc_t* rows, const int32_t* pairs, int64_t K,
                                                             int64_t B, double scale, bool keep_rows, acc_t* out) {
  __shared__ double red[kWarps];
  const int64_t q = blockIdx.x;
  const int64_t flat = static_cast<int64_t>(pairs[2 * q]) * K + pairs[2 * q + 1];
  if (keep_rows) {
    for (int64_t b = threadIdx.x; b < B; b += kThreads) {
      out[flat * B + b] = static_cast<acc_t>(scale * static_cast<double>(rows[q * B + b]));
    }
    return;
  }
  double v = 0;
  for (int64_t b = threadIdx.x; b < B; b += kThreads) v += static_cast<double>(rows[q * B + b]);
  const double s = block_sum(v, red);
  if (threadIdx.x == 0) out[flat] = static_cast<acc_t>(scale * s);
}

// ---- launch helpers -----------------------------------------------------------------------

// Largest tile (a multiple of 32, at most kMaxTile) whose shared memory fits `limit` bytes.
int pick_tile(int64_t K, int nbuf, size_t acc_size, size_t extra, size_t limit) {
  for (int tile = kMaxTile; tile >= 32; tile -= 32) {
    const size_t bytes = static_cast<size_t>(nbuf) * K * (tile + 1) * acc_size + extra;
    if (bytes <= limit) return tile;
  }
  return 0;
}

template <typename Kernel>
cudaError_t configure(Kernel kernel, int64_t K, int nbuf, size_t acc_size, size_t extra, int* tile, size_t* bytes) {
  size_t limit = kDefaultSmem;
  *tile = pick_tile(K, nbuf, acc_size, extra, limit);
  if (*tile < 64) {  // try the opt-in shared memory of the device
    int dev = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return err;
    if (static_cast<size_t>(optin) > limit) {
      const int bigger = pick_tile(K, nbuf, acc_size, extra, static_cast<size_t>(optin));
      if (bigger > *tile) {
        *tile = bigger;
        limit = static_cast<size_t>(optin);
      }
    }
  }
  if (*tile == 0) return cudaErrorInvalidValue;  // too many exits for one block's shared memory
  *bytes = static_cast<size_t>(nbuf) * K * (*tile + 1) * acc_size + extra;
  if (*bytes > static_cast<size_t>(kDefaultSmem)) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(*bytes));
  }
  return cudaSuccess;
}

int segments(int64_t items) { return items >= kThreads ? 1 : static_cast<int>(kThreads / (items > 0 ? items : 1)); }

template <typename scalar_t, typename acc_t>
cudaError_t losses_typed(const Problem& pb, const LossArgs& la, bool vec, cudaStream_t stream) {
  const int nseg = segments(pb.P);
  const int64_t nitems = pb.P * nseg;
  const size_t extra = (2 * pb.K * pb.K + 5 * pb.K + nitems + pb.P) * sizeof(acc_t) + 2 * pb.P * sizeof(int) + 16;
  auto kernel = losses_kernel<scalar_t, acc_t>;
  int tile = 0;
  size_t bytes = 0;
  cudaError_t err = configure(kernel, pb.K, 2, sizeof(acc_t), extra, &tile, &bytes);
  if (err != cudaSuccess) return err;
  // The pass-1 scratch (3 K kWarps values) aliases the tiles.
  kernel<<<static_cast<unsigned>(pb.B), kThreads, bytes, stream>>>(pb, la, vec, tile, tile + 1, nseg);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t jvp_typed(const Problem& pb, const JvpArgs& ja, bool vec, cudaStream_t stream) {
  const int64_t Q = pb.P + pb.K;
  const int nseg = segments(Q);
  const int64_t nitems = Q * nseg;
  const size_t extra = (3 * pb.K + 3 * nitems + 3 * Q) * sizeof(acc_t) + 2 * pb.P * sizeof(int) + 16;
  auto kernel = jvp_kernel<scalar_t, acc_t>;
  int tile = 0;
  size_t bytes = 0;
  cudaError_t err = configure(kernel, pb.K, 3, sizeof(acc_t), extra, &tile, &bytes);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(pb.B), kThreads, bytes, stream>>>(pb, ja, vec, tile, tile + 1, nseg);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_losses_and_grad(const Problem& pb, const LossArgs& la, bool vectorized, cudaStream_t stream) {
  if (pb.B == 0) return cudaSuccess;
  switch (pb.dtype) {
    case Dtype::kHalf: return losses_typed<__half, float>(pb, la, vectorized, stream);
    case Dtype::kBFloat16: return losses_typed<__nv_bfloat16, float>(pb, la, vectorized, stream);
    case Dtype::kFloat: return losses_typed<float, float>(pb, la, vectorized, stream);
    case Dtype::kDouble: return losses_typed<double, double>(pb, la, vectorized, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_jvp(const Problem& pb, const JvpArgs& ja, bool vectorized, cudaStream_t stream) {
  if (pb.B == 0) return cudaSuccess;
  switch (pb.dtype) {
    case Dtype::kHalf: return jvp_typed<__half, float>(pb, ja, vectorized, stream);
    case Dtype::kBFloat16: return jvp_typed<__nv_bfloat16, float>(pb, ja, vectorized, stream);
    case Dtype::kFloat: return jvp_typed<float, float>(pb, ja, vectorized, stream);
    case Dtype::kDouble: return jvp_typed<double, double>(pb, ja, vectorized, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_count_valid(const int64_t* target, int64_t B, int64_t ignore_index, int64_t* n_valid,
                               cudaStream_t stream) {
  count_valid_kernel<<<1, kThreads, 0, stream>>>(target, B, ignore_index, n_valid);
  return cudaGetLastError();
}

cudaError_t launch_reduce_ce(const void* rows, int64_t K, int64_t B, double scale, const int64_t* n_valid, void* out,
                             bool double_acc, cudaStream_t stream) {
  if (double_acc) {
    reduce_ce_kernel<double><<<static_cast<unsigned>(K), kThreads, 0, stream>>>(
        static_cast<const double*>(rows), B, scale, n_valid, static_cast<double*>(out));
  } else {
    reduce_ce_kernel<float><<<static_cast<unsigned>(K), kThreads, 0, stream>>>(
        static_cast<const float*>(rows), B, scale, n_valid, static_cast<float*>(out));
  }
  return cudaGetLastError();
}

cudaError_t launch_reduce_kd(const void* rows, const int32_t* pairs, int64_t P, int64_t K, int64_t B, double scale,
                             bool keep_rows, void* out, bool double_acc, cudaStream_t stream) {
  if (P == 0) return cudaSuccess;
  if (double_acc) {
    reduce_kd_kernel<double><<<static_cast<unsigned>(P), kThreads, 0, stream>>>(
        static_cast<const double*>(rows), pairs, K, B, scale, keep_rows, static_cast<double*>(out));
  } else {
    reduce_kd_kernel<float><<<static_cast<unsigned>(P), kThreads, 0, stream>>>(
        static_cast<const float*>(rows), pairs, K, B, scale, keep_rows, static_cast<float*>(out));
  }
  return cudaGetLastError();
}

int kernel_binary_version(int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return -1;
  if (cudaSetDevice(device) != cudaSuccess) return -1;
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, losses_kernel<float, float>);
  cudaSetDevice(previous);
  return err == cudaSuccess ? attr.binaryVersion : -1;
}

}  // namespace hdkd_fast::cuda

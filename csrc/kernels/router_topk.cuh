// Torch-free CUDA kernels of the fused router: one pass over logits [T, E] computes, per
// row, the logsumexp, the full softmax (accumulated into per-expert partial sums), the
// top-k ids (on the logits, NaN read as -inf, ties to the lower index) and the gate
// weights; per-block partial sums and counts are then reduced in a fixed order by a second
// tiny kernel, so every output is bitwise reproducible (no atomics at all). A row with +inf
// logits gets the softmax's limit (probability split equally over its +inf entries, lse +inf).
#pragma once

#include <climits>

#include "common.cuh"

namespace moelora {
namespace kernels {

// Upper bound on router blocks (= number of partial-sum rows): fixed, so the reduction
// order, hence the bits of prob_sums, depend only on (T, E) and not on the GPU.
constexpr int kRouterMaxBlocks = 1024;
constexpr int kRouterReduceThreads = 256;

// Warps per router block: each warp keeps 2 acc-typed and 1 int32 array of E entries in
// shared memory.
inline int router_warps_per_block(int64_t E) {
  int64_t w = 4096 / E;
  return static_cast<int>(w < 1 ? 1 : (w > 8 ? 8 : w));
}
template <typename A> inline size_t router_smem_bytes(int64_t E) {
  return static_cast<size_t>(router_warps_per_block(E)) * E * (2 * sizeof(A) + sizeof(int32_t));
}
inline int64_t router_num_blocks(int64_t T, int64_t E) {
  const int64_t b = ceil_div(T, router_warps_per_block(E));
  return b < kRouterMaxBlocks ? b : kRouterMaxBlocks;
}

// exp(v - m), or its limit 1 / 0 (v = +inf / v finite) when the row maximum m is +inf.
template <typename A> __device__ __forceinline__ A shifted_exp(A v, A m, bool infinite) {
  return infinite ? (v == m ? A(1) : A(0)) : exp_acc(v - m);
}

// Grid: router_num_blocks(T, E) blocks of 32 * router_warps_per_block(E) threads; warp w of
// block b handles rows t = b*W + w, stepping by gridDim.x*W; dynamic shared memory
// router_smem_bytes<A>(E). Writes weights/ids [T, k], lse [T] and, per block b,
// part_sum/part_cnt [b, E].
template <typename T, typename A>
__global__ void router_topk_kernel(const T* __restrict__ logits, int64_t num_rows, int E, int k,
                                   int mode, bool renormalize, A* __restrict__ weights,
                                   int32_t* __restrict__ ids, A* __restrict__ lse,
                                   A* __restrict__ part_sum, int32_t* __restrict__ part_cnt) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int W = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  A* vals = reinterpret_cast<A*>(smem_raw) + static_cast<int64_t>(warp) * E;
  A* psum = reinterpret_cast<A*>(smem_raw) + static_cast<int64_t>(W + warp) * E;
  int32_t* cnt = reinterpret_cast<int32_t*>(reinterpret_cast<A*>(smem_raw) + 2 * static_cast<int64_t>(W) * E) +
                 static_cast<int64_t>(warp) * E;
  for (int e = lane; e < E; e += kWarpSize) {
    psum[e] = A(0);
    cnt[e] = 0;
  }
  __syncwarp();
  const A ninf = neg_inf<A>();
  const bool normalize = renormalize || mode == 1;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * W + warp; t < num_rows;
       t += static_cast<int64_t>(gridDim.x) * W) {
    const T* row = logits + t * E;
    A m = ninf;
    for (int e = lane; e < E; e += kWarpSize) {
      A v = to_acc(row[e]);
      if (isnan(v)) v = ninf;
      vals[e] = v;
      m = fmax(m, v);
    }
    m = warp_max(m);
    const bool masked = (m == ninf);
    const bool infinite = (m == -ninf);  // +inf logits: the softmax's limit, 1 on those, 0 elsewhere
    A s = A(0);
    if (!masked) {
      for (int e = lane; e < E; e += kWarpSize) s += shifted_exp(vals[e], m, infinite);
      s = warp_sum(s);
    }
    if (lane == 0) lse[t] = (masked || infinite) ? m : m + log_acc(s);
    for (int e = lane; e < E; e += kWarpSize) psum[e] += masked ? A(0) : shifted_exp(vals[e], m, infinite) / s;
    __syncwarp();

    // k rounds of a warp-wide argmax; a chosen entry is marked NaN (no real value is NaN now).
    A top = ninf, total = A(0);
    for (int j = 0; j < k; ++j) {
      A best_v = ninf;
      int best_i = INT_MAX;
      for (int e = lane; e < E; e += kWarpSize) {
        const A v = vals[e];
        if (!isnan(v) && (v > best_v || (v == best_v && e < best_i))) {
          best_v = v;
          best_i = e;
        }
      }
#pragma unroll
      for (int o = kWarpSize / 2; o > 0; o >>= 1) {
        const A ov = __shfl_xor_sync(kFullMask, best_v, o);
        const int oi = __shfl_xor_sync(kFullMask, best_i, o);
        if (ov > best_v || (ov == best_v && oi < best_i)) {
          best_v = ov;
          best_i = oi;
        }
      }
      // k <= E guarantees an unchosen entry, so best_i is in [0, E) here.
      if (j == 0) top = best_v;
      A w;
      if (mode == 0) {
        w = masked ? A(0) : shifted_exp(best_v, m, infinite) / s;
      } else if (top == -ninf) {
        w = best_v == top ? A(1) : A(0);
      } else {
        w = (top == ninf) ? A(0) : exp_acc(best_v - top);
      }
      total += w;
      if (lane == 0) {
        weights[t * k + j] = w;
        ids[t * k + j] = best_i;
      }
      if (lane == best_i % kWarpSize) {
        vals[best_i] = A(NAN);
        cnt[best_i] += 1;
      }
      __syncwarp();
    }
    if (normalize) {
      for (int j = lane; j < k; j += kWarpSize) {
        const A w = weights[t * k + j];
        weights[t * k + j] = total > A(0) ? w / total : A(0);
      }
    }
    __syncwarp();
  }
  __syncthreads();
  // Per-block partials: warps combined in order 0..W-1.
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    A s = A(0);
    int32_t c = 0;
    for (int w = 0; w < W; ++w) {
      s += reinterpret_cast<A*>(smem_raw)[static_cast<int64_t>(W + w) * E + e];
      c += reinterpret_cast<int32_t*>(reinterpret_cast<A*>(smem_raw) + 2 * static_cast<int64_t>(W) * E)
          [static_cast<int64_t>(w) * E + e];
    }
    part_sum[static_cast<int64_t>(blockIdx.x) * E + e] = s;
    part_cnt[static_cast<int64_t>(blockIdx.x) * E + e] = c;
  }
}

// Grid: E blocks of kRouterReduceThreads threads; block e sums part_sum/part_cnt[:, e] over
// num_blocks rows (strided per thread, then a fixed shared-memory tree).
template <typename A>
__global__ void router_stats_reduce_kernel(const A* __restrict__ part_sum, const int32_t* __restrict__ part_cnt,
                                           int num_blocks, int E, A* __restrict__ prob_sums,
                                           int64_t* __restrict__ counts) {
  __shared__ A s_sum[kRouterReduceThreads];
  __shared__ int64_t s_cnt[kRouterReduceThreads];
  const int e = blockIdx.x;
  A s = A(0);
  int64_t c = 0;
  for (int b = threadIdx.x; b < num_blocks; b += blockDim.x) {
    s += part_sum[static_cast<int64_t>(b) * E + e];
    c += part_cnt[static_cast<int64_t>(b) * E + e];
  }
  s_sum[threadIdx.x] = s;
  s_cnt[threadIdx.x] = c;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) {
      s_sum[threadIdx.x] += s_sum[threadIdx.x + h];
      s_cnt[threadIdx.x] += s_cnt[threadIdx.x + h];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    prob_sums[e] = s_sum[0];
    counts[e] = s_cnt[0];
  }
}

// Launches both kernels on `stream`. part_sum/part_cnt: scratch of router_num_blocks(T, E) * E
// entries. Requires 1 <= k <= E <= 4096.
template <typename T, typename A>
cudaError_t launch_router_topk(const T* logits, int64_t num_rows, int E, int k, int mode, bool renormalize,
                               A* weights, int32_t* ids, A* lse, A* part_sum, int32_t* part_cnt,
                               A* prob_sums, int64_t* counts, cudaStream_t stream) {
  const int64_t blocks = router_num_blocks(num_rows, E);
  if (blocks > 0) {
    const size_t smem = router_smem_bytes<A>(E);
    if (smem > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(router_topk_kernel<T, A>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    router_topk_kernel<T, A><<<static_cast<unsigned>(blocks), kWarpSize * router_warps_per_block(E), smem,
                               stream>>>(logits, num_rows, E, k, mode, renormalize, weights, ids, lse,
                                         part_sum, part_cnt);
  }
  router_stats_reduce_kernel<A><<<E, kRouterReduceThreads, 0, stream>>>(
      part_sum, part_cnt, static_cast<int>(blocks), E, prob_sums, counts);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace moelora

// Torch-free CUDA kernels of token dispatch:
//   metadata: a stable, atomic-free counting sort of the pairs p = t*k + j by expert id.
//     Pass 1 (histogram): warp c counts the ids of chunk c of the pairs -> hist[e, c].
//     Prefix: exclusive scan of hist in expert-major order (done by the caller) gives
//       base[e, c] = (pairs of experts < e) + (pairs of expert e in chunks < c).
//     Pass 2 (place): warp c walks its chunk 32 pairs at a time; the rank of a pair among
//       the earlier pairs of its expert comes from __match_any_sync + popc, so the order
//       within an expert is increasing p. Ids outside [0, E) are skipped (inverse = -1).
//   block_expert: expert of each block_size-row block of the padded layout.
//   Offsets are int64; the caller bounds block_size (<= moelora::kMaxBlockSize, checked in
//   csrc/ops.cpp), so padded offsets and b * block_size stay far inside int64.
//   dispatch / combine / pair_dot: row gathers, a fixed-order weighted sum per token and the
//     per-pair dot product, with fp32 (fp64 for fp64 data) accumulation.
#pragma once

#include "common.cuh"

namespace moelora {
namespace kernels {

// Warps (= chunks) per metadata block: each keeps E int64 counters in shared memory (<= 48 KiB).
inline int meta_warps_per_block(int64_t E) {
  const int64_t w = 6144 / E;
  return static_cast<int>(w < 1 ? 1 : (w > 4 ? 4 : w));
}

// Pairs per chunk: grows with E so that hist (E x chunks) stays below ~N/4 entries.
inline int64_t meta_chunk_size(int64_t E) { return 1024 * ceil_div(E, 256); }

template <typename I> __device__ __forceinline__ int load_expert(const I* ids, int64_t p, int64_t chunk_end, int E) {
  if (p >= chunk_end) return -1;
  const int64_t e = static_cast<int64_t>(ids[p]);
  return (e >= 0 && e < E) ? static_cast<int>(e) : -1;
}

// Grid: ceil(num_chunks / W) blocks of W = meta_warps_per_block(E) warps; warp c (global) counts chunk c of the pairs
// into shared counters (E int32 per warp), then writes hist[e * num_chunks + c].
template <typename I>
__global__ void meta_histogram_kernel(const I* __restrict__ ids, int64_t num_pairs, int E, int64_t chunk,
                                      int64_t num_chunks, int32_t* __restrict__ hist) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (c >= num_chunks) return;  // whole warp leaves; no block-wide barrier below
  int32_t* cnt = reinterpret_cast<int32_t*>(smem_raw) + static_cast<int64_t>(warp) * E;
  for (int e = lane; e < E; e += kWarpSize) cnt[e] = 0;
  __syncwarp();
  const int64_t begin = c * chunk;
  const int64_t end = begin + chunk < num_pairs ? begin + chunk : num_pairs;
  for (int64_t base = begin; base < end; base += kWarpSize) {
    const int e = load_expert(ids, base + lane, end, E);
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(peers) - 1) cnt[e] += __popc(peers);
    __syncwarp();
  }
  for (int e = lane; e < E; e += kWarpSize) hist[static_cast<int64_t>(e) * num_chunks + c] = cnt[e];
}

// Grid: as meta_histogram_kernel (int64 shared counters). base: exclusive scan of hist.
// offsets/padded_offsets: [E + 1]; padded outputs are skipped when sorted_padded is null.
template <typename I>
__global__ void meta_place_kernel(const I* __restrict__ ids, int64_t num_pairs, int E, int64_t chunk,
                                  int64_t num_chunks, const int64_t* __restrict__ base,
                                  const int64_t* __restrict__ offsets, const int64_t* __restrict__ padded_offsets,
                                  int64_t* __restrict__ sorted_pairs, int64_t* __restrict__ inverse,
                                  int64_t* __restrict__ sorted_padded, int64_t* __restrict__ inverse_padded) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (c >= num_chunks) return;
  int64_t* next = reinterpret_cast<int64_t*>(smem_raw) + static_cast<int64_t>(warp) * E;
  for (int e = lane; e < E; e += kWarpSize) next[e] = base[static_cast<int64_t>(e) * num_chunks + c];
  __syncwarp();
  const int64_t begin = c * chunk;
  const int64_t end = begin + chunk < num_pairs ? begin + chunk : num_pairs;
  const unsigned lower = (1u << lane) - 1u;
  for (int64_t b0 = begin; b0 < end; b0 += kWarpSize) {
    const int64_t p = b0 + lane;
    const int e = load_expert(ids, p, end, E);
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0) {
      const int64_t pos = next[e] + __popc(peers & lower);
      sorted_pairs[pos] = p;
      inverse[p] = pos;
      if (sorted_padded != nullptr) {
        const int64_t ppos = padded_offsets[e] + (pos - offsets[e]);
        sorted_padded[ppos] = p;
        inverse_padded[p] = ppos;
      }
    } else if (p < end) {
      inverse[p] = -1;
      if (inverse_padded != nullptr) inverse_padded[p] = -1;
    }
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) next[e] += __popc(peers);
    __syncwarp();
  }
}

// Grid: ceil(num_blocks / 256) blocks of 256 threads, one thread per padded block b:
// block_expert[b] = the expert whose padded segment holds row b*block_size, or -1.
__global__ void block_expert_kernel(const int64_t* __restrict__ padded_offsets, int E, int64_t block_size,
                                    int64_t num_blocks, int32_t* __restrict__ block_expert) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= num_blocks) return;
  const int64_t start = b * block_size;
  if (start >= padded_offsets[E]) {
    block_expert[b] = -1;
    return;
  }
  int lo = 0, hi = E;  // invariant: padded_offsets[lo] <= start < padded_offsets[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (padded_offsets[mid] <= start) lo = mid; else hi = mid;
  }
  block_expert[b] = lo;
}

inline int64_t meta_num_blocks(int64_t num_chunks, int64_t E) {
  return ceil_div(num_chunks, meta_warps_per_block(E));
}

// Launchers of the two metadata passes (the caller scans hist in between).
template <typename I>
cudaError_t launch_meta_histogram(const I* ids, int64_t num_pairs, int E, int32_t* hist, cudaStream_t stream) {
  const int64_t chunk = meta_chunk_size(E), chunks = ceil_div(num_pairs, chunk);
  if (chunks == 0) return cudaSuccess;
  const int W = meta_warps_per_block(E);
  meta_histogram_kernel<I><<<static_cast<unsigned>(meta_num_blocks(chunks, E)), W * kWarpSize,
                             W * E * sizeof(int32_t), stream>>>(ids, num_pairs, E, chunk, chunks,
                                                                                 hist);
  return cudaGetLastError();
}

template <typename I>
cudaError_t launch_meta_place(const I* ids, int64_t num_pairs, int E, const int64_t* base, const int64_t* offsets,
                              const int64_t* padded_offsets, int64_t* sorted_pairs, int64_t* inverse,
                              int64_t* sorted_padded, int64_t* inverse_padded, cudaStream_t stream) {
  const int64_t chunk = meta_chunk_size(E), chunks = ceil_div(num_pairs, chunk);
  if (chunks == 0) return cudaSuccess;
  const int W = meta_warps_per_block(E);
  meta_place_kernel<I><<<static_cast<unsigned>(meta_num_blocks(chunks, E)), W * kWarpSize,
                         W * E * sizeof(int64_t), stream>>>(
      ids, num_pairs, E, chunk, chunks, base, offsets, padded_offsets, sorted_pairs, inverse, sorted_padded,
      inverse_padded);
  return cudaGetLastError();
}

inline cudaError_t launch_block_expert(const int64_t* padded_offsets, int E, int64_t block_size, int64_t num_blocks,
                                       int32_t* block_expert, cudaStream_t stream) {
  if (num_blocks == 0) return cudaSuccess;
  block_expert_kernel<<<static_cast<unsigned>(ceil_div(num_blocks, 256)), 256, 0, stream>>>(
      padded_offsets, E, block_size, num_blocks, block_expert);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------
// Row movement. Rows are processed by blocks stepping over [0, rows) by gridDim.x.
constexpr int kRowThreads = 256;
constexpr int64_t kMaxRowBlocks = 65535;

inline unsigned row_grid(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxRowBlocks ? rows : kMaxRowBlocks);
}

// Grid: row_grid(P) blocks of kRowThreads; out[i, :] = w[p] * x[p / k, :] for p = sorted_pairs[i]
// in [0, N), else zeros. V is the element type or a 16-byte vector when w is null.
template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ sorted_pairs, int64_t P,
                                   int64_t num_pairs, int64_t k, int64_t width, V* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < P; r += gridDim.x) {
    const int64_t p = sorted_pairs[r];
    V* orow = out + r * width;
    if (p < 0 || p >= num_pairs) {
      for (int64_t c = threadIdx.x; c < width; c += blockDim.x) orow[c] = V{};
      continue;
    }
    const V* xrow = x + (p / k) * width;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) orow[c] = xrow[c];
  }
}

template <typename T>
__global__ void gather_rows_weighted_kernel(const T* __restrict__ x, const int64_t* __restrict__ sorted_pairs,
                                            const acc_t<T>* __restrict__ w, int64_t P, int64_t num_pairs, int64_t k,
                                            int64_t d, T* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < P; r += gridDim.x) {
    const int64_t p = sorted_pairs[r];
    T* orow = out + r * d;
    if (p < 0 || p >= num_pairs) {
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) orow[c] = zero_value<T>();
      continue;
    }
    const T* xrow = x + (p / k) * d;
    const acc_t<T> g = w[p];
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) orow[c] = from_acc<T>(g * to_acc(xrow[c]));
  }
}

// Grid: row_grid(T) blocks of kRowThreads; out[t, c] = sum_{j<k} w[t,j] * y[inverse[t,j], c] with j in
// order (weight 1 when w is null); positions outside [0, P) contribute nothing.
template <typename T>
__global__ void combine_kernel(const T* __restrict__ y, const int64_t* __restrict__ inverse,
                               const acc_t<T>* __restrict__ w, int64_t T_rows, int64_t k, int64_t P, int64_t d,
                               T* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < T_rows; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      acc_t<T> a = acc_t<T>(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t pos = inverse[t * k + j];
        if (pos < 0 || pos >= P) continue;
        const acc_t<T> v = to_acc(y[pos * d + c]);
        a += (w == nullptr) ? v : w[t * k + j] * v;
      }
      out[t * d + c] = from_acc<T>(a);
    }
  }
}

// Grid: row_grid(ceil(N / 8)) blocks of 8 warps, one warp per pair q = t*k + j:
// out[q] = <a[t], b[inverse[q]]> (0 when the position is outside [0, P)), reduced by warp_sum.
template <typename T>
__global__ void pair_dot_kernel(const T* __restrict__ a, const T* __restrict__ b, const int64_t* __restrict__ inverse,
                                int64_t num_pairs, int64_t k, int64_t P, int64_t d, acc_t<T>* __restrict__ out) {
  const int warps = blockDim.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarpSize; q < num_pairs;
       q += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t pos = inverse[q];
    acc_t<T> s = acc_t<T>(0);
    if (pos >= 0 && pos < P) {
      const T* arow = a + (q / k) * d;
      const T* brow = b + pos * d;
      for (int64_t c = lane; c < d; c += kWarpSize) s += to_acc(arow[c]) * to_acc(brow[c]);
    }
    s = warp_sum(s);
    if (lane == 0) out[q] = s;
  }
}

}  // namespace kernels
}  // namespace moelora

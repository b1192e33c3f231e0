// CUDA helpers of tarp_fast for the Triton path: row compaction for hard gates, task grouping
// and segmented per-task sums (schemas in tarp_ops.cpp).
//
// Every op here has outputs whose shapes depend only on input shapes (never on values), reads
// counts and offsets on the device and never copies to the host, so it neither syncs nor breaks
// CUDA-graph capture. Memory comes from the caching allocator on the current stream.
//
// Stable counting sort (used by compact_rows and group_by_task), for keys in [0, B):
//   1. hist:    one warp per chunk of CHUNK rows counts its keys in shared memory and writes
//               hist[k * nchunks + c] (key-major, so an exclusive scan gives each (key, chunk) its
//               first output slot: all rows of smaller keys, then the same key in earlier chunks).
//   2. scan:    one block scans hist in place (exclusive) and derives counts[B], offsets[B + 1].
//   3. scatter: each chunk's warp walks its rows in order, 32 at a time; lanes with equal keys
//               find each other with __match_any_sync, take consecutive slots by lane order and
//               the lowest lane advances the key's cursor. Order within a key is row order.
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE
// headers that a minimal CUDA toolkit lacks). One warp per chunk keeps the ranking exact without block-wide scans; the sort moves M int64s
// three times, which is negligible next to the GEMMs it feeds. Requires sm_70+ (match_any).
// Narrow ATen headers instead of <ATen/ATen.h>: nvcc parses the host code once per arch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "tarp_checks.h"

namespace tarp_fast {
namespace {

using at::Tensor;

constexpr int kWarp = 32;
constexpr int kChunk = 1024;  // rows per warp in the sort: 32 steps of 32 rows
constexpr int kScanThreads = 1024;
constexpr int64_t kMaxBuckets = 8192;  // shared int32 cursors per warp: 32 KiB

// Key of row m: the task (or 0 for compaction), or B - 1 ("dropped") when the gate is 0 or the
// task is out of range. Out-of-range tasks cannot be reported without a sync; they are dropped
// instead of indexing out of bounds.
template <typename gate_t>
__device__ __forceinline__ int row_key(int64_t m, const int64_t* task, const gate_t* gate, int nbuckets) {
  const int dropped = nbuckets - 1;
  if (gate != nullptr && static_cast<float>(gate[m]) == 0.0f) return dropped;
  if (task == nullptr) return 0;
  const int64_t t = task[m];
  return (t < 0 || t >= dropped) ? dropped : static_cast<int>(t);
}

template <typename gate_t>
__global__ void sort_hist_kernel(const int64_t* __restrict__ task, const gate_t* __restrict__ gate, int64_t M,
                                 int nbuckets, int64_t nchunks, int32_t* __restrict__ hist) {
  extern __shared__ int32_t cnt[];
  const int64_t c = blockIdx.x;
  for (int k = threadIdx.x; k < nbuckets; k += kWarp) cnt[k] = 0;
  __syncwarp();
  const int64_t begin = c * kChunk;
  const int64_t end = min(begin + kChunk, M);
  for (int64_t m = begin + threadIdx.x; m < end; m += kWarp) atomicAdd(&cnt[row_key(m, task, gate, nbuckets)], 1);
  __syncwarp();
  for (int k = threadIdx.x; k < nbuckets; k += kWarp) hist[k * nchunks + c] = cnt[k];
}

// Exclusive scan of hist [n] in place by one block, chunk by chunk with a running carry; then
// counts[k] and offsets[k] (offsets[nbuckets] = M) from the scanned key starts.
__global__ void sort_scan_kernel(int32_t* __restrict__ hist, int64_t n, int nbuckets, int64_t nchunks, int64_t M,
                                 int64_t* __restrict__ counts, int64_t* __restrict__ offsets) {
  __shared__ int32_t buf[kScanThreads];
  __shared__ int32_t carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    const int32_t v = i < n ? hist[i] : 0;
    buf[threadIdx.x] = v;
    __syncthreads();
    // Hillis-Steele inclusive scan in shared memory (1024 entries: 10 steps).
    for (int off = 1; off < kScanThreads; off <<= 1) {
      const int32_t add = threadIdx.x >= off ? buf[threadIdx.x - off] : 0;
      __syncthreads();
      buf[threadIdx.x] += add;
      __syncthreads();
    }
    if (i < n) hist[i] = carry + buf[threadIdx.x] - v;  // exclusive
    __syncthreads();
    if (threadIdx.x == kScanThreads - 1) carry += buf[kScanThreads - 1];
    __syncthreads();
  }
  for (int k = threadIdx.x; k <= nbuckets; k += kScanThreads) {
    const int64_t start = k < nbuckets ? (nchunks > 0 ? hist[k * nchunks] : 0) : M;
    offsets[k] = start;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < nbuckets; k += kScanThreads) counts[k] = offsets[k + 1] - offsets[k];
}

template <typename gate_t>
__global__ void sort_scatter_kernel(const int64_t* __restrict__ task, const gate_t* __restrict__ gate, int64_t M,
                                    int nbuckets, int64_t nchunks, const int32_t* __restrict__ hist,
                                    int64_t* __restrict__ perm) {
  extern __shared__ int32_t cursor[];
  const int64_t c = blockIdx.x;
  const int lane = threadIdx.x;
  for (int k = lane; k < nbuckets; k += kWarp) cursor[k] = hist[k * nchunks + c];
  __syncwarp();
  const int64_t begin = c * kChunk;
  const int64_t end = min(begin + kChunk, M);
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t m0 = begin; m0 < end; m0 += kWarp) {
    const int64_t m = m0 + lane;
    const bool valid = m < end;
    // Invalid lanes take key -1 so they match only each other; all 32 lanes take part.
    const int key = valid ? row_key(m, task, gate, nbuckets) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    const int rank = __popc(peers & lanes_below);
    const int leader = __ffs(peers) - 1;
    if (valid) {
      const int32_t slot = cursor[key] + rank;
      perm[slot] = m;
    }
    __syncwarp();
    if (valid && lane == leader) cursor[key] += __popc(peers);
    __syncwarp();
  }
}

// perm [M], counts [nbuckets], offsets [nbuckets + 1], all int64 on x's device.
std::tuple<Tensor, Tensor, Tensor> stable_bucket_sort(const Tensor& task, const std::optional<Tensor>& gate,
                                                      int64_t M, int64_t nbuckets, const at::Device& device) {
  // The callers (compact_rows_cuda, group_by_task_cuda) checked their arguments; these limits
  // are the sort's own.
  TORCH_CHECK_VALUE(nbuckets >= 1 && nbuckets <= kMaxBuckets, "tarp_fast: at most ", kMaxBuckets - 1,
                    " tasks are supported by the CUDA grouping, got ", nbuckets - 1);
  TORCH_CHECK_VALUE(M < (int64_t(1) << 31), "tarp_fast: the CUDA row sort supports M < 2^31 rows, got ", M);
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(device);
  Tensor perm = at::empty({M}, lopts);
  Tensor counts = at::empty({nbuckets}, lopts);
  Tensor offsets = at::empty({nbuckets + 1}, lopts);
  const int64_t nchunks = (M + kChunk - 1) / kChunk;
  Tensor hist = at::empty({nbuckets * nchunks}, at::TensorOptions().dtype(at::kInt).device(device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t smem = static_cast<size_t>(nbuckets) * sizeof(int32_t);
  const int64_t* tp = task.defined() ? task.data_ptr<int64_t>() : nullptr;
  const Tensor g = gate.has_value() && gate->defined() ? gate->contiguous() : Tensor();
  const int nb = static_cast<int>(nbuckets);

  auto launch = [&](auto* gp) {
    using gate_t = std::remove_const_t<std::remove_pointer_t<decltype(gp)>>;
    if (nchunks > 0) {
      sort_hist_kernel<gate_t><<<nchunks, kWarp, smem, stream>>>(tp, gp, M, nb, nchunks, hist.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sort_scan_kernel<<<1, kScanThreads, 0, stream>>>(hist.data_ptr<int32_t>(), nbuckets * nchunks, nb, nchunks, M,
                                                     counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (nchunks > 0) {
      sort_scatter_kernel<gate_t><<<nchunks, kWarp, smem, stream>>>(tp, gp, M, nb, nchunks,
                                                                    hist.data_ptr<int32_t>(), perm.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (g.defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "tarp_fast_row_sort",
                                    [&] { launch(static_cast<const scalar_t*>(g.data_ptr<scalar_t>())); });
  } else {
    launch(static_cast<const float*>(nullptr));
  }
  return {perm, counts, offsets};
}

// Host-side checks of the helpers' arguments (every tensor a CUDA tensor on one device, dtypes,
// shapes); see tarp_checks.h for the conventions. Values (task ids, offsets, perm entries) are
// not checked: that needs a host sync, which these graph-safe ops never do (out-of-range task ids
// go to the dropped bucket; offsets and perm are produced by group_by_task).
void check_cuda(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": argument '", name, "' must be a CUDA tensor, got ", t.device());
}

// gate [M], floating, on ref's device (ref_name: the argument that fixes M and the device).
void check_gate_rows(const char* op, const Tensor& gate, const Tensor& ref, const char* ref_name) {
  check_cuda(op, "gate", gate);
  checks::check_device(op, "gate", gate, ref, ref_name);
  checks::check_floating(op, "gate", gate);
  TORCH_CHECK_VALUE(gate.dim() == 1 && gate.size(0) == ref.size(0), op, ": argument 'gate' must be [M] (M=",
                    ref.size(0), " from ", ref_name, "), got ", gate.sizes());
}

std::tuple<Tensor, Tensor> compact_rows_cuda(const Tensor& gate) {
  constexpr const char* op = "tarp_fast::compact_rows";
  check_cuda(op, "gate", gate);
  checks::check_floating(op, "gate", gate);
  TORCH_CHECK_VALUE(gate.dim() == 1, op, ": argument 'gate' must be [M] (one value per row), got ", gate.sizes());
  const c10::cuda::CUDAGuard guard(gate.device());
  // Two buckets: kept (0) and dropped (1).
  auto [perm, counts, offsets] = stable_bucket_sort(Tensor(), gate, gate.size(0), 2, gate.device());
  return {perm, counts.narrow(0, 0, 1).clone()};
}

std::tuple<Tensor, Tensor, Tensor> group_by_task_cuda(const Tensor& task_index, int64_t num_tasks,
                                                      const std::optional<Tensor>& gate) {
  constexpr const char* op = "tarp_fast::group_by_task";
  check_cuda(op, "task_index", task_index);
  checks::check_int64(op, "task_index", task_index);
  TORCH_CHECK_VALUE(task_index.dim() == 1, op, ": argument 'task_index' must be [M] (one task per row), got ",
                    task_index.sizes());
  TORCH_CHECK_VALUE(num_tasks >= 1, op, ": argument 'num_tasks' must be >= 1, got ", num_tasks);
  if (checks::present(gate)) check_gate_rows(op, *gate, task_index, "task_index");
  const c10::cuda::CUDAGuard guard(task_index.device());
  return stable_bucket_sort(task_index.contiguous(), gate, task_index.size(0), num_tasks + 1, task_index.device());
}

// One block per (column tile of 32, segment); 8 row lanes stride the segment, then a fixed-order
// reduction in shared memory: deterministic, no atomics.
template <typename scalar_t>
__global__ void segmented_sum_kernel(const scalar_t* __restrict__ values, int64_t D, const int64_t* __restrict__ perm,
                                     const int64_t* __restrict__ offsets, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t buf[8][kWarp];
  const int64_t s = blockIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t lo = offsets[s], hi = offsets[s + 1];
  acc_t acc = acc_t(0);
  if (col < D) {
    for (int64_t i = lo + threadIdx.y; i < hi; i += 8) {
      const int64_t row = perm != nullptr ? perm[i] : i;
      acc += static_cast<acc_t>(values[row * D + col]);
    }
  }
  buf[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < D) {
    acc_t total = acc_t(0);
#pragma unroll
    for (int j = 0; j < 8; ++j) total += buf[j][threadIdx.x];
    out[s * D + col] = static_cast<scalar_t>(total);
  }
}

Tensor segmented_sum_cuda(const Tensor& values_in, const std::optional<Tensor>& perm_in, const Tensor& offsets_in) {
  constexpr const char* op = "tarp_fast::segmented_sum";
  check_cuda(op, "values", values_in);
  checks::check_floating(op, "values", values_in);
  TORCH_CHECK_VALUE(values_in.dim() == 2, op, ": argument 'values' must be [M, D], got ", values_in.sizes());
  check_cuda(op, "offsets", offsets_in);
  checks::check_device(op, "offsets", offsets_in, values_in, "values");
  checks::check_int64(op, "offsets", offsets_in);
  TORCH_CHECK_VALUE(offsets_in.dim() == 1 && offsets_in.size(0) >= 1, op,
                    ": argument 'offsets' must be [S + 1] (segment starts, then the end), got ", offsets_in.sizes());
  if (checks::present(perm_in)) {
    check_cuda(op, "perm", *perm_in);
    checks::check_device(op, "perm", *perm_in, values_in, "values");
    checks::check_int64(op, "perm", *perm_in);
    TORCH_CHECK_VALUE(perm_in->dim() == 1 && perm_in->size(0) == values_in.size(0), op,
                      ": argument 'perm' must be [M] (M=", values_in.size(0), " rows of values), got ",
                      perm_in->sizes());
  }
  const c10::cuda::CUDAGuard guard(values_in.device());
  const Tensor values = values_in.contiguous();
  const Tensor offsets = offsets_in.contiguous();
  Tensor perm;
  if (checks::present(perm_in)) perm = perm_in->contiguous();
  const int64_t S = offsets.size(0) - 1, D = values.size(1);
  TORCH_CHECK_VALUE(S <= 65535, op, ": at most 65535 segments, got ", S);
  Tensor out = at::empty({S, D}, values.options());
  if (S == 0 || D == 0) return out;
  const dim3 grid(static_cast<unsigned>((D + kWarp - 1) / kWarp), static_cast<unsigned>(S));
  const dim3 block(kWarp, 8);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "tarp_fast_segmented_sum", [&] {
    segmented_sum_kernel<scalar_t><<<grid, block, 0, stream>>>(values.data_ptr<scalar_t>(), D,
                                                               perm.defined() ? perm.data_ptr<int64_t>() : nullptr,
                                                               offsets.data_ptr<int64_t>(), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tarp_fast, CUDA, m) {
  m.impl("compact_rows", &compact_rows_cuda);
  m.impl("group_by_task", &group_by_task_cuda);
  m.impl("segmented_sum", &segmented_sum_cuda);
}

}  // namespace tarp_fast

// Prediction agreement counts on the GPU (minidiff._cuda).
//
// pair_counts: for predictions P (N x M, int32/int64, row-major) and optional
// labels y (M), accumulate into zeroed int64 (N x N) buffers
//     disagree[i][j]   += #{x : P[i][x] != P[j][x]}
//     both_right[i][j] += #{x : P[i][x] == y[x] == P[j][x]}
// One block owns a 32 x 32 tile of model pairs and a strided share of the
// examples. Each stage stages 64 examples of both 32-model slices in shared
// memory (transposed, padded to 33 to avoid bank conflicts); each of the 256
// threads keeps a 2 x 2 register block of pair counts, so a stage does 4
// compares per 4 shared loads. Counts are flushed once per block with 64-bit
// atomics. Padding examples read 0 for both models (equal) and label -1
// (never right), so they never count.
//
// label_histogram: hist[x][c] += 1 for every (k, x) with P[k][x] == c, into a
// zeroed int32 (M x C) buffer, with one atomic per prediction.
//
// Addresses, sizes and the caller's stream come from Python
// (minidiff.ops.agreement), which validated dtype, device, contiguity and the
// label range; nothing here links libtorch.
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "registry.cuh"

namespace py = pybind11;

namespace minidiff {
namespace {

constexpr int kTile = 32;     // models per tile side
constexpr int kStage = 64;    // examples per shared-memory stage
constexpr int kThreads = 256; // 16 x 16 threads, 2 x 2 pairs each

template <typename T, bool kLabels>
__global__ void __launch_bounds__(kThreads)
pair_counts_kernel(const T* __restrict__ preds, const T* __restrict__ labels, int64_t n, int64_t m,
                   unsigned long long* __restrict__ disagree,
                   unsigned long long* __restrict__ both_right) {
  __shared__ T si[kStage][kTile + 1];
  __shared__ T sj[kStage][kTile + 1];
  __shared__ T sl[kStage];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  unsigned int d00 = 0, d01 = 0, d10 = 0, d11 = 0;
  unsigned int r00 = 0, r01 = 0, r10 = 0, r11 = 0;

  for (int64_t m0 = static_cast<int64_t>(blockIdx.z) * kStage; m0 < m;
       m0 += static_cast<int64_t>(gridDim.z) * kStage) {
    for (int idx = threadIdx.x; idx < kTile * kStage; idx += kThreads) {
      const int row = idx / kStage, col = idx % kStage;  // consecutive threads: consecutive examples
      const int64_t e = m0 + col;
      const bool in_m = e < m;
      const int64_t gi = i0 + row, gj = j0 + row;
      si[col][row] = (in_m && gi < n) ? preds[gi * m + e] : T(0);
      sj[col][row] = (in_m && gj < n) ? preds[gj * m + e] : T(0);
    }
    if (kLabels) {
      for (int idx = threadIdx.x; idx < kStage; idx += kThreads) {
        const int64_t e = m0 + idx;
        sl[idx] = e < m ? labels[e] : T(-1);
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kStage; ++c) {
      const T a0 = si[c][tx], a1 = si[c][tx + 16];
      const T b0 = sj[c][ty], b1 = sj[c][ty + 16];
      d00 += a0 != b0;
      d01 += a0 != b1;
      d10 += a1 != b0;
      d11 += a1 != b1;
      if (kLabels) {
        const T y = sl[c];
        const unsigned ra0 = a0 == y, ra1 = a1 == y, rb0 = b0 == y, rb1 = b1 == y;
        r00 += ra0 & rb0;
        r01 += ra0 & rb1;
        r10 += ra1 & rb0;
        r11 += ra1 & rb1;
      }
    }
    __syncthreads();
  }

  const unsigned int dv[2][2] = {{d00, d01}, {d10, d11}};
  const unsigned int rv[2][2] = {{r00, r01}, {r10, r11}};
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t gi = i0 + tx + 16 * a, gj = j0 + ty + 16 * b;
      if (gi < n && gj < n) {
        atomicAdd(disagree + gi * n + gj, static_cast<unsigned long long>(dv[a][b]));
        if (kLabels) atomicAdd(both_right + gi * n + gj, static_cast<unsigned long long>(rv[a][b]));
      }
    }
  }
}

template <typename T>
__global__ void label_histogram_kernel(const T* __restrict__ preds, int64_t k, int64_t m,
                                       int64_t c, int* __restrict__ hist) {
  const int64_t total = k * m;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = idx % m;
    atomicAdd(hist + e * c + static_cast<int64_t>(preds[idx]), 1);
  }
}

int sm_count() {
  int dev = 0, sms = 0;
  MINIDIFF_CUDA_CHECK(cudaGetDevice(&dev));
  MINIDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return std::max(sms, 1);
}

template <typename T>
void launch_pair_counts(uintptr_t preds, uintptr_t labels, int64_t n, int64_t m,
                        uintptr_t disagree, uintptr_t both_right, cudaStream_t stream) {
  const int64_t tiles_side = (n + kTile - 1) / kTile;
  const int64_t stages = (m + kStage - 1) / kStage;
  // Enough blocks for ~4 per SM; each strides over the examples.
  const int64_t want = (4 * static_cast<int64_t>(sm_count()) + tiles_side * tiles_side - 1) /
                       (tiles_side * tiles_side);
  const unsigned int z = static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>({want, stages, 65535})));
  const dim3 grid(static_cast<unsigned int>(tiles_side), static_cast<unsigned int>(tiles_side), z);
  auto* d = reinterpret_cast<unsigned long long*>(disagree);
  auto* r = reinterpret_cast<unsigned long long*>(both_right);
  const T* p = reinterpret_cast<const T*>(preds);
  if (labels)
    pair_counts_kernel<T, true><<<grid, kThreads, 0, stream>>>(p, reinterpret_cast<const T*>(labels), n, m, d, r);
  else
    pair_counts_kernel<T, false><<<grid, kThreads, 0, stream>>>(p, nullptr, n, m, d, r);
  MINIDIFF_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_histogram(uintptr_t preds, int64_t k, int64_t m, int64_t c, uintptr_t hist,
                      cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((k * m + threads - 1) / threads, 32LL * sm_count());
  label_histogram_kernel<T><<<static_cast<unsigned int>(std::max<int64_t>(blocks, 1)), threads, 0, stream>>>(
      reinterpret_cast<const T*>(preds), k, m, c, reinterpret_cast<int*>(hist));
  MINIDIFF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void register_cuda_agreement(py::module_& m) {
  m.def(
      "agreement_pair_counts",
      [](uintptr_t preds, uintptr_t labels, bool is64, int64_t n, int64_t num_examples,
         uintptr_t disagree, uintptr_t both_right, uintptr_t stream) {
        if (n <= 0 || num_examples <= 0 || num_examples >= (int64_t(1) << 31))
          throw std::invalid_argument("agreement_pair_counts: need 1 <= N and 1 <= M < 2**31");
        if (is64)
          launch_pair_counts<int64_t>(preds, labels, n, num_examples, disagree, both_right, as_stream(stream));
        else
          launch_pair_counts<int32_t>(preds, labels, n, num_examples, disagree, both_right, as_stream(stream));
      },
      py::arg("preds"), py::arg("labels"), py::arg("is64"), py::arg("n_models"), py::arg("m"),
      py::arg("disagree"), py::arg("both_right"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Adds pairwise disagreement / both-right counts of device predictions (N, M) into zeroed "
      "int64 (N, N) device buffers, on the given stream (labels address 0: none).");
  m.def(
      "agreement_label_histogram",
      [](uintptr_t preds, bool is64, int64_t k, int64_t num_examples, int64_t c, uintptr_t hist,
         uintptr_t stream) {
        if (k <= 0 || num_examples <= 0 || c <= 0)
          throw std::invalid_argument("agreement_label_histogram: empty input");
        if (is64) launch_histogram<int64_t>(preds, k, num_examples, c, hist, as_stream(stream));
        else launch_histogram<int32_t>(preds, k, num_examples, c, hist, as_stream(stream));
      },
      py::arg("preds"), py::arg("is64"), py::arg("k"), py::arg("m"), py::arg("num_classes"),
      py::arg("hist"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Adds label counts of device predictions (K, M) into a zeroed int32 (M, C) device buffer.");
}

}  // namespace minidiff

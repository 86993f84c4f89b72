// int8 GEMM with a fused per-token x per-channel scale epilogue, and the
// per-token activation quantization that feeds it (W8A8 on GPU, CUDA backend).
//
//   acc[m, n] = sum_k A[m, k] * W[n, k]          (A int8 M x K, W int8 N x K, both
//                                                 row-major; int32, exact)
//   out[m, n] = acc * a_scale[m] * w_scale[n] (+ bias[n])   (float32 math, then the
//                                                 output dtype), or the raw int32 acc.
//
// Design (correctness over heroics; see README "Fast compressed inference / GPU"):
// 128 x 128 x 64 block tile, 8 warps each owning a 64 x 32 sub-tile, int8 tensor
// cores through mma.sync.m16n8k32 (sm_80+, runs on sm_90), a two-stage cp.async
// pipeline (the next K tile streams into shared memory while the current one is
// multiplied). Shared-memory rows are padded to 80 bytes so the 32-bit fragment
// loads of a warp hit 32 distinct banks. wgmma/TMA (sm_90a) would be faster; it
// was not attempted without a GPU to validate it on.
//
// Requirements checked in Python (minidiff.ops.gpu_linear) before any pointer
// gets here: contiguous row-major operands, K % 16 == 0, 16-byte aligned A and
// W, K < 131072 (so |acc| <= K * 128 * 128 cannot overflow int32).
// Tails in M and N are zero-filled on load and masked on store; K tails are
// whole 16-byte chunks (K % 16 == 0) and zero-filled.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.cuh"
#include "registry.cuh"

namespace py = pybind11;

namespace minidiff {
namespace {

constexpr int kBM = 128;
constexpr int kBN = 128;
constexpr int kBK = 64;          // bytes of K per tile (= int8 elements)
constexpr int kLds = kBK + 16;   // padded shared row, bytes (multiple of 16 for cp.async)
constexpr int kThreads = 256;    // 8 warps: 2 along M x 4 along N
constexpr int kWarpM = 64;
constexpr int kWarpN = 32;
constexpr int kMFrag = kWarpM / 16;  // 4
constexpr int kNFrag = kWarpN / 8;   // 4

enum OutKind : int { kOutInt32 = 0, kOutF32 = 1, kOutF16 = 2, kOutBF16 = 3 };

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;  // 0: write 16 zero bytes, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int Kind> struct OutT;
template <> struct OutT<kOutInt32> { using type = int32_t; };
template <> struct OutT<kOutF32> { using type = float; };
template <> struct OutT<kOutF16> { using type = __half; };
template <> struct OutT<kOutBF16> { using type = __nv_bfloat16; };

__device__ __forceinline__ void store_out(int32_t* p, int acc, float v) { *p = acc; }
__device__ __forceinline__ void store_out(float* p, int acc, float v) { *p = v; }
__device__ __forceinline__ void store_out(__half* p, int acc, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, int acc, float v) { *p = __float2bfloat16_rn(v); }

// Copy one 128 x 64-byte tile of a row-major int8 matrix (rows r0.., columns k0..)
// into shared memory: 512 chunks of 16 bytes, two per thread.
__device__ __forceinline__ void load_tile(int8_t (*dst)[kLds], const int8_t* src, int rows, int K,
                                          int r0, int k0, int tid) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int c = tid + i * kThreads;
    const int r = c >> 2;
    const int kc = (c & 3) * 16;
    const bool valid = (r0 + r < rows) && (k0 + kc < K);
    const int8_t* g = valid ? src + static_cast<int64_t>(r0 + r) * K + (k0 + kc) : src;
    cp_async_16(&dst[r][kc], g, valid);
  }
}

template <int Kind>
__global__ void __launch_bounds__(kThreads)
int8_gemm_kernel(const int8_t* __restrict__ A, const int8_t* __restrict__ W,
                 typename OutT<Kind>::type* __restrict__ out, const float* __restrict__ a_scale,
                 const float* __restrict__ w_scale, const float* __restrict__ bias, int M, int N,
                 int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync.m16n8k32 and cp.async need sm_80+; Python checks kernel_arch() first
#else
  __shared__ __align__(16) int8_t As[2][kBM][kLds];
  __shared__ __align__(16) int8_t Bs[2][kBN][kLds];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp >> 2;  // 0..1
  const int warp_n = warp & 3;   // 0..3
  const int g = lane >> 2;       // groupID
  const int t = lane & 3;        // thread in group
  const int m0 = blockIdx.y * kBM;
  const int n0 = blockIdx.x * kBN;

  int acc[kMFrag][kNFrag][4];
#pragma unroll
  for (int i = 0; i < kMFrag; ++i)
#pragma unroll
    for (int j = 0; j < kNFrag; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  const int num_k = (K + kBK - 1) / kBK;
  load_tile(As[0], A, M, K, m0, 0, tid);
  load_tile(Bs[0], W, N, K, n0, 0, tid);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  for (int kt = 0; kt < num_k; ++kt) {
    const int cur = kt & 1;
    if (kt + 1 < num_k) {
      load_tile(As[cur ^ 1], A, M, K, m0, (kt + 1) * kBK, tid);
      load_tile(Bs[cur ^ 1], W, N, K, n0, (kt + 1) * kBK, tid);
    }
    cp_async_commit();
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 32) {
      uint32_t af[kMFrag][4];
      uint32_t bf[kNFrag][2];
#pragma unroll
      for (int i = 0; i < kMFrag; ++i) {
        const int r = warp_m * kWarpM + i * 16 + g;
        af[i][0] = *reinterpret_cast<const uint32_t*>(&As[cur][r][ks + t * 4]);
        af[i][1] = *reinterpret_cast<const uint32_t*>(&As[cur][r + 8][ks + t * 4]);
        af[i][2] = *reinterpret_cast<const uint32_t*>(&As[cur][r][ks + 16 + t * 4]);
        af[i][3] = *reinterpret_cast<const uint32_t*>(&As[cur][r + 8][ks + 16 + t * 4]);
      }
#pragma unroll
      for (int j = 0; j < kNFrag; ++j) {
        const int c = warp_n * kWarpN + j * 8 + g;
        bf[j][0] = *reinterpret_cast<const uint32_t*>(&Bs[cur][c][ks + t * 4]);
        bf[j][1] = *reinterpret_cast<const uint32_t*>(&Bs[cur][c][ks + 16 + t * 4]);
      }
#pragma unroll
      for (int i = 0; i < kMFrag; ++i)
#pragma unroll
        for (int j = 0; j < kNFrag; ++j) mma_s8(acc[i][j], af[i], bf[j]);
    }
    cp_async_wait_all();
    __syncthreads();
  }

  // Epilogue: accumulator element r of fragment (i, j) sits at
  // row g (+8 for r >= 2), column 2t + (r & 1) of the 16 x 8 fragment.
#pragma unroll
  for (int i = 0; i < kMFrag; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = m0 + warp_m * kWarpM + i * 16 + g + half * 8;
      if (m >= M) continue;
      const float as = (Kind == kOutInt32) ? 0.f : a_scale[m];
#pragma unroll
      for (int j = 0; j < kNFrag; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = n0 + warp_n * kWarpN + j * 8 + 2 * t + e;
          if (n >= N) continue;
          const int a = acc[i][j][half * 2 + e];
          float v = 0.f;
          if (Kind != kOutInt32) {
            v = static_cast<float>(a) * as * w_scale[n];
            if (bias != nullptr) v += bias[n];
          }
          store_out(out + static_cast<int64_t>(m) * N + n, a, v);
        }
      }
    }
  }
#endif
}

// One block per row: absmax (block reduction), scale = absmax / 127 (IEEE
// division), q = clamp(rint(x / scale), -127, 127) with rint = round half to even;
// scale 0 (all-zero row) gives q = 0; a row with NaN/Inf gets scale NaN and
// q = 0 (its outputs become NaN, as the float layer's would). Same definition as the Triton kernel and
// the torch reference.
template <typename T>
__device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__global__ void __launch_bounds__(256)
quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale, int K) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  float amax = 0.f;
  int bad = 0;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const float v = to_f(xr[k]);
    if (isfinite(v)) amax = fmaxf(amax, fabsf(v)); else bad = 1;
  }
  const int nonfinite = __syncthreads_or(bad);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) red[warp] = amax;
  __syncthreads();
  if (warp == 0) {
    amax = lane < nwarps ? red[lane] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (lane == 0) red[0] = amax;
  }
  __syncthreads();
  const float s = __fdiv_rn(red[0], 127.f);
  const bool ok = s > 0.f && !nonfinite;
  if (threadIdx.x == 0) scale[row] = nonfinite ? __int_as_float(0x7fc00000) : s;
  int8_t* qr = q + row * K;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    float y = 0.f;
    if (ok) y = fminf(fmaxf(rintf(__fdiv_rn(to_f(xr[k]), s)), -127.f), 127.f);
    qr[k] = static_cast<int8_t>(y);
  }
}

// Architecture of the GEMM code the driver picked for the current device
// (e.g. 90 for sm_90a SASS), 0 when it cannot be queried. Below 80 the kernel
// only traps, so Python uses Triton or torch instead.
int kernel_arch() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, int8_gemm_kernel<kOutF32>) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are unaffected
    return 0;
  }
  return attr.binaryVersion;
}

template <int Kind>
void launch_gemm(uintptr_t a, uintptr_t w, uintptr_t out, uintptr_t as, uintptr_t ws, uintptr_t b,
                 int M, int N, int K, cudaStream_t stream) {
  dim3 grid((N + kBN - 1) / kBN, (M + kBM - 1) / kBM);
  int8_gemm_kernel<Kind><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const int8_t*>(a), reinterpret_cast<const int8_t*>(w),
      reinterpret_cast<typename OutT<Kind>::type*>(out), reinterpret_cast<const float*>(as),
      reinterpret_cast<const float*>(ws), reinterpret_cast<const float*>(b), M, N, K);
}

void int8_gemm(uintptr_t a, uintptr_t w, uintptr_t out, uintptr_t a_scale, uintptr_t w_scale,
               uintptr_t bias, int64_t M, int64_t N, int64_t K, int out_kind, uintptr_t stream_ptr) {
  if (M <= 0 || N <= 0 || K <= 0 || K % 16 != 0 || K >= 131072 || M > 65535LL * kBM ||
      N > 2147483647LL)
    throw std::invalid_argument("int8_gemm: need M, N > 0, K > 0, K % 16 == 0, K < 131072");
  if ((a | w) % 16 != 0) throw std::invalid_argument("int8_gemm: A and W must be 16-byte aligned");
  if (out_kind != kOutInt32 && (a_scale == 0 || w_scale == 0))
    throw std::invalid_argument("int8_gemm: scaled output needs a_scale and w_scale");
  if (kernel_arch() < 80)
    throw std::runtime_error("int8_gemm: this build has no sm_80+ code for the current GPU");
  cudaStream_t s = as_stream(stream_ptr);
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  switch (out_kind) {
    case kOutInt32: launch_gemm<kOutInt32>(a, w, out, a_scale, w_scale, bias, m, n, k, s); break;
    case kOutF32: launch_gemm<kOutF32>(a, w, out, a_scale, w_scale, bias, m, n, k, s); break;
    case kOutF16: launch_gemm<kOutF16>(a, w, out, a_scale, w_scale, bias, m, n, k, s); break;
    case kOutBF16: launch_gemm<kOutBF16>(a, w, out, a_scale, w_scale, bias, m, n, k, s); break;
    default: throw std::invalid_argument("int8_gemm: out_kind must be 0 (int32), 1 (f32), 2 (f16), 3 (bf16)");
  }
  MINIDIFF_CUDA_CHECK(cudaGetLastError());
}

// in_kind: 1 = float32, 2 = float16, 3 = bfloat16 (same codes as out_kind).
void quantize_per_token(uintptr_t x, uintptr_t q, uintptr_t scale, int64_t M, int64_t K, int in_kind,
                        uintptr_t stream_ptr) {
  if (M <= 0 || K <= 0 || M > 2147483647LL)
    throw std::invalid_argument("quantize_per_token: need M > 0 and K > 0");
  cudaStream_t s = as_stream(stream_ptr);
  const int k = static_cast<int>(K);
  const unsigned grid = static_cast<unsigned>(M);
  switch (in_kind) {
    case kOutF32:
      quantize_rows_kernel<float><<<grid, 256, 0, s>>>(reinterpret_cast<const float*>(x),
          reinterpret_cast<int8_t*>(q), reinterpret_cast<float*>(scale), k);
      break;
    case kOutF16:
      quantize_rows_kernel<__half><<<grid, 256, 0, s>>>(reinterpret_cast<const __half*>(x),
          reinterpret_cast<int8_t*>(q), reinterpret_cast<float*>(scale), k);
      break;
    case kOutBF16:
      quantize_rows_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(reinterpret_cast<const __nv_bfloat16*>(x),
          reinterpret_cast<int8_t*>(q), reinterpret_cast<float*>(scale), k);
      break;
    default: throw std::invalid_argument("quantize_per_token: in_kind must be 1 (f32), 2 (f16), 3 (bf16)");
  }
  MINIDIFF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void register_cuda_int8(pybind11::module_& m) {
  m.def("int8_gemm", &int8_gemm, py::arg("a_ptr"), py::arg("w_ptr"), py::arg("out_ptr"),
        py::arg("a_scale_ptr"), py::arg("w_scale_ptr"), py::arg("bias_ptr"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("out_kind"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "out (M x N) = A (M x K int8) @ W (N x K int8)^T: raw int32 (out_kind 0) or "
        "acc * a_scale[m] * w_scale[n] + bias[n] as f32/f16/bf16 (out_kind 1/2/3). "
        "Device addresses; a_scale/w_scale/bias float32; bias_ptr 0 = no bias; K % 16 == 0.");
  m.def("quantize_per_token", &quantize_per_token, py::arg("x_ptr"), py::arg("q_ptr"),
        py::arg("scale_ptr"), py::arg("M"), py::arg("K"), py::arg("in_kind"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Per-row int8 quantization of x (M x K, f32/f16/bf16 = in_kind 1/2/3): "
        "scale = absmax/127, q = clamp(rint(x/scale), -127, 127).");
  m.def("int8_gemm_kernel_arch", &kernel_arch,
        "SM version of the int8 GEMM code selected for the current device (0: unavailable); "
        "the kernel needs >= 80.");
  m.attr("INT8_GEMM_K_MULTIPLE") = 16;
}

}  // namespace minidiff

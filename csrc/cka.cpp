// Per-sample terms of the streaming linear CKA estimator (minidiff.ops.cka).
//
// For one batch of two models' stacked layers X = [X_1 .. X_Lx] (b x Dx) and
// Y = [Y_1 .. Y_Ly] (b x Dy), already shifted by the accumulator, one pass
// over the rows computes, with float64 accumulation:
//
//   a_il = ||x_il||^2, b_im = ||y_im||^2           per-sample, per-layer norms
//   sx = sum_i x_i,  sy = sum_i y_i                 column sums
//   na_l = sum_i a_il,  nb_m = sum_i b_im
//   ay[l, :] = sum_i a_il y_i,  bx[m, :] = sum_i b_im x_i
//   ab[l, m] = sum_i a_il b_im
//   axd[j] = sum_i a_{i,l(j)} x_ij  (the diagonal blocks of the "ax" term)
//   byd[j] = sum_i b_{i,m(j)} y_ij
//   aa_l = sum_i a_il^2,  bb_m = sum_i b_im^2
//
// packed, in this order, into one float64 output buffer. The cross-product
// X^T Y is a GEMM and stays in torch (MKL/oneDNN). Rows are split over the
// thread pool; each part accumulates into its own buffer, summed at the end.
// Kernels are compiled per ISA with target attributes and chosen at run time.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"
#include "registry.h"

namespace py = pybind11;

namespace minidiff {
namespace {

struct Shape {
  int64_t b, dx, dy, lx, ly;
  const int64_t* ox;
  const int64_t* oy;
};

// Offsets of each term inside the packed output.
struct Packed {
  int64_t sx, sy, na, nb, ay, bx, ab, axd, byd, aa, bb, total;
  explicit Packed(const Shape& s) {
    int64_t o = 0;
    sx = o; o += s.dx;
    sy = o; o += s.dy;
    na = o; o += s.lx;
    nb = o; o += s.ly;
    ay = o; o += s.lx * s.dy;
    bx = o; o += s.ly * s.dx;
    ab = o; o += s.lx * s.ly;
    axd = o; o += s.dx;
    byd = o; o += s.dy;
    aa = o; o += s.lx;
    bb = o; o += s.ly;
    total = o;
  }
};

// Generic loops, always inlined into the ISA-specific entry points below so
// that the compiler vectorizes them for that entry point's target.
template <typename T>
__attribute__((always_inline)) inline double sqnorm(const T* x, int64_t n) {
  // Eight independent partial sums: vectorizable without reassociation flags.
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int k = 0; k < 8; ++k) {
      double v = static_cast<double>(x[j + k]);
      acc[k] += v * v;
    }
  }
  double s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; j < n; ++j) {
    double v = static_cast<double>(x[j]);
    s += v * v;
  }
  return s;
}

// out[j] += sum_r w[r] * x_r[j] over R rows: the accumulator is read and
// written once per R rows instead of once per row.
template <int R, typename T>
__attribute__((always_inline)) inline void axpy_rows(const double* w, const T* const* x, int64_t off,
                                                     double* __restrict out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double acc = out[j];
    for (int r = 0; r < R; ++r) acc += w[r] * static_cast<double>(x[r][off + j]);
    out[j] = acc;
  }
}

template <int R, typename T>
__attribute__((always_inline)) inline void sum_axpy_rows(const double* w, const T* const* x, int64_t off,
                                                         double* __restrict sum, double* __restrict ax, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double s = sum[j], a = ax[j];
    for (int r = 0; r < R; ++r) {
      double v = static_cast<double>(x[r][off + j]);
      s += v;
      a += w[r] * v;
    }
    sum[j] = s;
    ax[j] = a;
  }
}

// R rows starting at row i.
template <int R, typename T>
__attribute__((always_inline)) inline void rows_block(const T* X, const T* Y, const Shape& s, const Packed& p,
                                                      int64_t i, double* out, double* a, double* bn) {
  const T* x[R];
  const T* y[R];
  for (int r = 0; r < R; ++r) {
    x[r] = X + (i + r) * s.dx;
    y[r] = Y + (i + r) * s.dy;
  }
  // a[l * R + r], bn[m * R + r]
  for (int r = 0; r < R; ++r) {
    for (int64_t l = 0; l < s.lx; ++l) a[l * R + r] = sqnorm(x[r] + s.ox[l], s.ox[l + 1] - s.ox[l]);
    for (int64_t m = 0; m < s.ly; ++m) bn[m * R + r] = sqnorm(y[r] + s.oy[m], s.oy[m + 1] - s.oy[m]);
  }
  for (int64_t l = 0; l < s.lx; ++l) {
    const double* w = a + l * R;
    const int64_t o = s.ox[l], width = s.ox[l + 1] - o;
    sum_axpy_rows<R>(w, x, o, out + p.sx + o, out + p.axd + o, width);
    axpy_rows<R>(w, y, 0, out + p.ay + l * s.dy, s.dy);
    for (int r = 0; r < R; ++r) {
      out[p.na + l] += w[r];
      out[p.aa + l] += w[r] * w[r];
      for (int64_t m = 0; m < s.ly; ++m) out[p.ab + l * s.ly + m] += w[r] * bn[m * R + r];
    }
  }
  for (int64_t m = 0; m < s.ly; ++m) {
    const double* w = bn + m * R;
    const int64_t o = s.oy[m], width = s.oy[m + 1] - o;
    sum_axpy_rows<R>(w, y, o, out + p.sy + o, out + p.byd + o, width);
    axpy_rows<R>(w, x, 0, out + p.bx + m * s.dx, s.dx);
    for (int r = 0; r < R; ++r) {
      out[p.nb + m] += w[r];
      out[p.bb + m] += w[r] * w[r];
    }
  }
}

template <typename T>
__attribute__((always_inline)) inline void rows_impl(const T* X, const T* Y, const Shape& s, const Packed& p,
                                                     int64_t r0, int64_t r1, double* out) {
  constexpr int R = 4;
  std::vector<double> a(s.lx * R), bn(s.ly * R);
  int64_t i = r0;
  for (; i + R <= r1; i += R) rows_block<R>(X, Y, s, p, i, out, a.data(), bn.data());
  for (; i < r1; ++i) rows_block<1>(X, Y, s, p, i, out, a.data(), bn.data());
}

template <typename T>
__attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma"))) void rows_avx512(
    const T* X, const T* Y, const Shape& s, const Packed& p, int64_t r0, int64_t r1, double* out) {
  rows_impl(X, Y, s, p, r0, r1, out);
}

template <typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const T* X, const T* Y, const Shape& s, const Packed& p,
                                                   int64_t r0, int64_t r1, double* out) {
  rows_impl(X, Y, s, p, r0, r1, out);
}

template <typename T>
void rows_scalar(const T* X, const T* Y, const Shape& s, const Packed& p, int64_t r0, int64_t r1, double* out) {
  rows_impl(X, Y, s, p, r0, r1, out);
}

template <typename T>
void run_terms(const T* X, const T* Y, const Shape& s, double* out, int threads) {
  const Packed p(s);
  const std::string level = simd_level();
  auto rows = level.rfind("avx512", 0) == 0 ? &rows_avx512<T> : level == "avx2" ? &rows_avx2<T> : &rows_scalar<T>;
  // Parts of at least 64 rows; each part owns a private accumulator.
  const int64_t grain = 64;
  int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, (s.b + grain - 1) / grain)));
  if (parts == 1) {
    rows(X, Y, s, p, 0, s.b, out);
    return;
  }
  std::vector<std::vector<double>> bufs(parts - 1, std::vector<double>(p.total, 0.0));
  const int64_t base = s.b / parts, rem = s.b % parts;
  parallel_for(parts, parts, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      int64_t r0 = q * base + std::min<int64_t>(q, rem);
      int64_t r1 = r0 + base + (q < rem ? 1 : 0);
      rows(X, Y, s, p, r0, r1, q == 0 ? out : bufs[q - 1].data());
    }
  });
  for (const auto& buf : bufs)
    for (int64_t k = 0; k < p.total; ++k) out[k] += buf[k];
}

// Validated in Python (minidiff.ops.cka; offsets re-checked here): contiguous row-major X (b x dx), Y
// (b x dy) of the given dtype, offsets strictly increasing from 0 to dx / dy,
// out a zeroed float64 buffer of packed_size() elements.
void batch_terms(uintptr_t x, uintptr_t y, int64_t b, int64_t dx, int64_t dy, const std::vector<int64_t>& ox,
                 const std::vector<int64_t>& oy, uintptr_t out, const std::string& dtype, int threads) {
  Shape s{b, dx, dy, static_cast<int64_t>(ox.size()) - 1, static_cast<int64_t>(oy.size()) - 1, ox.data(), oy.data()};
  if (s.lx < 1 || s.ly < 1 || ox.back() != dx || oy.back() != dy)
    throw std::invalid_argument("cka_batch_terms: offsets do not match the widths");
  // Defensive: a non-increasing offset list would index outside the packed buffer.
  for (const auto* offs : {&ox, &oy}) {
    if ((*offs)[0] != 0) throw std::invalid_argument("cka_batch_terms: offsets must start at 0");
    for (size_t i = 1; i < offs->size(); ++i)
      if ((*offs)[i] <= (*offs)[i - 1])
        throw std::invalid_argument("cka_batch_terms: offsets must be strictly increasing");
  }
  if (b < 0) throw std::invalid_argument("cka_batch_terms: negative row count");
  double* o = reinterpret_cast<double*>(out);
  // Zeroed here, single-threaded: a separate parallel fill in torch right after the
  // GEMMs costs more (thread hand-off) than the write itself.
  std::fill(o, o + Packed(s).total, 0.0);
  if (dtype == "float32") {
    run_terms(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(y), s, o, threads);
  } else if (dtype == "float64") {
    run_terms(reinterpret_cast<const double*>(x), reinterpret_cast<const double*>(y), s, o, threads);
  } else {
    throw std::invalid_argument("cka_batch_terms: dtype must be float32 or float64");
  }
}

int64_t packed_size(int64_t dx, int64_t dy, int64_t lx, int64_t ly) {
  Shape s{0, dx, dy, lx, ly, nullptr, nullptr};
  return Packed(s).total;
}

}  // namespace

void register_cka(py::module_& m) {
  m.def("cka_batch_terms", &batch_terms, py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("y"),
        py::arg("b"), py::arg("dx"), py::arg("dy"), py::arg("offs_x"), py::arg("offs_y"), py::arg("out"),
        py::arg("dtype"), py::arg("threads"),
        "Per-sample norm and vector terms of streaming linear CKA for one batch, accumulated in float64 into "
        "the packed buffer `out` (zeroed first; order: sx, sy, na, nb, ay, bx, ab, axd, byd, aa, bb). Raw addresses; the "
        "caller (minidiff.ops.cka) validates shapes and dtypes.");
  m.def("cka_packed_size", &packed_size, py::arg("dx"), py::arg("dy"), py::arg("lx"), py::arg("ly"),
        "Number of float64 elements of cka_batch_terms' packed output.");
}

}  // namespace minidiff

// Variants of the native skinny matmul (jaxserve/native/matmul.cc, float32 path only) for
// benchmarks/decode_experiment.py: one XLA FFI handler whose attributes pick the variant, so
// every variant runs through the same custom-call path, on XLA's intra-op pool, as the real
// kernel.
//
// Attributes:
//   packed   0: w is [K, N] row-major (today's layout); 1: w is strip-major [S, K, width]
//            (each strip's [K, width] block contiguous, N padded to S * width with zeros);
//            2: strip-major, then block-major, then tile-major: [S, K / block_k, width / TW,
//            block_k, TW] (TW = the tile's 32 or 16 columns), the order the kernel reads;
//            3: w is [N, K] (Hugging Face's [out, in]) read by strip_oi (tile 2: 24 columns
//            per tile, 3: 16, 4: 28; pf in lines).
//   width    > 0: strip width in columns; 0: today's rule (about 512 columns, the strip count
//            a multiple of the workers); -T: that rule aiming at T columns.
//   pf       software prefetch distance in blocks of block_k rows (0: none).
//   block_k  weight rows per block.
//   tile     0: 8 rows x 32 columns (today's); 1: 16 rows x 16 columns.
//   hint     0: prefetcht0, 1: prefetchnta, 2: prefetcht1.
//   order    0: row tiles outer, column tiles inner in a block (today's); 1: column tiles
//            outer (a tile's kn x 32 weights reused from L1 by the next row tile at once).
//   read_only 1: no FMAs, just stream the weights (sum of loads): a ceiling; 2: do nothing
//            (the step's fixed costs).
// The arithmetic of every variant is today's: y[m, n] is the FMA chain over k = 0..K-1 from 0.

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../../jaxserve/native/parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline __mmask16 mask_of(int64_t cols) {
  return cols >= 16 ? __mmask16(0xFFFF) : cols <= 0 ? __mmask16(0) : __mmask16((1u << cols) - 1);
}

template <int hint>
inline void prefetch(const float* p) {
  const char* c = reinterpret_cast<const char*>(p);
  if constexpr (hint == 1)
    _mm_prefetch(c, _MM_HINT_NTA);
  else if constexpr (hint == 2)
    _mm_prefetch(c, _MM_HINT_T1);
  else
    _mm_prefetch(c, _MM_HINT_T0);
}

// Today's tile: y[0:MR, 0:32] (+)= x[0:MR, k0:k1] @ w[k0:k1, 0:32].
template <int MR, bool kMasked, int H>
inline void tile832(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y,
                    int64_t ldy, int64_t kn, __mmask16 m0, __mmask16 m1, bool first,
                    const float* pf) {
  __m512 acc[2 * MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    acc[2 * i] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, y + i * ldy);
    acc[2 * i + 1] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, y + i * ldy + 16);
  }
  for (int64_t k = 0; k < kn; ++k) {
    if (pf) {
      prefetch<H>(pf + k * ldw);
      prefetch<H>(pf + k * ldw + 16);
    }
    const __m512 w0 = kMasked ? _mm512_maskz_loadu_ps(m0, w + k * ldw) : _mm512_loadu_ps(w + k * ldw);
    const __m512 w1 = kMasked ? _mm512_maskz_loadu_ps(m1, w + k * ldw + 16)
                              : _mm512_loadu_ps(w + k * ldw + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 xi = _mm512_set1_ps(x[i * ldx + k]);
      acc[2 * i] = _mm512_fmadd_ps(xi, w0, acc[2 * i]);
      acc[2 * i + 1] = _mm512_fmadd_ps(xi, w1, acc[2 * i + 1]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(y + i * ldy, m0, acc[2 * i]);
    _mm512_mask_storeu_ps(y + i * ldy + 16, m1, acc[2 * i + 1]);
  }
}

// 16 rows x 16 columns: one weight load per 16 FMAs.
template <int MR, bool kMasked, int H>
inline void tile1616(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y,
                     int64_t ldy, int64_t kn, __mmask16 m0, bool first, const float* pf) {
  __m512 acc[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
    acc[i] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, y + i * ldy);
  for (int64_t k = 0; k < kn; ++k) {
    if (pf) prefetch<H>(pf + k * ldw);
    const __m512 w0 = kMasked ? _mm512_maskz_loadu_ps(m0, w + k * ldw) : _mm512_loadu_ps(w + k * ldw);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), w0, acc[i]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + i * ldy, m0, acc[i]);
}

using Tile832 = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                         __mmask16, __mmask16, bool, const float*);
#define T8(B, H) {nullptr, tile832<1, B, H>, tile832<2, B, H>, tile832<3, B, H>, \
    tile832<4, B, H>, tile832<5, B, H>, tile832<6, B, H>, tile832<7, B, H>, tile832<8, B, H>}
constexpr Tile832 kT832[3][2][9] = {{T8(false, 0), T8(true, 0)}, {T8(false, 1), T8(true, 1)},
                                    {T8(false, 2), T8(true, 2)}};
using Tile1616 = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                          __mmask16, bool, const float*);
#define T16(B, H) {nullptr, tile1616<1, B, H>, tile1616<2, B, H>, tile1616<3, B, H>, \
    tile1616<4, B, H>, tile1616<5, B, H>, tile1616<6, B, H>, tile1616<7, B, H>, \
    tile1616<8, B, H>, tile1616<9, B, H>, tile1616<10, B, H>, tile1616<11, B, H>, \
    tile1616<12, B, H>, tile1616<13, B, H>, tile1616<14, B, H>, tile1616<15, B, H>, \
    tile1616<16, B, H>}
constexpr Tile1616 kT1616[3][2][17] = {{T16(false, 0), T16(true, 0)}, {T16(false, 1), T16(true, 1)},
                                       {T16(false, 2), T16(true, 2)}};

struct Params {
  int64_t packed, width, pf, block_k, tile, hint, read_only, order;
};

// One strip: w at the strip's first column with row stride ldw (packed < 2), or the strip's
// block-tile-major panel (packed == 2: block b's tile t, kn x TW, at b * bk * width + t * kn *
// TW, row stride TW); y at the strip's first column.
void strip(const Params& p, const float* x, const float* w, int64_t ldw, float* y, int64_t ldy,
           int64_t m, int64_t k, int64_t width, int64_t wd) {
  const int64_t bk = p.block_k;
  const int64_t tw = p.tile == 0 ? 32 : 16, mt = p.tile == 0 ? 8 : 16;
  const bool bt = p.packed == 2;
  for (int64_t k0 = 0; k0 < k; k0 += bk) {
    const int64_t kn = std::min(bk, k - k0);
    const int64_t k1 = k0 + p.pf * bk, kn1 = std::min(bk, k - k1);
    auto one = [&](int64_t i0, int64_t c) {
      const int64_t mr = std::min<int64_t>(mt, m - i0);
      const float* wt = bt ? w + k0 * wd + c * kn : w + k0 * ldw + c;
      const int64_t lw = bt ? tw : ldw;
      const float* pf = p.pf && i0 == 0 && kn1 >= kn ? (bt ? w + k1 * wd + c * kn1 : w + k1 * ldw + c)
                                                    : nullptr;
      if (p.tile == 0)
        kT832[p.hint][width - c < 32][mr](x + i0 * k + k0, k, wt, lw, y + i0 * ldy + c, ldy, kn,
                                          mask_of(width - c), mask_of(width - c - 16), k0 == 0,
                                          pf);
      else
        kT1616[p.hint][width - c < 16][mr](x + i0 * k + k0, k, wt, lw, y + i0 * ldy + c, ldy, kn,
                                           mask_of(width - c), k0 == 0, pf);
    };
    if (p.order == 0) {
      for (int64_t i0 = 0; i0 < m; i0 += mt)
        for (int64_t c = 0; c < width; c += tw) one(i0, c);
    } else {
      for (int64_t c = 0; c < width; c += tw)
        for (int64_t i0 = 0; i0 < m; i0 += mt) one(i0, c);
    }
  }
}

// packed == 3: w is [N, K] (Hugging Face's [out, in]), vectorised over the rows of x instead:
// xt [K, 16] (x transposed, one row tile), accumulator r holds y[0:16, n + r], each weight
// w[n + r, k] broadcast from memory into its FMA; the R rows of w a tile reads are one
// contiguous R x K block. pf: lines ahead to prefetch in each of the R rows (0: none).
template <int R, int H>
inline void tile_oi(const float* xt, const float* w, int64_t k, float* y, int64_t ldy,
                    __mmask16 rows, int64_t pf) {
  __m512 acc[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k0 = 0;
  for (; k0 + 16 <= k; k0 += 16) {
    if (pf) {
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) prefetch<H>(w + r * k + k0 + 16 * pf);
    }
#pragma GCC unroll 16
    for (int kk = 0; kk < 16; ++kk) {
      const __m512 xk = _mm512_load_ps(xt + (k0 + kk) * 16);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(xk, _mm512_set1_ps(w[r * k + k0 + kk]), acc[r]);
    }
  }
  for (; k0 < k; ++k0) {
    const __m512 xk = _mm512_load_ps(xt + k0 * 16);
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(xk, _mm512_set1_ps(w[r * k + k0]), acc[r]);
  }
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                           5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(int32_t(ldy)));
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) _mm512_mask_i32scatter_ps(y + r, rows, idx, acc[r], 4);
}

using TileOi = void (*)(const float*, const float*, int64_t, float*, int64_t, __mmask16, int64_t);
template <int H>
void strip_oi_h(const float* xt, const float* w, int64_t k, float* y, int64_t ldy, int64_t m,
                int64_t width, int64_t rt, int64_t pf) {
  const TileOi big = rt == 2 ? tile_oi<24, H> : rt == 4 ? tile_oi<28, H> : tile_oi<16, H>;
  const int64_t R = rt == 2 ? 24 : rt == 4 ? 28 : 16;
  for (int64_t i0 = 0; i0 < m; i0 += 16) {
    const __mmask16 rows = mask_of(m - i0);
    const float* x = xt + i0 * k;
    float* yi = y + i0 * ldy;
    int64_t c = 0;
    for (; c + R <= width; c += R) big(x, w + c * k, k, yi + c, ldy, rows, pf);
    for (; c + 8 <= width; c += 8) tile_oi<8, H>(x, w + c * k, k, yi + c, ldy, rows, pf);
    for (; c + 4 <= width; c += 4) tile_oi<4, H>(x, w + c * k, k, yi + c, ldy, rows, pf);
    for (; c < width; ++c) tile_oi<1, H>(x, w + c * k, k, yi + c, ldy, rows, pf);
  }
}

// Streams the strip's weights (no FMAs): what reading alone costs in this access pattern.
void strip_read(const float* w, int64_t ldw, float* y, int64_t k, int64_t width) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    int64_t c = 0;
    for (; c + 32 <= width; c += 32) {
      a0 = _mm512_add_ps(a0, _mm512_loadu_ps(w + kk * ldw + c));
      a1 = _mm512_add_ps(a1, _mm512_loadu_ps(w + kk * ldw + c + 16));
    }
    for (; c < width; c += 16) a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(mask_of(width - c), w + kk * ldw + c));
  }
  y[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

int64_t default_width(int64_t n, int64_t workers, int64_t strip = 512) {
  const int64_t rounds = std::max<int64_t>(1, (n + workers * strip - 1) / (workers * strip));
  return ((n + workers * rounds - 1) / (workers * rounds) + 31) / 32 * 32;
}

ffi::Error exp_matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t n, int64_t packed,
                      int64_t width, int64_t pf, int64_t block_k, int64_t tile, int64_t hint,
                      int64_t read_only, int64_t order) {
  const Params p{packed, width, pf, block_k, tile, hint, read_only, order};
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1];
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t wd = width > 0 ? width : default_width(n, workers, width < 0 ? -width : 512);
  const int64_t strips = (n + wd - 1) / wd;
  if (packed == 3 ? w.element_count() != n * k : packed && w.element_count() != strips * k * wd)
    return ffi::Error::InvalidArgument("packed w has the wrong size");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  if (packed == 3) {
    // x transposed into row tiles of 16: xt[i0 / 16][k][16], zero past m.
    const int64_t tiles = (m + 15) / 16;
    float* xt = static_cast<float*>(std::aligned_alloc(64, tiles * k * 16 * 4));
    std::memset(xt, 0, tiles * k * 16 * 4);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t kk = 0; kk < k; ++kk) xt[(i / 16) * k * 16 + kk * 16 + i % 16] = xp[i * k + kk];
    jaxserve::parallel_for(pool, strips, [=](int64_t s) {
      const int64_t n0 = s * wd, cols = std::min(wd, n - n0);
      if (p.read_only)
        strip_read(wp + n0 * k, k, yp + n0, cols, k);
      else if (p.hint == 1)
        strip_oi_h<1>(xt, wp + n0 * k, k, yp + n0, n, m, cols, p.tile, p.pf);
      else if (p.hint == 2)
        strip_oi_h<2>(xt, wp + n0 * k, k, yp + n0, n, m, cols, p.tile, p.pf);
      else
        strip_oi_h<0>(xt, wp + n0 * k, k, yp + n0, n, m, cols, p.tile, p.pf);
    });
    std::free(xt);
    return ffi::Error::Success();
  }
  jaxserve::parallel_for(pool, strips, [=](int64_t s) {
    const int64_t n0 = s * wd, cols = std::min(wd, n - n0);
    const float* ws = packed ? wp + s * k * wd : wp + n0;
    const int64_t ldw = packed ? wd : n;
    if (p.read_only == 2)
      yp[n0] = 0;  // nothing: the step's fixed costs (calls, pool hand-offs, glue ops)
    else if (p.read_only)
      strip_read(ws, ldw, yp + n0, k, cols);
    else
      strip(p, xp, ws, ldw, yp + n0, n, m, k, cols, wd);
  });
  return ffi::Error::Success();
}

// Asks the kernel to back [w, w + bytes) with huge pages now (MADV_HUGEPAGE, then
// MADV_COLLAPSE where the kernel has it). Returns 0 on success, else errno of the collapse.
ffi::Error exp_hugepage(ffi::Buffer<ffi::F32> w, ffi::Result<ffi::Buffer<ffi::S32>> status) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(w.typed_data());
  const uintptr_t lo = (a + (2u << 20) - 1) & ~uintptr_t((2u << 20) - 1);
  const uintptr_t hi = (a + w.size_bytes()) & ~uintptr_t((2u << 20) - 1);
  int rc = 0;
  if (hi > lo) {
    if (madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE)) rc = errno;
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
    else if (madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_COLLAPSE)) rc = errno;
  }
  status->typed_data()[0] = rc;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ExpMatmul, exp_matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("packed")
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("pf")
                                  .Attr<int64_t>("block_k")
                                  .Attr<int64_t>("tile")
                                  .Attr<int64_t>("hint")
                                  .Attr<int64_t>("read_only")
                                  .Attr<int64_t>("order"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ExpHugepage, exp_hugepage,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

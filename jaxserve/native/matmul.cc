// Skinny matmul on the CPU, as an XLA FFI custom call: y f32[M, N] = x[M, K] @ w[K, N] for the
// few-row products of a decode step (w stored [in, out], the CPU serving layout), and, with
// EngineConfig.batch_invariant, for every product (the tall path below strip_tall): its rows do
// not depend on M, XLA's dot's do.
//
// Why a native kernel: at M = 16 a float32 product does 8 FLOPs per weight byte; on the 2-core
// bench VM (AVX-512, ~225 GFLOP/s FMA peak per core, ~16 GB/s read per core, ~31 GB/s for two)
// it should be bound by streaming the weights. XLA's CPU dot (YNNPACK by default; XNNPACK,
// oneDNN, Eigen alike) runs these products at 40-120 GFLOP/s, i.e. 5-15 GB/s of weights, and the
// bench model's weights-only decode step took 85 ms against this kernel's 58 ms (same process,
// interleaved; benchmarks/decode_bandwidth.py).
//
// Work split: the output columns, in strips of kStrip columns, handed out to XLA's intra-op
// thread pool and the calling thread (both cores stream their own strips). Inside a strip, a
// block of kBlockK weight rows (kBlockK x kStrip, L1-resident) is multiplied into up to 8 x 32
// register tiles of the output (16 accumulators: FMA-bound, 2 weight loads + 8 broadcasts per 16
// FMAs), while the next block's rows are prefetched. Every y[m, n] sums over k in order 0..K-1
// whatever M is and however the strips fall on threads: a row's result does not depend on the
// other rows of the product, nor on the thread count.
//
// x [M, K] float32 or bfloat16, w [K, N] the same dtype, y [M, N] float32. A second target
// (JaxserveSkinnyMatmulOutIn) reads w stored [N, K] instead: see run_oi.
//
// live s32[4] = (s0, e0, s1, e1): the rows the caller will read, [s0, e0) and [s1, e1); every
// other row of y is set to 0 and, on the tall paths, not computed. A step's rows are a chunk
// region and a decode region of fixed sizes, each used from its start (a 2,000-token prompt's
// last step fills 416 of 528 rows): its products then cost the rows used, not the shape's.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kStrip = 512;  // output columns per task (16 register tiles of 32)
constexpr int64_t kBlockK = 32;  // weight rows per block: 32 x 128 x 4 B = 16 KiB in L1
constexpr int64_t kTileM = 8;    // rows per register tile

// 16 weights from w as float32; with kMasked, lanes outside `mask` read as 0 (a masked load
// costs an extra uop on the FMA ports, so full tiles use plain loads).
template <bool kMasked>
inline __m512 load_w(const float* w, __mmask16 mask) {
  return kMasked ? _mm512_maskz_loadu_ps(mask, w) : _mm512_loadu_ps(w);
}
template <bool kMasked>
inline __m512 load_w(const uint16_t* w, __mmask16 mask) {
  const __m256i h = kMasked ? _mm256_maskz_loadu_epi16(mask, w)
                            : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// y[0:MR, 0:32] (+)= x[0:MR, k0:k1] @ w[k0:k1, 0:32], masks for the two 16-column halves.
// x is float32 with row stride ldx, w row stride ldw, y row stride ldy. first: start from 0.
// pf (or null): the same 32 columns kBlockK rows further on, prefetched one row per k so the
// next block's loads overlap this block's FMAs (a burst of a whole block's prefetches up
// front filled the line-fill buffers and stalled the FMAs behind them: ~1/2 the bandwidth).
template <int MR, bool kMasked, typename T>
inline void tile(const float* x, int64_t ldx, const T* w, int64_t ldw, float* y, int64_t ldy,
                 int64_t kn, __mmask16 m0, __mmask16 m1, bool first, const T* pf) {
  // One flat array with every loop over it unrolled: GCC then keeps it in registers (with a
  // 2-D array it stored all 16 accumulators to the stack on every k).
  __m512 acc[2 * MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    acc[2 * i] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, y + i * ldy);
    acc[2 * i + 1] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, y + i * ldy + 16);
  }
  for (int64_t k = 0; k < kn; ++k) {
    if (pf) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * ldw), _MM_HINT_T0);
      if (sizeof(T) == 4) _mm_prefetch(reinterpret_cast<const char*>(pf + k * ldw + 16), _MM_HINT_T0);
    }
    const __m512 w0 = load_w<kMasked>(w + k * ldw, m0);
    const __m512 w1 = load_w<kMasked>(w + k * ldw + 16, m1);
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

template <typename T>
using TileFn = void (*)(const float*, int64_t, const T*, int64_t, float*, int64_t, int64_t,
                        __mmask16, __mmask16, bool, const T*);

template <typename T>
constexpr TileFn<T> kTiles[2][kTileM + 1] = {
    {nullptr, tile<1, false, T>, tile<2, false, T>, tile<3, false, T>, tile<4, false, T>,
     tile<5, false, T>, tile<6, false, T>, tile<7, false, T>, tile<8, false, T>},
    {nullptr, tile<1, true, T>, tile<2, true, T>, tile<3, true, T>, tile<4, true, T>,
     tile<5, true, T>, tile<6, true, T>, tile<7, true, T>, tile<8, true, T>}};

inline __mmask16 mask_of(int64_t cols) {
  return cols >= 16 ? __mmask16(0xFFFF) : cols <= 0 ? __mmask16(0) : __mmask16((1u << cols) - 1);
}

// One strip: columns [n0, n0 + width) of y [m, ldy] for all m rows, from w's rows of stride ldw
// (w already offset to the strip's first column).
template <typename T>
void strip(const float* x, const T* w, int64_t ldw, float* y, int64_t ldy, int64_t m, int64_t k,
           int64_t width) {
  for (int64_t k0 = 0; k0 < k; k0 += kBlockK) {
    const int64_t kn = std::min(kBlockK, k - k0);
    // The block after next of this strip, prefetched by the first row tile's k loops (two
    // blocks ahead and 512-column strips measured best: 10 -> 13-20 GB/s on the 2-core VM).
    const int64_t k1 = k0 + 2 * kBlockK, kn1 = std::min(kBlockK, k - k1);
    for (int64_t i0 = 0; i0 < m; i0 += kTileM) {
      const int64_t mr = std::min(kTileM, m - i0);
      for (int64_t c = 0; c < width; c += 32) {
        const T* pf = i0 == 0 && kn1 >= kn ? w + k1 * ldw + c : nullptr;
        kTiles<T>[width - c < 32][mr](x + i0 * k + k0, k, w + k0 * ldw + c, ldw,
                                      y + i0 * ldy + c, ldy, kn, mask_of(width - c),
                                      mask_of(width - c - 16), k0 == 0, pf);
      }
    }
  }
}

// Tall products (more than kTallRows rows: a prefill chunk's) are bound by the FMAs, not by
// the weights. On [in, out] weights (strip_tall; [out, in] ones: strip_tall_wide below): a
// column tile's kPanelK x 32 weights are copied once (widened to float32) into
// a contiguous panel that stays in L1 while the row tiles (12 x 32: 24 accumulators) of a block
// of rows pass over it (read in place, the panel's rows, N floats apart, fall into a few cache
// sets and miss). Loops: row blocks, k panels, column tiles, row tiles, so a block's x slice and
// y stay in L2 (with the column tiles outside, a 528 x 2048 x came from L3 for each of them).
// Single-core CPU time against XLA's dot on the bench model's layer products at 528 rows:
// 1.01-1.04x (benchmarks/row_invariance.py times both). The arithmetic is the skinny path's,
// tile for tile: each y[m, n] is the FMA chain over k = 0..K-1 started from 0, so a row's
// result is the same to the bit whichever path, block or tile its product took.
constexpr int64_t kTallRows = 64;
constexpr int64_t kPanelK = 256;  // 256 x 32 x 4 B = 32 KiB
constexpr int kTallTileM = 12;
constexpr int64_t kTallBlockM = 240;  // 20 row tiles: x slice 240 KiB, y up to ~0.5 MiB

// One weight as float32 (bfloat16: its bits are a float32's top half).
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// r[i][q] -> r[q][i] for a 16 x 16 block of floats: unpack pairs of rows, then pairs of pairs,
// then gather the 128-bit lanes (after which r[4L + e] is element 4L + e of every row).
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  const auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
  const auto ps = [](__m512d v) { return _mm512_castpd_ps(v); };
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = ps(_mm512_unpacklo_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    u[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    u[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
    u[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
  }
  // u[4a + e], lane L: element 4L + e of rows 4a..4a+3.
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) {
    const __m512 x0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88);
    const __m512 x1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xDD);
    const __m512 y0 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88);
    const __m512 y1 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xDD);
    r[e] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    r[8 + e] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    r[4 + e] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    r[12 + e] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
}

// x [m, k] as row tiles of 16, transposed: xt[(t * k + kk) * 16 + i] = x[(16t + i) * k + kk],
// zero past m; 16 x 16 blocks through registers (copied one float at a time, the transpose
// took 5-20 us of each decode-sized product, alone on one core before the product starts),
// into this thread's buffer, kept from call to call (a fresh 128 KiB one is a new mapping
// and its page faults each time). Valid until this thread's next call.
inline const float* transposed_row_tiles(const float* x, int64_t m, int64_t k) {
  thread_local std::vector<float> xt;
  const int64_t tiles = (m + 15) / 16, k16 = k / 16 * 16;
  xt.resize(tiles * k * 16);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t rows = std::min<int64_t>(16, m - 16 * t);
    const float* src = x + 16 * t * k;
    float* dst = xt.data() + t * k * 16;
    for (int64_t kk = 0; kk < k16; kk += 16) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_loadu_ps(src + i * k + kk) : _mm512_setzero_ps();
      transpose16(r);
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) _mm512_storeu_ps(dst + (kk + q) * 16, r[q]);
    }
    for (int64_t kk = k16; kk < k; ++kk)
      for (int64_t i = 0; i < 16; ++i) dst[kk * 16 + i] = i < rows ? src[i * k + kk] : 0.0f;
  }
  return xt.data();
}

// The weights a panel covers, [kn, PW] from column c and weight row k0 on, either stored
// [in, out] (kOutIn false, PW 32: w is the strip's first column, rows ldw apart; strip_tall) or
// [out, in] (kOutIn true: w is the strip's first output row, rows k apart; strip_tall_wide),
// copied (widened) into the panel [kn, PW].
template <bool kOutIn, typename T, int PW = 32>
inline void fill_panel(float* panel, const T* w, int64_t ldw, int64_t k, int64_t k0,
                       int64_t kn, int64_t c, int64_t cols) {
  static_assert(PW == 32 || (kOutIn && PW % 16 == 0), "[in, out] panels are 32 wide");
  if (!kOutIn) {
    const __mmask16 m0 = mask_of(cols), m1 = mask_of(cols - 16);
    for (int64_t kk = 0; kk < kn; ++kk) {
      const T* src = w + (k0 + kk) * ldw + c;
      _mm512_store_ps(panel + kk * 32, load_w<true>(src, m0));
      _mm512_store_ps(panel + kk * 32 + 16, load_w<true>(src + 16, m1));
    }
    return;
  }
  // A transpose: each output row's kn weights are contiguous; the panel wants them 32 apart.
  // 16 x 16 blocks in registers (a scalar copy made the tall [out, in] path 8-17% slower than
  // the [in, out] one at 528 rows); the k tail one by one.
  const int64_t kn16 = kn / 16 * 16;
  for (int64_t j0 = 0; j0 < PW; j0 += 16) {
    const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(16, cols - j0));
    for (int64_t kk = 0; kk < kn16; kk += 16) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? load_w<false>(w + (c + j0 + i) * k + k0 + kk, 0) : _mm512_setzero_ps();
      transpose16(r);
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) _mm512_store_ps(panel + (kk + q) * PW + j0, r[q]);
    }
    for (int64_t i = 0; i < 16; ++i) {
      const T* src = w + (c + j0 + i) * k + k0;
      for (int64_t kk = kn16; kk < kn; ++kk)
        panel[kk * PW + j0 + i] = i < rows ? widen(src[kk]) : 0.0f;
    }
  }
}

// Cache lines [first, last) of the [in, out] panel at (k0, c) (32 columns: two lines a weight
// row), into L2.
template <typename T>
inline void prefetch_panel(const T* w, int64_t ldw, int64_t k0, int64_t c, int64_t first,
                           int64_t last) {
  for (int64_t l = first; l < last; ++l) {
    const T* p = w + (k0 + l / 2) * ldw + c + (l % 2) * 16;
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
  }
}

// The panel after (k0, c) in a strip `width` columns wide, panels of pk weight rows x pw
// columns: the next column tile in this k range, else the first of the next k range (kn 0 past
// the end). Both tall paths prefetch it while the current panel's row tiles run.
struct PanelPos {
  int64_t k0, c, kn;
};
inline PanelPos next_panel(int64_t k0, int64_t c, int64_t k, int64_t width, int64_t pk,
                           int64_t pw) {
  const bool last_c = c + pw >= width;
  const int64_t nk0 = last_c ? k0 + pk : k0;
  return {nk0, last_c ? 0 : c + pw, nk0 < k ? std::min(pk, k - nk0) : 0};
}

// The rows a product computes (see `live` at the top).
struct LiveRows {
  int64_t s0, e0, s1, e1;
  int64_t count() const { return (e0 - s0) + (e1 - s1); }
};

// Rows [i0, i0 + mr) of x and y, one register tile.
struct RowTile {
  int64_t i0, mr;
};

// The live rows as register tiles of `full` rows, each span's last rows in tiles of at most
// `rest` (a tile never crosses from one span into the other).
inline std::vector<RowTile> row_tiles(const LiveRows& live, int64_t full, int64_t rest) {
  std::vector<RowTile> tiles;
  for (const auto [s, e] : {std::pair{live.s0, live.e0}, std::pair{live.s1, live.e1}}) {
    int64_t i = s;
    for (; i + full <= e; i += full) tiles.push_back({i, full});
    for (; i < e; i += rest) tiles.push_back({i, std::min(rest, e - i)});
  }
  return tiles;
}

// Tiles per row block of the 6 x 64 tall paths: blocks of equal size (whole row tiles), at
// most kWideBlockM rows (defined below). 272 rows as 264 + 8 filled every panel again for 8 rows
// (0.94x XLA's dot there; 2 x 138: 1.0x).
inline int64_t wide_block_tiles(const std::vector<RowTile>& tiles, int64_t block_m) {
  int64_t rows = 0;
  for (const RowTile& t : tiles) rows += t.mr;
  const int64_t nt = static_cast<int64_t>(tiles.size());
  const int64_t blocks = std::max<int64_t>(1, (rows + block_m - 1) / block_m);
  return std::max<int64_t>(1, (nt + blocks - 1) / blocks);
}

// A prefetch of `lines` spread over a block's `tiles` row tiles: lines per tile, rounded up.
inline int64_t lines_per_tile(int64_t lines, int64_t tiles) { return (lines + tiles - 1) / tiles; }

template <typename T>
void strip_tall(const float* x, const T* w, int64_t ldw, float* y, int64_t ldy,
                const std::vector<RowTile>& tiles, int64_t k, int64_t width) {
  alignas(64) float panel[kPanelK * 32];
  const int64_t nt = static_cast<int64_t>(tiles.size());
  const int64_t per_block = kTallBlockM / kTallTileM;
  for (int64_t t0 = 0; t0 < nt; t0 += per_block) {
    const int64_t t1 = std::min(nt, t0 + per_block);
    for (int64_t k0 = 0; k0 < k; k0 += kPanelK) {
      const int64_t kn = std::min(kPanelK, k - k0);
      for (int64_t c = 0; c < width; c += 32) {
        const int64_t cols = std::min<int64_t>(32, width - c);
        const __mmask16 m0 = mask_of(cols), m1 = mask_of(cols - 16);
        fill_panel<false, T>(panel, w, ldw, k, k0, kn, c, cols);
        // The next panel's weights, fetched into L2 a few lines per row tile (it would come
        // from memory while the FMAs wait, ~7% of a 528-row product).
        const PanelPos next = next_panel(k0, c, k, width, kPanelK, 32);
        const int64_t lines = 2 * next.kn;  // two lines per weight row (32 columns)
        const int64_t per = lines_per_tile(lines, t1 - t0);
        int64_t pf = 0;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t e = std::min(lines, pf + per);
          if (pf < e) prefetch_panel(w, ldw, next.k0, next.c, pf, e);
          pf = e;
          const auto [i0, mr] = tiles[t];
          if (mr == kTallTileM)
            (cols < 32 ? tile<kTallTileM, true, float> : tile<kTallTileM, false, float>)(
                x + i0 * k + k0, k, panel, 32, y + i0 * ldy + c, ldy, kn, m0, m1, k0 == 0,
                nullptr);
          else
            kTiles<float>[cols < 32][mr](x + i0 * k + k0, k, panel, 32, y + i0 * ldy + c, ldy,
                                         kn, m0, m1, k0 == 0, nullptr);
        }
      }
    }
  }
}

// The [out, in] tall path: 6 x 64 register tiles (24 accumulators; per k, 4 panel loads and 6
// broadcasts feed 24 FMAs, against 2 loads and 12 broadcasts in strip_tall's 12 x 32) over
// [kWidePanelK, 64] panels (32 KiB, in L1) transposed out of w, blocks of kWideBlockM rows, the
// next panel prefetched into L2 meanwhile. On the bench model's layer products at 528 rows on
// the 2-core VM: 1.05-1.10x XLA's dot (YNNPACK) and 0.91-0.96x PyTorch's
// (benchmarks/results/gemm_libraries.json); batch_invariant's mixed steps went from +9.7%
// (12 x 32 tiles) to -1.6% against XLA's (benchmarks/results/reproducibility.json). Same FMA
// chain per y[m, n] (k = 0..K-1 from 0): the bits of the skinny path and of strip_tall.
constexpr int64_t kWidePanelK = 128;
constexpr int kWideTileM = 6;
constexpr int64_t kWideBlockM = 264;  // x slice 264 x 128 x 4 B = 132 KiB, in L2

// Where a tile's 64 columns of weights are: a panel filled by the tall path ([kn, 64], rows
// 64 floats apart), or, in the `panels` layout, four 16-column panels read in place (rows 16
// floats apart, one panel `stride` floats from the next).
struct FilledPanel {
  const float* p;
  const float* at(int64_t k, int j) const { return p + k * 64 + 16 * j; }
};
struct PackedPanels {
  const float* p;
  int64_t stride;
  const float* at(int64_t k, int j) const { return p + j * stride + k * 16; }
};

// y[0:MR, 0:64] (+)= x[0:MR, 0:kn] @ panel[0:kn, 0:64]; mk: the four 16-column masks.
template <int MR, bool kMasked, typename Panel>
inline void tile_wide(const float* x, int64_t ldx, Panel panel, float* y, int64_t ldy,
                      int64_t kn, const __mmask16* mk, bool first) {
  __m512 acc[4 * MR];  // flat and fully unrolled, so GCC keeps it in registers (see tile)
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      acc[4 * i + v] = first ? _mm512_setzero_ps()
                             : _mm512_maskz_loadu_ps(kMasked ? mk[v] : 0xFFFF,
                                                     y + i * ldy + 16 * v);
  // Short tiles load masked: a packed panel past the last column may not exist.
  const auto load = [&](int64_t k, int j) {
    return kMasked ? _mm512_maskz_loadu_ps(mk[j], panel.at(k, j)) : _mm512_loadu_ps(panel.at(k, j));
  };
  for (int64_t k = 0; k < kn; ++k) {
    const __m512 w0 = load(k, 0), w1 = load(k, 1), w2 = load(k, 2), w3 = load(k, 3);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 xi = _mm512_set1_ps(x[i * ldx + k]);
      acc[4 * i] = _mm512_fmadd_ps(xi, w0, acc[4 * i]);
      acc[4 * i + 1] = _mm512_fmadd_ps(xi, w1, acc[4 * i + 1]);
      acc[4 * i + 2] = _mm512_fmadd_ps(xi, w2, acc[4 * i + 2]);
      acc[4 * i + 3] = _mm512_fmadd_ps(xi, w3, acc[4 * i + 3]);
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      _mm512_mask_storeu_ps(y + i * ldy + 16 * v, kMasked ? mk[v] : 0xFFFF, acc[4 * i + v]);
}

template <typename Panel>
using WideTileFn = void (*)(const float*, int64_t, Panel, float*, int64_t, int64_t,
                            const __mmask16*, bool);
// The tile for `mr` rows of `cols` columns (masked where short).
template <typename Panel>
inline WideTileFn<Panel> wide_tile_for(int64_t mr, int64_t cols) {
  constexpr WideTileFn<Panel> kPartial[kWideTileM] = {
      nullptr,  tile_wide<1, true, Panel>, tile_wide<2, true, Panel>,
      tile_wide<3, true, Panel>, tile_wide<4, true, Panel>, tile_wide<5, true, Panel>};
  return mr < kWideTileM ? kPartial[mr]
         : cols < 64     ? tile_wide<kWideTileM, true, Panel>
                         : tile_wide<kWideTileM, false, Panel>;
}

// Columns [0, width) of y from w [width, k] (the strip's first output row), for the rows of
// `tiles` (kWideTileM rows each, a span's last fewer).
template <typename T>
void strip_tall_wide(const float* x, const T* w, float* y, int64_t ldy,
                     const std::vector<RowTile>& tiles, int64_t k, int64_t width) {
  alignas(64) float panel[kWidePanelK * 64];
  const int64_t nt = static_cast<int64_t>(tiles.size());
  const int64_t per_block = wide_block_tiles(tiles, kWideBlockM);
  for (int64_t t0 = 0; t0 < nt; t0 += per_block) {
    const int64_t t1 = std::min(nt, t0 + per_block);
    for (int64_t k0 = 0; k0 < k; k0 += kWidePanelK) {
      const int64_t kn = std::min(kWidePanelK, k - k0);
      for (int64_t c = 0; c < width; c += 64) {
        const int64_t cols = std::min<int64_t>(64, width - c);
        __mmask16 mk[4];
        for (int v = 0; v < 4; ++v) mk[v] = mask_of(cols - 16 * v);
        fill_panel<true, T, 64>(panel, w, 0, k, k0, kn, c, cols);
        // The next panel's weights (its rows' kn-long pieces), into L2 a few lines per row
        // tile, so that filling it does not wait on memory.
        const PanelPos next = next_panel(k0, c, k, width, kWidePanelK, 64);
        const int64_t nrows = next.kn ? std::min<int64_t>(64, width - next.c) : 0;
        constexpr int64_t kLine = 64 / sizeof(T);
        const int64_t per_row = (next.kn + kLine - 1) / kLine, lines = nrows * per_row;
        const int64_t per = lines_per_tile(lines, t1 - t0);
        int64_t pf = 0;
        for (int64_t t = t0; t < t1; ++t) {
          for (const int64_t e = std::min(lines, pf + per); pf < e; ++pf)
            _mm_prefetch(reinterpret_cast<const char*>(w + (next.c + pf / per_row) * k +
                                                       next.k0 + (pf % per_row) * kLine),
                         _MM_HINT_T1);
          const auto [i0, mr] = tiles[t];
          wide_tile_for<FilledPanel>(mr, cols)(x + i0 * k + k0, k, FilledPanel{panel},
                                               y + i0 * ldy + c, ldy, kn, mk, k0 == 0);
        }
      }
    }
  }
}

// Rows of y [m, n] outside `live`, set to 0.
inline void zero_padding(float* y, int64_t m, int64_t n, const LiveRows& live) {
  for (const auto [s, e] : {std::pair{int64_t{0}, live.s0}, std::pair{live.e0, live.s1},
                            std::pair{live.e1, m}})
    if (e > s) std::memset(y + s * n, 0, sizeof(float) * (e - s) * n);
}

// Columns per strip before rounding to a path's tile width: strips of about kStrip columns,
// their count a multiple of the workers so that every core streams the same share of the
// weights (768 columns as 512 + 256 left one core idle a third of the time).
inline int64_t strip_share(ffi::ThreadPool& pool, int64_t n) {
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t rounds = std::max<int64_t>(1, (n + workers * kStrip - 1) / (workers * kStrip));
  return (n + workers * rounds - 1) / (workers * rounds);
}

template <typename T>
void run(ffi::ThreadPool& pool, const float* x, const T* w, float* y, int64_t m, int64_t k,
         int64_t n, const LiveRows& live) {
  const int64_t width = (strip_share(pool, n) + 31) / 32 * 32;
  const int64_t strips = (n + width - 1) / width;
  if (m > kTallRows) {
    zero_padding(y, m, n, live);
    const std::vector<RowTile> tiles = row_tiles(live, kTallTileM, kTileM);
    jaxserve::parallel_for(pool, strips, [=, &tiles](int64_t s) {
      const int64_t n0 = s * width;
      strip_tall<T>(x, w + n0, n, y + n0, n, tiles, k, std::min(width, n - n0));
    });
    return;
  }
  // Few rows: bound by the weight stream, so all rows are computed and the padding zeroed.
  jaxserve::parallel_for(pool, strips, [=](int64_t s) {
    const int64_t n0 = s * width;
    strip<T>(x, w + n0, n, y + n0, n, m, k, std::min(width, n - n0));
  }, /*linger=*/true);
  zero_padding(y, m, n, live);
}

// Products on [out, in] weights (w [N, K], Hugging Face's layout, as the `fused_native` layout
// stores them): vectorised over the rows of x instead of the columns. x is transposed once per
// call into row tiles of 16 (xt [K, 16], zero past M); a register tile holds kOiCols outputs,
// accumulator r = y[i0:i0+16, n + r], and every weight w[n + r, k] is broadcast from memory
// into its FMA. The kOiCols weight rows a tile reads are one contiguous kOiCols x K block, and
// a strip of columns is one contiguous region of w: each core streams its strips front to back
// (read row-major [in, out], a strip is a 2 KiB piece of every row, N * 4 bytes apart). Per
// y[m, n] the arithmetic is the [in, out] path's, FMA for FMA: the chain over k = 0..K-1 from 0.
// At 16 rows this measured 1.15-1.35x the [in, out] kernel's weights-only decode step on the
// 2-core VM, and no slower at 1-64 rows (benchmarks/results/decode_experiment.md).
// bfloat16 weights are widened one by one here (a scalar shift and a broadcast per weight):
// 0.4-0.75x the [in, out] path, so bfloat16 models keep [in, out] (resolve_layout).
constexpr int kOiCols = 16;          // accumulators per register tile (16 measured ~5% over 24, 28)
constexpr int64_t kOiPrefetch = 4;   // cache lines ahead, in each of a tile's weight rows

// y[0:16, 0:R] (rows outside `rows` untouched) = xt[0:K, 0:16]^T @ w[0:R, 0:K]^T.
template <int R, typename T>
inline void tile_oi(const float* xt, const T* w, int64_t k, float* y, int64_t ldy,
                    __mmask16 rows) {
  constexpr int64_t kLine = 64 / sizeof(T);
  __m512 acc[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k0 = 0;
  for (; k0 + 16 <= k; k0 += 16) {
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(w + r * k + k0 + kOiPrefetch * kLine),
                   _MM_HINT_T0);
#pragma GCC unroll 16
    for (int kk = 0; kk < 16; ++kk) {
      const __m512 xk = _mm512_loadu_ps(xt + (k0 + kk) * 16);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(xk, _mm512_set1_ps(widen(w[r * k + k0 + kk])), acc[r]);
    }
  }
  for (; k0 < k; ++k0) {
    const __m512 xk = _mm512_loadu_ps(xt + k0 * 16);
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(xk, _mm512_set1_ps(widen(w[r * k + k0])), acc[r]);
  }
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int32_t>(ldy)));
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) _mm512_mask_i32scatter_ps(y + r, rows, idx, acc[r], 4);
}

// Columns [0, width) of y [m, ldy] from w's rows (w at the strip's first row, row length k).
// Row tiles inner: a register tile's weights (kOiCols x K, in L2) serve every 16 rows of x
// before the next columns' are read.
template <int R, typename T>
inline void column_tile_oi(const float* xt, const T* w, int64_t k, float* y, int64_t ldy,
                           int64_t m) {
  for (int64_t i0 = 0; i0 < m; i0 += 16)
    tile_oi<R, T>(xt + i0 * k, w, k, y + i0 * ldy, ldy, mask_of(m - i0));
}

template <typename T>
void strip_oi(const float* xt, const T* w, int64_t k, float* y, int64_t ldy, int64_t m,
              int64_t width) {
  int64_t c = 0;
  for (; c + kOiCols <= width; c += kOiCols)
    column_tile_oi<kOiCols, T>(xt, w + c * k, k, y + c, ldy, m);
  for (; c + 8 <= width; c += 8) column_tile_oi<8, T>(xt, w + c * k, k, y + c, ldy, m);
  for (; c < width; ++c) column_tile_oi<1, T>(xt, w + c * k, k, y + c, ldy, m);
}

template <typename T>
void run_oi(ffi::ThreadPool& pool, const float* x, const T* w, float* y, int64_t m, int64_t k,
            int64_t n, const LiveRows& live) {
  const int64_t share = strip_share(pool, n);
  if (m > kTallRows) {
    // Tall: 64-column panels copied transposed, 6 x 64 tiles (strip_tall_wide; same FMA chain
    // per y[m, n], so the same bits as the skinny path below).
    const int64_t width = (share + 63) / 64 * 64;
    zero_padding(y, m, n, live);
    const std::vector<RowTile> tiles = row_tiles(live, kWideTileM, kWideTileM);
    jaxserve::parallel_for(pool, (n + width - 1) / width, [=, &tiles](int64_t s) {
      const int64_t n0 = s * width;
      strip_tall_wide<T>(x, w + n0 * k, y + n0, n, tiles, k, std::min(width, n - n0));
    });
    return;
  }
  const float* xtp = transposed_row_tiles(x, m, k);
  // Strips as the [in, out] path's, rounded to 8 columns (whole register tiles of kOiCols or 8).
  const int64_t width = (share + 7) / 8 * 8;
  const int64_t strips = (n + width - 1) / width;
  jaxserve::parallel_for(pool, strips, [=](int64_t s) {
    const int64_t n0 = s * width;
    strip_oi<T>(xtp, w + n0 * k, k, y + n0, n, m, std::min(width, n - n0));
  }, /*linger=*/true);
  zero_padding(y, m, n, live);
}


// The `panels` layout (`fused_panels`): float32 w of P x K lines of 16 (stored [P, K, 16]),
// P = ceil(N / 16): panel c holds output columns 16c..16c+15 (zero past N), one 64-byte line
// per input k. The lines are stored in blocks of kPanelBlockK k rows: block b holds every
// panel's piece of k rows [256b, 256b + kn) (kn = 256 but for the last block), panel after
// panel, so a panel's piece is a contiguous [kn, 16] and the pieces of consecutive panels
// follow each other (jaxserve.native.matmul.to_panels builds it). Both paths read k in these
// blocks, so each reads the weights as contiguous runs of several panels' pieces: stored panel
// after panel ([P, K, 16] in order) they were 16 KiB pieces K x 64 B apart: blocked, the bench
// model's 49 products chained (benchmarks/decode_products.py, both layouts in one process) take
// 0.965x the time at 16 rows and 0.956x at 528. Tall products read four panels' pieces in
// place as a 6 x 64 tile's weights (strip_tall_wide without the transpose into a filled panel,
// 4-5% of its time); in few-row products a 16-column tile's weights are one stream, a line per
// k (x transposed once per call, as run_oi's), instead of 16 rows of w read side by side. Each
// y[m, n] is the same FMA chain as on the other paths (k = 0..K-1 from 0): the same bits.
constexpr int64_t kPanelWidth = 16;
// 256 k rows: a tall tile call's four pieces are 64 KiB (more than the 48 KiB L1: they stream
// from L2, where the next ones are prefetched meanwhile; twice strip_tall_wide's 128 k rows,
// which halves the accumulators' loads and stores). On a chain of the bench model's 48 layer
// products at 528 rows (weights from memory), against the [out, in] path
// (benchmarks/panels_layout.py, same process, layout then panel after panel): blocks of 128 k
// rows 0.95-0.96x its time, 256 0.90-0.92x, 384-768 0.91-0.93x. In few-row products a row
// tile's transposed x for one block is 16 KiB and stays in L1 for all the strip's panels (one
// pass over k per panel read all of x, 48-128 KiB, from L2 for each): the bench model's 49
// decode products chained (benchmarks/decode_products.py) 0.93-0.95x the one-pass time at 256
// k rows; 192: 0.945x, 128: 0.965x, 512: 1.01x.
constexpr int64_t kPanelBlockK = 256;  // = matmul.py's PANEL_BLOCK_K (tests: K > 256 to the bit)

struct PanelsLayout {
  const float* w;
  int64_t panels, k;
  // Panel p's piece of the k block starting at k0: min(kPanelBlockK, k - k0) lines.
  const float* piece(int64_t k0, int64_t p) const {
    return w + (k0 * panels + p * std::min(kPanelBlockK, k - k0)) * kPanelWidth;
  }
};

// Within a block, each k's weights are one line: prefetched kP16Prefetch lines ahead into L1;
// the next panel's piece (or the strip's first panel's next one) goes into L2 a line per k.
// Without the L2 prefetch 0.6x as fast (a standalone copy of the loop); 32 lines into L1
// instead of 16: the same time.
constexpr int64_t kP16Prefetch = 16;

// acc[0:nrows] (y's rows, its 16 columns in the lanes) over one piece's kn k rows: one
// accumulator per row of x, each k's weights one vector load of their line, x's broadcast
// from xt (L1); the sums start at 0 (`first`) or from y, and go back to y (a float32 store
// and reload is exact: the same FMA chain per y[m, n] as one pass over k). With the rows in
// the lanes instead (run_oi's form, the 16 weights broadcast one by one from the line, results
// scattered) the bench model's weights-only decode step was 2-8% slower
// (benchmarks/panels_layout.py --steps_only): 16 loads waiting on each missing line, not one.
inline void tile_p16(const float* xt, const float* w, int64_t kn, float* y, int64_t ldy,
                     int64_t nrows, __mmask16 cm, bool first, const float* next) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    acc[i] = first || i >= nrows ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(cm, y + i * ldy);
  for (int64_t kk = 0; kk < kn; ++kk) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (kk + kP16Prefetch) * kPanelWidth),
                 _MM_HINT_T0);
    if (next) _mm_prefetch(reinterpret_cast<const char*>(next + kk * kPanelWidth), _MM_HINT_T1);
    const __m512 wk = _mm512_loadu_ps(w + kk * kPanelWidth);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(xt[kk * 16 + i]), wk, acc[i]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    if (i < nrows) _mm512_mask_storeu_ps(y + i * ldy, cm, acc[i]);
}

// Columns [16 p0, 16 p0 + width) of y [m, ldy] (y: the first of them), few rows: block by
// block of k, every panel of the strip.
inline void strip_p16(const float* xt, const PanelsLayout& w, int64_t p0, float* y, int64_t ldy,
                      int64_t m, int64_t width) {
  const int64_t k = w.k, np = (width + kPanelWidth - 1) / kPanelWidth;
  for (int64_t k0 = 0; k0 < k; k0 += kPanelBlockK) {
    const int64_t kn = std::min(kPanelBlockK, k - k0);
    for (int64_t q = 0; q < np; ++q) {
      const float* wp = w.piece(k0, p0 + q);
      const float* next = q + 1 < np     ? wp + kn * kPanelWidth
                          : k0 + kn < k ? w.piece(k0 + kn, p0)
                                        : nullptr;
      const __mmask16 cm = mask_of(width - q * kPanelWidth);
      for (int64_t i0 = 0; i0 < m; i0 += 16)
        tile_p16(xt + (i0 * k + k0 * 16), wp, kn, y + i0 * ldy + q * kPanelWidth, ldy,
                 std::min<int64_t>(16, m - i0), cm, k0 == 0, i0 == 0 ? next : nullptr);
    }
  }
}

// Columns [16 p0, 16 p0 + width) of y (y: the first of them), for the rows of `tiles`. As
// strip_tall_wide, but the weights are read in place. Row blocks of 132 or 528 rows instead of
// 264, and prefetching two panels ahead, were slower. The loop nest is strip_tall_wide's; one
// shared nest with the panel and its prefetch passed in as lambdas measured 1.5-4% slower on
// both paths (four alternating pairs of the chain above), so each keeps its own.
inline void strip_tall_p16(const float* x, const PanelsLayout& w, int64_t p0, float* y,
                           int64_t ldy, const std::vector<RowTile>& tiles, int64_t width) {
  const int64_t k = w.k, nt = static_cast<int64_t>(tiles.size());
  const int64_t per_block = wide_block_tiles(tiles, kWideBlockM);
  for (int64_t t0 = 0; t0 < nt; t0 += per_block) {
    const int64_t t1 = std::min(nt, t0 + per_block);
    for (int64_t k0 = 0; k0 < k; k0 += kPanelBlockK) {
      const int64_t kn = std::min(kPanelBlockK, k - k0);
      for (int64_t c = 0; c < width; c += 64) {
        const int64_t cols = std::min<int64_t>(64, width - c);
        __mmask16 mk[4];
        for (int v = 0; v < 4; ++v) mk[v] = mask_of(cols - 16 * v);
        const PackedPanels panel{w.piece(k0, p0 + c / kPanelWidth), kn * kPanelWidth};
        // The next tile's pieces (contiguous: next.kn lines each), into L2 a few lines per row
        // tile (without: 2-3% slower on the chain above).
        const PanelPos next = next_panel(k0, c, k, width, kPanelBlockK, 64);
        const int64_t npanels =
            next.kn ? (std::min<int64_t>(64, width - next.c) + kPanelWidth - 1) / kPanelWidth
                    : 0;
        const float* next_w = npanels ? w.piece(next.k0, p0 + next.c / kPanelWidth) : nullptr;
        const int64_t lines = npanels * next.kn, per = lines_per_tile(lines, t1 - t0);
        int64_t pf = 0;
        for (int64_t t = t0; t < t1; ++t) {
          for (const int64_t e = std::min(lines, pf + per); pf < e; ++pf)
            _mm_prefetch(reinterpret_cast<const char*>(next_w + pf * kPanelWidth), _MM_HINT_T1);
          const auto [i0, mr] = tiles[t];
          wide_tile_for<PackedPanels>(mr, cols)(x + i0 * k + k0, k, panel, y + i0 * ldy + c,
                                                ldy, kn, mk, k0 == 0);
        }
      }
    }
  }
}

void run_panels(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t m,
                int64_t k, int64_t n, const LiveRows& live) {
  const int64_t share = strip_share(pool, n);
  const PanelsLayout layout{w, (n + kPanelWidth - 1) / kPanelWidth, k};
  if (m > kTallRows) {
    const int64_t width = (share + 63) / 64 * 64;
    zero_padding(y, m, n, live);
    const std::vector<RowTile> tiles = row_tiles(live, kWideTileM, kWideTileM);
    jaxserve::parallel_for(pool, (n + width - 1) / width, [=, &tiles, &layout](int64_t s) {
      const int64_t n0 = s * width;
      strip_tall_p16(x, layout, n0 / kPanelWidth, y + n0, n, tiles, std::min(width, n - n0));
    });
    return;
  }
  const float* xtp = transposed_row_tiles(x, m, k);
  const int64_t width = (share + kPanelWidth - 1) / kPanelWidth * kPanelWidth;
  jaxserve::parallel_for(pool, (n + width - 1) / width, [=, &layout](int64_t s) {
    const int64_t n0 = s * width;
    strip_p16(xtp, layout, n0 / kPanelWidth, y + n0, n, m, std::min(width, n - n0));
  }, /*linger=*/true);
  zero_padding(y, m, n, live);
}

// The rows `live_rows` names, checked (see `live` at the top).
ffi::Error live_of(ffi::Buffer<ffi::S32> live_rows, int64_t m, LiveRows& live) {
  if (live_rows.element_count() != 4)
    return ffi::Error::InvalidArgument("native matmul: live_rows must be s32[4]");
  const int32_t* lr = live_rows.typed_data();
  live = LiveRows{lr[0], lr[1], lr[2], lr[3]};
  if (!(0 <= live.s0 && live.s0 <= live.e0 && live.e0 <= live.s1 && live.s1 <= live.e1 &&
        live.e1 <= m))
    return ffi::Error::InvalidArgument(
        "native matmul: live_rows (s0, e0, s1, e1) need 0 <= s0 <= e0 <= s1 <= e1 <= M");
  return ffi::Error::Success();
}

ffi::Error panels_matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::S32> live_rows, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[1] != xd[1] ||
      wd[2] != kPanelWidth || yd[0] != xd[0] || wd[0] != (yd[1] + kPanelWidth - 1) / kPanelWidth)
    return ffi::Error::InvalidArgument(
        "panels_matmul: x [M, K], w of [ceil(N / 16), K, 16] (to_panels) and y [M, N] expected");
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  LiveRows live;
  if (ffi::Error e = live_of(live_rows, m, live); e.failure()) return e;
  if (m == 0 || n == 0) return ffi::Error::Success();
  float* out = y->typed_data();
  if (k == 0 || live.count() == 0) {
    std::memset(out, 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  run_panels(pool, x.typed_data(), w.typed_data(), out, m, k, n, live);
  return ffi::Error::Success();
}

template <bool kOutIn>
ffi::Error skinny_matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                         ffi::Buffer<ffi::S32> live_rows, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[kOutIn ? 1 : 0])
    return ffi::Error::InvalidArgument(kOutIn ? "skinny_matmul: x [M, K] and w [N, K] expected"
                                              : "skinny_matmul: x [M, K] and w [K, N] expected");
  if (x.element_type() != w.element_type())
    return ffi::Error::InvalidArgument("skinny_matmul: x and w must share a dtype");
  const int64_t m = xd[0], k = xd[1], n = wd[kOutIn ? 0 : 1];
  LiveRows live;
  if (ffi::Error e = live_of(live_rows, m, live); e.failure()) return e;
  if (m == 0 || n == 0) return ffi::Error::Success();
  float* out = y->typed_data();
  if (k == 0 || live.count() == 0) {
    std::memset(out, 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  switch (x.element_type()) {
    case ffi::DataType::F32:
      (kOutIn ? run_oi<float> : run<float>)(
          pool, reinterpret_cast<const float*>(x.untyped_data()),
          reinterpret_cast<const float*>(w.untyped_data()), out, m, k, n, live);
      return ffi::Error::Success();
    case ffi::DataType::BF16: {
      // x is small (M x K): widen it once; the weights are widened in registers.
      std::vector<float> xf(m * k);
      const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.untyped_data());
      for (int64_t i = 0; i < m * k; ++i) {
        const uint32_t bits = uint32_t(xb[i]) << 16;
        std::memcpy(&xf[i], &bits, 4);
      }
      (kOutIn ? run_oi<uint16_t> : run<uint16_t>)(
          pool, xf.data(), reinterpret_cast<const uint16_t*>(w.untyped_data()), out, m, k, n,
          live);
      return ffi::Error::Success();
    }
    default:
      return ffi::Error::InvalidArgument("skinny_matmul: dtype must be float32 or bfloat16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveSkinnyMatmul, skinny_matmul<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The same product with w stored [N, K] ([out, in]): see run_oi.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveSkinnyMatmulOutIn, skinny_matmul<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The same product with w in the `panels` layout (float32, [ceil(N / 16), K, 16] in size, stored in
// blocks of kPanelBlockK inputs): see run_panels.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePanelsMatmul, panels_matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The CPU paged-attention kernels, free of XLA: paged_attention.cc adapts them to XLA's FFI.
// Split from it so the float32 and bfloat16 instantiations compile in parallel (one ~6 s
// translation unit each, against ~13 s for all in one).

#ifndef JAXSERVE_NATIVE_PAGED_ATTENTION_KERNELS_H_
#define JAXSERVE_NATIVE_PAGED_ATTENTION_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace jaxserve {

inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) {  // bfloat16: the high half of a float32
  uint32_t bits = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store(float* p, float x) { *p = x; }
inline void store(uint16_t* p, float x) {  // round to nearest even, as XLA converts
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (std::isnan(x)) {
    *p = 0x7fc0;
    return;
  }
  bits += 0x7fff + ((bits >> 16) & 1);
  *p = static_cast<uint16_t>(bits >> 16);
}

struct Dims {
  int64_t heads, head_dim, kv_heads, num_pages, page_size, pages_per_seq, num_slots, layers;
};

// Loads n query vectors (query i from src(i)), scaled, and starts their online softmax.
template <typename T, typename Src>
inline void start_queries(int64_t n, int64_t dh, float scale, Src src, float* qf, float* acc,
                          float* m, float* l) {
  for (int64_t i = 0; i < n; ++i) {
    const T* q = src(i);
    for (int64_t x = 0; x < dh; ++x) qf[i * dh + x] = load(q + x) * scale;
    for (int64_t x = 0; x < dh; ++x) acc[i * dh + x] = 0.f;
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.f;
  }
}

// Writes n outputs (output i to dst(i)): acc / l, zeros for a query that saw no key.
template <typename T, typename Dst>
inline void finish_queries(int64_t n, int64_t dh, Dst dst, const float* acc, const float* l) {
  for (int64_t i = 0; i < n; ++i) {
    T* o = dst(i);
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    for (int64_t x = 0; x < dh; ++x) store(o + x, acc[i * dh + x] * inv);
  }
}

// Where token `pos` of `slot`, kv head kvh, sits in the stacked cache (elements), or -1 when
// the page table points outside the cache (a corrupt table reads nothing out of bounds).
inline int64_t token_offset(const Dims& d, const int32_t* page_table, int64_t layer,
                            int32_t slot, int64_t pos, int64_t kvh) {
  const int64_t page = page_table[slot * d.pages_per_seq + pos / d.page_size];
  if (page < 0 || page >= d.num_pages) return -1;
  return (((layer * d.num_pages + page) * d.page_size) + pos % d.page_size) * d.kv_heads *
             d.head_dim + kvh * d.head_dim;
}

// Sixteen floats as one value (GCC/Clang vector extensions): one AVX-512 register, or two AVX2
// or four NEON registers, whatever the build targets.
typedef float vf16 __attribute__((vector_size(64)));
inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf16 load16(const uint16_t* p) {
  vf16 v;
  for (int i = 0; i < 16; ++i) v[i] = load(p + i);
  return v;
}
// ---- Chunk rows: GEMM-shaped blocks -------------------------------------------------------
//
// Rows that share a slot (a prefill chunk's tokens) are worked in blocks: up to 16 consecutive
// rows (more for small GQA groups: about 48 queries) times the GQA group of one kv head. The
// block's queries live in the lanes of SIMD vectors (query i = row * group + head, transposed
// once per block to [Dh, lanes]), so that against each block of kKeyBlock keys
//   scores  S[key, query] = K[key, :] . Q^T[:, query]   and   O^T[:, query] += V^T . P[:, query]
// are two small matrix products computed by register-tiled micro-kernels (TK keys x TQ query
// vectors, TX output dims x TQ query vectors: every loaded vector feeds several independent
// FMA chains), and the online softmax between them is elementwise across lanes. Key blocks
// sit at absolute positions (0, 64, 128, ...) and every lane computes exactly what it would
// in any other block (its own FMA chain per score and output element; where a lane sees none
// of a tile's keys its update is exactly the identity: correction 1, weights 0), so a row's
// output does not depend on which rows share its block. Key blocks past every row of a query
// tile (above the causal diagonal) are skipped, and a diagonal block is cut at the tile's last
// visible key. float32 keys and values are read in place; bfloat16 ones converted per block.

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector
constexpr int kMaxTQ = 3;   // query vectors per micro-tile: 3 x 8 = 24 of 32 registers
constexpr int kTK = 8;      // keys per score micro-tile
constexpr int kTX = 8;      // output dims per P.V micro-tile
#elif defined(__AVX__)
constexpr int kLanes = 8;   // 16 registers: 2 x 4 accumulators
constexpr int kMaxTQ = 2;
constexpr int kTK = 4;
constexpr int kTX = 4;
#elif defined(__aarch64__)
constexpr int kLanes = 4;   // NEON: 32 registers
constexpr int kMaxTQ = 3;
constexpr int kTK = 8;
constexpr int kTX = 8;
#else
constexpr int kLanes = 4;   // SSE and the rest: 128-bit vectors, 16 registers
constexpr int kMaxTQ = 2;
constexpr int kTK = 4;
constexpr int kTX = 4;
#endif
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));

// Keys per softmax update: several pages at once, so the per-update work (rescaling the
// accumulators, the running max) is paid once per 64 keys, not once per page.
constexpr int kKeyBlock = 64;
static_assert(kKeyBlock % kTK == 0, "score tiles must divide a key block");

inline VecF vload(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }
inline VecF vsplat(float x) { return VecF{} + x; }
inline VecF vmax(VecF a, VecF b) { return a > b ? a : b; }
// v, with the compiler unable to see how it was computed: `opaque(a * b) + c * d` is always
// rounded as fma(c, d, a * b), never as fma(a, b, c * d) in one instantiation and the other in
// the next (which one GCC contracts depends on statement order), so every lane computes its
// output with the same roundings whatever tile it is in.
inline VecF opaque(VecF v) {
#if defined(__AVX512F__)
  __asm__("" : "+v"(v));
#elif defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+x"(v));
#elif defined(__aarch64__)
  __asm__("" : "+w"(v));
#else
  volatile VecF copy = v;  // elsewhere: through memory
  v = copy;
#endif
  return v;
}

// exp for the softmax, on a vector: Cody-Waite range reduction and a degree-6 polynomial
// (Cephes expf's coefficients), ~1 ulp on the arguments softmax produces (<= 0); libm's expf
// does not vectorize without -ffast-math, which breaks -inf. With AVX-512, n is rounded to
// nearest and 2^n applied by scalef.
inline VecF vexp(VecF x) {
  x = vmax(x, vsplat(-87.0f));
#if defined(__AVX512F__)
  const VecF n = _mm512_roundscale_ps(x * 1.44269504f, _MM_FROUND_TO_NEAREST_INT |
                                                         _MM_FROUND_NO_EXC);
#else
  const VecF t = x * 1.44269504f + 0.5f;
  VecI i = __builtin_convertvector(t, VecI);  // truncates: floor is one lower where it rose
  i += (__builtin_convertvector(i, VecF) > t);  // a true comparison is -1
  const VecF n = __builtin_convertvector(i, VecF);
#endif
  const VecF r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  VecF y = vsplat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
#if defined(__AVX512F__)
  return _mm512_scalef_ps(y, n);
#else
  const VecI bits = (i + 127) << 23;
  VecF scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
#endif
}

// A chunk block's queries (rows x heads): at most kMaxQueries, from at most kMaxBlockRows rows.
constexpr int kMaxQueries = 384;
constexpr int kMaxBlockRows = 48;
constexpr int kMaxVecs = kMaxQueries / kLanes;

// S[t][j] (t < nk, a multiple of kTK; j < TQ vectors) = sum_x krow[t][x] * qT[x][j].
template <int TQ>
inline void score_tile(const float* qT, int64_t ldq, const float* const* krow, int64_t dh,
                       int nk, float* s) {
  for (int t0 = 0; t0 < nk; t0 += kTK) {
    VecF acc[kTK][TQ];
    for (int k = 0; k < kTK; ++k)
      for (int j = 0; j < TQ; ++j) acc[k][j] = VecF{};
    const float* kr[kTK];
    for (int k = 0; k < kTK; ++k) kr[k] = krow[t0 + k];
    if (t0 + kTK < nk)  // the next tile's keys, from L2 while this one computes (+2-3%)
      for (int k = 0; k < kTK; ++k)
        for (int64_t x = 0; x < dh; x += 64 / sizeof(float))
          __builtin_prefetch(krow[t0 + kTK + k] + x);
    for (int64_t x = 0; x < dh; ++x) {
      VecF qv[TQ];
      for (int j = 0; j < TQ; ++j) qv[j] = vload(qT + x * ldq + j * kLanes);
      for (int k = 0; k < kTK; ++k) {
        const float kx = kr[k][x];
        for (int j = 0; j < TQ; ++j) acc[k][j] += qv[j] * kx;
      }
    }
    for (int k = 0; k < kTK; ++k)
      for (int j = 0; j < TQ; ++j) vstore(s + ((t0 + k) * TQ + j) * kLanes, acc[k][j]);
  }
}

// oT[x][j] = oT[x][j] * corr[j] + sum_{t < nk} p[t][j] * vrow[t][x], TX dims from x0.
template <int TQ, int TX>
inline void pv_tile(const float* p, const float* const* vrow, int nk, const VecF* corr,
                    float* oT, int64_t ldq, int64_t x0) {
  VecF acc[TX][TQ];
  for (int xx = 0; xx < TX; ++xx)
    for (int j = 0; j < TQ; ++j)
      acc[xx][j] = opaque(vload(oT + (x0 + xx) * ldq + j * kLanes) * corr[j]);
  for (int t = 0; t < nk; ++t) {
    VecF pv[TQ];
    for (int j = 0; j < TQ; ++j) pv[j] = vload(p + (t * TQ + j) * kLanes);
    const float* v = vrow[t] + x0;
    if (x0 == 0 && t + 4 < nk) __builtin_prefetch(vrow[t + 4]);  // (measured: +2-3%)
    for (int xx = 0; xx < TX; ++xx) {
      const float vx = v[xx];
      for (int j = 0; j < TQ; ++j) acc[xx][j] += pv[j] * vx;
    }
  }
  for (int xx = 0; xx < TX; ++xx)
    for (int j = 0; j < TQ; ++j) vstore(oT + (x0 + xx) * ldq + j * kLanes, acc[xx][j]);
}

// One query tile (TQ vectors from lane vector j0) against the key block at `start`: count
// keys (krow/vrow: each key's and value's floats; krow then zeros up to kKeyBlock).
// lens: each lane's row length; tile_max/min: the longest and shortest of the tile's rows.
template <int TQ>
inline void tile_step(const float* qT, float* oT, int64_t ldq, int j0, const float* const* krow,
                      const float* const* vrow, int64_t dh, int64_t start, int count,
                      const VecI* lens, int32_t tile_max, int32_t tile_min, VecF* m, VecF* l,
                      float* s) {
  const int nk = static_cast<int>(std::clamp<int64_t>(tile_max - start, 0, count));
  if (nk == 0) return;  // every row of the tile ends before this block
  const bool masked = start + nk > tile_min;  // some lane sees only part of [start, start+nk)
  score_tile<TQ>(qT + j0 * kLanes, ldq, krow, dh, (nk + kTK - 1) / kTK * kTK, s);
  VecF corr[TQ];
  const VecF neg_inf = vsplat(-std::numeric_limits<float>::infinity());
  for (int j = 0; j < TQ; ++j) {
    VecF block_max = neg_inf;
    if (masked) {
      const VecI visible_to = lens[j0 + j] - static_cast<int32_t>(start);  // t < this: seen
      for (int t = 0; t < nk; ++t) {
        const VecF st = vload(s + (t * TQ + j) * kLanes);
        block_max = vmax(block_max, t < visible_to ? st : neg_inf);
      }
    } else {
      for (int t = 0; t < nk; ++t) block_max = vmax(block_max, vload(s + (t * TQ + j) * kLanes));
    }
    const VecF old_max = m[j0 + j];
    const VecF new_max = vmax(old_max, block_max);
    // A lane's first keys: nothing to correct (and -inf - -inf would be NaN).
    corr[j] = old_max == neg_inf ? VecF{} : vexp(old_max - new_max);
    VecF sum = VecF{};
    if (masked) {
      const VecI visible_to = lens[j0 + j] - static_cast<int32_t>(start);
      for (int t = 0; t < nk; ++t) {
        float* st = s + (t * TQ + j) * kLanes;
        const VecF pt = t < visible_to ? vexp(vload(st) - new_max) : VecF{};
        vstore(st, pt);
        sum += pt;
      }
    } else {
      for (int t = 0; t < nk; ++t) {
        float* st = s + (t * TQ + j) * kLanes;
        const VecF pt = vexp(vload(st) - new_max);
        vstore(st, pt);
        sum += pt;
      }
    }
    l[j0 + j] = l[j0 + j] * corr[j] + sum;
    m[j0 + j] = new_max;
  }
  int64_t x0 = 0;
  float* o = oT + j0 * kLanes;
  for (; x0 + kTX <= dh; x0 += kTX) pv_tile<TQ, kTX>(s, vrow, nk, corr, o, ldq, x0);
  for (; x0 < dh; ++x0) pv_tile<TQ, 1>(s, vrow, nk, corr, o, ldq, x0);
}

// nb (2..kMaxBlockRows) consecutive rows of one slot, row r seeing its first lens[r] keys (a
// causal chunk: lens grow by one per row), times the g heads [head0, head0 + g) of kv head kvh
// (nb * g <= kMaxQueries).
template <typename T>
void attend_block(const T* q, const T* kc, const T* vc, const int32_t* page_table, int64_t layer,
                  const Dims& d, int32_t slot, const int32_t* lens, int nb, float scale,
                  int64_t row0, int64_t kvh, int64_t head0, int64_t g, T* out, float* scratch) {
  constexpr int KB = kKeyBlock;
  const int64_t dh = d.head_dim;
  const int64_t nq = nb * g;                          // query i: row i / g, head i % g
  const int nv = static_cast<int>((nq + kLanes - 1) / kLanes);  // lane vectors
  const int64_t ldq = nv * kLanes;
  const int64_t token_stride = d.kv_heads * dh;
  float* qT = scratch;               // [Dh, ldq] scaled queries, transposed; 0 in spare lanes
  float* oT = qT + dh * ldq;         // [Dh, ldq] output accumulators
  float* kb = oT + dh * ldq;         // [KB, Dh] this block's keys (as float)
  float* vb = kb + KB * dh;          // [KB, Dh] values
  float* s = vb + KB * dh;           // [KB, kMaxTQ * kLanes] one tile's scores, then weights
  float* zeros = s + KB * kMaxTQ * kLanes;  // [Dh] a key of zeros
  VecF m[kMaxVecs], l[kMaxVecs];  // per lane: running max and sum
  VecI lane_len[kMaxVecs];
  int32_t vec_max[kMaxVecs], vec_min[kMaxVecs];  // per vector: its lanes' longest and shortest
  int32_t max_len = 0;
  for (int j = 0; j < nv; ++j) {
    int32_t lo = std::numeric_limits<int32_t>::max(), hi = 0;
    for (int lane = 0; lane < kLanes; ++lane) {
      const int64_t i = j * kLanes + lane;
      const int32_t n = i < nq ? lens[i / g] : 0;
      lane_len[j][lane] = n;
      hi = std::max(hi, n);
      if (i < nq) lo = std::min(lo, n);
    }
    vec_max[j] = hi;
    vec_min[j] = lo;
    max_len = std::max(max_len, hi);
    m[j] = vsplat(-std::numeric_limits<float>::infinity());
    l[j] = VecF{};
  }
  auto query = [&](int64_t i) { return ((row0 + i / g) * d.heads + head0 + i % g) * dh; };
  for (int64_t i = 0; i < ldq; ++i) {
    if (i < nq) {
      const T* qi = q + query(i);
      for (int64_t x = 0; x < dh; ++x) qT[x * ldq + i] = load(qi + x) * scale;
    } else {
      for (int64_t x = 0; x < dh; ++x) qT[x * ldq + i] = 0.f;
    }
  }
  std::fill(oT, oT + dh * ldq, 0.f);
  std::fill(zeros, zeros + dh, 0.f);
  for (int64_t start = 0; start < max_len; start += KB) {
    const int64_t want = std::min<int64_t>(KB, max_len - start);
    // Each key's and value's row: in the cache itself for float32, converted for bfloat16.
    const float* krow[KB];
    const float* vrow[KB];
    int64_t count = 0;
    while (count < want) {  // page by page: one table lookup each
      const int64_t off = token_offset(d, page_table, layer, slot, start + count, kvh);
      if (off < 0) break;  // a corrupt table: read nothing past it
      const int64_t n = std::min(want - count, d.page_size - (start + count) % d.page_size);
      for (int64_t t = 0; t < n; ++t, ++count) {
        const T* kp = kc + off + t * token_stride;
        const T* vp = vc + off + t * token_stride;
        if constexpr (std::is_same_v<T, float>) {
          krow[count] = kp;
          vrow[count] = vp;
        } else {
          float* kt = kb + count * dh;
          float* vt = vb + count * dh;
          for (int64_t x = 0; x < dh; ++x) kt[x] = load(kp + x);
          for (int64_t x = 0; x < dh; ++x) vt[x] = load(vp + x);
          krow[count] = kt;
          vrow[count] = vt;
        }
      }
    }
    if (count == 0) break;
    // Score tiles may run past the last key: zeros there, never a stale (NaN) key.
    for (int64_t t = count; t < KB; ++t) krow[t] = zeros;
    for (int j0 = 0; j0 < nv;) {
      const int tq = std::min(kMaxTQ, nv - j0);
      int32_t hi = 0, lo = std::numeric_limits<int32_t>::max();
      for (int j = j0; j < j0 + tq; ++j) {
        hi = std::max(hi, vec_max[j]);
        lo = std::min(lo, vec_min[j]);
      }
      const int c = static_cast<int>(count);
      if (tq >= 3) {
        tile_step<std::min(3, kMaxTQ)>(qT, oT, ldq, j0, krow, vrow, dh, start, c, lane_len, hi,
                                        lo, m, l, s);
      } else if (tq == 2) {
        tile_step<2>(qT, oT, ldq, j0, krow, vrow, dh, start, c, lane_len, hi, lo, m, l, s);
      } else {
        tile_step<1>(qT, oT, ldq, j0, krow, vrow, dh, start, c, lane_len, hi, lo, m, l, s);
      }
      j0 += tq;
    }
    if (count < want) break;
  }
  for (int64_t i = 0; i < nq; ++i) {
    const float li = l[i / kLanes][i % kLanes];
    const float inv = li > 0.f ? 1.f / li : 0.f;
    T* o = out + query(i);
    for (int64_t x = 0; x < dh; ++x) store(o + x, oT[x * ldq + i] * inv);
  }
}

// Scratch floats attend_block needs for rows x g queries of head_dim dh.
inline int64_t block_scratch_floats(int64_t rows, int64_t g, int64_t dh) {
  const int64_t ldq = (rows * g + kLanes - 1) / kLanes * kLanes;
  return 2 * dh * ldq + 2 * kKeyBlock * dh + kKeyBlock * kMaxTQ * kLanes + dh;
}

// ---- Single rows (decode rows, and a chunk row alone in its run) ----------------------------
//
// One arithmetic for every row, whichever path computes it: a row alone gets, to the bit, what
// its lane gets in attend_block, so that a prompt's row gives the same result alone in a step,
// at the end of a run, or as a decode row (DESIGN: bit-identical whatever shares the step).
// Per row and head that arithmetic is
//   score_t = the FMA chain over x = 0, 1, ..., Dh-1 of (q[x] * scale) * k_t[x], from 0;
//   per key block of kKeyBlock keys at absolute positions 0, 64, 128, ...: block max over its
//   visible keys, new max, correction vexp(old - new) (0 for the first), weights
//   vexp(score - new), their sum added key by key from 0, l = l * correction + sum,
//   acc = (acc * correction) then the FMA chain over the block's keys of weight * v_t[x];
//   out = acc * (1 / l) (zeros where l is 0).
// attend_block computes it with queries in SIMD lanes. Here the row's scores are computed with
// keys in the lanes: each 16-key group's keys are transposed (16 x 16 shuffles) so that one FMA
// per dimension advances 16 keys' chains, with each query element broadcast; the softmax runs
// with heads in lanes (one transpose of the block's scores: a head's max, exp and sum are then
// tile_step's lane expressions, all heads at once instead of one scalar chain per head, which
// was ~1/6 of a decode step's attention); P.V runs over dimensions in lanes (each output
// element's chain over keys, as in attend_block).

// Sixteen keys' 16 floats (rows[i] = key i) transposed in place: r[x][i] = key i's element x.
// Four stages, each exchanging the off-diagonal blocks of size 8, 4, 2, 1.
inline void transpose16(vf16* r) {
#define JAXSERVE_STAGE(B, ...)                                                 \
  for (int i = 0; i < 16; ++i)                                                \
    if (!(i & B)) {                                                           \
      const vf16 a = r[i], b = r[i + B];                                      \
      r[i] = __builtin_shufflevector(a, b, __VA_ARGS__);                      \
      r[i + B] = __builtin_shufflevector(a, b, JAXSERVE_HI_##B);              \
    }
#define JAXSERVE_HI_8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define JAXSERVE_HI_4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define JAXSERVE_HI_2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define JAXSERVE_HI_1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
  JAXSERVE_STAGE(8, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
  JAXSERVE_STAGE(4, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
  JAXSERVE_STAGE(2, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
  JAXSERVE_STAGE(1, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
#undef JAXSERVE_STAGE
#undef JAXSERVE_HI_8
#undef JAXSERVE_HI_4
#undef JAXSERVE_HI_2
#undef JAXSERVE_HI_1
}

inline vf16 opaque16(vf16 v) {  // opaque() for 16 floats
#if defined(__AVX512F__)
  __asm__("" : "+v"(v));
#else
  VecF parts[sizeof(vf16) / sizeof(VecF)];
  std::memcpy(parts, &v, sizeof v);
  for (auto& part : parts) part = opaque(part);
  std::memcpy(&v, parts, sizeof v);
#endif
  return v;
}

// a * b + c rounded as the vector code's `acc += a * b` is: fused where the target has FMA
// (GCC contracts the vector statements there), else two roundings.
inline float fma_like(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return opaque(vsplat(a) * b)[0] + c;
#endif
}

// The cache lines of `count` tokens' rows (token t at base + off[t], `bytes` long), prefetched a
// few at a time from inside a compute loop. Issued in one burst (16 lines a token), prefetches
// filled the core's line-fill buffers and stalled the loop behind them: in a cold decode step
// about half the scores loop's time sat on one burst's prefetch instructions (perf).
template <typename T>
struct PacedPrefetch {
  const char* base = nullptr;
  const int64_t* off = nullptr;
  int64_t count = 0, bytes = 0;
  int64_t t = 0, b = 0;
  int per_step = 0;  // lines per step(): enough to finish in `steps` calls

  PacedPrefetch() = default;
  PacedPrefetch(const T* base_, const int64_t* off_, int64_t count_, int64_t bytes_,
                int64_t steps)
      : base(reinterpret_cast<const char*>(base_)), off(off_), count(count_), bytes(bytes_) {
    const int64_t lines = count * ((bytes + 63) / 64);
    per_step = static_cast<int>(steps > 0 ? (lines + steps - 1) / steps : lines);
  }
  inline void step() {
    for (int i = 0; i < per_step && t < count; ++i) {
      // Into L2 (prefetcht2): 6-10% faster than into L1 here (the loads hit L2 either way;
      // fewer of the core's line-fill buffers held while the lines come from memory).
      __builtin_prefetch(base + off[t] * int64_t(sizeof(T)) + b, 0, 1);
      if ((b += 64) >= bytes) b = 0, ++t;
    }
  }
};

// The fast path's constants: DH a multiple of 16; P.V keeps GV heads' DH / 16 accumulator
// vectors in registers (GV a divisor of GB, GV * DH / 16 <= 16).
template <int DH>
constexpr bool kVecItem = DH > 0 && DH % 16 == 0;
template <int GB, int DH>
constexpr int kValueHeads = GB * (DH / 16) <= 16 ? GB : GB % 2 == 0 && DH / 16 <= 8 ? 2 : 1;

// p[h][t] (row stride kKeyBlock) for the block's `count` keys (off[t]: key t's kv head 0 in the
// cache), NG 16-key groups at a time: each group transposed to kt, then GB heads' 16-lane
// chains advanced together (GB * NG independent FMA chains). Prefetches the values meanwhile.
template <int GB, int DH, int NG, typename T>
inline void item_scores_vec(const float* qf, const T* kc, const T* vc, const int64_t* off,
                            int64_t count, int64_t token_stride, int64_t nkv, int64_t g_count,
                            float* p, float* kt, int64_t t0) {
  constexpr int C = DH / 16;
  static const T zeros[DH] = {};
  // This pass's values, paced over its FMA loops (nkv x head groups x DH steps). (Also
  // prefetching the next pass's keys here measured no faster.)
  const int64_t t_end = std::min<int64_t>(count, t0 + 16 * NG);
  PacedPrefetch<T> pf(vc, off + t0, std::max<int64_t>(0, t_end - t0),
                      token_stride * int64_t(sizeof(T)), nkv * (g_count / GB) * DH);
  for (int64_t kv = 0; kv < nkv; ++kv) {
    for (int grp = 0; grp < NG; ++grp) {
      for (int c = 0; c < C; ++c) {
        vf16 r[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t t = t0 + grp * 16 + i;
          r[i] = load16((t < count ? kc + off[t] + kv * DH : zeros) + 16 * c);
        }
        transpose16(r);
        for (int x = 0; x < 16; ++x)
          std::memcpy(kt + ((grp * DH) + 16 * c + x) * 16, &r[x], sizeof(vf16));
      }
    }
    for (int64_t gb0 = 0; gb0 < g_count; gb0 += GB) {
      const int64_t h0 = kv * g_count + gb0;
      vf16 acc[GB][NG];
      for (int g = 0; g < GB; ++g)
        for (int grp = 0; grp < NG; ++grp) acc[g][grp] = vf16{};
      for (int x = 0; x < DH; ++x) {
        pf.step();
        vf16 kx[NG];
        for (int grp = 0; grp < NG; ++grp) kx[grp] = load16(kt + (grp * DH + x) * 16);
        for (int g = 0; g < GB; ++g) {
          const float qx = qf[(h0 + g) * DH + x];
          for (int grp = 0; grp < NG; ++grp) acc[g][grp] += qx * kx[grp];
        }
      }
      for (int g = 0; g < GB; ++g)
        for (int grp = 0; grp < NG; ++grp)
          std::memcpy(p + (h0 + g) * kKeyBlock + t0 + grp * 16, &acc[g][grp], sizeof(vf16));
    }
  }
}

// acc[h] = acc[h] * corr[h] + sum_t pt[t][h] v_t over the block's `count` keys (pt: the
// weights with heads in lanes, row stride ldh); prefetches the next block's keys (next[t],
// next_count of them) meanwhile.
template <int GV, int DH, typename T>
inline void item_values_vec(const float* pt, int64_t ldh, const T* vc, const int64_t* off,
                            int64_t count, int64_t nkv, int64_t g_count, const float* corr,
                            float* acc, const T* kc, const int64_t* next, int64_t next_count,
                            int64_t token_stride) {
  constexpr int C = DH / 16;
  // The next block's keys, paced over this block's value loops (nkv x head groups x count).
  PacedPrefetch<T> pf(kc, next, next_count, token_stride * int64_t(sizeof(T)),
                      nkv * ((g_count + GV - 1) / GV) * count);
  for (int64_t kv = 0; kv < nkv; ++kv) {
    for (int64_t gb0 = 0; gb0 < g_count; gb0 += GV) {
      const int64_t h0 = kv * g_count + gb0;
      vf16 a[GV][C];
      for (int g = 0; g < GV; ++g)
        for (int c = 0; c < C; ++c)
          a[g][c] = opaque16(load16(acc + (h0 + g) * DH + 16 * c) * corr[h0 + g]);
      for (int64_t t = 0; t < count; ++t) {
        pf.step();
        const T* vp = vc + off[t] + kv * DH;
        vf16 vv[C];
        for (int c = 0; c < C; ++c) vv[c] = load16(vp + 16 * c);
        for (int g = 0; g < GV; ++g) {
          const float w = pt[t * ldh + h0 + g];
          for (int c = 0; c < C; ++c) a[g][c] += w * vv[c];
        }
      }
      for (int g = 0; g < GV; ++g)
        for (int c = 0; c < C; ++c) std::memcpy(acc + (h0 + g) * DH + 16 * c, &a[g][c], 64);
    }
  }
}

// attend_item's heads rounded up to whole 16-float vectors (its softmax has heads in lanes).
inline int64_t item_heads_padded(const Dims& d) { return (d.heads + 15) / 16 * 16; }

// The cache offsets (kv head 0) of keys [start, start + want) of `slot`, page by page; returns
// how many there are (fewer at a page index outside the cache: nothing is read past it).
inline int64_t key_offsets(const Dims& d, const int32_t* page_table, int64_t layer, int32_t slot,
                           int64_t start, int64_t want, int64_t* off) {
  const int64_t token_stride = d.kv_heads * d.head_dim;
  int64_t count = 0;
  while (count < want) {
    const int64_t o = token_offset(d, page_table, layer, slot, start + count, 0);
    if (o < 0) break;
    const int64_t n = std::min(want - count, d.page_size - (start + count) % d.page_size);
    for (int64_t t = 0; t < n; ++t, ++count) off[count] = o + t * token_stride;
  }
  return count;
}

// One row with all its heads attends to its first `len` keys (see above for the arithmetic).
// GB (a divisor of the GQA group) and DH (head_dim; 0 = read it from d) are template constants
// so that the fast path's loops unroll into whole vectors held in registers.
template <int GB, int DH, typename T>
void attend_item(const T* q, const T* kc, const T* vc, const int32_t* page_table, int64_t layer,
                 const Dims& d, int32_t slot, int32_t len, float scale, int64_t row, T* out,
                 float* scratch) {
  constexpr int KB = kKeyBlock;
  const int64_t dh = DH ? DH : d.head_dim;
  const int64_t g_count = d.heads / d.kv_heads;  // GB divides it
  const int64_t nh = d.heads, nkv = d.kv_heads;
  int64_t* off = reinterpret_cast<int64_t*>(scratch);  // [KB] this block's keys' offsets
  int64_t* next = off + KB;                               // [KB] the next block's
  const int64_t ldh = item_heads_padded(d);  // heads rounded up to whole 16-lane vectors
  float* qf = scratch + 4 * KB;   // [nh, Dh]
  float* acc = qf + nh * dh;      // [nh, Dh]
  float* p = acc + nh * dh;       // [nh, KB] this block's scores
  float* pt = p + nh * KB;        // [KB, ldh] the same transposed (heads in lanes), then weights
  float* kt = pt + KB * ldh;      // [2][Dh][16] two key groups transposed (the fast path)
  float* m = kt + 32 * dh;        // [ldh] running max
  float* l = m + ldh;             // [ldh] running sum
  float* corr = l + ldh;          // [ldh] this block's correction
  const T* row_q = q + row * nh * dh;
  start_queries<T>(nh, dh, scale, [&](int64_t h) { return row_q + h * dh; }, qf, acc, m, l);
  for (int64_t h = nh; h < ldh; ++h) m[h] = -std::numeric_limits<float>::infinity(), l[h] = 0.f;
  const int64_t token_stride = nkv * dh;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  int64_t count = key_offsets(d, page_table, layer, slot, 0, std::min<int64_t>(KB, len), off);
  for (int64_t start = 0; start < len && count > 0; start += KB) {
    if constexpr (kVecItem<DH>) {
      const int64_t ng = (count + 15) / 16;
      for (int64_t t0 = 0; t0 < ng * 16; t0 += 32) {  // two groups (32 keys) per pass
        if (ng * 16 - t0 >= 32)
          item_scores_vec<GB, DH, 2>(qf, kc, vc, off, count, token_stride, nkv, g_count, p, kt,
                                     t0);
        else
          item_scores_vec<GB, DH, 1>(qf, kc, vc, off, count, token_stride, nkv, g_count, p, kt,
                                     t0);
      }
    } else {
      for (int64_t t = 0; t < count; ++t) {
        for (int64_t h = 0; h < nh; ++h) {
          const T* kp = kc + off[t] + (h / g_count) * dh;
          const float* qh = qf + h * dh;
          float s = 0.f;
          for (int64_t x = 0; x < dh; ++x) s = fma_like(qh[x], load(kp + x), s);
          p[h * KB + t] = s;
        }
      }
    }
    // The online softmax with heads in lanes: the scores transposed to pt[t][h] (16 keys x 16
    // heads at a time; heads past nh are zeros), then tile_step's vector expressions, each
    // lane one head's (its max over the keys in order, its sum added key by key from 0).
    for (int64_t h0 = 0; h0 < ldh; h0 += 16)
      for (int64_t t0 = 0; t0 < count; t0 += 16) {
        vf16 r[16];
        for (int i = 0; i < 16; ++i) r[i] = h0 + i < nh ? load16(p + (h0 + i) * KB + t0) : vf16{};
        transpose16(r);
        for (int i = 0; i < 16; ++i) std::memcpy(pt + (t0 + i) * ldh + h0, &r[i], sizeof(vf16));
      }
    for (int64_t j = 0; j < ldh; j += kLanes) {
      VecF block_max = vsplat(neg_inf);
      for (int64_t t = 0; t < count; ++t) block_max = vmax(block_max, vload(pt + t * ldh + j));
      const VecF old_max = vload(m + j);
      const VecF new_max = vmax(old_max, block_max);
      const VecF c = old_max == vsplat(neg_inf) ? VecF{} : vexp(old_max - new_max);
      VecF sum = VecF{};
      for (int64_t t = 0; t < count; ++t) {
        const VecF w = vexp(vload(pt + t * ldh + j) - new_max);
        vstore(pt + t * ldh + j, w);
        sum += w;
      }
      vstore(l + j, vload(l + j) * c + sum);
      vstore(m + j, new_max);
      vstore(corr + j, c);
    }
    // The next block's keys: prefetched while this block's values are read.
    const int64_t next_count =
        start + KB < len && count == KB
            ? key_offsets(d, page_table, layer, slot, start + KB,
                          std::min<int64_t>(KB, len - start - KB), next)
            : 0;
    if constexpr (kVecItem<DH>) {
      item_values_vec<kValueHeads<GB, DH>, DH>(pt, ldh, vc, off, count, nkv, g_count, corr,
                                               acc, kc, next, next_count, token_stride);
    } else {
      for (int64_t h = 0; h < nh; ++h) {
        float* ah = acc + h * dh;
        for (int64_t x = 0; x < dh; ++x) ah[x] = opaque(vsplat(ah[x]) * vsplat(corr[h]))[0];
      }
      for (int64_t t = 0; t < count; ++t) {
        for (int64_t h = 0; h < nh; ++h) {
          const T* vp = vc + off[t] + (h / g_count) * dh;
          const float w = pt[t * ldh + h];
          float* ah = acc + h * dh;
#pragma omp simd
          for (int64_t x = 0; x < dh; ++x) ah[x] = fma_like(w, load(vp + x), ah[x]);
        }
      }
    }
    if (count < KB) break;  // the row's last keys, or a page index outside the cache
    std::swap(off, next);
    count = next_count;
  }
  T* row_out = out + row * nh * dh;
  finish_queries<T>(nh, dh, [&](int64_t h) { return row_out + h * dh; }, acc, l);
}

// Scratch floats attend_item needs (from a vector-aligned start: the offsets come first).
inline int64_t item_scratch_floats(const Dims& d) {
  const int64_t ldh = item_heads_padded(d);
  return 4 * kKeyBlock + d.heads * (2 * d.head_dim + kKeyBlock) + ldh * (kKeyBlock + 3) +
         32 * d.head_dim;
}

// Runs fn(i) for every i in [0, total), in parallel where it can; returns when all are done.
using ParallelFor = std::function<void(int64_t total, const std::function<void(int64_t)>& fn)>;

// Every row of a step (see paged_attention.cc for the arguments' meaning).
template <typename T>
void attend_rows(const T* qp, const T* kp, const T* vp, const int32_t* slots,
                 const int32_t* lens, const int32_t* table, int64_t lyr, const Dims& d,
                 int64_t rows, float scale, T* op, const ParallelFor& parallel_for) {
  const int64_t g_count = d.heads / d.kv_heads;
  // Decode rows: heads per kernel step, the largest of 4, 3, 2, 1 that divides the group.
  const int gb = g_count % 4 == 0 ? 4 : g_count % 3 == 0 ? 3 : g_count % 2 == 0 ? 2 : 1;
  const int64_t max_len = d.pages_per_seq * d.page_size;
  // Valid lengths: out-of-range metadata reads nothing (a padding row), never memory past the
  // cache. Then runs of rows on one slot become blocks of up to block_rows rows.
  std::vector<int32_t> len(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const bool ok = slots[r] >= 0 && slots[r] < d.num_slots && lens[r] <= max_len;
    len[r] = ok ? std::max(lens[r], 0) : 0;
  }
  // Chunk blocks: gh heads (the whole group, or a divisor of a group too large for the lanes)
  // times about 48 queries' worth of rows (3 AVX-512 vectors), at least 16 rows.
  int64_t gh = g_count;
  while (2 * gh > kMaxQueries || g_count % gh) --gh;
  const int brows = static_cast<int>(std::min<int64_t>(
      {kMaxBlockRows, kMaxQueries / gh, std::max<int64_t>(16, 48 / gh)}));
  std::vector<std::pair<int64_t, int>> blocks;  // (first row, rows)
  for (int64_t r = 0; r < rows;) {
    int nb = 1;
    while (len[r] > 0 && nb < brows && r + nb < rows && len[r + nb] > 0 &&
           slots[r + nb] == slots[r])
      ++nb;
    blocks.emplace_back(r, nb);
    r += nb;
  }
  // Per thread: attend_block's transposed queries and accumulators, key and value blocks and
  // one tile's scores; attend_item's [heads, Dh] queries and accumulators, [heads, key block]
  // scores, transposed keys and key offsets.
  const int64_t item_scratch = item_scratch_floats(d);
  const int64_t scratch_size =
      std::max(block_scratch_floats(brows, gh, d.head_dim), item_scratch) + kLanes;
  // Work items: a chunk block times gh heads of one kv head, or a single row with all heads.
  // Head group major: consecutive items read the same kv head's keys, which stay in cache.
  std::vector<std::pair<int64_t, int64_t>> items;  // (block, head group or -1 for all heads)
  for (int64_t hg = 0; hg < d.heads / gh; ++hg)
    for (int64_t b = 0; b < static_cast<int64_t>(blocks.size()); ++b)
      if (blocks[b].second > 1) items.emplace_back(b, hg);
  for (int64_t b = 0; b < static_cast<int64_t>(blocks.size()); ++b)
    if (blocks[b].second == 1) items.emplace_back(b, -1);
  parallel_for(items.size(), [&, scratch_size](int64_t i) {
    const auto [row, nb] = blocks[items[i].first];
    const int64_t head0 = items[i].second * gh;
    thread_local std::vector<float> scratch;
    if (static_cast<int64_t>(scratch.size()) < scratch_size) scratch.resize(scratch_size);
    const int32_t slot = slots[row];
    // Vector-aligned, so the transposed rows never split a cache line.
    float* sc = scratch.data();
    sc += (kLanes - reinterpret_cast<uintptr_t>(sc) / sizeof(float) % kLanes) % kLanes;
    auto with_dh = [&](auto fn) {
      switch (d.head_dim) {
        case 64: return fn(std::integral_constant<int, 64>());
        case 128: return fn(std::integral_constant<int, 128>());
        default: return fn(std::integral_constant<int, 0>());
      }
    };
    if (nb > 1) {
      attend_block(qp, kp, vp, table, lyr, d, slot, &len[row], nb, scale, row, head0 / g_count,
                   head0, gh, op, sc);
      return;
    }
    auto item = [&](auto gb_tag) {
      with_dh([&](auto dh_tag) {
        attend_item<decltype(gb_tag)::value, decltype(dh_tag)::value>(
            qp, kp, vp, table, lyr, d, slot, len[row], scale, row, op, sc);
      });
    };
    switch (gb) {
      case 4: item(std::integral_constant<int, 4>()); break;
      case 3: item(std::integral_constant<int, 3>()); break;
      case 2: item(std::integral_constant<int, 2>()); break;
      default: item(std::integral_constant<int, 1>());
    }
  });
}

extern template void attend_rows<float>(const float*, const float*, const float*, const int32_t*,
                                        const int32_t*, const int32_t*, int64_t, const Dims&,
                                        int64_t, float, float*, const ParallelFor&);
extern template void attend_rows<uint16_t>(const uint16_t*, const uint16_t*, const uint16_t*,
                                           const int32_t*, const int32_t*, const int32_t*,
                                           int64_t, const Dims&, int64_t, float, uint16_t*,
                                           const ParallelFor&);

}  // namespace jaxserve

#endif  // JAXSERVE_NATIVE_PAGED_ATTENTION_KERNELS_H_

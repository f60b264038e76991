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

// exp for the softmax: Cody-Waite range reduction and a degree-6 polynomial (Cephes expf's
// coefficients), ~1 ulp on the arguments softmax produces (<= 0); written so the compiler
// vectorizes it, which libm's expf is not without -ffast-math (and that breaks -inf).
inline float softmax_exp(float x) {
  x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38: a weight of nothing, never a denormal
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

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

// One work item: the query heads of kv heads [kvh0, kvh0 + nkv) of one row (a decode token)
// attend to the row's keys, page by page with an online softmax. GB (a divisor of the GQA group)
// and DH (head_dim; 0 = read it from d) are template constants so that each key and value
// vector is loaded once for GB heads and the head_dim loops unroll into whole vectors (a
// runtime head_dim made the dot products 2-3x slower).
template <int GB, int DH, typename T>
void attend_item(const T* q, const T* kc, const T* vc, const int32_t* page_table, int64_t layer,
                 const Dims& d, int32_t slot, int32_t len, float scale, int64_t row, int64_t kvh0,
                 int64_t nkv, T* out, float* scratch) {
  // All kv heads in one item read whole pages in order (every kv head's slice of a token)
  // rather than one kv head's strided slices: ~15% faster decode attention, measured.
  const int64_t dh = DH ? DH : d.head_dim, ps = d.page_size;
  const int64_t g_count = d.heads / d.kv_heads;  // GB divides it
  const int64_t nh = nkv * g_count;  // query heads in this item
  float* qf = scratch;            // [nh, Dh]
  float* acc = qf + nh * dh;      // [nh, Dh]
  float* p = acc + nh * dh;       // [nh, page] this page's scores, then weights
  float* m = p + nh * ps;         // [nh] running max
  float* l = m + nh;              // [nh] running sum
  const int64_t head0 = kvh0 * g_count;
  const T* row_q = q + (row * d.heads + head0) * dh;
  start_queries<T>(nh, dh, scale, [&](int64_t h) { return row_q + h * dh; }, qf, acc, m, l);
  const int64_t token_stride = d.kv_heads * dh;
  for (int64_t start = 0; start < len; start += ps) {
    const int64_t base = token_offset(d, page_table, layer, slot, start, kvh0);
    if (base < 0) break;
    const int64_t count = std::min<int64_t>(ps, len - start);
    for (int64_t t = 0; t < count; ++t) {
      for (int64_t kv = 0; kv < nkv; ++kv) {
        const T* kp = kc + base + t * token_stride + kv * dh;
        for (int64_t gb0 = 0; gb0 < g_count; gb0 += GB) {
          for (int g = 0; g < GB; ++g) {
            const int64_t h = kv * g_count + gb0 + g;
            const float* qh = qf + h * dh;
            float sh = 0.f;
#pragma omp simd reduction(+ : sh)
            for (int64_t x = 0; x < dh; ++x) sh += qh[x] * load(kp + x);
            p[h * ps + t] = sh;
          }
        }
      }
    }
    for (int64_t h = 0; h < nh; ++h) {
      float* ph = p + h * ps;
      float block_max = ph[0];
      for (int64_t t = 1; t < count; ++t) block_max = std::max(block_max, ph[t]);
      const float new_max = std::max(m[h], block_max);
      // First page: m = -inf, correction 0 (l and acc are 0 anyway).
      const float correction = start == 0 ? 0.f : softmax_exp(m[h] - new_max);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < count; ++t) {
        ph[t] = softmax_exp(ph[t] - new_max);
        sum += ph[t];
      }
      l[h] = l[h] * correction + sum;
      m[h] = new_max;
      if (correction != 1.f) {
        float* ah = acc + h * dh;
#pragma omp simd
        for (int64_t x = 0; x < dh; ++x) ah[x] *= correction;
      }
    }
    for (int64_t t = 0; t < count; ++t) {
      for (int64_t kv = 0; kv < nkv; ++kv) {
        const T* vp = vc + base + t * token_stride + kv * dh;
        for (int64_t gb0 = 0; gb0 < g_count; gb0 += GB) {
          float w[GB];
          for (int g = 0; g < GB; ++g) w[g] = p[(kv * g_count + gb0 + g) * ps + t];
          float* a0 = acc + (kv * g_count + gb0) * dh;
#pragma omp simd
          for (int64_t x = 0; x < dh; ++x) {
            const float v = load(vp + x);
            for (int g = 0; g < GB; ++g) a0[g * dh + x] += w[g] * v;
          }
        }
      }
    }
  }
  T* row_out = out + (row * d.heads + head0) * dh;
  finish_queries<T>(nh, dh, [&](int64_t h) { return row_out + h * dh; }, acc, l);
}

// Rows that share a slot (a prefill chunk's tokens) are worked kBlockRows at a time, so each
// key is read and transposed once for all their query heads instead of once per row.
constexpr int kBlockRows = 16;
// Keys per softmax update in a block: several pages at once, so the per-update work (rescaling
// the accumulators, the running max) is paid once per 64 keys, not once per page.
constexpr int kKeyBlock = 64;

// nb (2..kBlockRows) consecutive rows of one slot, row r seeing its first lens[r] keys (a causal
// chunk: lens grow by one per row), GB heads each. Scores for a key block are a small matrix
// product against the keys transposed to [Dh, kKeyBlock], which vectorizes across keys instead
// of reducing across head_dim once per (query, key) pair.
template <int GB, int DH, typename T>
void attend_block(const T* q, const T* kc, const T* vc, const int32_t* page_table, int64_t layer,
                  const Dims& d, int32_t slot, const int32_t* lens, int nb, float scale,
                  int64_t row0, int64_t kvh, int64_t head0, T* out, float* scratch) {
  constexpr int KB = kKeyBlock;
  const int64_t dh = DH ? DH : d.head_dim;
  const int nq = nb * GB;  // query vectors; i = r * GB + g
  float* qf = scratch;          // [nq, Dh]
  float* acc = qf + nq * dh;    // [nq, Dh]
  float* kt = acc + nq * dh;    // [Dh, KB] this block's keys, transposed
  float* vb = kt + dh * KB;     // [KB, Dh] this block's values, contiguous
  float m[kBlockRows * GB], l[kBlockRows * GB];
  int32_t max_len = 0;
  for (int r = 0; r < nb; ++r) max_len = std::max(max_len, lens[r]);
  // Query i is head head0 + i % GB of row row0 + i / GB.
  auto query = [&](int64_t i) { return ((row0 + i / GB) * d.heads + head0 + i % GB) * dh; };
  start_queries<T>(nq, dh, scale, [&](int64_t i) { return q + query(i); }, qf, acc, m, l);
  for (int64_t start = 0; start < max_len; start += KB) {
    int64_t count = std::min<int64_t>(KB, max_len - start);
    for (int64_t t = 0; t < count; ++t) {
      const int64_t off = token_offset(d, page_table, layer, slot, start + t, kvh);
      if (off < 0) {
        count = t;
        break;
      }
      const T* kp = kc + off;
      const T* vp = vc + off;
      for (int64_t x = 0; x < dh; ++x) kt[x * KB + t] = load(kp + x);
      for (int64_t x = 0; x < dh; ++x) vb[t * dh + x] = load(vp + x);
    }
    if (count == 0) break;
    for (int64_t x = 0; x < dh; ++x)  // the tail may hold stale (NaN) keys: zero it
      for (int64_t t = count; t < KB; ++t) kt[x * KB + t] = 0.f;
    for (int i = 0; i < nq; ++i) {
      const int64_t n = std::clamp<int64_t>(lens[i / GB] - start, 0, count);
      if (n == 0) continue;  // this row's causal limit ends before the block
      float s[KB];  // scores, then weights (in memory: indexed by n below)
      {
        float r[KB] = {};  // registers: only ever indexed by constants after unrolling
        const float* qi = qf + i * dh;
        for (int64_t x = 0; x < dh; ++x) {
          const float qx = qi[x];
          const float* ktx = kt + x * KB;
#pragma omp simd
          for (int t = 0; t < KB; ++t) r[t] += qx * ktx[t];
        }
        std::memcpy(s, r, sizeof s);
      }
      float block_max = s[0];
      for (int64_t t = 1; t < n; ++t) block_max = std::max(block_max, s[t]);
      const float new_max = std::max(m[i], block_max);
      const float correction = start == 0 ? 0.f : softmax_exp(m[i] - new_max);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int t = 0; t < KB; ++t) {
        s[t] = t < n ? softmax_exp(s[t] - new_max) : 0.f;
        sum += s[t];
      }
      l[i] = l[i] * correction + sum;
      m[i] = new_max;
      // The accumulator in a local array: registers when DH is a constant (through the
      // scratch pointer the compiler must assume it aliases the cache and reload it per key).
      float local[DH ? DH : 1];
      float* ai = DH ? local : acc + i * dh;
      for (int64_t x = 0; x < dh; ++x) ai[x] = acc[i * dh + x] * correction;
      for (int64_t t = 0; t < n; ++t) {
        const float w = s[t];
        const float* vt = vb + t * dh;
#pragma omp simd
        for (int64_t x = 0; x < dh; ++x) ai[x] += w * vt[x];
      }
      if (DH) std::memcpy(acc + i * dh, ai, sizeof(float) * dh);
    }
  }
  finish_queries<T>(nq, dh, [&](int64_t i) { return out + query(i); }, acc, l);
}

// Runs fn(i) for every i in [0, total), in parallel where it can; returns when all are done.
using ParallelFor = std::function<void(int64_t total, const std::function<void(int64_t)>& fn)>;

// Every row of a step (see paged_attention.cc for the arguments' meaning).
template <typename T>
void attend_rows(const T* qp, const T* kp, const T* vp, const int32_t* slots,
                 const int32_t* lens, const int32_t* table, int64_t lyr, const Dims& d,
                 int64_t rows, float scale, T* op, const ParallelFor& parallel_for) {
  const int64_t g_count = d.heads / d.kv_heads;
  // Heads per work item: the largest of 4, 3, 2, 1 that divides the group (GQA ratio).
  const int gb = g_count % 4 == 0 ? 4 : g_count % 3 == 0 ? 3 : g_count % 2 == 0 ? 2 : 1;
  const int64_t head_blocks = d.heads / gb;
  const int64_t max_len = d.pages_per_seq * d.page_size;
  // Valid lengths: out-of-range metadata reads nothing (a padding row), never memory past the
  // cache. Then runs of rows on one slot become blocks of up to kBlockRows.
  std::vector<int32_t> len(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const bool ok = slots[r] >= 0 && slots[r] < d.num_slots && lens[r] <= max_len;
    len[r] = ok ? std::max(lens[r], 0) : 0;
  }
  std::vector<std::pair<int64_t, int>> blocks;  // (first row, rows)
  for (int64_t r = 0; r < rows;) {
    int nb = 1;
    while (len[r] > 0 && nb < kBlockRows && r + nb < rows && len[r + nb] > 0 &&
           slots[r + nb] == slots[r])
      ++nb;
    blocks.emplace_back(r, nb);
    r += nb;
  }
  // Per thread: attend_block's [rows*GB, Dh] queries and accumulators + a key and a value
  // block; attend_item's [GB, Dh] queries + [GB, page] scores (+ accumulators for any Dh).
  const int64_t block_scratch = gb * kBlockRows * 2 * d.head_dim + 2 * d.head_dim * kKeyBlock;
  const int64_t item_scratch = d.heads * (2 * d.head_dim + d.page_size + 2);
  const int64_t scratch_size = std::max(block_scratch, item_scratch);
  // Work items: a chunk block times a block of query heads, or a single row with all its heads.
  std::vector<std::pair<int64_t, int64_t>> items;  // (block, head block or -1 for all heads)
  for (int64_t b = 0; b < static_cast<int64_t>(blocks.size()); ++b) {
    if (blocks[b].second == 1) {
      items.emplace_back(b, -1);
    } else {
      for (int64_t hb = 0; hb < head_blocks; ++hb) items.emplace_back(b, hb);
    }
  }
  parallel_for(items.size(), [&, scratch_size](int64_t i) {
    const auto [row, nb] = blocks[items[i].first];
    const int64_t hb = items[i].second;
    const int64_t head0 = std::max<int64_t>(hb, 0) * gb, kvh = head0 / g_count;
    thread_local std::vector<float> scratch;
    if (static_cast<int64_t>(scratch.size()) < scratch_size) scratch.resize(scratch_size);
    const int32_t slot = slots[row];
    float* sc = scratch.data();
    auto item = [&](auto gb_tag, auto dh_tag) {
      constexpr int GB = decltype(gb_tag)::value, DH = decltype(dh_tag)::value;
      if (nb == 1) {
        attend_item<GB, DH>(qp, kp, vp, table, lyr, d, slot, len[row], scale, row, 0,
                            d.kv_heads, op, sc);
      } else {
        attend_block<GB, DH>(qp, kp, vp, table, lyr, d, slot, &len[row], nb, scale, row, kvh,
                             head0, op, sc);
      }
    };
    auto with_dh = [&](auto gb_tag) {
      switch (d.head_dim) {
        case 64: return item(gb_tag, std::integral_constant<int, 64>());
        case 128: return item(gb_tag, std::integral_constant<int, 128>());
        default: return item(gb_tag, std::integral_constant<int, 0>());
      }
    };
    switch (gb) {
      case 4: with_dh(std::integral_constant<int, 4>()); break;
      case 3: with_dh(std::integral_constant<int, 3>()); break;
      case 2: with_dh(std::integral_constant<int, 2>()); break;
      default: with_dh(std::integral_constant<int, 1>());
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

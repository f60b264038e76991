// The decode products' weight streaming without XLA: the bench model's 49 products of a decode
// step (12 layers' qkv, o, gate_up, down and the vocabulary head; 400 MB of float32 panels),
// 16 rows of x, on two threads that spin between products (no pool hand-off), to see what the
// access pattern and the arithmetic cost apart from the engine (session 8, "Decode" in
// BENCHMARKS.md):
//
//   g++ -O3 -march=native -std=c++17 -pthread benchmarks/decode_experiment/panels_stream.cc \
//       -o /tmp/panels_stream && /tmp/panels_stream
//
// Modes (each the median of 30 steps, best of them too):
//   read      every panel summed, no FMA: what streaming the weights costs alone
//   fma_l1    the 16 x 16 FMA tile over one 16 KiB panel piece that stays in L1, as many lines
//             as the step has: what the arithmetic costs alone
//   one_pass  the tile over each panel's whole k, panel after panel (prefetch 16 lines into L1,
//             128 into L2): matmul.cc before session 8, which prefetched 32 lines into L1 (the
//             same time in the engine's chain)
//   k_blocks  the same layout walked 256 k rows at a time, every panel of the strip per block
//             (x's block stays in L1; the next panel's piece prefetched into L2)
//   blocked   k_blocks on the layout stored in that order (to_panels since session 8)

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
constexpr long kBlock = 256;

struct Product {
  long k, n, panels;
  float* w;
};

// y[0:16, 0:16] (+)= xt[0:kn]^T @ w[0:kn, 0:16], as matmul.cc's tile_p16.
inline void tile(const float* xt, const float* w, long kn, float* y, long ldy, bool first,
                 const float* next) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + i * ldy);
  for (long kk = 0; kk < kn; ++kk) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (kk + 16) * 16), _MM_HINT_T0);
    if (next) _mm_prefetch(reinterpret_cast<const char*>(next + kk * 16), _MM_HINT_T1);
    const __m512 wk = _mm512_loadu_ps(w + kk * 16);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(xt[kk * 16 + i]), wk, acc[i]);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(y + i * ldy, acc[i]);
}

float sum_lines(const float* w, long lines) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (long l = 0; l + 4 <= lines; l += 4) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(w + l * 16));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(w + l * 16 + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(w + l * 16 + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(w + l * 16 + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// Thread t's share of product p: panels [a, b).
void work(const std::string& mode, const Product& p, long a, long b, const float* xt, float* y,
          const float* l1_piece, float* sink) {
  const long ldy = p.panels * 16;
  if (mode == "read") {
    *sink += sum_lines(p.w + a * p.k * 16, (b - a) * p.k);
  } else if (mode == "fma_l1") {
    for (long c = a; c < b; ++c)
      for (long k0 = 0; k0 < p.k; k0 += kBlock)
        tile(xt, l1_piece, std::min(kBlock, p.k - k0), y + c * 16, ldy, true, nullptr);
  } else if (mode == "one_pass") {
    for (long c = a; c < b; ++c) {
      const float* w = p.w + c * p.k * 16;
      tile(xt, w, p.k, y + c * 16, ldy, true, w + 128 * 16);  // line kk + 128 into L2
    }
  } else {  // k_blocks, blocked
    const bool blocked = mode == "blocked";
    for (long k0 = 0; k0 < p.k; k0 += kBlock) {
      const long kn = std::min(kBlock, p.k - k0);
      auto piece = [&](long kb0, long c) {
        const long n = std::min(kBlock, p.k - kb0);
        return blocked ? p.w + (kb0 * p.panels + c * n) * 16 : p.w + (c * p.k + kb0) * 16;
      };
      for (long c = a; c < b; ++c) {
        const float* next = c + 1 < b ? piece(k0, c + 1) : k0 + kn < p.k ? piece(k0 + kn, a) : nullptr;
        tile(xt + k0 * 16, piece(k0, c), kn, y + c * 16, ldy, k0 == 0, next);
      }
    }
  }
}

}  // namespace

int main() {
  const long shapes[4][2] = {{768, 1280}, {768, 768}, {768, 4096}, {2048, 768}};
  std::vector<Product> prods;
  for (int l = 0; l < 12; ++l)
    for (const auto& s : shapes) prods.push_back({s[0], s[1], (s[1] + 15) / 16, nullptr});
  prods.push_back({768, 32000, 2000, nullptr});
  double bytes = 0;
  for (auto& p : prods) {
    const size_t n = size_t(p.k) * p.panels * 16;
    p.w = static_cast<float*>(aligned_alloc(64, n * 4 + 64 * 1024));
    for (size_t q = 0; q < n; ++q) p.w[q] = float((q * 2654435761u) % 1000) * 1e-3f;
    bytes += n * 4.0;
  }
  std::vector<float> xt(2048 * 16), l1_piece(kBlock * 16 + 64 * 16), y(16 * 32000);
  for (size_t i = 0; i < xt.size(); ++i) xt[i] = 1e-3f * i;
  for (size_t i = 0; i < l1_piece.size(); ++i) l1_piece[i] = 1e-4f * i;
  std::printf("%-10s %9s %9s %8s\n", "mode", "median ms", "best ms", "GB/s");
  for (const std::string mode : {"read", "fma_l1", "one_pass", "k_blocks", "blocked", "read"}) {
    std::atomic<int> go{0}, done{0};
    std::atomic<long> current{0};
    std::atomic<bool> stop{false};
    float sinks[2] = {0, 0};
    auto share = [&](int t, const Product& p) {
      const long per = (p.panels + 1) / 2, a = t * per, b = std::min(p.panels, a + per);
      work(mode, p, a, b, xt.data(), y.data(), l1_piece.data(), &sinks[t]);
    };
    std::thread helper([&] {
      for (int seen = 0;;) {
        int g;
        while ((g = go.load(std::memory_order_acquire)) == seen)
          if (stop.load()) return; else _mm_pause();
        seen = g;
        share(1, prods[current.load()]);
        done.fetch_add(1, std::memory_order_release);
      }
    });
    std::vector<double> times;
    for (int rep = 0; rep < 32; ++rep) {
      const auto t0 = Clock::now();
      for (size_t i = 0; i < prods.size(); ++i) {
        current.store(i);
        done.store(0);
        go.fetch_add(1, std::memory_order_release);
        share(0, prods[i]);
        while (done.load(std::memory_order_acquire) != 1) _mm_pause();
      }
      if (rep >= 2) times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    stop.store(true);
    helper.join();
    std::sort(times.begin(), times.end());
    const double med = times[times.size() / 2];
    std::printf("%-10s %9.2f %9.2f %8.1f   (%g)\n", mode.c_str(), med * 1e3, times[0] * 1e3,
                bytes / med / 1e9, double(sinks[0] + sinks[1] + y[5]) * 0);
  }
}

// Greedy sampling on the CPU, as an XLA FFI custom call: each row's index of its largest logit
// (the first of equal ones), or of its first NaN where it has one — jnp.argmax's answer.
//
// Why a native kernel: XLA:CPU computes a decode step's greedy tokens over [16, 32000] logits as
// five or six small fusions (a max, a NaN test, a compare, a select over an iota, a min, each
// a pass over the logits and a thunk of its own): ~0.5 ms of a 26 ms decode step of the bench
// model. Here: two passes per row over logits that the vocabulary head has just written (in
// cache), on the calling thread.
//
// logits f32[R, V] -> tokens s32[R]

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Sixteen floats (and their compare masks) as one value: one AVX-512 register, or two AVX2
// or four SSE/NEON ones, whatever the build targets.
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline bool any(vi16 mask) {
  uint64_t words[8];
  std::memcpy(words, &mask, sizeof words);
  uint64_t acc = 0;
  for (uint64_t w : words) acc |= w;
  return acc != 0;
}

int32_t greedy_row(const float* x, int64_t v) {
  const int64_t v16 = v / 16 * 16;
  // Pass 1: the largest value that is not NaN (a NaN never compares greater), and whether
  // there is a NaN.
  const float neg_inf = -std::numeric_limits<float>::infinity();
  vf16 top = vf16{} + neg_inf;
  vi16 nan = vi16{};
  for (int64_t i = 0; i < v16; i += 16) {
    const vf16 a = load16(x + i);
    top = a > top ? a : top;
    nan |= a != a;
  }
  float best = neg_inf;
  for (int l = 0; l < 16; ++l) best = top[l] > best ? top[l] : best;
  bool has_nan = any(nan);
  for (int64_t i = v16; i < v; ++i) {
    best = x[i] > best ? x[i] : best;
    has_nan |= std::isnan(x[i]);
  }
  // Pass 2: the first index holding it (the first NaN where there is one). A row of -inf
  // matches at 0, as argmax does.
  const vf16 b = vf16{} + best;
  for (int64_t i = 0; i < v16; i += 16) {
    const vf16 a = load16(x + i);
    const vi16 hit = has_nan ? a != a : a == b;
    if (any(hit))
      for (int l = 0; l < 16; ++l)
        if (hit[l]) return static_cast<int32_t>(i + l);
  }
  for (int64_t i = v16; i < v; ++i)
    if (has_nan ? std::isnan(x[i]) : x[i] == best) return static_cast<int32_t>(i);
  return 0;
}

ffi::Error greedy(ffi::Buffer<ffi::F32> logits, ffi::Result<ffi::Buffer<ffi::S32>> tokens) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2 || tokens->dimensions().size() != 1 ||
      tokens->dimensions()[0] != dims[0])
    return ffi::Error::InvalidArgument("greedy: logits [R, V] and tokens [R] expected");
  const int64_t rows = dims[0], v = dims[1];
  if (v == 0 && rows > 0)
    return ffi::Error::InvalidArgument("greedy: logits need at least one column");
  const float* x = logits.typed_data();
  int32_t* out = tokens->typed_data();
  for (int64_t r = 0; r < rows; ++r) out[r] = greedy_row(x + r * v, v);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveGreedy, greedy,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Paged attention on the CPU, as an XLA FFI custom call: every query row of a step (prefill
// chunk rows and decode rows alike) attends to its sequence's keys, read from the paged cache.
//
// Why a native kernel: XLA's CPU backend gathers each slot's pages into a dense copy and fuses
// that gather with the transpose its batched dot wants; on the 125M bench model that cost more
// than the decode step's matmuls (measured: ~50 of ~92 ms per decode step). This kernel reads
// K/V in place, only up to each row's length, with an online softmax.
//
// q          [R, H, Dh]                 query rows
// k/v_cache  [L, N, page, KVH, Dh]      the engine's stacked cache, read in place
// row_slot   i32[R]                     row r reads page_table[row_slot[r]]
// row_len    i32[R]                     keys row r sees: position + 1 for a chunk row (causal),
//                                       the context for a decode row, 0 for padding (zeros out)
// page_table i32[S, pages_per_seq]
// layer      i32[1]                     which layer of the stacked cache
// attr scale f32                        softmax scale
// out        [R, H, Dh]
//
// Work items: a row alone with all its heads (attend_item: a decode row, or a chunk row alone in
// its run), or a block of consecutive rows of one slot (a chunk) times the query heads sharing a
// KV head, computed as small matrix products (attend_block in paged_attention_kernels.h). Both
// compute the same per-row arithmetic to the bit, so a row's output does not depend on which
// other rows share the step (DESIGN: bit-identical whatever shares the step). They run on XLA's
// intra-op thread pool and on the calling thread, so the call finishes even if the pool never
// runs a task.

#include <algorithm>
#include <cstdint>
#include <functional>

#include "paged_attention_kernels.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename T>
ffi::Error run(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
               ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> row_slot,
               ffi::Buffer<ffi::S32> row_len, ffi::Buffer<ffi::S32> page_table,
               ffi::Buffer<ffi::S32> layer, float scale, ffi::Result<ffi::AnyBuffer> out) {
  auto qd = q.dimensions();
  auto cd = k_cache.dimensions();
  auto pd = page_table.dimensions();
  jaxserve::Dims d{qd[1], qd[2], cd[3], cd[1], cd[2], pd[1], pd[0], cd[0]};
  const int64_t lyr = layer.typed_data()[0];
  if (lyr < 0 || lyr >= d.layers) return ffi::Error::InvalidArgument("layer out of range");
  jaxserve::attend_rows<T>(
      reinterpret_cast<const T*>(q.untyped_data()),
      reinterpret_cast<const T*>(k_cache.untyped_data()),
      reinterpret_cast<const T*>(v_cache.untyped_data()), row_slot.typed_data(),
      row_len.typed_data(), page_table.typed_data(), lyr, d, qd[0], scale,
      reinterpret_cast<T*>(out->untyped_data()),
      [&pool](int64_t total, const std::function<void(int64_t)>& fn) {
        jaxserve::parallel_for(pool, total, fn);
      });
  return ffi::Error::Success();
}

ffi::Error paged_attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                           ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> row_slot,
                           ffi::Buffer<ffi::S32> row_len, ffi::Buffer<ffi::S32> page_table,
                           ffi::Buffer<ffi::S32> layer, float scale,
                           ffi::Result<ffi::AnyBuffer> out) {
  if (q.dimensions().size() != 3 || k_cache.dimensions().size() != 5 ||
      page_table.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("paged_attention: q must be rank 3, caches rank 5");
  if (q.element_type() != k_cache.element_type() || q.element_type() != v_cache.element_type())
    return ffi::Error::InvalidArgument("paged_attention: q and caches must share a dtype");
  switch (q.element_type()) {
    case ffi::DataType::F32:
      return run<float>(pool, q, k_cache, v_cache, row_slot, row_len, page_table, layer, scale,
                        out);
    case ffi::DataType::BF16:
      return run<uint16_t>(pool, q, k_cache, v_cache, row_slot, row_len, page_table, layer,
                           scale, out);
    default:
      return ffi::Error::InvalidArgument("paged_attention: dtype must be float32 or bfloat16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedAttention, paged_attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>());

// The bfloat16 instantiation of the kernels (its own translation unit: see the header).

#include "paged_attention_kernels.h"

namespace jaxserve {

template void attend_rows<uint16_t>(const uint16_t*, const uint16_t*, const uint16_t*,
                                    const int32_t*, const int32_t*, const int32_t*, int64_t,
                                    const Dims&, int64_t, float, uint16_t*, const ParallelFor&);

}  // namespace jaxserve

// AVX-512 attention backward (interim: the portable implementation; vectorised version pending).
#include "internal.h"

namespace binformer::cpu::detail {
void attention_bwd_avx512(const AttentionBwdParams& p) { attention_bwd_scalar(p); }
}  // namespace binformer::cpu::detail

// sign_matmul: out[b, m, n] = <sign a_m, sign b_n> over d sign bits, as one batched CUTLASS b1
// GEMM on the AND + popcount tensor-core path (mma.sync m16n8k256 .and.popc; never XOR, which
// runs 6.6x slower on Hopper: SPEC.md section 3).
//
// With p(x) the number of set bits of a row (pad bits are 0 and drop out of every count):
//   <a, b> = 4 p(a & b) - 2 p(a) - 2 p(b) + d.
// The GEMM accumulates p(a & b) over the rows' bits; the correction needs one number per row of
// a and one per row of b, which a small pre-pass writes into a workspace:
//   row_term[m] = d - 2 p(a_m)      col_term[n] = -2 p(b_n)
// and the epilogue applies out = 4 acc + row_term[m] + col_term[n] through CUTLASS's epilogue
// visitor tree (Sm80EVT: a column-vector broadcast, a row-vector broadcast and a three-input
// compute node), so the int32 result is written once, already corrected.
//
// Operand alignment. CUTLASS's b1 tensor-op mainloop moves operands in 128-bit cp.async
// accesses (kAlignment = 128 one-bit elements), so every row must start on a 16-byte boundary:
// K (= the row stride in bits) a multiple of 128, the base pointer 16-byte aligned and the batch
// stride a multiple of 4 words. Our rows have words_for(d) words, which breaks this whenever
// words_for(d) % 4 != 0 (d = 64, for instance). Rather than a second mainloop with 32-bit
// accesses (4x the copy instructions, a rarely exercised CUTLASS path), the pre-pass, which reads
// every row anyway for its popcount, also writes the rows zero-padded to a multiple of 4 words
// into the workspace when an operand is not aligned. The GEMM then runs with K = 32 * padded
// words; the extra zero bits add nothing to p(a & b). The copy costs M*W + N*W words of traffic
// per batch against M*N words of output: negligible except for tiny outputs.
//
// Workspace: the signature has no workspace argument, so the function takes it from the
// stream-ordered allocator (cudaMallocAsync / cudaFreeAsync on the caller's stream; capturable
// in CUDA graphs). Its size is 4 * (M + roundup(N, 4)) bytes per distinct batch of a / b, plus
// the padded copies when needed.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "binformer/cuda_kernels.h"

// Order matters: the visitor headers use names (gemm::GemmCoord, NumericArrayConverter) that they
// do not include themselves.
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_universal.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"

namespace binformer::cuda {
namespace {

// ---------------------------------------------------------------- pre-pass
// One group of `lanes` (a power of two <= 32) threads per row: the group reads the row's words
// (coalesced), sums their popcounts with xor-shuffles and, when `padded` is set, writes the row
// zero-padded to `padded_words` words.
struct RowPrepJob {
  const uint32_t* rows;     // first row of batch 0
  int64_t batch_stride;     // words between batches of `rows`
  int64_t batches;          // distinct batches (1 when broadcast)
  int64_t rows_per_batch;
  int words;                // words_for(d)
  int padded_words;         // >= words, multiple of 4
  uint32_t* padded;         // nullptr: no copy; else [batches, rows_per_batch, padded_words]
  int32_t* term;            // [batches, term_batch_stride]
  int64_t term_batch_stride;
  int32_t term_offset;      // term = term_offset - 2 p(row)
};

__global__ void __launch_bounds__(256)
sign_row_prep_kernel(RowPrepJob job, int lanes_per_row) {
  const int64_t total_rows = job.batches * job.rows_per_batch;
  const int64_t group = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / lanes_per_row;
  const int lane = threadIdx.x % lanes_per_row;
  const int64_t group_stride = int64_t(gridDim.x) * blockDim.x / lanes_per_row;
  // Every thread of a warp runs the same number of iterations (group_stride is a whole number of
  // warps' groups), so the shuffles below always see their full warp.
  const int64_t rounds = (total_rows + group_stride - 1) / group_stride;
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t row_id = group + round * group_stride;
    const bool active = row_id < total_rows;
    const int64_t batch = active ? row_id / job.rows_per_batch : 0;
    const int64_t row = active ? row_id - batch * job.rows_per_batch : 0;
    const uint32_t* src = job.rows + batch * job.batch_stride + row * job.words;
    uint32_t* dst = job.padded ? job.padded + row_id * job.padded_words : nullptr;
    int count = 0;
    for (int w = lane; w < job.padded_words; w += lanes_per_row) {
      const uint32_t word = (active && w < job.words) ? src[w] : 0u;
      count += __popc(word);
      if (dst && active) dst[w] = word;
    }
    for (int m = lanes_per_row >> 1; m > 0; m >>= 1) count += __shfl_xor_sync(0xffffffffu, count, m);
    if (active && lane == 0) {
      job.term[batch * job.term_batch_stride + row] = job.term_offset - 2 * count;
    }
  }
}

// ---------------------------------------------------------------- the GEMM
// Epilogue compute node: out = 4 * acc + row_term + col_term (all int32, exact).
template <class Fragment>
struct PlusMinusOneCorrection {
  CUTLASS_HOST_DEVICE Fragment operator()(Fragment const& acc, Fragment const& row_term,
                                          Fragment const& col_term) const {
    Fragment out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < Fragment::kElements; ++i) out[i] = 4 * acc[i] + row_term[i] + col_term[i];
    return out;
  }
};

// Threadblock 128 x 256 x 512 bits, 8 warps of 64 x 64 x 512, 4 stages of 24 KiB: the b1 tile
// shape of CUTLASS's default Sm80 configuration with one stage more (Hopper has the shared
// memory; a 128 x 256 tile keeps the epilogue's int32 stores wide and the operand loads per
// mma.sync low).
using ThreadblockShape = cutlass::gemm::GemmShape<128, 256, 512>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 512>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 256>;
constexpr int kStages = 4;
constexpr int kOperandAlignment = 128;  // bits: 128-bit accesses

template <int kOutputAlignment>
struct SignGemm {
  using OutputTileThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<
      ThreadblockShape, WarpShape, int32_t, kOutputAlignment, /*EpilogueStages=*/1>;

  using Accumulator = cutlass::epilogue::threadblock::VisitorAccFetch;
  // row_term[b, m]: broadcast along n (stride (1, 0, batch)).
  using RowTerm = cutlass::epilogue::threadblock::VisitorColBroadcast<
      OutputTileThreadMap, int32_t, cute::Stride<cute::_1, cute::_0, int64_t>>;
  // col_term[b, n]: broadcast along m (stride (0, 1, batch)).
  using ColTerm = cutlass::epilogue::threadblock::VisitorRowBroadcast<
      OutputTileThreadMap, int32_t, cute::Stride<cute::_0, cute::_1, int64_t>>;
  using Correction = cutlass::epilogue::threadblock::VisitorCompute<
      PlusMinusOneCorrection, int32_t, int32_t, cutlass::FloatRoundStyle::round_toward_zero>;
  using Corrected = cutlass::epilogue::threadblock::Sm80EVT<Correction, Accumulator, RowTerm, ColTerm>;
  using Store = cutlass::epilogue::threadblock::VisitorAuxStore<
      OutputTileThreadMap, int32_t, cutlass::FloatRoundStyle::round_toward_zero,
      cute::Stride<int64_t, cute::_1, int64_t>>;
  using Callbacks = cutlass::epilogue::threadblock::Sm80EVT<Store, Corrected>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      cutlass::uint1b_t, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone,
      kOperandAlignment,
      cutlass::uint1b_t, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone,
      kOperandAlignment,
      int32_t, cutlass::layout::RowMajor, kOutputAlignment,
      int32_t,  // accumulator
      int32_t,  // epilogue compute
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape,
      InstructionShape, Callbacks, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>,
      kStages, cutlass::arch::OpAndPopc, /*EpilogueStages=*/1>::GemmKernel;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

struct GemmOperands {
  const uint32_t* a;  // rows of padded_words words (16-byte aligned)
  const uint32_t* b;
  int64_t a_batch_stride_words, b_batch_stride_words;
  const int32_t* row_term;  // [*, M]
  int64_t row_term_batch_stride;
  const int32_t* col_term;  // [*, col_term_ld]
  int64_t col_term_batch_stride;
  int32_t* out;
  int64_t batch, M, N;
  int padded_words;
};

cudaError_t to_cuda_error(cutlass::Status s) {
  switch (s) {
    case cutlass::Status::kSuccess: return cudaSuccess;
    case cutlass::Status::kErrorInternal: return cudaGetLastError() != cudaSuccess ? cudaErrorLaunchFailure
                                                                                    : cudaErrorUnknown;
    default: return cudaErrorInvalidValue;
  }
}

// Batch strides of the b1 operands. The batched kernel advances its operand pointer with plain
// pointer arithmetic (`ElementA* ptr_A; ptr_A += batch * batch_stride_A`, gemm_universal.h), and a
// cutlass::uint1b_t object occupies one byte, so for sub-byte operands the batch stride is counted
// in bytes, not in elements (bits) like lda. Leading dimensions stay in bits.
static_assert(sizeof(cutlass::uint1b_t) == 1, "batch strides below assume one-byte uint1b_t objects");
constexpr int64_t kBatchStrideUnitsPerWord = 4;

template <int kOutputAlignment>
cudaError_t run_gemm(const GemmOperands& g, cudaStream_t stream) {
  using Gemm = SignGemm<kOutputAlignment>;
  using Device = typename Gemm::Device;
  const int K = 32 * g.padded_words;
  // The batch index lives in gridDim.z (at most 65535): run larger batches in slices.
  constexpr int64_t kMaxBatchPerLaunch = 65535;
  for (int64_t b0 = 0; b0 < g.batch; b0 += kMaxBatchPerLaunch) {
    const int batch = int(std::min<int64_t>(kMaxBatchPerLaunch, g.batch - b0));
    const int64_t out_batch_stride = g.M * g.N;
    typename Gemm::Callbacks::Arguments callbacks{
        {
            {},  // accumulator
            {g.row_term + b0 * g.row_term_batch_stride, 0,
             {cute::_1{}, cute::_0{}, g.row_term_batch_stride}},
            {g.col_term + b0 * g.col_term_batch_stride, 0,
             {cute::_0{}, cute::_1{}, g.col_term_batch_stride}},
            {}  // correction
        },
        {g.out + b0 * out_batch_stride, {g.N, cute::_1{}, out_batch_stride}}};

    typename Device::Arguments args(
        cutlass::gemm::GemmUniversalMode::kBatched,
        cutlass::gemm::GemmCoord(int(g.M), int(g.N), K), batch, callbacks,
        reinterpret_cast<const cutlass::uint1b_t*>(g.a + b0 * g.a_batch_stride_words),
        reinterpret_cast<const cutlass::uint1b_t*>(g.b + b0 * g.b_batch_stride_words),
        nullptr, nullptr,  // C and D are the visitor's business
        kBatchStrideUnitsPerWord * g.a_batch_stride_words, kBatchStrideUnitsPerWord * g.b_batch_stride_words,
        0, 0, /*lda=*/K, /*ldb=*/K, /*ldc=*/0, /*ldd=*/0);
    Device gemm;
    cutlass::Status status = gemm.can_implement(args);
    if (status != cutlass::Status::kSuccess) return to_cuda_error(status);
    status = gemm.initialize(args, nullptr, stream);
    if (status != cutlass::Status::kSuccess) return to_cuda_error(status);
    status = gemm.run(stream);
    if (status != cutlass::Status::kSuccess) return to_cuda_error(status);
  }
  return cudaGetLastError();
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

bool operand_needs_copy(const uint32_t* p, int words, int64_t batch_stride) {
  return words % 4 != 0 || reinterpret_cast<uintptr_t>(p) % 16 != 0 || batch_stride % 4 != 0;
}

int lanes_for(int words) {
  int lanes = 1;
  while (lanes < words && lanes < 32) lanes <<= 1;
  return lanes;
}

cudaError_t launch_prep(const RowPrepJob& job, cudaStream_t stream) {
  const int lanes = lanes_for(job.padded_words);
  const int64_t threads = job.batches * job.rows_per_batch * lanes;
  const int64_t blocks = std::min<int64_t>((threads + 255) / 256, 65536);
  sign_row_prep_kernel<<<int(std::max<int64_t>(blocks, 1)), 256, 0, stream>>>(job, lanes);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sign_matmul(const SignMatmulParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.M < 0 || p.N < 0 || p.d < 0) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.out == nullptr) return cudaErrorInvalidValue;
  if (p.M > std::numeric_limits<int>::max() || p.N > std::numeric_limits<int>::max()) {
    return cudaErrorInvalidValue;  // CUTLASS 2.x problem coordinates are int
  }
  const int words = words_for(p.d);
  if (words == 0) {  // d = 0: every dot product is 0
    return cudaMemsetAsync(p.out, 0, size_t(p.batch * p.M * p.N) * sizeof(int32_t), stream);
  }
  if (p.a == nullptr || p.b == nullptr) return cudaErrorInvalidValue;

  const int padded_words = int(round_up(words, 4));
  const int64_t a_batches = p.a_batch_stride == 0 ? 1 : p.batch;
  const int64_t b_batches = p.b_batch_stride == 0 ? 1 : p.batch;
  const bool copy_a = operand_needs_copy(p.a, words, p.a_batch_stride);
  const bool copy_b = operand_needs_copy(p.b, words, p.b_batch_stride);
  const int64_t col_term_ld = round_up(p.N, 4);  // 16-byte rows for the vectorized broadcast

  // Workspace layout, each piece on a 256-byte boundary.
  const int64_t row_term_bytes = round_up(a_batches * p.M * 4, 256);
  const int64_t col_term_bytes = round_up(b_batches * col_term_ld * 4, 256);
  const int64_t a_copy_bytes = copy_a ? round_up(a_batches * p.M * padded_words * 4, 256) : 0;
  const int64_t b_copy_bytes = copy_b ? round_up(b_batches * p.N * padded_words * 4, 256) : 0;
  char* workspace = nullptr;
  cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&workspace),
                                    size_t(row_term_bytes + col_term_bytes + a_copy_bytes + b_copy_bytes),
                                    stream);
  if (err != cudaSuccess) return err;
  int32_t* row_term = reinterpret_cast<int32_t*>(workspace);
  int32_t* col_term = reinterpret_cast<int32_t*>(workspace + row_term_bytes);
  uint32_t* a_copy = copy_a ? reinterpret_cast<uint32_t*>(workspace + row_term_bytes + col_term_bytes) : nullptr;
  uint32_t* b_copy =
      copy_b ? reinterpret_cast<uint32_t*>(workspace + row_term_bytes + col_term_bytes + a_copy_bytes) : nullptr;

  const RowPrepJob a_job{p.a, p.a_batch_stride, a_batches, p.M, words, padded_words,
                         a_copy, row_term, p.M, p.d};
  const RowPrepJob b_job{p.b, p.b_batch_stride, b_batches, p.N, words, padded_words,
                         b_copy, col_term, col_term_ld, 0};
  err = launch_prep(a_job, stream);
  if (err == cudaSuccess) err = launch_prep(b_job, stream);

  if (err == cudaSuccess) {
    GemmOperands g;
    g.a = copy_a ? a_copy : p.a;
    g.b = copy_b ? b_copy : p.b;
    g.a_batch_stride_words = p.a_batch_stride == 0 ? 0 : (copy_a ? p.M * padded_words : p.a_batch_stride);
    g.b_batch_stride_words = p.b_batch_stride == 0 ? 0 : (copy_b ? p.N * padded_words : p.b_batch_stride);
    g.row_term = row_term;
    g.row_term_batch_stride = p.a_batch_stride == 0 ? 0 : p.M;
    g.col_term = col_term;
    g.col_term_batch_stride = p.b_batch_stride == 0 ? 0 : col_term_ld;
    g.out = p.out;
    g.batch = p.batch;
    g.M = p.M;
    g.N = p.N;
    g.padded_words = padded_words;
    const bool wide_output = p.N % 4 == 0 && reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
    err = wide_output ? run_gemm<4>(g, stream) : run_gemm<1>(g, stream);
  }
  const cudaError_t free_err = cudaFreeAsync(workspace, stream);
  return err != cudaSuccess ? err : free_err;
}

}  // namespace binformer::cuda

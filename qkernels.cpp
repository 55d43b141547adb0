// The CPU kernels of a decode step: int8 x int8 and int4 x int8 products, in llama.cpp's scheme (Q8_0 x Q8_0,
// Q4_1 x Q8_0) over our layers' own tensors; float32 weights, and bfloat16 or float16 ones for CPUs without
// instructions for those, by float32 inputs (float_linear); the attention of a decode step's few query rows
// (few_query_attention, which decode.few_query_attention_pass puts in compiled steps); the greedy
// token (argmax, which sampling.argmax calls in compiled steps); and a team of threads held for a whole
// compiled step, which read the next weights ahead between its products (Team).
//
// Each product rounds its input rows to int8 in blocks of 32 (x ~ d * q, q in -127..127, one float scale d
// per block), multiplies them by the weight's blocks in integers, and scales each block's sum in float:
//   int8 weight [N, K], one scale per output:      y[m, n] = scale[n] * sum_b d[m, b] * (w[n]_b . q[m]_b)
//   int4 weight, a scale and offset per block of 32 (w = s * v + o, v in 0..15):
//                                                   y[m, n] = sum_b s[n, b] d[m, b] (v[n]_b . q[m]_b)
//                                                           + o[n, b] d[m, b] sum(q[m]_b)
// int4 weights come repacked (qlinear.pack_int4_for_kernel) so that one pass makes eight outputs at once,
// one in each lane of a vector: no sums across lanes, and every read of the weight is sequential. For
// each eight outputs n..n + 7 and each block b, 160 bytes: 128 of values, then the eight outputs' float16
// scales, then their offsets. The values are four vectors of 32 bytes: vector j holds, for output n + r,
// bytes 4r..4r + 3 = inputs 4j..4j + 3 of the block (low nibbles) and 16 + 4j..16 + 4j + 3 (high). int8
// weights come packed in that lane order too where the CPU has neither AVX-512 nor VNNI (q8_packed, which
// rounds the inputs to -63..63), and stay as stored elsewhere.
// PyTorch has no int4 x int8 product on the CPU, and its int8 ones run several times below the memory's
// speed for a decode step's few rows (BENCHMARKS.md), which is what this file is for. The integer dot
// products are AVX2's (maddubs: unsigned x signed bytes to pairs of int16, no overflow for these ranges),
// or VNNI's where the compiler targets it; with AVX-512 and VNNI, the products make sixteen outputs at
// once in 512-bit vectors (q4_output16; for several rows, int8 too: q8_outputs16). qlinear.py builds this
// file once per machine (for its CPU, -march=native) and registers the products as torch ops, which
// compiled graphs call as they are.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "these kernels need AVX2, FMA and F16C"
#endif

namespace {

constexpr int64_t QK = 32;  // inputs per block
constexpr int MAX_ROWS = 4;  // activation rows per pass over a weight row: their sums stay in registers
// rows per pass on AVX2 of the kernels that make eight outputs, one a lane (q8_packed, q4_outputs_many)
constexpr int MANY_ROWS = 8;
// bytes ahead in a weight row to ask the memory for: one core alone keeps too few reads in flight to
// reach the memory's speed. The best distance differs by CPU, so qlinear.py's build sets it (BENCHMARKS.md):
// on an AMD EPYC, 2 KiB (bfloat16 and float16 rows took a fifth to a third longer at 1 KiB, and longer at
// 3 and 6; int8 ones about a twentieth; int4 ones within a few percent from 1 to 3 KiB); on an Intel Xeon
// (Ice Lake), 8 KiB (a decode step's int8 and int4 products 5-14% faster than at 2 KiB, bfloat16's 5%).
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif
constexpr int PREFETCH = PREFETCH_BYTES;
// One row's products, bound by the memory, may also ask for the lines this much farther ahead than their
// first-level prefetch, into the second-level cache, so that more reads are in flight than the first
// level's fill buffers hold. Whether that helps differs by CPU, so qlinear.py's build sets it (0: not
// asked): on an AMD EPYC Zen 2, 8 KiB took batch-1 decode steps 2-6% less time; on a Zen 3, 1-10% more
// (BENCHMARKS.md).
#ifndef PREFETCH_FARTHER_BYTES
#define PREFETCH_FARTHER_BYTES 8192
#endif
constexpr int PREFETCH_FARTHER = PREFETCH_FARTHER_BYTES;
// the line PREFETCH_FARTHER bytes past p into the second-level cache, where the build asks for that
inline void prefetch_farther(const char* p) {
  if constexpr (PREFETCH_FARTHER > 0) _mm_prefetch(p + PREFETCH_FARTHER, _MM_HINT_T1);
}
constexpr int Q4_OUTPUTS = 8;  // int4 outputs made at once, one per lane
constexpr int64_t Q4_VALUE_BYTES = Q4_OUTPUTS * QK / 2, Q4_BLOCK_BYTES = Q4_VALUE_BYTES + Q4_OUTPUTS * 4;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// the 4 bytes at p in every 32-bit lane
inline __m256i broadcast4(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return _mm256_set1_epi32(four);
}

inline __m256 load_half8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define HAVE_VNNI 1
// acc plus, in each int32 lane, the sum of u * s over the lane's 4 byte pairs (u unsigned, s signed)
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}
#endif

// 8 int32 lanes summing u * s over 32 byte pairs, u unsigned, s signed (without VNNI, each pair's sum
// 2 * u * s must fit int16: |s| <= 127 with u <= 127, or |s| <= 63 with u <= 255)
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef HAVE_VNNI
  return dpbusd(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// AVX-512's sixteen lanes: products of sixteen outputs at once, and eight rows in a pass (32 vector registers)
#define HAVE_AVX512 1
constexpr int WIDE_ROWS = 8;
// 32 bytes at a in lanes 0-7, 32 bytes at b in lanes 8-15
inline __m512i join32(const void* a, const void* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}
// 8 float16 at a, then 8 at b, as 16 floats
inline __m512 join_half8(const void* a, const void* b) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
}
// the 4 bytes at p in every 32-bit lane, read as an int32 that may alias anything and lie anywhere, so that
// the compiler makes the read part of the broadcast (a load; through a general register it costs a vector op)
typedef int32_t __attribute__((may_alias, aligned(1))) any_int32;
inline __m512i broadcast4_512(const int8_t* p) { return _mm512_set1_epi32(*reinterpret_cast<const any_int32*>(p)); }

// sixteen outputs' sums over a block of 32 inputs: v[j] holds, in lane r, output r's 4 unsigned weights for
// inputs 4j..4j + 3; qb the block's 32 signed inputs; plus start. In two chains, so that each addition waits
// less.
inline __m512i dot16(const __m512i* v, const int8_t* qb, __m512i start = _mm512_setzero_si512()) {
  __m512i even = start, odd = _mm512_setzero_si512();
  for (int j = 0; j < 8; j += 2) {
    even = _mm512_dpbusd_epi32(even, v[j], broadcast4_512(qb + 4 * j));
    odd = _mm512_dpbusd_epi32(odd, v[j + 1], broadcast4_512(qb + 4 * j + 4));
  }
  return _mm512_add_epi32(even, odd);
}
#endif

// f(std::integral_constant<int, value>()) for a value from 1 to MAX known only at run time: the kernels take
// their rows, or vectors, as constants, so that their sums are arrays the compiler keeps in registers
template <int MAX, typename F>
inline void as_constant(int64_t value, F&& f) {
  if constexpr (MAX > 1)
    if (value < MAX) return as_constant<MAX - 1>(value, f);
  f(std::integral_constant<int, MAX>());
}

// ---------------------------------------------------------------------------------------------------------
// Activations: a row of K floats -> K int8 in blocks of 32, each with its scale d and, when sums is given,
// d * sum(q); when offsets is given, 128 * sum(q) (what int8 weights made unsigned, each plus 128, add to the
// block's sums in q8_packed and q8_outputs16). levels: the largest magnitude, 127, or 63 for the packed int8
// products (q8_packed, below), whose int16 pairs must not overflow.

void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* sums, int32_t* offsets, float levels) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const int64_t nb = K / QK;
  for (int64_t b = 0; b < nb; ++b) {
    __m256 v[4], m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + b * QK + 8 * i);
      m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
    }
    const float amax = hmax(m);
    d[b] = amax / levels;
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? levels / amax : 0.f);
    __m256i i[4];
    for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), nearest));
    if (sums || offsets) {
      const __m256i s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
      const float sum = hsum(_mm256_cvtepi32_ps(s));  // (exact: at most 32 * 127)
      if (sums) sums[b] = d[b] * sum;
      if (offsets) offsets[b] = 128 * static_cast<int32_t>(sum);
    }
    // packing works within 128-bit lanes; the permutation puts the 32 values back in order
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), _mm256_permutevar8x32_epi32(p, in_order));
  }
}

// A step calls these ops a hundred times and more, each for a few rows: the rounded rows live in a buffer of
// the calling thread's, kept from call to call, rather than in two or three new tensors per call. The
// product rounds them (rows()), its threads each their own share where there are several rows (product).
struct Activations {
  const float* x;            // [M, K], the rows to round
  int8_t* q;                 // [M, K]
  float *d, *sums;           // [M, K / 32] each (sums: int4 only)
  int32_t* offsets;          // [M, K / 32] (int8 with its weights plus 128 only)
  int64_t K, nb;             // inputs and blocks per row
  float levels;
  void rows(int64_t begin, int64_t end) const {
    for (int64_t m = begin; m < end; ++m)
      quantize_row(x + m * K, K, q + m * K, d + m * nb, sums ? sums + m * nb : nullptr,
                   offsets ? offsets + m * nb : nullptr, levels);
  }
};

// what a product needs: INT8 -127..127; INT8_SUMS, also each block's d * sum(q) (int4); INT8_OFFSETS, also
// each block's 128 * sum(q) (int8 weights plus 128: q8_outputs16); PACKED_INT8 -63..63, and each block's
// 128 * sum(q) (q8_packed)
enum class Rounding { INT8, INT8_SUMS, INT8_OFFSETS, PACKED_INT8 };

Activations activations(const at::Tensor& x, Rounding rounding) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / QK;
  thread_local std::vector<float> buffer;  // the scales and sums, then the int8 values
  thread_local std::vector<int32_t> integer_offsets;
  buffer.resize(2 * M * nb + M * K / 4);
  float *d = buffer.data(), *sums = d + M * nb;
  int8_t* q = reinterpret_cast<int8_t*>(sums + M * nb);
  const bool packed = rounding == Rounding::PACKED_INT8, offsets = packed || rounding == Rounding::INT8_OFFSETS;
  if (offsets) integer_offsets.resize(M * nb);
  return {x.data_ptr<float>(), q, d, rounding == Rounding::INT8_SUMS ? sums : nullptr,
          offsets ? integer_offsets.data() : nullptr, K, nb, packed ? 63.f : 127.f};
}

// ---------------------------------------------------------------------------------------------------------
// One output for R activation rows. Blocks go in pairs, into two sets of sums, so that each addition waits
// less on the one before.

template <int R>
inline void q8_block(const int8_t* w, int64_t b, const int8_t* q, const float* d, int64_t K, int64_t nb,
                     __m256* acc) {
  const __m256i wb = load32(w + b * QK);
  const __m256i aw = _mm256_sign_epi8(wb, wb);  // |w|, with w's signs moved onto the activations
  for (int r = 0; r < R; ++r) {
    const __m256i sq = _mm256_sign_epi8(load32(q + r * K + b * QK), wb);
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(aw, sq)), _mm256_broadcast_ss(d + r * nb + b), acc[r]);
  }
}

// At one row, bound by the memory, one output at a time: the weight is read as one sequential stream, each
// line asked for into the first-level cache ONE_ROW_INT8_AHEAD bytes ahead (and, where the build asks for
// it, into the second PREFETCH_FARTHER beyond that). (Four outputs side by side, sharing the work on the
// row's blocks, read four streams at once: on an AMD EPYC (Zen 2), their loads alone, with no arithmetic,
// came at four fifths of one stream's speed.
// One output at a time 2 KiB ahead, as the other products prefetch, took as long as those four; 1 KiB ahead,
// the int8 batch-1 step was 1.06x the tok/s. Half the other products' distance was measured there only:
// BENCHMARKS.md.)
constexpr int ONE_ROW_INT8_AHEAD = PREFETCH / 2;

template <int R>
void q8_output(const int8_t* w, float scale, const int8_t* q, const float* d, int64_t K, int64_t nb, float* y,
               int64_t ldy) {
  __m256 even[R], odd[R];
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    const char* line = reinterpret_cast<const char*>(w + b * QK);
    if constexpr (R == 1) {
      _mm_prefetch(line + ONE_ROW_INT8_AHEAD, _MM_HINT_T0);
      prefetch_farther(line + ONE_ROW_INT8_AHEAD);
    } else {
      _mm_prefetch(line + PREFETCH, _MM_HINT_T0);
    }
    q8_block<R>(w, b, q, d, K, nb, even);
    q8_block<R>(w, b + 1, q, d, K, nb, odd);
  }
  if (b < nb) q8_block<R>(w, b, q, d, K, nb, even);
  for (int r = 0; r < R; ++r) y[r * ldy] = scale * hsum(_mm256_add_ps(even[r], odd[r]));
}

// int8 weights packed at load (qlinear.pack_int8_for_kernel), where the CPU has neither AVX-512 nor VNNI:
// [N / 8, K / 32, 256] bytes (N a multiple of 8); for each eight outputs n..n + 7 and each block of 32
// inputs, eight vectors of 32 bytes, vector j holding for output n + r, in bytes 4r..4r + 3, inputs
// 4j..4j + 3 of the block, each weight plus 128 (unsigned). maddubs then multiplies them with a row's signed
// inputs broadcast, as int4's blocks: without VNNI, the weights as stored needed a sign operation per row and
// 4 inputs (maddubs takes one unsigned operand) and a transpose of every block (so that an output's sum stays
// in one lane), which here are gone. maddubs's int16 pairs hold 2 * 255 * |q|, so the rows are rounded to
// -63..63 (Rounding::PACKED_INT8). What the +128 adds to a block's sums, 128 * sum(q), is taken away per row
// and block, in integers, so that the sums are exact; the rounding makes it, an int32 a block that the
// kernel broadcasts from memory (made here from sum(q), a shift and a move into a vector register more,
// eight rows took 1.02-1.07x as long). Taken away once a row from the float sum over all the blocks instead,
// eight rows took 0.84-0.87x the time, but a block with an outlying input then left its rounding error in
// every output: int8's perplexity +1.26% over bfloat16, against +0.89%. A row's result is the same
// arithmetic in the same order however many rows a pass makes: a batch's rows equal each row alone.
// (Measured against the kernels this replaced: BENCHMARKS.md.)
constexpr int Q8_OUTPUTS = 8;
constexpr int64_t Q8_BLOCK_BYTES = Q8_OUTPUTS * QK;
// up to these many rows keep their float sums in registers; more keep them in memory (in registers beside
// the integer sums, three and four rows were slower)
constexpr int Q8_REGISTER_ROWS = 2;

template <int R>
void q8_packed(const uint8_t* w, const float* scale, const int8_t* q, const float* d, const int32_t* offsets,
               int64_t K, int64_t nb, float* y, int64_t ldy) {
  constexpr bool in_memory = R > Q8_REGISTER_ROWS;
  alignas(32) float memory[in_memory ? R : 1][Q8_OUTPUTS];
  __m256 acc[in_memory ? 1 : R];
  for (int r = 0; r < R; ++r) {
    if constexpr (in_memory) _mm256_store_ps(memory[r], _mm256_setzero_ps());
    else acc[r] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* block = w + b * Q8_BLOCK_BYTES;
    const char* line = reinterpret_cast<const char*>(block);
    for (int l = 0; l < Q8_BLOCK_BYTES; l += 64) {
      if constexpr (R == 1) {  // bound by the memory: nearer, and farther into L2 where asked (q8_output)
        _mm_prefetch(line + l + ONE_ROW_INT8_AHEAD, _MM_HINT_T0);
        prefetch_farther(line + l + ONE_ROW_INT8_AHEAD);
      } else {
        _mm_prefetch(line + l + PREFETCH, _MM_HINT_T0);
      }
    }
    __m256i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m256i wj = _mm256_load_si256(reinterpret_cast<const __m256i*>(block + 32 * j));
      for (int r = 0; r < R; ++r)
        dot[r] = _mm256_add_epi32(dot[r], dot_u8s8(wj, broadcast4(q + r * K + b * QK + 4 * j)));
      // (added in the order written: GCC would otherwise gather a block's products first and spill them)
      if constexpr (in_memory)
        for (int r = 0; r < R; ++r) asm("" : "+x"(dot[r]));
    }
    for (int r = 0; r < R; ++r) {
      const __m256 exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot[r], _mm256_set1_epi32(offsets[r * nb + b])));
      const __m256 db = _mm256_broadcast_ss(d + r * nb + b);
      if constexpr (in_memory) _mm256_store_ps(memory[r], _mm256_fmadd_ps(exact, db, _mm256_load_ps(memory[r])));
      else acc[r] = _mm256_fmadd_ps(exact, db, acc[r]);
    }
  }
  const __m256 s8 = _mm256_loadu_ps(scale);
  for (int r = 0; r < R; ++r)
    _mm256_storeu_ps(y + r * ldy, _mm256_mul_ps(in_memory ? _mm256_load_ps(memory[r]) : acc[r], s8));
}

// An int4 block's 128 bytes of values (the layout above) as unsigned bytes: v[j] and v[j + 4] hold inputs
// 4j.. and 16 + 4j.. of each lane's output
inline void q4_values(const uint8_t* w, __m256i* v) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int j = 0; j < 4; ++j) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * j));
    v[j] = _mm256_and_si256(bytes, low);
    v[j + 4] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
  }
}

// One row's integer sums over an int4 block, one per lane's output: each 4 inputs of the row's block qb go to
// every lane, and multiply there with those 4 inputs of the lane's output. Summed in int16 before widening:
// each of the eight products is at most 2 * 15 * 127 in magnitude, so their sum fits.
inline __m256i q4_dot(const __m256i* v, const int8_t* qb) {
  auto inputs = [&](int j) { return broadcast4(qb + 4 * j); };  // inputs 4j..4j + 3 in every lane
#ifdef HAVE_VNNI
  __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
  for (int j = 0; j < 8; j += 2) {
    even = dpbusd(even, v[j], inputs(j));
    odd = dpbusd(odd, v[j + 1], inputs(j + 1));
  }
  return _mm256_add_epi32(even, odd);
#else
  __m256i p[8];
  for (int j = 0; j < 8; ++j) p[j] = _mm256_maddubs_epi16(v[j], inputs(j));
  // added as a tree, so that fewer additions wait on each other
  const __m256i sum = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])),
                                       _mm256_add_epi16(_mm256_add_epi16(p[4], p[5]), _mm256_add_epi16(p[6], p[7])));
  return _mm256_madd_epi16(sum, _mm256_set1_epi16(1));
#endif
}

// Eight outputs' int4 block for R rows
template <int R>
inline void q4_block(const uint8_t* w, const int8_t* q, const float* d, const float* sums, int64_t K, int64_t nb,
                     int64_t b, __m256* acc, __m256* offsets) {
  __m256i v[8];
  q4_values(w, v);
  const __m256 s8 = load_half8(reinterpret_cast<const at::Half*>(w + Q4_VALUE_BYTES));
  const __m256 o8 = load_half8(reinterpret_cast<const at::Half*>(w + Q4_VALUE_BYTES + 2 * Q4_OUTPUTS));
  for (int r = 0; r < R; ++r) {
    const __m256i dot = q4_dot(v, q + r * K + b * QK);
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s8, _mm256_broadcast_ss(d + r * nb + b)), acc[r]);
    // one or two rows sum the offsets' terms apart, so that fewer additions wait on each other; for more,
    // the registers would run out (measured slower)
    if constexpr (R <= 2)
      offsets[r] = _mm256_fmadd_ps(o8, _mm256_broadcast_ss(sums + r * nb + b), offsets[r]);
    else
      acc[r] = _mm256_fmadd_ps(o8, _mm256_broadcast_ss(sums + r * nb + b), acc[r]);
  }
}

// Eight outputs (valid of them real: the last eight of a layer may be padding) for R rows. (Not inlined:
// inlined beside q4_outputs_many's instances, one and two rows took 1.05x and 1.14x the time they had
// taken.)
template <int R>
__attribute__((noinline)) void q4_output(const uint8_t* w, const int8_t* q, const float* d, const float* sums,
                                         int64_t K, int64_t nb, float* y, int64_t ldy, int valid) {
  __m256 acc[R], offsets[R];  // the products' sums; the offsets' terms (one or two rows)
  for (int r = 0; r < R; ++r) acc[r] = offsets[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const char* ahead = reinterpret_cast<const char*>(w + b * Q4_BLOCK_BYTES + PREFETCH);
    for (int line = 0; line < Q4_BLOCK_BYTES; line += 64) {
      _mm_prefetch(ahead + line, _MM_HINT_T0);
      if constexpr (R == 1) prefetch_farther(ahead + line);
    }
    q4_block<R>(w + b * Q4_BLOCK_BYTES, q, d, sums, K, nb, b, acc, offsets);
  }
  for (int r = 0; r < R; ++r) {
    const __m256 out = _mm256_add_ps(acc[r], offsets[r]);
    if (valid == Q4_OUTPUTS) {
      _mm256_storeu_ps(y + r * ldy, out);
    } else {
      float lanes[Q4_OUTPUTS];
      _mm256_storeu_ps(lanes, out);
      std::copy(lanes, lanes + valid, y + r * ldy);
    }
  }
}

// Eight int4 outputs for more rows than MAX_ROWS (up to MANY_ROWS): each of a block's eight vectors of
// values is unpacked once, in a register, and multiplied with every row's inputs before the next (q4_dot
// takes the rows one at a time, so it reads the block's vectors once a row: two loads a row and 4 inputs
// with the broadcasts, which at these rows set the time); each row's integer sums stay in a register (int16
// without VNNI: eight pairs of at most 2 * 15 * 127 fit), its float sums in memory (the offsets' terms added
// into them, as passes of three and four rows do). (Measured against unpacking into a buffer: BENCHMARKS.md.)
template <int R>
void q4_outputs_many(const uint8_t* w, const int8_t* q, const float* d, const float* sums, int64_t K, int64_t nb,
                     float* y, int64_t ldy, int valid) {
  alignas(32) float acc[R][Q4_OUTPUTS];
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int r = 0; r < R; ++r) _mm256_store_ps(acc[r], _mm256_setzero_ps());
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * Q4_BLOCK_BYTES;
    const char* ahead = reinterpret_cast<const char*>(wb + PREFETCH);
    for (int line = 0; line < Q4_BLOCK_BYTES; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    __m256i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {  // vector j: inputs 4j..4j + 3, as q4_values makes it
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * (j % 4)));
      const __m256i v = _mm256_and_si256(j < 4 ? bytes : _mm256_srli_epi16(bytes, 4), low);
      for (int r = 0; r < R; ++r) {
        const __m256i x = broadcast4(q + r * K + b * QK + 4 * j);
#ifdef HAVE_VNNI
        dot[r] = dpbusd(dot[r], v, x);
#else
        dot[r] = _mm256_add_epi16(dot[r], _mm256_maddubs_epi16(v, x));
#endif
      }
      // (added in the order written: GCC would otherwise gather a block's products first and spill them)
      for (int r = 0; r < R; ++r) asm("" : "+x"(dot[r]));
    }
    const __m256 s8 = load_half8(reinterpret_cast<const at::Half*>(wb + Q4_VALUE_BYTES));
    const __m256 o8 = load_half8(reinterpret_cast<const at::Half*>(wb + Q4_VALUE_BYTES + 2 * Q4_OUTPUTS));
    for (int r = 0; r < R; ++r) {
#ifdef HAVE_VNNI
      const __m256i sum = dot[r];
#else
      const __m256i sum = _mm256_madd_epi16(dot[r], _mm256_set1_epi16(1));
#endif
      const __m256 scale = _mm256_mul_ps(s8, _mm256_broadcast_ss(d + r * nb + b));
      const __m256 scaled = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, _mm256_load_ps(acc[r]));
      _mm256_store_ps(acc[r], _mm256_fmadd_ps(o8, _mm256_broadcast_ss(sums + r * nb + b), scaled));
    }
  }
  for (int r = 0; r < R; ++r) std::copy(acc[r], acc[r] + valid, y + r * ldy);
}

#ifdef HAVE_AVX512
// Sixteen int4 outputs for R rows: the eight outputs' blocks of two groups side by side (w0, w1: the same
// block b of groups g and g + 1), q4_block's arithmetic in vectors twice as wide.
template <int R>
inline void q4_block16(const uint8_t* w0, const uint8_t* w1, const int8_t* q, const float* d, const float* sums,
                       int64_t K, int64_t nb, int64_t b, __m512* acc, __m512* offsets) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512i v[8];
  for (int j = 0; j < 4; ++j) {
    const __m512i bytes = join32(w0 + 32 * j, w1 + 32 * j);
    v[j] = _mm512_and_si512(bytes, low);
    v[j + 4] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
  }
  const __m512 s16 = join_half8(w0 + Q4_VALUE_BYTES, w1 + Q4_VALUE_BYTES);
  const __m512 o16 = join_half8(w0 + Q4_VALUE_BYTES + 2 * Q4_OUTPUTS, w1 + Q4_VALUE_BYTES + 2 * Q4_OUTPUTS);
  for (int r = 0; r < R; ++r) {
    const __m512i dot = dot16(v, q + r * K + b * QK);
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s16, _mm512_set1_ps(d[r * nb + b])), acc[r]);
    if constexpr (R <= 2)
      offsets[r] = _mm512_fmadd_ps(o16, _mm512_set1_ps(sums[r * nb + b]), offsets[r]);
    else
      acc[r] = _mm512_fmadd_ps(o16, _mm512_set1_ps(sums[r * nb + b]), acc[r]);
  }
}

// Sixteen outputs (groups g and g + 1, w their first) for R rows
template <int R>
void q4_output16(const uint8_t* w, const int8_t* q, const float* d, const float* sums, int64_t K, int64_t nb, float* y,
                 int64_t ldy) {
  __m512 acc[R], offsets[R];
  for (int r = 0; r < R; ++r) acc[r] = offsets[r] = _mm512_setzero_ps();
  const uint8_t* w1 = w + nb * Q4_BLOCK_BYTES;
  for (int64_t b = 0; b < nb; ++b) {
    for (const uint8_t* g : {w, w1}) {
      const char* ahead = reinterpret_cast<const char*>(g + b * Q4_BLOCK_BYTES + PREFETCH);
      for (int line = 0; line < Q4_BLOCK_BYTES; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    q4_block16<R>(w + b * Q4_BLOCK_BYTES, w1 + b * Q4_BLOCK_BYTES, q, d, sums, K, nb, b, acc, offsets);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, _mm512_add_ps(acc[r], offsets[r]));
}

// A transpose in each half of 16 lanes, of 32 bits: v[r] lane j -> v[j] lane r, and v[r] lane 8 + j -> v[j]
// lane 8 + r. Within 128-bit lanes, then across them by interleaving the 128-bit lanes of two vectors (vpermt2q).
inline void transpose_16x8(__m512i* v) {
  const __m512i low_lanes = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i high_lanes = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  __m512i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm512_permutex2var_epi64(u[j], low_lanes, u[j + 4]);
    v[j + 4] = _mm512_permutex2var_epi64(u[j], high_lanes, u[j + 4]);
  }
}

// Sixteen int8 outputs for R rows, from the weight as stored: each block of the sixteen outputs' rows is
// transposed in registers (q8_packed's layout, lanes 0-7 outputs n..n + 7 and 8-15 n + 8..n + 15) and
// made unsigned (w + 128), so that VNNI multiplies it with the row's signed inputs broadcast, as int4's
// blocks. The 128 * sum(q) that this adds to each block's sums is taken away there, in integers (the sums
// start from minus offsets), as q8_packed does: they stay exact (at most 32 * 128 * 127 in magnitude),
// where taking d * 128 * sum(q) over all blocks away once, at the end, from the float sums would leave a
// block with a huge input, and so a huge d, its rounding error in every output.
template <int R>
void q8_outputs16(const int8_t* w, const float* scale, const int8_t* q, const float* d, const int32_t* offsets,
                  int64_t K, int64_t nb, float* y, int64_t ldy) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const char* next = reinterpret_cast<const char*>(w + 16 * K);
  for (int64_t b = 0; b < nb; ++b) {
    for (int line = 0; line < 16 * QK; line += 64) _mm_prefetch(next + b * 16 * QK + line, _MM_HINT_T0);
    // v[r]: output r's block in lanes 0-7, output r + 8's in lanes 8-15
    __m512i v[8];
    for (int r = 0; r < 8; ++r) v[r] = join32(w + r * K + b * QK, w + (r + 8) * K + b * QK);
    transpose_16x8(v);
    for (int j = 0; j < 8; ++j) v[j] = _mm512_xor_si512(v[j], flip);
    for (int r = 0; r < R; ++r) {
      const __m512i dot = dot16(v, q + r * K + b * QK, _mm512_set1_epi32(-offsets[r * nb + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(d[r * nb + b]), acc[r]);
    }
  }
  const __m512 s16 = _mm512_loadu_ps(scale);
  for (int r = 0; r < R; ++r)
    _mm512_storeu_ps(y + r * ldy, _mm512_mul_ps(acc[r], s16));
}
#endif

// ---------------------------------------------------------------------------------------------------------
// O outputs for R rows of a float32, bfloat16 or float16 weight: each 8 weights, converted to float32 in
// registers, multiply-add with every row's 8 inputs. (Where the CPU has no bfloat16 instructions, PyTorch's
// products of such weights run at the same few GFLOP/s whatever the rows; its float32 products of a decode
// step's few rows gained little from a second thread, at about half the memory's speed for one row and a
// fifth for 2 to 8: BENCHMARKS.md.) A multiply-add waits on the one before into the same sums for several
// cycles, so a pass keeps at least about eight sets of sums going: one row two per output, two rows two per
// output and row, more rows one per output and row. Several rows take two outputs at a time (each row's
// inputs loaded once for both), whose sums fill twelve of the sixteen vector registers at six rows. Measured
// on an AVX2 machine (BENCHMARKS.md): a decode step's products took 15-29% less time at 2 to 8 rows than one
// output at a time, and one row as long.

constexpr int FLOAT_MAX_ROWS = 6, FLOAT_OUTPUTS = 2;

// 8 numbers from p as floats: float32, bfloat16 or float16 (the weights here, the KV cache in the attention)
template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, at::BFloat16>)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // the float's top half
    else
      return _mm256_cvtph_ps(h);
  }
}

// w: the first of O weight rows, which lie one after another in memory
template <int O, int R, typename W>
void float_output(const W* w, const float* x, int64_t K, float* y, int64_t ldy) {
  constexpr int U = R <= 2 ? 2 : 1;
  __m256 acc[U][O][R];
  for (int u = 0; u < U; ++u)
    for (int o = 0; o < O; ++o)
      for (int r = 0; r < R; ++r) acc[u][o][r] = _mm256_setzero_ps();
  auto step = [&](int64_t k, int u) {
    __m256 wv[O];
    for (int o = 0; o < O; ++o) wv[o] = load8(w + o * K + k);
    for (int r = 0; r < R; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * K + k);
      // in a register, read once for all O outputs (else the compiler reads it again for each)
      if constexpr (R > 1) __asm__("" : "+x"(xv));
      for (int o = 0; o < O; ++o) acc[u][o][r] = _mm256_fmadd_ps(wv[o], xv, acc[u][o][r]);
    }
  };
  // The O rows are read side by side, so the memory they span is used up O lines at a time: the prefetches
  // run PREFETCH bytes past the last row's position at that speed, into the next outputs' rows, as one
  // row's run past its own. (Ahead of each row on its own, they would ask for lines that the pass is
  // about to read anyway: several rows then took as long as one output at a time.) One row prefetches
  // every 32 bytes, as measured best for it (float32 too: every line took 1.05x the time); more rows every
  // line. A pass between prefetches covers at least 16 numbers, so that one row's two sets of sums alternate.
  constexpr int64_t AHEAD_STEP = R == 1 ? 32 : 64;
  constexpr int64_t AHEAD_EVERY = std::max<int64_t>(AHEAD_STEP / sizeof(W), 16);
  const char* ahead = reinterpret_cast<const char*>(w + (O - 1) * K) + PREFETCH;
  int64_t k = 0;
  for (; k + AHEAD_EVERY <= K; k += AHEAD_EVERY) {
    for (int64_t b = 0; b < O * AHEAD_EVERY * int64_t(sizeof(W)); b += AHEAD_STEP)
      _mm_prefetch(ahead + O * k * sizeof(W) + b, _MM_HINT_T0);
    if constexpr (R == 1)  // a line at a time, through the O rows side by side as the lines above
      if (O * k % (64 / sizeof(W)) == 0) prefetch_farther(ahead + O * k * sizeof(W));
    for (int j = 0; j < AHEAD_EVERY / 8; ++j) step(k + 8 * j, j % U);
  }
  for (; k + 8 <= K; k += 8) step(k, 0);
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) {
      for (int u = 1; u < U; ++u) acc[0][o][r] = _mm256_add_ps(acc[0][o][r], acc[u][o][r]);
      float sum = hsum(acc[0][o][r]);
      for (int64_t i = k; i < K; ++i) sum += static_cast<float>(w[o * K + i]) * x[r * K + i];
      y[r * ldy + o] = sum;
    }
}

#ifdef HAVE_AVX512
// 16 numbers from p as floats: float32, bfloat16 or float16
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<T, at::BFloat16>)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else
      return _mm512_cvtph_ps(h);
  }
}

// float_output for several rows in 512-bit vectors: several rows are bound by the multiply-adds, and these
// do twice as many an instruction; with 32 registers, up to eight rows' sums of two outputs at once
// (WIDE_ROWS). Prefetched as float_output's several rows are.
template <int O, int R, typename W>
void float_output16(const W* w, const float* x, int64_t K, float* y, int64_t ldy) {
  __m512 acc[O][R];
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) acc[o][r] = _mm512_setzero_ps();
  auto step = [&](int64_t k) {
    __m512 wv[O];
    for (int o = 0; o < O; ++o) wv[o] = load16(w + o * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + k);
      for (int o = 0; o < O; ++o) acc[o][r] = _mm512_fmadd_ps(wv[o], xv, acc[o][r]);
    }
  };
  constexpr int64_t AHEAD_EVERY = 64 / sizeof(W);
  const char* ahead = reinterpret_cast<const char*>(w + (O - 1) * K) + PREFETCH;
  int64_t k = 0;
  for (; k + AHEAD_EVERY <= K; k += AHEAD_EVERY) {
    for (int o = 0; o < O; ++o) _mm_prefetch(ahead + (O * k + o * AHEAD_EVERY) * sizeof(W), _MM_HINT_T0);
    for (int j = 0; j < AHEAD_EVERY; j += 16) step(k + j);
  }
  for (; k + 16 <= K; k += 16) step(k);
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) {
      float sum = _mm512_reduce_add_ps(acc[o][r]);
      for (int64_t i = k; i < K; ++i) sum += static_cast<float>(w[o * K + i]) * x[r * K + i];
      y[r * ldy + o] = sum;
    }
}
#endif

// ---------------------------------------------------------------------------------------------------------
// Attention of a few query rows (a decode or verify step) over a KV cache: for each batch row, head and
// query row, the scores of every key, their softmax, and the weighted sum of the values, in float32. Inductor
// compiles the same sums into loops that took about a seventh of a bfloat16 decode step at batch 8
// (BENCHMARKS.md); here the scores come several keys at a time, added across lanes in one pass, and the
// values' sums stay in registers. Query rows that share a head go up to ATTEND_ROWS at a time, so that each
// key and value is read and converted once for all of them: a decode step's three query heads per
// key/value head (model.py stacks them as rows), a verify step's rows. With AVX-512, heads of a multiple of 32
// go through attend16, in vectors twice as wide.

// v's 8 floats into p as T, rounded to nearest even as PyTorch's conversions round (NaN stays NaN)
template <typename T>
inline void store8(T* p, __m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(p, v);
  } else if constexpr (std::is_same_v<T, at::Half>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    top = _mm256_blendv_epi8(top, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // 8 int32 of 16 bits each -> 8 uint16 (packing works within 128-bit lanes: the low lane's four come first)
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
}

// e^x in each lane (x <= 0 here, after the maximum is taken away): 2^n * e^r, r = x - n ln 2 in
// [-ln 2 / 2, ln 2 / 2], e^r by its Taylor polynomial to degree 6 (relative error about 2e-7)
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln 2 in two parts, for precision
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// 8 vectors -> one vector of their 8 sums, in order
inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// 4 vectors -> their 4 sums, in order
inline __m128 hsum4(const __m256* a) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// Sets of sums: scores for R rows of KEYS keys, value sums for R rows of V vectors: at most twelve, so that
// they, the row's weights and one vector of values fit the sixteen vector registers (one more spilled a sum
// to memory in the values' loop, which then ran at the speed of storing and reloading it), and at least
// eight, so that enough multiply-adds are in flight.
constexpr int ATTEND_ROWS = 3;
// keys ahead to prefetch: 8, 16 and 32 within a few percent of each other, a fifth to a quarter off a decode
// step's attention (BENCHMARKS.md)
constexpr int ATTEND_AHEAD = 8;
// Where a step's heads do not divide among the threads, its keys are split into parts of at least these many
// (few_query_attention; at 151 keys, two parts took less time than one: BENCHMARKS.md; shorter parts were
// not measured), into at most ATTEND_MAX_PARTS
constexpr int64_t ATTEND_PART_KEYS = 64, ATTEND_MAX_PARTS = 64;

// The cache's rows come from memory (a step's weights have passed through the caches since this layer's
// last step): the first ATTEND_AHEAD keys at once, then (keys()) keys that far ahead and the values of the
// keys being scored, which the weighted sums read next. Its loops are inlined by force: GCC's own choice
// left the attention taking 1.2-1.6 times as long as with the same loops written in place.
template <typename T>
class CacheAhead {
 public:
  CacheAhead(const T* k, const T* v, int64_t L, int64_t D, int64_t ldk, int64_t ldv)
      : k_(k), v_(v), ldk_(ldk), ldv_(ldv), bytes_(D * static_cast<int64_t>(sizeof(T))) {
    for (int64_t j = 0; j < std::min<int64_t>(ATTEND_AHEAD, L); ++j) row(k + j * ldk);
  }
  // for the n keys from l on, whose scores come next
  __attribute__((always_inline)) void keys(int64_t l, int n) const {
    for (int j = 0; j < n; ++j) {
      row(k_ + (l + j + ATTEND_AHEAD) * ldk_);
      row(v_ + (l + j) * ldv_);
    }
  }

 private:
  __attribute__((always_inline)) void row(const T* p) const {
    for (int64_t b = 0; b < bytes_; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
  }
  const T *k_, *v_;
  int64_t ldk_, ldv_, bytes_;
};

// whether key l has a weight in any of R rows of w (ldw apart): keys masked for every row are never read (a
// slot past the text may hold anything). Tested on the weights' bits, in general registers: the vector ones
// all hold sums.
template <int R>
inline bool weighed(const float* w, int64_t ldw, int64_t l) {
  uint32_t any = 0;
  for (int r = 0; r < R; ++r) {
    uint32_t bits;
    std::memcpy(&bits, w + r * ldw + l, 4);
    any |= bits << 1;  // 0 for 0.f and -0.f
  }
  return any;
}

// R rows of D sums, each times its inv[r], to out (rows ldo apart) as O
template <int R, typename O>
inline void store_rows(const float* sums, int64_t D, const float* inv, O* out, int64_t ldo) {
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; d += 8)
      store8(out + r * ldo + d, _mm256_mul_ps(_mm256_loadu_ps(sums + r * D + d), _mm256_set1_ps(inv[r])));
}

// out[r][j] = sum over keys l of w[r][l] * v[l * ldv + j], for j < 8 * V; w's rows ldw apart
template <int R, int V, typename T>
inline void weighted_sum(const float* w, int64_t ldw, const T* v, int64_t L, int64_t ldv, float* out, int64_t ldo) {
  __m256 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t l = 0; l < L; ++l) {
    if (!weighed<R>(w, ldw, l)) continue;
    __m256 wl[R];
    for (int r = 0; r < R; ++r) wl[r] = _mm256_set1_ps(w[r * ldw + l]);
    for (int j = 0; j < V; ++j) {  // one vector of values at a time: with R * V sums, the registers run out
      const __m256 vj = load8(v + l * ldv + 8 * j);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(wl[r], vj, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) _mm256_storeu_ps(out + r * ldo + 8 * j, acc[r][j]);
}

// Each of R rows' softmax over its L scores (rows masks[r], or none: attend's), in place; its sum's inverse
// to inv[r]. Rows with nothing to attend to come out 0. With stats: attend's.
template <int R>
void softmax_rows(float* scores, int64_t L, const bool* const* masks, int64_t mask_step, float* stats, float* inv) {
  int64_t l;
  for (int r = 0; r < R; ++r) {
    float* s = scores + r * L;
    const bool* mask = masks ? masks[r] : nullptr;
    __m256 max8 = _mm256_set1_ps(-INFINITY);
    l = 0;
    if (!mask || mask_step == 1)  // 8 keys at a time: their mask's 8 bytes
      for (; l + 8 <= L; l += 8) {
        __m256 x = _mm256_loadu_ps(s + l);
        if (mask) {
          int64_t bytes;
          std::memcpy(&bytes, mask + l, 8);
          const __m256i flags = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
          const __m256i off = _mm256_cmpeq_epi32(flags, _mm256_setzero_si256());
          x = _mm256_blendv_ps(x, _mm256_set1_ps(-INFINITY), _mm256_castsi256_ps(off));
          _mm256_storeu_ps(s + l, x);
        }
        max8 = _mm256_max_ps(max8, x);
      }
    float max = hmax(max8);
    for (; l < L; ++l) {
      if (mask && !mask[l * mask_step]) s[l] = -INFINITY;
      max = std::max(max, s[l]);
    }
    if (stats) stats[2 * r] = max, stats[2 * r + 1] = 0.f;
    if (max == -INFINITY) {
      std::fill(s, s + L, 0.f);
      inv[r] = 0.f;
      continue;
    }
    __m256 total = _mm256_setzero_ps();
    const __m256 top = _mm256_set1_ps(max);
    for (l = 0; l + 8 <= L; l += 8) {
      const __m256 x = _mm256_loadu_ps(s + l);
      // masked keys (-inf) exactly 0
      const __m256 kept = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(x, top)), kept);
      _mm256_storeu_ps(s + l, e);
      total = _mm256_add_ps(total, e);
    }
    float sum = hsum(total);
    for (; l < L; ++l) sum += s[l] = s[l] == -INFINITY ? 0.f : std::exp(s[l] - max);
    inv[r] = 1.f / sum;
    if (stats) stats[2 * r + 1] = sum;
  }
}

// R query rows q [R, D] (rows ldq apart) over keys k, values v [L, D] (rows ldk, ldv apart), row r's mask
// at masks[r] (or none; L entries mask_step apart) -> out [R, D] (rows ldo apart), as O. scores: R * L
// floats; qf: R * D. With stats, each row's largest score and the sum of its exponentials go to
// stats[2r] and stats[2r + 1], for combining this part of the keys with the others' (few_query_attention).
template <int R, typename T, typename O>
void attend(const T* q, int64_t ldq, const T* k, const T* v, int64_t L, int64_t D, int64_t ldk, int64_t ldv,
            const bool* const* masks, int64_t mask_step, float scale, O* out, int64_t ldo, float* stats,
            float* scores, float* qf) {
  const __m256 scale8 = _mm256_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(qf + r * D + d, _mm256_mul_ps(load8(q + r * ldq + d), scale8));
  constexpr int KEYS = R == 1 ? 8 : 4;
  const CacheAhead<T> ahead(k, v, L, D, ldk, ldv);
  int64_t l = 0;
  for (; l + KEYS <= L; l += KEYS) {
    ahead.keys(l, KEYS);
    __m256 acc[R][KEYS];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < KEYS; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8)
      for (int j = 0; j < KEYS; ++j) {
        const __m256 kv = load8(k + (l + j) * ldk + d);
        for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + r * D + d), kv, acc[r][j]);
      }
    for (int r = 0; r < R; ++r) {
      if constexpr (KEYS == 8)
        _mm256_storeu_ps(scores + r * L + l, hsum8(acc[r]));
      else
        _mm_storeu_ps(scores + r * L + l, hsum4(acc[r]));
    }
  }
  for (; l < L; ++l)
    for (int r = 0; r < R; ++r) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qf + r * D + d), load8(k + l * ldk + d), acc);
      scores[r * L + l] = hsum(acc);
    }
  float inv[R];
  softmax_rows<R>(scores, L, masks, mask_step, stats, inv);
  float* sums = qf;  // q's floats are no longer needed: they become the output's
  constexpr int V = std::min(8, 12 / R);
  for (int64_t d0 = 0; d0 < D; d0 += 8 * V) {
    as_constant<V>(std::min<int64_t>(D - d0, 8 * V) / 8, [&](auto W) {
      weighted_sum<R, decltype(W)::value>(scores, L, v + d0, L, ldv, sums + d0, D);
    });
  }
  store_rows<R>(sums, D, inv, out, ldo);
}

#ifdef HAVE_AVX512
// attend in 512-bit vectors: half the multiply-adds, and for bfloat16 caches (a decode step's usual) a
// quarter of the conversions. The cache's rows are read a line (32 bfloat16 numbers) at a time, which
// become two vectors of floats in one operation each, not in order: the even-numbered numbers (each 32-bit
// lane's low half, shifted up) and the odd-numbered ones (the high half, as it lies). The query rows are
// put in that order too, so their scores come out as they are; the values' sums come out in it, and are
// put back in order once a call (store32_in_order). Decode steps at batch 8 and at long contexts took less
// time this way, short batch-1 ones about the same (BENCHMARKS.md).

// 32 numbers at p as floats in two vectors (a, b): for bfloat16, the even- then odd-numbered ones
template <typename T>
inline void load32_floats(const T* p, __m512& a, __m512& b) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512i x = _mm512_loadu_si512(p);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else if constexpr (std::is_same_v<T, float>) {
    a = _mm512_loadu_ps(p);
    b = _mm512_loadu_ps(p + 16);
  } else {
    a = load16(p);
    b = load16(p + 16);
  }
}

// 32 floats in load32_floats's order for T (a, b) back in order, to p
template <typename T>
inline void store32_in_order(float* p, __m512 a, __m512 b) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512 first = _mm512_permutex2var_ps(a, low, b);
    b = _mm512_permutex2var_ps(a, high, b);
    a = first;
  }
  _mm512_storeu_ps(p, a);
  _mm512_storeu_ps(p + 16, b);
}

// 8 vectors -> their 8 sums, in order: pairs of vectors into one (a half each), twice, then within the
// 128-bit lanes
inline __m256 hsum8_wide(const __m512* a) {
  __m512 c[4], e[2];
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)  // 128-bit lane j of e[i]: key 4i + j's four sums
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane j: key j's two sums, key 4 + j's two
  const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 g = _mm512_add_ps(f, _mm512_shuffle_ps(f, f, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, g));
}

// attend's sums in 512-bit vectors, KEYS keys' scores at a time (R * KEYS sums of the 32 registers); the same
// arguments, D a multiple of 32
template <int R, typename T, typename O>
void attend16(const T* q, int64_t ldq, const T* k, const T* v, int64_t L, int64_t D, int64_t ldk, int64_t ldv,
              const bool* const* masks, int64_t mask_step, float scale, O* out, int64_t ldo, float* stats,
              float* scores, float* qf) {
  const __m512 scale16 = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; d += 32) {
      __m512 a, b;
      load32_floats(q + r * ldq + d, a, b);
      _mm512_storeu_ps(qf + r * D + d, _mm512_mul_ps(a, scale16));
      _mm512_storeu_ps(qf + r * D + d + 16, _mm512_mul_ps(b, scale16));
    }
  constexpr int KEYS = 8;
  const CacheAhead<T> ahead(k, v, L, D, ldk, ldv);
  int64_t l = 0;
  for (; l + KEYS <= L; l += KEYS) {
    ahead.keys(l, KEYS);
    __m512 acc[R][KEYS];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < KEYS; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32)
#pragma GCC unroll 8
      for (int j = 0; j < KEYS; ++j) {
        __m512 a, b;
        load32_floats(k + (l + j) * ldk + d, a, b);
#pragma GCC unroll 3
        for (int r = 0; r < R; ++r) {
          acc[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + r * D + d), a, acc[r][j]);
          acc[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + r * D + d + 16), b, acc[r][j]);
        }
      }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(scores + r * L + l, hsum8_wide(acc[r]));
  }
  for (; l < L; ++l)
    for (int r = 0; r < R; ++r) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 32) {
        __m512 a, b;
        load32_floats(k + l * ldk + d, a, b);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + r * D + d), a, acc);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + r * D + d + 16), b, acc);
      }
      scores[r * L + l] = _mm512_reduce_add_ps(acc);
    }
  float inv[R];
  softmax_rows<R>(scores, L, masks, mask_step, stats, inv);
  // the values' sums, 32 numbers of each row at a time: up to four such (R * 8 sums in registers)
  constexpr int64_t STEP = 128;
  for (int64_t d0 = 0; d0 < D; d0 += STEP) {
    const int64_t chunks = std::min<int64_t>(D - d0, STEP) / 32;
    as_constant<STEP / 32>(chunks, [&](auto C) {
      constexpr int N = decltype(C)::value;
      __m512 acc[R][2 * N];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 2 * N; ++j) acc[r][j] = _mm512_setzero_ps();
      for (int64_t key = 0; key < L; ++key) {
        if (!weighed<R>(scores, L, key)) continue;
        __m512 w[R];
        for (int r = 0; r < R; ++r) w[r] = _mm512_set1_ps(scores[r * L + key]);
        for (int c = 0; c < N; ++c) {
          __m512 a, b;
          load32_floats(v + key * ldv + d0 + 32 * c, a, b);
          for (int r = 0; r < R; ++r) {
            acc[r][2 * c] = _mm512_fmadd_ps(w[r], a, acc[r][2 * c]);
            acc[r][2 * c + 1] = _mm512_fmadd_ps(w[r], b, acc[r][2 * c + 1]);
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < N; ++c) store32_in_order<T>(qf + r * D + d0 + 32 * c, acc[r][2 * c], acc[r][2 * c + 1]);
    });
  }
  store_rows<R>(qf, D, inv, out, ldo);
}
#endif

// ---------------------------------------------------------------------------------------------------------
// The ops: outputs split among PyTorch's threads, WIDTH at a time (the int4 product's eight at once,
// float_linear's two, or one); for each, the activation rows MAX_ROWS at a time (FLOAT_MAX_ROWS for
// float_linear).
//
// Each thread starts on its own run of the outputs (at::parallel_for's equal shares, so that each reads one
// stretch of the weight, prefetches included) and, done with it, takes what is left of another's from its
// far end. The two cores of these shared machines often run the same work at speeds a tenth to a third
// apart, so that with fixed shares one waited for the other at the end of every product: an eighth of both
// threads' time in a batch-8 int4 step on an Intel Xeon (BENCHMARKS.md). A share is taken in pieces, an
// eighth of what remains from the front by its own thread, half from the back by another, so that the last
// piece is short and claims are few (one atomic word per share, on a cache line of its own).
//
// With activations a, the rows are rounded first: by the calling thread for one row; for several, in the
// same parallel region as the products, each thread its share of the rows, then a barrier. Rounding eight
// rows on one thread left the other waiting a few microseconds at each of a step's hundred and more
// products, and read half of the rows from the other core's cache, where the step's last loop (split by
// rows as well) had written them (BENCHMARKS.md).
class Shares {
 public:
  Shares(int64_t units, int64_t n) : shares_(n) {
    for (int64_t t = 0; t < n; ++t) shares_[t].range.store(pack(units * t / n, units * (t + 1) / n));
  }
  // units [begin, end) of share t: its front's, by its own thread, or its back's, by another; false once
  // the share is used up
  bool take(int64_t t, bool own, int64_t& begin, int64_t& end) {
    std::atomic<uint64_t>& range = shares_[t].range;
    uint64_t r = range.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t front = r & 0xffffffffu, back = r >> 32;
      if (front >= back) return false;
      const uint64_t split = own ? front + std::max<uint64_t>((back - front) / 8, 1)
                                 : back - std::max<uint64_t>((back - front) / 2, 1);
      if (range.compare_exchange_weak(r, own ? pack(split, back) : pack(front, split), std::memory_order_relaxed)) {
        begin = own ? front : split;
        end = own ? split : back;
        return true;
      }
    }
  }
  // f(begin, end) over thread t's share, then over what is left of the others' (all of them: a parallel
  // region may have fewer threads than shares)
  template <typename F>
  void work(int64_t t, F&& f) {
    const int64_t n = static_cast<int64_t>(shares_.size());
    int64_t begin, end;
    while (take(t, true, begin, end)) f(begin, end);
    for (int64_t other = 1; other < n; ++other)
      while (take((t + other) % n, false, begin, end)) f(begin, end);
  }

 private:
  static uint64_t pack(uint64_t front, uint64_t back) { return front | back << 32; }  // units < 2^32
  struct alignas(64) Share {
    std::atomic<uint64_t> range;  // [front, back)
  };
  std::vector<Share> shares_;
};

// ---------------------------------------------------------------------------------------------------------
// A team: PyTorch's threads held in one parallel region for a whole compiled decode step (nimblelm_team_run).
// The calling thread (0) runs the step; the products and the attention it calls hand the other threads
// their shares through the team (Team::run) rather than opening a region each. Between those jobs the
// other threads are otherwise idle while the calling thread runs the norms, RoPE, SiLU and the compiled
// library's calls, and so is the memory: a batch-1 step of an int8 model spends about an eighth of its time
// there (BENCHMARKS.md). So each helper then reads ahead, into its own caches, the part of the next
// product's weight that it will take first (its share's front: Shares), and takes it from there when the
// product comes. What comes next is learned: each helper keeps, for each weight it has worked on, where its
// share of the weight after it began the last time (TeamMemory, kept by the caller from step to step).

struct Stream {  // a job's weight, for the read-ahead: its bytes, split among the threads as its units are
  const char* base = nullptr;
  int64_t bytes = 0;
};

struct TeamMemory {
  struct alignas(64) Helper {
    std::unordered_map<const char*, Stream> next;  // a weight -> this helper's share of the weight after it
    const char* last = nullptr;                      // the weight of this helper's last job that had one
  };
  std::vector<Helper> helpers;  // by thread
  std::mutex busy;              // one team at a time
};

class Team {
 public:
  // bytes read ahead at most: well within a core's second-level cache (512 KiB to 2 MiB on x86 servers).
  // (The time between products bounds it more: 128 KiB to 2 MiB gave the same steps on an Intel Xeon.)
  static constexpr int64_t READ_AHEAD = 256 << 10;

  Team(int64_t n, TeamMemory& memory) : n_(n), memory_(memory) {
    if (static_cast<int64_t>(memory.helpers.size()) < n) memory.helpers.resize(n);
  }
  int64_t size() const { return n_; }

  // body(t) on threads t = 0 .. threads - 1 (threads <= size()), 0 the calling thread's, and back when all
  // are done
  template <typename Body>
  void run(int64_t threads, Body& body, Stream stream) {
    job_ = {[](void* b, int64_t t) { (*static_cast<Body*>(b))(t); }, &body, threads, stream};
    done_.store(0, std::memory_order_relaxed);
    arrived_.store(0, std::memory_order_relaxed);
    posted_.fetch_add(1, std::memory_order_release);
    body(0);
    while (done_.load(std::memory_order_acquire) < n_ - 1) _mm_pause();
  }
  // within a job's body: wait for all its threads to have come here
  void barrier(int64_t threads) {
    arrived_.fetch_add(1, std::memory_order_acq_rel);
    while (arrived_.load(std::memory_order_acquire) < threads) _mm_pause();
  }
  void stop() { stop_.store(true, std::memory_order_release); }

  // thread t > 0: the jobs, and between them the read-ahead, until stop()
  void serve(int64_t t) {
    TeamMemory::Helper& self = memory_.helpers[t];
    uint64_t seen = 0;
    Stream ahead;  // what is left to read ahead
    uint32_t sum = 0;
    for (;;) {
      const uint64_t posted = posted_.load(std::memory_order_acquire);
      if (posted == seen) {
        if (stop_.load(std::memory_order_acquire)) break;
        if (ahead.bytes <= 0) {
          _mm_pause();
          continue;
        }
        const int64_t n = std::min<int64_t>(ahead.bytes, 4096);  // a byte a line, a page between looks for a job
        for (int64_t i = 0; i < n; i += 64) sum += static_cast<unsigned char>(ahead.base[i]);
        ahead.base += n;
        ahead.bytes -= n;
        continue;
      }
      seen = posted;
      const Job job = job_;
      if (t < job.threads) job.run(job.body, t);
      done_.fetch_add(1, std::memory_order_release);
      if (job.stream.base) {
        if (t < job.threads) {
          const int64_t begin = job.stream.bytes * t / job.threads / 64 * 64;
          const int64_t end = job.stream.bytes * (t + 1) / job.threads;
          if (self.last) self.next[self.last] = {job.stream.base + begin, std::min(end - begin, READ_AHEAD)};
          self.last = job.stream.base;
        }
        const auto next = self.next.find(job.stream.base);
        ahead = next == self.next.end() ? Stream() : next->second;
      }
    }
    sum_.fetch_add(sum, std::memory_order_relaxed);  // (kept, so that the reads are not left out)
  }

  static thread_local Team* current;  // the team whose step this thread runs, if any

 private:
  struct Job {
    void (*run)(void*, int64_t);
    void* body;
    int64_t threads;
    Stream stream;
  };
  const int64_t n_;
  TeamMemory& memory_;
  Job job_{};
  alignas(64) std::atomic<uint64_t> posted_{0};  // jobs posted so far
  alignas(64) std::atomic<int64_t> done_{0};     // helpers done with the last
  alignas(64) std::atomic<int64_t> arrived_{0};  // threads at its barrier
  alignas(64) std::atomic<bool> stop_{false};
  std::atomic<uint32_t> sum_{0};
};
thread_local Team* Team::current = nullptr;

// The ops' outputs, in the steps that decode.ExportedStep compiles, kept by the thread that made them for its
// later calls of the same shape. Such a step makes some 150 outputs of a few shapes and drops each within
// the step; making each anew (PyTorch's dispatcher, the heap, a TensorImpl and its storage, all out of the
// caches that the weights' reads have just swept) took 1-2% of a step (BENCHMARKS.md). A kept output is
// handed out again only where nothing else holds it, its storage or a weak reference to it. The step's
// own outputs go on to Python, which then holds them: those are let go at the next call of their shape,
// and never at the thread's end (the interpreter may be finishing then: they are left to the process).
// Calls through PyTorch's dispatcher keep nothing (KeepOutputs): their outputs are Python's at once.
class KeptOutputs {
 public:
  at::Tensor get(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const at::ScalarType dtype = options.dtype().toScalarType();
    Kept* place = nullptr;
    for (Kept& k : kept_) {
      if (!k.t.defined()) {
        place = place ? place : &k;
        continue;
      }
      if (k.dtype != dtype || at::IntArrayRef(k.sizes) != sizes) continue;
      if (idle(k.t, sizes)) return k.t;
      if (k.t.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj()) {  // Python's now
        k.t.reset();
        place = place ? place : &k;
      }
    }
    at::Tensor t = at::empty(sizes, options);
    if (t.nbytes() > MAX_BYTES) return t;
    if (!place && kept_.size() < MAX_KEPT) place = &kept_.emplace_back();
    if (!place) place = &kept_[next_++ % MAX_KEPT];  // the places in turn, held or not
    *place = {t, dtype, c10::SmallVector<int64_t, 4>(sizes.begin(), sizes.end())};
    return t;
  }
  ~KeptOutputs() {
    for (Kept& k : kept_)
      if (k.t.defined() && k.t.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj()) (void)k.t.unsafeReleaseTensorImpl();
  }

 private:
  static constexpr size_t MAX_KEPT = 16, MAX_BYTES = size_t(1) << 20;
  // held by nothing else; as it was made (no one has restrided it or its storage in place, nor given it an
  // autograd history); and an inference tensor just where at::empty would make one now
  static bool idle(const at::Tensor& t, at::IntArrayRef sizes) {
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    const c10::Storage& storage = impl->storage();
    return t.use_count() == 1 && t.weak_use_count() == 1 && storage.use_count() == 1 && t.sizes() == sizes &&
           t.is_contiguous() && t.storage_offset() == 0 && storage.nbytes() >= t.nbytes() &&
           impl->autograd_meta() == nullptr && t.is_inference() == c10::InferenceMode::is_enabled();
  }
  struct Kept {  // (its dtype and sizes copied here: looking for a shape reads no TensorImpl out of memory)
    at::Tensor t;
    at::ScalarType dtype;
    c10::SmallVector<int64_t, 4> sizes;
  };
  std::vector<Kept> kept_;
  size_t next_ = 0;
};

thread_local bool keep_outputs = false;  // in a call from a compiled step's library (KeepOutputs)

struct KeepOutputs {  // for the ops' C entry points' calls
  const bool before = keep_outputs;
  KeepOutputs() { keep_outputs = true; }
  ~KeepOutputs() { keep_outputs = before; }
};

// an op's output: uninitialized, contiguous
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!keep_outputs) return at::empty(sizes, options);
  thread_local KeptOutputs kept;
  return kept.get(sizes, options);
}

// the threads an op may split its work among: its team's, else PyTorch's
int64_t available_threads() { return Team::current ? Team::current->size() : at::get_num_threads(); }

// f(begin, end) over units [0, units), on up to a thread per grain units, taking from each other's shares:
// through the calling thread's team where it has one (stream: the weight the units read, for the team's
// read-ahead), else in a parallel region of their own; where there is one thread, or the caller is in a
// parallel region already, through at::parallel_for. With first, each thread runs first(t, n) (of n
// threads) before any units, and waits for the others to have.
template <typename F, typename First = std::nullptr_t>
void parallel_shares(int64_t units, int64_t grain, F&& f, First&& first = nullptr, Stream stream = {}) {
  constexpr bool has_first = !std::is_same_v<std::decay_t<First>, std::nullptr_t>;
  Team* team = Team::current;
  const int64_t threads = std::min<int64_t>(available_threads(), (units + grain - 1) / grain);
  if (threads > 1 && (team || !at::in_parallel_region())) {
    Shares shares(units, threads);
    auto part = [&](int64_t t, int64_t n, auto&& wait) {  // thread t's, of n
      if constexpr (has_first) {
        first(t, n);
        wait();
      }
      shares.work(t, f);
    };
    if (team) {
      auto job = [&](int64_t t) { part(t, threads, [&] { team->barrier(threads); }); };
      team->run(threads, job, stream);
      return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    part(omp_get_thread_num(), omp_get_num_threads(), [] {
#pragma omp barrier
    });
    return;
#endif
  }
  if constexpr (has_first) first(0, 1);
  at::parallel_for(0, units, grain, f);
}

template <int ROWS, int WIDTH = 1, typename Output>
at::Tensor product(const at::Tensor& x, int64_t N, Output output, const at::Tensor& weight,
                   const Activations* a = nullptr) {
  const Stream stream{static_cast<const char*>(weight.data_ptr()), static_cast<int64_t>(weight.nbytes())};
  const int64_t M = x.size(0), units = (N + WIDTH - 1) / WIDTH, grain = std::max(16 / WIDTH, 1);
  at::Tensor y = new_output({M, N}, x.options());
  float* out = y.data_ptr<float>();
  auto outputs = [&](int64_t begin, int64_t end) {
    for (int64_t n = begin * WIDTH; n < std::min(end * WIDTH, N); n += WIDTH)
      for (int64_t m = 0; m < M; m += ROWS)
        // output(std::integral_constant<int, R>, n, ...) for the R rows from m on and the outputs from n on
        as_constant<ROWS>(std::min<int64_t>(M - m, ROWS), [&](auto R) { output(R, n, m, out + m * N + n, N); });
  };
  if (a && M > 1) {
    parallel_shares(units, grain, outputs, [&](int64_t t, int64_t n) { a->rows(M * t / n, M * (t + 1) / n); },
                    stream);
  } else {
    if (a) a->rows(0, M);  // one row (or none): the calling thread
    parallel_shares(units, grain, outputs, nullptr, stream);
  }
  return y;
}

void check_input(const at::Tensor& x, int64_t multiple = QK) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: a contiguous [M, K] float32");
  TORCH_CHECK(x.size(1) % multiple == 0, "K must be a multiple of ", multiple);
}

// Whether int8 weights are packed for q8_packed on this build: where there is neither AVX-512 nor VNNI
// (qlinear.py asks, through the C entry point nimblelm_q8_packs_weights).
#if defined(HAVE_AVX512) || defined(HAVE_VNNI)
constexpr bool Q8_PACKS_WEIGHTS = false;  // (VNNI's one instruction leaves less to save: not measured there)
#else
constexpr bool Q8_PACKS_WEIGHTS = true;
#endif

// weight: [N, K] int8 as stored, or packed ([N / 8, K / 32, 256] uint8: q8_packed)
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  check_input(x);
  const int64_t K = x.size(1), nb = K / QK, N = scales.numel();
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales: [N] float32");
  const float* sc = scales.data_ptr<float>();
  if (weight.scalar_type() == at::kByte) {
    TORCH_CHECK(weight.is_contiguous() && weight.dim() == 3 && N % Q8_OUTPUTS == 0 &&
                    weight.size(0) == N / Q8_OUTPUTS && weight.size(1) == nb && weight.size(2) == Q8_BLOCK_BYTES,
                "packed weight: a contiguous [N / 8, K / 32, 256] uint8");
    const Activations a = activations(x, Rounding::PACKED_INT8);
    const uint8_t* w = weight.data_ptr<uint8_t>();
    return product<MANY_ROWS, Q8_OUTPUTS>(x, N, [&](auto R, int64_t n, int64_t m, float* y, int64_t ldy) {
      q8_packed<decltype(R)::value>(w + n / Q8_OUTPUTS * nb * Q8_BLOCK_BYTES, sc + n, a.q + m * K, a.d + m * nb,
                                    a.offsets + m * nb, K, nb, y, ldy);
    }, weight, &a);
  }
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.dim() == 2 &&
                  weight.size(0) == N && weight.size(1) == K, "weight: a contiguous [N, K] int8");
#ifdef HAVE_AVX512
  const bool wide = x.size(0) > 1;  // sixteen outputs at once (q8_outputs16), which need the blocks' offsets
#else
  const bool wide = false;
#endif
  const Activations a = activations(x, wide ? Rounding::INT8_OFFSETS : Rounding::INT8);
  const int8_t *w = weight.data_ptr<int8_t>(), *q = a.q;
  const float* d = a.d;
  auto outputs = [&](auto R, int64_t n, int64_t m, float* y, int64_t ldy) {
    q8_output<decltype(R)::value>(w + n * K, sc[n], q + m * K, d + m * a.nb, K, a.nb, y, ldy);
  };
#ifdef HAVE_AVX512
  if (wide)
    return product<WIDE_ROWS, 16>(x, N, [&](auto R, int64_t n, int64_t m, float* y, int64_t ldy) {
      if (n + 16 <= N)
        q8_outputs16<decltype(R)::value>(w + n * K, sc + n, q + m * K, d + m * a.nb, a.offsets + m * a.nb, K, a.nb,
                                         y, ldy);
      else  // the last outputs, fewer than sixteen
        for (int64_t i = 0; n + i < N; ++i) outputs(R, n + i, m, y + i, ldy);
    }, weight, &a);
#endif
  return product<MAX_ROWS>(x, N, outputs, weight, &a);
}

// weight: [ceil(N / 8), K / 32, 160] bytes, qlinear.pack_int4_for_kernel's layout (top of this file)
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& weight, int64_t N) {
  check_input(x);
  const int64_t K = x.size(1), nb = K / QK;
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous() && weight.dim() == 3 &&
                  weight.size(0) == (N + Q4_OUTPUTS - 1) / Q4_OUTPUTS && weight.size(1) == nb &&
                  weight.size(2) == Q4_BLOCK_BYTES, "weight: a contiguous [ceil(N / 8), K / 32, 160] uint8");
  const Activations a = activations(x, Rounding::INT8_SUMS);
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const int8_t* q = a.q;
  const float *d = a.d, *sums = a.sums;
  // eight outputs from n on (the last eight of a layer may be fewer), for R rows from m on
  auto outputs = [&](auto R, int64_t n, int64_t m, float* y, int64_t ldy) {
    q4_output<decltype(R)::value>(w + n / Q4_OUTPUTS * nb * Q4_BLOCK_BYTES, q + m * K, d + m * nb, sums + m * nb, K,
                                  nb, y, ldy, static_cast<int>(std::min<int64_t>(N - n, Q4_OUTPUTS)));
  };
#ifdef HAVE_AVX512
  return product<WIDE_ROWS, 2 * Q4_OUTPUTS>(x, N, [&](auto R, int64_t n, int64_t m, float* y, int64_t ldy) {
    if (n + 2 * Q4_OUTPUTS <= N)
      return q4_output16<decltype(R)::value>(w + n / Q4_OUTPUTS * nb * Q4_BLOCK_BYTES, q + m * K, d + m * nb,
                                             sums + m * nb, K, nb, y, ldy);
    for (int64_t i = 0; n + i < N; i += Q4_OUTPUTS) outputs(R, n + i, m, y + i, ldy);  // the last, fewer than 16
  }, weight, &a);
#else
  return product<MANY_ROWS, Q4_OUTPUTS>(x, N, [&](auto R, int64_t n, int64_t m, float* y, int64_t ldy) {
    constexpr int rows = decltype(R)::value;
    if constexpr (rows <= MAX_ROWS)
      outputs(R, n, m, y, ldy);
    else
      q4_outputs_many<rows>(w + n / Q4_OUTPUTS * nb * Q4_BLOCK_BYTES, q + m * K, d + m * nb, sums + m * nb, K, nb,
                            y, ldy, static_cast<int>(std::min<int64_t>(N - n, Q4_OUTPUTS)));
  }, weight, &a);
#endif
}

// The int4 product's layout (top of this file) from our stored one: weight [N, K / 2] bytes, even input
// in the low nibble; scales and offsets [N, K / 32] float16. In one pass, at load and, when layers are
// streamed (offload.py), for every layer at every step.
at::Tensor q4_pack(const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& offsets) {
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous() && weight.dim() == 2 &&
                  weight.size(1) % (QK / 2) == 0, "weight: a contiguous [N, K / 2] uint8, K a multiple of 32");
  const int64_t N = weight.size(0), half_k = weight.size(1), nb = half_k / (QK / 2);
  for (const at::Tensor* t : {&scales, &offsets})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == N * nb,
                "scales, offsets: contiguous [N, K / 32] float16");
  const int64_t groups = (N + Q4_OUTPUTS - 1) / Q4_OUTPUTS;
  at::Tensor packed = at::empty({groups, nb, Q4_BLOCK_BYTES}, weight.options());
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const at::Half *s = scales.data_ptr<at::Half>(), *o = offsets.data_ptr<at::Half>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* values = out + (g * nb + b) * Q4_BLOCK_BYTES;
        at::Half* lanes = reinterpret_cast<at::Half*>(values + Q4_VALUE_BYTES);  // scales, then offsets
        for (int r = 0; r < Q4_OUTPUTS; ++r) {
          const int64_t n = g * Q4_OUTPUTS + r;
          // byte p of a block: inputs 2p (low nibble) and 2p + 1 (high); the first 8 bytes hold inputs
          // 0..15, the last 8 inputs 16..31. Input k pairs with input 16 + k in one byte, in order of k.
          uint64_t first = 0, last = 0;
          if (n < N) {
            std::memcpy(&first, w + n * half_k + b * (QK / 2), 8);
            std::memcpy(&last, w + n * half_k + b * (QK / 2) + 8, 8);
          }
          constexpr uint64_t low = 0x0F0F0F0F0F0F0F0FULL;
          const uint64_t even = (first & low) | ((last & low) << 4);          // inputs 2p and 16 + 2p
          const uint64_t odd = ((first >> 4) & low) | (last & ~low);          // inputs 2p + 1 and 17 + 2p
          const __m128i paired = _mm_unpacklo_epi8(_mm_cvtsi64_si128(static_cast<int64_t>(even)),
                                                   _mm_cvtsi64_si128(static_cast<int64_t>(odd)));
          alignas(16) uint8_t bytes[16];  // byte k: inputs k and 16 + k
          _mm_store_si128(reinterpret_cast<__m128i*>(bytes), paired);
          for (int j = 0; j < 4; ++j) std::memcpy(values + 32 * j + 4 * r, bytes + 4 * j, 4);
          lanes[r] = n < N ? s[n * nb + b] : at::Half(0.f);
          lanes[Q4_OUTPUTS + r] = n < N ? o[n * nb + b] : at::Half(0.f);
        }
      }
  });
  return packed;
}

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight) {
  check_input(x, 1);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const auto dtype = weight.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) && weight.is_contiguous() &&
                  weight.dim() == 2 && weight.size(1) == K, "weight: a contiguous [N, K] float32, bfloat16 or float16");
  const float* xp = x.data_ptr<float>();
  auto run = [&](auto* w) {
#ifdef HAVE_AVX512
    if (M > 1)
      return product<WIDE_ROWS, FLOAT_OUTPUTS>(x, N, [&](auto R, int64_t n, int64_t m, float* y, int64_t ldy) {
        constexpr int rows = decltype(R)::value;
        if (n + FLOAT_OUTPUTS <= N) return float_output16<FLOAT_OUTPUTS, rows>(w + n * K, xp + m * K, K, y, ldy);
        float_output16<1, rows>(w + n * K, xp + m * K, K, y, ldy);  // the last output, of an odd number
      }, weight);
#endif
    return product<FLOAT_MAX_ROWS, FLOAT_OUTPUTS>(x, N, [&](auto R, int64_t n, int64_t m, float* y, int64_t ldy) {
      constexpr int rows = decltype(R)::value;
      // one row (a decode step): one output at a time, whose rows of weights it reads in order
      if (M > 1 && n + FLOAT_OUTPUTS <= N) return float_output<FLOAT_OUTPUTS, rows>(w + n * K, xp + m * K, K, y, ldy);
      for (int64_t end = std::min(n + FLOAT_OUTPUTS, N); n < end; ++n, ++y)
        float_output<1, rows>(w + n * K, xp + m * K, K, y, ldy);
    }, weight);
  };
  if (dtype == at::kFloat) return run(weight.data_ptr<float>());
  if (dtype == at::kBFloat16) return run(weight.data_ptr<at::BFloat16>());
  return run(weight.data_ptr<at::Half>());
}


// query [B, H, S, D]; key, value [B, H, L, D], each row of D contiguous (a view of the KV cache); attn_mask
// bool (True attends), [B, H, S, L] or any of those 1, or none -> [B, H, S, D], query's dtype. Work is split among
// PyTorch's threads by batch row, head and ATTEND_ROWS query rows, and, where those do not divide among the
// threads, by parts of the keys; the threads take from each other's shares, as the products' do (Shares).
at::Tensor few_query_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                               const std::optional<at::Tensor>& attn_mask, double scale) {
  const at::Tensor q = query.contiguous();
  TORCH_CHECK(q.dim() == 4 && key.dim() == 4 && value.dim() == 4, "query, key, value: [B, H, S or L, D]");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), L = key.size(2);
  TORCH_CHECK(key.sizes() == value.sizes() && key.size(0) == B && key.size(1) == H && key.size(3) == D,
              "key and value: [B, H, L, D] like query's");
  TORCH_CHECK(key.stride(3) == 1 && value.stride(3) == 1 && D % 8 == 0,
              "rows of D contiguous, D a multiple of 8");
  TORCH_CHECK(key.scalar_type() == q.scalar_type() && value.scalar_type() == q.scalar_type(), "one dtype");
  const bool* mask = nullptr;
  int64_t mb = 0, mh = 0, ms = 0, ml = 0;
  if (attn_mask) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4, "attn_mask: bool, 4 dimensions");
    const int64_t full[4] = {B, H, S, L};
    int64_t* strides[4] = {&mb, &mh, &ms, &ml};
    for (int i = 0; i < 4; ++i) {  // each dimension the full size, or 1 (the same for all)
      TORCH_CHECK(m.size(i) == full[i] || m.size(i) == 1, "attn_mask: [B or 1, H or 1, S or 1, L or 1]");
      *strides[i] = m.size(i) == 1 ? 0 : m.stride(i);
    }
    mask = m.data_ptr<bool>();
  }
  at::Tensor out = new_output(q.sizes(), q.options());
  // units of work: a batch row, a head and up to ATTEND_ROWS of its query rows (with grouped-query attention,
  // the query heads that share this key/value head: model.py stacks them as rows). Where they do not divide
  // among the threads (a batch-1 step of a model with three key/value heads, on two threads), each unit's
  // keys are split into parts, up to one per thread, scored apart and combined by their softmax's sums: the
  // threads then share every head's work rather than one waiting while another takes two heads.
  const int64_t chunks = (S + ATTEND_ROWS - 1) / ATTEND_ROWS, units = B * H * chunks;
  const int64_t threads = available_threads();
  const int64_t parts =
      units % threads ? std::clamp<int64_t>(std::min(L / ATTEND_PART_KEYS, threads), 1, ATTEND_MAX_PARTS) : 1;
  // each part's rows (normalized over its keys) in float32, and each row's largest score and exponentials' sum
  std::vector<float> partial(parts > 1 ? units * parts * ATTEND_ROWS * (D + 2) : 0);
  float* part_stats = parts > 1 ? partial.data() + units * parts * ATTEND_ROWS * D : nullptr;
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* op) {
    parallel_shares(units * parts, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> buffer;  // the scores, and the query rows' then the outputs' floats
      buffer.resize(ATTEND_ROWS * (L + D));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t unit = i / parts, part = i % parts;
        const int64_t b = unit / (H * chunks), h = unit / chunks % H, s = unit % chunks * ATTEND_ROWS;
        const int64_t rows = std::min<int64_t>(S - s, ATTEND_ROWS), first = (b * H + h) * S + s;
        // this part's keys, lo to hi, from a multiple of 8 on
        auto start = [&](int64_t p) { return p == parts ? L : L * p / parts / 8 * 8; };
        const int64_t lo = start(part), hi = start(part + 1);
        const bool* row_masks[ATTEND_ROWS];
        for (int64_t r = 0; r < rows && mask; ++r) row_masks[r] = mask + b * mb + h * mh + (s + r) * ms + lo * ml;
        as_constant<ATTEND_ROWS>(rows, [&](auto R) {
          const auto* k = kp + b * key.stride(0) + h * key.stride(1) + lo * key.stride(2);
          const auto* v = vp + b * value.stride(0) + h * value.stride(1) + lo * value.stride(2);
          auto attend_to = [&](auto* o, int64_t ldo, float* stats) {
            constexpr int rows = decltype(R)::value;
            using T = std::remove_pointer_t<decltype(qp)>;
            using O = std::remove_pointer_t<decltype(o)>;
            auto* kernel = &attend<rows, T, O>;
#ifdef HAVE_AVX512
            if (D % 32 == 0) kernel = &attend16<rows, T, O>;
#endif
            kernel(qp + first * D, D, k, v, hi - lo, D, key.stride(2), value.stride(2), mask ? row_masks : nullptr,
                   ml, static_cast<float>(scale), o, ldo, stats, buffer.data(), buffer.data() + ATTEND_ROWS * L);
          };
          if (parts == 1)
            attend_to(op + first * D, D, nullptr);
          else
            attend_to(partial.data() + i * ATTEND_ROWS * D, D, part_stats + i * ATTEND_ROWS * 2);
        });
      }
    });
    // the parts of each row, weighted by their sums of exponentials relative to the row's largest score
    for (int64_t unit = 0; unit < units && parts > 1; ++unit) {
      const int64_t b = unit / (H * chunks), h = unit / chunks % H, s = unit % chunks * ATTEND_ROWS;
      for (int64_t r = 0; r < std::min<int64_t>(S - s, ATTEND_ROWS); ++r) {
        const float* stats = part_stats + unit * parts * ATTEND_ROWS * 2 + 2 * r;
        float top = -INFINITY, total = 0.f;
        for (int64_t part = 0; part < parts; ++part) top = std::max(top, stats[part * ATTEND_ROWS * 2]);
        float weights[ATTEND_MAX_PARTS];
        for (int64_t part = 0; part < parts; ++part) {
          const float sum = stats[part * ATTEND_ROWS * 2 + 1];
          total += weights[part] = sum > 0.f ? sum * std::exp(stats[part * ATTEND_ROWS * 2] - top) : 0.f;
        }
        const __m256 inv = _mm256_set1_ps(total > 0.f ? 1.f / total : 0.f);
        for (int64_t d = 0; d < D; d += 8) {
          __m256 acc = _mm256_setzero_ps();
          for (int64_t part = 0; part < parts; ++part) {
            const float* part_out = partial.data() + ((unit * parts + part) * ATTEND_ROWS + r) * D;
            acc = _mm256_fmadd_ps(_mm256_set1_ps(weights[part]), _mm256_loadu_ps(part_out + d), acc);
          }
          store8(op + ((b * H + h) * S + s + r) * D + d, _mm256_mul_ps(acc, inv));
        }
      }
    }
  };
  switch (q.scalar_type()) {
    case at::kFloat:
      run(q.data_ptr<float>(), key.data_ptr<float>(), value.data_ptr<float>(), out.data_ptr<float>());
      break;
    case at::kBFloat16:
      run(q.data_ptr<at::BFloat16>(), key.data_ptr<at::BFloat16>(), value.data_ptr<at::BFloat16>(),
          out.data_ptr<at::BFloat16>());
      break;
    case at::kHalf:
      run(q.data_ptr<at::Half>(), key.data_ptr<at::Half>(), value.data_ptr<at::Half>(), out.data_ptr<at::Half>());
      break;
    default: TORCH_CHECK(false, "float32, bfloat16 or float16");
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// The greedy token: each row's first index of its largest value, as torch.argmax (where a NaN counts as
// the largest). One pass: each of 32 lanes keeps the largest value it has seen and where, only a larger
// one replacing it, so ties keep the first; then the lanes' largest value and, of the lanes that hold it,
// the least index. (Inductor's own argmax carries one index through a loop of one value at a time; its
// two vectorised passes, max then the least index that holds it, still spent a tenth of a millisecond
// and more on eight rows of the default model's 49,152 logits: BENCHMARKS.md.)

int64_t argmax_row(const float* x, int64_t V) {
  constexpr int U = 4;  // vectors a pass, in independent chains
  __m256 best[U], nan = _mm256_setzero_ps();
  __m256i at[U], index[U];
  for (int u = 0; u < U; ++u) {
    best[u] = _mm256_set1_ps(-INFINITY);
    at[u] = _mm256_setzero_si256();
    index[u] = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * u));
  }
  const __m256i step = _mm256_set1_epi32(8 * U);
  int64_t v = 0;
  for (; v + 8 * U <= V; v += 8 * U)
    for (int u = 0; u < U; ++u) {
      const __m256 x8 = _mm256_loadu_ps(x + v + 8 * u);
      const __m256 larger = _mm256_cmp_ps(x8, best[u], _CMP_GT_OQ);
      best[u] = _mm256_blendv_ps(best[u], x8, larger);
      at[u] = _mm256_blendv_epi8(at[u], index[u], _mm256_castps_si256(larger));
      index[u] = _mm256_add_epi32(index[u], step);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x8, x8, _CMP_UNORD_Q));
    }
  float values[8 * U];
  int32_t where[8 * U];
  for (int u = 0; u < U; ++u) {
    _mm256_storeu_ps(values + 8 * u, best[u]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(where + 8 * u), at[u]);
  }
  float top = -INFINITY;
  int64_t first = 0;
  for (int l = 0; l < 8 * U; ++l)
    if (values[l] > top || (values[l] == top && where[l] < first)) top = values[l], first = where[l];
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t i = v; i < V; ++i) {  // the last values, fewer than a pass
    if (x[i] > top) top = x[i], first = i;
    any_nan |= std::isnan(x[i]);
  }
  if (any_nan) first = std::find_if(x, x + V, [](float f) { return std::isnan(f); }) - x;
  return first;
}

// x [B, V] float32 -> [B] int64
at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) > 0 &&
                  x.size(1) < (int64_t(1) << 31), "x: a contiguous [B, V] float32, 0 < V < 2^31");
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = new_output({B}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) o[b] = argmax_row(xp + b * V, V);
  });
  return out;
}

}  // namespace

// C entry points of the ops, for the steps that decode.ExportedStep compiles (qlinear.C_SHIMS): the library
// calls these directly, not through PyTorch's proxy executor, which boxes and unboxes every call's arguments
// (over a microsecond a call, for a hundred and more calls a step: BENCHMARKS.md). Tensors come as borrowed
// handles and the result goes out as a new one; an exception becomes an error code, which the caller checks.
namespace {
const at::Tensor& tensor(AtenTensorHandle h) { return *torch::aot_inductor::tensor_handle_to_tensor_pointer(h); }
AtenTensorHandle handle(at::Tensor t) { return torch::aot_inductor::new_tensor_handle(std::move(t)); }
}  // namespace

extern "C" {
AOTITorchError aoti_torch_cpu_q8_linear(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle scales,
                                        AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    KeepOutputs keep;
    *ret0 = handle(q8_linear(tensor(x), tensor(weight), tensor(scales)));
  });
}
AOTITorchError aoti_torch_cpu_q4_linear(AtenTensorHandle x, AtenTensorHandle weight, int64_t N,
                                        AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    KeepOutputs keep;
    *ret0 = handle(q4_linear(tensor(x), tensor(weight), N));
  });
}
AOTITorchError aoti_torch_cpu_float_linear(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    KeepOutputs keep;
    *ret0 = handle(float_linear(tensor(x), tensor(weight)));
  });
}
AOTITorchError aoti_torch_cpu_few_query_attention(AtenTensorHandle query, AtenTensorHandle key, AtenTensorHandle value,
                                                  AtenTensorHandle* attn_mask, double scale, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    KeepOutputs keep;
    std::optional<at::Tensor> mask;
    if (attn_mask) mask = tensor(*attn_mask);
    *ret0 = handle(few_query_attention(tensor(query), tensor(key), tensor(value), mask, scale));
  });
}
AOTITorchError aoti_torch_cpu_argmax(AtenTensorHandle x, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    KeepOutputs keep;
    *ret0 = handle(argmax(tensor(x)));
  });
}

// Whether q8_linear wants its int8 weights packed on this build (qlinear.Int8Linear.prepare, through ctypes)
int nimblelm_q8_packs_weights() { return Q8_PACKS_WEIGHTS; }

// The team's entry points, which qlinear.KernelTeam calls through ctypes. nimblelm_team_run: fn(arg) on the
// calling thread with a team of PyTorch's threads (Team) for the ops it calls, and its result; memory from
// nimblelm_team_new, what the team learns. Without a team where there is one thread, where the caller is in
// a parallel region or a team already, or where another team is using memory.
void* nimblelm_team_new() { return new TeamMemory(); }
void nimblelm_team_free(void* memory) { delete static_cast<TeamMemory*>(memory); }
int nimblelm_team_run(void* memory, int (*fn)(void*), void* arg) {
#ifdef _OPENMP
  TeamMemory& m = *static_cast<TeamMemory*>(memory);
  const int64_t n = at::get_num_threads();
  if (n > 1 && !at::in_parallel_region() && !Team::current && m.busy.try_lock()) {
    std::lock_guard<std::mutex> hold(m.busy, std::adopt_lock);
    std::unique_ptr<Team> team;
    int result = 0;
#pragma omp parallel num_threads(n)
    {
#pragma omp single
      team = std::make_unique<Team>(omp_get_num_threads(), m);  // (the region may have fewer than n)
      // (single ends in a barrier: every thread sees the team)
      if (omp_get_thread_num() == 0) {
        Team::current = team.get();
        result = fn(arg);
        Team::current = nullptr;
        team->stop();
      } else {
        team->serve(omp_get_thread_num());
      }
    }
    return result;
  }
#endif
  return fn(arg);
}
}

TORCH_LIBRARY(nimblelm, m) {
  m.def("q8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("q4_linear(Tensor x, Tensor weight, int N) -> Tensor");
  m.def("float_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("q4_pack(Tensor weight, Tensor scales, Tensor offsets) -> Tensor");
  m.def("few_query_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale) -> Tensor");
  m.def("argmax(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(nimblelm, CPU, m) {
  m.impl("q8_linear", q8_linear);
  m.impl("q4_linear", q4_linear);
  m.impl("float_linear", float_linear);
  m.impl("q4_pack", q4_pack);
  m.impl("few_query_attention", few_query_attention);
  m.impl("argmax", argmax);
}

// The CPU kernels of a decode step: int8 x int8 and int4 x int8 products, in llama.cpp's scheme (Q8_0 x Q8_0,
// Q4_1 x Q8_0) over our layers' own tensors; and, for CPUs without bfloat16 instructions, bfloat16 or
// float16 weights by float32 inputs (half_linear, at the end).
//
// Each product rounds its input rows to int8 in blocks of 32 (x ~ d * q, q in -127..127, one float scale d
// per block), multiplies them by the weight's blocks in integers, and scales each block's sum in float:
//   int8 weight [N, K], one scale per output:      y[m, n] = scale[n] * sum_b d[m, b] * (w[n]_b . q[m]_b)
//   int4 weight [N, K / 2], a scale and offset per block of 32 (w = s * v + o, v in 0..15):
//                                                   y[m, n] = sum_b s[n, b] d[m, b] (v[n]_b . q[m]_b)
//                                                           + o[n, b] d[m, b] sum(q[m]_b)
// PyTorch has no int4 x int8 product on the CPU, and its int8 ones run several times below the memory's
// speed for a decode step's few rows (BENCHMARKS.md), which is what this file is for. The integer dot
// products are AVX2's (maddubs: unsigned x signed bytes to pairs of int16, no overflow for these ranges),
// or VNNI's where the compiler targets it. qlinear.py builds this file once per machine (for its CPU,
// -march=native) and registers the products as torch ops, which compiled graphs call as they are.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <type_traits>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "these kernels need AVX2, FMA and F16C"
#endif

namespace {

constexpr int64_t QK = 32;  // inputs per block
constexpr int MAX_ROWS = 4;  // activation rows per pass over a weight row: their sums stay in registers
// bytes ahead in a weight row to ask the memory for: one core alone keeps too few reads in flight to
// reach the memory's speed
constexpr int PREFETCH = 1024;

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

inline __m256 load_half8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 8 int32 lanes summing u * s over 32 byte pairs, u unsigned (at most 127 here), s signed
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// The same over two sets of 32 byte pairs, u at most 15 (int4): their int16 pair sums add without overflow.
inline __m256i dot2_u8s8(__m256i u, __m256i s, __m256i u2, __m256i s2) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s), u2, s2);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s), u2, s2);
#else
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(u, s), _mm256_maddubs_epi16(u2, s2));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Activations: a row of K floats -> K int8 in blocks of 32, each with its scale d and, when sums is given,
// d * sum(q). With int4_order the bytes are laid out for q4_output, which reads an int4 block's 16 bytes as
// its even inputs (low nibbles), then its odd ones (high nibbles), and two blocks b, b + 1 at once: each
// pair of blocks holds b's even inputs, b + 1's even inputs, b's odd inputs, b + 1's odd inputs; a last
// unpaired block holds its even inputs, then its odd ones.

void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* sums, bool int4_order) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i even_odd = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const int64_t nb = K / QK;
  __m256i previous = _mm256_setzero_si256();  // an even block's bytes, until its pair is done
  for (int64_t b = 0; b < nb; ++b) {
    __m256 v[4], m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + b * QK + 8 * i);
      m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
    }
    const float amax = hmax(m);
    d[b] = amax / 127.f;
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i i[4];
    for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), nearest));
    if (sums) {
      const __m256i s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
      sums[b] = d[b] * hsum(_mm256_cvtepi32_ps(s));
    }
    // packing works within 128-bit lanes; the permutation puts the 32 values back in order
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    p = _mm256_permutevar8x32_epi32(p, in_order);
    if (!int4_order) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), p);
      continue;
    }
    // per lane, 8 even bytes then 8 odd; then both lanes' even halves first
    p = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(p, even_odd), 0xD8);
    if (b % 2 == 0 && b + 1 == nb) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), p);
    } else if (b % 2 == 0) {
      previous = p;
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + (b - 1) * QK), _mm256_permute2x128_si256(previous, p, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), _mm256_permute2x128_si256(previous, p, 0x31));
    }
  }
}

struct Activations {
  at::Tensor q, d, sums;  // [M, K] int8, [M, K / 32] float, [M, K / 32] float (int4 only)
  int64_t nb;             // blocks per row
};

Activations quantize(const at::Tensor& x, bool int4_order) {
  const int64_t M = x.size(0), K = x.size(1);
  Activations a{at::empty({M, K}, x.options().dtype(at::kChar)), at::empty({M, K / QK}, x.options()),
                int4_order ? at::empty({M, K / QK}, x.options()) : at::Tensor(), K / QK};
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x.data_ptr<float>() + m * K, K, a.q.data_ptr<int8_t>() + m * K, a.d.data_ptr<float>() + m * a.nb,
                 int4_order ? a.sums.data_ptr<float>() + m * a.nb : nullptr, int4_order);
  return a;
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

template <int R>
void q8_output(const int8_t* w, float scale, const int8_t* q, const float* d, int64_t K, int64_t nb, float* y,
               int64_t ldy) {
  __m256 even[R], odd[R];
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(w + b * QK + PREFETCH), _MM_HINT_T0);
    q8_block<R>(w, b, q, d, K, nb, even);
    q8_block<R>(w, b + 1, q, d, K, nb, odd);
  }
  if (b < nb) q8_block<R>(w, b, q, d, K, nb, even);
  for (int r = 0; r < R; ++r) y[r * ldy] = scale * hsum(_mm256_add_ps(even[r], odd[r]));
}

// Two int4 blocks b, b + 1 for R rows: their 32 bytes unpack into the even inputs of both (low nibbles) and
// the odd inputs of both (high nibbles), matched by the activations' order (quantize_row). The integer sums
// of b land in the low four lanes, those of b + 1 in the high four; lanes picks their scales (each block's
// weight scale times the row's activation scale) from scale [R].
template <int R>
inline void q4_pair(const uint8_t* w, const int8_t* q, int64_t K, const __m256* scale, __m256i lanes, __m256* acc) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i even = _mm256_and_si256(bytes, low), odd = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
  for (int r = 0; r < R; ++r) {
    const __m256i dot = dot2_u8s8(even, load32(q + r * K), odd, load32(q + r * K + QK));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_permutevar8x32_ps(scale[r], lanes), acc[r]);
  }
}

// A last block alone (an odd number of blocks): its 16 bytes unpack into its even inputs, then its odd ones.
template <int R>
inline void q4_block(const uint8_t* w, const int8_t* q, int64_t K, const float* scale, __m256* acc) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(0x0F));
  for (int r = 0; r < R; ++r)
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(v, load32(q + r * K))), _mm256_set1_ps(scale[r]), acc[r]);
}

// Blocks go by eight: their float16 scales and offsets convert in one instruction each, the scales
// multiply the activations' in one, the offsets' terms add into the same lanes as the products, and each
// pair of blocks takes its two scales from those eight with one permutation. The eight from base on, of
// which blocks before base + first are done already (a row's last blocks, fewer than eight: the eight that
// end the row are read again, and those already done are masked out, which measured faster than taking
// the last blocks one pair at a time).
template <int R>
inline void q4_octet(const uint8_t* w, const at::Half* s, const at::Half* o, const int8_t* q, const float* d,
                     const float* sums, int64_t K, int64_t nb, int64_t base, int first, __m256* acc, __m256* offsets) {
  const char* ahead = reinterpret_cast<const char*>(w + base * (QK / 2) + PREFETCH);
  _mm_prefetch(ahead, _MM_HINT_T0);
  _mm_prefetch(ahead + 64, _MM_HINT_T0);
  const __m256 todo = _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first - 1)));
  const __m256 s8 = load_half8(s + base), o8 = _mm256_and_ps(load_half8(o + base), todo);
  __m256 scale[R];
  for (int r = 0; r < R; ++r) {
    scale[r] = _mm256_mul_ps(s8, _mm256_loadu_ps(d + r * nb + base));
    const __m256 sum8 = _mm256_loadu_ps(sums + r * nb + base);
    if constexpr (R <= 2)
      offsets[r] = _mm256_fmadd_ps(o8, sum8, offsets[r]);
    else
      acc[r] = _mm256_fmadd_ps(o8, sum8, acc[r]);
  }
  for (int j = first; j < 8; j += 2) {
    // blocks j and j + 1: their scales from lanes j and j + 1
    const __m256i lanes = _mm256_setr_epi32(j, j, j, j, j + 1, j + 1, j + 1, j + 1);
    q4_pair<R>(w + (base + j) * (QK / 2), q + (base + j) * QK, K, scale, lanes, acc);
  }
}

// (Kept out of the thread's loop: inlined there, the one-row case measured slower.)
template <int R>
__attribute__((noinline)) void q4_output(const uint8_t* w, const at::Half* s, const at::Half* o, const int8_t* q,
                                         const float* d, const float* sums, int64_t K, int64_t nb, float* y,
                                         int64_t ldy) {
  __m256 acc[R], offsets[R <= 2 ? R : 1];  // the products' sums; the offsets' terms
  // For one or two rows the offsets' terms get sums of their own, so that fewer additions wait on each
  // other; for more, the registers would run out (measured: each choice is slower the other way).
  float tail[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    if constexpr (R <= 2) offsets[r] = _mm256_setzero_ps();
    tail[r] = 0.f;
  }
  int64_t b0 = 0;
  for (; b0 + 8 <= nb; b0 += 8) q4_octet<R>(w, s, o, q, d, sums, K, nb, b0, 0, acc, offsets);
  if (b0 < nb && nb >= 8 && nb % 2 == 0) {
    q4_octet<R>(w, s, o, q, d, sums, K, nb, nb - 8, static_cast<int>(b0 - (nb - 8)), acc, offsets);
    b0 = nb;
  }
  for (int64_t b = b0; b < nb; b += 2) {  // the last blocks of a short row, or of an odd number of blocks
    const bool alone = b + 1 == nb;
    float single[R];
    __m256 scale[R];
    for (int r = 0; r < R; ++r) {
      const float s0 = static_cast<float>(s[b]) * d[r * nb + b];
      tail[r] += static_cast<float>(o[b]) * sums[r * nb + b];
      if (alone) {
        single[r] = s0;
        continue;
      }
      const float s1 = static_cast<float>(s[b + 1]) * d[r * nb + b + 1];
      tail[r] += static_cast<float>(o[b + 1]) * sums[r * nb + b + 1];
      scale[r] = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
    }
    if (alone)
      q4_block<R>(w + b * (QK / 2), q + b * QK, K, single, acc);
    else
      q4_pair<R>(w + b * (QK / 2), q + b * QK, K, scale, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), acc);
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (R <= 2) acc[r] = _mm256_add_ps(acc[r], offsets[r]);
    y[r * ldy] = hsum(acc[r]) + tail[r];
  }
}

// ---------------------------------------------------------------------------------------------------------
// One output for R rows of a bfloat16 or float16 weight: each 8 weights convert to float32 in registers and
// multiply-add with every row's 8 inputs. (Where the CPU has no bfloat16 instructions, PyTorch's products of
// such weights run at the same few GFLOP/s whatever the rows.) One row keeps two sets of sums, so that
// each multiply-add waits less on the one before (measured: two beat one, four and eight); more rows are
// as many sets already. These reads ask for the weight further ahead than the int8 and int4 ones: at
// PREFETCH they took a fifth to a third longer (measured: 2 KiB ahead beat 1, 3 and 6).

constexpr int HALF_MAX_ROWS = 8;
constexpr int HALF_PREFETCH = 2048;

template <typename W>
inline __m256 load_weights8(const W* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<W, at::BFloat16>)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // the float's top half
  else
    return _mm256_cvtph_ps(h);
}

template <int R, typename W>
void half_output(const W* w, const float* x, int64_t K, float* y, int64_t ldy) {
  constexpr int U = R == 1 ? 2 : 1;
  __m256 acc[U][R];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) acc[u][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + HALF_PREFETCH, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      const __m256 wv = load_weights8(w + k + 8 * u);
      for (int r = 0; r < R; ++r) acc[u][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k + 8 * u), acc[u][r]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load_weights8(w + k);
    for (int r = 0; r < R; ++r) acc[0][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k), acc[0][r]);
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 1; u < U; ++u) acc[0][r] = _mm256_add_ps(acc[0][r], acc[u][r]);
    float sum = hsum(acc[0][r]);
    for (int64_t i = k; i < K; ++i) sum += static_cast<float>(w[i]) * x[r * K + i];
    y[r * ldy] = sum;
  }
}

// ---------------------------------------------------------------------------------------------------------
// The ops: outputs split among PyTorch's threads; for each output, the activation rows MAX_ROWS at a time
// (HALF_MAX_ROWS for half_linear).

// output(std::integral_constant<int, R>, ...) for the R rows from m on, R a constant from 1 to ROWS
template <int ROWS, typename Output>
inline void rows_of(int64_t rows, Output& output, int64_t n, int64_t m, float* y, int64_t ldy) {
  if constexpr (ROWS > 1)
    if (rows < ROWS) return rows_of<ROWS - 1>(rows, output, n, m, y, ldy);
  output(std::integral_constant<int, ROWS>(), n, m, y, ldy);
}

template <int ROWS, typename Output>
at::Tensor product(const at::Tensor& x, int64_t N, Output output) {
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  float* out = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; m += ROWS)
        rows_of<ROWS>(std::min<int64_t>(M - m, ROWS), output, n, m, out + m * N + n, N);
  });
  return y;
}

void check_input(const at::Tensor& x, int64_t multiple = QK) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: a contiguous [M, K] float32");
  TORCH_CHECK(x.size(1) % multiple == 0, "K must be a multiple of ", multiple);
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  check_input(x);
  const int64_t K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.dim() == 2 &&
                  weight.size(1) == K, "weight: a contiguous [N, K] int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N, "scales: [N] float32");
  const Activations a = quantize(x, false);
  const int8_t *w = weight.data_ptr<int8_t>(), *q = a.q.data_ptr<int8_t>();
  const float *sc = scales.data_ptr<float>(), *d = a.d.data_ptr<float>();
  return product<MAX_ROWS>(x, N, [&](auto R, int64_t n, int64_t m, float* y, int64_t ldy) {
    q8_output<decltype(R)::value>(w + n * K, sc[n], q + m * K, d + m * a.nb, K, a.nb, y, ldy);
  });
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                     const at::Tensor& offsets) {
  check_input(x);
  const int64_t K = x.size(1), N = weight.size(0), nb = K / QK;
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous() && weight.dim() == 2 &&
                  weight.size(1) * 2 == K, "weight: a contiguous [N, K / 2] uint8");
  for (const at::Tensor* t : {&scales, &offsets})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == N * nb,
                "scales, offsets: contiguous [N, K / 32] float16");
  const Activations a = quantize(x, true);
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const at::Half *s = scales.data_ptr<at::Half>(), *o = offsets.data_ptr<at::Half>();
  const int8_t* q = a.q.data_ptr<int8_t>();
  const float *d = a.d.data_ptr<float>(), *sums = a.sums.data_ptr<float>();
  return product<MAX_ROWS>(x, N, [&](auto R, int64_t n, int64_t m, float* y, int64_t ldy) {
    q4_output<decltype(R)::value>(w + n * (K / 2), s + n * nb, o + n * nb, q + m * K, d + m * nb, sums + m * nb,
                                  K, nb, y, ldy);
  });
}

at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight) {
  check_input(x, 1);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK((weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf) && weight.is_contiguous() &&
                  weight.dim() == 2 && weight.size(1) == K, "weight: a contiguous [N, K] bfloat16 or float16");
  const float* xp = x.data_ptr<float>();
  auto run = [&](auto* w) {
    return product<HALF_MAX_ROWS>(x, N, [&](auto R, int64_t n, int64_t m, float* y, int64_t ldy) {
      half_output<decltype(R)::value>(w + n * K, xp + m * K, K, y, ldy);
    });
  };
  if (weight.scalar_type() == at::kBFloat16) return run(weight.data_ptr<at::BFloat16>());
  return run(weight.data_ptr<at::Half>());
}

}  // namespace

TORCH_LIBRARY(nimblelm, m) {
  m.def("q8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("q4_linear(Tensor x, Tensor weight, Tensor scales, Tensor offsets) -> Tensor");
  m.def("half_linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(nimblelm, CPU, m) {
  m.impl("q8_linear", q8_linear);
  m.impl("q4_linear", q4_linear);
  m.impl("half_linear", half_linear);
}

// Vector helpers shared by the kernels: AVX-512, bf16 dot products through AVX512-BF16 where the CPU has it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <immintrin.h>

#include <cstdint>

// The op namespace every kernel file registers into; a test builds a second copy (without
// AVX512-BF16) under another name with -DTOKENMILL_OPS=...
#ifndef TOKENMILL_OPS
#define TOKENMILL_OPS tokenmill
#endif

namespace tokenmill {

// exp(x) to about 1 ulp (Cephes' expf polynomial), 16 lanes at a time; NaN stays NaN.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-103.0f), x);  // max_ps returns its second operand when one is NaN
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// erfcx(t) = exp(t^2) erfc(t) for 0 <= t <= 10.3, to about 1 ulp: on 14 intervals (picked by the exponent
// and the two top mantissa bits of t + 1: widths 0.25 up to t = 1, then 0.5, 1, 2), a degree-6 polynomial in
// t minus the interval's middle, minimax in relative error (Lawson's iterations in float64 against scipy's
// erfcx; evaluated in fp32 within 1.9 * 2^-24 relative). t itself enters exactly (no rounded 1 / (1 + p t)
// as in the usual rational forms, which cost 2-3 ulp more).
alignas(64) inline constexpr float kErfcxMiddle[16] = {
    0.125f, 0.375f, 0.625f, 0.875f, 1.25f, 1.75f, 2.25f, 2.75f, 3.5f, 4.5f, 5.5f, 6.5f, 8.0f, 9.75500011f,
    9.75500011f, 9.75500011f};
alignas(64) inline constexpr float kErfcxCoefficients[7][16] = {
    {0.873221874f, 0.685857236f, 0.556813896f, 0.46431157f, 0.367822915f, 0.284972221f, 0.231087252f,
     0.193662092f, 0.155293658f, 0.122484803f, 0.100962222f, 0.0858056694f, 0.0699851662f, 0.0575367175f,
     0.0575367175f, 0.0575367175f},
    {-0.910073757f, -0.613986254f, -0.432361811f, -0.315833896f, -0.208821908f, -0.130976349f, -0.0884865075f,
     -0.0632376373f, -0.041323591f, -0.0260159317f, -0.0177947655f, -0.0129054561f, -0.00861651078f,
     -0.00583776366f, -0.00583776366f, -0.00583776366f},
    {0.759462595f, 0.455612391f, 0.286587745f, 0.187956929f, 0.106795564f, 0.0557636283f, 0.0319926292f,
     0.0197585933f, 0.0106611345f, 0.00541312573f, 0.00309101259f, 0.00192020787f, 0.00105310348f,
     0.000589334988f, 0.000589334988f, 0.000589334988f},
    {-0.543415844f, -0.295416474f, -0.168827698f, -0.100913517f, -0.0502136946f, -0.0222588107f, -0.0110017071f,
     -0.00593421841f, -0.00267261523f, -0.00110448711f, -0.000529441691f, -0.000282729859f, -0.000127765321f,
     -5.91986936e-05f, -5.91986936e-05f, -5.91986936e-05f},
    {0.345767379f, 0.172414511f, 0.0905344039f, 0.0498282909f, 0.0220105592f, 0.00840408541f, 0.00361892395f,
     0.00171955826f, 0.000652601186f, 0.000221251685f, 8.9477544e-05f, 4.12094851e-05f, 1.53951532e-05f,
     5.91768412e-06f, 5.91768412e-06f, 5.91768412e-06f},
    {-0.201545894f, -0.0928945318f, -0.0451479815f, -0.0230373684f, -0.00922791194f, -0.0030588205f,
     -0.00115503033f, -0.000486008852f, -0.000159127259f, -4.42607852e-05f, -1.51042877e-05f, -6.00065414e-06f,
     -1.88862407e-06f, -5.94490245e-07f, -5.94490245e-07f, -5.94490245e-07f},
    {0.107366242f, 0.0461165495f, 0.0209022537f, 0.00995711796f, 0.00359650655f, 0.0010497272f, 0.000351447903f,
     0.000132088637f, 3.69511909e-05f, 8.55724284e-06f, 2.48699712e-06f, 8.57474959e-07f, 2.2433062e-07f,
     5.88499276e-08f, 5.88499276e-08f, 5.88499276e-08f}};

inline __m512 erfcx16(__m512 t) {
  const __m512i top_bits = _mm512_srli_epi32(_mm512_castps_si512(_mm512_add_ps(t, _mm512_set1_ps(1.0f))), 21);
  const __m512i interval = _mm512_sub_epi32(top_bits, _mm512_set1_epi32(127 << 2));  // exponent, 2 mantissa bits
  const __m512 s = _mm512_sub_ps(t, _mm512_permutexvar_ps(interval, _mm512_load_ps(kErfcxMiddle)));
  __m512 y = _mm512_permutexvar_ps(interval, _mm512_load_ps(kErfcxCoefficients[6]));
  for (int k = 5; k >= 0; --k) {
    y = _mm512_fmadd_ps(y, s, _mm512_permutexvar_ps(interval, _mm512_load_ps(kErfcxCoefficients[k])));
  }
  return y;
}

// GELU, erf form (F.gelu's default, transformers' "gelu"): x Phi(x) = x/2 erfc(-x / sqrt 2), as
// (x/2 erfcx(|x| / sqrt 2)) exp(-x^2/2) for x <= 0 and x minus that for x > 0: no 1 + erf(x / sqrt 2)
// cancelling for negative x, and exp(-x^2/2) from x itself (x^2 as the sum of two floats, by an FMA), not
// from the rounded x / sqrt 2, whose error would grow with x^2 in the tail. Within 5 ulp of x Phi(x) (4.6
// measured, 0.6 on average) for every x whose result is a normal float (tests/test_linear.py); torch's own
// fp32 gelu is off by up to 1e-6 absolute, thousands of ulp in the negative tail. x is clamped to +-14.5,
// past which erfc(|x| / sqrt 2) is below the least denormal: -inf gives -0, +inf inf (torch: NaN for both).
inline __m512 gelu16(__m512 x) {
  const __m512 clamped = _mm512_max_ps(_mm512_set1_ps(-14.5f), _mm512_min_ps(_mm512_set1_ps(14.5f), x));
  const __m512 square = _mm512_mul_ps(clamped, clamped);
  const __m512 square_error = _mm512_fmsub_ps(clamped, clamped, square);  // x^2 = square + square_error exactly
  // exp(-x^2/2) = exp(-square/2) exp(-square_error/2), the second 1 - square_error/2 within fp32's precision.
  __m512 gauss = exp16(_mm512_mul_ps(square, _mm512_set1_ps(-0.5f)));
  gauss = _mm512_fnmadd_ps(_mm512_mul_ps(gauss, square_error), _mm512_set1_ps(0.5f), gauss);
  const __m512 t = _mm512_mul_ps(_mm512_abs_ps(clamped), _mm512_set1_ps(0.707106781186547524f));
  const __m512 scaled = _mm512_mul_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(0.5f)), erfcx16(t));  // x/2 erfcx(t)
  const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_mask_blend_ps(positive, _mm512_mul_ps(scaled, gauss), _mm512_fnmadd_ps(scaled, gauss, x));
}

// GELU, tanh form (F.gelu(approximate="tanh"), transformers' "gelu_new" and "gelu_pytorch_tanh"): x/2
// (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), as the same number x / (1 + e) for u >= 0 and x e / (1 + e)
// below, e = exp(-|2u|) <= 1: no 1 + tanh(u) cancelling for negative x, no overflow. Within ~2 ulp of the
// function at the fp32 value of u, whose roundings cost up to ~2.5 |2u| ulp more in the negative tail (37 ulp
// at x = -5, 170 at x = -9 where the result nears fp32's least normal), against torch's own thousands there.
inline __m512 gelu_tanh16(__m512 x) {
  const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 two_u = _mm512_mul_ps(_mm512_set1_ps(1.59576912160573071f),
                                     _mm512_fmadd_ps(cube, _mm512_set1_ps(0.044715f), x));
  // e is 0 past where exp16 stops (at its least denormal), as exp(-|2u|) then is to fp32.
  const __m512 minus_abs = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(two_u));
  const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(minus_abs, _mm512_set1_ps(-103.0f), _CMP_GT_OQ),
                                       exp16(minus_abs));
  const __mmask16 negative = _mm512_cmp_ps_mask(two_u, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_div_ps(_mm512_mask_mul_ps(x, negative, x, e), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// A bf16 is the top half of an fp32: of 32 bf16 loaded as 16 32-bit lanes, a shift gives the even
// elements as fp32 and a mask the odd ones. Callers accumulating values in that even/odd order
// interleave them back once, at the end.
inline __m512 even_bf16(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
inline __m512 odd_bf16(__m512i x) { return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(-65536))); }

// acc + a[2i + 1] * b[2i + 1] + a[2i] * b[2i] in each fp32 lane i, of a and b holding 32 bf16 each:
// vdpbf16ps where the CPU has it, else two FMAs in the order it adds them (odd pair first).
inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
#ifdef __AVX512BF16__
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
  return _mm512_fmadd_ps(even_bf16(a), even_bf16(b), _mm512_fmadd_ps(odd_bf16(a), odd_bf16(b), acc));
#endif
}

// 16 fp32 rounded to nearest-even bf16 exactly as torch's vectorized conversion rounds them:
// denormals kept (vcvtneps2bf16 would flush them to zero), every NaN made 0xFFFF.
inline __m256i round_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  return _mm512_cvtepi32_epi16(rounded);
}

// 32 fp32 (low: elements 0-15, high: 16-31) rounded to bf16, in order.
inline __m512i to_bf16(__m512 low, __m512 high) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(round_bf16(low)), round_bf16(high), 1);
}

// 16 x 16 32-bit elements transposed in registers: r[i] lane j becomes r[j] lane i.
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + e], 128-bit lane L: element 4L + e of rows 4i..4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i a = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88), b = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xDD);
    const __m512i c = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88);
    const __m512i d = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xDD);
    t[e] = _mm512_shuffle_i32x4(a, c, 0x88);       // element e
    t[4 + e] = _mm512_shuffle_i32x4(b, d, 0x88);   // element 4 + e
    t[8 + e] = _mm512_shuffle_i32x4(a, c, 0xDD);   // element 8 + e
    t[12 + e] = _mm512_shuffle_i32x4(b, d, 0xDD);  // element 12 + e
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Lanes 0..n-1 of 16 (all for n >= 16).
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
// 16 bf16 at p widened to fp32 (zero where the mask is off), and 16 fp32 rounded and stored as bf16.
inline __m512 widen_bf16(__m256i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16)); }
inline __m512 load_bf16(const void* p, __mmask16 mask) { return widen_bf16(_mm256_maskz_loadu_epi16(mask, p)); }
inline void store_bf16(void* p, __m512 x, __mmask16 mask) { _mm256_mask_storeu_epi16(p, mask, round_bf16(x)); }
// x rounded to bf16, kept in fp32: a torch op's bf16 result, fed to the next op.
inline __m512 bf16_round_trip(__m512 x) { return widen_bf16(round_bf16(x)); }

// Slot indices a kernel will read or write through: all within the pool, as index_copy_ or
// indexing would check (one reduction, cheap next to the kernels).
inline void check_slots(const at::Tensor& slots, int64_t num_slots, const char* name) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), name, " must be contiguous int64");
  if (slots.numel() == 0) return;
  const auto [low, high] = at::aminmax(slots);
  TORCH_CHECK(low.item<int64_t>() >= 0 && high.item<int64_t>() < num_slots, name, " outside the pool's ", num_slots,
              " slots");
}

}  // namespace tokenmill

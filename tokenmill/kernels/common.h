// Vector helpers shared by the kernels: AVX-512, bf16 dot products through AVX512-BF16 where the CPU has it.
#pragma once

#include <ATen/core/Tensor.h>
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

// GELU, erf form (F.gelu's default, transformers' "gelu"): x Phi(x), with Q(t) = Phi(-t) = erfc(t / sqrt 2) / 2 for
// t = |x| on 16 intervals of 0.5 (picked by the truncation of 2t; t clamped below 8): a degree-7 polynomial in
// s = t - anchor, minimax in relative error (Lawson's iterations in float64 against scipy's erfc, dense_dev/gelu).
// Anchors: 0 for [0, 0.5), each interval's right end after, where Q's Taylor terms all have Q's sign, so Horner's
// sums cancel nothing (centred, they cancel as Q falls by up to e^-2 across an interval: 3e-7 at x = -4). The last
// interval, [7.5, 8), is zeros: Q(7.5) x is below 3e-13. x Phi(x) is x Q(t) for x <= 0, x - t Q(t) for x > 0 (one
// rounding; t = x there, up to the clamp). Within 1.9e-7 of x Phi(x), relative, for x >= -4 (1 ulp for x > 0),
// 2e-11 absolute below (tests/test_linear.py); 9 vpermps and 7 FMAs, half the cost of the exp- and erfcx-based form it
// replaced (35 cycles a vector on Zen 4 against 18), which was within 5 ulp into the far tail. torch's own fp32
// gelu: 1e-6 absolute, thousands of ulp in the negative tail. +-inf give inf and -0, NaN stays NaN.
alignas(64) inline constexpr float kGeluAnchor[16] = {
    0.0f, 1.0f, 1.5f, 2.0f, 2.5f, 3.0f, 3.5f, 4.0f, 4.5f, 5.0f, 5.5f, 6.0f, 6.5f, 7.0f, 7.5f, 8.0f};
alignas(64) inline constexpr float kGeluCoefficients[8][16] = {
    {
     0.5f, 0.15865525603294373f, 0.06680720299482346f, 0.0227501317858696f, 0.006209665443748236f,
     0.0013498980551958084f, 0.00023262908507604152f, 3.16712430503685e-05f, 3.3976730264839716e-06f,
     2.8665149898188247e-07f, 1.8989551264780857e-08f, 9.865860350899425e-10f, 4.0159861547373055e-11f,
     1.2798033032640488e-12f, 3.1908479900194867e-14f, 0.0f},
    {
     -0.3989422917366028f, -0.2419707179069519f, -0.1295175999403f, -0.05399097129702568f, -0.01752830110490322f,
     -0.004431847482919693f, -0.0008726823143661022f, -0.00013383023906499147f, -1.598379276401829e-05f,
     -1.4867393929307582e-06f, -1.077017017792059e-07f, -6.076430469903471e-09f, -2.670062226872716e-10f,
     -9.138060967639472e-12f, -2.435930959981264e-13f, 0.0f},
    {
     3.286634751020756e-07f, 0.12098565697669983f, 0.09713812172412872f, 0.05399080365896225f, 0.021910352632403374f,
     0.006647812202572823f, 0.0015272132586687803f, 0.00026766001246869564f, 3.59607620339375e-05f,
     3.715768116308027e-06f, 2.9595264550152933e-07f, 1.819837791572354e-08f, 8.648563531998832e-10f,
     3.178666357905868e-11f, 9.037975988272773e-13f, 0.0f},
    {
     0.0664854496717453f, 4.8640404202160425e-06f, -0.026984184980392456f, -0.026998281478881836f,
     -0.015337632037699223f, -0.0059084203094244f, -0.0016359502915292978f, -0.0003345856675878167f,
     -5.133102968102321e-05f, -5.966337994323112e-06f, -5.291443585520028e-07f, -3.600855436047823e-08f,
     -1.8892025721584105e-09f, -7.675168139931188e-11f, -2.42453171254986e-12f, 0.0f},
    {
     3.6118468415224925e-05f, -0.02012529782950878f, -0.006083137355744839f, 0.004476034548133612f,
     0.005931292660534382f, 0.0033300246577709913f, 0.0011800146894529462f, 0.0002898546517826617f,
     5.125190727994777e-05f, 6.640222636633553e-06f, 6.35496178347239e-07f, 4.499024086612735e-08f,
     2.343987226538502e-09f, 8.853386773699512e-11f, 2.338147687616643e-12f, 0.0f},
    {
     -0.010114927776157856f, 0.0041990275494754314f, 0.005810495000332594f, 0.0021468359045684338f,
     -0.0006767730228602886f, -0.0010796617716550827f, -0.000566067174077034f, -0.00018245105457026511f,
     -4.093983079656027e-05f, -6.737599051120924e-06f, -8.350287430403114e-07f, -7.904834120608939e-08f,
     -5.754844156768968e-09f, -3.2295693896955413e-10f, -1.3970227752402309e-11f, 0.0f},
    {
     0.00029256861307658255f, 0.0023977765813469887f, -0.0008182433666661382f, -0.00159638246987015f,
     -0.0005306659732013941f, 0.00018194434233009815f, 0.00021038016711827368f, 8.025826537050307e-05f,
     1.6875921573955566e-05f, 1.990735654544551e-06f, 8.495151604392959e-08f, -1.1719575532254112e-08f,
     -2.465508242011083e-09f, -2.304952756437828e-10f, -1.3760583818245298e-11f, 0.0f},
    {
     0.0009193065343424678f, -0.00034627498826012015f, -0.0008012118632905185f, -0.00017639578436501324f,
     0.0002610358642414212f, 0.00017548006144352257f, 1.2415223864081781e-05f, -2.981953730341047e-05f,
     -1.648662146180868e-05f, -4.6397226469707675e-06f, -8.370243449462578e-07f, -1.0432444241814665e-07f,
     -9.311007076462374e-09f, -6.074847291870356e-10f, -2.9360576470072175e-11f, 0.0f},
};

inline __m512 gelu16(__m512 x) {
  const __m512 t = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(7.99999952f));  // min: NaN gives the bound
  const __m512i interval = _mm512_cvttps_epi32(_mm512_add_ps(t, t));
  const __m512 s = _mm512_sub_ps(t, _mm512_permutexvar_ps(interval, _mm512_load_ps(kGeluAnchor)));
  __m512 q = _mm512_permutexvar_ps(interval, _mm512_load_ps(kGeluCoefficients[7]));
  for (int k = 6; k >= 0; --k) {
    q = _mm512_fmadd_ps(q, s, _mm512_permutexvar_ps(interval, _mm512_load_ps(kGeluCoefficients[k])));
  }
  // max: -inf counts as -8 (Q = 0 there: -0, not -inf * 0), NaN stays NaN (max gives its second operand).
  const __m512 negative = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-8.0f), x), q);
  const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_mask_blend_ps(positive, negative, _mm512_fnmadd_ps(t, q, x));
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

// SiLU(g) = g / (1 + exp(-g)) in fp32, as torch's vectorized silu (bit for bit: tests/test_elementwise.py).
inline __m512 silu16(__m512 g) {
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

// SiLU of 16 bf16 gates (mask m) rounded to bf16, in fp32: silu_mul's activation for gated_mul_row.
inline __m512 silu_rounded(const void* gate, __mmask16 m) { return bf16_round_trip(silu16(load_bf16(gate, m))); }

// One row of act(gate) * up on bf16 (torch's act(gate).mul_(up): the activation rounded to bf16, then the product):
// n values of gate, then of up, at gate_up; n results at out. activated(gate, mask): 16 gates' activations, rounded
// to bf16, in fp32.
template <class Activated>
inline void gated_mul_row(const void* gate_up, int64_t n, void* out, Activated activated) {
  const uint16_t* gate = static_cast<const uint16_t*>(gate_up);
  const uint16_t* up = gate + n;
  uint16_t* o = static_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store_bf16(o + i, _mm512_mul_ps(activated(gate + i, m), load_bf16(up + i, m)), m);
  }
}

// Whether every one of the n int64 values at p is in [low, high].
// NOTE: a plain loop, not at::aminmax: the layer stack (layer_stack.cpp) has the same step tables checked by every
// layer's rope_store and decode_attention, and each aminmax (an op dispatch, two new tensors, two .item()s) cost
// microseconds where the loop over a decode's few hundred slots costs nanoseconds.
inline bool all_within(const int64_t* p, int64_t n, int64_t low, int64_t high) {
  bool inside = true;
  for (int64_t i = 0; i < n; ++i) inside &= p[i] >= low && p[i] <= high;
  return inside;
}

// Slot indices a kernel will read or write through: all within the pool, as index_copy_ or
// indexing would check.
inline void check_slots(const at::Tensor& slots, int64_t num_slots, const char* name) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), name, " must be contiguous int64");
  TORCH_CHECK(all_within(slots.data_ptr<int64_t>(), slots.numel(), 0, num_slots - 1), name, " outside the pool's ",
              num_slots, " slots");
}

}  // namespace tokenmill

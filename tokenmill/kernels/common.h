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

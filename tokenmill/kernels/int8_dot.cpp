// x W^T with GGUF weights on int8 activations: integer dot products (AVX-512 VNNI vpdpbusd) on the weights' own
// quants, batch-invariant. For bf16 models (models/int8_dot.py); quant.cpp's quant_linear (the weights widened
// to bf16) stays the path for fp32 models and for the types below that have no packing here.
//
// - quantize_rows(x [M, K] bf16, rows contiguous, K a multiple of 32) -> (q [M, K] int8, sums [M, K / 32, 8]
//   fp32): each block of 32 values of a row as int8 q = round-to-nearest-even(x / d) (clamped to +-127), with
//   d = amax / 127 (0 for a block of zeros, its q all 0); sums[m, b] = (d, d * sum(q), then six int32 values in
//   fp32's bits: -8 sum(q), -16 sum(q), -128 sum(q), -32 sum(first 16 q), -32 sum(last 16 q), 0). A row's
//   quantization depends on that row only.
// - int8_pack(blocks [N, row_bytes] uint8, qtype, in_features K) -> packed uint8 [ceil(N / 16), K / block,
//   bytes]: the weight repacked once at load (see "Layout"), zeros past N.
// - int8_linear(q, sums, packed, qtype, out_features N, widened=false) -> [M, N] bf16: out[m, n] = sum over blocks
//   b of 32 of x's block dequantized (d q) times W's values (gguf's dequantization), to fp32 rounding, then rounded
//   to bf16 as torch rounds; widened: the same bf16 values stored as fp32 (a head's logits, which the sampler takes
//   in fp32: no second pass over a vocabulary-wide output to widen them; whole lines stored non-temporally, Gemma 3's
//   262,144-row head at M=64 then ran 8-14% faster, one or two threads, the sampler's amax over them included).
//   Types: Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K (INT8_DOT_TYPES in kernels/__init__.py).
// - int8_moe(x [T, H] bf16, experts [T, k] int64, weights [T, k] bf16 or fp32, gate_up [E packed], its qtype, down
//   [E packed], its qtype, F) -> [T, H] bf16: a mixture-of-experts layer's routed experts in one call, each (token,
//   expert) pair's row as quantize_rows, int8_linear (gate_up), the fused silu_mul, quantize_rows and int8_linear
//   (down) give it, then out[t] = sum over j of row(t, j) * weights[t, j] as models/moe.py's torch ops (see below).
//   Why: at a decode step of 16 tokens a layer's ~28 busy experts were ~60 kernel calls and ~15 torch ops, each
//   with its dispatch and thread wake-up, and the quantized experts ran no faster than bf16 ones.
//
// Every type is written value = ws * q - wm with unsigned quants q per sub-block (32 weights; Q6_K's scales are
// per 16): Q8_0 d (q + 128) - 128 d (quants stored offset by 128), Q4_0 d q - 8 d, Q4_1 d q - (-m), Q5_0 d q -
// 16 d, Q4_K (d sc) q - dmin m, Q6_K (d sc) q - 32 d sc. With x's block dequantized as dx qx:
//   sum_k w x = dx (ws isum - wm sum(qx)),  isum = sum_k q qx (exact in int32),
// computed per output as acc = fma(float(isum), ws * dx, acc); acc = fnmadd(wm, dx sum(qx), acc), once per
// (sub-)block in order of k from zero (Q6_K: for each half of 16 with its own ws and half-sum). Where wm is an
// integer c times ws (Q8_0, Q4_0, Q5_0, Q6_K) the offset is taken in the integers instead, isum starting at
// -c sum(qx) (quantize_rows' sums), so one fma a fold and the sum exact up to that fma. That one sequence of fp32
// operations for every output whatever M and the rows beside it: batch invariance, bit for bit.
//
// Layout: lanes along output features, as dense_linear's (quant.cpp): 16 features per group, each 32-bit lane
// 4 consecutive k's quants of its feature, so one vpdpbusd (the 4 bytes of a row of x broadcast to every lane)
// adds 4 k's products to 16 outputs' sums, and no sums across lanes are needed. A group's packed block (the
// file's block size along k: 256 for the K-quants, 32 for the others) is its scales, then its quants, each
// sub-block's together (Q6_K's low and top bits side by side), so that a group is read as one sequential stream:
// with the scales after the quants and Q6_K's top bits apart from its low ones (3 streams a block), one thread read
// from memory at M=1 Q4_K 27 GB/s, Q6_K 9.5, Q8_0 24; now 46, 31 and 33 (2048 x 16384, 4 copies).
// - 4-bit quants (all types but Q8_0; Q6_K's low 4 bits): per sub-block of 32 k, 4 vectors of 64 bytes;
//   vector i, lane n, byte j holds k = 4i + j in its low nibble and k = 16 + 4i + j in its high one (steps i and
//   4 + i of the sub-block: one and / shift + and each). Q5_0's fifth bits: one vector per block, bit s of byte
//   (n, j) for k = 4s + j. Q6_K's top 2 bits: two vectors per sub-block, step s in bits 2(s / 2) of vector s % 2.
//   Q8_0: 8 vectors of bytes q + 128.
// - scales kept compact, widened to fp32 per group in registers: fp16 d (and m or dmin) per feature and block;
//   Q4_K's 6-bit sc and m as the file packs them (unpacked at each fold), Q6_K's int8 sc per 16. Bytes per
//   weight: the file's for every type. (Q4_K's sc and m unpacked to a byte each at load were 4.625 bits a weight
//   against 4.5; fp32 ws and wm per sub-block would be 2 more bits a weight: +44% bytes for Q4_K at M=1, where the
//   bytes are the time.)
// Cost (Zen 4, one thread, weights in L2, M >= 64): each (row, sub-block) is 8 vpdpbusd (64 products each, against
// vdpbf16ps' 32) and the fold (cvt, a multiply, two FMAs). Measured (one group a pass; two: see "Work") 296-317 GFLOP/s
// (Q4_K, Q8_0, Q4_1) and 237-245 (Q6_K: two folds a sub-block) against dense_linear's bf16 221-231 on the same shape
// (N=64, K=2048): 1.35x. (The offset types' fnmadd replaced by subtracting c sum(qx) from isum at the fold, a vector op
// per row, ran no faster: Q8_0 306, Q6_K 249. Starting isum there instead, a broadcast load where a zeroing was, did:
// one thread, M=64, A/B in one process, Q5_0 4096 x 640 279 -> 300 GFLOP/s, Q6_K 640 x 2048 246 -> 275, Q8_0 256 x 640
// 301 -> 321; Q4_K unchanged.) At M=1 no decoding to bf16 (3 integer instructions unpack 128 4-bit quants, against
// quant_linear's table lookups) and the layout's one stream: Q4_K 1.6-1.7x quant_linear's speed, Q6_K 2.3-2.4x, Q8_0
// 2.2-2.4x (one thread, 96 MB of copies, quantize_rows included; 2048 x 16384 and 8192 x 2048).
// What bounds it (a microbenchmark, one thread, 3.6 GHz): one 512-bit vpdpbusd a cycle (467 GOPS), and each
// vmulps, vfmadd, vpand or shift beside them takes about one vpdpbusd's slot; vcvtdq2ps and broadcasts of x from
// memory take none. So a (row, group, sub-block) costs 8 vpdpbusd plus its fold's multiply and one FMA (two with a
// min), plus the weights' unpacking shared by the rows of a pass: at most 374 GOPS for Q8_0, 340 for Q4_1 and Q4_K,
// 311 for Q6_K; the fold's operations are the batch-invariant sequence and stay.
// Work: output groups in units of one or two (kTwoGroupPasses, from kPairMinRows rows a panel on), each in passes of up
// to kMaxRows rows of x over one group (one accumulator and one integer sum per row in registers) or kPairRows rows
// over two (each broadcast of x and of its block sums feeds both groups); rows in panels of about kPanelBytes of x
// (kept in L2 from one unit to the next; each panel streams the weight from memory again: 256 KB panels held Q8_0
// 8192 x 2048 at M=128-512 to 222-226 GFLOP/s a thread, 512 KB ones reach 276-280), the next unit's weights
// prefetched during a unit's passes (see linear()), work items (a panel x a run of units) taken from a shared counter
// (2 shared cores: a thread slowed by another process leaves its items to the other). Two groups a pass against
// one, bit for bit the same results: one thread, CPU time, old and new kernels alternated in one process (best of 9,
// load 6-9), M = 16-64: Q4_1 +4-11% (SmolLM2's q, up and down projections 270-302 -> 286-326 GFLOP/s; 2048 x 2048
// 298-301 -> 321-328), Q8_0 +4-8% (2048 x 2048 308-324 -> 333-343), Q4_K +0-5% (291-306 -> 298-311); where the
// weight comes from memory, M=8 reads it in two passes with the next pair prefetched, not in one: Q8_0 8192 x 2048
// 117 -> 198, Q4_1 242 -> 310; two threads, quiet (wall time): Q8_0 2048 x 2048 605-679 -> 666-710, SmolLM2's
// projections +5-6%. Q6_K stays on one group: its unpacking (5 operations a step) shared by 4 rows instead
// of 8 made M=8 0.92-0.94x, and larger M no faster. Below 8 rows, passes over one group (the same instructions as
// before): each group one stream, which the hardware prefetches. Tried and not kept: 4, 5 or 7 rows over two groups
// (7 spills); 10-14 rows a pass over one group (0.93-1.05x); each group's quants and fp32 scales unpacked once a
// panel into a buffer that the passes load (0.65-1.03x: the stores and reloads cost more than the unpacking saved);
// the high nibbles and Q6_K's top bits moved by one vgf2p8affineqb instead of a shift and an AND (0.92-0.95x at
// M=8-64, Q4_1, Q4_K and Q6_K: it takes more than the two operations' slots).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/accumulate.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"

// Without VNNI (AVX-512 before Cascade Lake / Zen 4) nothing here is built: kernels.int8_dot_available() says so.
#ifdef __AVX512VNNI__

namespace {

using namespace tokenmill;
using bf16 = c10::BFloat16;

enum QType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };

constexpr int kLanes = 16;          // output features per group
constexpr int kSub = 32;            // k per sub-block, and per block of x
// Per block of x: d, d sum(q), then int32 values in fp32's bits: -8 sum(q), -16 sum(q), -128 sum(q), -32 sum(first
// 16 q), -32 sum(last 16 q), 0 (the offsets of Q4_0, Q5_0, Q8_0 and Q6_K's halves, times sum(q)).
constexpr int kSums = 8;
constexpr int kMaxRows = 8;         // rows of x per pass over one group
// Rows per pass over two groups (each broadcast of x feeding two vpdpbusd): 2 x 6 accumulators and 2 x 6 integer
// sums, the two groups' quants and x in 28 of the 32 registers (4, 5 or 7 rows: no faster); from kPairMinRows rows a
// panel on (below, the passes over one group read the weight as one stream: see "Work").
constexpr int kPairRows = 6, kPairMinRows = 8;
constexpr int64_t kPanelBytes = 512 * 1024;

inline float fp16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline int64_t groups_of(int64_t N) { return (N + kLanes - 1) / kLanes; }

alignas(64) constexpr uint8_t kZeroBlock[256] = {};  // the file's block of a feature past N: zero quants and scales

// --- Packing, once at load: each format reads one file block per feature of a group (16 pointers) and writes the
// group's packed block (see "Layout"), 4 bytes at a time: 1.1 (Q4_K) to 7 (Q4_1) G weights/s a thread.

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline void put_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

constexpr uint32_t kLowNibbles = 0x0F0F0F0F;

// A sub-block's 4-bit layout from each feature's 8 words of quants (word t: k = 4t .. 4t + 3, a byte each, < 16):
// vector i, lane n holds word i in its low nibbles and word 4 + i in its high ones.
template <class Word>
void put_nibbles(uint8_t* out, Word&& word) {
  for (int n = 0; n < kLanes; ++n) {
    for (int i = 0; i < 4; ++i) put_u32(out + 64 * i + 4 * n, word(n, i) | word(n, 4 + i) << 4);
  }
}

// The 2-byte fp16 fields at `offset` of each feature's block, side by side (16 of them).
void put_fp16(const uint8_t* const (&rows)[kLanes], int offset, uint8_t* out) {
  for (int n = 0; n < kLanes; ++n) std::memcpy(out + 2 * n, rows[n] + offset, 2);
}

// Step s (k = 4s .. 4s + 3) of a sub-block in the 4-bit layout at p.
inline __m512i nibbles(const uint8_t* p, int s) {
  const __m512i v = _mm512_loadu_si512(p + 64 * (s & 3));
  return _mm512_and_si512(s < 4 ? v : _mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F));
}

inline __m512 fp16_vector(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// Each format: kBlock weights of a feature in kFileBytes in the file, a group's block in kBytes packed; kHalves:
// scales per 16 weights; kTwoGroupPasses: passes over two groups from kPairMinRows rows on (see "Work"). Unpack(p)
// reads a packed block's scales; quants(j, s) gives sub-block j's step s (16 features x 4 k, unsigned bytes),
// scales(j, half, ws, wm) its values' ws and wm.
struct Q8_0 {  // d * q, q int8: packed as q + 128
  static constexpr int64_t kBlock = 32, kFileBytes = 34, kBytes = 8 * 64 + 32;
  static constexpr bool kHalves = false;
  static constexpr bool kTwoGroupPasses = true;
  static constexpr int kOffsetSlot = 4;
  static void pack(const uint8_t* const (&rows)[kLanes], uint8_t* out) {
    for (int n = 0; n < kLanes; ++n) {
      for (int t = 0; t < 8; ++t) put_u32(out + 32 + 64 * t + 4 * n, u32_at(rows[n] + 2 + 4 * t) ^ 0x80808080);
    }
    put_fp16(rows, 0, out);
  }
  struct Unpack {
    const uint8_t* p;
    __m512 d;
    explicit Unpack(const uint8_t* block) : p(block), d(fp16_vector(block)) {}
    __m512i quants(int, int s) const { return _mm512_loadu_si512(p + 32 + 64 * s); }
    void scales(int, int, __m512& ws, __m512& wm) const { ws = d, wm = _mm512_mul_ps(d, _mm512_set1_ps(128.0f)); }
  };
};

// A Q4_0 / Q4_1 / Q5_0 block's 16 bytes at `offset` hold weight l < 16 in the low nibble of byte l and weight
// 16 + l in its high one: already the 4-bit layout's bytes, word i of each feature to lane n of vector i.
void put_small_nibbles(const uint8_t* const (&rows)[kLanes], int offset, uint8_t* out) {
  for (int n = 0; n < kLanes; ++n) {
    for (int i = 0; i < 4; ++i) put_u32(out + 64 * i + 4 * n, u32_at(rows[n] + offset + 4 * i));
  }
}

struct Q4_0 {  // d * (q - 8)
  static constexpr int64_t kBlock = 32, kFileBytes = 18, kBytes = 256 + 32;
  static constexpr bool kHalves = false;
  static constexpr bool kTwoGroupPasses = true;
  static constexpr int kOffsetSlot = 2;
  static void pack(const uint8_t* const (&rows)[kLanes], uint8_t* out) {
    put_fp16(rows, 0, out);
    put_small_nibbles(rows, 2, out + 32);
  }
  struct Unpack {
    const uint8_t* p;
    __m512 d;
    explicit Unpack(const uint8_t* block) : p(block), d(fp16_vector(block)) {}
    __m512i quants(int, int s) const { return nibbles(p + 32, s); }
    void scales(int, int, __m512& ws, __m512& wm) const { ws = d, wm = _mm512_mul_ps(d, _mm512_set1_ps(8.0f)); }
  };
};

struct Q4_1 {  // d * q + m
  static constexpr int64_t kBlock = 32, kFileBytes = 20, kBytes = 256 + 64;
  static constexpr bool kHalves = false;
  static constexpr bool kTwoGroupPasses = true;
  static constexpr int kOffsetSlot = -1;
  static void pack(const uint8_t* const (&rows)[kLanes], uint8_t* out) {
    put_fp16(rows, 0, out);
    put_fp16(rows, 2, out + 32);
    put_small_nibbles(rows, 4, out + 64);
  }
  struct Unpack {
    const uint8_t* p;
    __m512 d, m;
    explicit Unpack(const uint8_t* block) : p(block), d(fp16_vector(block)), m(fp16_vector(block + 32)) {}
    __m512i quants(int, int s) const { return nibbles(p + 64, s); }
    void scales(int, int, __m512& ws, __m512& wm) const {
      ws = d;
      wm = _mm512_sub_ps(_mm512_setzero_ps(), m);  // value = d q - (-m)
    }
  };
};

struct Q5_0 {  // d * (q - 16), the fifth bits in a 32-bit mask
  static constexpr int64_t kBlock = 32, kFileBytes = 22, kBytes = 256 + 64 + 32;
  static constexpr bool kHalves = false;
  static constexpr bool kTwoGroupPasses = true;
  static constexpr int kOffsetSlot = 3;
  static void pack(const uint8_t* const (&rows)[kLanes], uint8_t* out) {
    put_fp16(rows, 0, out);
    put_small_nibbles(rows, 6, out + 96);
    for (int n = 0; n < kLanes; ++n) {  // byte j: the fifth bits of k = j, 4 + j, 8 + j, ...
      const uint32_t fifth = u32_at(rows[n] + 2);
      for (int j = 0; j < 4; ++j) out[32 + 4 * n + j] = static_cast<uint8_t>(_pext_u32(fifth, 0x11111111u << j));
    }
  }
  struct Unpack {
    const uint8_t* p;
    __m512 d;
    explicit Unpack(const uint8_t* block) : p(block), d(fp16_vector(block)) {}
    __m512i quants(int, int s) const {
      const __m512i low = nibbles(p + 96, s);
      const __mmask64 fifth = _mm512_test_epi8_mask(_mm512_loadu_si512(p + 32), _mm512_set1_epi8(1 << s));
      return _mm512_mask_add_epi8(low, fifth, low, _mm512_set1_epi8(16));
    }
    void scales(int, int, __m512& ws, __m512& wm) const { ws = d, wm = _mm512_mul_ps(d, _mm512_set1_ps(16.0f)); }
  };
};

// d, dmin, scales[12] (8 6-bit scales and mins, ggml's get_scale_min_k4), qs[128]: sub-block c's weight l is
// the low (c even) or high nibble of qs[32 (c / 2) + l]; value d sc[c] q - dmin m[c]. Packed: d, dmin, the file's
// 12 bytes of scales as three vectors (lane n: bytes 4v .. 4v + 3 of feature n's), then the quants: the file's
// 144 bytes a feature. NOTE: the scales stay 6-bit, unpacked in registers at each fold (a few logic operations and
// one byte shuffle each, about what loading them widened took): unpacked at load to a byte each they were 4.625
// bits a weight, and at M=1 the bytes are the time.
struct Q4_K {
  static constexpr int64_t kBlock = 256, kFileBytes = 144, kBytes = 8 * 256 + 3 * 64 + 2 * 32;
  static constexpr bool kHalves = false;
  static constexpr bool kTwoGroupPasses = true;
  static constexpr int kOffsetSlot = -1;
  static void pack(const uint8_t* const (&rows)[kLanes], uint8_t* out) {
    for (int c = 0; c < 8; ++c) {
      put_nibbles(out + 256 + 256 * c, [&](int n, int t) {
        const uint32_t word = u32_at(rows[n] + 16 + 32 * (c / 2) + 4 * t);
        return (c % 2 ? word >> 4 : word) & kLowNibbles;
      });
    }
    for (int n = 0; n < kLanes; ++n) {
      for (int v = 0; v < 3; ++v) put_u32(out + 64 + 64 * v + 4 * n, u32_at(rows[n] + 4 + 4 * v));
    }
    put_fp16(rows, 0, out);
    put_fp16(rows, 2, out + 32);
  }
  struct Unpack {
    const uint8_t* p;
    __m512 d, dmin;
    explicit Unpack(const uint8_t* block) : p(block), d(fp16_vector(block)), dmin(fp16_vector(block + 32)) {}
    __m512i quants(int j, int s) const { return nibbles(p + 256 + 256 * j, s); }
    // Sub-block j's scale and min (get_scale_min_k4 on the file's bytes: a = scales[0..3], b = [4..7], c = [8..11]):
    // j < 4: the low 6 bits of byte j of a and of b; else the low and the high nibble of byte j - 4 of c, under the
    // top 2 bits of byte j - 4 of a and of b. Each lane's byte j % 4 is then moved to its lane's low byte.
    void scales(int j, int, __m512& ws, __m512& wm) const {
      const __m512i a = _mm512_loadu_si512(p + 64), b = _mm512_loadu_si512(p + 128);
      __m512i sc, m;
      if (j < 4) {
        sc = _mm512_and_si512(a, _mm512_set1_epi8(0x3F));
        m = _mm512_and_si512(b, _mm512_set1_epi8(0x3F));
      } else {
        const __m512i c = _mm512_loadu_si512(p + 192), top = _mm512_set1_epi8(0x30), low = _mm512_set1_epi8(0x0F);
        sc = _mm512_or_si512(_mm512_and_si512(c, low), _mm512_and_si512(_mm512_srli_epi16(a, 2), top));
        m = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(c, 4), low),
                            _mm512_and_si512(_mm512_srli_epi16(b, 2), top));
      }
      const int r = j % 4;  // in each 128-bit lane, word k's low byte from byte 4k + r, the others zero
      const auto word = [r](int k) { return static_cast<int>(0x80808000u | (4 * k + r)); };
      const __m512i pick = _mm512_set4_epi32(word(3), word(2), word(1), word(0));
      ws = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_shuffle_epi8(sc, pick)));
      wm = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_shuffle_epi8(m, pick)));
    }
  };
};

// ql[128], qh[64], scales[16] (int8, one per 16 weights), d: weight 32c + l (c = 4h + s) is d * scale[2c + l / 16]
// * (q - 32), q = 4 bits of ql[64h + 32(s % 2) + l] (high ones for s >= 2) with bits 2s, 2s + 1 of qh[32h + l]
// above them. Packed: d, the 16 scales as bytes, then per sub-block the low 4 bits as the 4-bit layout and the
// top 2 in two vectors (step t in bits 2 (t / 2) of vector t % 2).
struct Q6_K {
  static constexpr int64_t kBlock = 256, kFileBytes = 210, kBytes = 8 * 256 + 8 * 128 + 16 * 16 + 32;
  static constexpr bool kHalves = true;
  static constexpr bool kTwoGroupPasses = false;
  static constexpr int kOffsetSlot = 5;
  static void pack(const uint8_t* const (&rows)[kLanes], uint8_t* out) {
    for (int c = 0; c < 8; ++c) {
      const int h = c / 4, s = c % 4;
      put_nibbles(out + 288 + 384 * c, [&](int n, int t) {
        const uint32_t word = u32_at(rows[n] + 64 * h + 32 * (s % 2) + 4 * t);
        return (s >= 2 ? word >> 4 : word) & kLowNibbles;
      });
      for (int n = 0; n < kLanes; ++n) {
        uint32_t top[2] = {0, 0};  // step t's 2-bit fields at bits 2 (t / 2) of word t % 2
        for (int t = 0; t < 8; ++t) {
          const uint32_t bits = (u32_at(rows[n] + 128 + 32 * h + 4 * t) >> (2 * s)) & 0x03030303u;
          top[t % 2] |= bits << (2 * (t / 2));
        }
        put_u32(out + 288 + 384 * c + 256 + 4 * n, top[0]);
        put_u32(out + 288 + 384 * c + 320 + 4 * n, top[1]);
      }
    }
    for (int i = 0; i < 16; ++i) {
      for (int n = 0; n < kLanes; ++n) out[32 + 16 * i + n] = rows[n][192 + i];
    }
    put_fp16(rows, 208, out);
  }
  struct Unpack {
    const uint8_t* p;
    __m512 d;
    explicit Unpack(const uint8_t* block) : p(block), d(fp16_vector(block)) {}
    __m512i quants(int j, int s) const {
      const __m512i top = _mm512_loadu_si512(p + 288 + 384 * j + 256 + 64 * (s % 2));
      const int t = s / 2;  // bits 2t, 2t + 1 of each byte, moved to bits 4, 5
      const __m512i moved = t == 0 ? _mm512_slli_epi16(top, 4) : t == 1 ? _mm512_slli_epi16(top, 2) :
                            t == 2 ? top : _mm512_srli_epi16(top, 2);
      return _mm512_or_si512(nibbles(p + 288 + 384 * j, s), _mm512_and_si512(moved, _mm512_set1_epi8(0x30)));
    }
    void scales(int j, int half, __m512& ws, __m512& wm) const {
      const __m128i sc = _mm_loadu_si128((const __m128i*)(p + 32 + 16 * (2 * j + half)));
      ws = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
      wm = _mm512_mul_ps(ws, _mm512_set1_ps(32.0f));
    }
  };
};

// --- The product.

// MR rows of x (quants at q, row m at q + m q_stride; block sums likewise) times G consecutive groups' packed
// blocks (group i at w + i group_bytes), over all of K, rounded to bf16 into out (row m at out + m out_stride, group
// i's 16 columns at + 16 i), the last group's first `last_features` lanes.
// NOTE: not inlined, as dense_tile (quant.cpp): inlined into the dispatch, the accumulators went to memory.
template <class F, int G, int MR>
__attribute__((noinline)) void group_pass(const int8_t* q, int64_t q_stride, const float* sums, int64_t sums_stride,
                                          const uint8_t* w, int64_t group_bytes, int64_t K, void* out,
                                          int64_t out_stride, int last_features, bool widened, const uint8_t* ahead,
                                          int64_t ahead_lines) {
  constexpr int kSubBlocks = F::kBlock / kSub;
  // Independent integer sums per row, added at each fold (exact: any split gives the same sum): one chain of 8
  // dependent vpdpbusd (~5 cycles each) per sub-block held M=1 to ~22 GB/s.
  constexpr int kChains = G * MR == 1 ? 4 : G * MR == 2 ? 2 : 1;
  __m512 acc[G][MR];
  for (auto& group : acc) {
    for (auto& row : group) row = _mm512_setzero_ps();
  }
  const int64_t blocks = K / F::kBlock, lines_per_block = (ahead_lines + blocks - 1) / blocks;
  for (int64_t b = 0; b < blocks; ++b) {
    const auto unpack = [&]<size_t... I>(std::index_sequence<I...>) {
      return std::array<typename F::Unpack, G>{typename F::Unpack(w + I * group_bytes + b * F::kBytes)...};
    }(std::make_index_sequence<G>());
    for (int64_t line = b * lines_per_block; line < std::min(ahead_lines, (b + 1) * lines_per_block); ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + 64 * line), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int j = 0; j < kSubBlocks; ++j) {
      const int64_t xb = b * kSubBlocks + j;  // x's block
      __m512i isum[kChains][G][MR];
      // Each row's integer sum starts at the weights' offset times sum(qx) (negated; 0 for the types with a min),
      // so that it ends as the exact sum of the signed products.
      const auto start = [&](int half) {
        for (int m = 0; m < MR; ++m) {
          for (int g = 0; g < G; ++g) {
            for (auto& chain : isum) chain[g][m] = _mm512_setzero_si512();
            if constexpr (F::kOffsetSlot >= 0) {
              int32_t offset;
              std::memcpy(&offset, sums + m * sums_stride + xb * kSums + F::kOffsetSlot + half, 4);
              isum[0][g][m] = _mm512_set1_epi32(offset);
            }
          }
        }
      };
      // The (half) sub-block's integer sums into the fp32 accumulators: the one sequence of fp32 operations.
      const auto fold = [&](int half) {
        __m512 ws[G], wm[G];
        for (int g = 0; g < G; ++g) unpack[g].scales(j, half, ws[g], wm[g]);
        for (int m = 0; m < MR; ++m) {
          const float* s = sums + m * sums_stride + xb * kSums;
          for (int g = 0; g < G; ++g) {
            __m512i total = isum[0][g][m];
            for (int c = 1; c < kChains; ++c) total = _mm512_add_epi32(total, isum[c][g][m]);
            acc[g][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(ws[g], _mm512_set1_ps(s[0])),
                                        acc[g][m]);
            if constexpr (F::kOffsetSlot < 0) acc[g][m] = _mm512_fnmadd_ps(wm[g], _mm512_set1_ps(s[1]), acc[g][m]);
          }
        }
      };
      start(0);
#pragma GCC unroll 8
      for (int s = 0; s < 8; ++s) {
        __m512i wq[G];
        for (int g = 0; g < G; ++g) wq[g] = unpack[g].quants(j, s);
        for (int m = 0; m < MR; ++m) {
          int32_t x4;
          std::memcpy(&x4, q + m * q_stride + xb * kSub + 4 * s, 4);
          const __m512i x = _mm512_set1_epi32(x4);
          for (int g = 0; g < G; ++g) {
            isum[s % kChains][g][m] = _mm512_dpbusd_epi32(isum[s % kChains][g][m], wq[g], x);
          }
        }
        if (F::kHalves && s == 3) {
          fold(0);
          start(1);
        }
      }
      fold(F::kHalves ? 1 : 0);
    }
  }
  for (int g = 0; g < G; ++g) {
    const int features = g + 1 < G ? kLanes : last_features;
    for (int m = 0; m < MR; ++m) {
      if (widened) {  // NOTE: a vocabulary's logits outgrow the caches: streamed past them, not read for ownership
        float* o = static_cast<float*>(out) + m * out_stride + g * kLanes;
        if (features == kLanes && (reinterpret_cast<uintptr_t>(o) & 63) == 0) {
          _mm512_stream_ps(o, bf16_round_trip(acc[g][m]));
        } else {
          _mm512_mask_storeu_ps(o, tail_mask(features), bf16_round_trip(acc[g][m]));
        }
      } else {
        _mm256_mask_storeu_epi16(static_cast<bf16*>(out) + m * out_stride + g * kLanes, tail_mask(features),
                                 round_bf16(acc[g][m]));
      }
    }
  }
}

// group_pass for `rows` (1 .. MR) rows.
template <class F, int G, int MR, class... Args>
void pass_rows(int64_t rows, Args... args) {
  if constexpr (MR > 1) {
    if (rows < MR) return pass_rows<F, G, MR - 1>(rows, args...);
  }
  group_pass<F, G, MR>(args...);
}

// Rows [row_begin, row_begin + rows) of x times groups [group_begin, group_end) of a weight (N x K, packed), into
// out (row m at out + m N, of 2 bytes a value or 4 widened): one work item of linear() or int8_moe.
template <class F>
void multiply_groups(const int8_t* q, const float* sums, int64_t K, const uint8_t* packed, int64_t N,
                     int64_t row_begin, int64_t rows, int64_t group_begin, int64_t group_end, void* out,
                     bool widened) {
  const int64_t groups = groups_of(N), group_bytes = K / F::kBlock * F::kBytes;
  const int unit = F::kTwoGroupPasses && rows >= kPairMinRows ? 2 : 1;  // groups per pass
  for (int64_t g = group_begin; g < group_end; g += unit) {
    const int here_groups = static_cast<int>(std::min<int64_t>(unit, group_end - g));
    const int max_rows = here_groups == 2 ? kPairRows : kMaxRows;
    const int64_t passes = (rows + max_rows - 1) / max_rows;
    // NOTE: with several passes, the next unit's weights are prefetched, a share in each pass: left to the
    // hardware, the first pass waited on memory for each group (bursts of 9 lines per 100 cycles) and the others
    // none: Q8_0 65536 x 640 at M=64 ran at 195 GFLOP/s a thread against 320 for weights in L2. One pass (up to 8
    // rows over one group) reads the weight as one steady stream, which the hardware prefetches.
    const int64_t ahead_groups = std::min<int64_t>(unit, groups - g - here_groups);
    const int64_t ahead_total = (ahead_groups * group_bytes + 63) / 64;
    const int64_t pass_lines = passes > 1 ? (ahead_total + passes - 1) / passes : 0;
    const int last_features = static_cast<int>(std::min<int64_t>(kLanes, N - (g + here_groups - 1) * kLanes));
    for (int64_t p = 0, m = row_begin; p < passes; ++p) {  // passes as even as they go (10 rows: 5 + 5)
      const int64_t left = row_begin + rows - m, here = (left + passes - p - 1) / (passes - p);
      const int8_t* qm = q + m * K;
      const float* sm = sums + m * (K / kSub * kSums);
      void* om = static_cast<char*>(out) + (m * N + g * kLanes) * (widened ? 4 : 2);
      const uint8_t* wg = packed + g * group_bytes;
      const int64_t qs = K, ss = K / kSub * kSums;
      const uint8_t* ahead = wg + here_groups * group_bytes + 64 * p * pass_lines;
      const int64_t ahead_lines = std::clamp<int64_t>(ahead_total - p * pass_lines, 0, pass_lines);
      if (here_groups == 2) {
        pass_rows<F, 2, kPairRows>(here, qm, qs, sm, ss, wg, group_bytes, K, om, N, last_features, widened, ahead,
                                   ahead_lines);
      } else {
        pass_rows<F, 1, kMaxRows>(here, qm, qs, sm, ss, wg, group_bytes, K, om, N, last_features, widened, ahead,
                                  ahead_lines);
      }
      m += here;
    }
  }
}

// Runs work(item) for items 0 .. items - 1 on up to `workers` threads, each taking the next item from a shared
// counter (2 shared cores: a thread slowed by another process leaves its items to the other).
template <class Work>
void share_items(int64_t items, int64_t workers, Work&& work) {
  std::atomic<int64_t> next{0};
  const auto take = [&](int64_t, int64_t) {
    for (int64_t item; (item = next.fetch_add(1)) < items;) work(item);
    _mm_sfence();  // the widened outputs' streamed lines
  };
  if (workers == 1) {
    take(0, 1);
  } else {
    at::parallel_for(0, workers, 1, take);
  }
}

template <class F>
void linear(const int8_t* q, const float* sums, int64_t M, int64_t K, const uint8_t* packed, int64_t N, void* out,
            bool widened) {
  const int64_t groups = groups_of(N);
  const int64_t panel_most = std::max<int64_t>(kMaxRows, kPanelBytes / K);
  const int64_t panels = (M + panel_most - 1) / panel_most, panel_rows = (M + panels - 1) / panels;
  const int unit = F::kTwoGroupPasses && panel_rows >= kPairMinRows ? 2 : 1;  // groups per pass
  const int64_t threads = at::get_num_threads();
  // Enough items for the threads to even out (8 each), runs of whole units: rounded down, not up (SmolLM2's 36 groups
  // on 2 threads: 18 runs of 2, where 9 runs of 4 left one thread a run more, 0.97x the one-group passes at M=64).
  const int64_t wanted_runs = std::min(groups, std::max<int64_t>(1, 8 * threads / panels));
  const int64_t run_groups = std::max<int64_t>(unit, (groups + wanted_runs - 1) / wanted_runs / unit * unit);
  const int64_t runs = (groups + run_groups - 1) / run_groups, items = panels * runs;
  // At least ~64k weights per thread: waking the second thread costs more below.
  const int64_t workers = std::min({threads, items, std::max<int64_t>(1, N * K / 65536)});
  share_items(items, workers, [&](int64_t item) {
    const int64_t panel = item / runs, run = item % runs;
    const int64_t row_begin = panel * panel_rows, rows = std::min(M, row_begin + panel_rows) - row_begin;
    multiply_groups<F>(q, sums, K, packed, N, row_begin, rows, run * run_groups,
                       std::min(groups, (run + 1) * run_groups), out, widened);
  });
}

// --- The ops.

// Calls fn with a value-initialized format struct of the type, or fails naming the types served.
template <class Fn>
void with_format(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case kQ8_0: return fn(Q8_0{});
    case kQ4_0: return fn(Q4_0{});
    case kQ4_1: return fn(Q4_1{});
    case kQ5_0: return fn(Q5_0{});
    case kQ4_K: return fn(Q4_K{});
    case kQ6_K: return fn(Q6_K{});
    default: TORCH_CHECK(false, "quantized type ", qtype, " has no int8 kernel (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K "
                         "are 8, 2, 3, 6, 12, 14)");
  }
}

// One row of K values as quantize_rows gives it: K int8 at q, K / 32 blocks of kSums at sums.
void quantize_row(const bf16* x, int64_t K, int8_t* q, float* sums) {
  for (int64_t b = 0; b < K / kSub; ++b) {
    const bf16* v = x + b * kSub;
    const __m512 low = load_bf16(v, 0xFFFF), high = load_bf16(v + 16, 0xFFFF);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
    const float d = amax / 127.0f, inverse = d == 0.0f ? 0.0f : 1.0f / d;
    const auto quantize = [&](__m512 values) {  // nearest-even (MXCSR's default), within +-127
      const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(values, _mm512_set1_ps(inverse)));
      return _mm512_max_epi32(_mm512_set1_epi32(-127), _mm512_min_epi32(_mm512_set1_epi32(127), r));
    };
    const __m512i q_low = quantize(low), q_high = quantize(high);
    _mm_storeu_si128((__m128i*)(q + b * kSub), _mm512_cvtepi32_epi8(q_low));
    _mm_storeu_si128((__m128i*)(q + b * kSub + 16), _mm512_cvtepi32_epi8(q_high));
    const int sum_low = _mm512_reduce_add_epi32(q_low), sum_high = _mm512_reduce_add_epi32(q_high);
    float* s = sums + b * kSums;
    const int sum = sum_low + sum_high;
    const int32_t offsets[6] = {-8 * sum, -16 * sum, -128 * sum, -32 * sum_low, -32 * sum_high, 0};
    s[0] = d;
    s[1] = d * static_cast<float>(sum);
    std::memcpy(s + 2, offsets, sizeof(offsets));
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
              "x must be bf16 [M, K] with contiguous rows, not ", x.scalar_type(), " ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K > 0 && K % kSub == 0, "in_features ", K, " is not a multiple of ", kSub);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor sums = at::empty({M, K / kSub, kSums}, x.options().dtype(at::kFloat));
  const bf16* xp = x.data_ptr<bf16>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = sums.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) quantize_row(xp + m * x.stride(0), K, qp + m * K, sp + m * (K / kSub * kSums));
  });
  return {q, sums};
}

// An uninitialized tensor in a mapping of its own, 2 MB-aligned and advised as transparent huge pages.
// NOTE: a weight is read end to end at every step (at M=1 the bytes are the time), and in 4 KB pages each page is a
// TLB miss, a page walk that under virtualization walks two tables: reading 1 GiB with 2 threads here ran at 3.5
// GB/s in 4 KB pages against 5.8 in 2 MB ones (under load 13; best of 20 rounds each, alternated). This kernel's THP
// setting is "madvise", so memory from at::empty stays in 4 KB pages; and a fresh mapping, not the heap's memory
// (posix_memalign gave 60% of the 1B's weights in huge pages): pages already faulted in stay 4 KB. Below 2 MB,
// or where the mapping fails, at::empty.
at::Tensor empty_in_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr uintptr_t kHugePage = 2 << 20, kPage = 4096;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kHugePage) return at::empty(sizes, options);
  const size_t length = (bytes + kPage - 1) / kPage * kPage, mapped = length + kHugePage;
  void* region = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED) return at::empty(sizes, options);
  const uintptr_t first = reinterpret_cast<uintptr_t>(region), start = (first + kHugePage - 1) / kHugePage * kHugePage;
  if (start > first) munmap(region, start - first);  // the mapping trimmed to [start, start + length)
  if (first + mapped > start + length) munmap(reinterpret_cast<void*>(start + length), first + mapped - start - length);
  void* memory = reinterpret_cast<void*>(start);
  madvise(memory, length, MADV_HUGEPAGE);  // advice: where it is refused, the memory works in 4 KB pages
  return at::from_blob(memory, sizes, [length](void* p) { munmap(p, length); }, options);
}

at::Tensor int8_pack(const at::Tensor& blocks, int64_t qtype, int64_t in_features) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.stride(1) == 1,
              "blocks must be uint8 [N, row_bytes] with contiguous rows");
  at::Tensor packed;
  with_format(qtype, [&](auto format) {
    using F = decltype(format);
    const int64_t N = blocks.size(0), K = in_features, per_row = K / F::kBlock;
    TORCH_CHECK(K > 0 && K % F::kBlock == 0, "in_features ", K, " is not a multiple of the type's block of ",
                F::kBlock);
    TORCH_CHECK(blocks.size(1) == per_row * F::kFileBytes, "blocks have ", blocks.size(1), " bytes a row, ",
                per_row * F::kFileBytes, " expected for ", K, " weights");
    packed = empty_in_huge_pages({groups_of(N), per_row, F::kBytes}, blocks.options());
    const uint8_t* w = blocks.data_ptr<uint8_t>();
    uint8_t* out = packed.data_ptr<uint8_t>();
    const int64_t stride = blocks.stride(0);
    at::parallel_for(0, groups_of(N), 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        for (int64_t b = 0; b < per_row; ++b) {
          const uint8_t* rows[kLanes];
          for (int n = 0; n < kLanes; ++n) {
            const int64_t feature = g * kLanes + n;
            rows[n] = feature < N ? w + feature * stride + b * F::kFileBytes : kZeroBlock;
          }
          F::pack(rows, out + (g * per_row + b) * F::kBytes);
        }
      }
    });
  });
  return packed;
}

at::Tensor int8_linear(const at::Tensor& q, const at::Tensor& sums, const at::Tensor& packed, int64_t qtype,
                       int64_t out_features, bool widened) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "q must be quantize_rows' int8 [M, K]");
  const int64_t M = q.size(0), K = q.size(1), N = out_features;
  TORCH_CHECK(sums.scalar_type() == at::kFloat && sums.is_contiguous() && sums.dim() == 3 && sums.size(0) == M &&
              sums.size(1) == K / kSub && sums.size(2) == kSums, "sums must be quantize_rows' fp32 [M, K / 32, 8]");
  at::Tensor out = at::empty({M, N}, q.options().dtype(widened ? at::kFloat : at::kBFloat16));
  with_format(qtype, [&](auto format) {
    using F = decltype(format);
    TORCH_CHECK(K > 0 && K % F::kBlock == 0 && N > 0, "in_features ", K, " is not a multiple of the type's block of ",
                F::kBlock, " (or no out_features)");
    const std::vector<int64_t> expected = {groups_of(N), K / F::kBlock, F::kBytes};
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.sizes() == expected,
                "packed must be int8_pack's uint8 ", at::IntArrayRef(expected), " for ", N, " x ", K, ", not ",
                packed.sizes());
    if (M == 0) return;
    linear<F>(q.data_ptr<int8_t>(), sums.data_ptr<float>(), M, K, packed.data_ptr<uint8_t>(), N, out.data_ptr(),
              widened);
  });
  return out;
}

// --- A mixture-of-experts layer's routed experts in one call (int8_moe; models/int8_dot.py's GroupedInt8Experts).

// One projection of every expert: each expert's packed weight, and its type's multiply_groups.
struct ExpertProjection {
  std::vector<const uint8_t*> packed;
  void (*multiply)(const int8_t*, const float*, int64_t, const uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                   void*, bool);
};

ExpertProjection expert_projection(at::TensorList packed, int64_t qtype, int64_t N, int64_t K, const char* name) {
  ExpertProjection projection{{}, nullptr};
  with_format(qtype, [&](auto format) {
    using F = decltype(format);
    TORCH_CHECK(K % F::kBlock == 0, name, "'s in_features ", K, " is not a multiple of the type's block of ",
                F::kBlock);
    const std::vector<int64_t> expected = {groups_of(N), K / F::kBlock, F::kBytes};
    for (const at::Tensor& weight : packed) {
      TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous() && weight.sizes() == expected, "each ",
                  name, " weight must be int8_pack's uint8 ", at::IntArrayRef(expected), " for ", N, " x ", K,
                  ", not ", weight.sizes());
      projection.packed.push_back(weight.data_ptr<uint8_t>());
    }
    projection.multiply = &multiply_groups<F>;
  });
  return projection;
}

// The layer's pairs grouped by expert and their rows quantized, by the calling thread (~10 us at a decode step's 64
// rows); then items of (expert, panel of its rows), each the panel's gate_up, SiLU(gate) * up and its quantization,
// and down, taken by the threads from one counter; then each token's weighted sum. NOTE: an item depends on no other
// (one thread does an expert's panel from end to end): with items split by output groups, a thread waited (spinning)
// for an expert's gate_up to end before its down, and on these 2 shared cores the thread it waited on was often
// descheduled: a layer took 8-12 ms in multiples of the scheduler's 4 ms tick against 1.7 ms on one thread. Whole
// experts leave at most one (~1 MB of Q4_K weights, ~30 us) to the last thread.
at::Tensor int8_moe(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights, at::TensorList gate_up,
                    int64_t gate_up_qtype, at::TensorList down, int64_t down_qtype, int64_t intermediate_size) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
              "x must be bf16 [T, hidden] with contiguous rows, not ", x.scalar_type(), " ", x.sizes());
  const int64_t T = x.size(0), H = x.size(1), F = intermediate_size, E = static_cast<int64_t>(gate_up.size());
  TORCH_CHECK(experts.scalar_type() == at::kLong && experts.dim() == 2 && experts.size(0) == T &&
              experts.is_contiguous(), "experts must be int64 [T, top_k], contiguous");
  const int64_t k = experts.size(1), R = T * k;
  TORCH_CHECK((weights.scalar_type() == at::kBFloat16 || weights.scalar_type() == at::kFloat) &&
              weights.sizes() == experts.sizes() && weights.is_contiguous(),
              "weights must be bf16 or fp32 [T, top_k] as experts, contiguous");
  TORCH_CHECK(static_cast<int64_t>(down.size()) == E, gate_up.size(), " gate_up weights but ", down.size(), " down");
  TORCH_CHECK(H % kSub == 0 && F > 0 && F % kSub == 0, "hidden ", H, " and intermediate ", F,
              " must be multiples of ", kSub);
  const ExpertProjection up = expert_projection(gate_up, gate_up_qtype, 2 * F, H, "gate_up");
  const ExpertProjection dn = expert_projection(down, down_qtype, H, F, "down");
  at::Tensor out = at::empty({T, H}, x.options());
  if (T == 0) return out;

  // The (token, expert) pairs grouped by expert: pair i (token i / k's choice i % k) is row row_of[i]; expert e's
  // rows are first[e] .. first[e + 1] - 1. (Their order within an expert changes no bits: each row's are its own.)
  const int64_t* chosen = experts.data_ptr<int64_t>();
  std::vector<int64_t> first(E + 1, 0), row_of(R);
  for (int64_t i = 0; i < R; ++i) {
    TORCH_CHECK(chosen[i] >= 0 && chosen[i] < E, "expert ", chosen[i], " of a layer of ", E);
    ++first[chosen[i] + 1];
  }
  for (int64_t e = 0; e < E; ++e) first[e + 1] += first[e];
  std::vector<int64_t> next_row(first.begin(), first.end() - 1);
  for (int64_t i = 0; i < R; ++i) row_of[i] = next_row[chosen[i]]++;

  // Scratch: the rows quantized, gate_up's outputs, the activations (bf16, then quantized), down's outputs.
  const int64_t sums_h = H / kSub * kSums, sums_f = F / kSub * kSums;
  at::Tensor scratch = at::empty({R * (H + 4 * sums_h + 4 * F + 2 * F + F + 4 * sums_f + 2 * H)},
                                 x.options().dtype(at::kByte));
  uint8_t* cursor = scratch.data_ptr<uint8_t>();
  const auto carve = [&](int64_t n) {
    uint8_t* p = cursor;
    cursor += n;
    return p;
  };
  int8_t* qx = reinterpret_cast<int8_t*>(carve(R * H));
  float* sx = reinterpret_cast<float*>(carve(R * 4 * sums_h));
  bf16* hidden = reinterpret_cast<bf16*>(carve(R * 4 * F));
  bf16* act = reinterpret_cast<bf16*>(carve(R * 2 * F));
  int8_t* qa = reinterpret_cast<int8_t*>(carve(R * F));
  float* sa = reinterpret_cast<float*>(carve(R * 4 * sums_f));
  bf16* y = reinterpret_cast<bf16*>(carve(R * 2 * H));

  const bf16* xp = x.data_ptr<bf16>();
  for (int64_t i = 0; i < R; ++i) quantize_row(xp + i / k * x.stride(0), H, qx + row_of[i] * H, sx + row_of[i] * sums_h);

  struct Item {
    int64_t expert, row_begin, rows;
  };
  std::vector<Item> items;
  const int64_t panel_most = std::max<int64_t>(kMaxRows, kPanelBytes / std::max(H, F));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = first[e + 1] - first[e], panels = (rows + panel_most - 1) / panel_most;
    for (int64_t panel = 0; panel < panels; ++panel) {
      const int64_t panel_rows = (rows + panels - 1) / panels, begin = panel * panel_rows;
      items.push_back({e, first[e] + begin, std::min(rows, begin + panel_rows) - begin});
    }
  }
  const int64_t gate_up_groups = groups_of(2 * F), down_groups = groups_of(H);
  share_items(static_cast<int64_t>(items.size()), at::get_num_threads(), [&](int64_t index) {
    const Item& item = items[index];
    up.multiply(qx, sx, H, up.packed[item.expert], 2 * F, item.row_begin, item.rows, 0, gate_up_groups, hidden, false);
    for (int64_t r = item.row_begin; r < item.row_begin + item.rows; ++r) {
      gated_mul_row(hidden + r * 2 * F, F, act + r * F, silu_rounded);
      quantize_row(act + r * F, F, qa + r * F, sa + r * sums_f);
    }
    dn.multiply(qa, sa, F, dn.packed[item.expert], H, item.row_begin, item.rows, 0, down_groups, y, false);
  });

  // Each token's k rows times their weights (rounded to bf16 where the weights are bf16, as torch's bf16 product),
  // summed in fp32 from zero in the token's top-k order (torch's sum over that dim), rounded once.
  const bool bf16_weights = weights.scalar_type() == at::kBFloat16;
  const void* wp = weights.data_ptr();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, T, std::max<int64_t>(1, 65536 / (k * H)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t c = 0; c < H; c += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < k; ++j) {
          const float w = bf16_weights ? static_cast<float>(static_cast<const bf16*>(wp)[t * k + j])
                                       : static_cast<const float*>(wp)[t * k + j];
          const __m512 product = _mm512_mul_ps(load_bf16(y + row_of[t * k + j] * H + c, 0xFFFF), _mm512_set1_ps(w));
          acc = _mm512_add_ps(acc, bf16_weights ? bf16_round_trip(product) : product);
        }
        store_bf16(op + t * H + c, acc, 0xFFFF);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TOKENMILL_OPS, m) {
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)", &quantize_rows);
  m.def("int8_pack(Tensor blocks, int qtype, int in_features) -> Tensor", &int8_pack);
  m.def("int8_linear(Tensor q, Tensor sums, Tensor packed, int qtype, int out_features, bool widened=False) -> Tensor",
        &int8_linear);
  m.def("int8_moe(Tensor x, Tensor experts, Tensor weights, Tensor[] gate_up, int gate_up_qtype, Tensor[] down, "
        "int down_qtype, int intermediate_size) -> Tensor", &int8_moe);
}

#endif  // __AVX512VNNI__

// Matrix products with weights kept in GGUF's own quantized block formats (ggml's blocks, bytes
// exactly as in the file), and the dequantization they are checked against; and with plain weights
// (a model's bf16 or fp32 ones, packed once), see "Plain weights" below. Both batch-invariant.
//
// A weight [N, K] of type T is a uint8 tensor [N, K / block * type_size]: each row is K / block
// consecutive ggml blocks (gguf.GGML_QUANT_SIZES[T] = (block, type_size)). Types: Q8_0, Q4_0, Q4_1,
// Q5_0, Q5_1 (blocks of 32), Q4_K, Q5_K, Q6_K (blocks of 256 in sub-blocks of 32 or 16).
//
// - dequantize(blocks [N, row_bytes] uint8, qtype, in_features K, out=None) -> [N, K] bf16: each value
//   is the fp32 value gguf's numpy dequantization computes (the same fp32 operations in the same
//   order), rounded to nearest-even bf16 as torch rounds (every NaN 0xFFFF). Bit for bit. Into `out`
//   (contiguous bf16 [N, K]) when given: a fresh tensor of a whole weight costs more in page faults
//   than the decoding (67 MB: 2.5 GB/s written fresh, 30-45 GB/s into a buffer).
// - quant_linear(x [M, K] bf16 or fp32 rows contiguous, blocks [N, row_bytes] uint8, qtype) -> [M, N]
//   of x's dtype: x W^T, with W the bf16 values dequantize gives for bf16 x, and W the exact fp32
//   values (gguf's numpy values, unrounded) for fp32 x, the accuracy mode: SmolLM2 Q4_1 agrees with
//   transformers on its fp32 dequantization at 96.0% top-1 on bf16 activations, 99.4% with only its
//   weights rounded to bf16. Batch-invariant: out[m, n] depends on x[m] and W[n] only, never on M or
//   the other rows, bit for bit.
// - quantize_q8_0(weight [N, K] bf16 or fp32) -> [N, K / 32 * 34] uint8: the Q8_0 blocks of
//   gguf.quants.quantize byte for byte (finite weights).
//
// Every 32 consecutive weights of a row are decoded into one "chunk": one zmm of 32 bf16, or for fp32 x
// two zmm of 16 fp32 (Bf16Values, Fp32Values). The 4- and 5-bit types go through a table of the
// block's (or sub-block's) 16 or 32 possible values, computed in fp32 (rounded once to bf16 for the
// bf16 form), indexed by the quants (vpermw; vpermt2ps on fp32); Q8_0 and Q6_K widen the quants to
// fp32. Each (m, n) is one chain over its row, a chunk at a time in order, of `dot_pairs` (vdpbf16ps)
// on bf16 or of FMAs on fp32 (lane i sums the products of k = i mod 16, in order of k); its 16 lanes
// are summed by one fixed tree at the end (then rounded to bf16 for bf16 x): every path below
// (registers or scratch, any M) computes exactly that sequence, hence batch invariance.
// Work is split over tiles of 4 weight rows. Up to kMaxFusedRows rows of x, chunks are decoded
// straight into registers and used at once (M=1 reads the weights at 80-95% of the memory's speed);
// beyond, a tile is decoded once (per panel of x) into a per-thread scratch that a 6 x 4
// register-tiled kernel reads for every 6 rows of x. Decoding costs as much as the products up to M
// of about 8 (on Zen 4: ~6 vector instructions per chunk for Q4_K, ~9 for Q8_0 and Q6_K, against one
// vdpbf16ps per chunk and row of x); from M ~ 16 oneDNN's bf16 GEMM on dequantized weights is faster
// per flop (benchmarks/bench_quant_kernels.py). On fp32 x (2048 x 8192, 2 threads): M=1 Q8_0 as fast
// as on bf16 x, Q4_K 1.5x slower (decoding-bound: 4 lookups a chunk); M=32 and 256 at 140-170
// GFLOP/s, 2.5x the bf16 time, as fast as torch's fp32 matmul on the dequantized weights.
//
// Plain weights (namespace dense):
// - pack_dense(weight [N, K] bf16 or fp32) -> the weight in the dense kernel's layout, made once at load:
//   blocks of 16 output features, each a run over k of 64-byte vectors, lane i holding feature 16b + i.
//   bf16: [ceil(N / 16), ceil(K / 2), 16, 2], a lane's pair w[n, 2j], w[n, 2j + 1] (vdpbf16ps's pairs);
//   fp32: [ceil(N / 16), K, 16, 1]. Zeros past N and K.
// - dense_linear(x [M, K] of the weight's dtype, rows contiguous, packed, out_features N, bias=None [N] fp32 or
//   bf16, activation "none" | "gelu" | "gelu_tanh") -> [M, N] of x's dtype: act(x W^T + b), batch-invariant as
//   quant_linear is. The bias and the activation are applied in fp32 where each output's sum ends (the epilogue),
//   rounded once to x's dtype: one pass over the output where torch makes three (the GEMM's, the bias add's, the
//   activation's), and no bf16 rounding in between. The activations are common.h's gelu16 and gelu_tanh16.
// Each output is one lane's sum over k in order, from zero: on bf16 one dot_pairs (the odd product added,
// then the even; bf16 products are exact in fp32) per pair of k, an odd K's last pair with a zero, then
// rounded to bf16 as torch rounds; on fp32 one FMA per k. No sum across lanes: every path (any M, any rows
// beside) computes that sequence. (quant_linear's layout, rows read in place with 16 lanes along k, would
// pay for its sums of the lanes: plain bf16 rows that way ran 25-35% slower than oneDNN at K=576, M >= 64.)
// Work: the blocks split into one column per thread (16 features at a time: N=576 splits 18/18) and the rows of x
// into units of up to kUnitRows (fewer where a unit's rows of a chunk of k would pass kPanelBytes: its L2 keeps
// them from one group to the next). Each thread takes the units of its own column in order (its weights stay in
// its L2), then what the other columns have left (work stealing: the 2 cores are shared, and a thread slowed by
// another process kept the other waiting; with a loop busy half the time on one core, 4096 x 384 -> 1152 bf16 ran
// at ~200 GFLOP/s, median, and now ~290). A unit goes through its column's blocks in groups of up to 3 (48
// features), each group in passes of up to 8 rows of x: an 8 x 3 register tile, 24 accumulators, each step 3
// weight vectors and 8 broadcasts of x for 24 products (6 x 4 reads a third more of the weight per product: fp32
// at M=8 94 against 110 GFLOP/s, one thread, 576 x 3072 in cache; at M=4096, K=384, bf16, 6 x 4, 7 x 4, 9 x 3
// and 5 x 5 ran within 1% of 8 x 3, 12 x 2 and 14 x 2 4-7% slower). Over K longer than kChunkBytes a row, a
// pass takes one chunk of k at a time (its sums kept in fp32 between chunks, which changes none of them): the
// group's chunk of the weight stays in L2 from one pass to the next, where the whole of it would not (8192 x 2048
// bf16, M=256: 8% slower than oneDNN, now 3%). A pass that finishes its sums first prefetches its output's lines
// for writing (at M=4096 they come from memory, and the stores waited: 3-4% at K=384), and rounds bf16 sums two
// blocks per vcvtne2ps2bf16 (~8 instructions a block before; the epilogue was 3% of a pass at K=384, 1.5% now).
// One thread, data in cache, a pass costs ~200 cycles besides its steps (~24 cycles each, vdpbf16ps' own
// throughput; 230 before): 4% at K=384.
// Against oneDNN's packed GEMM (`OneDnnPackedLinear`, benchmarks/bench_plain_linear.py, 2 threads, weights from
// memory): on SmolLM2's and Llama-3.2-1B's shapes, M=1 and 8 in 0.63-0.83 of its time, M=64 0.82-1.02, M=256
// 0.94-1.05 (the worst the lm_head, 576 -> 49152), M=2048 1.02-1.08 (before the units, the stealing and the
// epilogue above, which took 0.96-1.00 of the time at M=2048 and changed nothing up to M=256); on
// all-MiniLM-L6-v2's (with its biases; up_proj's GELU fused here, F.gelu after oneDNN's product), M=1024 to 4096,
// bf16 0.97-1.03 per shape and 0.99-1.01 per layer (~420 GFLOP/s, the GELU included; 1.03 at M=4096 before, qkv
// and o 1.07-1.08), fp32 0.98-1.00.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using namespace tokenmill;
using bf16 = c10::BFloat16;

// gguf.GGMLQuantizationType values.
enum QType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

constexpr int kTileRows = 4;       // weight rows per unit of work
constexpr int kMaxFusedRows = 4;   // rows of x up to which chunks are decoded into registers
constexpr int kMicroRows = 6;      // rows of x per pass of the scratch kernel (6 x 4 accumulators)
constexpr int64_t kPanelBytes = 512 * 1024;  // x a thread takes through all its tiles at a time (see linear)
constexpr int64_t kStreamBytes = 8 << 20;     // dequantize's outputs from this size on bypass the caches

inline float fp16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// 32 fp32 (low: elements 0-15) rounded to nearest-even bf16. Weights never are fp32 denormals
// (multiples of an fp16's 2^-24, or 0), the one input where vcvtne2ps2bf16 differs from round_bf16.
inline __m512i pack_bf16(__m512 low, __m512 high) {
#ifdef __AVX512BF16__
  return (__m512i)_mm512_cvtne2ps_pbh(high, low);
#else
  return to_bf16(low, high);
#endif
}

inline __m512 iota(float first) {
  return _mm512_add_ps(_mm512_set1_ps(first),
                       _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

// The 16 bytes at p widened to 32 words: words 0-15 the bytes, words 16-31 their high nibbles.
// vpermw reads 5 bits of an index, so a 16-entry table is looked up by the low words as a
// 32-entry one with its entries repeated.
inline __m512i nibble_words(const uint8_t* p) {
  const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p)));
  return _mm512_srlv_epi16(bytes, _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1));
}

// The two forms a chunk of 32 decoded weights takes: one zmm of their bf16 roundings (dequantize, and
// quant_linear on bf16 x: products by pairs, dot_pairs), or two zmm of their exact fp32 values
// (quant_linear on fp32 x: FMAs). Decoders compute every weight in fp32 and hand it over through
// from_fp32, or through a table of up to 32 values looked up by 32 index words (their low 5 bits, as
// vpermw reads them). A chunk is kVectors zmm of kPerVector values each, x and the output are Value.
struct Bf16Values {
  using Value = bf16;
  static constexpr int kVectors = 1, kPerVector = 32;
  struct Chunk {
    __m512i v[kVectors];
  };
  using Table = __m512i;
  static Chunk from_fp32(__m512 low, __m512 high) { return {{pack_bf16(low, high)}}; }
  static Table table(__m512 low, __m512 high) { return pack_bf16(low, high); }
  static Chunk lookup(Table table, __m512i indices) { return {{_mm512_permutexvar_epi16(indices, table)}}; }
  static __m512 multiply_add(__m512 acc, __m512i x, __m512i w) { return dot_pairs(acc, x, w); }
  static void from_sums(__m128 sums, Value* out) {  // 4 sums rounded as torch rounds
    _mm_storel_epi64((__m128i*)out, _mm256_castsi256_si128(round_bf16(_mm512_castps128_ps512(sums))));
  }
};

struct Fp32Values {
  using Value = float;
  static constexpr int kVectors = 2, kPerVector = 16;
  struct Chunk {
    __m512i v[kVectors];
  };
  struct Table {
    __m512 low, high;
  };
  static Chunk from_fp32(__m512 low, __m512 high) { return {{_mm512_castps_si512(low), _mm512_castps_si512(high)}}; }
  static Table table(__m512 low, __m512 high) { return {low, high}; }
  static Chunk lookup(const Table& table, __m512i indices) {  // vpermt2ps reads 5 bits of the widened words
    const __m512i first = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(indices));
    const __m512i second = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(indices, 1));
    return from_fp32(_mm512_permutex2var_ps(table.low, first, table.high),
                     _mm512_permutex2var_ps(table.low, second, table.high));
  }
  static __m512 multiply_add(__m512 acc, __m512i x, __m512i w) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
  }
  static void from_sums(__m128 sums, Value* out) { _mm_storeu_ps(out, sums); }
};

// Each format: kBlock weights in kBytes. Its Decoder, once it has loaded a block (its scales), gives
// the block's weights kStep chunks of 32 at a time: decode<V>(step, w) sets w[j] to weights
// 32c..32c+31 in V's form, c = kStep * step + j (a K-quant's pairs of sub-blocks share their quants'
// bytes).
//
// NOTE: a multiply-add is fused below only where gguf's product is exact in fp32 (an fp16 scale,
// or an fp16 times a 6-bit scale, times a quant of at most 5 bits: at most 22 significant bits),
// so that the one rounding of the sum is the rounding numpy makes.

// The decoders below keep a block's scales in memory, for the table computations to read them as
// broadcasts folded into their loads ({1to16}). Callers reach a decoder through this pointer, which
// the compiler cannot see through: it would otherwise keep the scales in a register and broadcast
// each with a separate shuffle.
template <class T>
inline T* opaque(T* p) {
  __asm__("" : "+r"(p));
  return p;
}

// A 32-weight block's fp16 scale d (and its min m, for the types with one), converted on loading.
template <bool kHasMin>
struct SmallBlock {
  float d, m;
  const uint8_t* b;
  void load(const uint8_t* block) {
    b = block;
    d = fp16_at(b);
    if (kHasMin) m = fp16_at(b + 2);
  }
};

struct Q8_0 {
  static constexpr int64_t kBlock = 32, kBytes = 34;
  static constexpr int kStep = 1;
  struct Decoder : SmallBlock<false> {
    template <class V>
    void decode(int, typename V::Chunk* w) const {
      const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 2))));
      const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 18))));
      w[0] = V::from_fp32(_mm512_mul_ps(low, _mm512_set1_ps(d)), _mm512_mul_ps(high, _mm512_set1_ps(d)));
    }
  };
};

struct Q4_0 {  // d * (q - 8)
  static constexpr int64_t kBlock = 32, kBytes = 18;
  static constexpr int kStep = 1;
  struct Decoder : SmallBlock<false> {
    template <class V>
    void decode(int, typename V::Chunk* w) const {
      const __m512 values = _mm512_mul_ps(iota(-8), _mm512_set1_ps(d));
      w[0] = V::lookup(V::table(values, values), nibble_words(b + 2));
    }
  };
};

struct Q4_1 {  // d * q + m
  static constexpr int64_t kBlock = 32, kBytes = 20;
  static constexpr int kStep = 1;
  struct Decoder : SmallBlock<true> {
    template <class V>
    void decode(int, typename V::Chunk* w) const {
      const __m512 values = _mm512_fmadd_ps(_mm512_set1_ps(d), iota(0), _mm512_set1_ps(m));
      w[0] = V::lookup(V::table(values, values), nibble_words(b + 4));
    }
  };
};

// Adds 16 to the index words whose bit is set in the 32-bit mask at p (the quants' fifth bits).
inline __m512i with_fifth_bits(__m512i nibbles, const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  nibbles = _mm512_and_si512(nibbles, _mm512_set1_epi16(0x0F));
  return _mm512_mask_add_epi16(nibbles, bits, nibbles, _mm512_set1_epi16(16));
}

struct Q5_0 {  // d * (q - 16)
  static constexpr int64_t kBlock = 32, kBytes = 22;
  static constexpr int kStep = 1;
  struct Decoder : SmallBlock<false> {
    template <class V>
    void decode(int, typename V::Chunk* w) const {
      const __m512 scale = _mm512_set1_ps(d);
      const auto table = V::table(_mm512_mul_ps(iota(-16), scale), _mm512_mul_ps(iota(0), scale));
      w[0] = V::lookup(table, with_fifth_bits(nibble_words(b + 6), b + 2));
    }
  };
};

struct Q5_1 {  // d * q + m
  static constexpr int64_t kBlock = 32, kBytes = 24;
  static constexpr int kStep = 1;
  struct Decoder : SmallBlock<true> {
    template <class V>
    void decode(int, typename V::Chunk* w) const {
      const __m512 scale = _mm512_set1_ps(d), min = _mm512_set1_ps(m);
      const auto table = V::table(_mm512_fmadd_ps(scale, iota(0), min), _mm512_fmadd_ps(scale, iota(16), min));
      w[0] = V::lookup(table, with_fifth_bits(nibble_words(b + 8), b + 4));
    }
  };
};

// Q4_K and Q5_K: d * scale and dmin * min of the 8 sub-blocks (6-bit scales and mins packed in the
// 12 bytes at b + 4, ggml's get_scale_min_k4), computed for all at once and kept in memory, where
// the table computations read them as broadcasts. Sub-blocks 2i and 2i + 1 take the low and the
// high nibbles of the same 32 bytes.
struct KScales {
  alignas(64) float scale_min[16];  // d * scale[c] at c, dmin * min[c] at 8 + c
  void load_scales(const uint8_t* b) {
    // As 32-bit lanes: (d, dmin), scales' bytes 0-3, 4-7, 8-11; unpacked into 8 scales and 8 mins.
    const __m128i packed = _mm_loadu_si128((const __m128i*)b);
    const __m128i low =  // bytes 0-3, 8-11, 4-7, 8-11 >> 4 of the scales
        _mm_srlv_epi32(_mm_shuffle_epi32(packed, _MM_SHUFFLE(3, 2, 3, 1)), _mm_setr_epi32(0, 0, 0, 4));
    const __m128i high = _mm_srli_epi32(_mm_shuffle_epi32(packed, _MM_SHUFFLE(2, 2, 1, 1)), 2);
    const __m128i unpacked =
        _mm_or_si128(_mm_and_si128(low, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f)),
                     _mm_and_si128(high, _mm_setr_epi32(0, 0x30303030, 0, 0x30303030)));
    const __m512 ints = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(unpacked));
    const __m512 factors = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                                 _mm512_castps128_ps512(_mm_cvtph_ps(packed)));
    _mm512_store_ps(scale_min, _mm512_mul_ps(factors, ints));
  }
  __m512 values(int c, __m512 quants) const {  // d * scale * q - dmin * min
    return _mm512_sub_ps(_mm512_mul_ps(quants, _mm512_set1_ps(scale_min[c])),
                         _mm512_set1_ps(scale_min[8 + c]));
  }
};

struct Q4_K {  // d, dmin, scales[12], qs[128]
  static constexpr int64_t kBlock = 256, kBytes = 144;
  static constexpr int kStep = 2;
  struct Decoder : KScales {
    const uint8_t* qs;
    void load(const uint8_t* b) {
      load_scales(b);
      qs = b + 16;
    }
    template <class V>
    void decode(int step, typename V::Chunk* w) const {
      // One table of both sub-blocks' 16 values: the odd one's in entries 0-15, the even one's in 16-31.
      const auto table = V::table(values(2 * step + 1, iota(0)), values(2 * step, iota(0)));
      const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(qs + 32 * step)));
      w[0] = V::lookup(table, _mm512_or_si512(bytes, _mm512_set1_epi16(16)));  // 5 bits read: low nibble + 16
      w[1] = V::lookup(table, _mm512_srli_epi16(bytes, 4));
    }
  };
};

// d, dmin, scales[12], qh[32], qs[128]; bit c of qh[l] is the fifth bit of weight l of sub-block c.
struct Q5_K {
  static constexpr int64_t kBlock = 256, kBytes = 176;
  static constexpr int kStep = 2;
  struct Decoder : KScales {
    const uint8_t* qh;
    void load(const uint8_t* b) {
      load_scales(b);
      qh = b + 16;
    }
    template <class V>
    void decode(int step, typename V::Chunk* w) const {
      const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(qh + 32 + 32 * step)));
      const __m256i fifth_bits = _mm256_loadu_si256((const __m256i*)qh);
      const __m512i sixteen = _mm512_set1_epi16(16);
      for (int j = 0; j < 2; ++j) {
        const int c = 2 * step + j;
        const __m512 scale = _mm512_set1_ps(scale_min[c]), min = _mm512_set1_ps(scale_min[8 + c]);
        const auto table = V::table(_mm512_fmsub_ps(scale, iota(0), min), _mm512_fmsub_ps(scale, iota(16), min));
        const __m512i low = j ? _mm512_srli_epi16(bytes, 4) : _mm512_and_si512(bytes, _mm512_set1_epi16(0x0F));
        const __mmask32 fifth = _mm256_test_epi8_mask(fifth_bits, _mm256_set1_epi8(static_cast<char>(1 << c)));
        w[j] = V::lookup(table, _mm512_mask_add_epi16(low, fifth, low, sixteen));
      }
    }
  };
};

// ql[128], qh[64], scales[16] (int8, one per 16 weights), d. Weight 32c + l (c = 4h + s) is
// d * scale[2c + l / 16] * (q - 32), q = 4 bits of ql[64h + 32(s % 2) + l] (high ones for s >= 2)
// with bits 2s, 2s+1 of qh[32h + l] above them.
struct Q6_K {
  static constexpr int64_t kBlock = 256, kBytes = 210;
  static constexpr int kStep = 2;
  struct Decoder {
    alignas(64) float scale[16];  // d * scales[i], read as broadcasts
    const uint8_t* b;
    void load(const uint8_t* block) {
      b = block;
      const __m512 scales =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 192))));
      _mm512_store_ps(scale, _mm512_mul_ps(_mm512_set1_ps(fp16_at(b + 208)), scales));
    }
    template <class V>
    void decode(int step, typename V::Chunk* w) const {
      const int h = step / 2;
      const __m256i high_bits = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h));
      for (int j = 0; j < 2; ++j) {
        const int c = 2 * step + j, s = c % 4;
        __m256i low = _mm256_loadu_si256((const __m256i*)(b + 64 * h + 32 * j));
        low = _mm256_and_si256(s >= 2 ? _mm256_srli_epi16(low, 4) : low, _mm256_set1_epi8(0x0F));
        const __m256i high = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(high_bits, 2 * s), 4),
                                              _mm256_set1_epi8(0x30));
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(low, high), _mm256_set1_epi8(32));
        const __m512 first = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
        const __m512 second = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
        w[j] = V::from_fp32(_mm512_mul_ps(first, _mm512_set1_ps(scale[2 * c])),
                            _mm512_mul_ps(second, _mm512_set1_ps(scale[2 * c + 1])));
      }
    }
  };
};

// The sums of the 16 lanes of a, b, c, d, each by the same tree whatever its position.
inline __m128 sum_lanes4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, v));
}

// A unit of work: kTileRows weight rows, their output columns, the first `live` of them within N (the
// others repeat a live row, computed for nothing).
struct Tile {
  const uint8_t* rows[kTileRows];
  int64_t columns[kTileRows];
  int live;
};

// Row m's sums with the tile's rows, as V's values, into out[m, columns].
template <class V, int MR>
inline void store_sums(const __m512 (&acc)[MR][kTileRows], const Tile& tile, typename V::Value* out,
                       int64_t out_stride) {
  for (int m = 0; m < MR; ++m) {
    typename V::Value sums[kTileRows];
    V::from_sums(sum_lanes4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]), sums);
    for (int r = 0; r < tile.live; ++r) out[m * out_stride + tile.columns[r]] = sums[r];
  }
}

// Decodes R rows of K weights in step, calling step(k, w) with w[r][j] = weights k + 32j..k + 32j + 31
// of row r in V's form, for k = 0, 32 kStep, ... K - 32 kStep in order. A block's scales go through
// memory (see opaque): they are loaded a block ahead, off the path from the loads to the products.
template <class F, class V, int R, class Step>
inline void decode_rows(const uint8_t* const (&rows)[R], int64_t K, Step&& step) {
  typename F::Decoder decoders[2][R];
  for (int r = 0; r < R; ++r) decoders[0][r].load(rows[r]);
  const int64_t blocks = K / F::kBlock;
  for (int64_t block = 0; block < blocks; ++block) {
    const auto* current = opaque(decoders[block % 2]);
    if (block + 1 < blocks) {
      for (int r = 0; r < R; ++r) decoders[(block + 1) % 2][r].load(rows[r] + (block + 1) * F::kBytes);
    }
#pragma GCC unroll 8  // a K-quant's steps read at offsets known at compile time
    for (int s = 0; s < F::kBlock / 32 / F::kStep; ++s) {
      typename V::Chunk w[R][F::kStep];
      for (int r = 0; r < R; ++r) current[r].template decode<V>(s, w[r]);
      step(block * F::kBlock + 32 * F::kStep * s, w);
    }
  }
}

// MR rows of x times a tile's weight rows, decoded chunk by chunk into registers.
template <class F, class V, int MR>
void fused_tile(const typename V::Value* x, int64_t x_stride, const Tile& tile, int64_t K, typename V::Value* out,
                int64_t out_stride) {
  __m512 acc[MR][kTileRows];
  for (auto& row : acc) for (auto& a : row) a = _mm512_setzero_ps();
  decode_rows<F, V>(tile.rows, K, [&](int64_t k, const typename V::Chunk (&w)[kTileRows][F::kStep]) {
    for (int j = 0; j < F::kStep; ++j) {
      for (int v = 0; v < V::kVectors; ++v) {
        for (int m = 0; m < MR; ++m) {
          const __m512i xv = _mm512_loadu_si512(x + m * x_stride + k + 32 * j + V::kPerVector * v);
          for (int r = 0; r < kTileRows; ++r) acc[m][r] = V::multiply_add(acc[m][r], xv, w[r][j].v[v]);
        }
      }
    }
  });
  store_sums<V, MR>(acc, tile, out, out_stride);
}

// MR rows of x times a tile's weight rows decoded in scratch ([kTileRows][K] values).
template <class V, int MR>
void scratch_tile(const typename V::Value* x, int64_t x_stride, const typename V::Value* w, int64_t K,
                  const Tile& tile, typename V::Value* out, int64_t out_stride) {
  __m512 acc[MR][kTileRows];
  for (auto& row : acc) for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += V::kPerVector) {
    __m512i wv[kTileRows];
    for (int r = 0; r < kTileRows; ++r) wv[r] = _mm512_loadu_si512(w + r * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * x_stride + k);
      for (int r = 0; r < kTileRows; ++r) acc[m][r] = V::multiply_add(acc[m][r], xv, wv[r]);
    }
  }
  store_sums<V, MR>(acc, tile, out, out_stride);
}

template <class F, class V>
void linear(const typename V::Value* x, int64_t x_stride, int64_t M, const uint8_t* w, int64_t w_stride, int64_t N,
            int64_t K, typename V::Value* out) {
  using Value = typename V::Value;
  // NOTE: tile t holds rows t, t + tiles, t + 2 tiles, t + 3 tiles, not 4 consecutive ones: then the 4
  // rows a thread reads at once each advance through consecutive rows, 4 long sequential streams that
  // the hardware prefetcher follows. 4 consecutive rows are 4 short streams (1-2 KB) it hardly starts
  // on: M=1 read the weights at half the speed (one thread, 2048 x 4096).
  const int64_t tiles = (N + kTileRows - 1) / kTileRows;
  // At least ~64k weights per unit of work: waking the second thread costs more below.
  const int64_t grain = std::max<int64_t>(1, 65536 / (kTileRows * K));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<Value> scratch(M > kMaxFusedRows ? kTileRows * K : 0);
    // Rows of x a thread takes through all its tiles before the next ones: about kPanelBytes of x, which
    // its L2 keeps from one tile to the next, but at least ~128 rows: each panel decodes the tiles again.
    const int64_t panel_rows = std::max<int64_t>(128, kPanelBytes / (K * sizeof(Value)));
    const int64_t panel = (panel_rows + kMicroRows - 1) / kMicroRows * kMicroRows;
    for (int64_t panel_start = 0; panel_start < M; panel_start += panel) {
      const int64_t rows_in_panel = std::min(panel, M - panel_start);
      const Value* xp = x + panel_start * x_stride;
      Value* op = out + panel_start * N;
      for (int64_t t = begin; t < end; ++t) {
        Tile tile;
        tile.live = 0;
        for (int r = 0; r < kTileRows; ++r) {
          tile.columns[r] = t + r * tiles;
          tile.live += tile.columns[r] < N;
          tile.rows[r] = w + (r < tile.live ? tile.columns[r] : t) * w_stride;
        }
        if (M <= kMaxFusedRows) {
          switch (M) {
            case 1: fused_tile<F, V, 1>(x, x_stride, tile, K, out, N); break;
            case 2: fused_tile<F, V, 2>(x, x_stride, tile, K, out, N); break;
            case 3: fused_tile<F, V, 3>(x, x_stride, tile, K, out, N); break;
            default: fused_tile<F, V, 4>(x, x_stride, tile, K, out, N); break;
          }
          continue;
        }
        decode_rows<F, V>(tile.rows, K, [&](int64_t k, const typename V::Chunk (&w)[kTileRows][F::kStep]) {
          for (int r = 0; r < kTileRows; ++r) {
            for (int j = 0; j < F::kStep; ++j) {
              for (int v = 0; v < V::kVectors; ++v) {
                _mm512_storeu_si512(scratch.data() + r * K + k + 32 * j + V::kPerVector * v, w[r][j].v[v]);
              }
            }
          }
        });
        // Passes of at most 6 rows, as even as they go (8 rows: 4 + 4, not 6 + 2).
        const int64_t passes = (rows_in_panel + kMicroRows - 1) / kMicroRows;
        for (int64_t p = 0, m = 0; p < passes; ++p) {
          const int64_t rows_here = (rows_in_panel - m) / (passes - p) + ((rows_in_panel - m) % (passes - p) != 0);
          const Value* xm = xp + m * x_stride;
          Value* om = op + m * N;
          switch (rows_here) {
            case 1: scratch_tile<V, 1>(xm, x_stride, scratch.data(), K, tile, om, N); break;
            case 2: scratch_tile<V, 2>(xm, x_stride, scratch.data(), K, tile, om, N); break;
            case 3: scratch_tile<V, 3>(xm, x_stride, scratch.data(), K, tile, om, N); break;
            case 4: scratch_tile<V, 4>(xm, x_stride, scratch.data(), K, tile, om, N); break;
            case 5: scratch_tile<V, 5>(xm, x_stride, scratch.data(), K, tile, om, N); break;
            default: scratch_tile<V, 6>(xm, x_stride, scratch.data(), K, tile, om, N); break;
          }
          m += rows_here;
        }
      }
    }
  });
}

// Each bf16 NaN made 0xFFFF, as torch's fp32 -> bf16 conversion makes it.
inline __m512i torch_nans(__m512i w) {
  const __mmask32 nan = _mm512_cmpgt_epu16_mask(_mm512_and_si512(w, _mm512_set1_epi16(0x7FFF)),
                                                _mm512_set1_epi16(0x7F80));
  return _mm512_mask_mov_epi16(w, nan, _mm512_set1_epi16(-1));
}

template <class F>
void dequantize_rows(const uint8_t* w, int64_t w_stride, int64_t N, int64_t K, bf16* out) {
  // Outputs past the caches are written around them (no read for ownership of each line first).
  const bool stream = N * K * 2 >= kStreamBytes;
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* const row[1] = {w + n * w_stride};
      bf16* o = out + n * K;
      decode_rows<F, Bf16Values>(row, K, [&](int64_t k, const Bf16Values::Chunk (&chunks)[1][F::kStep]) {
        for (int j = 0; j < F::kStep; ++j) {
          if (stream) {
            _mm512_stream_si512((__m512i*)(o + k + 32 * j), torch_nans(chunks[0][j].v[0]));
          } else {
            _mm512_storeu_si512(o + k + 32 * j, torch_nans(chunks[0][j].v[0]));
          }
        }
      });
    }
  });
  if (stream) _mm_sfence();
}

// Calls fn with a value-initialized format struct of the type, or fails naming it.
template <class Fn>
void with_format(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case kQ8_0: return fn(Q8_0{});
    case kQ4_0: return fn(Q4_0{});
    case kQ4_1: return fn(Q4_1{});
    case kQ5_0: return fn(Q5_0{});
    case kQ5_1: return fn(Q5_1{});
    case kQ4_K: return fn(Q4_K{});
    case kQ5_K: return fn(Q5_K{});
    case kQ6_K: return fn(Q6_K{});
    default: TORCH_CHECK(false, "quantized type ", qtype, " has no kernel (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, "
                         "Q6_K are 8, 2, 3, 6, 7, 12, 13, 14)");
  }
}

// The blocks of an [N, K] weight: uint8 rows of K / block * type_size bytes.
template <class F>
void check_blocks(const at::Tensor& blocks, int64_t K) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.stride(1) == 1,
              "blocks must be uint8 [N, row_bytes] with contiguous rows");
  TORCH_CHECK(K > 0 && K % F::kBlock == 0, "in_features ", K, " is not a multiple of the type's block of ", F::kBlock);
  TORCH_CHECK(blocks.size(1) == K / F::kBlock * F::kBytes, "blocks have ", blocks.size(1), " bytes a row, ",
              K / F::kBlock * F::kBytes, " expected for ", K, " weights");
}

at::Tensor dequantize(const at::Tensor& blocks, int64_t qtype, int64_t in_features,
                      const c10::optional<at::Tensor>& out) {
  at::Tensor result;
  with_format(qtype, [&](auto format) {
    using F = decltype(format);
    check_blocks<F>(blocks, in_features);
    if (out.has_value()) {
      TORCH_CHECK(out->scalar_type() == at::kBFloat16 && out->is_contiguous() && out->dim() == 2 &&
                  out->size(0) == blocks.size(0) && out->size(1) == in_features,
                  "out must be contiguous bf16 [", blocks.size(0), ", ", in_features, "]");
      result = *out;
    } else {
      result = at::empty({blocks.size(0), in_features}, blocks.options().dtype(at::kBFloat16));
    }
    dequantize_rows<F>(blocks.data_ptr<uint8_t>(), blocks.stride(0), blocks.size(0), in_features,
                       result.data_ptr<bf16>());
  });
  return result;
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype) {
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.dim() == 2 &&
              x.stride(1) == 1, "x must be bf16 or fp32 [M, K] with contiguous rows, not ", x.scalar_type(), " ",
              x.sizes(), " of strides ", x.strides());
  at::Tensor out;
  with_format(qtype, [&](auto format) {
    using F = decltype(format);
    check_blocks<F>(blocks, x.size(1));
    out = at::empty({x.size(0), blocks.size(0)}, x.options());
    if (out.numel() == 0) return;
    const uint8_t* w = blocks.data_ptr<uint8_t>();
    const int64_t M = x.size(0), N = blocks.size(0), K = x.size(1);
    if (x.scalar_type() == at::kFloat) {
      linear<F, Fp32Values>(x.data_ptr<float>(), x.stride(0), M, w, blocks.stride(0), N, K, out.data_ptr<float>());
    } else {
      linear<F, Bf16Values>(x.data_ptr<bf16>(), x.stride(0), M, w, blocks.stride(0), N, K, out.data_ptr<bf16>());
    }
  });
  return out;
}

// One Q8_0 block of 32 fp32: d = max|w| / 127, q = w * (1 / d) rounded half away from zero, as
// gguf's numpy code computes them (bit for bit, the same fp32 operations).
inline void quantize_block_q8_0(const float* w, uint8_t* out) {
  const __m512 low = _mm512_loadu_ps(w), high = _mm512_loadu_ps(w + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
  const float d = amax / 127.0f;
  const __m512 inverse = _mm512_set1_ps(d == 0.0f ? 0.0f : 1.0f / d);
  const uint16_t d16 = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(out, &d16, 2);
  for (int half = 0; half < 2; ++half) {
    const __m512 scaled = _mm512_mul_ps(half ? high : low, inverse);
    const __m512 a = _mm512_abs_ps(scaled);
    constexpr int kFloor = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
    const __m512 floored = _mm512_roundscale_ps(a, kFloor);
    const __m512 frac2 = _mm512_mul_ps(_mm512_set1_ps(2.0f), _mm512_sub_ps(a, floored));
    const __m512 rounded = _mm512_add_ps(floored, _mm512_roundscale_ps(frac2, kFloor));
    const __m512i q = _mm512_cvttps_epi32(rounded);
    const __m512i signed_q = _mm512_mask_sub_epi32(q, _mm512_cmplt_ps_mask(scaled, _mm512_setzero_ps()),
                                                   _mm512_setzero_si512(), q);
    _mm_storeu_si128((__m128i*)(out + 2 + 16 * half), _mm512_cvtepi32_epi8(signed_q));
  }
}

at::Tensor quantize_q8_0(const at::Tensor& weight) {
  TORCH_CHECK((weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16) && weight.dim() == 2,
              "weight must be fp32 or bf16 [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K % 32 == 0, "in_features ", K, " is not a multiple of Q8_0's block of 32");
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({N, K / 32 * 34}, weight.options().dtype(at::kByte));
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    float block[32];
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t b = 0; b < K / 32; ++b) {
        const float* values;
        if (w.scalar_type() == at::kFloat) {
          values = w.data_ptr<float>() + n * K + 32 * b;
        } else {
          const bf16* p = w.data_ptr<bf16>() + n * K + 32 * b;
          _mm512_storeu_ps(block, load_bf16(p, 0xFFFF));
          _mm512_storeu_ps(block + 16, load_bf16(p + 16, 0xFFFF));
          values = block;
        }
        quantize_block_q8_0(values, out.data_ptr<uint8_t>() + n * (K / 32 * 34) + 34 * b);
      }
    }
  });
  return out;
}

// Plain weights (see the header): the dense kernel's own constants and code.
namespace dense {

constexpr int kLanes = 16;        // features per block
constexpr int kGroupBlocks = 3;   // blocks per pass
constexpr int kMicroRows = 8;     // rows of x per pass
constexpr int64_t kPanelBytes = 512 * 1024;
constexpr int64_t kUnitRows = 256;     // rows of x per unit of work (at most; see dense)
constexpr int64_t kChunkBytes = 4096;  // of each row of x and each weight feature per pass (over longer K, passes)

// The two value types: kPerStep values of k per lane and step; broadcast(p) gives every lane x's values at p
// for one step, broadcast_last(p) those of the last step of an odd K (one value, then a zero); store_tile rounds
// a pass's finished sums (MR rows of NB blocks) to the values' type and stores the features below `features`.
struct Bf16 {
  using Value = bf16;
  static constexpr int kPerStep = 2;
  static __m512i broadcast(const Value* p) {
    uint32_t pair;
    std::memcpy(&pair, p, 4);
    return _mm512_set1_epi32(static_cast<int>(pair));
  }
  static __m512i broadcast_last(const Value* p) {
    uint16_t value;
    std::memcpy(&value, p, 2);
    return _mm512_set1_epi32(value);
  }
  static __m512 multiply_add(__m512 acc, __m512i x, __m512i w) { return dot_pairs(acc, x, w); }
  template <int MR, int NB>
  __attribute__((always_inline)) static void store_tile(Value* out, int64_t out_stride, int64_t features,
                                                        const __m512 (&sums)[MR][NB]) {
#ifdef __AVX512BF16__
    // vcvtne2ps2bf16 rounds two blocks in one instruction, as torch rounds, except NaNs and fp32 denormals (it
    // flushes those): a pass with any of them takes round_bf16 (~8 instructions a block) instead.
    __mmask16 special = 0;
    for (int m = 0; m < MR; ++m) {
      for (int b = 0; b < NB; ++b) special |= _mm512_fpclass_ps_mask(sums[m][b], 0x01 | 0x20 | 0x80);
    }
    if (__builtin_expect(special == 0, 1)) {
      for (int m = 0; m < MR; ++m) {
        Value* row = out + m * out_stride;
        for (int b = 0; b + 1 < NB; b += 2) {
          const __mmask32 mask = tail_mask(features - b * kLanes) |
                                 static_cast<__mmask32>(tail_mask(features - (b + 1) * kLanes)) << 16;
          _mm512_mask_storeu_epi16(row + b * kLanes, mask, (__m512i)_mm512_cvtne2ps_pbh(sums[m][b + 1], sums[m][b]));
        }
        if constexpr (NB % 2 == 1) {
          _mm256_mask_storeu_epi16(row + (NB - 1) * kLanes, tail_mask(features - (NB - 1) * kLanes),
                                   (__m256i)_mm512_cvtneps_pbh(sums[m][NB - 1]));
        }
      }
      return;
    }
#endif
    for (int m = 0; m < MR; ++m) {
      for (int b = 0; b < NB; ++b) {
        _mm256_mask_storeu_epi16(out + m * out_stride + b * kLanes, tail_mask(features - b * kLanes),
                                 round_bf16(sums[m][b]));
      }
    }
  }
};

struct Fp32 {
  using Value = float;
  static constexpr int kPerStep = 1;
  static __m512i broadcast(const Value* p) { return _mm512_castps_si512(_mm512_set1_ps(*p)); }
  static __m512i broadcast_last(const Value* p) { return broadcast(p); }
  static __m512 multiply_add(__m512 acc, __m512i x, __m512i w) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
  }
  template <int MR, int NB>
  __attribute__((always_inline)) static void store_tile(Value* out, int64_t out_stride, int64_t features,
                                                        const __m512 (&sums)[MR][NB]) {
    for (int m = 0; m < MR; ++m) {
      for (int b = 0; b < NB; ++b) {
        _mm512_mask_storeu_ps(out + m * out_stride + b * kLanes, tail_mask(features - b * kLanes), sums[m][b]);
      }
    }
  }
};

enum class Activation { kNone, kGelu, kGeluTanh };

// The epilogue: a finished sum (fp32) plus the feature's bias, through the activation, before its one rounding.
struct Epilogue {
  const float* bias;  // the pass's first feature's, or null
  Activation activation;
};

// One pass: rows of x (the first at x) times a group's blocks (w: the first, each block_values apart), over
// the whole steps [first_step, last_step) of k, then the last half-empty step of an odd K where `tail`. Sums
// start from zero, or from `partial` where `resume`; they end, through the epilogue, in out[m, 16 b + i] for the
// features below N (`features` of them from the first) where `finish`, else in `partial` (row m at
// m * partial_stride).
template <class V>
struct Pass {
  using Value = typename V::Value;
  const Value* x;
  int64_t x_stride;
  const Value* w;
  int64_t block_values, first_step, last_step;
  bool tail, resume, finish;
  float* partial;
  int64_t partial_stride;
  Value* out;
  int64_t out_stride, features;
  Epilogue epilogue;
};

// A pass's sums (rows of `blocks` vectors) plus the bias, through the activation, in place: the activations' path,
// out of line (a GELU costs ~5 ns a vector, the sums' trip through memory nothing next to it).
template <class V>
__attribute__((noinline)) void activate(__m512* sums, int rows, int blocks, const Pass<V>& pass) {
  const auto finish = [&](auto&& activation) {
    for (int b = 0; b < blocks; ++b) {
      const float* bias = pass.epilogue.bias;
      const __mmask16 mask = tail_mask(pass.features - b * kLanes);
      const __m512 bias_values = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, bias + b * kLanes);
      for (int m = 0; m < rows; ++m) {
        __m512& values = sums[m * blocks + b];
        if (bias != nullptr) values = _mm512_add_ps(values, bias_values);  // (a zero bias would turn -0 into 0)
        values = activation(values);
      }
    }
  };
  if (pass.epilogue.activation == Activation::kGelu) {
    finish([](__m512 values) { return gelu16(values); });
  } else {
    finish([](__m512 values) { return gelu_tanh16(values); });
  }
}

// NOTE: not inlined: inlined into dense's loops (24 copies), the accumulators and operands went to memory
// (2.4x slower); a call per pass costs nothing next to its steps.
template <class V, int MR, int NB>
__attribute__((noinline)) void dense_tile(const Pass<V>& pass) {
  const typename V::Value *x = pass.x, *w = pass.w;
  const int64_t x_stride = pass.x_stride, block_values = pass.block_values;
  float* const partial = pass.partial;
  const int64_t partial_stride = pass.partial_stride;
  if (pass.finish) {
    // The output's lines, fetched for writing while the sums run: at M = 4096 they come from memory, and the
    // stores at the end waited for them (3-4% of a pass at K = 384, 2 threads).
    for (int m = 0; m < MR; ++m) {
      const char* row = reinterpret_cast<const char*>(pass.out + m * pass.out_stride);
      constexpr int kBytes = NB * kLanes * sizeof(typename V::Value);
      for (int byte = 0; byte < kBytes; byte += 64) __builtin_prefetch(row + byte, 1);
      __builtin_prefetch(row + kBytes - 1, 1);
    }
  }
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m) {
    for (int b = 0; b < NB; ++b) {
      acc[m][b] = pass.resume ? _mm512_loadu_ps(partial + m * partial_stride + b * kLanes) : _mm512_setzero_ps();
    }
  }
  const auto step = [&](int64_t s, auto&& broadcast) {
    __m512i wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512(w + b * block_values + s * kLanes * V::kPerStep);
    for (int m = 0; m < MR; ++m) {
      const __m512i xv = broadcast(x + m * x_stride + s * V::kPerStep);
      for (int b = 0; b < NB; ++b) acc[m][b] = V::multiply_add(acc[m][b], xv, wv[b]);
    }
  };
  for (int64_t s = pass.first_step; s < pass.last_step; ++s) step(s, V::broadcast);
  if (pass.tail) step(pass.last_step, V::broadcast_last);
  if (!pass.finish) {
    for (int m = 0; m < MR; ++m) {
      for (int b = 0; b < NB; ++b) _mm512_storeu_ps(partial + m * partial_stride + b * kLanes, acc[m][b]);
    }
  } else if (pass.epilogue.activation != Activation::kNone) {
    __m512 sums[MR][NB];  // (a copy: acc's address taken, the compiler would keep it in memory throughout)
    for (int m = 0; m < MR; ++m) {
      for (int b = 0; b < NB; ++b) sums[m][b] = acc[m][b];
    }
    activate<V>(&sums[0][0], MR, NB, pass);
    V::template store_tile<MR, NB>(pass.out, pass.out_stride, pass.features, sums);
  } else {
    // Bias only: in registers.
    if (pass.epilogue.bias != nullptr) {
      for (int b = 0; b < NB; ++b) {
        const __mmask16 mask = tail_mask(pass.features - b * kLanes);
        const __m512 bias = _mm512_maskz_loadu_ps(mask, pass.epilogue.bias + b * kLanes);
        for (int m = 0; m < MR; ++m) acc[m][b] = _mm512_add_ps(acc[m][b], bias);
      }
    }
    V::template store_tile<MR, NB>(pass.out, pass.out_stride, pass.features, acc);
  }
}

template <class V, int NB>
void dense_pass(int64_t rows, const Pass<V>& pass) {
  switch (rows) {
    case 1: return dense_tile<V, 1, NB>(pass);
    case 2: return dense_tile<V, 2, NB>(pass);
    case 3: return dense_tile<V, 3, NB>(pass);
    case 4: return dense_tile<V, 4, NB>(pass);
    case 5: return dense_tile<V, 5, NB>(pass);
    case 6: return dense_tile<V, 6, NB>(pass);
    case 7: return dense_tile<V, 7, NB>(pass);
    default: return dense_tile<V, 8, NB>(pass);
  }
}

template <class V>
void dense(const typename V::Value* x, int64_t x_stride, int64_t M, const typename V::Value* packed, int64_t N,
           int64_t K, const float* bias, Activation activation, typename V::Value* out) {
  using Value = typename V::Value;
  const int64_t blocks = (N + kLanes - 1) / kLanes;
  const int64_t block_values = (K + V::kPerStep - 1) / V::kPerStep * V::kPerStep * kLanes;
  const int64_t whole_steps = K / V::kPerStep;
  const bool odd = whole_steps * V::kPerStep < K;
  const int64_t chunk_steps = kChunkBytes / sizeof(Value) / V::kPerStep;
  const int64_t chunks = std::max<int64_t>(1, (whole_steps + chunk_steps - 1) / chunk_steps);
  // At least ~64k weights per thread: waking the second thread costs more below.
  const int64_t grain = std::max<int64_t>(1, 65536 / (kLanes * K));
  // Units of rows as even as they go (256 rows of at most 222: 128 + 128, not 222 + 34, where w is read again
  // for 34).
  const int64_t most_rows = std::min(kUnitRows, std::max<int64_t>(kMicroRows, kPanelBytes /
      (std::min(K, chunk_steps * V::kPerStep) * static_cast<int64_t>(sizeof(Value)))));
  const int64_t units = (M + most_rows - 1) / most_rows, unit_rows = (M + units - 1) / units;
  // One unit of work: rows [row_begin, row_end) of x times blocks [begin, end), group by group, each group in
  // passes of at most 8 rows (as even as they go: 10 rows are 5 + 5, not 8 + 2).
  const auto run = [&](int64_t begin, int64_t end, int64_t row_begin, int64_t row_end, std::vector<float>& partial) {
    const int64_t partial_stride = (end - begin) * kLanes, rows = row_end - row_begin;
    if (chunks > 1) partial.resize(rows * partial_stride);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int64_t group = begin; group < end; group += kGroupBlocks) {
        Pass<V> pass;
        pass.x_stride = x_stride;
        pass.w = packed + group * block_values;
        pass.block_values = block_values;
        pass.first_step = chunk * chunk_steps;
        pass.last_step = std::min(whole_steps, pass.first_step + chunk_steps);
        pass.resume = chunk > 0;
        pass.finish = chunk == chunks - 1;
        pass.tail = pass.finish && odd;
        pass.partial_stride = partial_stride;
        pass.out_stride = N;
        pass.features = N - group * kLanes;
        pass.epilogue = {bias == nullptr ? nullptr : bias + group * kLanes, activation};
        const int64_t passes = (rows + kMicroRows - 1) / kMicroRows;
        for (int64_t p = 0, m = row_begin; p < passes; ++p) {
          const int64_t left = row_end - m, here = (left + passes - p - 1) / (passes - p);
          pass.x = x + m * x_stride;
          pass.partial = partial.data() + (m - row_begin) * partial_stride + (group - begin) * kLanes;
          pass.out = out + m * N + group * kLanes;
          switch (std::min<int64_t>(kGroupBlocks, end - group)) {
            case 1: dense_pass<V, 1>(here, pass); break;
            case 2: dense_pass<V, 2>(here, pass); break;
            default: dense_pass<V, 3>(here, pass); break;
          }
          m += here;
        }
      }
    }
  };
  // The blocks split into one column per thread; each thread takes the units of its own column (its weights stay
  // in its L2), then of the others' where they are left: a thread slowed by another process (2 cores shared)
  // leaves its last units to the other instead of keeping it waiting.
  const int64_t columns = std::min<int64_t>(at::get_num_threads(), (blocks + grain - 1) / grain);
  const int64_t column_blocks = (blocks + columns - 1) / columns;
  std::vector<std::atomic<int64_t>> next_unit(columns);
  at::parallel_for(0, columns, 1, [&](int64_t home, int64_t) {
    std::vector<float> partial;
    for (int64_t k = 0; k < columns; ++k) {
      const int64_t column = (home + k) % columns;
      const int64_t begin = column * column_blocks, end = std::min(blocks, begin + column_blocks);
      for (int64_t unit; begin < end && (unit = next_unit[column].fetch_add(1)) < units;) {
        run(begin, end, unit * unit_rows, std::min(M, (unit + 1) * unit_rows), partial);
      }
    }
  });
}

inline int64_t per_step(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 ? 2 : 1; }

// The packed layout's values, as bits (T: a type of the values' size), from rows of K with contiguous values.
// (As fast as oneDNN's reorder of the weight into its layout, which page faults on the fresh tensor bound.)
template <class T, int kPer>
void pack(const T* w, int64_t row_stride, int64_t N, int64_t K, T* out) {
  const int64_t blocks = (N + kLanes - 1) / kLanes, steps = (K + kPer - 1) / kPer;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* o = out + b * steps * kLanes * kPer;
      for (int64_t s = 0; s < steps; ++s) {
        for (int64_t n = b * kLanes; n < (b + 1) * kLanes; ++n) {
          for (int64_t k = s * kPer; k < (s + 1) * kPer; ++k) *o++ = n < N && k < K ? w[n * row_stride + k] : T(0);
        }
      }
    }
  });
}

at::Tensor pack_dense(const at::Tensor& weight) {
  TORCH_CHECK((weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kFloat) && weight.dim() == 2,
              "weight must be bf16 or fp32 [N, K], not ", weight.scalar_type(), " ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1), per = per_step(weight);
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  at::Tensor packed = at::empty({(N + kLanes - 1) / kLanes, (K + per - 1) / per, kLanes, per}, weight.options());
  if (per == 2) {
    pack<uint16_t, 2>(static_cast<const uint16_t*>(w.data_ptr()), w.stride(0), N, K,
                      static_cast<uint16_t*>(packed.data_ptr()));
  } else {
    pack<uint32_t, 1>(static_cast<const uint32_t*>(w.data_ptr()), w.stride(0), N, K,
                      static_cast<uint32_t*>(packed.data_ptr()));
  }
  return packed;
}

Activation activation_named(c10::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(false, "activation must be \"none\", \"gelu\" or \"gelu_tanh\", not \"", name, "\"");
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                        const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.dim() == 2 &&
              x.stride(1) == 1, "x must be bf16 or fp32 [M, K] with contiguous rows, not ", x.scalar_type(), " ",
              x.sizes(), " of strides ", x.strides());
  const int64_t M = x.size(0), K = x.size(1), N = out_features, per = per_step(x);
  TORCH_CHECK(K > 0 && N > 0, "in_features and out_features must be positive");
  const std::vector<int64_t> expected = {(N + kLanes - 1) / kLanes, (K + per - 1) / per, kLanes, per};
  TORCH_CHECK(packed.scalar_type() == x.scalar_type() && packed.is_contiguous() && packed.sizes() == expected,
              "packed must be pack_dense's ", x.scalar_type(), " ", at::IntArrayRef(expected), " for ", N, " x ", K,
              ", not ", packed.scalar_type(), " ", packed.sizes());
  const Activation act = activation_named(activation);
  at::Tensor bias_fp32;  // the bias widened to fp32 (a copy only where it is not already)
  if (bias.has_value()) {
    TORCH_CHECK((bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16) && bias->dim() == 1 &&
                bias->size(0) == N, "bias must be fp32 or bf16 [", N, "], not ", bias->scalar_type(), " ",
                bias->sizes());
    bias_fp32 = bias->to(at::kFloat).contiguous();
  }
  const float* b = bias.has_value() ? bias_fp32.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    dense<Fp32>(x.data_ptr<float>(), x.stride(0), M, packed.data_ptr<float>(), N, K, b, act, out.data_ptr<float>());
  } else {
    dense<Bf16>(x.data_ptr<bf16>(), x.stride(0), M, packed.data_ptr<bf16>(), N, K, b, act, out.data_ptr<bf16>());
  }
  return out;
}

}  // namespace dense

}  // namespace

TORCH_LIBRARY_FRAGMENT(TOKENMILL_OPS, m) {
  m.def("dequantize(Tensor blocks, int qtype, int in_features, Tensor(a!)? out=None) -> Tensor", &dequantize);
  m.def("quant_linear(Tensor x, Tensor blocks, int qtype) -> Tensor", &quant_linear);
  m.def("quantize_q8_0(Tensor weight) -> Tensor", &quantize_q8_0);
  m.def("pack_dense(Tensor weight) -> Tensor", &dense::pack_dense);
  m.def("dense_linear(Tensor x, Tensor packed, int out_features, Tensor? bias=None, str activation=\"none\") -> "
        "Tensor", &dense::dense_linear);
}




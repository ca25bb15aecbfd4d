// Attention over the paged KV pool, batch-invariant: a query's result depends on its own query and
// context only, never on the other requests of the step, the chunk its token came in, or which of
// its blocks other requests share.
//
// Every query is attended in one fixed order, whichever op serves it:
// 1. score of context token t: a chain over the head's 32-bit units in order (bf16: dim pairs through
//    `dot_pairs`, i.e. vdpbf16ps; fp32: single dims through FMAs), from zero, times 1/sqrt(D);
// 2. their maximum M over the tokens the query sees (exact in any order);
// 3. p_t = exp(s_t - M); their sum L in 16 lanes (lane t mod 16), tile after tile in token order,
//    the lanes summed by one fixed tree at the end;
// 4. out = (sum of p_t v_t) / L, the sum per dim a chain over the tokens in order: bf16 caches take
//    p rounded to bf16 and the tokens in pairs (2j, 2j + 1) through `dot_pairs`, fp32 ones one FMA
//    per token. lse = M + log L.
// Each score is its own chain; the context is cut only at multiples of 16 tokens (the sums' tiles,
// and pairs), and rows never mix: any split of the context or grouping of rows computes the same bits.
//
// Sliding window (`window` W): the query at position p sees positions p - W + 1 .. p. Tokens before
// that get p_t = 0 exactly, so they add exact zeros at the start of every chain: a query's bits do
// not depend on how many such tokens precede it, provided its context's row 0 sits at a position
// that is a multiple of 16 (then lane t mod 16 is the same whatever the row 0: the caller starts each
// context at the multiple of 16 at or below its earliest query's first visible position). The kernels
// start each query's work at the context row that is the multiple of 32 (decodes) or 64 (chunks'
// packed blocks) at or below its first visible token: older keys and values are never read.
//
// - decode_attention: one query token per request. Each request's scores, softmax and weighted sum
//   are one unit of parallel work; its rows are read in place from the pool, each key transposed in
//   registers 16 tokens at a time, the rows a thread reads next prefetched a fixed distance ahead as it
//   reads (RowStream: decodes are bound by reading the KV pool). With `prefix_slots`
//   (a prefix every request shares, a multiple of 16 tokens, which the prefix cache found; not under a
//   window), that prefix's K/V are read once for all requests: its scores and its part of the weighted
//   sums are two small GEMMs per KV head over all B x group queries (Hydragen), each request's own
//   tokens following in the same chain.
// - chunk_attention: prompt chunks, each query token attending causally to its request's context.
//   Per (request, KV head, 16 query rows), the same GEMMs, each row masked to its own span. A short chunk (at most
//   kMaxInPlaceRows rows a KV head: drafts being verified) is one task per (request, KV head) that reads its rows in
//   place as decodes do, the KV head's rows streamed ahead of the reading.
// The GEMMs read copies packed once per call: keys transposed (unit i of 16 tokens in one register),
// values as token pairs interleaved (their dims come out permuted; the output store puts them back).
// head_dim 64, 128 or 256: the weighted sums take at most 64 dims (4 registers) of 4 rows per pass over
// the tokens, so that their accumulators and the value units loaded stay in the 32 registers.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <cmath>
#include <memory>
#include <optional>
#include <vector>

#include "common.h"

namespace {

using namespace tokenmill;
using bf16 = c10::BFloat16;

constexpr int64_t kBlockTokens = 64;   // keys per score micro-kernel: 4 tiles of 16
constexpr int kMaxScoreRows = 4;       // query rows per score micro-kernel (4 x 4 accumulators)
constexpr int64_t kRowsPerTask = 16;   // query rows per unit of parallel work in the GEMM phases
// A chunk of at most this many query rows per KV head is attended in place (chunk_attention): speculation's drafted
// tokens being verified, a few rows against a whole context. NOTE: packing the context for them cost more than the
// GEMMs over the packed copy saved. SmolLM2-135M (3 query heads a KV head), 4 requests of 300 tokens, 30 layers, one
// thread, CPU ms, packed -> in place: chunks of 1 token 6.9 -> 4.3, 2: 7.3 -> 5.0, 4: 8.9 -> 7.1, 7: 10.8 -> 10.5,
// 9 (27 rows): 12.2 -> 12.6.
constexpr int64_t kMaxInPlaceRows = 24;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// What differs between bf16 and fp32 caches: a 32-bit unit is a pair of bf16 or one fp32.
template <typename T>
struct Units;

template <>
struct Units<bf16> {
  static constexpr int64_t kPerToken = 2;  // tokens per unit of the weighted sum (a pair)
  static __m512 step(__m512 acc, __m512i a, __m512i b) { return dot_pairs(acc, a, b); }
  // The probabilities of 32 tokens [t, t + 32) as 16 units (bf16 pairs), written over their start.
  static void to_units(float* p, int64_t end) {
    auto* units = reinterpret_cast<__m512i*>(p);
    for (int64_t t = 0; t < end; t += 32) {
      _mm512_storeu_si512(units + t / 32, to_bf16(_mm512_loadu_ps(p + t), _mm512_loadu_ps(p + t + 16)));
    }
  }
};

template <>
struct Units<float> {
  static constexpr int64_t kPerToken = 1;
  static __m512 step(__m512 acc, __m512i a, __m512i b) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
  }
  static void to_units(float*, int64_t) {}
};

// The pool rows (all KV heads of a slot) one thread's decodes read, in the order they read them: request after
// request, its keys, then its values (or only one of the two). Prefetched into L2 a fixed distance ahead of the
// reading, the kernels advancing the stream a few lines at a time between their instructions as they read, so
// that the memory works while they compute. NOTE: rows are contiguous only within a KV block, so the hardware
// prefetcher loses the stream at each block; a burst of prefetches per 64 tokens (the way before) stalled the
// core until the lines came, reading Gemma 3's B=64 KV at a third of the memory's speed.
class RowStream {
 public:
  struct Span {
    const int64_t* slots;
    int64_t n;
  };
  static constexpr int kCreditBits = 10;  // advance_credits: lines in units of 2^-kCreditBits
  // 32 KB ahead. Gemma 3's B=64 decodes, one thread: 256 to 2,048 lines all within the noise of each other, 128
  // close to no gain.
  static constexpr int64_t kDistanceLines = 512;

  // Rows are row_bytes apart; the first read_bytes of each (from keys or values on) are read: a slot's every KV head,
  // or one.
  RowStream(const void* keys, const void* values, int64_t row_bytes, int64_t read_bytes, std::vector<Span> spans,
            int first_phase, int last_phase)
      : base_{static_cast<const char*>(keys), static_cast<const char*>(values)}, row_bytes_(row_bytes),
        lines_per_row_(read_bytes / 64), spans_(std::move(spans)), first_phase_(first_phase), last_phase_(last_phase),
        phase_(first_phase) {
    if (!spans_.empty()) row_ = row_at(0);
    advance(kDistanceLines);
  }
  // The next `lines` lines of the stream into L2.
  void advance(int64_t lines) {
    for (; lines > 0 && span_ < spans_.size(); --lines) next_line();
  }
  void advance_credits(int64_t credits) {
    credit_ += credits;
    advance(credit_ >> kCreditBits);
    credit_ &= (int64_t{1} << kCreditBits) - 1;
  }

 private:
  const char* row_at(int64_t t) const { return base_[phase_] + spans_[span_].slots[t] * row_bytes_; }
  void next_line() {
    _mm_prefetch(row_ + 64 * line_, _MM_HINT_T1);
    if (++line_ < lines_per_row_) return;
    line_ = 0;
    if (++t_ == spans_[span_].n) {
      t_ = 0;
      if (phase_ < last_phase_) {
        ++phase_;
      } else {
        phase_ = first_phase_;
        if (++span_ == spans_.size()) return;
      }
    }
    row_ = row_at(t_);
  }

  const char* base_[2];
  int64_t row_bytes_, lines_per_row_;
  std::vector<Span> spans_;
  int first_phase_, last_phase_, phase_;
  size_t span_ = 0;
  int64_t t_ = 0, line_ = 0, credit_ = 0;
  const char* row_ = nullptr;
};

// Where one KV head's rows are: element 0 of the head in slot 0, and a slot's stride.
template <typename T>
struct HeadRows {
  const T* base;
  int64_t stride;  // elements per slot (all KV heads)
  const T* at(int64_t slot) const { return base + slot * stride; }
};

// Keys of tokens [t0, t0 + 64) of one KV head, transposed: out[(j * kUnits + i) * 16 + l] is unit i
// of token t0 + 16 j + l. Tokens from n on repeat token n - 1 (finite; their scores are never used).
template <typename T, int D>
void pack_key_block(HeadRows<T> keys, const int64_t* slots, int64_t t0, int64_t n, uint32_t* out) {
  constexpr int kUnits = D * sizeof(T) / 4;
  for (int j = 0; j < 4; ++j) {
    const uint32_t* rows[16];
    for (int l = 0; l < 16; ++l) {
      rows[l] = reinterpret_cast<const uint32_t*>(keys.at(slots[std::min(t0 + 16 * j + l, n - 1)]));
    }
    for (int u0 = 0; u0 < kUnits; u0 += 16) {
      __m512i r[16];
      for (int l = 0; l < 16; ++l) r[l] = _mm512_loadu_si512(rows[l] + u0);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (j * kUnits + u0 + i) * 16, r[i]);
    }
  }
}

// Scores of R query rows (their units) against a packed 64-token key block, scaled: one chain per
// (row, token) over the units in order, from zero.
template <typename T, int D, int R>
inline void score_block(const uint32_t* const* q, const uint32_t* keys, __m512 scale, float* const* out) {
  constexpr int kUnits = D * sizeof(T) / 4;
  __m512 acc[R][4];
  for (auto& row : acc) for (auto& a : row) a = _mm512_setzero_ps();
  for (int i = 0; i < kUnits; ++i) {
    __m512i k[4];
    for (int j = 0; j < 4; ++j) k[j] = _mm512_loadu_si512(keys + (j * kUnits + i) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512i unit = _mm512_set1_epi32(static_cast<int>(q[r][i]));
      for (int j = 0; j < 4; ++j) acc[r][j] = Units<T>::step(acc[r][j], unit, k[j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out[r] + 16 * j, _mm512_mul_ps(acc[r][j], scale));
  }
}

template <typename T, int D>
void score_rows(const uint32_t* const* q, int rows, const uint32_t* keys, __m512 scale, float* const* out) {
  for (int r = 0; r < rows; r += kMaxScoreRows) {
    switch (std::min(rows - r, kMaxScoreRows)) {
      case 1: score_block<T, D, 1>(q + r, keys, scale, out + r); break;
      case 2: score_block<T, D, 2>(q + r, keys, scale, out + r); break;
      case 3: score_block<T, D, 3>(q + r, keys, scale, out + r); break;
      default: score_block<T, D, 4>(q + r, keys, scale, out + r); break;
    }
  }
}

// The same scores for up to 8 rows that share one KV head's keys, 16 tokens [t0, t0 + 16) at a time,
// transposed in registers and used at once (no packed copy): the decode kernel's few heads per KV head.
template <typename T, int D, int R>
inline void score_tile_direct(const uint32_t* const* q, HeadRows<T> keys, const int64_t* slots, int64_t t0, int64_t n,
                              __m512 scale, float* const* out, RowStream& stream) {
  constexpr int kUnits = D * sizeof(T) / 4;
  const int64_t tile_rows = std::min<int64_t>(16, n - t0);  // each step reads a line of each
  const uint32_t* rows[16];
  for (int l = 0; l < 16; ++l) rows[l] = reinterpret_cast<const uint32_t*>(keys.at(slots[std::min(t0 + l, n - 1)]));
  __m512 acc[R];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int u0 = 0; u0 < kUnits; u0 += 16) {
    __m512i r[16];
    for (int l = 0; l < 16; ++l) r[l] = _mm512_loadu_si512(rows[l] + u0);
    stream.advance(tile_rows);
    transpose16(r);
    for (int i = 0; i < 16; ++i) {
      for (int h = 0; h < R; ++h) {
        acc[h] = Units<T>::step(acc[h], _mm512_set1_epi32(static_cast<int>(q[h][u0 + i])), r[i]);
      }
    }
  }
  for (int h = 0; h < R; ++h) _mm512_storeu_ps(out[h] + t0, _mm512_mul_ps(acc[h], scale));
}

template <typename T, int D>
void score_rows_direct(const uint32_t* const* q, int rows, HeadRows<T> keys, const int64_t* slots, int64_t t0,
                       int64_t n, __m512 scale, float* const* out, RowStream& stream) {
  for (int r = 0; r < rows; r += 8) {
    switch (std::min(rows - r, 8)) {
      case 1: score_tile_direct<T, D, 1>(q + r, keys, slots, t0, n, scale, out + r, stream); break;
      case 2: score_tile_direct<T, D, 2>(q + r, keys, slots, t0, n, scale, out + r, stream); break;
      case 3: score_tile_direct<T, D, 3>(q + r, keys, slots, t0, n, scale, out + r, stream); break;
      case 4: score_tile_direct<T, D, 4>(q + r, keys, slots, t0, n, scale, out + r, stream); break;
      case 5: score_tile_direct<T, D, 5>(q + r, keys, slots, t0, n, scale, out + r, stream); break;
      case 6: score_tile_direct<T, D, 6>(q + r, keys, slots, t0, n, scale, out + r, stream); break;
      case 7: score_tile_direct<T, D, 7>(q + r, keys, slots, t0, n, scale, out + r, stream); break;
      default: score_tile_direct<T, D, 8>(q + r, keys, slots, t0, n, scale, out + r, stream); break;
    }
  }
}

// Lanes of the tile [t, t + 16) whose tokens are in [first, n).
inline __mmask16 span_mask(int64_t t, int64_t first, int64_t n) {
  const __mmask16 below_n = t < n ? tail_mask(n - t) : 0;
  const __mmask16 below_first = t < first ? tail_mask(first - t) : 0;
  return below_n & static_cast<__mmask16>(~below_first);
}

// The maximum of s[first .. n).
inline float max_score(const float* s, int64_t first, int64_t n) {
  __m512 max16 = _mm512_set1_ps(-INFINITY);
  for (int64_t t = first / 16 * 16; t < n; t += 16) {
    const __mmask16 valid = span_mask(t, first, n);
    max16 = _mm512_mask_max_ps(max16, valid, max16, _mm512_maskz_loadu_ps(valid, s + t));
  }
  return _mm512_reduce_max_ps(max16);
}

// s[t] = exp(s[t] - max) for first <= t < n, 0 for the other t < end (end a multiple of 16), each
// tile of 16 added to sum16 in order (the tiles before first's add exact zeros).
inline void exponentiate(float* s, int64_t first, int64_t n, int64_t end, float max, __m512& sum16) {
  const __m512 max16 = _mm512_set1_ps(max);
  for (int64_t t = 0; t < end; t += 16) {
    const __mmask16 valid = span_mask(t, first, n);
    const __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, s + t), max16)));
    _mm512_storeu_ps(s + t, p);
    sum16 = _mm512_add_ps(sum16, p);
  }
}

// Value units of one KV head: unit j is, for bf16, tokens (2j, 2j + 1) interleaved by unpacklo/hi
// (so each register's 16 lanes hold permuted dims of 32: store_output puts them back); for fp32,
// token j. Read from the pool's rows (tokens from n on read token n - 1: their probabilities are 0)...
// load(j, c0, v) gives the register chunks c0 .. c0 + C - 1 (16 dims each, D / 16 in all) of unit j.
template <typename T, int D>
struct PoolValues {
  HeadRows<T> rows;
  const int64_t* slots;
  int64_t n;
  // A decode's reading advances its stream by `credits` (RowStream::advance_credits) per load.
  RowStream* stream = nullptr;
  int64_t credits = 0;
  template <int C>
  void load(int64_t j, int c0, __m512i* v) const {
    if (stream != nullptr) stream->advance_credits(credits);
    if constexpr (Units<T>::kPerToken == 2) {
      const T* even = rows.at(slots[std::min(2 * j, n - 1)]) + 16 * c0;
      const T* odd = rows.at(slots[std::min(2 * j + 1, n - 1)]) + 16 * c0;
      for (int c = 0; c < C / 2; ++c) {
        const __m512i x = _mm512_loadu_si512(even + 32 * c), y = _mm512_loadu_si512(odd + 32 * c);
        v[2 * c] = _mm512_unpacklo_epi16(x, y);
        v[2 * c + 1] = _mm512_unpackhi_epi16(x, y);
      }
    } else {
      const T* row = rows.at(slots[std::min(j, n - 1)]) + 16 * c0;
      for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_si512(row + 16 * c);
    }
  }
};

// ... or from a copy packed in that layout once, for the GEMMs that read each unit for many rows.
template <int D>
struct PackedValues {
  const uint32_t* units;  // [j][D / 16][16]
  template <int C>
  void load(int64_t j, int c0, __m512i* v) const {
    for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_si512(units + (j * (D / 16) + c0 + c) * 16);
  }
};

// Units [j0, j1) packed from out on (unit j at out + (j - j0) * D).
template <typename T, int D>
void pack_values(const PoolValues<T, D>& values, int64_t j0, int64_t j1, uint32_t* out) {
  for (int64_t j = j0; j < j1; ++j) {
    __m512i v[D / 16];
    values.template load<D / 16>(j, 0, v);
    for (int c = 0; c < D / 16; ++c) _mm512_storeu_si512(out + ((j - j0) * (D / 16) + c) * 16, v[c]);
  }
}

// Register chunks of the weighted sums per pass over the tokens: D = 256 takes four passes, each dim's
// chain the same. NOTE: 4 chunks of 4 rows rather than 8 of 2: each value unit loaded (and, bf16, unpacked)
// serves 4 rows, not 2; Gemma 3's decodes (4 query heads a KV head, D = 256) 8-9% faster from L3, D = 128 the
// same.
template <int D>
constexpr int kPassChunks = std::min(D / 16, 4);

// acc[r] += the weighted sum of value units [j0, j1) for R rows of probability units: per dim, one
// chain over the units in order.
template <typename T, int D, int R, typename Source>
inline void value_block(const uint32_t* const* p, int64_t j0, int64_t j1, const Source& values, __m512* acc) {
  constexpr int kChunks = D / 16, kPass = kPassChunks<D>;
  for (int c0 = 0; c0 < kChunks; c0 += kPass) {
    __m512 a[R][kPass];
    for (int r = 0; r < R; ++r) for (int c = 0; c < kPass; ++c) a[r][c] = acc[r * kChunks + c0 + c];
    for (int64_t j = j0; j < j1; ++j) {
      __m512i v[kPass];
      values.template load<kPass>(j, c0, v);
      for (int r = 0; r < R; ++r) {
        const __m512i unit = _mm512_set1_epi32(static_cast<int>(p[r][j]));
        for (int c = 0; c < kPass; ++c) a[r][c] = Units<T>::step(a[r][c], unit, v[c]);
      }
    }
    for (int r = 0; r < R; ++r) for (int c = 0; c < kPass; ++c) acc[r * kChunks + c0 + c] = a[r][c];
  }
}

template <typename T, int D>
constexpr int kValueRows = std::max(1, 16 / kPassChunks<D>);  // 16 accumulators

template <typename T, int D, typename Source>
void value_rows(const uint32_t* const* p, int rows, int64_t j0, int64_t j1, const Source& values, __m512* acc) {
  constexpr int kRows = kValueRows<T, D>, kChunks = D / 16;
  for (int r = 0; r < rows; r += kRows) {
    const int count = std::min(rows - r, kRows);
    if constexpr (kRows >= 4) {
      if (count == 3) { value_block<T, D, 3>(p + r, j0, j1, values, acc + r * kChunks); continue; }
    }
    if constexpr (kRows >= 2) {
      if (count == 2) { value_block<T, D, 2>(p + r, j0, j1, values, acc + r * kChunks); continue; }
    }
    if (count == 1) { value_block<T, D, 1>(p + r, j0, j1, values, acc + r * kChunks); continue; }
    value_block<T, D, kRows>(p + r, j0, j1, values, acc + r * kChunks);
  }
}

// out = acc / sum, the dims back in order, in the output's dtype.
template <typename T, int D, typename O>
inline void store_output(const __m512* acc, float sum, O* out) {
  const __m512 scale = _mm512_set1_ps(1.0f / sum);
  __m512 x[D / 16];
  if constexpr (Units<T>::kPerToken == 2) {
    // unpacklo/hi left chunk 2c with dims {0-3, 8-11, 16-19, 24-27} and 2c + 1 with {4-7, ...} of 32.
    const __m512i low = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i high = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    for (int c = 0; c < D / 32; ++c) {
      x[2 * c] = _mm512_permutex2var_ps(acc[2 * c], low, acc[2 * c + 1]);
      x[2 * c + 1] = _mm512_permutex2var_ps(acc[2 * c], high, acc[2 * c + 1]);
    }
  } else {
    for (int c = 0; c < D / 16; ++c) x[c] = acc[c];
  }
  for (int c = 0; c < D / 16; ++c) {
    const __m512 y = _mm512_mul_ps(x[c], scale);
    if constexpr (std::is_same_v<O, bf16>) store_bf16(out + 16 * c, y, 0xFFFF); else _mm512_storeu_ps(out + 16 * c, y);
  }
}

// ---- decode_attention

// One request's query heads (all KV heads): their scores over its n own tokens (those after the
// prefix) into scores[h * stride + t], 64 tokens at a time, every KV head's, so that each K row (all
// heads) is read from memory once (the stream prefetching ahead as they are read).
template <typename T, int D>
void request_scores(const uint32_t* q, int64_t heads, const T* key_cache, int64_t kv_heads, const int64_t* slots,
                    int64_t n, float* scores, int64_t stride, RowStream& stream) {
  const int64_t group = heads / kv_heads, row = kv_heads * D;
  constexpr int kUnits = D * sizeof(T) / 4;
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));
  const uint32_t* q_rows[64];
  float* out_rows[64];
  for (int64_t t0 = 0; t0 < n; t0 += kBlockTokens) {
    for (int64_t g = 0; g < kv_heads; ++g) {
      for (int64_t r = 0; r < group; ++r) {
        q_rows[r] = q + (g * group + r) * kUnits;
        out_rows[r] = scores + (g * group + r) * stride;
      }
      for (int64_t t = t0; t < std::min(n, t0 + kBlockTokens); t += 16) {
        score_rows_direct<T, D>(q_rows, static_cast<int>(group), {key_cache + g * D, row}, slots, t, n, scale,
                                out_rows, stream);
      }
    }
  }
}

template <typename T, int D>
void decode_all(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                const at::Tensor& context_slots, const at::Tensor& context_lens, const at::Tensor& prefix_slots,
                int64_t window, at::Tensor& out) {
  constexpr int kUnits = D * sizeof(T) / 4, kChunks = D / 16;
  constexpr int64_t kPer = Units<T>::kPerToken;
  const int64_t batch = query.size(0), heads = query.size(1), kv_heads = key_cache.size(1);
  const int64_t group = heads / kv_heads, row = kv_heads * D, max_context = context_slots.size(1);
  const int64_t prefix = prefix_slots.size(0);
  const auto* q = reinterpret_cast<const uint32_t*>(query.data_ptr<T>());
  const T* k = key_cache.data_ptr<T>();
  const T* v = value_cache.data_ptr<T>();
  const int64_t* slots = context_slots.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* prefix_s = prefix_slots.data_ptr<int64_t>();
  T* o = out.data_ptr<T>();
  const int64_t stride = round_up(max_context, kBlockTokens);
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));

  // The prefix's part, when there is one: its scores for all B x heads rows (row b * heads + h).
  const int64_t prefix_pad = round_up(prefix, kBlockTokens);
  std::vector<float> prefix_scores(batch * heads * prefix_pad);
  std::vector<float> state;  // [B * heads][D]: each row's weighted sum over the prefix (then on)
  std::vector<uint32_t> packed_keys, packed_values;  // the prefix's, per KV head
  // The prefix's GEMMs take each KV head's B x group query rows, kRowsPerTask a task: row i of KV
  // head g is query head g * group + i % group of request i / group.
  const int64_t rows_per_head = batch * group, tasks_per_head = (rows_per_head + kRowsPerTask - 1) / kRowsPerTask;
  auto prefix_row = [&](int64_t g, int64_t i) { return i / group * heads + g * group + i % group; };
  if (prefix > 0) {
    packed_keys.resize(kv_heads * prefix_pad * kUnits);
    packed_values.resize(kv_heads * prefix_pad * kUnits);
    at::parallel_for(0, kv_heads * (prefix_pad / kBlockTokens), 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task / (prefix_pad / kBlockTokens), t0 = task % (prefix_pad / kBlockTokens) * kBlockTokens;
        pack_key_block<T, D>({k + g * D, row}, prefix_s, t0, prefix,
                             packed_keys.data() + (g * prefix_pad + t0) * kUnits);
        pack_values<T, D>({{v + g * D, row}, prefix_s, prefix}, t0 / kPer, (t0 + kBlockTokens) / kPer,
                          packed_values.data() + (g * prefix_pad + t0) * kUnits);
      }
    });
    at::parallel_for(0, kv_heads * tasks_per_head, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task / tasks_per_head, first = task % tasks_per_head * kRowsPerTask;
        const int count = static_cast<int>(std::min(kRowsPerTask, rows_per_head - first));
        const uint32_t* q_rows[kRowsPerTask];
        float* out_rows[kRowsPerTask];
        for (int r = 0; r < count; ++r) {
          q_rows[r] = q + prefix_row(g, first + r) * kUnits;
          out_rows[r] = prefix_scores.data() + prefix_row(g, first + r) * prefix_pad;
        }
        for (int64_t t0 = 0; t0 < prefix_pad; t0 += kBlockTokens) {
          float* block_rows[kRowsPerTask];
          for (int r = 0; r < count; ++r) block_rows[r] = out_rows[r] + t0;
          score_rows<T, D>(q_rows, count, packed_keys.data() + (g * prefix_pad + t0) * kUnits, scale, block_rows);
        }
      }
    });
    state.assign(batch * heads * D, 0.0f);
  }

  // Per request: its own scores, the softmax over prefix and own tokens, and (without a prefix, at
  // once) the weighted sums. With a prefix, the prefix's weighted sums come between.
  std::vector<float> own_scores(prefix > 0 ? batch * heads * stride : 0);
  std::vector<float> sums(batch * heads);
  // Under a window, request b's work starts at its first visible token's multiple of 32 (to_units
  // converts 32 tokens at a time): from there on its context is tokens_from(b) .. + own_len(b), the
  // first masked_len(b) of them masked.
  auto skipped = [&](int64_t b) { return window > 0 ? std::max<int64_t>(0, lens[b] - window) / 32 * 32 : 0; };
  auto tokens_from = [&](int64_t b) { return slots + b * max_context + skipped(b); };
  auto own_len = [&](int64_t b) { return lens[b] - skipped(b); };
  auto masked_len = [&](int64_t b) { return window > 0 ? std::max<int64_t>(0, lens[b] - window) - skipped(b) : 0; };
  // The rows requests [begin, end) read, in order: keys then values (phases 0..1), or one of them.
  auto stream_of = [&](int64_t begin, int64_t end, int first_phase, int last_phase) {
    std::vector<RowStream::Span> spans;
    for (int64_t b = begin; b < end; ++b) spans.push_back({tokens_from(b), own_len(b)});
    const int64_t row_bytes = row * static_cast<int64_t>(sizeof(T));
    return RowStream(k, v, row_bytes, row_bytes, std::move(spans), first_phase, last_phase);
  };
  // value_rows' loads of one KV head's units: value_block calls (kValueRows rows each) x passes (kPassChunks)
  // per unit. Each load advances the stream by its share of the V rows' lines.
  constexpr int64_t kPasses = kChunks / kPassChunks<D>;
  const int64_t loads_per_unit = kv_heads * ((group + kValueRows<T, D> - 1) / kValueRows<T, D>) * kPasses;
  // Request b's weighted sums over its own tokens, all heads (probabilities scores_b[h * stride + t]),
  // added to acc[h * kChunks + c]: 64 tokens at a time, every KV head's, so that each V row (all heads)
  // is read from memory once.
  auto own_values = [&](int64_t b, const float* scores_b, __m512* acc, RowStream& stream) {
    const int64_t n = own_len(b), units = (n + kPer - 1) / kPer;
    const int64_t* own = tokens_from(b);
    for (int64_t t0 = 0; t0 < n; t0 += kBlockTokens) {
      const int64_t block_units = std::min((t0 + kBlockTokens) / kPer, units) - t0 / kPer;
      const int64_t block_lines = std::min(kBlockTokens, n - t0) * (row * static_cast<int64_t>(sizeof(T)) / 64);
      const int64_t credits = (block_lines << RowStream::kCreditBits) / (block_units * loads_per_unit);
      for (int64_t g = 0; g < kv_heads; ++g) {
        const uint32_t* p_rows[64];
        for (int64_t r = 0; r < group; ++r) {
          p_rows[r] = reinterpret_cast<const uint32_t*>(scores_b + (g * group + r) * stride);
        }
        const PoolValues<T, D> values{{v + g * D, row}, own, n, &stream, credits};
        value_rows<T, D>(p_rows, static_cast<int>(group), t0 / kPer, std::min((t0 + kBlockTokens) / kPer, units),
                         values, acc + g * group * kChunks);
      }
    }
  };
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> local(prefix > 0 ? 0 : heads * stride);
    std::vector<__m512> acc(heads * kChunks);
    // With a prefix, the values come in a later pass: keys only here.
    RowStream stream = stream_of(begin, end, 0, prefix > 0 ? 0 : 1);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = own_len(b), masked = masked_len(b);
      float* scores_b = prefix > 0 ? own_scores.data() + b * heads * stride : local.data();
      request_scores<T, D>(q + b * heads * kUnits, heads, k, kv_heads, tokens_from(b), n, scores_b, stride, stream);
      for (int64_t h = 0; h < heads; ++h) {
        float* s = scores_b + h * stride;
        float* ps = prefix > 0 ? prefix_scores.data() + (b * heads + h) * prefix_pad : nullptr;
        const float max = std::max(max_score(s, masked, n), prefix > 0 ? max_score(ps, 0, prefix) : -INFINITY);
        __m512 sum16 = _mm512_setzero_ps();
        if (prefix > 0) {
          exponentiate(ps, 0, prefix, round_up(prefix, 32), max, sum16);
          Units<T>::to_units(ps, prefix);
        }
        exponentiate(s, masked, n, round_up(n, 32), max, sum16);
        Units<T>::to_units(s, n);
        sums[b * heads + h] = _mm512_reduce_add_ps(sum16);
      }
      if (prefix > 0) continue;
      std::fill(acc.begin(), acc.end(), _mm512_setzero_ps());
      own_values(b, scores_b, acc.data(), stream);
      for (int64_t h = 0; h < heads; ++h) {
        store_output<T, D>(acc.data() + h * kChunks, sums[b * heads + h], o + (b * heads + h) * D);
      }
    }
  });
  if (prefix == 0) return;

  at::parallel_for(0, kv_heads * tasks_per_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512> acc(kRowsPerTask * kChunks);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / tasks_per_head, first = task % tasks_per_head * kRowsPerTask;
      const int count = static_cast<int>(std::min(kRowsPerTask, rows_per_head - first));
      const uint32_t* p_rows[kRowsPerTask];
      for (int r = 0; r < count; ++r) {
        p_rows[r] = reinterpret_cast<const uint32_t*>(prefix_scores.data() + prefix_row(g, first + r) * prefix_pad);
      }
      std::fill(acc.begin(), acc.end(), _mm512_setzero_ps());
      const PackedValues<D> values{packed_values.data() + g * prefix_pad * kUnits};
      value_rows<T, D>(p_rows, count, 0, (prefix + kPer - 1) / kPer, values, acc.data());
      for (int r = 0; r < count; ++r) {
        float* row_state = state.data() + prefix_row(g, first + r) * D;
        for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(row_state + 16 * c, acc[r * kChunks + c]);
      }
    }
  });
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512> acc(heads * kChunks);
    RowStream stream = stream_of(begin, end, 1, 1);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < heads * kChunks; ++i) acc[i] = _mm512_loadu_ps(state.data() + b * heads * D + 16 * i);
      own_values(b, own_scores.data() + b * heads * stride, acc.data(), stream);
      for (int64_t h = 0; h < heads; ++h) {
        store_output<T, D>(acc.data() + h * kChunks, sums[b * heads + h], o + (b * heads + h) * D);
      }
    }
  });
}

// ---- chunk_attention

template <typename T, int D>
void chunk_all(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
               const at::Tensor& query_start, const at::Tensor& num_queries, const at::Tensor& context_slots,
               const at::Tensor& context_lens, int64_t window, at::Tensor& out) {
  constexpr int kUnits = D * sizeof(T) / 4, kChunks = D / 16;
  constexpr int64_t kPer = Units<T>::kPerToken;
  const int64_t requests = query_start.size(0), heads = query.size(1), kv_heads = key_cache.size(1);
  const int64_t group = heads / kv_heads, row = kv_heads * D, max_context = context_slots.size(1);
  const auto* q = reinterpret_cast<const uint32_t*>(query.data_ptr<T>());
  const T* k = key_cache.data_ptr<T>();
  const T* v = value_cache.data_ptr<T>();
  const int64_t* starts = query_start.data_ptr<int64_t>();
  const int64_t* counts = num_queries.data_ptr<int64_t>();
  const int64_t* slots = context_slots.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* o = out.data_ptr<T>();
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));

  // The first context token that request i's query token `token` sees; the packed copies start at
  // the block of 64 holding its first query's (under a window, older blocks are not read).
  auto first_visible = [&](int64_t i, int64_t token) {
    return window > 0 ? std::max<int64_t>(0, lens[i] - counts[i] + token - window + 1) : 0;
  };
  auto in_place = [&](int64_t i) { return counts[i] * group <= kMaxInPlaceRows; };
  // A task's query rows (of one KV head): all of an in-place chunk's, else kRowsPerTask.
  auto rows_per_task = [&](int64_t i) { return in_place(i) ? counts[i] * group : kRowsPerTask; };
  std::vector<int64_t> packed_from(requests), packed_len(requests);
  // Each request's keys, packed per KV head: [request][kv head][its packed tokens][units][16].
  std::vector<int64_t> packed_at(requests + 1, 0), first_task(requests + 1, 0);
  for (int64_t i = 0; i < requests; ++i) {
    packed_from[i] = first_visible(i, 0) / kBlockTokens * kBlockTokens;
    packed_len[i] = in_place(i) ? 0 : round_up(lens[i], kBlockTokens) - packed_from[i];
    packed_at[i + 1] = packed_at[i] + kv_heads * packed_len[i] * kUnits;
    first_task[i + 1] = first_task[i] + kv_heads * ((counts[i] * group + rows_per_task(i) - 1) / rows_per_task(i));
  }
  // NOTE: not zeroed, as a std::vector would (8% of a call for drafts' short chunks): every unit is packed.
  const std::unique_ptr<uint32_t[]> packed(new uint32_t[packed_at[requests]]);
  const std::unique_ptr<uint32_t[]> packed_values(new uint32_t[packed_at[requests]]);
  std::vector<int64_t> pack_tasks;  // (request, kv head, block) flattened
  for (int64_t i = 0; i < requests; ++i) {
    for (int64_t g = 0; g < kv_heads && !in_place(i); ++g) {
      for (int64_t t0 = packed_from[i]; t0 < lens[i]; t0 += kBlockTokens) {
        pack_tasks.push_back((i * kv_heads + g) * max_context + t0);
      }
    }
  }
  at::parallel_for(0, static_cast<int64_t>(pack_tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = pack_tasks[task] / (kv_heads * max_context), g = pack_tasks[task] / max_context % kv_heads;
      const int64_t t0 = pack_tasks[task] % max_context;
      const int64_t at = packed_at[i] + (g * packed_len[i] + t0 - packed_from[i]) * kUnits;
      pack_key_block<T, D>({k + g * D, row}, slots + i * max_context, t0, lens[i], packed.get() + at);
      pack_values<T, D>({{v + g * D, row}, slots + i * max_context, lens[i]}, t0 / kPer, (t0 + kBlockTokens) / kPer,
                        packed_values.get() + at);
    }
  });

  const int64_t row_bytes = row * static_cast<int64_t>(sizeof(T)), head_bytes = D * static_cast<int64_t>(sizeof(T));
  const RowStream unpaced(k, v, row_bytes, row_bytes, {}, 0, 0);  // reads nothing ahead
  at::parallel_for(0, first_task[requests], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<__m512> acc(kMaxInPlaceRows * kChunks);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const int64_t tasks_per_head = (counts[i] * group + rows_per_task(i) - 1) / rows_per_task(i);
      const int64_t g = (task - first_task[i]) / tasks_per_head;
      const int64_t first = (task - first_task[i]) % tasks_per_head * rows_per_task(i);
      const int count = static_cast<int>(std::min(rows_per_task(i), counts[i] * group - first));
      const int64_t first_position = lens[i] - counts[i];
      // Row r: query token (first + r) / group, head g * group + (first + r) % group; it sees
      // tokens [first_visible(i, its token), first_position + its token + 1). The task's scores and
      // sums start at `from`, the block of 64 holding its first row's first visible token: positions
      // below are relative to it.
      const int64_t from = first_visible(i, first / group) / kBlockTokens * kBlockTokens;
      const int64_t widest = first_position + (first + count - 1) / group + 1 - from;
      const int64_t stride = round_up(widest, kBlockTokens);
      scores.resize(count * stride);
      const uint32_t* q_rows[kMaxInPlaceRows];
      float* s_rows[kMaxInPlaceRows];
      int64_t row_first[kMaxInPlaceRows], row_len[kMaxInPlaceRows], out_index[kMaxInPlaceRows];
      for (int r = 0; r < count; ++r) {
        const int64_t token = (first + r) / group;
        out_index[r] = (starts[i] + token) * heads + g * group + (first + r) % group;
        q_rows[r] = q + out_index[r] * kUnits;
        s_rows[r] = scores.data() + r * stride;
        row_first[r] = first_visible(i, token) - from;
        row_len[r] = first_position + token + 1 - from;
      }
      const int64_t at = packed_at[i] + (g * packed_len[i] + from - packed_from[i]) * kUnits;
      // In place: the context's rows of this KV head, keys then values, read ahead as they are read (as decodes'),
      // paced by the first 8 rows' scores (one pass over the keys) and the weighted sums' loads.
      const int64_t* context = slots + i * max_context + from;
      RowStream stream = in_place(i) ? RowStream(k + g * D, v + g * D, row_bytes, head_bytes, {{context, widest}}, 0, 1)
                                     : unpaced;
      if (in_place(i)) {
        const int paced = std::min(count, 8);
        RowStream rest = unpaced;
        for (int64_t t0 = 0; t0 < widest; t0 += 16) {
          score_rows_direct<T, D>(q_rows, paced, {k + g * D, row}, context, t0, widest, scale, s_rows, stream);
          score_rows_direct<T, D>(q_rows + paced, count - paced, {k + g * D, row}, context, t0, widest, scale,
                                  s_rows + paced, rest);
        }
      } else {
        for (int64_t t0 = 0; t0 < widest; t0 += kBlockTokens) {
          float* block_rows[kRowsPerTask];
          for (int r = 0; r < count; ++r) block_rows[r] = s_rows[r] + t0;
          score_rows<T, D>(q_rows, count, packed.get() + at + t0 * kUnits, scale, block_rows);
        }
      }
      float sums[kMaxInPlaceRows];
      const uint32_t* p_rows[kMaxInPlaceRows];
      for (int r = 0; r < count; ++r) {
        __m512 sum16 = _mm512_setzero_ps();
        exponentiate(s_rows[r], row_first[r], row_len[r], stride, max_score(s_rows[r], row_first[r], row_len[r]),
                     sum16);
        Units<T>::to_units(s_rows[r], stride);
        sums[r] = _mm512_reduce_add_ps(sum16);
        p_rows[r] = reinterpret_cast<const uint32_t*>(s_rows[r]);
      }
      std::fill(acc.begin(), acc.end(), _mm512_setzero_ps());
      const int64_t units = (widest + kPer - 1) / kPer;
      if (in_place(i)) {
        // Each unit is loaded once per pass of each value_block call: its rows' lines over that many loads.
        constexpr int64_t kPasses = kChunks / kPassChunks<D>;
        const int64_t loads_per_unit = (count + kValueRows<T, D> - 1) / kValueRows<T, D> * kPasses;
        for (int64_t t0 = 0; t0 < widest; t0 += kBlockTokens) {
          const int64_t block_units = std::min((t0 + kBlockTokens) / kPer, units) - t0 / kPer;
          const int64_t block_lines = std::min(kBlockTokens, widest - t0) * (head_bytes / 64);
          const int64_t credits = (block_lines << RowStream::kCreditBits) / (block_units * loads_per_unit);
          const PoolValues<T, D> values{{v + g * D, row}, context, widest, &stream, credits};
          value_rows<T, D>(p_rows, count, t0 / kPer, t0 / kPer + block_units, values, acc.data());
        }
      } else {
        const PackedValues<D> values{packed_values.get() + at};
        value_rows<T, D>(p_rows, count, 0, units, values, acc.data());
      }
      for (int r = 0; r < count; ++r) store_output<T, D>(acc.data() + r * kChunks, sums[r], o + out_index[r] * D);
    }
  });
}

// ---- the ops

void check_common(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 3 && value_cache.sizes() == key_cache.sizes(),
              "query [rows, heads, D], key/value cache [slots, kv_heads, D]");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "query and caches must be contiguous");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() && key_cache.scalar_type() == value_cache.scalar_type(),
              "query and cache dtypes differ");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kFloat, "bf16 or fp32 only");
  TORCH_CHECK(query.size(2) == 64 || query.size(2) == 128 || query.size(2) == 256, "head_dim 64, 128 or 256 only");
  TORCH_CHECK(key_cache.size(1) >= 1 && query.size(1) % key_cache.size(1) == 0 && query.size(2) == key_cache.size(2),
              "head shapes");
  TORCH_CHECK(query.size(1) / key_cache.size(1) <= 64, "at most 64 query heads per KV head");
}

// The window in tokens, 0 for none.
int64_t window_tokens(const std::optional<int64_t>& window) {
  TORCH_CHECK(!window.has_value() || *window >= 1, "window: at least 1 token");
  return window.value_or(0);
}

void check_contexts(const at::Tensor& context_slots, const at::Tensor& context_lens, int64_t rows, int64_t min_len,
                    int64_t num_slots) {
  TORCH_CHECK(context_slots.dim() == 2 && context_slots.size(0) == rows && context_lens.dim() == 1 &&
              context_lens.size(0) == rows && context_lens.scalar_type() == at::kLong && context_lens.is_contiguous(),
              "context_slots [R, L] and context_lens [R] int64");
  TORCH_CHECK(all_within(context_lens.data_ptr<int64_t>(), rows, min_len, context_slots.size(1)),
              "every context needs ", min_len, "..L tokens");
  check_slots(context_slots, num_slots, "context_slots");
}

template <template <typename, int> class Fn, typename... Args>
void dispatch(const at::Tensor& query, Args&&... args) {
  const bool bf = query.scalar_type() == at::kBFloat16;
  switch (query.size(2)) {
    case 64: bf ? Fn<bf16, 64>::run(args...) : Fn<float, 64>::run(args...); break;
    case 128: bf ? Fn<bf16, 128>::run(args...) : Fn<float, 128>::run(args...); break;
    default: bf ? Fn<bf16, 256>::run(args...) : Fn<float, 256>::run(args...); break;
  }
}

template <typename T, int D>
struct Decode {
  template <typename... Args>
  static void run(Args&&... args) { decode_all<T, D>(args...); }
};

template <typename T, int D>
struct Chunk {
  template <typename... Args>
  static void run(Args&&... args) { chunk_all<T, D>(args...); }
};

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                            const at::Tensor& context_slots, const at::Tensor& context_lens,
                            const at::Tensor& prefix_slots, std::optional<int64_t> window) {
  check_common(query, key_cache, value_cache);
  TORCH_CHECK(prefix_slots.dim() == 1 && prefix_slots.size(0) % 16 == 0, "prefix_slots: [P], P a multiple of 16");
  TORCH_CHECK(!window.has_value() || prefix_slots.size(0) == 0, "no prefix_slots under a window");
  check_slots(prefix_slots, key_cache.size(0), "prefix_slots");
  check_contexts(context_slots, context_lens, query.size(0), 1, key_cache.size(0));
  at::Tensor out = at::empty(query.sizes(), query.options());
  if (query.size(0) > 0) {
    dispatch<Decode>(query, query, key_cache, value_cache, context_slots, context_lens, prefix_slots,
                     window_tokens(window), out);
  }
  return out;
}

at::Tensor chunk_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& query_start, const at::Tensor& num_queries,
                           const at::Tensor& context_slots, const at::Tensor& context_lens,
                           std::optional<int64_t> window) {
  check_common(query, key_cache, value_cache);
  const int64_t requests = query_start.size(0);
  TORCH_CHECK(query_start.dim() == 1 && num_queries.sizes() == query_start.sizes() &&
              query_start.scalar_type() == at::kLong && num_queries.scalar_type() == at::kLong &&
              query_start.is_contiguous() && num_queries.is_contiguous(), "query_start and num_queries: [R] int64");
  check_contexts(context_slots, context_lens, requests, 1, key_cache.size(0));
  const int64_t* starts = query_start.data_ptr<int64_t>();
  const int64_t* counts = num_queries.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < requests; ++i) {
    TORCH_CHECK(counts[i] >= 1 && counts[i] <= lens[i] && starts[i] >= 0 && starts[i] + counts[i] <= query.size(0),
                "request ", i, ": its queries must be rows of query, at most its context");
  }
  at::Tensor out = at::zeros(query.sizes(), query.options());
  if (requests > 0) {
    dispatch<Chunk>(query, query, key_cache, value_cache, query_start, num_queries, context_slots, context_lens,
                    window_tokens(window), out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TOKENMILL_OPS, m) {
  m.def("decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor context_slots, "
        "Tensor context_lens, Tensor prefix_slots, int? window=None) -> Tensor", &decode_attention);
  m.def("chunk_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor query_start, "
        "Tensor num_queries, Tensor context_slots, Tensor context_lens, int? window=None) -> Tensor",
        &chunk_attention);
}

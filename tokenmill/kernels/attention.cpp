// Decode attention read straight from the paged KV pool.
//
// One query token per request attends to its context, whose K/V rows lie scattered over the pool.
// The torch path copies every context row into a dense tensor (a gather) and then runs SDPA over the
// copy: each K/V byte crosses memory three times. This kernel reads each row once, in place.
//
// Per request (the unit of parallel work, `at::parallel_for`): pass 1 walks the context's slots 16
// tokens at a time and scores every query head against its KV head's key (the K row of all KV heads
// is contiguous, so a row is fetched from memory once for all heads); the exact softmax follows;
// pass 2 sums the value rows weighted by it, the query heads of a KV head together. Storage may be
// bf16 or fp32; products and sums are fp32 (bf16 pairs through `_mm512_dpbf16_ps` where the CPU has
// AVX512-BF16). Rows are contiguous only within a block, so the hardware prefetcher loses the
// stream at every block boundary: pass 1 prefetches the K and V rows 16 tokens ahead, and pass 2,
// which works from cache, the next request's rows into L2.
//
// It returns fp32 outputs and each head's log-sum-exp, so a caller can merge it with attention over
// another part of the context: the shared prefix, which `prefix_attention` (bf16) attends to for all
// requests at once. There, per KV head, the B x group queries and the prefix's keys are two small
// GEMMs on bf16 pairs (register-blocked micro-kernels over K and V repacked once per call); the
// probabilities are rounded to bf16 for the second, as torch's fused CPU attention does.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

using namespace tokenmill;

// Pass 1 prefetches the K and V rows of the token this far ahead: rows are contiguous only within
// a block, so the hardware prefetcher loses the stream at each block boundary.
constexpr int64_t kPrefetchTokens = 16;

// Query heads per request that the decode kernel supports (its per-head scratch is on the stack).
constexpr int64_t kMaxHeads = 256;

// Lane i of the result is the sum of v[i]'s 16 lanes: 16 dot products finished at once, in 15
// adds and 30 shuffles instead of 16 separate horizontal reductions.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i) {  // 128-bit lane m: (t0, t1, t0, t1) partial sums of tokens 2i, 2i+1
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lane m: tokens 4i..4i+3, each summed over lane m
    __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u, w, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(u, w, _MM_SHUFFLE(3, 1, 3, 1)));
}

// One head's D-element query held in registers, its dot products with stored keys, and the
// weighted sum of stored values, for each storage type.
template <typename T, int D>
struct Head;

template <int D>
struct Head<float, D> {
  static constexpr int kAccumulators = D / 16;
  __m512 q[D / 16];
  explicit Head(const float* query) {
    for (int c = 0; c < D / 16; ++c) q[c] = _mm512_loadu_ps(query + 16 * c);
  }
  __m512 dot(const float* key) const {  // 16 partial sums
    __m512 acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(key));
    for (int c = 1; c < D / 16; ++c) acc = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(key + 16 * c), acc);
    return acc;
  }
  static void load_value(const float* value, __m512* v) {
    for (int c = 0; c < D / 16; ++c) v[c] = _mm512_loadu_ps(value + 16 * c);
  }
  static void store(const __m512* acc, __m512 scale, float* out) {
    for (int c = 0; c < D / 16; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], scale));
  }
};

template <int D>
struct Head<c10::BFloat16, D> {
  static constexpr int kAccumulators = D / 16;
#ifdef __AVX512BF16__
  __m512bh q[D / 32];
  explicit Head(const c10::BFloat16* query) {
    for (int c = 0; c < D / 32; ++c) q[c] = (__m512bh)_mm512_loadu_si512(query + 32 * c);
  }
  __m512 dot(const c10::BFloat16* key) const {  // bf16 pair products, summed in fp32
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < D / 32; ++c) acc = _mm512_dpbf16_ps(acc, q[c], (__m512bh)_mm512_loadu_si512(key + 32 * c));
    return acc;
  }
#else
  __m512 q_even[D / 32], q_odd[D / 32];
  explicit Head(const c10::BFloat16* query) {
    for (int c = 0; c < D / 32; ++c) {
      __m512i x = _mm512_loadu_si512(query + 32 * c);
      q_even[c] = even_bf16(x);
      q_odd[c] = odd_bf16(x);
    }
  }
  __m512 dot(const c10::BFloat16* key) const {
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < D / 32; ++c) {
      __m512i x = _mm512_loadu_si512(key + 32 * c);
      acc = _mm512_fmadd_ps(q_even[c], even_bf16(x), _mm512_fmadd_ps(q_odd[c], odd_bf16(x), acc));  // as vdpbf16ps
    }
    return acc;
  }
#endif
  static void load_value(const c10::BFloat16* value, __m512* v) {  // v: even, odd, even, ... elements
    for (int c = 0; c < D / 32; ++c) {
      __m512i x = _mm512_loadu_si512(value + 32 * c);
      v[2 * c] = even_bf16(x);
      v[2 * c + 1] = odd_bf16(x);
    }
  }
  static void store(const __m512* acc, __m512 scale, float* out) {
    const __m512i low = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i high = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int c = 0; c < D / 32; ++c) {
      __m512 even = _mm512_mul_ps(acc[2 * c], scale), odd = _mm512_mul_ps(acc[2 * c + 1], scale);
      _mm512_storeu_ps(out + 32 * c, _mm512_permutex2var_ps(even, low, odd));
      _mm512_storeu_ps(out + 32 * c + 16, _mm512_permutex2var_ps(even, high, odd));
    }
  }
};

// Softmax numerators in place: s[t] = exp(s[t] - max) for t < n. Returns their sum; *max gets the
// scores' maximum (the log-sum-exp is max + log(sum)).
inline float exponentiate(float* s, int64_t n, float* max) {
  __m512 max16 = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 valid = tail_mask(n - t);
    max16 = _mm512_mask_max_ps(max16, valid, max16, _mm512_maskz_loadu_ps(valid, s + t));
  }
  const float max_score = _mm512_reduce_max_ps(max16);
  max16 = _mm512_set1_ps(max_score);
  __m512 sum16 = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 valid = tail_mask(n - t);
    __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, s + t), max16)));
    _mm512_mask_storeu_ps(s + t, valid, p);
    sum16 = _mm512_add_ps(sum16, p);
  }
  *max = max_score;
  return _mm512_reduce_add_ps(sum16);
}

template <int kHint>
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(p + offset, static_cast<_mm_hint>(kHint));
}

// One request: query [heads, D] against its n context rows; writes out [heads, D] and lse [heads].
// scores ([heads, n rounded up to 16]) is the caller's scratch.
template <typename T, int D>
void attend_request(const T* query, const T* key_cache, const T* value_cache, const int64_t* slots, int64_t n,
                    const int64_t* next_slots, int64_t next_n, int64_t kv_heads, int64_t group, float* scores,
                    float* out, float* lse) {
  const int64_t heads = kv_heads * group;
  const int64_t row = kv_heads * D;  // elements of one slot's K (or V) row, all KV heads
  const int64_t stride = (n + 15) / 16 * 16;
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));
  for (int64_t t = 0; t < std::min(n, kPrefetchTokens); ++t) {
    prefetch_row<_MM_HINT_T0>(key_cache + slots[t] * row, row * sizeof(T));
    prefetch_row<_MM_HINT_T0>(value_cache + slots[t] * row, row * sizeof(T));
  }

  // Pass 1: scores of 16 tokens at a time, every head; a token's K row is read from memory once.
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const T* keys[16];
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t t = t0 + i;
      keys[i] = key_cache + slots[std::min(t, n - 1)] * row;  // past the end: a real row, result unused
      if (t + kPrefetchTokens < n) {
        prefetch_row<_MM_HINT_T0>(key_cache + slots[t + kPrefetchTokens] * row, row * sizeof(T));
        prefetch_row<_MM_HINT_T0>(value_cache + slots[t + kPrefetchTokens] * row, row * sizeof(T));
      }
    }
    const __mmask16 valid = tail_mask(n - t0);
    for (int64_t h = 0; h < heads; ++h) {
      const Head<T, D> head(query + h * D);
      const int64_t offset = (h / group) * D;
      __m512 partial[16];
      for (int i = 0; i < 16; ++i) partial[i] = head.dot(keys[i] + offset);
      _mm512_mask_storeu_ps(scores + h * stride + t0, valid, _mm512_mul_ps(sum_lanes16(partial), scale));
    }
  }

  // Softmax per head, then pass 2: the weighted sums of value rows (now in cache), the query heads
  // of a KV head together, so that each value row is loaded and widened once for all of them.
  float inv_sums[kMaxHeads];
  for (int64_t h = 0; h < heads; ++h) {
    float max_score;
    const float sum = exponentiate(scores + h * stride, n, &max_score);
    lse[h] = max_score + std::log(sum);
    inv_sums[h] = 1.0f / sum;
  }
  constexpr int kAccumulators = Head<T, D>::kAccumulators, kHeadsPerWalk = 16 / kAccumulators;
  for (int64_t g = 0; g < kv_heads; ++g) {
    const T* values = value_cache + g * D;
    for (int64_t h0 = g * group; h0 < (g + 1) * group; h0 += kHeadsPerWalk) {
      const int64_t count = std::min<int64_t>(kHeadsPerWalk, (g + 1) * group - h0);
      __m512 acc[kHeadsPerWalk][kAccumulators];
      for (auto& set : acc) for (auto& a : set) a = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        __m512 v[kAccumulators];
        if (h0 == g * group) {
          // NOTE: pass 2 works from cache, so the memory pipe would idle: the next request's rows
          // go into L2 meanwhile, spread over the first walk of every KV head (-16% per layer at
          // B=64, ~210-token contexts, against doing it during pass 1).
          const int64_t k = g * n + t, total = kv_heads * n;
          for (int64_t u = k * next_n / total; u < (k + 1) * next_n / total; ++u) {
            prefetch_row<_MM_HINT_T1>(key_cache + next_slots[u] * row, row * sizeof(T));
            prefetch_row<_MM_HINT_T1>(value_cache + next_slots[u] * row, row * sizeof(T));
          }
        }
        Head<T, D>::load_value(values + slots[t] * row, v);
        for (int j = 0; j < kHeadsPerWalk; ++j) {
          if (j == count) break;
          const __m512 weight = _mm512_set1_ps(scores[(h0 + j) * stride + t]);
          for (int c = 0; c < kAccumulators; ++c) acc[j][c] = _mm512_fmadd_ps(weight, v[c], acc[j][c]);
        }
      }
      for (int j = 0; j < count; ++j) Head<T, D>::store(acc[j], _mm512_set1_ps(inv_sums[h0 + j]), out + (h0 + j) * D);
    }
  }
}

template <typename T, int D>
void attend_all(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                const at::Tensor& context_slots, const at::Tensor& context_lens, at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = query.size(0), heads = query.size(1);
  const int64_t kv_heads = key_cache.size(1), group = heads / kv_heads;
  const int64_t max_context = context_slots.size(1);
  const T* q = query.data_ptr<T>();
  const T* k = key_cache.data_ptr<T>();
  const T* v = value_cache.data_ptr<T>();
  const int64_t* slots = context_slots.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  float* l = lse.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(heads * ((max_context + 15) / 16 * 16));
    for (int64_t b = begin; b < end; ++b) {
      const int64_t next_n = b + 1 < end ? lens[b + 1] : 0;
      attend_request<T, D>(q + b * heads * D, k, v, slots + b * max_context, lens[b],
                           slots + (b + 1) * max_context, next_n, kv_heads, group,
                           scores.data(), o + b * heads * D, l + b * heads);
    }
  });
}

// ---- Shared-prefix attention (Hydragen): every decode query of every request against one prefix.
// Per KV head, B x group queries and the prefix's P keys make two small GEMMs, on bf16 pairs
// (`dot_pairs`), with the prefix's K and V repacked once per call into the layout those want.

constexpr int kKeyTiles = 4;            // keys per score micro-kernel: 4 tiles of 16
constexpr int64_t kQueriesPerTask = 16;  // queries per unit of parallel work (one KV head)

// Keys of one KV head, [P / 16][D / 2][16]: a register holds dims (2i, 2i + 1) of 16 tokens. Keys
// past n are zero. `keys` points at the head's first pair in slot 0; `row` is a slot's pairs.
template <int D>
void pack_keys(const uint32_t* keys, int64_t row, const int64_t* slots, int64_t n, int64_t n_pad, uint32_t* packed) {
  for (int64_t t = 0; t < n_pad; ++t) {
    const uint32_t* k = keys + slots[std::min(t, n - 1)] * row;
    for (int i = 0; i < D / 2; ++i) packed[((t / 16) * (D / 2) + i) * 16 + t % 16] = t < n ? k[i] : 0;
  }
}

// Values of one KV head, [P / 2][D]: pair j of a dim d is (V[2j][d], V[2j + 1][d]), so a register
// holds 16 dims of two tokens. `values` points at the head's first element in slot 0.
template <int D>
void pack_values(const uint16_t* values, int64_t row, const int64_t* slots, int64_t n, int64_t n_pad,
                 uint32_t* packed) {
  for (int64_t j = 0; j < n_pad / 2; ++j) {
    const uint16_t* even = values + slots[std::min(2 * j, n - 1)] * row;
    const uint16_t* odd = values + slots[std::min(2 * j + 1, n - 1)] * row;
    for (int d = 0; d < D; ++d) {
      const uint32_t low = 2 * j < n ? even[d] : 0, high = 2 * j + 1 < n ? odd[d] : 0;
      packed[j * D + d] = low | high << 16;
    }
  }
}

// Scores of 4 queries (bf16 pairs) against 64 packed keys, scaled, into 4 score rows.
template <int D>
inline void score_tile(const uint32_t* const* q, const uint32_t* packed_keys, __m512 scale, float* const* out) {
  __m512 acc[4][kKeyTiles];
  for (auto& row : acc) for (auto& a : row) a = _mm512_setzero_ps();
  for (int i = 0; i < D / 2; ++i) {
    __m512i k[kKeyTiles];
    for (int j = 0; j < kKeyTiles; ++j) k[j] = _mm512_loadu_si512(packed_keys + (j * (D / 2) + i) * 16);
    for (int r = 0; r < 4; ++r) {
      const __m512i pair = _mm512_set1_epi32(static_cast<int>(q[r][i]));
      for (int j = 0; j < kKeyTiles; ++j) acc[r][j] = dot_pairs(acc[r][j], pair, k[j]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < kKeyTiles; ++j) _mm512_storeu_ps(out[r] + 16 * j, _mm512_mul_ps(acc[r][j], scale));
  }
}

// Outputs of kRows queries, merged with their suffix attention: the bf16 probability pairs times the
// packed values, times prefix_scale, plus suffix times suffix_scale, rounded to bf16.
template <int D>
inline void value_tile(const uint32_t* const* probs, int64_t pairs, const uint32_t* packed_values,
                       const float* prefix_scale, const float* const* suffix, const float* suffix_scale,
                       c10::BFloat16* const* out) {
  constexpr int kChunks = D / 16, kRows = 16 / kChunks;  // 16 accumulators
  __m512 acc[kRows][kChunks];
  for (auto& row : acc) for (auto& a : row) a = _mm512_setzero_ps();
  // Unrolled, as measured: 10% off the whole kernel (B=64, 512-token prefix).
#pragma GCC unroll 4
  for (int64_t j = 0; j < pairs; ++j) {
    __m512i v[kChunks];
    for (int c = 0; c < kChunks; ++c) v[c] = _mm512_loadu_si512(packed_values + j * D + 16 * c);
    for (int r = 0; r < kRows; ++r) {
      const __m512i pair = _mm512_set1_epi32(static_cast<int>(probs[r][j]));
      for (int c = 0; c < kChunks; ++c) acc[r][c] = dot_pairs(acc[r][c], pair, v[c]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const __m512 scale = _mm512_set1_ps(prefix_scale[r]), weight = _mm512_set1_ps(suffix_scale[r]);
    for (int c = 0; c < kChunks; ++c) {
      const __m512 own = _mm512_loadu_ps(suffix[r] + 16 * c);
      const __m512 merged = _mm512_fmadd_ps(own, weight, _mm512_mul_ps(acc[r][c], scale));
      store_bf16(out[r] + 16 * c, merged, 0xFFFF);
    }
  }
}

template <int D>
void attend_prefix(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                   const at::Tensor& prefix_slots, const at::Tensor& suffix_out, const at::Tensor& suffix_lse,
                   at::Tensor& out) {
  const int64_t batch = query.size(0), heads = query.size(1), kv_heads = key_cache.size(1);
  const int64_t group = heads / kv_heads, queries = batch * group, n = prefix_slots.size(0);
  const int64_t n_pad = (n + 16 * kKeyTiles - 1) / (16 * kKeyTiles) * (16 * kKeyTiles);
  const int64_t row = kv_heads * D;  // elements of one slot's K (or V) row
  const auto* q = reinterpret_cast<const uint32_t*>(query.data_ptr<c10::BFloat16>());
  const auto* k = reinterpret_cast<const uint32_t*>(key_cache.data_ptr<c10::BFloat16>());
  const auto* v = reinterpret_cast<const uint16_t*>(value_cache.data_ptr<c10::BFloat16>());
  const int64_t* slots = prefix_slots.data_ptr<int64_t>();
  const float* suffix = suffix_out.data_ptr<float>();
  const float* suffix_l = suffix_lse.data_ptr<float>();
  auto* o = out.data_ptr<c10::BFloat16>();
  std::vector<uint32_t> packed_keys(kv_heads * n_pad * D / 2), packed_values(kv_heads * n_pad * D / 2);
  at::parallel_for(0, kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      pack_keys<D>(k + g * D / 2, row / 2, slots, n, n_pad, packed_keys.data() + g * n_pad * D / 2);
      pack_values<D>(v + g * D, row, slots, n, n_pad, packed_values.data() + g * n_pad * D / 2);
    }
  });

  const int64_t tasks_per_head = (queries + kQueriesPerTask - 1) / kQueriesPerTask;
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));
  at::parallel_for(0, kv_heads * tasks_per_head, 1, [&](int64_t begin, int64_t end) {
    // Scores, then in place their bf16 probability pairs; one spare row for padding queries.
    std::vector<float> scores((kQueriesPerTask + 1) * n_pad);
    // Per query, the weights of its prefix and suffix parts: exp(lse_part - lse_whole), with the
    // prefix's 1 / sum folded in.
    alignas(64) float prefix_scale[kQueriesPerTask], suffix_scale[kQueriesPerTask];
    alignas(64) float row_max[kQueriesPerTask], row_sum[kQueriesPerTask], suffix_lse_rows[kQueriesPerTask];
    std::vector<c10::BFloat16> spare_out(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / tasks_per_head, first = task % tasks_per_head * kQueriesPerTask;
      const int64_t count = std::min(kQueriesPerTask, queries - first);
      // Query r of this head is head g * group + r % group of request r / group.
      auto index = [&](int64_t r) { return (r / group) * heads + g * group + r % group; };
      const uint32_t* head_keys = packed_keys.data() + g * n_pad * D / 2;
      for (int64_t r0 = 0; r0 < count; r0 += 4) {
        const uint32_t* rows[4];
        float* score_rows[4];
        for (int r = 0; r < 4; ++r) {
          const bool real = r0 + r < count;
          rows[r] = q + index(first + std::min(r0 + r, count - 1)) * D / 2;
          score_rows[r] = scores.data() + (real ? r0 + r : kQueriesPerTask) * n_pad;
        }
        for (int64_t t0 = 0; t0 < n_pad; t0 += 16 * kKeyTiles) {
          float* tile_rows[4] = {score_rows[0] + t0, score_rows[1] + t0, score_rows[2] + t0, score_rows[3] + t0};
          score_tile<D>(rows, head_keys + t0 * D / 2, scale, tile_rows);
        }
      }
      for (int64_t r = 0; r < count; ++r) {
        float* s = scores.data() + r * n_pad;
        row_sum[r] = exponentiate(s, n, row_max + r);
        suffix_lse_rows[r] = suffix_l[index(first + r)];
        std::fill(s + n, s + n_pad, 0.0f);
        auto* probs = reinterpret_cast<__m512i*>(s);  // bf16 pairs over the first half of the row
        for (int64_t t = 0; t < n_pad; t += 32) {
          _mm512_storeu_si512(probs + t / 32, to_bf16(_mm512_loadu_ps(s + t), _mm512_loadu_ps(s + t + 16)));
        }
      }
      {
        // The parts' weights, exp(lse_part - lse_whole), without logs: with m the larger of the prefix's
        // max score and the suffix's log-sum-exp, the prefix's is sum * e / (sum * e + e_s), where
        // e = exp(max - m) and e_s = exp(lse_suffix - m), and it is divided by sum for the
        // unnormalized prefix outputs; the suffix's is e_s / (sum * e + e_s).
        static_assert(kQueriesPerTask == 16, "one vector of queries");
        const __mmask16 valid = tail_mask(count);
        const __m512 max = _mm512_maskz_loadu_ps(valid, row_max), sum = _mm512_maskz_loadu_ps(valid, row_sum);
        const __m512 suffix_lse16 = _mm512_maskz_loadu_ps(valid, suffix_lse_rows);
        const __m512 top = _mm512_max_ps(max, suffix_lse16);
        const __m512 prefix_part = exp16(_mm512_sub_ps(max, top));
        const __m512 suffix_part = exp16(_mm512_sub_ps(suffix_lse16, top));
        const __m512 whole = _mm512_fmadd_ps(sum, prefix_part, suffix_part);
        _mm512_store_ps(prefix_scale, _mm512_maskz_div_ps(valid, prefix_part, whole));
        _mm512_store_ps(suffix_scale, _mm512_maskz_div_ps(valid, suffix_part, whole));
      }
      constexpr int kRows = 16 / (D / 16);
      const uint32_t* head_values = packed_values.data() + g * n_pad * D / 2;
      for (int64_t r0 = 0; r0 < count; r0 += kRows) {
        const uint32_t* probs[kRows];
        const float* suffixes[kRows];
        c10::BFloat16* outs[kRows];
        float prefix_w[kRows], suffix_w[kRows];
        for (int r = 0; r < kRows; ++r) {
          const int64_t real = std::min(r0 + r, count - 1);  // padding rows repeat the last query
          probs[r] = reinterpret_cast<const uint32_t*>(scores.data() + real * n_pad);
          suffixes[r] = suffix + index(first + real) * D;
          outs[r] = r0 + r < count ? o + index(first + real) * D : spare_out.data();
          prefix_w[r] = prefix_scale[real];
          suffix_w[r] = suffix_scale[real];
        }
        value_tile<D>(probs, (n + 1) / 2, head_values, prefix_w, suffixes, suffix_w, outs);
      }
    }
  });
}

// Attention over prefix + suffix from the prefix's part (computed here) and the suffix's (the decode
// kernel's fp32 outputs and log-sum-exp), merged exactly by their log-sum-exp; bf16 out.
at::Tensor prefix_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                            const at::Tensor& prefix_slots, const at::Tensor& suffix_out,
                            const at::Tensor& suffix_lse) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 3 && value_cache.sizes() == key_cache.sizes(),
              "query [B, heads, D], key/value cache [slots, kv_heads, D]");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous() &&
              prefix_slots.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key_cache.scalar_type() == at::kBFloat16 &&
              value_cache.scalar_type() == at::kBFloat16, "bf16 only");
  TORCH_CHECK(prefix_slots.scalar_type() == at::kLong && prefix_slots.dim() == 1 && prefix_slots.size(0) >= 1,
              "int64 prefix slots, at least one");
  TORCH_CHECK(query.size(0) >= 1 && key_cache.size(1) >= 1 && query.size(1) % key_cache.size(1) == 0 &&
              query.size(2) == key_cache.size(2), "head shapes");
  check_slots(prefix_slots, key_cache.size(0), "prefix_slots");
  TORCH_CHECK(suffix_out.scalar_type() == at::kFloat && suffix_out.is_contiguous() &&
              suffix_out.sizes() == query.sizes(), "suffix_out: fp32 [B, heads, D]");
  TORCH_CHECK(suffix_lse.scalar_type() == at::kFloat && suffix_lse.is_contiguous() && suffix_lse.dim() == 2 &&
              suffix_lse.size(0) == query.size(0) && suffix_lse.size(1) == query.size(1),
              "suffix_lse: fp32 [B, heads]");
  at::Tensor out = at::empty(query.sizes(), query.options());
  switch (query.size(2)) {
    case 64: attend_prefix<64>(query, key_cache, value_cache, prefix_slots, suffix_out, suffix_lse, out); break;
    case 128: attend_prefix<128>(query, key_cache, value_cache, prefix_slots, suffix_out, suffix_lse, out); break;
    default: TORCH_CHECK(false, "head_dim 64 or 128 only");
  }
  return out;
}

template <typename T>
void dispatch_head_dim(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                       const at::Tensor& context_slots, const at::Tensor& context_lens, at::Tensor& out,
                       at::Tensor& lse) {
  switch (query.size(2)) {
    case 64: return attend_all<T, 64>(query, key_cache, value_cache, context_slots, context_lens, out, lse);
    case 128: return attend_all<T, 128>(query, key_cache, value_cache, context_slots, context_lens, out, lse);
    default: TORCH_CHECK(false, "head_dim 64 or 128 only");
  }
}

std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& query, const at::Tensor& key_cache,
                                                    const at::Tensor& value_cache, const at::Tensor& context_slots,
                                                    const at::Tensor& context_lens) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 3 && value_cache.sizes() == key_cache.sizes(),
              "query [B, heads, D], key/value cache [slots, kv_heads, D]");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous() &&
              context_slots.is_contiguous() && context_lens.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() && key_cache.scalar_type() == value_cache.scalar_type(),
              "query and cache dtypes differ");
  TORCH_CHECK(context_slots.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "int64 indices");
  TORCH_CHECK(query.size(0) >= 1 && key_cache.size(1) >= 1 && query.size(1) % key_cache.size(1) == 0 &&
              query.size(2) == key_cache.size(2), "head shapes");
  TORCH_CHECK(query.size(1) <= kMaxHeads, "at most ", kMaxHeads, " query heads");
  TORCH_CHECK(context_slots.dim() == 2 && context_slots.size(0) == query.size(0) && context_lens.dim() == 1 &&
              context_lens.size(0) == query.size(0), "context_slots [B, L] and context_lens [B]");
  const auto [min_len, max_len] = at::aminmax(context_lens);
  TORCH_CHECK(min_len.item<int64_t>() >= 1 && max_len.item<int64_t>() <= context_slots.size(1),
              "every request needs 1..max_context context tokens");
  check_slots(context_slots, key_cache.size(0), "context_slots");
  at::Tensor out = at::empty(query.sizes(), query.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({query.size(0), query.size(1)}, query.options().dtype(at::kFloat));
  switch (query.scalar_type()) {
    case at::kBFloat16:
      dispatch_head_dim<c10::BFloat16>(query, key_cache, value_cache, context_slots, context_lens, out, lse);
      break;
    case at::kFloat:
      dispatch_head_dim<float>(query, key_cache, value_cache, context_slots, context_lens, out, lse);
      break;
    default: TORCH_CHECK(false, "bf16 or fp32 only");
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TOKENMILL_OPS, m) {
  m.def("decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor context_slots, "
        "Tensor context_lens) -> (Tensor, Tensor)", &decode_attention);
  m.def("prefix_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor prefix_slots, "
        "Tensor suffix_out, Tensor suffix_lse) -> Tensor", &prefix_attention);
}

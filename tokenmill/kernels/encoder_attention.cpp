// Bidirectional attention over packed variable-length sequences (BERT-style encoders): every token
// attends to all tokens of its own sequence and to no other; no padding anywhere.
//
// Work is split into (sequence, head, up to 128 queries) items, shared between threads by their
// cost. Within an item, 16 queries at a time, one per lane of a register, so that each query's whole
// softmax is lane-wise arithmetic:
// 1. scores: the 16 queries' units (bf16: dim pairs, fp32: dims) transposed once, 16 units in 16
//    registers; each key's unit broadcast from its row in place (a strided view is read as it is).
//    One chain per score over the units in order, from zero (bf16 through `dot_pairs`, fp32 through
//    FMAs), times scale * log2(e) (NOTE: the softmax is taken in base 2: one multiply fewer per
//    probability); their maximum M per lane.
// 2. p_k = 2^(s_k - M) (a polynomial as accurate as the dtype needs), L their sum in key order, in
//    fp32. bf16: p rounded to bf16 for the weighted sum, keys paired (2j, 2j + 1) in one 32-bit lane.
// 3. out = (sum over keys of p_k v_k) / L: per dim a chain over the keys in order (bf16: the pairs
//    through `dot_pairs`, the values paired once per item; fp32: one FMA per key, values read in
//    place), 16 dims of the 16 queries at a time, transposed back to rows as they are stored.
// Lanes never mix (the transposes only move them), so a query's result depends on its own sequence
// alone: the same bits in any batch, any split of the work, any thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using namespace tokenmill;
using bf16 = c10::BFloat16;

constexpr int64_t kQueriesPerItem = 128;  // per unit of work: the values' pairing (once per item) is < 1% of it
constexpr int kKeysInFlight = 8;          // score chains at once: hide the latency (more spill their row pointers)

// acc + a * b over one 32-bit unit per lane: a bf16 pair through dot_pairs, or one fp32.
template <typename T>
inline __m512 unit_step(__m512 acc, __m512i a, __m512i b) {
  if constexpr (std::is_same_v<T, bf16>) {
    return dot_pairs(acc, a, b);
  } else {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
  }
}

// 2^x, x <= 0 (the scores are kept in log2 units): x = n + f, |f| <= 1/2, 2^f by a polynomial fit
// to a relative error of 2.7e-6 (degree 4: below half a bf16 ulp by 3 orders) or 7.7e-8 (degree 5:
// fp32's), times 2^n exactly. NaN stays NaN.
template <typename T>
inline __m512 exp2_poly(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p;
  if constexpr (std::is_same_v<T, bf16>) {
    p = _mm512_set1_ps(0.009560510206f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05591703917f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402498111f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931219677f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999991909f));
  } else {
    p = _mm512_set1_ps(0.001326697039f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009675459746f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550742616f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402212175f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931469492f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000071f));
  }
  return _mm512_scalef_ps(p, n);
}

// The 32-bit unit at p in all 16 lanes (p may be only 2-byte aligned: a view's offset).
inline __m512i broadcast_unit(const char* p) {
  int32_t unit;
  std::memcpy(&unit, p, sizeof(unit));
  return _mm512_set1_epi32(unit);
}

// One head's rows of a [T, heads, D] view: row t's D elements start at base + t * stride bytes.
struct HeadRows {
  const char* base;
  int64_t stride;
  const char* at(int64_t t) const { return base + t * stride; }
};

// s[k] (16 lanes: the queries') for keys [k0, k0 + N), over units [u0, u0 + U) held transposed in
// q: from zero at the first units, else continuing the chain stored in s; at the last units, scaled
// and folded into max. U is 16, or 8 for the last units of a bf16 head of 16 dims past a multiple of 32.
template <typename T, int N, int U>
inline __m512 score_keys(const __m512i* q, HeadRows keys, int64_t k0, int64_t u0, bool first, bool last, __m512 scale,
                         float* s, __m512 max) {
  const char* rows[N];
  __m512 acc[N];
  for (int n = 0; n < N; ++n) {
    rows[n] = keys.at(k0 + n) + 4 * u0;
    acc[n] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(s + 16 * (k0 + n));
  }
  for (int i = 0; i < U; ++i) {
    for (int n = 0; n < N; ++n) acc[n] = unit_step<T>(acc[n], broadcast_unit(rows[n] + 4 * i), q[i]);
  }
  for (int n = 0; n < N; ++n) {
    if (last) {
      acc[n] = _mm512_mul_ps(acc[n], scale);
      max = _mm512_max_ps(max, acc[n]);
    }
    _mm512_storeu_ps(s + 16 * (k0 + n), acc[n]);
  }
  return max;
}

// Probabilities written over the scores, in the units of the weighted sum; returns their sum L.
template <typename T>
inline __m512 exponentiate(float* s, int64_t n, __m512 max) {
  __m512 sum = _mm512_setzero_ps();
  if constexpr (std::is_same_v<T, bf16>) {
    // p rounded to the nearest bf16 in the high half of its bits (ties away from zero: p >= 0, and a
    // tie is 1 in 2^16; NaN, from NaN inputs only, stays NaN).
    auto rounded = [](__m512 p) { return _mm512_add_epi32(_mm512_castps_si512(p), _mm512_set1_epi32(0x8000)); };
    auto probability = [&](int64_t k) { return exp2_poly<T>(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * k), max)); };
    // Pair j (keys 2j, 2j + 1) goes where key j's scores were: behind the reads.
    for (int64_t j = 0; j < n / 2; ++j) {
      const __m512 even = probability(2 * j), odd = probability(2 * j + 1);
      sum = _mm512_add_ps(_mm512_add_ps(sum, even), odd);
      _mm512_storeu_si512(s + 16 * j, _mm512_or_si512(_mm512_srli_epi32(rounded(even), 16),
                                                      _mm512_and_si512(rounded(odd), _mm512_set1_epi32(-65536))));
    }
    if (n % 2 == 1) {  // key n - 1 pairs with a key of weight 0 (its values are zeros)
      const __m512 even = probability(n - 1);
      sum = _mm512_add_ps(sum, even);
      _mm512_storeu_si512(s + 16 * (n / 2), _mm512_srli_epi32(rounded(even), 16));
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const __m512 p = exp2_poly<T>(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * k), max));
      sum = _mm512_add_ps(sum, p);
      _mm512_storeu_ps(s + 16 * k, p);
    }
  }
  return sum;
}

// bf16 values of one head paired for dot_pairs: unit d of pair j is (v[2j][d], v[2j + 1][d]),
// out[j * D + d]; a missing key 2j + 1 (n odd) is zeros.
inline void pair_values(HeadRows values, int64_t n, int64_t head_dim, uint32_t* out) {
  alignas(64) static const int16_t kLow[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                               8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const int16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  for (int64_t j = 0; j < (n + 1) / 2; ++j) {
    const char* even = values.at(2 * j);
    const char* odd = 2 * j + 1 < n ? values.at(2 * j + 1) : nullptr;
    for (int64_t d = 0; d < head_dim; d += 32) {  // 32 dims, or the last 16
      const __mmask32 dims = head_dim - d >= 32 ? 0xFFFFFFFF : 0xFFFF;
      const __m512i x = _mm512_maskz_loadu_epi16(dims, even + 2 * d);
      const __m512i y = odd ? _mm512_maskz_loadu_epi16(dims, odd + 2 * d) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + j * head_dim + d, _mm512_permutex2var_epi16(x, low, y));
      if (head_dim - d >= 32) _mm512_storeu_si512(out + j * head_dim + d + 16, _mm512_permutex2var_epi16(x, high, y));
    }
  }
}

// out rows [0, count) (16 dims from d0) = the weighted sums of `units` value units (row j's unit d
// at value_row(j) + 4 d) by the probability units p[j] (16 lanes), times inv_sum per lane.
template <typename T, typename ValueRow>
inline void weighted_sums(const float* p, int64_t units, ValueRow value_row, int64_t d0, __m512 inv_sum, int count,
                          T* out, int64_t out_stride) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t j = 0; j < units; ++j) {
    const __m512i pj = _mm512_loadu_si512(p + 16 * j);
    const char* v = value_row(j) + 4 * d0;
    for (int d = 0; d < 16; ++d) acc[d] = unit_step<T>(acc[d], broadcast_unit(v + 4 * d), pj);
  }
  __m512i rows[16];
  for (int d = 0; d < 16; ++d) rows[d] = _mm512_castps_si512(_mm512_mul_ps(acc[d], inv_sum));
  transpose16(rows);
  for (int r = 0; r < count; ++r) {
    const __m512 x = _mm512_castsi512_ps(rows[r]);
    if constexpr (std::is_same_v<T, bf16>) {
      store_bf16(out + r * out_stride + d0, x, 0xFFFF);
    } else {
      _mm512_storeu_ps(out + r * out_stride + d0, x);
    }
  }
}

// The operands: head 0's rows of each of q, k, v and the bytes from one head to the next.
template <typename T>
struct Problem {
  HeadRows query, key, value;
  int64_t query_head, key_head, value_head;
  int64_t heads, head_dim;
  float scale;
  T* out;  // [T, heads, D] contiguous
};

struct Scratch {
  std::vector<__m512i> q;      // the tile's query units, transposed: [unit][16 lanes]
  std::vector<float> s;        // scores, then probabilities: [key][16 lanes]
  std::vector<uint32_t> pairs;  // bf16 values paired: [pair][D]
};

// Score chains over units [u0, u0 + U) of keys [0, n), kKeysInFlight at a time.
template <typename T, int U>
inline __m512 score_all_keys(const __m512i* q, HeadRows keys, int64_t n, int64_t u0, bool first, bool last,
                             __m512 scale, float* s, __m512 max) {
  int64_t k = 0;
  for (; k + kKeysInFlight <= n; k += kKeysInFlight) {
    max = score_keys<T, kKeysInFlight, U>(q, keys, k, u0, first, last, scale, s, max);
  }
  for (; k < n; ++k) max = score_keys<T, 1, U>(q, keys, k, u0, first, last, scale, s, max);
  return max;
}

// Queries [q0, q1) of one head of the sequence at rows [start, start + n).
template <typename T>
void attend(const Problem<T>& pb, int64_t start, int64_t n, int64_t head, int64_t q0, int64_t q1, Scratch& scratch) {
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  const int64_t D = pb.head_dim, units = D * static_cast<int64_t>(sizeof(T)) / 4, chunks = (units + 15) / 16;
  const HeadRows queries{pb.query.at(start) + head * pb.query_head, pb.query.stride};
  const HeadRows keys{pb.key.at(start) + head * pb.key_head, pb.key.stride};
  const HeadRows values{pb.value.at(start) + head * pb.value_head, pb.value.stride};
  scratch.q.resize(16 * chunks);
  scratch.s.resize(16 * n);
  if constexpr (kBf16) {
    scratch.pairs.resize((n + 1) / 2 * D);
    pair_values(values, n, D, scratch.pairs.data());
  }
  const __m512 scale = _mm512_set1_ps(pb.scale * 1.44269504088896341f);  // log2(e): scores in log2 units
  float* s = scratch.s.data();
  for (int64_t t0 = q0; t0 < q1; t0 += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, q1 - t0));
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i r[16];
      for (int l = 0; l < 16; ++l) {
        r[l] = l < count ? _mm512_maskz_loadu_epi32(tail_mask(units - 16 * c), queries.at(t0 + l) + 64 * c)
                         : _mm512_setzero_si512();
      }
      transpose16(r);
      std::copy(r, r + 16, scratch.q.begin() + 16 * c);
    }
    __m512 max = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i q[16];
      std::copy(scratch.q.begin() + 16 * c, scratch.q.begin() + 16 * (c + 1), q);
      const bool first = c == 0, last = c == chunks - 1;
      if (units - 16 * c >= 16) {
        max = score_all_keys<T, 16>(q, keys, n, 16 * c, first, last, scale, s, max);
      } else {
        max = score_all_keys<T, 8>(q, keys, n, 16 * c, first, last, scale, s, max);
      }
    }
    const __m512 inv_sum = _mm512_div_ps(_mm512_set1_ps(1.0f), exponentiate<T>(s, n, max));
    T* out = pb.out + ((start + t0) * pb.heads + head) * D;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      if constexpr (kBf16) {
        const uint32_t* pairs = scratch.pairs.data();
        auto pair_row = [&](int64_t j) { return reinterpret_cast<const char*>(pairs + j * D); };
        weighted_sums<T>(s, (n + 1) / 2, pair_row, d0, inv_sum, count, out, pb.heads * D);
      } else {
        weighted_sums<T>(s, n, [&](int64_t j) { return values.at(j); }, d0, inv_sum, count, out, pb.heads * D);
      }
    }
  }
}

// One unit of parallel work: queries [first, first + count) of a sequence, one head.
struct Item {
  int64_t start, n, head, first, count;
};

template <typename T>
void attend_all(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale,
                const std::vector<Item>& items, at::Tensor& out) {
  constexpr int64_t kBytes = sizeof(T);
  auto rows = [](const at::Tensor& x) {
    return HeadRows{static_cast<const char*>(x.data_ptr()), x.stride(0) * kBytes};
  };
  const Problem<T> pb{rows(query), rows(key), rows(value), query.stride(1) * kBytes, key.stride(1) * kBytes,
                      value.stride(1) * kBytes, query.size(1), query.size(2), static_cast<float>(scale),
                      out.data_ptr<T>()};
  // Cost of an item ~ its query tiles x (keys + the per-tile transposes and stores): the threads
  // take contiguous runs of equal cost (at::parallel_for would split them by count).
  std::vector<int64_t> cost(items.size() + 1, 0);
  for (size_t i = 0; i < items.size(); ++i) {
    cost[i + 1] = cost[i] + (items[i].count + 15) / 16 * (items[i].n + 16);
  }
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t part = begin; part < end; ++part) {
      const auto first = std::lower_bound(cost.begin(), cost.end(), cost.back() * part / parts) - cost.begin();
      const auto last = std::lower_bound(cost.begin(), cost.end(), cost.back() * (part + 1) / parts) - cost.begin();
      for (auto i = first; i < last; ++i) {
        const Item& it = items[i];
        attend<T>(pb, it.start, it.n, it.head, it.first, it.first + it.count, scratch);
      }
    }
  });
}

at::Tensor encoder_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             const at::Tensor& seq_starts, double scale) {
  TORCH_CHECK(query.dim() == 3 && key.sizes() == query.sizes() && value.sizes() == query.sizes(),
              "query, key and value: [T, heads, D], all the same shape");
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu() &&
              seq_starts.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && key.scalar_type() == value.scalar_type(),
              "query, key and value dtypes differ");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kFloat, "bf16 or fp32 only");
  TORCH_CHECK(query.size(2) > 0 && query.size(2) % 16 == 0, "head_dim must be a multiple of 16");
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1 && value.stride(2) == 1,
              "query, key and value need contiguous heads (their last dim)");
  TORCH_CHECK(seq_starts.dim() == 1 && seq_starts.size(0) >= 1 && seq_starts.scalar_type() == at::kLong,
              "seq_starts: [B + 1] int64");
  const int64_t total = query.size(0), heads = query.size(1), batch = seq_starts.size(0) - 1;
  const auto starts = seq_starts.accessor<int64_t, 1>();
  TORCH_CHECK(starts[0] == 0 && starts[batch] == total, "seq_starts must run from 0 to T (", total, ")");
  std::vector<Item> items;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = starts[b + 1] - starts[b];
    TORCH_CHECK(n >= 0, "seq_starts must not decrease (sequence ", b, ")");
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t q0 = 0; q0 < n; q0 += kQueriesPerItem) {
        items.push_back({starts[b], n, h, q0, std::min(kQueriesPerItem, n - q0)});
      }
    }
  }
  at::Tensor out = at::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  if (items.empty()) return out;
  if (query.scalar_type() == at::kBFloat16) {
    attend_all<bf16>(query, key, value, scale, items, out);
  } else {
    attend_all<float>(query, key, value, scale, items, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TOKENMILL_OPS, m) {
  m.def("encoder_attention(Tensor query, Tensor key, Tensor value, Tensor seq_starts, float scale) -> Tensor",
        &encoder_attention);
}

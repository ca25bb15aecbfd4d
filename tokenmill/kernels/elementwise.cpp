// The elementwise steps of a decoder layer, each fused into one pass over bf16 rows: the residual
// add with the RMSNorm that follows it, rope with the K/V writes into the pool, SiLU(gate) * up.
// In torch each is 3-9 ops of a few microseconds, dominated by dispatch at decode batch sizes.
// Each rounds to bf16 exactly where the torch ops it replaces do, with the same fp32 arithmetic
// in between, so outputs match those ops bit for bit except where the order of RMSNorm's fp32 sum
// or a 1-ulp difference of exp moves a rounding.
// Gemma's variants: its RMSNorm scales by an fp32 factor (1 + weight) before the one rounding (over rows or
// per head), its block outputs are normed before they join the residual stream (norm, add, then the next
// norm: one pass), and its MLP takes GELU-tanh(gate) * up; bit for bit the torch ops of models/elementwise.py.
// And an encoder layer's residual add with the LayerNorm after it (add_layer_norm, bf16 or fp32): one
// pass where torch makes two over memory (plus LayerNorm's own), the sum kept in fp32, so close to the
// torch ops but not their bits (they round the sum to bf16 first, and order LayerNorm's sums their way).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

using namespace tokenmill;
using bf16 = c10::BFloat16;

// Rows per unit of parallel work, so each holds at least ~16k elements: at decode batch sizes the
// whole op is a few microseconds, less than waking the second thread costs.
int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elements)); }

void check_bf16_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, name, " must be bf16");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be [rows, n] with contiguous rows");
}

// The sum of the squares of a bf16 row, in fp32, added in exactly the order torch's CPU sum
// kernel adds `x.float().pow(2)` along a contiguous row, so that RMSNorm's results are bit for bit
// those of the torch ops. That kernel is dispatched at its AVX2 build even on AVX-512 CPUs (torch
// 2.x), hence 8-lane vectors: 4 interleaved accumulators over groups of 4 vectors, cascaded every
// 2^4 (or more) groups, the 4 summed in turn, then the elements past the last vector and the 8
// lanes one by one into a scalar. tests/test_elementwise.py checks the match.
float sum_of_squares(const bf16* x, int64_t n) {
  auto square = [&](int64_t v) {
    const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * v))), 16));
    return _mm256_mul_ps(a, a);
  };
  constexpr int kLevels = 4, kInterleave = 4;
  const int64_t vectors = n / 8, groups = vectors / kInterleave;
  int64_t ceil_log2 = 1;
  while (groups > 2 && (int64_t{1} << ceil_log2) < groups) ++ceil_log2;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2 / kLevels);
  const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
  __m256 acc[kLevels][kInterleave];
  for (auto& level : acc) for (auto& a : level) a = _mm256_setzero_ps();
  int64_t g = 0;
  while (g + level_step <= groups) {
    for (int64_t j = 0; j < level_step; ++j, ++g) {
      for (int k = 0; k < kInterleave; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], square(g * kInterleave + k));
    }
    for (int level = 1; level < kLevels; ++level) {
      for (int k = 0; k < kInterleave; ++k) {
        acc[level][k] = _mm256_add_ps(acc[level][k], acc[level - 1][k]);
        acc[level - 1][k] = _mm256_setzero_ps();
      }
      if ((g & (level_mask << (level * level_power))) != 0) break;
    }
  }
  for (; g < groups; ++g) {
    for (int k = 0; k < kInterleave; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], square(g * kInterleave + k));
  }
  for (int level = 1; level < kLevels; ++level) {
    for (int k = 0; k < kInterleave; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], acc[level][k]);
  }
  for (int64_t v = groups * kInterleave; v < vectors; ++v) acc[0][0] = _mm256_add_ps(acc[0][0], square(v));
  for (int k = 1; k < kInterleave; ++k) acc[0][0] = _mm256_add_ps(acc[0][0], acc[0][k]);
  float total = 0.0f;
  for (int64_t i = vectors * 8; i < n; ++i) {
    const float a = static_cast<float>(x[i]);
    total += a * a;
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc[0][0]);
  for (float lane : lanes) total += lane;
  return total;
}

// residual + x (when a residual is given; torch: one bf16 add), then RMSNorm as transformers
// computes it: in fp32, x * rsqrt(mean(x^2) + eps), rounded to bf16, times the weight, rounded.
// Returns (normed, residual + x), the second undefined without a residual.
std::tuple<at::Tensor, at::Tensor> normalize(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                             const at::Tensor& weight, double eps) {
  check_bf16_rows(x, "x");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be bf16 [n]");
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor summed = x;
  if (residual.has_value()) {
    check_bf16_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual and x shapes differ");
    summed = at::empty({rows, n}, x.options());
  }
  at::Tensor normed = at::empty({rows, n}, x.options());
  const bf16* w = weight.data_ptr<bf16>();
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16* in = x.data_ptr<bf16>() + r * x.stride(0);
      bf16* h = summed.data_ptr<bf16>() + r * summed.stride(0);
      if (residual.has_value()) {
        const bf16* res = residual->data_ptr<bf16>() + r * residual->stride(0);
        for (int64_t i = 0; i < n; i += 16) {
          const __mmask16 m = tail_mask(n - i);
          store_bf16(h + i, _mm512_add_ps(load_bf16(res + i, m), load_bf16(in + i, m)), m);
        }
      }
      const float mean = sum_of_squares(h, n) / static_cast<float>(n);
      const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(mean + static_cast<float>(eps)));
      bf16* out = normed.data_ptr<bf16>() + r * n;
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        const __m512 scaled = bf16_round_trip(_mm512_mul_ps(load_bf16(h + i, m), scale));
        store_bf16(out + i, _mm512_mul_ps(scaled, load_bf16(w + i, m)), m);
      }
    }
  });
  return {normed, residual.has_value() ? summed : at::Tensor()};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<0>(normalize(x, c10::nullopt, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  return normalize(x, residual, weight, eps);
}

// Rows of bf16 or fp32, 16 values at a time widened to fp32 (zeros past the mask), and back.
inline __m512 load_fp32(const bf16* p, __mmask16 mask) { return load_bf16(p, mask); }
inline __m512 load_fp32(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline void store_fp32(bf16* p, __m512 x, __mmask16 mask) { store_bf16(p, x, mask); }
inline void store_fp32(float* p, __m512 x, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, x); }

// LayerNorm(x + residual) of one row of n: the sum in fp32 (kept in `summed`, n floats), its mean, then the
// deviations from that mean, their sum correcting it and their squares' the variance (the corrected two-pass
// algorithm: no cancellation, as sums of squares would have, and the first mean's error taken out);
// each sum over 16 lanes in order of the row, the lanes then added by one fixed tree. Then
// (sum - mean) / sqrt(variance + eps) * weight + bias, rounded once. The same operations for a row whatever
// the rows beside it: batch-invariant.
template <class T, class W>
void layer_norm_row(const T* x, const T* residual, const W* weight, const W* bias, int64_t n, float eps,
                    float* summed, T* out) {
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 s = _mm512_add_ps(load_fp32(x + i, m), load_fp32(residual + i, m));
    _mm512_storeu_ps(summed + i, s);
    total = _mm512_add_ps(total, s);
  }
  const float first_mean = _mm512_reduce_add_ps(total) / static_cast<float>(n);
  __m512 deviations = _mm512_setzero_ps(), squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 deviation =
        _mm512_maskz_sub_ps(tail_mask(n - i), _mm512_loadu_ps(summed + i), _mm512_set1_ps(first_mean));
    deviations = _mm512_add_ps(deviations, deviation);
    squares = _mm512_fmadd_ps(deviation, deviation, squares);
  }
  const float correction = _mm512_reduce_add_ps(deviations) / static_cast<float>(n);
  const float variance =  // (rounding could make it a hair below 0 on a constant row)
      std::max(0.0f, _mm512_reduce_add_ps(squares) / static_cast<float>(n) - correction * correction);
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(variance + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    // (sum - first_mean) - correction: the mean never rounded as one float (its ulp can be far above the
    // deviations'); sum - first_mean is exact for the sums near the mean (Sterbenz).
    const __m512 deviation = _mm512_sub_ps(_mm512_loadu_ps(summed + i), _mm512_set1_ps(first_mean));
    const __m512 normed = _mm512_mul_ps(_mm512_sub_ps(deviation, _mm512_set1_ps(correction)), scale);
    store_fp32(out + i, _mm512_fmadd_ps(normed, load_fp32(weight + i, m), load_fp32(bias + i, m)), m);
  }
}

// x, residual: [rows, n] of one dtype (bf16 or fp32), rows contiguous; weight, bias: [n], fp32 or x's dtype.
at::Tensor add_layer_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                          const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bf16 or fp32, not ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0, "x must be [rows, n] with contiguous rows, not ",
              x.sizes(), " of strides ", x.strides());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && residual.sizes() == x.sizes() && residual.stride(1) == 1,
              "residual must be x's ", x.scalar_type(), " ", x.sizes(), " with contiguous rows, not ",
              residual.scalar_type(), " ", residual.sizes());
  const int64_t rows = x.size(0), n = x.size(1);
  const auto param_type = weight.scalar_type();
  TORCH_CHECK((param_type == at::kFloat || param_type == x.scalar_type()) && bias.scalar_type() == param_type &&
              weight.is_contiguous() && bias.is_contiguous() && weight.dim() == 1 && bias.dim() == 1 &&
              weight.size(0) == n && bias.size(0) == n,
              "weight and bias must be [", n, "] of one dtype, fp32 or x's, not ", weight.scalar_type(), " ",
              weight.sizes(), " and ", bias.scalar_type(), " ", bias.sizes());
  at::Tensor out = at::empty({rows, n}, x.options());
  const auto run = [&](auto value, auto param) {
    using T = decltype(value);
    using W = decltype(param);
    const T* xs = static_cast<const T*>(x.data_ptr());
    const T* rs = static_cast<const T*>(residual.data_ptr());
    const W* w = static_cast<const W*>(weight.data_ptr());
    const W* b = static_cast<const W*>(bias.data_ptr());
    T* o = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> summed((n + 15) / 16 * 16);
      for (int64_t r = begin; r < end; ++r) {
        layer_norm_row(xs + r * x.stride(0), rs + r * residual.stride(0), w, b, n, static_cast<float>(eps),
                       summed.data(), o + r * n);
      }
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(float(), float());
  } else if (param_type == at::kFloat) {
    run(bf16(), float());
  } else {
    run(bf16(), bf16());
  }
  return out;
}

// Rope on the query and key heads of each token (transformers' rotate-half form, with the sin table's
// first half negated: x * cos + rotate(x) * sin, each product and the sum rounded to bf16 as the
// torch ops do); the roped keys and the values go into the pool at the token's slot, the roped
// queries into the returned [T, heads, D].
at::Tensor rope_store(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin_signed,
                      at::Tensor key_cache, at::Tensor value_cache, const at::Tensor& slot_mapping) {
  const int64_t tokens = qk.size(0), qk_heads = qk.size(1), head_dim = qk.size(2), kv_heads = v.size(1);
  const int64_t heads = qk_heads - kv_heads, half = head_dim / 2;
  TORCH_CHECK(qk.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 &&
              key_cache.scalar_type() == at::kBFloat16 && value_cache.scalar_type() == at::kBFloat16 &&
              cos.scalar_type() == at::kBFloat16 && sin_signed.scalar_type() == at::kBFloat16, "bf16 only");
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1 && qk.stride(1) == head_dim && v.dim() == 3 && v.stride(2) == 1 &&
              v.stride(1) == head_dim && v.size(0) == tokens && v.size(2) == head_dim && heads > 0,
              "qk [T, heads + kv_heads, D] and v [T, kv_heads, D], heads contiguous");
  TORCH_CHECK(head_dim % 32 == 0, "head_dim must be a multiple of 32");
  TORCH_CHECK(cos.is_contiguous() && sin_signed.is_contiguous() && cos.sizes() == sin_signed.sizes() &&
              cos.size(0) == tokens && cos.size(1) == head_dim, "cos, sin [T, D]");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous() && key_cache.dim() == 3 &&
              key_cache.size(1) == kv_heads && key_cache.size(2) == head_dim &&
              value_cache.sizes() == key_cache.sizes(), "key/value cache [slots, kv_heads, D]");
  TORCH_CHECK(slot_mapping.numel() == tokens, "one slot per token");
  check_slots(slot_mapping, key_cache.size(0), "slot_mapping");
  at::Tensor q = at::empty({tokens, heads, head_dim}, qk.options());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  bf16* keys = key_cache.data_ptr<bf16>();
  bf16* values = value_cache.data_ptr<bf16>();
  at::parallel_for(0, tokens, grain(qk_heads * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const bf16* c = cos.data_ptr<bf16>() + t * head_dim;
      const bf16* s = sin_signed.data_ptr<bf16>() + t * head_dim;
      for (int64_t h = 0; h < qk_heads; ++h) {
        const bf16* x = qk.data_ptr<bf16>() + t * qk.stride(0) + h * head_dim;
        bf16* out = h < heads ? q.data_ptr<bf16>() + (t * heads + h) * head_dim
                              : keys + (slots[t] * kv_heads + h - heads) * head_dim;
        for (int64_t i = 0; i < head_dim; i += 16) {
          const __m512 straight = bf16_round_trip(_mm512_mul_ps(load_bf16(x + i, 0xFFFF), load_bf16(c + i, 0xFFFF)));
          const __m512 rotated = bf16_round_trip(
              _mm512_mul_ps(load_bf16(x + (i + half) % head_dim, 0xFFFF), load_bf16(s + i, 0xFFFF)));
          store_bf16(out + i, _mm512_add_ps(straight, rotated), 0xFFFF);
        }
      }
      for (int64_t h = 0; h < kv_heads; ++h) {
        const bf16* x = v.data_ptr<bf16>() + t * v.stride(0) + h * head_dim;
        std::copy(x, x + head_dim, values + (slots[t] * kv_heads + h) * head_dim);
      }
    }
  });
  return q;
}

// gate_up [T, 2I] -> activation(gate) * up [T, I]: the activation rounded to bf16, then the bf16 product.
// activated(gate, mask) gives 16 gates' rounded activations, in fp32.
template <typename Activated>
at::Tensor gated_mul(const at::Tensor& gate_up, Activated activated) {
  check_bf16_rows(gate_up, "gate_up");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width");
  at::Tensor out = at::empty({rows, n}, gate_up.options());
  at::parallel_for(0, rows, grain(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      gated_mul_row(gate_up.data_ptr<bf16>() + r * gate_up.stride(0), n, out.data_ptr<bf16>() + r * n, activated);
    }
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  return gated_mul(gate_up, silu_rounded);
}

// Gemma's RMSNorm of one row, as transformers' Gemma3RMSNorm computes it: in fp32, x * rsqrt(mean(x^2) + eps),
// times the fp32 scale (1 + weight, models/gemma3.py's norm_scale), rounded to bf16 once.
void gemma_norm_row(const bf16* x, const float* scale, int64_t n, float eps, bf16* out) {
  const float mean = sum_of_squares(x, n) / static_cast<float>(n);
  const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(mean + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store_bf16(out + i, _mm512_mul_ps(_mm512_mul_ps(load_bf16(x + i, m), rstd), _mm512_maskz_loadu_ps(m, scale + i)),
               m);
  }
}

void check_gemma_scale(const at::Tensor& scale, int64_t n, const char* name) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.size(-1) == n, name,
              " must be fp32 [", n, "] (contiguous), not ", scale.scalar_type(), " ", scale.sizes());
}

// x [rows, n] or [T, heads, n] (the last dim contiguous: q and k heads viewed in the qkv rows), scale fp32 [n]
// or [heads, n] (one per head) -> Gemma's RMSNorm over the last dim, contiguous, x's shape.
at::Tensor gemma_rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be bf16, not ", x.scalar_type());
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.stride(-1) == 1,
              "x must be [rows, n] or [T, heads, n] with the last dim contiguous, not ", x.sizes(), " of strides ",
              x.strides());
  const int64_t n = x.size(-1), heads = x.dim() == 3 ? x.size(1) : 1, rows = x.size(0) * heads;
  check_gemma_scale(scale, n, "scale");
  const bool per_head = scale.dim() == 2;
  TORCH_CHECK(scale.dim() == 1 || (per_head && x.dim() == 3 && scale.size(0) == heads),
              "scale must be [n] or, for x [T, heads, n], [heads, n]; not ", scale.sizes(), " for x ", x.sizes());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t head_stride = x.dim() == 3 ? x.stride(1) : 0;
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / heads, h = r % heads;
      gemma_norm_row(x.data_ptr<bf16>() + t * x.stride(0) + h * head_stride,
                     scale.data_ptr<float>() + (per_head ? h * n : 0), n, static_cast<float>(eps),
                     out.data_ptr<bf16>() + r * n);
    }
  });
  return out;
}

// x, residual [rows, n] bf16 (rows contiguous), scale, next_scale fp32 [n] -> (normed, summed):
// summed = residual + GemmaNorm(x) * scale (a block's output normed, then added: one bf16 rounding each, as
// torch's), normed = GemmaNorm(summed) * next_scale (the norm before the next block), one pass per row.
std::tuple<at::Tensor, at::Tensor> gemma_norm_add_norm(const at::Tensor& x, const at::Tensor& residual,
                                                       const at::Tensor& scale, const at::Tensor& next_scale,
                                                       double eps) {
  check_bf16_rows(x, "x");
  check_bf16_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual and x shapes differ: ", residual.sizes(), " and ", x.sizes());
  const int64_t rows = x.size(0), n = x.size(1);
  check_gemma_scale(scale, n, "scale");
  check_gemma_scale(next_scale, n, "next_scale");
  TORCH_CHECK(scale.dim() == 1 && next_scale.dim() == 1, "scale and next_scale must be [n]");
  at::Tensor summed = at::empty({rows, n}, x.options()), normed = at::empty({rows, n}, x.options());
  const float* s = scale.data_ptr<float>();
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16* in = x.data_ptr<bf16>() + r * x.stride(0);
      const bf16* res = residual.data_ptr<bf16>() + r * residual.stride(0);
      bf16* sum = summed.data_ptr<bf16>() + r * n;
      const float mean = sum_of_squares(in, n) / static_cast<float>(n);
      const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(mean + static_cast<float>(eps)));
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        const __m512 block = bf16_round_trip(
            _mm512_mul_ps(_mm512_mul_ps(load_bf16(in + i, m), rstd), _mm512_maskz_loadu_ps(m, s + i)));
        store_bf16(sum + i, _mm512_add_ps(load_bf16(res + i, m), block), m);
      }
      gemma_norm_row(sum, next_scale.data_ptr<float>(), n, static_cast<float>(eps), normed.data_ptr<bf16>() + r * n);
    }
  });
  return {normed, summed};
}

// GELU-tanh as torch's vectorized kernel computes it in fp32: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715
// x^3), each product and sum rounded in that order. NOTE: in the negative tail 1 + tanh(u) cancels, so the
// result is only torch's if tanh is too, to the ulp: here 1 - s, s = 2e / (1 + e), e = exp(-|2u|) (s accurate,
// so is 1 - s), given u's sign; and +-1 past |u| > 8.664339742, where Sleef's tanhf (torch's) returns 1 and
// exp would still give a last ulp. tests/test_elementwise.py checks every bf16 input.
inline __m512 gelu_tanh_as_torch(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5)),
                                 _mm512_add_ps(x, _mm512_mul_ps(_mm512_set1_ps(0.044715f), cube)));
  const __m512 abs_u = _mm512_abs_ps(u);
  const __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), abs_u));
  const __m512 s = _mm512_div_ps(_mm512_add_ps(e, e), _mm512_add_ps(one, e));
  const __m512 magnitude = _mm512_mask_mov_ps(
      _mm512_sub_ps(one, s), _mm512_cmp_ps_mask(abs_u, _mm512_set1_ps(8.664339742f), _CMP_GT_OQ), one);
  const __m512 tanh = _mm512_or_ps(magnitude, _mm512_and_ps(u, _mm512_set1_ps(-0.0f)));  // NaN stays NaN
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(one, tanh));
}

// GELU-tanh of every bf16 gate (indexed by its bits), rounded to bf16: the activation is rounded before the
// product, so it depends on the gate's 16 bits alone, and one gather of 16 entries (128 KB, kept in L2 over the
// layer's rows) replaces gelu_tanh_as_torch's ~40 instructions. Padded: the gather reads 4 bytes at an entry.
const uint16_t* gelu_tanh_table() {
  static const std::vector<uint16_t> table = [] {
    std::vector<uint16_t> entries(65536 + 2);
    for (int32_t bits = 0; bits < 65536; bits += 16) {
      const __m512i gates = _mm512_add_epi32(_mm512_set1_epi32(bits), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                                        10, 11, 12, 13, 14, 15));
      const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(gates, 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(entries.data() + bits), round_bf16(gelu_tanh_as_torch(x)));
    }
    return entries;
  }();
  return table.data();
}

// gate_up [T, 2I] -> GELU-tanh(gate) * up [T, I].
at::Tensor gelu_tanh_mul(const at::Tensor& gate_up) {
  const uint16_t* table = gelu_tanh_table();  // built (once) before the threads share it
  return gated_mul(gate_up, [table](const void* gate, __mmask16 m) {
    const __m512i index = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, gate));
    const __m512i entry = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, index, table, 2);
    return _mm512_castsi512_ps(_mm512_slli_epi32(entry, 16));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TOKENMILL_OPS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)", &add_rms_norm);
  m.def("rope_store(Tensor qk, Tensor v, Tensor cos, Tensor sin_signed, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping) -> Tensor", &rope_store);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("gemma_rms_norm(Tensor x, Tensor scale, float eps) -> Tensor", &gemma_rms_norm);
  m.def("gemma_norm_add_norm(Tensor x, Tensor residual, Tensor scale, Tensor next_scale, float eps) -> "
        "(Tensor, Tensor)", &gemma_norm_add_norm);
  m.def("gelu_tanh_mul(Tensor gate_up) -> Tensor", &gelu_tanh_mul);
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> Tensor", &add_layer_norm);
}

// A Llama-family decoder stack run for a whole step in one call: the layers' ops called from C++, in the same order,
// on the same tensors, as models/llama.py calls them from Python, so the bits are the same (a step of one sequence
// spent ~3 ms of its ~9 in Python and op dispatch around ~30 layers x ~25 small calls).
//
// torch.classes.tokenmill.LayerStack(num_heads, num_kv_heads, head_dim, eps, final_norm): built once at load;
// add_layer(input_norm, post_norm, qkv, o, gate_up, down), each projection an int8_dot.cpp weight as
// Int8DotLinear holds it (its parts' packed blocks, qtypes and out_features; several parts' outputs concatenated);
// forward(x [T, hidden] bf16 (the embeddings), cos, sin_signed [T, head_dim], kv_cache [layer, K|V, slot, kv_head,
// head_dim], slot_mapping [T], the decodes' rows (None: every row), context_slots, context_lens, prefix_slots and
// window (None where the step has no decodes), the chunks' query_start, num_queries, context_slots, context_lens
// and window (None where it has none)) -> the final norm's output [T, hidden]: the kernel attention backend's
// metadata (attention/cpu_kernel_backend.py), every layer the same window.
// Per layer: the residual add fused into the norm (rms_norm alone in the first layer), x quantized once per
// projection (quantize_rows) then int8_linear per part, rope_store (rotates q and k, writes k and v to the pool),
// chunk_attention and decode_attention as the backend calls them, the output projection, add_rms_norm, gate_up,
// silu_mul, down.
// The ops are found by name through the dispatcher (int8_dot.cpp's exist only on VNNI CPUs): resolved when a stack
// is built, which is only where models/llama.py found every projection on the int8 kernels.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

#define TOKENMILL_STRINGIFY_(x) #x
#define TOKENMILL_STRINGIFY(x) TOKENMILL_STRINGIFY_(x)

template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  const std::string qualified = std::string(TOKENMILL_STRINGIFY(TOKENMILL_OPS)) + "::" + name;
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "").typed<Signature>();
}

using T = at::Tensor;
using TensorPair = std::tuple<T, T>;

struct Ops {
  c10::TypedOperatorHandle<T(const T&, const T&, double)> rms_norm = find_op<T(const T&, const T&, double)>("rms_norm");
  c10::TypedOperatorHandle<TensorPair(const T&, const T&, const T&, double)> add_rms_norm =
      find_op<TensorPair(const T&, const T&, const T&, double)>("add_rms_norm");
  c10::TypedOperatorHandle<TensorPair(const T&)> quantize_rows = find_op<TensorPair(const T&)>("quantize_rows");
  c10::TypedOperatorHandle<T(const T&, const T&, const T&, int64_t, int64_t, bool)> int8_linear =
      find_op<T(const T&, const T&, const T&, int64_t, int64_t, bool)>("int8_linear");
  c10::TypedOperatorHandle<T(const T&, const T&, const T&, const T&, T, T, const T&)> rope_store =
      find_op<T(const T&, const T&, const T&, const T&, T, T, const T&)>("rope_store");
  c10::TypedOperatorHandle<T(const T&, const T&, const T&, const T&, const T&, const T&, std::optional<int64_t>)>
      decode_attention =
          find_op<T(const T&, const T&, const T&, const T&, const T&, const T&, std::optional<int64_t>)>(
              "decode_attention");
  c10::TypedOperatorHandle<T(const T&, const T&, const T&, const T&, const T&, const T&, const T&,
                              std::optional<int64_t>)>
      chunk_attention = find_op<T(const T&, const T&, const T&, const T&, const T&, const T&, const T&,
                                  std::optional<int64_t>)>("chunk_attention");
  c10::TypedOperatorHandle<T(const T&)> silu_mul = find_op<T(const T&)>("silu_mul");
};

// The step's attention metadata (attention/cpu_kernel_backend.py's Decodes and Chunks).
struct Decodes {
  std::optional<T> rows;  // None: every row is a decode
  T context_slots, context_lens, prefix_slots;
  std::optional<int64_t> window;
};
struct Chunks {
  T query_start, num_queries, context_slots, context_lens;
  std::optional<int64_t> window;
};

// One projection's weight: Int8DotLinear's parts.
struct Projection {
  std::vector<T> packed;
  std::vector<int64_t> qtypes, out_features;
};

struct Layer {
  T input_norm, post_norm;
  Projection qkv, o, gate_up, down;
};

class LayerStack : public torch::CustomClassHolder {
 public:
  LayerStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, T final_norm)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps),
        final_norm_(std::move(final_norm)) {}

  void add_layer(T input_norm, T post_norm, std::vector<T> qkv_packed, std::vector<int64_t> qkv_qtypes,
                 std::vector<int64_t> qkv_sizes, std::vector<T> o_packed, std::vector<int64_t> o_qtypes,
                 std::vector<int64_t> o_sizes, std::vector<T> gate_up_packed, std::vector<int64_t> gate_up_qtypes,
                 std::vector<int64_t> gate_up_sizes, std::vector<T> down_packed, std::vector<int64_t> down_qtypes,
                 std::vector<int64_t> down_sizes) {
    layers_.push_back(Layer{std::move(input_norm), std::move(post_norm),
                            projection(std::move(qkv_packed), std::move(qkv_qtypes), std::move(qkv_sizes)),
                            projection(std::move(o_packed), std::move(o_qtypes), std::move(o_sizes)),
                            projection(std::move(gate_up_packed), std::move(gate_up_qtypes), std::move(gate_up_sizes)),
                            projection(std::move(down_packed), std::move(down_qtypes), std::move(down_sizes))});
  }

  T forward(T x, T cos, T sin_signed, T kv_cache, T slot_mapping, std::optional<T> decode_rows,
            std::optional<T> decode_context_slots, std::optional<T> decode_context_lens,
            std::optional<T> decode_prefix_slots, std::optional<int64_t> decode_window,
            std::optional<T> chunk_query_start, std::optional<T> chunk_num_queries,
            std::optional<T> chunk_context_slots, std::optional<T> chunk_context_lens,
            std::optional<int64_t> chunk_window) {
    std::optional<Decodes> decodes;
    std::optional<Chunks> chunks;
    if (decode_context_slots) {
      decodes = Decodes{decode_rows, *decode_context_slots, *decode_context_lens, *decode_prefix_slots, decode_window};
    }
    if (chunk_query_start) {
      chunks = Chunks{*chunk_query_start, *chunk_num_queries, *chunk_context_slots, *chunk_context_lens, chunk_window};
    }
    TORCH_CHECK(decodes || chunks, "a step has decodes or chunks");
    TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == static_cast<int64_t>(layers_.size()),
                "kv_cache must be [layers, 2, slots, kv_heads, head_dim] for ", layers_.size(), " layers");
    const int64_t tokens = x.size(0), q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    T residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      T normed;
      if (i == 0) {
        normed = ops_.rms_norm.call(x, layer.input_norm, eps_);
        residual = x;
      } else {
        std::tie(normed, residual) = ops_.add_rms_norm.call(x, residual, layer.input_norm, eps_);
      }
      // Attention (llama.py's Attention.forward, the kernel backend's decode call).
      const T qkv = linear(normed, layer.qkv);
      const T qk = qkv.narrow(1, 0, q_size + kv_size).view({tokens, num_heads_ + num_kv_heads_, head_dim_});
      const T v = qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, num_kv_heads_, head_dim_});
      const T key_cache = kv_cache.select(0, static_cast<int64_t>(i)).select(0, 0);
      const T value_cache = kv_cache.select(0, static_cast<int64_t>(i)).select(0, 1);
      const T q = ops_.rope_store.call(qk, v, cos, sin_signed, key_cache, value_cache, slot_mapping).contiguous();
      const T attended = attention(q, key_cache, value_cache, decodes, chunks);
      x = linear(attended.reshape({tokens, q_size}), layer.o);
      std::tie(normed, residual) = ops_.add_rms_norm.call(x, residual, layer.post_norm, eps_);
      x = linear(ops_.silu_mul.call(linear(normed, layer.gate_up)), layer.down);
    }
    return std::get<0>(ops_.add_rms_norm.call(x, residual, final_norm_, eps_));
  }

 private:
  static Projection projection(std::vector<T> packed, std::vector<int64_t> qtypes, std::vector<int64_t> sizes) {
    TORCH_CHECK(!packed.empty() && packed.size() == qtypes.size() && packed.size() == sizes.size(),
                "a projection's parts: as many packed weights, qtypes and sizes, at least one");
    return Projection{std::move(packed), std::move(qtypes), std::move(sizes)};
  }

  // CpuKernelAttentionBackend.forward: the chunks' rows in one call, then the decodes' rows.
  T attention(const T& q, const T& key_cache, const T& value_cache, const std::optional<Decodes>& d,
              const std::optional<Chunks>& c) const {
    if (!c) {
      return ops_.decode_attention.call(q, key_cache, value_cache, d->context_slots, d->context_lens, d->prefix_slots,
                                        d->window);
    }
    T out = ops_.chunk_attention.call(q, key_cache, value_cache, c->query_start, c->num_queries, c->context_slots,
                                      c->context_lens, c->window);
    if (d) {
      out.index_put_({*d->rows}, ops_.decode_attention.call(q.index({*d->rows}), key_cache, value_cache,
                                                            d->context_slots, d->context_lens, d->prefix_slots,
                                                            d->window));
    }
    return out;
  }

  // Int8DotLinear.apply: x quantized once, each part's product, the parts' outputs side by side.
  T linear(const T& x, const Projection& p) const {
    const auto [q, sums] = ops_.quantize_rows.call(x.contiguous());
    if (p.packed.size() == 1) return ops_.int8_linear.call(q, sums, p.packed[0], p.qtypes[0], p.out_features[0], false);
    std::vector<T> outputs;
    for (size_t j = 0; j < p.packed.size(); ++j) {
      outputs.push_back(ops_.int8_linear.call(q, sums, p.packed[j], p.qtypes[j], p.out_features[j], false));
    }
    return at::cat(outputs, -1);
  }

  Ops ops_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_;
  T final_norm_;
  std::vector<Layer> layers_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(TOKENMILL_OPS, m) {
  m.class_<LayerStack>("LayerStack")
      .def(torch::init<int64_t, int64_t, int64_t, double, at::Tensor>())
      .def("add_layer", &LayerStack::add_layer)
      .def("forward", &LayerStack::forward);
}

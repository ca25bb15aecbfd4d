// A decoder stack run for a whole step in one call: the layers' ops called from C++, in the same order, on the same
// tensors, as the model's Python layers call them, so the bits are the same (a step of one sequence of SmolLM2-135M
// spent ~3 ms of its ~9 in Python and op dispatch around ~30 layers x ~25 small calls).
//
// Two families, each a class on the shared helpers below (metadata, projections, the attention block):
// torch.classes.tokenmill.LayerStack (models/llama.py's layers) and torch.classes.tokenmill.GemmaLayerStack
// (models/gemma3.py's). Each is built once at load, add_layer per layer, each projection an int8_dot.cpp weight as
// Int8DotLinear holds it (its parts' packed blocks, qtypes and out_features; several parts' outputs concatenated).
// Layers come in groups, each with its own rope tables and attention metadata (Gemma 3's local and global layers: a
// window each; a Llama stack has one group). forward(x [T, hidden] bf16 (the embeddings, scaled where the model
// scales them), cos, sin_signed (a [T, head_dim] table per group), kv_cache [layer, K|V, slot, kv_head, head_dim],
// metadata (per group, METADATA_TENSORS tensors: slot_mapping [T], the decodes' rows (None: every row),
// context_slots, context_lens and prefix_slots (None where the step has no decodes), the chunks' query_start,
// num_queries, context_slots and context_lens (None where it has none)), windows (per group, the decodes' window and
// the chunks')) -> the final norm's output [T, hidden]: the kernel attention backend's metadata
// (attention/cpu_kernel_backend.py).
// Llama layer: the residual add fused into the norm (rms_norm alone in the first layer), x quantized once per
// projection (quantize_rows) then int8_linear per part, rope_store (rotates q and k, writes k and v to the pool),
// chunk_attention and decode_attention as the backend calls them, the output projection, add_rms_norm, gate_up,
// silu_mul, down. Gemma layer: the same attention block with the q/k heads normed (gemma_rms_norm, a scale per head)
// before rope_store; each block's output normed, added to the stream and the sum normed for the next block in one
// gemma_norm_add_norm; gelu_tanh_mul in the MLP.
// The ops are found by name through the dispatcher (int8_dot.cpp's exist only on VNNI CPUs): resolved when a stack
// is built, which is only where the model found every projection on the int8 kernels.

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
  c10::TypedOperatorHandle<T(const T&, const T&, double)> gemma_rms_norm =
      find_op<T(const T&, const T&, double)>("gemma_rms_norm");
  c10::TypedOperatorHandle<TensorPair(const T&, const T&, const T&, const T&, double)> gemma_norm_add_norm =
      find_op<TensorPair(const T&, const T&, const T&, const T&, double)>("gemma_norm_add_norm");
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
  c10::TypedOperatorHandle<T(const T&)> gelu_tanh_mul = find_op<T(const T&)>("gelu_tanh_mul");
};

// A group's attention metadata for the step (attention/cpu_kernel_backend.py's KernelMetadata).
struct Decodes {
  std::optional<T> rows;  // None: every row is a decode
  T context_slots, context_lens, prefix_slots;
  std::optional<int64_t> window;
};
struct Chunks {
  T query_start, num_queries, context_slots, context_lens;
  std::optional<int64_t> window;
};
struct StepAttention {
  T slot_mapping;
  std::optional<Decodes> decodes;
  std::optional<Chunks> chunks;
};
constexpr size_t METADATA_TENSORS = 9;  // a group's tensors in forward's `metadata`, in StepAttention's order

// The rope tables and attention metadata of one group of layers.
struct Group {
  T cos, sin_signed;
  StepAttention attention;
};

// One projection's weight: Int8DotLinear's parts.
struct Projection {
  std::vector<T> packed;
  std::vector<int64_t> qtypes, out_features;
};

Projection projection(std::vector<T> packed, std::vector<int64_t> qtypes, std::vector<int64_t> sizes) {
  TORCH_CHECK(!packed.empty() && packed.size() == qtypes.size() && packed.size() == sizes.size(),
              "a projection's parts: as many packed weights, qtypes and sizes, at least one");
  return Projection{std::move(packed), std::move(qtypes), std::move(sizes)};
}

// A decoder layer's four projections; each family's layer adds its norms.
struct Projections {
  Projection qkv, o, gate_up, down;
};

Projections projections(std::vector<T> qkv_packed, std::vector<int64_t> qkv_qtypes, std::vector<int64_t> qkv_sizes,
                        std::vector<T> o_packed, std::vector<int64_t> o_qtypes, std::vector<int64_t> o_sizes,
                        std::vector<T> gate_up_packed, std::vector<int64_t> gate_up_qtypes,
                        std::vector<int64_t> gate_up_sizes, std::vector<T> down_packed,
                        std::vector<int64_t> down_qtypes, std::vector<int64_t> down_sizes) {
  return Projections{projection(std::move(qkv_packed), std::move(qkv_qtypes), std::move(qkv_sizes)),
                     projection(std::move(o_packed), std::move(o_qtypes), std::move(o_sizes)),
                     projection(std::move(gate_up_packed), std::move(gate_up_qtypes), std::move(gate_up_sizes)),
                     projection(std::move(down_packed), std::move(down_qtypes), std::move(down_sizes))};
}

// What every family's stack shares: the ops, the attention block, the step's groups.
class DecoderStack : public torch::CustomClassHolder {
 protected:
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps) {}

  // forward's per-group arguments as one Group each, checked against the stack's layers and groups.
  std::vector<Group> step_groups(const std::vector<T>& cos, const std::vector<T>& sin_signed, const T& kv_cache,
                                 const std::vector<std::optional<T>>& metadata,
                                 const std::vector<std::optional<int64_t>>& windows, size_t num_layers,
                                 size_t num_groups) const {
    TORCH_CHECK(cos.size() == num_groups && sin_signed.size() == num_groups &&
                    metadata.size() == METADATA_TENSORS * num_groups && windows.size() == 2 * num_groups,
                "the stack's ", num_groups, " groups each take rope tables, ", METADATA_TENSORS,
                " metadata tensors and 2 windows");
    TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == static_cast<int64_t>(num_layers),
                "kv_cache must be [layers, 2, slots, kv_heads, head_dim] for ", num_layers, " layers");
    std::vector<Group> groups;
    for (size_t g = 0; g < num_groups; ++g) {
      const auto m = metadata.begin() + static_cast<std::ptrdiff_t>(METADATA_TENSORS * g);
      StepAttention attention{*m[0], std::nullopt, std::nullopt};
      if (m[2]) attention.decodes = Decodes{m[1], *m[2], *m[3], *m[4], windows[2 * g]};
      if (m[5]) attention.chunks = Chunks{*m[5], *m[6], *m[7], *m[8], windows[2 * g + 1]};
      TORCH_CHECK(attention.decodes || attention.chunks, "a step has decodes or chunks");
      groups.push_back(Group{cos[g], sin_signed[g], std::move(attention)});
    }
    return groups;
  }

  // The attention block (llama.py's Attention.forward, gemma3.py's with qk_scale): qkv, the q and k heads normed
  // where a scale is given, rope_store, the kernel backend's attention, the output projection.
  T attention_block(const T& normed, size_t layer, const Projection& qkv, const std::optional<T>& qk_scale,
                    const Projection& o, const T& kv_cache, const Group& group) const {
    const int64_t tokens = normed.size(0), q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    const T projected = linear(normed, qkv);
    T qk = projected.narrow(1, 0, q_size + kv_size).view({tokens, num_heads_ + num_kv_heads_, head_dim_});
    if (qk_scale) qk = ops_.gemma_rms_norm.call(qk, *qk_scale, eps_);
    const T v = projected.narrow(1, q_size + kv_size, kv_size).view({tokens, num_kv_heads_, head_dim_});
    const T key_cache = kv_cache.select(0, static_cast<int64_t>(layer)).select(0, 0);
    const T value_cache = kv_cache.select(0, static_cast<int64_t>(layer)).select(0, 1);
    const T q = ops_.rope_store.call(qk, v, group.cos, group.sin_signed, key_cache, value_cache,
                                     group.attention.slot_mapping).contiguous();
    return linear(attention(q, key_cache, value_cache, group.attention).reshape({tokens, q_size}), o);
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

 private:
  // CpuKernelAttentionBackend.forward: the chunks' rows in one call, then the decodes' rows.
  T attention(const T& q, const T& key_cache, const T& value_cache, const StepAttention& meta) const {
    const std::optional<Decodes>& d = meta.decodes;
    const std::optional<Chunks>& c = meta.chunks;
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
};

// models/llama.py's layers: one group.
class LayerStack : public DecoderStack {
 public:
  LayerStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, T final_norm)
      : DecoderStack(num_heads, num_kv_heads, head_dim, eps), final_norm_(std::move(final_norm)) {}

  void add_layer(T input_norm, T post_norm, std::vector<T> qkv_packed, std::vector<int64_t> qkv_qtypes,
                 std::vector<int64_t> qkv_sizes, std::vector<T> o_packed, std::vector<int64_t> o_qtypes,
                 std::vector<int64_t> o_sizes, std::vector<T> gate_up_packed, std::vector<int64_t> gate_up_qtypes,
                 std::vector<int64_t> gate_up_sizes, std::vector<T> down_packed, std::vector<int64_t> down_qtypes,
                 std::vector<int64_t> down_sizes) {
    layers_.push_back(Layer{projections(std::move(qkv_packed), std::move(qkv_qtypes), std::move(qkv_sizes),
                                        std::move(o_packed), std::move(o_qtypes), std::move(o_sizes),
                                        std::move(gate_up_packed), std::move(gate_up_qtypes), std::move(gate_up_sizes),
                                        std::move(down_packed), std::move(down_qtypes), std::move(down_sizes)),
                            std::move(input_norm), std::move(post_norm)});
  }

  T forward(T x, std::vector<T> cos, std::vector<T> sin_signed, T kv_cache, std::vector<std::optional<T>> metadata,
            std::vector<std::optional<int64_t>> windows) {
    const Group group = step_groups(cos, sin_signed, kv_cache, metadata, windows, layers_.size(), 1)[0];
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
      x = attention_block(normed, i, layer.qkv, std::nullopt, layer.o, kv_cache, group);
      std::tie(normed, residual) = ops_.add_rms_norm.call(x, residual, layer.post_norm, eps_);
      x = linear(ops_.silu_mul.call(linear(normed, layer.gate_up)), layer.down);
    }
    return std::get<0>(ops_.add_rms_norm.call(x, residual, final_norm_, eps_));
  }

 private:
  struct Layer : Projections {
    T input_norm, post_norm;
  };

  T final_norm_;
  std::vector<Layer> layers_;
};

// models/gemma3.py's layers: a group per layer type (local, global), each norm's fp32 scale (1 + weight).
class GemmaLayerStack : public DecoderStack {
 public:
  GemmaLayerStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, T final_scale,
                  int64_t num_groups)
      : DecoderStack(num_heads, num_kv_heads, head_dim, eps), final_scale_(std::move(final_scale)),
        num_groups_(static_cast<size_t>(num_groups)) {}

  void add_layer(int64_t group, T input_scale, T post_attention_scale, T pre_feedforward_scale,
                 T post_feedforward_scale, T qk_scale, std::vector<T> qkv_packed, std::vector<int64_t> qkv_qtypes,
                 std::vector<int64_t> qkv_sizes, std::vector<T> o_packed, std::vector<int64_t> o_qtypes,
                 std::vector<int64_t> o_sizes, std::vector<T> gate_up_packed, std::vector<int64_t> gate_up_qtypes,
                 std::vector<int64_t> gate_up_sizes, std::vector<T> down_packed, std::vector<int64_t> down_qtypes,
                 std::vector<int64_t> down_sizes) {
    TORCH_CHECK(group >= 0 && static_cast<size_t>(group) < num_groups_, "a layer's group: 0 to ", num_groups_ - 1);
    layers_.push_back(Layer{projections(std::move(qkv_packed), std::move(qkv_qtypes), std::move(qkv_sizes),
                                        std::move(o_packed), std::move(o_qtypes), std::move(o_sizes),
                                        std::move(gate_up_packed), std::move(gate_up_qtypes), std::move(gate_up_sizes),
                                        std::move(down_packed), std::move(down_qtypes), std::move(down_sizes)),
                            static_cast<size_t>(group), std::move(input_scale), std::move(post_attention_scale),
                            std::move(pre_feedforward_scale), std::move(post_feedforward_scale), std::move(qk_scale)});
  }

  // Gemma3ForCausalLM.forward's loop: x the residual stream, `normed` the next block's input.
  T forward(T x, std::vector<T> cos, std::vector<T> sin_signed, T kv_cache, std::vector<std::optional<T>> metadata,
            std::vector<std::optional<int64_t>> windows) {
    const std::vector<Group> groups =
        step_groups(cos, sin_signed, kv_cache, metadata, windows, layers_.size(), num_groups_);
    T normed = ops_.gemma_rms_norm.call(x, layers_.at(0).input_scale, eps_);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      const T& next_scale = i + 1 < layers_.size() ? layers_[i + 1].input_scale : final_scale_;
      const T attended = attention_block(normed, i, layer.qkv, layer.qk_scale, layer.o, kv_cache, groups[layer.group]);
      std::tie(normed, x) = ops_.gemma_norm_add_norm.call(attended, x, layer.post_attention_scale,
                                                          layer.pre_feedforward_scale, eps_);
      const T mlp = linear(ops_.gelu_tanh_mul.call(linear(normed, layer.gate_up)), layer.down);
      std::tie(normed, x) = ops_.gemma_norm_add_norm.call(mlp, x, layer.post_feedforward_scale, next_scale, eps_);
    }
    return normed;
  }

 private:
  struct Layer : Projections {
    size_t group;
    T input_scale, post_attention_scale, pre_feedforward_scale, post_feedforward_scale;
    T qk_scale;  // [heads + kv_heads, head_dim]: q_norm's scale (times the query factor) per query head, k_norm's
  };

  T final_scale_;
  size_t num_groups_;
  std::vector<Layer> layers_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(TOKENMILL_OPS, m) {
  m.class_<LayerStack>("LayerStack")
      .def(torch::init<int64_t, int64_t, int64_t, double, at::Tensor>())
      .def("add_layer", &LayerStack::add_layer)
      .def("forward", &LayerStack::forward);
  m.class_<GemmaLayerStack>("GemmaLayerStack")
      .def(torch::init<int64_t, int64_t, int64_t, double, at::Tensor, int64_t>())
      .def("add_layer", &GemmaLayerStack::add_layer)
      .def("forward", &GemmaLayerStack::forward);
}

"""Gemma 4's text decoder block, with the feed-forward layers called as layers and sparse experts.

keras-hub's `Gemma4TextDecoderBlock` multiplies by `layer.kernel` directly in
its feed-forward path (`ops.matmul(x, self.gating_ffw.kernel)`): with Keras'
int8 or int4 quantization that reads the integer kernel without its scale and
computes the wrong function. This block calls the layers (`self.gating_ffw(x)`),
so a quantized base, LoRA and both together compute what they should. Its
mixture of experts dispatches each token to its top-k experts only
(`keras_tune.models.gemma4.moe`). Everything else (attention with its q/k/v
norms, per-layer inputs, layer scalar, weight names) is keras-hub's block.

Its attention mask also keeps each packed document to itself: the backbone
sends segment ids (0 padding, 1, 2, ... documents) in `padding_mask`, as
`keras_tune.models.document_mask` describes for the other families.

Example:

```python
block = Gemma4TextBlock(hidden_dim=64, intermediate_dim=128, head_dim=16, num_query_heads=4,
                        num_key_value_heads=1, enable_moe_block=True, num_experts=8,
                        expert_intermediate_dim=32, num_experts_per_token=2)
x, key_value, statistics = block(x, padding_mask=mask)   # statistics: [experts + 1], a MoE block only
```
"""

import keras
from keras import ops

from keras_tune import compat
from keras_tune.models.gemma4.moe import SparseExperts, TopKRouter, routing_statistics

_KerasHubBlock, RMSNormalization = compat.kerashub_gemma4_text_classes()


@keras.saving.register_keras_serializable(package="keras_tune")
class Gemma4TextBlock(_KerasHubBlock):
    """A Gemma 4 text decoder block (keras-hub's arguments) whose FFW and experts compute through their layers.

    Called without a cache it returns `(x, key_value)`, and a MoE block
    `(x, key_value, statistics)` (`moe.routing_statistics` over the real tokens);
    with a cache, `(x, cache)` as keras-hub's generation expects.
    """

    def __init__(self, *args, enable_moe_block=False, num_experts=None, expert_intermediate_dim=None,
                 num_experts_per_token=8, **kwargs):
        # keras-hub's block would build its dense expert bank; the sparse one is added here instead.
        super().__init__(*args, enable_moe_block=False, num_experts=num_experts,
                         expert_intermediate_dim=expert_intermediate_dim,
                         num_experts_per_token=num_experts_per_token, **kwargs)
        self.enable_moe_block = bool(enable_moe_block)
        if not self.enable_moe_block:
            return
        if not num_experts or not expert_intermediate_dim:
            raise ValueError("a MoE block needs num_experts and expert_intermediate_dim")
        for name in ("pre_ffw_norm_moe", "post_ffw_norm_dense", "post_ffw_norm_moe_path"):
            setattr(self, name, RMSNormalization(epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name=name))
        self.moe_router = TopKRouter(num_experts, num_experts_per_token, layer_norm_epsilon=self.layer_norm_epsilon,
                                     dtype=self.dtype_policy, name="moe_router")
        self.moe_expert_bank = SparseExperts(num_experts, self.hidden_dim, expert_intermediate_dim,
                                             dtype=self.dtype_policy, name="moe_expert_bank")

    def attention_mask(self, x, padding_mask, cache=None, cache_update_index=0):
        """Causal (and sliding-window) mask, keys padded out and, without a cache, each segment kept to itself.

        The same mask as keras-hub's block for a 0/1 padding mask (a single
        segment); with segment ids, a query sees only keys of its own segment.

        Args:
            x: `[batch, queries, hidden]`.
            padding_mask: `[batch, keys]` 0/1 or segment ids (None: no padding).
            cache: the generation cache (`[batch, 2, keys, ...]`), or None.
            cache_update_index: the first query's position in the cache.
        """
        queries = ops.shape(x)[1]
        keys = ops.shape(cache)[2] if cache is not None else queries
        query_position = ops.arange(queries, dtype="int32")[:, None] + ops.cast(cache_update_index, "int32")
        distance = query_position - ops.arange(keys, dtype="int32")[None, :]
        allowed = distance >= 0
        if self.use_sliding_window_attention and not self.is_global_attention:
            allowed = ops.logical_and(allowed, distance < self.sliding_window_size)
        mask = ops.broadcast_to(allowed[None], (ops.shape(x)[0], queries, keys))
        if padding_mask is not None:
            segments = ops.cast(padding_mask, "int32")
            mask = ops.logical_and(mask, ops.not_equal(segments, 0)[:, None, :])
            if cache is None:
                mask = ops.logical_and(mask, ops.equal(segments[:, :, None], segments[:, None, :]))
        return mask

    def _feedforward(self, x):
        gated = keras.activations.gelu(self.gating_ffw(x), approximate=True)
        return self.ffw_linear(gated * self.gating_ffw_2(x))

    def _experts(self, x, padding_mask):
        shape = ops.shape(x)
        indices, weights, probabilities = self.moe_router(x)
        normed = ops.reshape(self.pre_ffw_norm_moe(x), (-1, shape[-1]))
        out = ops.reshape(self.moe_expert_bank(normed, indices, weights), shape)
        mask = ops.ones(shape[:2], "int32") if padding_mask is None else ops.cast(padding_mask, "int32")
        statistics = routing_statistics(probabilities, indices, ops.reshape(ops.not_equal(mask, 0), (-1,)),
                                        self.num_experts)
        return self.post_ffw_norm_moe_path(out), statistics

    def _residual(self, residual, update):
        if keras.backend.standardize_dtype(update.dtype) != "float16":
            return residual + update
        total = ops.add(ops.cast(residual, "float32"), ops.cast(update, "float32"))
        return ops.cast(ops.clip(total, -65504, 65504), "float16")  # as keras-hub keeps float16 finite

    def call(self, x, padding_mask=None, vision_mask=None, cache=None, cache_update_index=0,  # many: keras-hub's signature
             cache_update_mask=None, per_layer_input=None, shared_kv=None, positions=None):
        if keras.backend.standardize_dtype(x.dtype) == "float16":
            x = ops.clip(x, -65504, 65504)
        normalized = self.pre_attention_norm(x)
        mask = self.attention_mask(normalized, padding_mask, cache, cache_update_index)
        if cache is not None:
            attention, key_value = self.attention(
                normalized, attention_mask=mask, cache=cache, cache_update_index=cache_update_index,
                cache_update_mask=cache_update_mask, shared_kv=shared_kv, positions=positions,
            )
        else:
            attention, key_value = self.attention(normalized, attention_mask=mask, shared_kv=shared_kv,
                                                  positions=positions)
        attention = self.post_attention_norm(attention)
        if self.dropout:
            attention = self.attention_dropout(attention)
        x = self._residual(x, attention)

        update = self._feedforward(self.pre_ffw_norm(x))
        statistics = None
        if self.enable_moe_block:  # the dense MLP and the experts, side by side, summed
            moe, statistics = self._experts(x, padding_mask if cache is None else None)
            update = self.post_ffw_norm_dense(update) + moe
        update = self.post_ffw_norm(update)
        if self.dropout:
            update = self.feedforward_dropout(update)
        x = self._residual(x, update)

        if self.hidden_size_per_layer_input > 0 and per_layer_input is not None:
            gate = keras.activations.gelu(self.per_layer_input_gate(x), approximate=True)
            gate = self.per_layer_up_proj(gate * ops.cast(per_layer_input, gate.dtype))
            x = x + self.post_per_layer_input_norm(gate)
        x = x * ops.cast(self.layer_scalar, x.dtype)
        if cache is not None or statistics is None:
            return x, key_value
        return x, key_value, statistics

    def compute_output_shape(self, input_shape):
        attention = self.attention
        heads = getattr(attention, "effective_num_kv_heads", self.num_key_value_heads)
        key_value = (input_shape[0], 2, input_shape[1], heads, attention.head_dim)
        if self.enable_moe_block:
            return input_shape, key_value, (self.num_experts + 1,)
        return input_shape, key_value

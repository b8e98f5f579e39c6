"""`Gemma4TextBackbone`: Gemma 4's text decoder without the vision and audio encoders.

keras-hub's `Gemma4Backbone` with its arguments and weight names, built
text-only: inputs `token_ids` and `padding_mask` (no `position_ids`: positions
count from each packed document's start, read off the segment ids a packed
batch sends as its padding mask), per-layer embeddings (E2B, E4B), key/value
sharing of the last layers, the wider MLP of those layers, k = v global layers
and sparse mixture-of-experts blocks (26B-A4B,
`keras_tune.models.gemma4.block`). The soft cap of 30 on the logits lives in
the tied `token_embedding` (`reverse=True`), applied once.

With MoE blocks, a weightless `router_statistics` layer gathers each block's
expert load and load-balancing loss; `router_aux_loss_weight > 0` adds
`weight x mean(loss)` to the training loss.

Example:

```python
backbone = Gemma4TextBackbone(vocabulary_size=1024, num_layers=4, num_query_heads=4, num_key_value_heads=1,
                              hidden_dim=64, intermediate_dim=128, head_dim=16, sliding_window_pattern=2)
hidden = backbone({"token_ids": np.ones((1, 8), "int32"), "padding_mask": np.ones((1, 8), "int32")})
```
"""

import keras
import keras_hub
from keras import ops
from keras.layers import ReversibleEmbedding

from keras_tune.models.gemma4.block import Gemma4TextBlock, RMSNormalization
from keras_tune.models.recurrent_gemma.layers import SegmentPositions

FULL, SLIDING = "full_attention", "sliding_attention"
# The per-step routing figures a MoE backbone reports (`Gemma4TextBackbone.step_statistics`): the
# busiest and idlest expert's load relative to an even spread, and the mean load-balancing loss.
STATISTICS = ("expert_load_max", "expert_load_min", "router_aux_loss")


def statistic_channel(y_true, y_pred, index):
    """Channel `index` of a training output (a step statistic, the same at every position)."""
    return y_pred[..., index]


def attention_types(num_layers, sliding_window_pattern=6, layer_types=None):
    """Each layer's attention ("full_attention" or "sliding_attention"); the last of every pattern is full.

    Args:
        num_layers: decoder layers.
        sliding_window_pattern: period of the pattern (used without `layer_types`).
        layer_types: explicit types, as Transformers' config lists them.
    """
    if layer_types is not None:
        return list(layer_types)
    return [FULL if i % sliding_window_pattern == sliding_window_pattern - 1 else SLIDING for i in range(num_layers)]


def kv_sources(types, num_kv_shared_layers):
    """{shared layer: the layer whose keys and values it reuses}: the last unshared layer of the same type.

    Args:
        types: `attention_types(...)`.
        num_kv_shared_layers: the last layers that own no key/value projections.
    """
    first_shared = len(types) - num_kv_shared_layers
    if not num_kv_shared_layers:
        return {}
    sources = {}
    for layer in range(first_shared, len(types)):
        owners = [i for i in range(first_shared) if types[i] == types[layer]]
        if not owners:
            raise ValueError(f"layer {layer} shares keys and values but no earlier {types[layer]} layer has any")
        sources[layer] = owners[-1]
    return sources


@keras.saving.register_keras_serializable(package="keras_tune")
class RouterStatistics(keras.layers.Layer):
    """Gathers the MoE blocks' routing statistics; adds the weighted load-balancing loss. Passes `x` through.

    The statistics of the latest call (`[moe blocks, experts + 1]`: each
    expert's share of the assignments, then the block's load-balancing loss)
    are kept for the training loss model to report in the same trace.

    Args:
        weight: the load-balancing loss's weight in the training loss (0: reported, not trained).
    """

    def __init__(self, weight=0.0, **kwargs):
        super().__init__(**kwargs)
        self.weight = float(weight)
        object.__setattr__(self, "latest", None)  # a traced value: kept out of Keras' tracking

    def call(self, x, statistics):
        stacked = ops.stack([ops.cast(s, "float32") for s in statistics])
        if self.weight:
            self.add_loss(ops.cast(self.weight, "float32") * ops.mean(stacked[:, -1]))
        object.__setattr__(self, "latest", stacked)
        return x

    def compute_output_spec(self, x, statistics):
        return keras.KerasTensor(x.shape, dtype=x.dtype)

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}


@keras.saving.register_keras_serializable(package="keras_tune")
class Gemma4TextBackbone(keras_hub.models.Gemma4Backbone):
    """Gemma 4's text decoder (keras-hub's `Gemma4Backbone` arguments), without vision or audio encoders.

    Args:
        vocabulary_size, num_layers, num_query_heads, num_key_value_heads,
        hidden_dim, intermediate_dim, head_dim, ...: keras-hub's
            `Gemma4Backbone` arguments (see there); `vision_encoder` and
            `audio_encoder` must be None.
        router_aux_loss_weight: weight of the MoE load-balancing loss in the
            training loss (0: only reported).
    """

    def __init__(  # long: one argument a line, as keras-hub backbones read; many: they are the architecture
        self,
        vocabulary_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        head_dim,
        image_size=None,
        query_head_dim_normalize=True,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
        use_sliding_window_attention=True,
        sliding_window_size=512,
        sliding_window_pattern=6,
        layer_types=None,
        global_head_dim=None,
        local_rope_scaling_factor=1.0,
        global_rope_scaling_factor=1.0,
        layer_norm_epsilon=1e-6,
        dropout=0,
        num_kv_shared_layers=0,
        num_global_key_value_heads=None,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=None,
        global_rope_wavelength=None,
        local_rope_wavelength=None,
        global_rope_partial_rotary_factor=1.0,
        use_double_wide_mlp=False,
        enable_moe_block=False,
        num_experts=None,
        expert_intermediate_dim=None,
        num_experts_per_token=8,
        router_aux_loss_weight=0.0,
        vision_encoder=None,
        audio_encoder=None,
        dtype=None,
        **kwargs,
    ):
        if vision_encoder is not None or audio_encoder is not None:
            raise ValueError("Gemma4TextBackbone is text-only: vision_encoder and audio_encoder must be None")
        for unsupported in ("use_bidirectional_attention", "is_embedding_model"):
            if kwargs.pop(unsupported, False):
                raise ValueError(f"Gemma4TextBackbone is a causal language model; {unsupported} is not supported")
        for ignored in ("use_vision_bidirectional_attention", "num_audio_tokens_per_clip", "pooling_intermediate_dim",
                        "embedding_dim"):
            kwargs.pop(ignored, None)  # they concern the encoders or embedding models only
        types = attention_types(num_layers, sliding_window_pattern, layer_types)
        sources = kv_sources(types, num_kv_shared_layers)
        per_layer = hidden_size_per_layer_input

        # === Layers (keras-hub's names and order) ===
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size, output_dim=hidden_dim, tie_weights=True,
            embeddings_initializer=keras.initializers.VarianceScaling(
                scale=1.0, mode="fan_in", distribution="untruncated_normal"),
            dtype=dtype, logit_soft_cap=final_logit_soft_cap, name="token_embedding",
        )
        if per_layer > 0:
            self.per_layer_token_embedding = keras.layers.Embedding(
                vocab_size_per_layer_input or vocabulary_size, num_layers * per_layer, dtype=dtype,
                name="per_layer_token_embedding")
            self.per_layer_model_projection = keras.layers.Dense(
                num_layers * per_layer, use_bias=False, dtype=dtype, name="per_layer_model_projection")
            self.per_layer_projection_norm = RMSNormalization(
                epsilon=layer_norm_epsilon, dtype=dtype, name="per_layer_projection_norm")
        self.vision_encoder = self.audio_encoder = None
        self.transformer_layers = []
        for i, kind in enumerate(types):
            is_global = kind == FULL
            alternative = is_global and num_global_key_value_heads is not None  # k = v, fewer heads
            self.transformer_layers.append(Gemma4TextBlock(
                hidden_dim=hidden_dim, intermediate_dim=intermediate_dim, head_dim=head_dim,
                num_query_heads=num_query_heads, num_key_value_heads=num_key_value_heads,
                logit_soft_cap=attention_logit_soft_cap,
                use_sliding_window_attention=use_sliding_window_attention and not is_global,
                sliding_window_size=sliding_window_size,
                rope_wavelength=(global_rope_wavelength or 1_000_000.0) if is_global else (local_rope_wavelength or 10_000.0),
                rope_scaling_factor=global_rope_scaling_factor if is_global else local_rope_scaling_factor,
                rope_partial_rotary_factor=global_rope_partial_rotary_factor if is_global else 1.0,
                is_global_attention=is_global, global_head_dim=global_head_dim,
                layer_norm_epsilon=layer_norm_epsilon, dropout=dropout,
                is_kv_shared_layer=i in sources, kv_shared_layer_index=sources.get(i),
                hidden_size_per_layer_input=per_layer, attention_k_eq_v=alternative,
                num_global_key_value_heads=num_global_key_value_heads if alternative else None,
                use_double_wide_mlp=use_double_wide_mlp, enable_moe_block=enable_moe_block,
                num_experts=num_experts, expert_intermediate_dim=expert_intermediate_dim,
                num_experts_per_token=num_experts_per_token, dtype=dtype, name=f"decoder_block_{i}",
            ))
        self.layer_norm = RMSNormalization(epsilon=layer_norm_epsilon, dtype=dtype, name="final_normalization")
        self.segment_positions = SegmentPositions(dtype=dtype, name="segment_positions")
        if enable_moe_block:
            self.router_statistics_layer = RouterStatistics(router_aux_loss_weight, dtype=dtype,
                                                            name="router_statistics")

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        _, positions = self.segment_positions(padding_mask)
        x = self.token_embedding(token_ids)
        if per_layer > 0:
            per_layer_embedding = self.per_layer_token_embedding(token_ids)
            per_layer_embedding = ops.cast(per_layer_embedding, x.dtype) * ops.cast(float(per_layer) ** 0.5, x.dtype)
        x = x * ops.cast(ops.sqrt(hidden_dim), x.dtype)
        if per_layer > 0:
            per_layer_projection = self.per_layer_model_projection(x) * ops.cast(float(hidden_dim) ** -0.5, x.dtype)
        key_values, statistics = {}, []
        for i, block in enumerate(self.transformer_layers):
            per_layer_input = None
            if per_layer > 0:
                part = slice(i * per_layer, (i + 1) * per_layer)
                projected = self.per_layer_projection_norm(per_layer_projection[:, :, part])
                per_layer_input = (projected + per_layer_embedding[:, :, part]) * ops.cast(2.0**-0.5, x.dtype)
            outputs = block(x, padding_mask=padding_mask, per_layer_input=per_layer_input,
                            shared_kv=key_values.get(sources[i]) if i in sources else None, positions=positions)
            x, key_values[i] = outputs[0], outputs[1]
            statistics += list(outputs[2:])
        if statistics:
            x = self.router_statistics_layer(x, statistics)
        sequence_output = self.layer_norm(x)
        keras_hub.models.Backbone.__init__(
            self, inputs={"token_ids": token_ids, "padding_mask": padding_mask}, outputs=sequence_output,
            dtype=dtype, **kwargs,
        )

        # === Config (keras-hub's attributes) ===
        self.vocabulary_size, self.image_size, self.num_layers = vocabulary_size, image_size, num_layers
        self.num_query_heads, self.num_key_value_heads = num_query_heads, num_key_value_heads
        self.hidden_dim, self.intermediate_dim, self.head_dim = hidden_dim, intermediate_dim, head_dim
        self.query_head_dim_normalize = query_head_dim_normalize
        self.attention_logit_soft_cap, self.final_logit_soft_cap = attention_logit_soft_cap, final_logit_soft_cap
        self.use_sliding_window_attention, self.sliding_window_size = use_sliding_window_attention, sliding_window_size
        self.sliding_window_pattern, self.layer_types, self.global_head_dim = sliding_window_pattern, types, global_head_dim
        self.local_rope_scaling_factor, self.global_rope_scaling_factor = local_rope_scaling_factor, global_rope_scaling_factor
        self.use_bidirectional_attention = self.use_vision_bidirectional_attention = False
        self.layer_norm_epsilon, self.dropout = layer_norm_epsilon, dropout
        self.is_embedding_model, self.pooling_intermediate_dim, self.embedding_dim = False, None, None
        self.num_audio_tokens_per_clip = None
        self.num_kv_shared_layers, self.num_global_key_value_heads = num_kv_shared_layers, num_global_key_value_heads
        self.hidden_size_per_layer_input, self.vocab_size_per_layer_input = per_layer, vocab_size_per_layer_input
        self.global_rope_wavelength, self.local_rope_wavelength = global_rope_wavelength, local_rope_wavelength
        self.global_rope_partial_rotary_factor = global_rope_partial_rotary_factor
        self.use_double_wide_mlp, self.enable_moe_block = use_double_wide_mlp, enable_moe_block
        self.num_experts, self.expert_intermediate_dim = num_experts, expert_intermediate_dim
        self.num_experts_per_token, self.router_aux_loss_weight = num_experts_per_token, router_aux_loss_weight
        self.text_only_model = True

    def router_statistics(self):
        """`[moe blocks, experts + 1]` float32 of the latest call in the current trace (None without experts)."""
        layer = getattr(self, "router_statistics_layer", None)
        return None if layer is None else layer.latest

    def step_statistics(self):
        """`STATISTICS` of the latest call (in the current trace) as a float32 vector, or None without experts.

        An expert's load is its share of the top-k assignments times the number
        of experts: 1 everywhere when the router spreads tokens evenly.
        """
        statistics = self.router_statistics()
        if statistics is None:
            return None
        load = statistics[:, :-1] * ops.cast(self.num_experts, "float32")
        return ops.stack([ops.max(load), ops.min(load), ops.mean(statistics[:, -1])])

    def statistics_metrics(self, channel):
        """Keras metrics reading `step_statistics` from the training output, from channel `channel` on.

        Args:
            channel: the output channel of the first statistic.
        """
        if not self.enable_moe_block:
            return []
        return [keras.metrics.MeanMetricWrapper(statistic_channel, name=name, index=channel + i)
                for i, name in enumerate(STATISTICS)]

    def get_config(self):
        return {**super().get_config(), "router_aux_loss_weight": self.router_aux_loss_weight}

"""`RecurrentGemmaBackbone`: the Griffin architecture of RecurrentGemma as a keras-hub Backbone.

Token embeddings scaled by `sqrt(hidden_dim)`, residual blocks in the pattern
recurrent, recurrent, local attention, a final RMSNorm. The layout mirrors
keras-hub's `GemmaBackbone` (`token_embedding`, `transformer_layers`,
`layer_norm`, blocks named `decoder_block_<i>`), so keras_tune's LoRA, layouts,
planner and checkpoints treat it like a Gemma backbone. The output soft-cap of
30 lives in the tied `token_embedding` (`reverse=True`), as in Gemma 2.

Example:

```python
backbone = RecurrentGemmaBackbone(
    vocabulary_size=1024, num_layers=3, hidden_dim=64, intermediate_dim=192, num_heads=4
)
hidden = backbone({"token_ids": np.ones((1, 8), "int32"), "padding_mask": np.ones((1, 8), "int32")})
```
"""

import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding
from keras_hub.models import Backbone

from keras_tune.models.recurrent_gemma.blocks import GRIFFIN_PATTERN, ResidualBlock
from keras_tune.models.recurrent_gemma.layers import RMSNorm, SegmentPositions, embedding_scale


@keras.saving.register_keras_serializable(package="keras_tune")
class RecurrentGemmaBackbone(Backbone):
    """Griffin (RecurrentGemma): gated linear recurrences and local attention.

    Takes `{"token_ids", "padding_mask"}` (a padding mask may carry segment ids
    of packed documents: each restarts the recurrence and sees only itself) and
    returns the final hidden states.

    Args:
        vocabulary_size: tokens in the vocabulary (256,000 for the Gemma tokenizer).
        num_layers: residual blocks.
        hidden_dim: model width.
        intermediate_dim: width of each of the MLP's two expansions (3 x width).
        num_heads: attention query heads, and diagonal blocks of the RG-LRU gates.
        lru_width: width of the recurrence (default: `hidden_dim`).
        attention_window_size: tokens back a local attention query sees.
        conv1d_width: temporal width of the recurrent block's convolution.
        final_logit_soft_cap: logits become `cap * tanh(logits / cap)`; None for none.
        block_types: the repeating pattern of temporal blocks.
        layer_norm_epsilon: RMSNorm epsilon.
        dtype: dtype policy of the weights and computation.
    """

    def __init__(  # long: one argument a line, as keras-hub backbones read; many: they are the architecture
        self,
        vocabulary_size,
        num_layers,
        hidden_dim,
        intermediate_dim,
        num_heads,
        lru_width=None,
        attention_window_size=2048,
        conv1d_width=4,
        final_logit_soft_cap=30.0,
        block_types=GRIFFIN_PATTERN,
        layer_norm_epsilon=1e-6,
        dtype=None,
        **kwargs,
    ):
        lru_width = lru_width or hidden_dim
        block_types = tuple(block_types)
        # === Layers ===
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=True,
            # The reference's variance scaling over the embedding axis: std 1/sqrt(width)
            # (0.8796...: the standard deviation of a normal truncated at 2 sigma).
            embeddings_initializer=keras.initializers.TruncatedNormal(
                stddev=(1.0 / hidden_dim) ** 0.5 / 0.87962566103423978
            ),
            logit_soft_cap=final_logit_soft_cap,
            dtype=dtype,
            name="token_embedding",
        )
        self.segment_positions = SegmentPositions(dtype=dtype, name="segment_positions")
        self.transformer_layers = [
            ResidualBlock(
                block_types[i % len(block_types)],
                hidden_dim,
                intermediate_dim,
                num_heads,
                lru_width,
                attention_window_size,
                conv1d_width=conv1d_width,
                output_scale=2.0 / num_layers,
                layer_norm_epsilon=layer_norm_epsilon,
                dtype=dtype,
                name=f"decoder_block_{i}",
            )
            for i in range(num_layers)
        ]
        self.layer_norm = RMSNorm(layer_norm_epsilon, dtype=dtype, name="final_normalization")

        # === Functional Model ===
        token_id_input = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask_input = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        segments, positions = self.segment_positions(padding_mask_input)
        x = self.embed(token_id_input, hidden_dim)
        for block in self.transformer_layers:
            x = block(x, positions, segments)
        sequence_output = self.layer_norm(x)
        super().__init__(
            inputs={"token_ids": token_id_input, "padding_mask": padding_mask_input},
            outputs=sequence_output,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_heads = num_heads
        self.lru_width = lru_width
        self.attention_window_size = attention_window_size
        self.conv1d_width = conv1d_width
        self.final_logit_soft_cap = final_logit_soft_cap
        self.block_types = block_types
        self.layer_norm_epsilon = layer_norm_epsilon
        # keras-hub Gemma attribute names, for code that reads any Gemma backbone.
        self.num_query_heads = num_heads
        self.num_key_value_heads = 1
        self.head_dim = hidden_dim // num_heads

    def embed(self, token_ids, hidden_dim=None):
        """Token embeddings times `sqrt(hidden_dim)` (rounded to bfloat16, as the reference).

        Args:
            token_ids: int tokens.
            hidden_dim: the width (given while the backbone is being built).
        """
        x = self.token_embedding(token_ids)
        return x * ops.cast(embedding_scale(hidden_dim or self.hidden_dim), x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_heads": self.num_heads,
                "lru_width": self.lru_width,
                "attention_window_size": self.attention_window_size,
                "conv1d_width": self.conv1d_width,
                "final_logit_soft_cap": self.final_logit_soft_cap,
                "block_types": list(self.block_types),
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config

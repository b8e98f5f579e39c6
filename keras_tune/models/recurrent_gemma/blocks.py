"""Griffin's blocks: the recurrent block, local multi-query attention, the gated MLP, the residual block.

A residual block is `x + temporal(norm(x))`, then `+ mlp(norm(...))`; its
temporal block is a recurrent block or a local attention block (Griffin's
pattern: recurrent, recurrent, attention). The projections are plain Keras
`Dense` layers named for `keras_tune.lora.apply_lora`: `linear_x`, `linear_y`,
`linear_out` (recurrent block), `query`, `key`, `value`, `attention_output`
(attention) and `ffw_gating`, `ffw_gating_2`, `ffw_linear` (MLP).

Each temporal block takes the three modes of `layers` (sequence, prefill with
`cache_length`, step with `cache`). A step cache is constant in size: the
RG-LRU state and the last 3 convolution inputs of a recurrent block, and a ring
buffer of the last `cache_size` keys and values (at most the attention window)
of an attention block.
"""

import keras
from keras import ops

from keras_tune.models.recurrent_gemma.layers import (
    MIN_LOGIT,
    RGLRU,
    RMSNorm,
    TemporalConv1D,
    apply_rope,
    truncated_normal_fan_in,
)

RECURRENT, ATTENTION = "recurrent", "attention"
GRIFFIN_PATTERN = (RECURRENT, RECURRENT, ATTENTION)


def _dense(units, name, use_bias=True, scale=1.0, dtype=None):
    return keras.layers.Dense(
        units, use_bias=use_bias, kernel_initializer=truncated_normal_fan_in(scale), dtype=dtype, name=name
    )


@keras.saving.register_keras_serializable(package="keras_tune")
class RecurrentBlock(keras.layers.Layer):
    """`linear_out(rg_lru(conv_1d(linear_x(x))) * gelu(linear_y(x)))`.

    Args:
        lru_width: width of the recurrence.
        num_heads: blocks of the RG-LRU gates.
        conv1d_width: temporal width of the convolution.
        output_scale: initialization variance scale of `linear_out`.
    """

    def __init__(self, lru_width, num_heads, conv1d_width=4, output_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.lru_width, self.num_heads = lru_width, num_heads
        self.conv1d_width, self.output_scale = conv1d_width, output_scale
        self.linear_y = _dense(lru_width, "linear_y", dtype=self.dtype_policy)
        self.linear_x = _dense(lru_width, "linear_x", dtype=self.dtype_policy)
        self.conv_1d = TemporalConv1D(conv1d_width, dtype=self.dtype_policy, name="conv_1d")
        self.rg_lru = RGLRU(num_heads, dtype=self.dtype_policy, name="rg_lru")
        self.linear_out = None

    def build(self, input_shape):
        self.linear_out = _dense(input_shape[-1], "linear_out", scale=self.output_scale, dtype=self.dtype_policy)
        self.linear_y.build(input_shape)
        self.linear_x.build(input_shape)
        inner = (*input_shape[:-1], self.lru_width)
        self.conv_1d.build(inner)
        self.rg_lru.build(inner)
        self.linear_out.build(inner)
        self.built = True

    def call(self, x, positions, segments=None, cache_length=None, cache_size=None, cache=None):
        y = ops.gelu(self.linear_y(x), approximate=True)
        x = self.linear_x(x)
        if cache is not None:
            rg_lru_state, conv_state = cache
            x, conv_state = self.conv_1d(x, cache=conv_state)
            x, rg_lru_state = self.rg_lru(x, positions, cache=rg_lru_state)
            return self.linear_out(x * y), (rg_lru_state, conv_state)
        if cache_length is None:
            x = self.rg_lru(self.conv_1d(x, positions), positions)
            return self.linear_out(x * y)
        x, conv_state = self.conv_1d(x, positions, cache_length=cache_length)
        x, rg_lru_state = self.rg_lru(x, positions, cache_length=cache_length)
        return self.linear_out(x * y), (rg_lru_state, conv_state)

    def get_config(self):
        return {
            **super().get_config(), "lru_width": self.lru_width, "num_heads": self.num_heads,
            "conv1d_width": self.conv1d_width, "output_scale": self.output_scale,
        }


def _ring_positions(next_position, size):
    """Which position each slot of a ring buffer of `size` holds when `next_position` is next (< 0: empty)."""
    last = next_position - 1
    return last - ops.mod(last - ops.arange(size, dtype="int32"), size)


@keras.saving.register_keras_serializable(package="keras_tune")
class LocalAttention(keras.layers.Layer):
    """Local multi-query attention: `num_heads` query heads, one key/value head, a sliding window.

    A query at token `t` sees the tokens `t - window_size .. t` of its own
    document. Rotary embeddings rotate the first half of each head.

    Args:
        num_heads: query heads.
        head_dim: width of each head.
        window_size: how many tokens back a query sees (2,048 in RecurrentGemma).
        output_scale: initialization variance scale of `attention_output`.
    """

    def __init__(self, num_heads, head_dim, window_size, output_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.window_size, self.output_scale = window_size, output_scale
        self.query = _dense(num_heads * head_dim, "query", use_bias=False, dtype=self.dtype_policy)
        self.key = _dense(head_dim, "key", use_bias=False, dtype=self.dtype_policy)
        self.value = _dense(head_dim, "value", use_bias=False, dtype=self.dtype_policy)
        self.attention_output = None

    def build(self, input_shape):
        self.attention_output = _dense(
            input_shape[-1], "attention_output", scale=self.output_scale, dtype=self.dtype_policy
        )
        for layer in (self.query, self.key, self.value):
            layer.build(input_shape)
        self.attention_output.build((*input_shape[:-1], self.num_heads * self.head_dim))
        self.built = True

    def _project(self, x, positions):
        queries = self.query(x)
        queries = ops.reshape(queries, (*ops.shape(queries)[:-1], self.num_heads, self.head_dim))
        return apply_rope(queries, positions), apply_rope(self.key(x), positions), self.value(x)

    def _attend(self, queries, keys, values, mask):
        logits = ops.einsum("btnh,bsh->bnts", queries, keys) * (self.head_dim**-0.5)
        logits = ops.where(mask[:, None], ops.cast(logits, "float32"), MIN_LOGIT)
        probabilities = ops.cast(ops.softmax(logits, axis=-1), queries.dtype)
        encoded = ops.einsum("bnts,bsh->btnh", probabilities, values)
        return self.attention_output(ops.reshape(encoded, (*ops.shape(encoded)[:2], -1)))

    def call(self, x, positions, segments=None, cache_length=None, cache_size=None, cache=None):
        queries, keys, values = self._project(x, positions)
        if cache is not None:
            return self._step(queries, keys, values, positions, cache)
        index = ops.arange(ops.shape(x)[1], dtype="int32")
        back = index[:, None] - index[None, :]  # query - key
        mask = ops.logical_and(back >= 0, back <= self.window_size)[None]
        mask = ops.logical_and(mask, ops.equal(segments[:, :, None], segments[:, None, :]))
        output = self._attend(queries, keys, values, mask)
        if cache_length is None:
            return output
        slots = _ring_positions(cache_length, cache_size)
        filled = ops.cast(slots >= 0, keys.dtype)[None, :, None]
        taken = ops.maximum(slots, 0)
        return output, (ops.take(keys, taken, axis=1) * filled, ops.take(values, taken, axis=1) * filled)

    def _step(self, queries, keys, values, positions, cache):
        cached_keys, cached_values = cache
        position = positions[0, 0]
        size = ops.shape(cached_keys)[1]
        # The ring holds the `size` tokens before this one (size <= window), then this one.
        valid = ops.concatenate([_ring_positions(position, size) >= 0, ops.ones((1,), "bool")])
        mask = ops.broadcast_to(valid[None, None, :], (ops.shape(queries)[0], 1, size + 1))
        output = self._attend(
            queries,
            ops.concatenate([cached_keys, keys], axis=1),
            ops.concatenate([cached_values, values], axis=1),
            mask,
        )
        slot = ops.mod(position, size)
        return output, (
            ops.slice_update(cached_keys, [0, slot, 0], keys),
            ops.slice_update(cached_values, [0, slot, 0], values),
        )

    def get_config(self):
        return {
            **super().get_config(), "num_heads": self.num_heads, "head_dim": self.head_dim,
            "window_size": self.window_size, "output_scale": self.output_scale,
        }


@keras.saving.register_keras_serializable(package="keras_tune")
class GatedMLP(keras.layers.Layer):
    """`ffw_linear(gelu(ffw_gating(x)) * ffw_gating_2(x))`.

    Args:
        intermediate_dim: width of each of the two expansions.
        output_scale: initialization variance scale of `ffw_linear`.
    """

    def __init__(self, intermediate_dim, output_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.intermediate_dim, self.output_scale = intermediate_dim, output_scale
        self.ffw_gating = _dense(intermediate_dim, "ffw_gating", dtype=self.dtype_policy)
        self.ffw_gating_2 = _dense(intermediate_dim, "ffw_gating_2", dtype=self.dtype_policy)
        self.ffw_linear = None

    def build(self, input_shape):
        self.ffw_linear = _dense(input_shape[-1], "ffw_linear", scale=self.output_scale, dtype=self.dtype_policy)
        self.ffw_gating.build(input_shape)
        self.ffw_gating_2.build(input_shape)
        self.ffw_linear.build((*input_shape[:-1], self.intermediate_dim))
        self.built = True

    def call(self, x):
        return self.ffw_linear(ops.gelu(self.ffw_gating(x), approximate=True) * self.ffw_gating_2(x))

    def get_config(self):
        return {**super().get_config(), "intermediate_dim": self.intermediate_dim, "output_scale": self.output_scale}


@keras.saving.register_keras_serializable(package="keras_tune")
class ResidualBlock(keras.layers.Layer):
    """One Griffin residual block: a temporal block (recurrent or attention) and a gated MLP.

    Args:
        block_type: "recurrent" or "attention".
        hidden_dim: model width.
        intermediate_dim: MLP expansion width.
        num_heads: attention heads / RG-LRU gate blocks.
        lru_width: width of the recurrence.
        attention_window_size: local attention window.
        conv1d_width: temporal width of the recurrent block's convolution.
        output_scale: initialization variance scale of each block's last layer.
        layer_norm_epsilon: RMSNorm epsilon.
    """

    def __init__(  # many: a Keras layer's constructor is its config, one argument a setting
        self, block_type, hidden_dim, intermediate_dim, num_heads, lru_width, attention_window_size,
        conv1d_width=4, output_scale=1.0, layer_norm_epsilon=1e-6, **kwargs,
    ):
        super().__init__(**kwargs)
        self.block_type, self.hidden_dim, self.intermediate_dim = block_type, hidden_dim, intermediate_dim
        self.num_heads, self.lru_width, self.attention_window_size = num_heads, lru_width, attention_window_size
        self.conv1d_width, self.output_scale, self.layer_norm_epsilon = conv1d_width, output_scale, layer_norm_epsilon
        policy = self.dtype_policy
        self.temporal_pre_norm = RMSNorm(layer_norm_epsilon, dtype=policy, name="temporal_pre_norm")
        if block_type == RECURRENT:
            self.temporal = RecurrentBlock(
                lru_width, num_heads, conv1d_width, output_scale, dtype=policy, name="recurrent"
            )
        else:
            self.temporal = LocalAttention(
                num_heads, hidden_dim // num_heads, attention_window_size, output_scale, dtype=policy, name="attention"
            )
        self.channel_pre_norm = RMSNorm(layer_norm_epsilon, dtype=policy, name="channel_pre_norm")
        self.mlp = GatedMLP(intermediate_dim, output_scale, dtype=policy, name="mlp")

    def build(self, input_shape):
        for layer in (self.temporal_pre_norm, self.temporal, self.channel_pre_norm, self.mlp):
            layer.build(input_shape)
        self.built = True

    def call(self, x, positions, segments=None, cache_length=None, cache_size=None, cache=None):
        """Sequence mode returns `x`; prefill (`cache_length`) and step (`cache`) return `(x, cache)`."""
        normed = self.temporal_pre_norm(x)
        temporal = self.temporal(
            normed, positions, segments, cache_length=cache_length, cache_size=cache_size, cache=cache
        )
        stateful = cache is not None or cache_length is not None
        if stateful:
            temporal, cache = temporal
        residual = temporal + x
        x = self.mlp(self.channel_pre_norm(residual)) + residual
        return (x, cache) if stateful else x

    def compute_output_shape(self, input_shape):
        # Given, so Keras need not trace `call` on a symbolic input (the scaled
        # embedding is a KerasTensor Keras marks sparse, as for keras-hub's Gemma).
        return input_shape

    def get_config(self):
        return {
            **super().get_config(), "block_type": self.block_type, "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim, "num_heads": self.num_heads, "lru_width": self.lru_width,
            "attention_window_size": self.attention_window_size, "conv1d_width": self.conv1d_width,
            "output_scale": self.output_scale, "layer_norm_epsilon": self.layer_norm_epsilon,
        }

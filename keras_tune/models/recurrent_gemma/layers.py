"""Griffin's building layers: RMSNorm, the temporal Conv1D, the RG-LRU, rotary embeddings, segment positions.

Each layer computes what the reference JAX implementation (the `recurrentgemma`
package, `recurrentgemma/jax/layers.py`) computes, operation for operation (only
the scan is parallel where the reference's CPU default is sequential), so float32
logits agree with it to rounding. Every layer that carries state across tokens
has three modes, chosen by its arguments:

- **sequence** (training, scoring): the whole `(batch, length)` sequence at once;
  the RG-LRU runs as a parallel (associative) scan. Documents packed into one
  row are kept apart by *positions*: a position of 0 starts a new document, where
  the recurrence and the convolution restart (the reference's `segment_pos`).
- **prefill** (`cache_length=L`): the sequence pass, which also returns the
  state after the first `L` tokens, for generation to continue from.
- **step** (`cache=...`): one token, from and to a constant-size state.
"""

import math
import random

import keras
from keras import ops

# Where the reference masks attention logits: a large negative float32.
MIN_LOGIT = -2.3819763e38


def truncated_normal_fan_in(scale=1.0):
    """The reference's `variance_scaling(scale, "fan_in", "normal")` (a truncated normal).

    Args:
        scale: the variance scale.
    """
    return keras.initializers.VarianceScaling(scale=scale, mode="fan_in", distribution="truncated_normal")


@keras.saving.register_keras_serializable(package="keras_tune")
class RingInitializer(keras.initializers.Initializer):
    """Initializes the RG-LRU's `a_param`: the recurrence's decay `a` drawn uniformly on a ring.

    As the reference: `a = exp(-softplus(a_param))` (at a gate of 1/8) has its
    squared radius uniform in `[min_rad**2, max_rad**2]`; `a_param` is stored
    through the inverse of that softplus.

    Args:
        min_rad: smallest radius (0.9: every channel starts with a long memory).
        max_rad: largest radius.
        seed: an int; by default drawn from Python's generator, which
            `keras.utils.set_random_seed` seeds.
    """

    def __init__(self, min_rad=0.9, max_rad=0.999, seed=None):
        self.min_rad, self.max_rad = float(min_rad), float(max_rad)
        self.seed = int(seed) if seed is not None else random.randint(1, int(1e9))

    def __call__(self, shape, dtype=None):
        uniform = keras.random.uniform(shape, dtype="float32", seed=self.seed)
        squared = uniform * (self.max_rad**2 - self.min_rad**2) + self.min_rad**2 + 1e-8
        a_real = 0.5 * ops.log(squared)
        return ops.cast(ops.log(ops.exp(-a_real) - 1.0), dtype or "float32")

    def get_config(self):
        return {"min_rad": self.min_rad, "max_rad": self.max_rad, "seed": self.seed}


def embedding_scale(width):
    """`sqrt(width)` rounded to bfloat16, as the reference scales embeddings (it trained in bfloat16).

    Args:
        width: the model width.
    """
    import ml_dtypes  # a Keras dependency

    return float(ml_dtypes.bfloat16(math.sqrt(width)))


@keras.saving.register_keras_serializable(package="keras_tune")
class SegmentPositions(keras.layers.Layer):
    """Turns a padding mask into (segment ids, position within the segment).

    A packed batch sends a segment id per position as its `padding_mask` (0 for
    padding, 1, 2, ... for the documents of a row); a plain 0/1 mask is one
    segment. A position restarts at 0 wherever the segment id changes, which is
    where Griffin restarts its recurrence and convolution.
    """

    def call(self, padding_mask):
        segments = ops.cast(padding_mask, "int32")
        index = ops.arange(ops.shape(segments)[1], dtype="int32")[None, :]
        previous = ops.pad(segments[:, :-1], [[0, 0], [1, 0]], constant_values=-1)
        starts = ops.where(ops.not_equal(segments, previous), index, 0)
        # The latest start at or before each position: a running maximum.
        return segments, index - ops.associative_scan(ops.maximum, starts, axis=1)

    def compute_output_spec(self, padding_mask):
        spec = keras.KerasTensor(padding_mask.shape, dtype="int32")
        return spec, keras.KerasTensor(padding_mask.shape, dtype="int32")


@keras.saving.register_keras_serializable(package="keras_tune")
class RMSNorm(keras.layers.Layer):
    """`x / rms(x) * (1 + scale)`, computed in float32; the scale starts at zero.

    Args:
        epsilon: added to the mean square before the square root.
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="zeros")
        self.built = True

    def call(self, x):
        x = ops.cast(x, "float32")
        variance = ops.mean(ops.square(x), axis=-1, keepdims=True)
        normed = x * ops.rsqrt(variance + self.epsilon)
        return ops.cast(normed * (ops.cast(self.scale, "float32") + 1.0), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_tune")
class TemporalConv1D(keras.layers.Layer):
    """A depthwise causal convolution over time (width 4 in Griffin), per channel.

    Sequence mode never mixes documents: a position `s` steps back is used only
    if it belongs to the same document (`positions >= s`). The state of step
    mode is the last `temporal_width - 1` inputs.

    Args:
        temporal_width: how many positions (this one included) each output sees.
    """

    def __init__(self, temporal_width=4, **kwargs):
        super().__init__(**kwargs)
        self.temporal_width = temporal_width

    def build(self, input_shape):
        width = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel", shape=(self.temporal_width, width), initializer=truncated_normal_fan_in(0.01)
        )
        self.bias = self.add_weight(name="bias", shape=(width,), initializer="zeros")
        self.built = True

    def call(self, x, positions=None, cache_length=None, cache=None):
        if cache is not None:
            return self._step(x, cache)
        length = x.shape[1]
        output = 0.0
        for shift in range(self.temporal_width):
            if length is not None and shift >= length:
                break
            window = ops.pad(x[:, : length - shift] if shift else x, [[0, 0], [shift, 0], [0, 0]])
            window = window * ops.cast(positions >= shift, x.dtype)[..., None]
            output = output + window * self._tap(shift)
        output = output + ops.cast(self.bias, x.dtype)
        if cache_length is None:
            return output
        # The inputs just before position `cache_length` (zeros before the start).
        padded = ops.pad(x, [[0, 0], [self.temporal_width - 1, 0], [0, 0]])
        state = ops.slice(padded, [0, cache_length, 0], [ops.shape(x)[0], self.temporal_width - 1, ops.shape(x)[2]])
        return output, state

    def _tap(self, shift):
        return ops.cast(self.kernel[self.temporal_width - shift - 1], self.compute_dtype)

    def _step(self, x, state):
        window = ops.concatenate([ops.cast(state, x.dtype), x], axis=1)
        output = 0.0
        for shift in range(self.temporal_width):
            index = self.temporal_width - shift - 1
            output = output + window[:, index : index + 1] * self._tap(shift)
        return output + ops.cast(self.bias, x.dtype), window[:, 1:]

    def get_config(self):
        return {**super().get_config(), "temporal_width": self.temporal_width}


@ops.custom_gradient
def _sqrt_bounded_gradient(x):
    """`sqrt(x)` whose gradient is clipped at 1000 (the reference's guard against NaN in bfloat16)."""

    def gradient(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        return upstream * 0.5 / ops.sqrt(ops.maximum(x, 1.0 / (4.0 * 1000.0**2)))

    return ops.sqrt(x), gradient


def _linear_recurrence(a, x):
    """`h[t] = a[t] * h[t - 1] + x[t]` from `h[-1] = 0`, over axis 1, as a parallel scan."""

    def combine(earlier, later):
        a_i, h_i = earlier
        a_j, h_j = later
        return a_j * a_i, a_j * h_i + h_j

    return ops.associative_scan(combine, (a, x), axis=1)[1]


@keras.saving.register_keras_serializable(package="keras_tune")
class RGLRU(keras.layers.Layer):
    """The Real-Gated Linear Recurrent Unit: `h[t] = a[t] h[t-1] + sqrt(1 - a[t]^2) (i[t] x[t])`.

    `a[t] = exp(-8 * r[t] * softplus(a_param))`, with the recurrence gate `r` and
    the input gate `i` block-diagonal linear maps of `x` (one block per head)
    through a sigmoid. The recurrence restarts (h = the gated input) at position 0.
    Gates and state are computed in float32; the state of step mode is `h`.

    Args:
        num_heads: diagonal blocks of the gates; must divide the width.
        min_rad: smallest initial radius of `a` (see `RingInitializer`).
    """

    def __init__(self, num_heads, min_rad=0.9, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.min_rad = min_rad

    def build(self, input_shape):
        width = input_shape[-1]
        block = width // self.num_heads
        self.a_param = self.add_weight(name="a_param", shape=(width,), initializer=RingInitializer(self.min_rad))
        for gate in ("input_gate", "a_gate"):
            kernel = self.add_weight(
                name=f"{gate}_kernel", shape=(self.num_heads, block, block), initializer=truncated_normal_fan_in()
            )
            bias = self.add_weight(name=f"{gate}_bias", shape=(self.num_heads, block), initializer="zeros")
            setattr(self, f"{gate}_kernel", kernel)
            setattr(self, f"{gate}_bias", bias)
        self.built = True

    def _block_diagonal(self, x, kernel, bias):
        shape = ops.shape(x)
        blocks = ops.reshape(x, (*shape[:-1], self.num_heads, -1))
        y = ops.einsum("...hi,hij->...hj", blocks, ops.cast(kernel, "float32")) + ops.cast(bias, "float32")
        return ops.reshape(y, shape)

    def _inputs(self, x, positions):
        """The recurrence coefficient `a` and the normalized input, float32."""
        x = ops.cast(x, "float32")
        gate_x = ops.sigmoid(self._block_diagonal(x, self.input_gate_kernel, self.input_gate_bias))
        gate_a = ops.sigmoid(self._block_diagonal(x, self.a_gate_kernel, self.a_gate_bias))
        log_a = -8.0 * gate_a * ops.softplus(ops.cast(self.a_param, "float32"))
        a, a_squared = ops.exp(log_a), ops.exp(2.0 * log_a)
        reset = ops.cast(ops.equal(positions, 0), "float32")[..., None]
        multiplier = reset + (1.0 - reset) * _sqrt_bounded_gradient(1.0 - a_squared)
        return a * (1.0 - reset), (x * gate_x) * multiplier

    def call(self, x, positions, cache_length=None, cache=None):
        a, normalized = self._inputs(x, positions)
        if cache is not None:  # one token
            state = a[:, 0] * cache + normalized[:, 0]
            return ops.cast(state[:, None], self.compute_dtype), state
        states = _linear_recurrence(a, normalized)
        output = ops.cast(states, self.compute_dtype)
        if cache_length is None:
            return output
        # The state after `cache_length` tokens (zero before any).
        last = ops.take(states, ops.maximum(cache_length - 1, 0), axis=1)
        return output, ops.where(cache_length > 0, last, ops.zeros_like(last))

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "min_rad": self.min_rad}


def apply_rope(x, positions, max_wavelength=10_000):
    """Rotary embeddings on the first half of the last axis; the second half passes through.

    Args:
        x: `(batch, length, [heads,] head_dim)` queries or keys.
        positions: `(batch, length)` int positions.
        max_wavelength: the longest wavelength of the rotation.
    """
    head_dim = x.shape[-1]
    rotated, passed = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    half = rotated.shape[-1]
    exponents = ops.cast(2 * ops.arange(half // 2), "float32") / half
    inverse_frequencies = 1.0 / ops.power(float(max_wavelength), exponents)
    positions = ops.cast(positions, "float32")
    positions = ops.reshape(positions, (*ops.shape(positions), *([1] * (len(x.shape) - 2))))
    angles = positions * inverse_frequencies
    sin, cos = ops.cast(ops.sin(angles), x.dtype), ops.cast(ops.cos(angles), x.dtype)
    first, second = rotated[..., : half // 2], rotated[..., half // 2 :]
    return ops.concatenate([first * cos - second * sin, second * cos + first * sin, passed], axis=-1)

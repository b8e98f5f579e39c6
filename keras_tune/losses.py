"""The training loss: the output head only where the loss is, cross-entropy in chunks.

Gemma's output head is its embedding used in reverse: on the 270M it holds 168M
of 268M parameters, and its float32 logits take `vocabulary x 4` bytes a token
(1 GiB per 1,024 tokens), plus their gradient. keras-hub's plain path computes
them at every position, although translation and chat data carry loss on 15-50%
of the positions. With `train.loss = "sparse"` (the default):

1. the pipeline adds, per batch, the positions whose loss weight is non-zero
   (`loss_positions`, `[batch, capacity]`; the capacity is one of a few fixed
   fractions of the row, so XLA compiles a handful of shapes) and the targets;
2. `SparseLossModel` runs the backbone, gathers the hidden states at those
   positions, and computes the head and the cross-entropy there only, in chunks
   of `train.loss_chunk_tokens` tokens under `jax.checkpoint`: the backward
   pass recomputes a chunk's logits instead of keeping them, so at most one
   chunk of `[tokens, vocabulary]` logits exists at a time, forward or backward;
3. the per-position NLL (and whether the argmax was right) is scattered back to
   `[batch, length]`, so the loss (`mean_with_sample_weight` over the same
   weights), accuracy and perplexity are exactly the plain path's figures.

The head is the model's own `token_embedding(reverse=True)`, so Gemma 2's final
soft-cap, reverse dtypes and a quantized embedding apply as in keras-hub. The
vocabulary is not chunked: one chunk of tokens against the whole vocabulary is a
single large matmul, which is what CPUs and accelerators run best, and the
chunk size already bounds the memory. Alternatives looked at: tokamax's
`linear_softmax_cross_entropy_loss` (no soft-cap, no weights), `jax-cce`, and
Levanter's fused cross-entropy (part of Levanter's model code); a `lax.map`
under `jax.checkpoint` is short, exact and runs on every backend.

Example:

```python
trainer = SparseLossModel(causal_lm, chunk_tokens=512)
compile_training(trainer, optimizer, pad_id)
trainer.fit(with_loss_positions(bundle.train), ...)
```
"""

import keras

# Loss positions a row may hold, as fractions of the row: each batch gets the
# smallest that fits, so a run compiles at most this many shapes a bucket.
CAPACITY_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def capacities(length):
    """The loss-position capacities of rows of `length` positions (multiples of 8, ascending).

    Args:
        length: input positions a row.
    """
    levels = {min(length, max(8, -(-int(length * f) // 8) * 8)) for f in CAPACITY_FRACTIONS}
    return sorted(levels)


def _capacity_tf(length, fraction):
    """`capacities` for one fraction, in TF ops (bucketed batches have no static length)."""
    import tensorflow as tf

    eighths = tf.cast(tf.math.ceil(tf.cast(length, tf.float32) * fraction / 8.0), tf.int32) * 8
    return tf.minimum(length, tf.maximum(8, eighths))


def add_loss_positions(x, y, sample_weight):
    """A tf.data map: adds `loss_positions` and `targets` to a batch's inputs.

    The positions whose weight is non-zero come first in each row, in order;
    the rest of the capacity holds distinct zero-weight positions (harmless:
    their weight is 0). The capacity is the smallest of `capacities(length)`
    that holds the batch's fullest row.

    Args:
        x: `{"token_ids", "padding_mask"}` of `[batch, length]`.
        y: the targets, `[batch, length]`.
        sample_weight: the loss weights, `[batch, length]`.
    """
    import tensorflow as tf

    length = tf.shape(x["token_ids"])[1]
    carries = tf.cast(sample_weight > 0, tf.int32)
    fullest = tf.reduce_max(tf.reduce_sum(carries, axis=1))
    levels = tf.stack([_capacity_tf(length, f) for f in CAPACITY_FRACTIONS])
    capacity = tf.reduce_min(tf.boolean_mask(levels, levels >= fullest))
    order = tf.argsort(carries, axis=1, direction="DESCENDING", stable=True)
    positions = tf.cast(order[:, :capacity], tf.int32)
    return {**x, "loss_positions": positions, "targets": tf.cast(y, tf.int32)}, y, sample_weight


def with_loss_positions(dataset):
    """The batches of `dataset` with `loss_positions` and `targets` for `SparseLossModel`.

    Args:
        dataset: a tf.data.Dataset of `(x, y, sample_weight)` batches.
    """
    import tensorflow as tf

    return dataset.map(add_loss_positions, num_parallel_calls=tf.data.AUTOTUNE)


def head_nll(hidden, targets, head, chunk_tokens=0):
    """NLL and argmax-correctness of `targets` under `head(hidden)`, one token chunk at a time.

    Args:
        hidden: `[tokens, hidden_dim]` final hidden states.
        targets: `[tokens]` token ids.
        head: `hidden -> logits` (the reversed embedding, soft-cap included).
        chunk_tokens: tokens a chunk (0 or >= tokens: one chunk).

    Returns:
        `(nll, correct)`, both float32 `[tokens]`.
    """
    import jax
    import jax.numpy as jnp

    count = hidden.shape[0]
    chunk = count if not chunk_tokens or chunk_tokens >= count else int(chunk_tokens)
    padded = -(-count // chunk) * chunk
    if padded != count:
        hidden = jnp.pad(hidden, ((0, padded - count), (0, 0)))
        targets = jnp.pad(targets, (0, padded - count))

    @jax.checkpoint  # the backward pass recomputes this chunk's logits
    def one_chunk(inputs):
        states, ids = inputs
        logits = head(states).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        correct = (jnp.argmax(logits, axis=-1) == ids).astype(jnp.float32)
        return nll, jax.lax.stop_gradient(correct)

    shape = (padded // chunk, chunk)
    nll, correct = jax.lax.map(one_chunk, (hidden.reshape(*shape, -1), targets.reshape(shape)))
    return nll.reshape(-1)[:count], correct.reshape(-1)[:count]


class SparseLossModel(keras.Model):
    """A CausalLM's backbone with the output head only at loss positions: what `fit` trains.

    Its output is `[batch, length, 2]`: the next-token NLL and argmax-correctness
    at the gathered positions, 0 elsewhere (where the weight is 0 anyway).
    Variables, paths and the optimizer state are the CausalLM's own, so
    checkpoints and adapters are the same as the plain path's.

    Args:
        causal_lm: a keras-hub Gemma / Gemma 3 CausalLM.
        chunk_tokens: tokens per cross-entropy chunk (0 = all at once).
    """

    def __init__(self, causal_lm, chunk_tokens=0, **kwargs):
        super().__init__(**kwargs)
        self.causal_lm = causal_lm
        self.chunk_tokens = int(chunk_tokens)
        self.built = causal_lm.built  # every variable is the CausalLM's, already created

    def call(self, inputs, training=False):
        import jax.numpy as jnp

        backbone = self.causal_lm.backbone
        hidden = backbone({"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]}, training=training)
        positions = inputs["loss_positions"]
        batch, capacity = positions.shape
        gathered = jnp.take_along_axis(hidden, positions[:, :, None], axis=1)
        targets = jnp.take_along_axis(inputs["targets"], positions, axis=1)
        nll, correct = head_nll(
            gathered.reshape(batch * capacity, -1), targets.reshape(-1),
            lambda states: backbone.token_embedding(states, reverse=True), self.chunk_tokens,
        )
        values = jnp.stack([nll, correct], axis=-1).reshape(batch, capacity, 2)
        rows = jnp.arange(batch)[:, None]
        return jnp.zeros(hidden.shape[:2] + (2,), jnp.float32).at[rows, positions].set(values)


@keras.saving.register_keras_serializable(package="keras_tune")
class PositionNll(keras.losses.Loss):
    """The loss of `SparseLossModel`: its per-position NLL (the targets are already in).

    The default reduction is the plain path's: the mean over weighted positions.

    Args:
        name: the loss's name.
        reduction: a keras reduction.
    """

    def __init__(self, name="position_nll", reduction="mean_with_sample_weight", **kwargs):
        super().__init__(name=name, reduction=reduction, **kwargs)

    def call(self, y_true, y_pred):
        return y_pred[..., 0]


@keras.saving.register_keras_serializable(package="keras_tune")
class NllPerplexity(keras.metrics.Metric):
    """exp of the weighted mean NLL over everything seen: keras-hub's `Perplexity`, from NLLs.

    Args:
        name: the metric's name.
    """

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="total")
        self.weight = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="weight")

    def update_state(self, y_true, y_pred, sample_weight=None):
        weights = keras.ops.ones_like(y_pred[..., 0]) if sample_weight is None else sample_weight
        weights = keras.ops.cast(weights, "float32")
        self.total.assign_add(keras.ops.sum(y_pred[..., 0] * weights))
        self.weight.assign_add(keras.ops.sum(weights))

    def result(self):
        return keras.ops.exp(keras.ops.divide_no_nan(self.total, self.weight))


def position_accuracy(y_true, y_pred):
    """Whether the argmax at each position was the target (1.0) or not (0.0)."""
    return y_pred[..., 1]

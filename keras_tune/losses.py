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

The head is the model's tied embedding table (`TiedHead`) with keras-hub's
formulas for Gemma 2's final soft-cap, reverse dtypes and Keras' int8 scales,
contracting the table's own last axis (keras-hub's transpose makes CPU XLA keep a
transposed copy of the table). A float table is not split by vocabulary: one
chunk of tokens against the whole vocabulary is a single large matmul, which is
what CPUs and accelerators run best, and the chunk size already bounds the
memory. An int8 table is: converting it to float whole would hold a float copy,
so blocks of its rows are converted in turn, with an online log-sum-exp. Other
heads (int4) go through keras-hub's `token_embedding(reverse=True)`.
Alternatives looked at: tokamax's `linear_softmax_cross_entropy_loss` (no
soft-cap, no weights), `jax-cce`, and Levanter's fused cross-entropy (part of
Levanter's model code); a `lax.map` under `jax.checkpoint` is short, exact and
runs on every backend.

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


# Vocabulary rows a block when the head's table is int8: converting the whole
# table to float for the matmul would hold a float copy of it (671 MB on the 270M).
QUANTIZED_VOCABULARY_BLOCK = 32768


class TiedHead:
    """The output head of a tied keras-hub `ReversibleEmbedding`, without keras-hub's transpose.

    keras-hub computes `hidden @ transpose(table)`. Inside a loop over token
    chunks CPU XLA hoists that transpose out of the loop and keeps a transposed
    copy of the table (671 MB on the 270M); contracting the table's own last
    axis needs no copy. An int8 table (`--quantize int8`) is used one block of
    `QUANTIZED_VOCABULARY_BLOCK` rows at a time, converted to float inside the
    block, with an online log-sum-exp across blocks. Soft-cap, `reverse_dtype`
    and the int8 scales are keras-hub's and Keras' own formulas.

    Args:
        embedding: a tied, float or int8, `ReversibleEmbedding`.
    """

    def __init__(self, embedding):
        self.embedding = embedding
        self.quantized = embedding.quantization_mode == "int8"
        self.soft_cap = getattr(embedding, "logit_soft_cap", None)
        self.reverse_dtype = getattr(embedding, "reverse_dtype", None)

    @staticmethod
    def supports(embedding):
        """Whether `embedding` is a head `TiedHead` computes (else use the layer itself)."""
        return bool(getattr(embedding, "tie_weights", False)) and embedding.quantization_mode in (None, "int8")

    def block_rows(self):
        """Vocabulary rows a block: the whole vocabulary for a float table."""
        vocabulary = self.embedding.input_dim
        if not self.quantized:
            return vocabulary
        # The largest divisor of the vocabulary up to the block size, so the table is
        # reshaped into blocks, not padded (a copy); a vocabulary with no divisor near
        # the block size is converted whole.
        rows = next(r for r in range(min(QUANTIZED_VOCABULARY_BLOCK, vocabulary), 0, -1) if vocabulary % r == 0)
        return rows if rows >= min(vocabulary, QUANTIZED_VOCABULARY_BLOCK // 8) else vocabulary

    def tables(self):
        """`(table, scale)` as the step sees them (scale is None for a float table)."""
        # The step's current values (Keras' stateless scope), LoRA on the embedding included.
        table = keras.ops.convert_to_tensor(self.embedding.embeddings)
        if not self.quantized:
            return table, None
        return table, keras.ops.convert_to_tensor(self.embedding.embeddings_scale)

    def logits(self, states, table, scale):
        """float32 `[tokens, rows]` logits of `states` against `rows` rows of the table."""
        import jax
        import jax.numpy as jnp

        if scale is None and self.reverse_dtype is not None:
            states, table = states.astype(self.reverse_dtype), table.astype(self.reverse_dtype)
        table = table.astype(states.dtype)  # an int8 block: converted here, one block at a time
        logits = jax.lax.dot_general(states, table, (((1,), (1,)), ((), ())))
        if scale is not None:
            logits = logits.astype(self.embedding.compute_dtype) / scale
        if self.soft_cap is not None:
            logits = jnp.tanh(logits / self.soft_cap) * self.soft_cap
        return logits.astype(jnp.float32)


def _nll_from_logits(logits, ids):
    """`(nll, correct)` of `ids` under full-vocabulary float32 `logits`."""
    import jax
    import jax.numpy as jnp

    picked = jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return nll, (jnp.argmax(logits, axis=-1) == ids).astype(jnp.float32)


def _float_table_nll(head):
    """`(states, table, ids) -> (nll, correct)` for a float table, with a hand-written gradient.

    Autodiff of log-sum-exp and of the picked logit keeps four or five
    `[tokens, vocabulary]` buffers alive in the backward pass (logits, their
    exponentials, the softmax, a scattered one-hot, their difference). The
    gradient is `softmax - one_hot` (through the soft-cap's derivative), so the
    backward pass recomputes the logits and builds that in one buffer.
    """
    import jax
    import jax.numpy as jnp

    def capped(raw):
        return raw if head.soft_cap is None else jnp.tanh(raw / head.soft_cap) * head.soft_cap

    def raw_logits(states, table):
        if head.reverse_dtype is not None:
            states, table = states.astype(head.reverse_dtype), table.astype(head.reverse_dtype)
        return jax.lax.dot_general(states, table, (((1,), (1,)), ((), ()))).astype(jnp.float32)

    @jax.custom_vjp
    def nll_and_correct(states, table, ids):
        return _nll_from_logits(capped(raw_logits(states, table)), ids)

    def forward(states, table, ids):
        logits = capped(raw_logits(states, table))
        log_total = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, axis=-1) == ids).astype(jnp.float32)
        return (log_total - picked, correct), (states, table, ids, log_total)

    def backward(residuals, cotangents):
        states, table, ids, log_total = residuals
        upstream = cotangents[0][:, None]
        logits = capped(raw_logits(states, table))
        one_hot = jnp.arange(logits.shape[-1])[None, :] == ids[:, None]
        grad = (jnp.exp(logits - log_total[:, None]) - one_hot) * upstream
        if head.soft_cap is not None:  # d(c tanh(z/c))/dz = 1 - tanh^2
            grad = grad * (1.0 - jnp.square(logits / head.soft_cap))
        dtype = head.reverse_dtype or states.dtype
        grad = grad.astype(dtype)
        d_states = jnp.dot(grad, table.astype(dtype)).astype(states.dtype)
        d_table = jax.lax.dot_general(grad, states.astype(dtype), (((0,), (0,)), ((), ()))).astype(table.dtype)
        return d_states, d_table, None  # unused (a frozen table): XLA drops d_table

    nll_and_correct.defvjp(forward, backward)
    return nll_and_correct


def _nll_by_vocabulary_block(states, ids, head, table, scale, rows):
    """`(nll, correct)` with an online log-sum-exp over blocks of `rows` vocabulary rows."""
    import jax
    import jax.numpy as jnp

    blocks = table.shape[0] // rows

    @jax.checkpoint  # the backward pass recomputes a block's logits instead of keeping them
    def one_block(carry, block):
        peak, total, picked, best, best_id = carry
        block_table, block_scale, index = block
        logits = head.logits(states, block_table, block_scale)
        block_peak = jnp.maximum(peak, logits.max(axis=-1))
        total = total * jnp.exp(peak - block_peak) + jnp.exp(logits - block_peak[:, None]).sum(axis=-1)
        local = ids - index * rows
        inside = (local >= 0) & (local < rows)
        target = jnp.take_along_axis(logits, jnp.clip(local, 0, rows - 1)[:, None], axis=-1)[:, 0]
        block_best = logits.max(axis=-1)
        better = block_best > best  # strict: the first maximum wins, as in argmax
        best_id = jnp.where(better, jnp.argmax(logits, axis=-1) + index * rows, best_id)
        carry = (block_peak, total, jnp.where(inside, target, picked), jnp.maximum(best, block_best), best_id)
        return carry, None

    count = states.shape[0]
    start = (jnp.full((count,), -jnp.inf), jnp.zeros((count,)), jnp.zeros((count,)),
             jnp.full((count,), -jnp.inf), jnp.zeros((count,), jnp.int32))
    blocked = (table.reshape(blocks, rows, -1), scale.reshape(blocks, rows), jnp.arange(blocks))
    (peak, total, picked, _, best_id), _ = jax.lax.scan(one_block, start, blocked)
    correct = jax.lax.stop_gradient((best_id == ids).astype(jnp.float32))
    return peak + jnp.log(total) - picked, correct


def head_nll(hidden, targets, head, chunk_tokens=0):
    """NLL and argmax-correctness of `targets` under `head(hidden)`, one token chunk at a time.

    Args:
        hidden: `[tokens, hidden_dim]` final hidden states.
        targets: `[tokens]` token ids.
        head: a `TiedHead`, or any `hidden -> logits` callable (soft-cap included).
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
    table = scale = rows = None
    if isinstance(head, TiedHead):
        table, scale = head.tables()
        rows = head.block_rows()

    def one_chunk(inputs):
        states, ids = inputs
        if not isinstance(head, TiedHead):
            nll, correct = _nll_from_logits(head(states).astype(jnp.float32), ids)
        elif scale is None:
            nll, correct = _float_table_nll(head)(states, table, ids)
        elif rows == table.shape[0]:
            nll, correct = _nll_from_logits(head.logits(states, table, scale), ids)
        else:
            nll, correct = _nll_by_vocabulary_block(states, ids, head, table, scale, rows)
        return nll, jax.lax.stop_gradient(correct)

    float_table = isinstance(head, TiedHead) and scale is None
    # The backward pass recomputes a chunk's logits instead of keeping them; the
    # float table's hand-written gradient already keeps none (a checkpoint around
    # it would run its forward matmul a second time).
    body = one_chunk if float_table else jax.checkpoint(one_chunk)
    shape = (padded // chunk, chunk)
    nll, correct = jax.lax.map(body, (hidden.reshape(*shape, -1), targets.reshape(shape)))
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
        embedding = backbone.token_embedding
        head = TiedHead(embedding) if TiedHead.supports(embedding) else (lambda s: embedding(s, reverse=True))
        nll, correct = head_nll(gathered.reshape(batch * capacity, -1), targets.reshape(-1), head, self.chunk_tokens)
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

"""The training loss: the output head only where the loss is, cross-entropy in chunks.

Gemma's output head is its embedding used in reverse: on the 270M it holds 168M
of 268M parameters, and its float32 logits take `vocabulary x 4` bytes a token
(1 GiB per 1,024 tokens), plus their gradient. keras-hub's plain path computes
them at every position, although translation and chat data carry loss on 15-50%
of the positions. With `train.loss = "sparse"` (the default):

1. the pipeline adds, per batch, each row's positions with the non-zero loss
   weights first (`loss_positions`) and the targets: `[batch, capacity]`,
   the capacity one of a few fixed fractions of the row (a compiled step
   each), or, with a quantized base, `[batch, length]` and the counts
   (`loss_counts`), the capacity then picked inside one compiled step;
2. `SparseLossModel` runs the backbone, gathers the hidden states at the
   first `capacity` positions of every row, and computes the head and the cross-entropy there only, in chunks
   of `train.loss_chunk_tokens` tokens and, within a chunk, blocks of
   vocabulary rows (`LOGITS_PER_BLOCK` logits) with an online log-sum-exp; the
   backward pass recomputes a block's logits instead of keeping them, so one
   block of `[tokens, rows]` logits exists at a time, forward or backward;
3. the per-position NLL (and whether the argmax was right) is scattered back to
   `[batch, length]`, so the loss (`mean_with_sample_weight` over the same
   weights), accuracy and perplexity are exactly the plain path's figures.

The head is the model's tied embedding table (`TiedHead`) with keras-hub's
formulas for Gemma 2's final soft-cap, reverse dtypes and Keras' int8 scales,
contracting the table's own last axis (keras-hub's transpose makes CPU XLA keep a
transposed copy of the table), and a hand-written gradient (`_table_nll`). An
int8 table is converted to float one block at a time. Other heads (int4) go
through keras-hub's `token_embedding(reverse=True)`, a chunk at a time under
`jax.checkpoint`. What this costs and saves, and the alternatives looked at, are
in BENCHMARKS.md ("The loss path").

Example:

```python
trainer = compile_training(causal_lm, config.train, keras_tune.build_optimizer(config.optimizer, total_steps=100))
bundle = with_loss_positions_for(bundle, config.train)   # adds each batch's loss positions
trainer.fit(bundle.train_stream(), steps_per_epoch=100)   # with causal_lm.preprocessor = None
```
"""

import keras

# Loss positions a row may hold, as fractions of the row: each batch's head runs
# at the smallest that fits (a compiled step each, or a branch of one: `add_loss_positions`).
CAPACITY_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
# The branches of one compiled step ("branched" batches, a quantized base:
# memory first). Each branch is a head of its own for XLA to compile, and the
# compile is such a run's peak: on the 270M with an int8 base it took the
# process ~410-480 MiB above the model with four branches, ~340-360 with these three.
BRANCH_FRACTIONS = (0.25, 0.5, 1.0)


def capacities(length, fractions=CAPACITY_FRACTIONS):
    """The loss-position capacities of rows of `length` positions (multiples of 8, ascending).

    Args:
        length: input positions a row.
        fractions: the capacities as fractions of the row (`CAPACITY_FRACTIONS`,
            or `BRANCH_FRACTIONS` for the branches of one step).
    """
    levels = {min(length, max(8, -(-int(length * f) // 8) * 8)) for f in fractions}
    return sorted(levels)


def _capacity_tf(length, fraction):
    """`capacities` for one fraction, in TF ops (bucketed batches have no static length)."""
    import tensorflow as tf

    eighths = tf.cast(tf.math.ceil(tf.cast(length, tf.float32) * fraction / 8.0), tf.int32) * 8
    return tf.minimum(length, tf.maximum(8, eighths))


# How a batch's loss positions reach the model (`add_loss_positions`).
SHAPED, BRANCHED, WHOLE_ROW = "shaped", "branched", "whole_row"


def _check_layout(layout):
    if layout not in (SHAPED, BRANCHED, WHOLE_ROW):
        raise ValueError(f"layout must be one of {SHAPED!r}, {BRANCHED!r}, {WHOLE_ROW!r}; got {layout!r}")


def add_loss_positions(x, y, sample_weight, layout=SHAPED):
    """A tf.data map: adds `loss_positions` and `targets` (and, branched, `loss_counts`) to a batch's inputs.

    Each row's positions whose weight is non-zero come first, in order, then
    distinct zero-weight positions (harmless: their weight is 0). The head
    runs at the smallest of `capacities(length)` that holds the batch's
    fullest row; how it gets there is `layout`:

    - "shaped": `loss_positions` is `[batch, capacity]`, so each capacity is a
      compiled step of its own (up to four a length);
    - "branched": `loss_positions` is `[batch, length]` and `loss_counts`
      (`[batch]`) says how many carry loss; the model picks the capacity (of
      `BRANCH_FRACTIONS`) in a `lax.switch`, one compiled step for all: it
      pays where memory comes first (a float32 step is slower; BENCHMARKS.md);
    - "whole_row": `loss_positions` is `[batch, length]` with no counts: the
      head runs at every position (data with loss nearly everywhere).

    Args:
        x: `{"token_ids", "padding_mask"}` of `[batch, length]`.
        y: the targets, `[batch, length]`.
        sample_weight: the loss weights, `[batch, length]`.
        layout: "shaped", "branched" or "whole_row".
    """
    import tensorflow as tf

    _check_layout(layout)
    length = tf.shape(x["token_ids"])[1]
    carries = tf.cast(sample_weight > 0, tf.int32)
    positions = tf.cast(tf.argsort(carries, axis=1, direction="DESCENDING", stable=True), tf.int32)
    extra = {"targets": tf.cast(y, tf.int32)}
    if layout == SHAPED:
        fullest = tf.reduce_max(tf.reduce_sum(carries, axis=1))
        levels = tf.stack([_capacity_tf(length, f) for f in CAPACITY_FRACTIONS])
        positions = positions[:, :tf.reduce_min(tf.boolean_mask(levels, levels >= fullest))]
    elif layout == BRANCHED:
        extra["loss_counts"] = tf.reduce_sum(carries, axis=1)
    return {**x, "loss_positions": positions, **extra}, y, sample_weight


def loss_positions_layout(loss_fraction, quantized):
    """The `add_loss_positions` layout for a run.

    Args:
        loss_fraction: the share of positions that carry loss (the data
            report's). Above the second-largest capacity (half a row), a
            batch's fullest row needs the whole row nearly always: "whole_row".
        quantized: the base is quantized (memory first): "branched", one
            compiled step instead of one a capacity (each holds ~150 MiB on the
            270M). Otherwise "shaped".
    """
    if loss_fraction > CAPACITY_FRACTIONS[-2]:
        return WHOLE_ROW
    return BRANCHED if quantized else SHAPED


def with_loss_positions(dataset, layout=SHAPED):
    """The batches of `dataset` with `loss_positions` and `targets` for `SparseLossModel`.

    Args:
        dataset: a tf.data.Dataset of `(x, y, sample_weight)` batches.
        layout: "shaped", "branched" or "whole_row" (`add_loss_positions`;
            `loss_positions_layout` picks one for a run).
    """
    import functools

    import tensorflow as tf

    _check_layout(layout)  # here too: inside the map, tf.data wraps the error in its trace
    return dataset.map(functools.partial(add_loss_positions, layout=layout), num_parallel_calls=tf.data.AUTOTUNE)


# Logits a block of the head holds: `[tokens, rows]` float32 (4 MiB), so a
# chunk of 256 tokens takes the table 4,096 rows at a time and a small chunk
# more rows (fewer, larger matmuls). An int8 table is converted to float one
# block at a time (whole, it would be a float copy: 671 MB on the 270M), and
# the converted block is held to the same size (1,024 rows on the 270M: a
# 64-token chunk's 16,384-row block took 40 MiB of float32).
LOGITS_PER_BLOCK = 1 << 20
# Fewest rows a block: a huge chunk still multiplies by blocks worth a matmul.
MIN_BLOCK_ROWS = 512
# A float table is taken whole while a chunk's logits stay under this (128 MiB
# of float32): on CPU every block is a copy of its rows (the matmul wants a
# contiguous operand), one read of the table a pass whatever the chunk, which
# small chunks cannot hide (270M, 32 tokens: a step 1.43 s in blocks, 1.15 s whole).
WHOLE_TABLE_LOGITS = 1 << 25


def vocabulary_block_rows(vocabulary, tokens, whole_when_small=False, converted_width=0):
    """Rows a block of a `vocabulary`-row table for a chunk of `tokens` tokens.

    The largest divisor of the vocabulary up to `LOGITS_PER_BLOCK / tokens`
    (at least `MIN_BLOCK_ROWS`), so the table is reshaped into blocks, not padded (a copy);
    a vocabulary with no divisor near that is taken whole.

    Args:
        vocabulary: rows of the table.
        tokens: tokens in a chunk.
        whole_when_small: take the table whole when the chunk's logits are at
            most `WHOLE_TABLE_LOGITS` (a table used as it is stored; one that
            is converted, int8 for one, is converted a block at a time).
        converted_width: the row width of a table whose blocks are converted
            (int8 to float, or a cast): the converted block, `rows x width`,
            is then held to `LOGITS_PER_BLOCK` elements as well (0: used as stored).
    """
    if whole_when_small and tokens * vocabulary <= WHOLE_TABLE_LOGITS:
        return vocabulary
    target = min(vocabulary, max(MIN_BLOCK_ROWS, LOGITS_PER_BLOCK // max(1, tokens)))
    if converted_width:
        target = min(target, max(MIN_BLOCK_ROWS, LOGITS_PER_BLOCK // converted_width))
    rows = next(r for r in range(target, 0, -1) if vocabulary % r == 0)
    return rows if rows >= target // 8 else vocabulary


class TiedHead:
    """The output head of a tied keras-hub `ReversibleEmbedding`, without keras-hub's transpose.

    keras-hub computes `hidden @ transpose(table)`. Inside a loop over token
    chunks CPU XLA hoists that transpose out of the loop and keeps a transposed
    copy of the table (671 MB on the 270M); contracting the table's own last
    axis needs no copy. The loss uses the table one block of
    `block_rows(tokens)` rows at a time (an int8 block converted to float
    inside it). Soft-cap, `reverse_dtype` and the int8 scales are keras-hub's
    and Keras' own formulas.

    Args:
        embedding: a tied, float or int8, `ReversibleEmbedding`.
    """

    def __init__(self, embedding):
        self.embedding = embedding
        self.quantized = embedding.quantization_mode == "int8"
        self.soft_cap = getattr(embedding, "logit_soft_cap", None)
        self.reverse_dtype = getattr(embedding, "reverse_dtype", None)
        # LoRA freezes the table (an int8 one never trains): the loss then needs
        # only the states' gradient, made in the forward sweep (`_table_nll`).
        # The table trains in full fine-tuning, or with LoRA factors of its own.
        self.table_gradient = not self.quantized and bool(embedding.trainable_variables)

    @staticmethod
    def supports(embedding):
        """Whether `embedding` is a head `TiedHead` computes (else use the layer itself)."""
        return bool(getattr(embedding, "tie_weights", False)) and embedding.quantization_mode in (None, "int8")

    def block_rows(self, tokens):
        """Vocabulary rows a block for a chunk of `tokens` tokens (`vocabulary_block_rows`)."""
        # Whole only when no block is converted (int8, or a cast to the compute or reverse dtype).
        stored = self.embedding.variable_dtype
        as_stored = not self.quantized and self.reverse_dtype in (None, stored) and self.embedding.compute_dtype == stored
        width = 0 if as_stored else self.embedding.output_dim
        return vocabulary_block_rows(self.embedding.input_dim, tokens, whole_when_small=as_stored, converted_width=width)

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


def _table_nll(head, rows):  # long: one custom VJP, its sweep and both backward passes
    """`(states, table, scale, ids) -> (nll, correct)` over the table in blocks of `rows` rows, with its own gradient.

    Forward: an online log-sum-exp, the target's logit and the running argmax
    across blocks, so one block of `[tokens, rows]` logits exists at a time.
    Autodiff of the same forward would keep four or five `[tokens, vocabulary]`
    buffers (logits, exponentials, softmax, a one-hot, their difference).

    Where the table trains (`head.table_gradient`: full fine-tuning, LoRA on
    the embedding) the backward pass recomputes each block's logits (`jax.vjp` of
    `head.logits`, so the soft-cap, casts and int8 scales are differentiated as
    keras-hub computes them) and pulls `softmax - one_hot` back through them
    into the states and the table: three head matmuls a step.

    Without it (a frozen or int8 table: LoRA) only the states need a gradient,
    `sum_v softmax_v * dlogit_v/dstates - dlogit_target/dstates`, and the
    forward pass makes it in the same sweep: each block's exponentials, relative
    to the running maximum, are pulled back into an accumulator that is
    rescaled whenever the maximum grows (as flash attention rescales its
    output), and the target's term comes from its own gathered rows. The
    residual is that `[tokens, hidden]` gradient; the backward pass only scales
    it by the upstream cotangent. Two head matmuls a step, the plain path's
    count, and the table is read (an int8 block converted) once instead of twice.

    Args:
        head: a `TiedHead`.
        rows: vocabulary rows a block (`TiedHead.block_rows`).
    """
    import jax
    import jax.numpy as jnp

    def blocks_of(table, scale):
        blocked_table = table.reshape(-1, rows, table.shape[-1])  # row-major: a reshape, no copy
        blocked_scale = None if scale is None else scale.reshape(-1, rows)
        return blocked_table, blocked_scale, jnp.arange(blocked_table.shape[0])

    def sweep(states, table, scale, ids, with_gradient):
        """One pass over the blocks: `(nll, correct, log_total, d_states per unit of nll or None)`."""

        def one_block(carry, block):
            peak, total, picked, best, best_id, accumulated = carry
            block_table, block_scale, index = block
            # Tied to the carry, a block's conversion (int8 or reverse_dtype) stays in
            # the loop: XLA would otherwise hoist it and convert the whole table at once.
            block_table, peak = jax.lax.optimization_barrier((block_table, peak))
            if with_gradient:
                logits, pull_back = jax.vjp(lambda s: head.logits(s, block_table, block_scale), states)
            else:
                logits = head.logits(states, block_table, block_scale)
            block_best = logits.max(axis=-1)
            block_peak = jnp.maximum(peak, block_best)
            rescale = jnp.exp(peak - block_peak)
            exponentials = jnp.exp(logits - block_peak[:, None])
            total = total * rescale + exponentials.sum(axis=-1)
            if with_gradient:
                (pulled,) = pull_back(exponentials)
                accumulated = accumulated * rescale[:, None] + pulled.astype(jnp.float32)
            local = ids - index * rows
            inside = (local >= 0) & (local < rows)
            target = jnp.take_along_axis(logits, jnp.clip(local, 0, rows - 1)[:, None], axis=-1)[:, 0]
            better = block_best > best  # strict: the first maximum wins, as in argmax
            best_id = jnp.where(better, jnp.argmax(logits, axis=-1) + index * rows, best_id)
            carry = (block_peak, total, jnp.where(inside, target, picked), jnp.maximum(best, block_best), best_id,
                     accumulated)
            return carry, None

        count = states.shape[0]
        start = (jnp.full((count,), -jnp.inf), jnp.zeros((count,)), jnp.zeros((count,)),
                 jnp.full((count,), -jnp.inf), jnp.zeros((count,), jnp.int32),
                 jnp.zeros(states.shape, jnp.float32) if with_gradient else None)
        (peak, total, picked, _, best_id, accumulated), _ = jax.lax.scan(one_block, start, blocks_of(table, scale))
        log_total = peak + jnp.log(total)
        d_states = None
        if with_gradient:
            d_states = accumulated / total[:, None] - _target_logit_gradient(head, states, table, scale, ids)
        return log_total - picked, (best_id == ids).astype(jnp.float32), log_total, d_states

    @jax.custom_vjp
    def nll_and_correct(states, table, scale, ids):
        nll, correct, _, _ = sweep(states, table, scale, ids, with_gradient=False)
        return nll, correct

    def forward(states, table, scale, ids):
        if not head.table_gradient:
            nll, correct, _, d_states = sweep(states, table, scale, ids, with_gradient=True)
            # A 0-d array carries the states' dtype into the backward pass.
            return (nll, correct), (d_states, jnp.zeros((), states.dtype), None, None, None)
        nll, correct, log_total, _ = sweep(states, table, scale, ids, with_gradient=False)
        return (nll, correct), (states, table, scale, ids, log_total)

    def backward(residuals, cotangents):
        upstream = cotangents[0][:, None]
        if not head.table_gradient:
            d_states, dtype_of_states = residuals[:2]
            return (d_states * upstream).astype(dtype_of_states.dtype), None, None, None
        states, table, scale, ids, log_total = residuals
        float_table = jnp.issubdtype(table.dtype, jnp.floating)

        def one_block(d_states, block):
            block_table, block_scale, index = block
            block_table, d_states = jax.lax.optimization_barrier((block_table, d_states))  # as in the forward
            if float_table:
                logits, pull_back = jax.vjp(lambda s, t: head.logits(s, t, block_scale), states, block_table)
            else:  # an int8 table has no gradient
                logits, pull_back = jax.vjp(lambda s: head.logits(s, block_table, block_scale), states)
            one_hot = jnp.arange(rows)[None, :] == (ids - index * rows)[:, None]
            grads = pull_back((jnp.exp(logits - log_total[:, None]) - one_hot) * upstream)
            return d_states + grads[0].astype(d_states.dtype), grads[1] if float_table else None

        d_states, d_table = jax.lax.scan(one_block, jnp.zeros(states.shape, jnp.float32), blocks_of(table, scale))
        d_table = d_table.reshape(table.shape) if float_table else None  # unused for a frozen table: XLA drops it
        return d_states.astype(states.dtype), d_table, None, None

    nll_and_correct.defvjp(forward, backward)
    return nll_and_correct


def _target_logit_gradient(head, states, table, scale, ids):
    """float32 `d logit(ids) / d states`, `[tokens, hidden]`: each token against its own target row only."""
    import jax
    import jax.numpy as jnp

    target_rows = jnp.take(table, ids, axis=0)
    target_scales = None if scale is None else jnp.take(scale, ids, axis=0)

    def target_logit(state, row, row_scale):
        row_scale = None if row_scale is None else row_scale[None]
        return head.logits(state[None], row[None], row_scale)[0, 0]

    return jax.vmap(jax.grad(target_logit), in_axes=(0, 0, None if scale is None else 0))(
        states, target_rows, target_scales
    ).astype(jnp.float32)


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
        rows = head.block_rows(chunk)

    def one_chunk(inputs):
        states, ids = inputs
        if isinstance(head, TiedHead):
            nll, correct = _table_nll(head, rows)(states, table, scale, ids)
        else:
            nll, correct = _nll_from_logits(head(states).astype(jnp.float32), ids)
        return nll, jax.lax.stop_gradient(correct)

    # The backward pass recomputes a chunk's logits instead of keeping them; the
    # tied head's own gradient already keeps none (a checkpoint around it would
    # run its forward matmul a second time).
    body = one_chunk if isinstance(head, TiedHead) else jax.checkpoint(one_chunk)
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
        import jax
        import jax.numpy as jnp

        backbone = self.causal_lm.backbone
        hidden = backbone({"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]}, training=training)
        # A backbone's own per-step figures (Gemma 4's expert load), from the call just made.
        statistics = getattr(backbone, "step_statistics", lambda: None)()
        positions = inputs["loss_positions"]
        embedding = backbone.token_embedding
        head = TiedHead(embedding) if TiedHead.supports(embedding) else (lambda s: embedding(s, reverse=True))
        counts = inputs.get("loss_counts")
        levels = capacities(positions.shape[1], BRANCH_FRACTIONS) if counts is not None else [positions.shape[1]]

        def at_capacity(capacity):
            def head_at_positions(hidden, positions, all_targets):
                kept = positions[:, :capacity]
                batch = kept.shape[0]
                gathered = jnp.take_along_axis(hidden, kept[:, :, None], axis=1)
                targets = jnp.take_along_axis(all_targets, kept, axis=1)
                nll, correct = head_nll(gathered.reshape(batch * capacity, -1), targets.reshape(-1), head, self.chunk_tokens)
                values = jnp.stack([nll, correct], axis=-1).reshape(batch, capacity, 2)
                rows = jnp.arange(batch)[:, None]
                return jnp.zeros(hidden.shape[:2] + (2,), jnp.float32).at[rows, kept].set(values)

            return head_at_positions

        operands = (hidden, positions, inputs["targets"])
        if len(levels) == 1:
            return with_statistics(at_capacity(levels[0])(*operands), statistics)
        # One compiled step for every capacity ("branched" batches): the batch's
        # fullest row picks a branch at run time.
        level = jnp.sum(jnp.asarray(levels) < jnp.max(counts))
        return with_statistics(jax.lax.switch(level, [at_capacity(c) for c in levels], *operands), statistics)


def with_statistics(per_position, statistics):
    """`SparseLossModel`'s output with a backbone's per-step statistics as channels 2, 3, ... at every position.

    Its metrics (`backbone.statistics_metrics(2)`) read them back; the loss and
    accuracy read channels 0 and 1 as before.

    Args:
        per_position: `[batch, length, 2]` NLL and correctness.
        statistics: a float32 vector of the step's statistics, or None.
    """
    if statistics is None:
        return per_position
    import jax.numpy as jnp

    extra = jnp.broadcast_to(statistics.astype(jnp.float32), per_position.shape[:2] + statistics.shape)
    return jnp.concatenate([per_position, extra], axis=-1)


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


def compile_training(causal_lm, train_config, optimizer):
    """Compiles the model `fit` trains: the token-mean loss, accuracy, perplexity and token counts.

    The loss is the mean over target tokens (sample weights), so exp(loss) is a
    perplexity; the perplexity metric is exact over a whole evaluation
    (token-weighted, not a mean of batch means); `step_loss` is each batch's own
    loss (`keras_tune.metrics.StepLoss`), what `metrics.csv` logs. With `train.loss = "sparse"` the
    model is a `SparseLossModel` around the CausalLM (same variables, same
    figures, logits only where the loss is); with "full", the CausalLM itself
    (keras-hub's plain path). The CausalLM keeps a greedy sampler for samples.

    Args:
        causal_lm: the run's CausalLM (LoRA already applied).
        train_config: the `train` section of the run config (`loss`, `loss_chunk_tokens`).
        optimizer: a Keras optimizer (`keras_tune.optim.build_optimizer`); built here.

    Returns:
        The model to `fit` and `evaluate`: the CausalLM, or its `SparseLossModel`.
    """
    import keras_hub

    from keras_tune.metrics import StepLoss, TokenCount

    pad_id = int(causal_lm.preprocessor.tokenizer.pad_token_id)
    counts = [TokenCount(pad_id), TokenCount(pad_id, non_pad=True)]
    if train_config.loss == "sparse":
        causal_lm.compile(sampler="greedy")  # for samples; the trainer below does the training
        trainer = SparseLossModel(causal_lm, train_config.loss_chunk_tokens)
        trainer.compile(
            optimizer=optimizer,
            loss=PositionNll(),
            weighted_metrics=[
                keras.metrics.MeanMetricWrapper(position_accuracy, name="accuracy"),
                NllPerplexity(name="perplexity"),
                StepLoss(),
            ],
            # A backbone with per-step statistics (Gemma 4's expert load) reports them too.
            metrics=counts + list(getattr(causal_lm.backbone, "statistics_metrics", lambda channel: [])(2)),
        )
    else:
        trainer = causal_lm
        causal_lm.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
            weighted_metrics=[
                keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                keras_hub.metrics.Perplexity(from_logits=True, name="perplexity"),
                StepLoss(from_logits=True),
            ],
            metrics=counts,
            sampler="greedy",
        )
    optimizer.build(trainer.trainable_variables)
    return trainer


def with_loss_positions_for(data, train_config):
    """A run's batches as its loss needs them: with "sparse", each batch gets its loss positions.

    Train, validation and every training stream of the bundle alike, in the
    layout `loss_positions_layout` picks from the data report and the base.

    Args:
        data: a `keras_tune.data.DataBundle`.
        train_config: the `train` section of the run config (`loss`, `quantize`).

    Returns:
        The bundle (mapped in place).
    """
    import functools

    if train_config.loss == "sparse":
        layout = loss_positions_layout(data.report.loss_fraction, quantized=bool(train_config.quantize))
        data.map(functools.partial(with_loss_positions, layout=layout))
    return data

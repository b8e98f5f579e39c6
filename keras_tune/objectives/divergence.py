"""Divergences between a teacher's and a student's next-token distributions, a vocabulary block at a time.

Distillation compares two `[tokens, vocabulary]` distributions at every loss
position: on Gemma 3 (262,144 entries) at batch 8 x 1,024 two float32 logit
tensors alone are 16 GiB. As keras_tune's sparse cross-entropy does
(`keras_tune.losses._table_nll`), both heads are applied to the table one
block of vocabulary rows at a time (`TiedHead.logits`: soft-cap, int8 scales,
reverse dtypes as keras-hub computes them), and the sums a divergence needs are
kept with an online log-sum-exp:

- forward KL, `KL(p_t || p_s) = sum_v p_t (t - s) - lse_t + lse_s`: one sweep
  keeping both running maxima, both running totals and `sum e^(t - max_t) (t - s)`;
- reverse KL, `KL(p_s || p_t)`: the same with the roles swapped;
- generalized JSD of weight beta, `beta KL(p_t || m) + (1 - beta) KL(p_s || m)`
  with `m = beta p_t + (1 - beta) p_s`: a first sweep for both log-sum-exps, a
  second for the two KL terms against the mixture.

Logits are divided by the temperature first. The gradient is written by hand
(`jax.custom_vjp`): the backward pass recomputes each block's logits and pulls
`d divergence / d student logits` back through the student's head only, into
its hidden states (and its table where that trains):

| divergence | d D / d z_s (z = logits / T) |
| --- | --- |
| forward KL | `p_s - p_t` |
| reverse KL | `p_s (log p_s - log p_t - D)` |
| JSD | `(1 - beta) p_s (log p_s - log m - KL(p_s || m))` |

So one block of `[tokens, rows]` logits (a student's and a teacher's) exists at
a time, forward or backward; the teacher is never differentiated.

Example:

```python
settings = Divergence("forward_kl", temperature=2.0)
per_token = head_divergence(student_states, teacher_states, TiedHead(student_embedding),
                            TiedHead(teacher_embedding), settings, chunk_tokens=1024)
```
"""

import dataclasses
import math

from keras_tune import losses


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Which divergence, at which temperature.

    Attributes:
        kind: "forward_kl", "reverse_kl" or "jsd".
        temperature: both distributions are `softmax(logits / temperature)`.
        beta: the JSD's mixture weight of the teacher, strictly inside (0, 1).
    """

    kind: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5


def divergence_from_logits(student_logits, teacher_logits, settings):
    """The per-token divergence of full `[tokens, vocabulary]` logits (float32): the plain computation.

    What the blockwise sweep computes without blocks; the `train.loss=full`
    path and heads that are not a tied table (int4) use it.

    Args:
        student_logits: the student's logits.
        teacher_logits: the teacher's logits (no gradient is taken through them).
        settings: a `Divergence`.
    """
    import jax
    import jax.numpy as jnp

    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / settings.temperature, axis=-1)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / settings.temperature,
                                 axis=-1)
    if settings.kind == "forward_kl":
        return jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    if settings.kind == "reverse_kl":
        return jnp.sum(jnp.exp(student) * (student - teacher), axis=-1)
    beta = settings.beta
    mixture = jnp.logaddexp(math.log(beta) + teacher, math.log(1.0 - beta) + student)
    return (beta * jnp.sum(jnp.exp(teacher) * (teacher - mixture), axis=-1)
            + (1.0 - beta) * jnp.sum(jnp.exp(student) * (student - mixture), axis=-1))


def _table_divergence(student_head, teacher_head, rows, settings):  # long: one custom VJP, its sweeps and backward
    """`(s_states, s_table, s_scale, t_states, t_table, t_scale) -> divergence [tokens]`, in blocks of `rows` rows.

    Args:
        student_head: the student's `losses.TiedHead`.
        teacher_head: the teacher's `losses.TiedHead` (frozen).
        rows: vocabulary rows a block (a divisor of the vocabulary).
        settings: a `Divergence`.
    """
    import jax
    import jax.numpy as jnp

    kind, inverse_t = settings.kind, 1.0 / settings.temperature
    log_beta, log_rest = (math.log(settings.beta), math.log(1.0 - settings.beta)) if kind == "jsd" else (0.0, 0.0)

    def blocks_of(table, scale):
        blocked = table.reshape(-1, rows, table.shape[-1])  # row-major: a reshape, no copy
        return blocked, None if scale is None else scale.reshape(-1, rows)

    def both_blocks(operands):
        s_table, s_scale, t_table, t_scale = operands
        s_blocks, s_scales = blocks_of(s_table, s_scale)
        t_blocks, t_scales = blocks_of(t_table, t_scale)
        return s_blocks, s_scales, t_blocks, t_scales

    def teacher_logits(t_states, block, scale):
        return teacher_head.logits(t_states, block, scale) * inverse_t

    def log_sum_exps_and_sum(s_states, s_table, s_scale, t_states, t_table, t_scale):
        """One sweep: both log-sum-exps and `sum e^(a - max_a) (a - b)` of the KL's leading side."""

        def one_block(carry, block):
            s_peak, s_total, t_peak, t_total, weighted = carry
            s_block, s_bscale, t_block, t_bscale = block
            # Tied to the carry, a block's conversion (int8, a cast) stays in the loop (as in `_table_nll`).
            s_block, t_block, s_peak = jax.lax.optimization_barrier((s_block, t_block, s_peak))
            s = student_head.logits(s_states, s_block, s_bscale) * inverse_t
            t = teacher_logits(t_states, t_block, t_bscale)
            new_s, new_t = jnp.maximum(s_peak, s.max(axis=-1)), jnp.maximum(t_peak, t.max(axis=-1))
            s_exp, t_exp = jnp.exp(s - new_s[:, None]), jnp.exp(t - new_t[:, None])
            s_total = s_total * jnp.exp(s_peak - new_s) + s_exp.sum(axis=-1)
            t_total = t_total * jnp.exp(t_peak - new_t) + t_exp.sum(axis=-1)
            if kind == "forward_kl":
                weighted = weighted * jnp.exp(t_peak - new_t) + (t_exp * (t - s)).sum(axis=-1)
            elif kind == "reverse_kl":
                weighted = weighted * jnp.exp(s_peak - new_s) + (s_exp * (s - t)).sum(axis=-1)
            return (new_s, s_total, new_t, t_total, weighted), None

        count = s_states.shape[0]
        start = (jnp.full((count,), -jnp.inf), jnp.zeros((count,)), jnp.full((count,), -jnp.inf), jnp.zeros((count,)),
                 jnp.zeros((count,)))
        blocks = both_blocks((s_table, s_scale, t_table, t_scale))
        (s_peak, s_total, t_peak, t_total, weighted), _ = jax.lax.scan(one_block, start, blocks)
        return s_peak + jnp.log(s_total), t_peak + jnp.log(t_total), weighted, s_total, t_total

    def mixture_terms(s_states, s_table, s_scale, t_states, t_table, t_scale, s_lse, t_lse):  # many: a sweep's operands
        """JSD's second sweep: `(KL(p_t || m), KL(p_s || m))` with both log-sum-exps known."""

        def one_block(carry, block):
            teacher_side, student_side = carry
            s_block, s_bscale, t_block, t_bscale = block
            s_block, t_block, teacher_side = jax.lax.optimization_barrier((s_block, t_block, teacher_side))
            s = student_head.logits(s_states, s_block, s_bscale) * inverse_t - s_lse[:, None]
            t = teacher_logits(t_states, t_block, t_bscale) - t_lse[:, None]
            mixture = jnp.logaddexp(log_beta + t, log_rest + s)
            teacher_side = teacher_side + (jnp.exp(t) * (t - mixture)).sum(axis=-1)
            student_side = student_side + (jnp.exp(s) * (s - mixture)).sum(axis=-1)
            return (teacher_side, student_side), None

        count = s_states.shape[0]
        blocks = both_blocks((s_table, s_scale, t_table, t_scale))
        (teacher_side, student_side), _ = jax.lax.scan(one_block, (jnp.zeros((count,)), jnp.zeros((count,))), blocks)
        return teacher_side, student_side

    def forward_values(s_states, s_table, s_scale, t_states, t_table, t_scale):
        s_lse, t_lse, weighted, s_total, t_total = log_sum_exps_and_sum(s_states, s_table, s_scale, t_states,
                                                                        t_table, t_scale)
        if kind == "forward_kl":
            return weighted / t_total - t_lse + s_lse, s_lse, t_lse, None
        if kind == "reverse_kl":
            return weighted / s_total - s_lse + t_lse, s_lse, t_lse, None
        teacher_side, student_side = mixture_terms(s_states, s_table, s_scale, t_states, t_table, t_scale, s_lse, t_lse)
        return settings.beta * teacher_side + (1.0 - settings.beta) * student_side, s_lse, t_lse, student_side

    @jax.custom_vjp
    def divergence(s_states, s_table, s_scale, t_states, t_table, t_scale):
        return forward_values(s_states, s_table, s_scale, t_states, t_table, t_scale)[0]

    def forward(s_states, s_table, s_scale, t_states, t_table, t_scale):
        value, s_lse, t_lse, student_side = forward_values(s_states, s_table, s_scale, t_states, t_table, t_scale)
        return value, (s_states, s_table, s_scale, t_states, t_table, t_scale, s_lse, t_lse, value, student_side)

    def backward(residuals, upstream):
        s_states, s_table, s_scale, t_states, t_table, t_scale, s_lse, t_lse, value, student_side = residuals
        table_gradient = student_head.table_gradient and jnp.issubdtype(s_table.dtype, jnp.floating)

        def one_block(d_states, block):
            s_block, s_bscale, t_block, t_bscale = block
            s_block, t_block, d_states = jax.lax.optimization_barrier((s_block, t_block, d_states))
            if table_gradient:
                s, pull_back = jax.vjp(lambda st, tb: student_head.logits(st, tb, s_bscale) * inverse_t,
                                       s_states, s_block)
            else:
                s, pull_back = jax.vjp(lambda st: student_head.logits(st, s_block, s_bscale) * inverse_t, s_states)
            log_s = s - s_lse[:, None]
            log_t = teacher_logits(t_states, t_block, t_bscale) - t_lse[:, None]
            p_s = jnp.exp(log_s)
            if kind == "forward_kl":
                grad = p_s - jnp.exp(log_t)
            elif kind == "reverse_kl":
                grad = p_s * (log_s - log_t - value[:, None])
            else:
                mixture = jnp.logaddexp(log_beta + log_t, log_rest + log_s)
                grad = (1.0 - settings.beta) * p_s * (log_s - mixture - student_side[:, None])
            grads = pull_back(grad * upstream[:, None])
            return d_states + grads[0].astype(jnp.float32), grads[1] if table_gradient else None

        blocks = both_blocks((s_table, s_scale, t_table, t_scale))
        d_states, d_table = jax.lax.scan(one_block, jnp.zeros(s_states.shape, jnp.float32), blocks)
        d_table = d_table.reshape(s_table.shape).astype(s_table.dtype) if table_gradient else None
        return d_states.astype(s_states.dtype), d_table, None, None, None, None

    divergence.defvjp(forward, backward)
    return divergence


def block_rows(student_head, teacher_head, tokens):
    """Vocabulary rows a block for both heads: the smaller of their `TiedHead.block_rows` (both divide the vocabulary).

    Args:
        student_head: the student's `TiedHead`.
        teacher_head: the teacher's `TiedHead`.
        tokens: tokens in a chunk.
    """
    return min(student_head.block_rows(tokens), teacher_head.block_rows(tokens))


def head_divergence(student_states, teacher_states, student_head, teacher_head, settings, chunk_tokens=0):
    """The per-token divergence of the student's distribution from the teacher's, a token chunk at a time.

    Args:
        student_states: `[tokens, hidden]` final hidden states of the student.
        teacher_states: `[tokens, teacher hidden]` the teacher's at the same positions.
        student_head: a `losses.TiedHead`, or any `hidden -> logits` callable.
        teacher_head: the same for the teacher.
        settings: a `Divergence`.
        chunk_tokens: tokens a chunk (0 or >= tokens: one chunk).

    Returns:
        float32 `[tokens]`.
    """
    import jax
    import jax.numpy as jnp

    teacher_states = jax.lax.stop_gradient(teacher_states)
    count = student_states.shape[0]
    chunk = count if not chunk_tokens or chunk_tokens >= count else int(chunk_tokens)
    padded = -(-count // chunk) * chunk
    if padded != count:
        student_states = jnp.pad(student_states, ((0, padded - count), (0, 0)))
        teacher_states = jnp.pad(teacher_states, ((0, padded - count), (0, 0)))
    tied = isinstance(student_head, losses.TiedHead) and isinstance(teacher_head, losses.TiedHead)
    if tied:
        s_table, s_scale = student_head.tables()
        t_table, t_scale = teacher_head.tables()
        sweep = _table_divergence(student_head, teacher_head, block_rows(student_head, teacher_head, chunk), settings)

    def one_chunk(inputs):
        s_states, t_states = inputs
        if tied:
            return sweep(s_states, s_table, s_scale, t_states, jax.lax.stop_gradient(t_table), t_scale)
        return divergence_from_logits(student_head(s_states), teacher_head(t_states), settings)

    # The tied heads' own gradient keeps no logits; a plain head's chunk is recomputed in the backward pass.
    body = one_chunk if tied else jax.checkpoint(one_chunk)
    shape = (padded // chunk, chunk)
    values = jax.lax.map(body, (student_states.reshape(*shape, -1), teacher_states.reshape(*shape, -1)))
    return values.reshape(-1)[:count]

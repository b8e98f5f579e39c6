"""Bytes a training step keeps between its forward and backward pass, block by block, on one device.

Derived op by op from the blocks' computation (see `keras_tune.memory` for the
table of what each op keeps); every function takes `ModelShapes` already
divided over the mesh's model axis.
"""




def _norms(shapes, tokens, compute_bytes, projections=("query", "key", "value"), split="residual"):
    """The RMSNorms: each keeps its input and 1/rms; a trained scale also needs x/rms.

    The norm computes in float32, but XLA keeps its input in the compute dtype
    and fuses the cast into the backward pass. `projections` read the first
    norm's output (`split` names how that input is split).
    """
    s, width, a = shapes, shapes.hidden, compute_bytes
    inputs = [s.splits["residual"]] * 2  # the block input and attention + x
    if s.post_norms:
        inputs += [s.splits["attention_output"], s.splits["ffw_output"]]
    kept = sum(tokens * width * a // split for split in inputs) + len(inputs) * tokens * 4
    if "norm" in s.trained:
        kept += sum(tokens * width * a // split for split in inputs)
    # The normed inputs of the q/k/v (or linear_x/y) and gate/up projections, where those train.
    if s.trained & set(projections):
        kept += tokens * width * a // s.splits[split]
    if s.trained & {"ffw_gating", "ffw_gating_2"}:
        kept += tokens * width * a // s.splits["ffw_input"]
    return kept


def block_activations(shapes, batch, seq, compute_bytes):
    """Bytes one decoder block keeps for its backward pass, on one device (see the module docstring).

    Args:
        shapes: `ModelShapes` (already divided over the model axis).
        batch: sequences on this device.
        seq: tokens a sequence.
        compute_bytes: bytes of an activation element (4 float32, 2 bfloat16).
    """
    s, a = shapes, compute_bytes
    tokens = batch * seq
    query = tokens * s.heads * s.head_dim * a
    key_value = tokens * s.kv_heads * s.head_dim * a
    kept = _norms(s, tokens, a)
    if s.qk_norm:  # Gemma 3's q/k norms: their inputs and 1/rms
        kept += query + key_value + tokens * (s.heads + s.kv_heads) * 4
    if s.value_norm:  # Gemma 4's parameter-free value norm: its input and 1/rms
        kept += key_value + tokens * s.kv_heads * 4
    # q and k for q.k^T, v for probabilities.v (a block that reuses an earlier
    # block's keys and values, kv_heads 0 here, keeps only its queries).
    kept += query + 2 * key_value
    # Scores: the float32 exp of the masked softmax, the probabilities in the
    # compute dtype, the soft cap's tanh; the mask, one byte a query-key pair.
    scores = batch * s.heads * seq * seq
    kept += scores * (4 + a + (a if s.attention_soft_cap else 0)) + batch * seq * seq
    if "attention_output" in s.trained:
        kept += query
    # tanh-GELU(gate) * up: the gate and up outputs, the tanh and the GELU.
    kept += 4 * tokens * s.ffw * a
    if "ffw_linear" in s.trained:
        kept += tokens * s.ffw * a
    return kept + expert_activations(s, tokens, a) + per_layer_input_activations(s, tokens, a)


def expert_activations(shapes, tokens, compute_bytes):
    """Bytes a Gemma 4 mixture-of-experts path keeps (0 without experts), on one device.

    What JAX saves of `keras_tune.models.gemma4.moe.expert_outputs`
    (`jax.ad_checkpoint.print_saved_residuals`) for each of a token's k rows:
    the gate and up outputs, the float32 tanh-GELU's five intermediates, the
    expert's output (the router weight's gradient reads it), down's input
    where the experts train; per token the router's float32 logits and
    softmax and the three extra norms (the experts' own and two post-norms).

    Args:
        shapes: one block's `ModelShapes`.
        tokens: tokens on this device.
        compute_bytes: bytes of an activation element.
    """
    s, a = shapes, compute_bytes
    if not s.experts:
        return 0
    rows = tokens * s.experts_per_token
    kept = 2 * tokens * s.experts * 4 + 3 * (tokens * s.hidden * a + tokens * 4)  # router; 3 norms
    kept += rows * (s.hidden * a + 2 * s.expert_ffw * a + 5 * s.expert_ffw * 4)
    if "moe_expert_bank" in s.trained:
        kept += rows * s.expert_ffw * a
    return kept


def per_layer_input_activations(shapes, tokens, compute_bytes):
    """Bytes Gemma 4's per-layer input gate keeps (0 without one): gate output, GELU, product, projection and norm input."""
    s, a = shapes, compute_bytes
    if not s.per_layer_width:
        return 0
    kept = 5 * tokens * s.per_layer_width * a + tokens * s.hidden * a + tokens * 4
    if "per_layer_input_gate" in s.trained:
        kept += tokens * s.hidden * a
    return kept


def recurrent_block_activations(shapes, batch, seq, compute_bytes):
    """Bytes one RecurrentGemma recurrent block keeps for its backward pass, on one device.

    What JAX saves of `linear_out(rg_lru(conv_1d(linear_x(x))) * gelu(linear_y(x)))`
    (`jax.ad_checkpoint.print_saved_residuals`), tensor by tensor, each `lru` wide:

    | op | kept |
    | --- | --- |
    | linear_y, tanh-GELU | its output, the tanh, two GELU intermediates and the GELU (compute dtype) |
    | conv_1d (linear in x: 4 shifted taps) | its output, the RG-LRU's input |
    | RG-LRU gates (float32) | both sigmoids (one with its logistic: 3), a and a^2, 1 - a^2 (the sqrt's input), the multiplier, the gated input |
    | parallel scan (float32) | its output h (the other factor of `x * y`), and at each of its log2(T) levels ~5 slices of that level's `(a, h)` pairs: ~5 (T - 2) tokens in all |

    Then the two RMSNorms and the gated MLP, as in a Gemma block; the inputs of
    linear_x/linear_y, linear_out and the convolution only where they train.
    XLA on CPU keeps ~4% less of this block than counted.

    Args:
        shapes: `ModelShapes` of a RecurrentGemma model.
        batch: sequences on this device.
        seq: tokens a sequence.
        compute_bytes: bytes of an activation element (4 float32, 2 bfloat16).
    """
    s, a = shapes, compute_bytes
    tokens = batch * seq
    width = tokens * s.lru
    kept = _norms(s, tokens, a, projections=("linear_x", "linear_y"), split="recurrent_input")
    kept += 6 * width * a + 9 * width * 4  # the GELU branch and conv output; the gates and h
    kept += 5 * batch * max(seq - 2, 0) * s.lru * 4  # the scan's levels
    if "linear_out" in s.trained:
        kept += width * a  # x * y
    if "conv_1d" in s.trained:
        kept += width * a  # linear_x's output, for the taps' gradient
    if "rg_lru" in s.trained:
        kept += width * 4  # the gates' float32 input
    kept += 4 * tokens * s.ffw * a  # the gated MLP, as in Gemma
    if "ffw_linear" in s.trained:
        kept += tokens * s.ffw * a
    return kept


def backward_workspace(shapes, batch, seq, compute_bytes):
    """Bytes of one block's gradients in flight during its backward pass.

    The float32 gradient of the attention scores (XLA forms the gradients of
    the probabilities and of the scores in one pass) and those of gate and up;
    a recurrent block's float32 gradients of the scan's `(a, h)` instead of the scores.

    Args:
        shapes: `ModelShapes`.
        batch: sequences on this device.
        seq: tokens a sequence.
        compute_bytes: bytes of an activation element.
    """
    if shapes.layer_groups:  # blocks that differ: the largest block's workspace
        return max(backward_workspace(group, batch, seq, compute_bytes) for _, group in shapes.layer_groups)
    scores = batch * shapes.heads * seq * seq if shapes.layers > shapes.recurrent_layers else 0
    recurrent = 2 * batch * seq * shapes.lru if shapes.recurrent_layers else 0
    experts = 2 * batch * seq * shapes.experts_per_token * shapes.expert_ffw
    return max(scores, recurrent) * 4 + (2 * batch * seq * shapes.ffw + experts) * compute_bytes


def activation_bytes(shapes, batch, seq, compute_bytes, remat):
    """Bytes all decoder blocks (and the final norm) keep for the backward pass.

    RecurrentGemma: `recurrent_block_activations` for its recurrent blocks,
    `block_activations` for its local-attention blocks.

    Args:
        shapes: `ModelShapes`.
        batch: sequences on this device.
        seq: tokens a sequence.
        compute_bytes: bytes of an activation element.
        remat: each block is recomputed in the backward pass: only its input
            is kept, plus one block's activations while it is recomputed.
    """
    tokens = batch * seq
    residual = tokens * shapes.hidden // shapes.splits["residual"]
    final = residual * compute_bytes + tokens * 4  # the final RMSNorm
    if shapes.embeddings_trained:  # the output projection's input, and x/rms for the trained scale
        final += tokens * shapes.hidden * compute_bytes + residual * compute_bytes
    attention_layers = shapes.layers - shapes.recurrent_layers
    blocks = [(attention_layers, block_activations(shapes, batch, seq, compute_bytes) if attention_layers else 0)]
    if shapes.recurrent_layers:  # RecurrentGemma
        blocks.append((shapes.recurrent_layers, recurrent_block_activations(shapes, batch, seq, compute_bytes)))
    if shapes.layer_groups:  # Gemma 4: blocks of several kinds
        blocks = [(count, block_activations(group, batch, seq, compute_bytes)) for count, group in shapes.layer_groups]
        # The per-layer inputs of every block (E2B, E4B), made before the first: projection, its norm, their sum.
        final += 3 * tokens * sum(count * group.per_layer_width for count, group in shapes.layer_groups) * compute_bytes
    if remat:
        return shapes.layers * residual * compute_bytes + max(kept for _, kept in blocks) + final
    return sum(count * kept for count, kept in blocks) + final


def logits_bytes(shapes, tokens, compute_bytes, batch_axis, train_config):
    """Bytes of the logits and the loss's buffers at their peak, on one device.

    Args:
        shapes: `ModelShapes`.
        tokens: tokens on this device (batch / batch axis x seq_len); all
            carry loss in the worst case the plan assumes.
        compute_bytes: bytes of an activation element.
        batch_axis: size of the mesh's batch axis, which splits a chunk.
        train_config: the `train` section of the run config: `loss` "full"
            (logits at every position) or "sparse" (the output head only where
            the loss is, `loss_chunk_tokens` tokens of the whole mesh at a
            time, 0 = all at once); `quantize` "int4" (the sparse loss goes
            through keras-hub's head, the whole vocabulary at once; otherwise
            the table in blocks of `losses.vocabulary_block_rows` rows);
            `precision` "mixed_bfloat16" or "mixed_float16" (a block is cast, so the table is
            never taken whole).
    """
    loss, chunk_tokens, quantize = train_config.loss, train_config.loss_chunk_tokens, train_config.quantize
    mixed_precision = train_config.precision.startswith("mixed_")
    # The float32 logits (shifted by their max) and the exp the cross-entropy
    # keeps, and their float32 gradient; logits in a narrower compute dtype are
    # cast first, and the soft cap keeps its tanh.
    per_element = 4 + 4 + 4 + (compute_bytes if compute_bytes != 4 else 0)
    if shapes.final_soft_cap:
        per_element += compute_bytes
    if shapes.embeddings_trained:  # a second float32 gradient for the embedding's weight gradient
        per_element += 4
    if loss != "sparse":
        return tokens * shapes.vocab * per_element
    # The sparse loss's hand-written gradient keeps no autodiff residuals: the
    # forward logits and the backward pass's recomputed logits, which become the
    # gradient in place (XLA reuses one buffer for both on the 270M; not on the
    # tiny models, so the plan counts two).
    per_element = 8 + (compute_bytes if compute_bytes != 4 else 0)
    if shapes.final_soft_cap:
        per_element += compute_bytes
    if shapes.embeddings_trained:
        per_element += 4
    # The sparse loss flattens the batch's loss positions and cuts them into
    # chunks of the whole mesh's tokens; the batch axis splits a chunk unless
    # the head itself is split over that axis (fsdp layouts): then XLA gives
    # every device the whole chunk.
    total = tokens * batch_axis
    chunk = min(chunk_tokens or total, total)
    rows = chunk // (1 if shapes.head_on_batch_axis else batch_axis)
    from keras_tune.losses import vocabulary_block_rows

    # The tied head takes the table a block of rows at a time (`losses.TiedHead`).
    # A float table used as stored (no int8 or mixed-precision cast) is taken whole for small chunks.
    as_stored = not quantize and not mixed_precision
    if quantize == "int4":
        vocab, converted = shapes.vocab, 0
    else:  # a converted block (int8 to float, or a cast) is a buffer of its own
        vocab = vocabulary_block_rows(shapes.vocab, chunk, as_stored, 0 if as_stored else shapes.hidden)
        converted = 0 if as_stored else vocab * shapes.hidden * compute_bytes
    # One chunk's buffers at a time (a loop, recomputed in the backward pass);
    # the hand-written gradient needs no one-hot buffer. A table split over the
    # batch axis (fsdp) is gathered whole for the loop: a copy on every device.
    gathered = shapes.vocab * shapes.hidden * compute_bytes if shapes.head_on_batch_axis else 0
    return rows * vocab * per_element + converted + gathered

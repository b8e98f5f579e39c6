"""On-policy responses: the student continues each row's prompt with its own samples, inside the train step.

A row of a prompt/response batch is `<bos> prompt response <eos> <pad>...`; its
prompt is everything before its first target that carries loss. The student
decodes the row one position at a time through its key/value cache
(`CausalLM.call_with_cache`, the cache the family makes: `Family.decode_cache`),
keeps the prompt's tokens, and samples every later one from
`softmax(logits / temperature)` until it samples `<eos>` or the row ends. The
response it wrote carries the loss (its tokens and the `<eos>`); the rest of
the row becomes padding. Only one position's logits exist at a time.
"""


def sample_responses(causal_lm, family, x, settings):
    """The batch `x` with every row's response sampled by `causal_lm` (see the module docstring).

    Args:
        causal_lm: the student (called inside the train step's stateless scope).
        family: its `keras_tune.models.families.Family` (for the cache).
        x: the batch's inputs: `token_ids`, `padding_mask`, `targets`, `loss_weights`,
            `loss_positions` (the whole row), `sample_seed`.
        settings: the distillation `Settings` (temperature, padding and end ids).

    Returns:
        A dict with the same keys, shapes and dtypes.
    """
    import jax
    import jax.numpy as jnp

    token_ids, targets, weights = x["token_ids"], x["targets"], x["loss_weights"]
    rows, length = token_ids.shape
    end_id, pad_id = int(settings.end_id), int(settings.pad_id)
    full = jnp.concatenate([token_ids, targets[:, -1:]], axis=1)  # the row's length + 1 ids
    carries = weights > 0
    # The first id the student writes: the one the row's first weighted target predicts.
    first = jnp.where(carries.any(axis=1), jnp.argmax(carries, axis=1) + 1, length + 1)
    key = jax.random.key(x["sample_seed"][0])
    cache = family.decode_cache(causal_lm, rows, length + 1)

    def one_position(index, carry):
        ids, cache, done = carry
        current = jax.lax.dynamic_slice_in_dim(ids, index, 1, axis=1)
        logits, _, cache = causal_lm.call_with_cache(token_ids=current, cache=cache, cache_update_index=index)
        scaled = logits[:, 0, :].astype(jnp.float32) / settings.on_policy_temperature
        sampled = jax.random.categorical(jax.random.fold_in(key, index), scaled, axis=-1).astype(ids.dtype)
        position = index + 1
        kept = position < first
        chosen = jnp.where(kept, ids[:, position], jnp.where(done, pad_id, sampled))
        done = done | (~kept & (chosen == end_id))
        ids = jax.lax.dynamic_update_slice_in_dim(ids, chosen[:, None], position, axis=1)
        return ids, cache, done

    full, _, _ = jax.lax.fori_loop(0, length, one_position, (full, cache, jnp.zeros((rows,), bool)))
    columns = jnp.arange(length + 1)[None, :]
    written_end = (columns >= first[:, None]) & (full == end_id)
    last = jnp.where(written_end.any(axis=1), jnp.argmax(written_end, axis=1), length)  # the response's last id
    inputs = jnp.arange(length)[None, :]
    new_weights = ((inputs + 1 >= first[:, None]) & (inputs + 1 <= last[:, None])).astype(weights.dtype)
    mask = (inputs <= last[:, None]).astype(x["padding_mask"].dtype)
    return {**x, "token_ids": full[:, :-1], "targets": full[:, 1:], "loss_weights": new_weights, "padding_mask": mask}

"""Scoring text: token count, mean next-token NLL and perplexity of a CausalLM (library code).

How a text is scored (the same rule in the API and the CLI):

1. The text is tokenized with the model's own tokenizer, without BOS or EOS.
2. Its tokens are cut into consecutive, non-overlapping chunks of
   `sequence_length - 1` tokens. Each chunk becomes one window: `<bos>` followed
   by the chunk, so every window starts with BOS as llama.cpp's perplexity tool
   starts its chunks. The last window is padded (and masked) to the full length.
3. Every text token is predicted exactly once, from the BOS of its window and the
   tokens before it in that window; the first token of a window sees only BOS.
   So a long text scores a little worse than with a sliding window (less
   context at each window start). llama.cpp's `perplexity` differs in one more
   way: it scores only the second half of each window, so its numbers on long
   files are somewhat lower; on a text shorter than a window both agree.
4. NLL is in nats, averaged over the text's tokens; perplexity is `exp(nll)`.
   The overall figure weights every token equally (not every text).

Shapes are fixed, `(batch_size, sequence_length)`, so the scoring function is
compiled once per model and shape.

Example:

```python
import keras_tune
config = keras_tune.load_config("gemma3_tiny")
causal_lm = keras_tune.load_causal_lm(config)
result = keras_tune.evaluate_texts(causal_lm, ["Some text.", "More text."], sequence_length=64)
print(result["tokens"], result["nll"], result["perplexity"])
```

The command-line tool is `python -m keras_tune.evaluate` (`keras_tune/evaluate.py`).
"""

import math
import weakref

import numpy as np

from keras_tune.errors import UserError

_SCORERS = weakref.WeakKeyDictionary()


def _scorer(causal_lm):
    """A jitted `(trainable, non_trainable, ids, mask, targets, weights) -> per-row NLL sum`."""
    scorer = _SCORERS.get(causal_lm)
    if scorer is not None:
        return scorer
    import jax
    import jax.numpy as jnp

    # A weak reference: the cache's value must not keep its key (the model) alive.
    model_ref = weakref.ref(causal_lm)

    def score(trainable, non_trainable, token_ids, padding_mask, targets, weights):
        logits, _ = model_ref().stateless_call(
            trainable,
            non_trainable,
            {"token_ids": token_ids, "padding_mask": padding_mask},
            training=False,
        )
        logits = logits.astype(jnp.float32)
        log_normalizer = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        # `where`, not a product: a fully padded row may hold NaNs that must not leak.
        nll = jnp.where(weights > 0, log_normalizer - picked, 0.0)
        return nll.sum(axis=-1)

    scorer = jax.jit(score)
    _SCORERS[causal_lm] = scorer
    return scorer


def _windows(token_lists, sequence_length, bos_id, pad_id):
    """Arrays (token_ids, padding_mask, targets, weights, owner) of every window."""
    chunk = sequence_length - 1
    rows = []
    for owner, ids in enumerate(token_lists):
        for start in range(0, len(ids), chunk):
            rows.append((owner, ids[start : start + chunk]))
    count = len(rows)
    token_ids = np.full((count, sequence_length), pad_id, dtype=np.int32)
    padding_mask = np.zeros((count, sequence_length), dtype=np.int32)
    weights = np.zeros((count, sequence_length), dtype=np.float32)
    owners = np.zeros(count, dtype=np.int64)
    for row, (owner, ids) in enumerate(rows):
        n = len(ids)
        token_ids[row, 0] = bos_id
        token_ids[row, 1 : n + 1] = ids
        padding_mask[row, : n + 1] = 1
        weights[row, :n] = 1.0  # position j predicts token j + 1
        owners[row] = owner
    targets = np.concatenate([token_ids[:, 1:], np.full((count, 1), pad_id, dtype=np.int32)], axis=1)
    return token_ids, padding_mask, targets, weights, owners


def _summary(tokens, nll_sum):
    if tokens == 0:
        return {"tokens": 0, "nll": float("nan"), "perplexity": float("nan")}
    nll = nll_sum / tokens
    return {"tokens": int(tokens), "nll": float(nll), "perplexity": float(math.exp(min(nll, 700.0)))}


def evaluate_texts(causal_lm, texts, *, sequence_length, batch_size=1):
    """Mean next-token NLL (nats) and perplexity of `causal_lm` on `texts`.

    Each text is tokenized without special tokens and scored in non-overlapping
    windows of `sequence_length` tokens, each starting with `<bos>` (see the
    module docstring for the exact rule). Every text token is predicted once.

    Args:
        causal_lm: a keras-hub CausalLM with a preprocessor (its tokenizer is used).
        texts: a list of strings.
        sequence_length: window length in tokens, BOS included (at least 2).
        batch_size: windows scored per compiled call.

    Returns:
        A dict with overall `tokens`, `nll`, `perplexity`, `windows`,
        `sequence_length`, and `texts`: one dict (`tokens`, `nll`, `perplexity`)
        per text, in order. A text with no tokens has NaN NLL and perplexity.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    if sequence_length < 2:
        raise UserError(f"sequence length {sequence_length}: expected at least 2 (BOS and one token)")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: expected at least 1")
    tokenizer = causal_lm.preprocessor.tokenizer
    token_lists = [np.asarray(tokenizer(text), dtype=np.int32).reshape(-1) for text in texts]
    token_ids, padding_mask, targets, weights, owners = _windows(
        token_lists, sequence_length, tokenizer.start_token_id, tokenizer.pad_token_id
    )
    count = len(token_ids)
    sums = np.zeros(count, dtype=np.float64)
    if count:
        padded = -(-count // batch_size) * batch_size
        if padded != count:  # whole dummy windows (weight 0) keep the compiled shape
            extra = padded - count
            token_ids = np.concatenate([token_ids, np.repeat(token_ids[:1], extra, axis=0)])
            padding_mask = np.concatenate([padding_mask, np.repeat(padding_mask[:1], extra, axis=0)])
            targets = np.concatenate([targets, np.repeat(targets[:1], extra, axis=0)])
            weights = np.concatenate([weights, np.zeros((extra, sequence_length), np.float32)])
        scorer = _scorer(causal_lm)
        trainable = [v.value for v in causal_lm.trainable_variables]
        non_trainable = [v.value for v in causal_lm.non_trainable_variables]
        for start in range(0, padded, batch_size):
            batch = slice(start, start + batch_size)
            row_sums = scorer(
                trainable, non_trainable, token_ids[batch], padding_mask[batch], targets[batch], weights[batch]
            )
            taken = min(batch_size, count - start)
            sums[start : start + taken] = np.asarray(row_sums, dtype=np.float64)[:taken]
    per_text = []
    for index, ids in enumerate(token_lists):
        per_text.append(_summary(len(ids), float(sums[owners == index].sum())))
    total_tokens = sum(len(ids) for ids in token_lists)
    result = _summary(total_tokens, float(sums.sum()))
    result.update(windows=count, sequence_length=sequence_length, texts=per_text)
    return result

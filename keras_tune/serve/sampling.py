"""Choosing each slot's next token: greedy or sampled with its own temperature, top-k, top-p and seed.

Every function here is traced inside the engine's compiled decode step and
works on all slots at once (`logits` is `[slots, vocabulary]`).

- Greedy (temperature 0) is keras-hub's `GreedySampler`: the argmax of the
  float32 softmax, so ties fall as they fall there.
- Sampling keeps the tokens whose temperature-scaled logit reaches a slot's
  threshold: the k-th largest for top-k, then the smallest set whose
  probability (renormalized over what top-k kept) reaches top-p, and draws one
  of them in proportion to its probability (inverse-CDF sampling with one
  uniform number: no sort of the vocabulary and no noise over it). A slot's random key is its seed
  folded with its position, so a seeded request draws the same tokens whatever
  else shares the batch.
- Log-probabilities reported to clients are the model's own
  (`log_softmax` of the logits, before temperature and truncation).
"""

import jax
import jax.numpy as jnp

# Candidates top-k and top-p look at before the rare whole-vocabulary search; the largest top_k a request may ask.
CANDIDATES = 1024
# Alternatives reported per position (OpenAI's chat API allows up to 20).
TOP_LOGPROBS = 20


def greedy(logits):
    """keras-hub's greedy choice: the argmax of the float32 softmax.

    Args:
        logits: `[slots, vocabulary]`.
    """
    return jnp.argmax(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1).astype(jnp.int32)


def _nucleus_threshold(probabilities, top_p, candidate_probabilities):
    """The smallest probability a token may have and stay in the top-p nucleus, a slot.

    Where the candidates hold `top_p` of the mass, the threshold is the candidate
    that completes it; otherwise (a flat distribution) it is found by bisection
    over the whole vocabulary.
    """
    cumulative = jnp.cumsum(candidate_probabilities, axis=-1)
    reached = cumulative >= top_p[:, None]
    covered = reached[:, -1]
    first = jnp.argmax(reached, axis=-1)
    from_candidates = jnp.take_along_axis(candidate_probabilities, first[:, None], axis=-1)[:, 0]

    def bisect():
        def body(_, bounds):
            low, high = bounds
            middle = (low + high) / 2
            mass = jnp.sum(jnp.where(probabilities >= middle[:, None], probabilities, 0.0), axis=-1)
            enough = mass >= top_p
            return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

        low = jnp.zeros_like(top_p)
        high = candidate_probabilities[:, -1]
        return jax.lax.fori_loop(0, 40, body, (low, high))[0]

    searched = jax.lax.cond(jnp.all(covered), lambda: jnp.zeros_like(top_p), bisect)
    return jnp.where(covered, from_candidates, searched)


def sample(logits, temperature, top_k, top_p, keys):
    """One sampled token a slot.

    Args:
        logits: `[slots, vocabulary]`.
        temperature: `[slots]`, positive.
        top_k: `[slots]` int; 0 keeps every token, else 1..`CANDIDATES`.
        top_p: `[slots]` in (0, 1]; 1 keeps every token.
        keys: `[slots]` random keys.
    """
    scaled = logits.astype(jnp.float32) / temperature[:, None]
    vocabulary = scaled.shape[-1]
    count = min(CANDIDATES, vocabulary)
    candidates, _ = jax.lax.top_k(scaled, count)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, count), vocabulary)
    kth = jnp.take_along_axis(candidates, jnp.clip(k - 1, 0, count - 1)[:, None], axis=-1)[:, 0]
    floor = jnp.where(k < vocabulary, kth, -jnp.inf)
    # Probabilities over what top-k kept, then the top-p nucleus among them.
    kept = jnp.where(scaled >= floor[:, None], scaled, -jnp.inf)
    log_normalizer = jax.nn.logsumexp(kept, axis=-1)
    probabilities = jnp.exp(kept - log_normalizer[:, None])
    candidate_probabilities = jnp.where(
        candidates >= floor[:, None], jnp.exp(candidates - log_normalizer[:, None]), 0.0
    )
    threshold = jax.lax.cond(
        jnp.any(top_p < 1.0),
        lambda: jnp.where(top_p < 1.0, _nucleus_threshold(probabilities, top_p, candidate_probabilities), 0.0),
        lambda: jnp.zeros_like(top_p),
    )
    weights = jnp.where(probabilities >= threshold[:, None], probabilities, 0.0)
    # Inverse-CDF sampling: one uniform number a slot, no sort and no noise over the vocabulary.
    cumulative = jnp.cumsum(weights, axis=-1)
    total = cumulative[:, -1]
    uniform = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)
    target = jnp.minimum(uniform * total, jnp.nextafter(total, 0.0))
    return jnp.argmax(cumulative > target[:, None], axis=-1).astype(jnp.int32)

def choose(logits, temperature, top_k, top_p, seeds, positions):
    """Each slot's next token: greedy where its temperature is 0, sampled elsewhere.

    The sampling pass runs only when some slot samples.

    Args:
        logits: `[slots, vocabulary]`.
        temperature: `[slots]` float; 0 means greedy.
        top_k: `[slots]` int.
        top_p: `[slots]` float.
        seeds: `[slots]` uint32, each request's seed (a request's n choices differ in it).
        positions: `[slots]` int32, where each slot is (folded into its key).
    """
    chosen = greedy(logits)

    def sampled():
        keys = jax.vmap(lambda seed, position: jax.random.fold_in(jax.random.key(seed), position))(seeds, positions)
        safe = jnp.where(temperature > 0, temperature, 1.0)
        return jnp.where(temperature > 0, sample(logits, safe, top_k, top_p, keys), chosen)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: chosen)


def log_probabilities(logits, tokens, count=TOP_LOGPROBS):
    """The model's log-probability of `tokens` and its `count` likeliest tokens, a row.

    Args:
        logits: `[rows, vocabulary]`.
        tokens: `[rows]` int, the tokens whose log-probability is wanted.
        count: alternatives a row.

    Returns:
        `(chosen [rows], top ids [rows, count], top log-probabilities [rows, count])`.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(log_probs, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(log_probs, min(count, log_probs.shape[-1]))
    return chosen, top_ids.astype(jnp.int32), top_values

"""Preference tuning on (prompt, chosen, rejected) pairs: DPO against the LoRA-off network, and ORPO.

A batch holds pairs: `[pairs, 2, length]` rows, the chosen response's row then
the rejected one's, each `<bos> prompt response <eos>` with loss weights on the
response (`keras_tune.data.preference`). The policy's log-probability of a
response is the sum of its tokens' log-probabilities, computed as SFT's loss
is: the head only at the response positions, a vocabulary block at a time
(`keras_tune.losses.head_nll`).

- **DPO** (Rafailov et al., 2023): `loss = -log sigmoid(beta * ((pi_c - ref_c) -
  (pi_r - ref_r)))`. The reference model is the same network with LoRA switched
  off (`keras_tune.lora.lora_switched_off`): one copy of the base weights, its
  log-probabilities computed once per batch, in the same step, under
  `stop_gradient`. The reward margin is `beta * ((pi_c - ref_c) - (pi_r - ref_r))`.
- **ORPO** (Hong et al., 2024), reference-free: `loss = NLL(chosen) + beta *
  -log sigmoid(log odds(chosen) - log odds(rejected))`, with the per-token mean
  log-probability `a` of a response and `log odds = a - log(1 - e^a)`; the
  margin is that log-odds ratio.

Preference accuracy is the share of pairs whose margin is positive, a tie (the
first DPO step: policy and reference are the same network) counting a half.
`metrics.csv` gets `chosen_logp`, `rejected_logp`, `reward_margin` and
`preference_accuracy` per step (and `val_...` at evaluations).

Example:

```python
config = keras_tune.load_config("gemma3_tiny", overrides={
    "train.objective": "dpo", "data.name": "text", "data.path": "prefs.jsonl"})
keras_tune.run(config)
```
"""

import keras

from keras_tune import losses
from keras_tune.objectives.base import Objective
from keras_tune.objectives.metrics import RowLoss, metric_set

# Channels of a `PreferenceModel` row (one pair).
LOSS, PAIRS, CHOSEN, REJECTED, MARGIN, CORRECT, CHOSEN_NLL, CHOSEN_TOKENS, TOKENS, NON_PAD = range(10)
RATIOS = {
    "chosen_logp": (CHOSEN, PAIRS, False),
    "rejected_logp": (REJECTED, PAIRS, False),
    "reward_margin": (MARGIN, PAIRS, False),
    "preference_accuracy": (CORRECT, PAIRS, False),
    "perplexity": (CHOSEN_NLL, CHOSEN_TOKENS, True),  # the policy's, on the chosen responses
}
COLUMNS = ("chosen_logp", "rejected_logp", "reward_margin", "preference_accuracy")


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    """DPO's sigmoid loss and reward margin of each pair, from summed response log-probabilities.

    Args:
        policy_chosen: `[pairs]` log p(chosen | prompt) under the policy.
        policy_rejected: `[pairs]` log p(rejected | prompt) under the policy.
        reference_chosen: the same under the reference model.
        reference_rejected: the same under the reference model.
        beta: the strength of the tie to the reference.

    Returns:
        `(loss, margin)`, each `[pairs]`.
    """
    import jax

    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -jax.nn.log_sigmoid(margin), margin


def orpo_loss(chosen_mean, rejected_mean, beta):
    """ORPO's loss and log-odds ratio of each pair, from per-token mean log-probabilities.

    Args:
        chosen_mean: `[pairs]` the chosen response's mean token log-probability (< 0).
        rejected_mean: the rejected response's.
        beta: the weight of the odds-ratio term (ORPO's lambda).

    Returns:
        `(loss, log odds ratio)`, each `[pairs]`.
    """
    import jax
    import jax.numpy as jnp

    def log_odds(mean):  # log(p / (1 - p)) of p = e^mean, stable for mean near 0
        mean = jnp.minimum(mean, -1e-6)
        return mean - jnp.log(-jnp.expm1(mean))

    ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
    return -chosen_mean - beta * jax.nn.log_sigmoid(ratio), ratio


def preference_accuracy(margin):
    """1 where the margin is positive, 0 where negative, a half for a tie.

    Args:
        margin: `[pairs]` reward margins (or log-odds ratios).
    """
    import jax.numpy as jnp

    return jnp.where(margin > 0, 1.0, jnp.where(margin < 0, 0.0, 0.5))


class PreferenceModel(keras.Model):
    """A CausalLM trained on preference pairs (DPO or ORPO): the model `fit` trains for `--objective dpo|orpo`.

    Its output is a `[pairs, 10]` table (the channels above): channel 0 each
    pair's share of the batch's mean loss over real pairs (filler pairs of a last
    validation batch weigh 0), then weighted sums that `metric_set` turns into
    the metrics. Variables are the CausalLM's own: checkpoints and adapters are
    the same as SFT's, and a DPO run holds the base once.

    Args:
        causal_lm: a keras-hub Gemma-family CausalLM, LoRA applied.
        kind: "dpo" or "orpo".
        beta: DPO's beta, or ORPO's lambda.
        chunk_tokens: tokens a head chunk (`train.loss_chunk_tokens`).
        full: the plain path: keras-hub's full logits (`train.loss=full`).
        pad_id: the padding token (for the non-padding token count).
    """

    def __init__(self, causal_lm, kind, beta, chunk_tokens=0, full=False, pad_id=0, **kwargs):
        super().__init__(**kwargs)
        self.causal_lm = causal_lm
        self.kind, self.beta = kind, float(beta)
        self.chunk_tokens, self.full, self.pad_id = int(chunk_tokens), bool(full), int(pad_id)
        self.built = causal_lm.built

    def response_logps(self, inputs, training=False):
        """`(summed log-probability, response tokens)` of every row, each `[pairs, 2]` (chosen, rejected).

        Args:
            inputs: the batch's inputs (`[pairs, 2, ...]` arrays).
            training: passed to the backbone.
        """
        import jax
        import jax.numpy as jnp

        pairs, _, length = inputs["token_ids"].shape
        flat = {key: value.reshape((pairs * 2,) + value.shape[2:]) for key, value in inputs.items()}
        backbone = self.causal_lm.backbone
        hidden = backbone({"token_ids": flat["token_ids"], "padding_mask": flat["padding_mask"]}, training=training)
        targets, weights = flat["targets"], flat["response_weights"].astype(jnp.float32)
        if self.full:
            logits = backbone.token_embedding(hidden, reverse=True).astype(jnp.float32)
            picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            nll = jax.nn.logsumexp(logits, axis=-1) - picked
        else:
            positions = flat["loss_positions"]
            capacity = positions.shape[1]
            states = jnp.take_along_axis(hidden, positions[:, :, None], axis=1).reshape(pairs * 2 * capacity, -1)
            embedding = backbone.token_embedding
            head = losses.TiedHead(embedding) if losses.TiedHead.supports(embedding) else (
                lambda s: embedding(s, reverse=True))
            picked = jnp.take_along_axis(targets, positions, axis=1).reshape(-1)
            nll = losses.head_nll(states, picked, head, self.chunk_tokens)[0].reshape(pairs * 2, capacity)
            weights = jnp.take_along_axis(weights, positions, axis=1)
        logp = -(nll * weights).sum(axis=1)
        return logp.reshape(pairs, 2), weights.sum(axis=1).reshape(pairs, 2)

    def call(self, inputs, training=False):
        import jax
        import jax.numpy as jnp

        from keras_tune.lora import lora_switched_off

        logps, counts = self.response_logps(inputs, training=training)
        chosen, rejected = logps[:, 0], logps[:, 1]
        if self.kind == "dpo":
            with lora_switched_off(self.causal_lm):  # the reference: the same variables, the adapters left out
                reference = jax.lax.stop_gradient(self.response_logps(inputs, training=False)[0])
            loss, margin = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], self.beta)
        else:
            means = logps / jnp.maximum(counts, 1.0)
            loss, margin = orpo_loss(means[:, 0], means[:, 1], self.beta)
        real = ((counts[:, 0] > 0) & (counts[:, 1] > 0)).astype(jnp.float32)
        pairs = real.shape[0]
        total = real.sum()
        share = jnp.where(total > 0, pairs / jnp.maximum(total, 1.0), 0.0)
        targets = inputs["targets"]
        columns = [
            loss * real * share, real, chosen * real, rejected * real, jax.lax.stop_gradient(margin) * real,
            preference_accuracy(jax.lax.stop_gradient(margin)) * real, -chosen * real, counts[:, 0] * real,
            jnp.full((pairs,), 2.0 * targets.shape[-1], jnp.float32),
            (targets != self.pad_id).sum(axis=(1, 2)).astype(jnp.float32),
        ]
        return jnp.stack(columns, axis=1)


def compile_preference(causal_lm, config, optimizer):
    """The compiled `PreferenceModel` of a run: `RowLoss`, the preference metrics, token counts.

    Args:
        causal_lm: the run's CausalLM (LoRA applied).
        config: the validated run config (`train.objective`, `preference.beta`, `train.loss*`).
        optimizer: a Keras optimizer; built here.
    """
    pad_id = int(causal_lm.preprocessor.tokenizer.pad_token_id)
    causal_lm.compile(sampler="greedy")  # for samples; the trainer below does the training
    trainer = PreferenceModel(causal_lm, config.train.objective, config.preference.beta,
                              chunk_tokens=config.train.loss_chunk_tokens, full=config.train.loss == "full",
                              pad_id=pad_id)
    trainer.compile(optimizer=optimizer, loss=RowLoss(), metrics=metric_set(RATIOS, TOKENS, NON_PAD, COLUMNS))
    optimizer.build(trainer.trainable_variables)
    return trainer



def prepare_batches(data, config):
    """Preference batches as the trainer reads them: each row's response positions first (`loss_positions`).

    The positions are `keras_tune.losses.add_loss_positions`' for the `[pairs x 2]`
    rows, at the smallest capacity that holds the batch's longest response.

    Args:
        data: the run's pair `DataBundle` (`keras_tune.data.preference`), mapped in place.
        config: the validated run config (`train.loss`).
    """
    if config.train.loss != "sparse":
        return data

    def with_positions(x, y):
        import tensorflow as tf

        shape = tf.shape(x["token_ids"])
        flat = {key: tf.reshape(x[key], [-1, shape[2]]) for key in ("token_ids", "padding_mask")}
        flat, _, _ = losses.add_loss_positions(flat, tf.reshape(x["targets"], [-1, shape[2]]),
                                               tf.reshape(x["response_weights"], [-1, shape[2]]))
        positions = tf.reshape(flat["loss_positions"], [shape[0], 2, -1])
        return {**x, "loss_positions": positions}, y

    def mapped(dataset):
        import tensorflow as tf

        return dataset.map(with_positions, num_parallel_calls=tf.data.AUTOTUNE)

    return data.map(mapped)


class Preference(Objective):
    """`--objective dpo|orpo`: pair data read and checked before the build; the trainer is a `PreferenceModel`."""

    columns = COLUMNS

    def __init__(self, config):
        super().__init__(config)
        self.name = config.train.objective

    def check(self):
        from keras_tune.data.preference import check_preferences

        check_preferences(self.config.data)

    def plan(self, plan):
        config = self.config
        reference = ("reference: the same network with LoRA off (no second copy of the base)"
                     if self.name == "dpo" else "reference-free")
        print(f"objective {self.name}: beta {config.preference.beta:g}, {reference}")

    def datasets(self, tokenizer, seed):
        from keras_tune.data.preference import make_preference_datasets

        return make_preference_datasets(self.config.data, tokenizer, seed=seed)

    def prepare(self, data):
        return prepare_batches(data, self.config)

    def compile(self, causal_lm, optimizer):
        return compile_preference(causal_lm, self.config, optimizer)

    def describe(self, results):
        return (f"loss {results['loss']:.4f}, preference accuracy {results.get('preference_accuracy', float('nan')):.3f}, "
                f"reward margin {results.get('reward_margin', float('nan')):.4f}")

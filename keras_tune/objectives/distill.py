"""Knowledge distillation: the student learns the teacher's next-token distributions at the loss positions.

At every position that carries loss, the loss is

    w * NLL(observed token) + (1 - w) * D(teacher || student) at temperature T

(`distill.hard_label_weight` w, `distill.divergence` D: forward KL, reverse
KL or the generalized JSD, `keras_tune.objectives.divergence`), the mean over
loss positions as SFT's is. The student's backbone runs once, the frozen
teacher's once (its hidden states under `stop_gradient`); both heads are then
applied at the loss positions only, a vocabulary block at a time, so neither
model's `[tokens, vocabulary]` logits exist whole (with `train.loss=full`, the
plain computation on keras-hub's full logits: the naive reference).

On-policy distillation (GKD, `distill.on_policy_fraction` lambda): in that share
of training steps, drawn from the seed and the step (a resumed run draws the
same), the student samples its own response after each row's prompt (the
positions before the row's first target), at `distill.on_policy_temperature`,
through the model's key/value cache, and the teacher scores those tokens. The
sampling happens in the train step before the gradient is taken, with the
weights under `stop_gradient`.

Example:

```python
config = keras_tune.load_config("gemma3_tiny", overrides={
    "train.objective": "distill", "distill.teacher": "gemma3_tiny", "distill.teacher_adapter": "teacher.npz"})
keras_tune.run(config)   # metrics.csv gains a `divergence` column
```
"""

import dataclasses

import keras

from keras_tune import losses
from keras_tune.objectives.base import Objective
from keras_tune.objectives.divergence import Divergence, divergence_from_logits, head_divergence
from keras_tune.objectives.metrics import RowLoss, metric_set
from keras_tune.objectives.teacher import build_teacher, check_same_tokenizer, check_teacher, teacher_config

# Channels of a `DistillationModel` row.
LOSS, WEIGHT, NLL, CORRECT, DIVERGENCE, TOKENS, NON_PAD = range(7)
RATIOS = {
    "accuracy": (CORRECT, WEIGHT, False),
    "perplexity": (NLL, WEIGHT, True),
    "divergence": (DIVERGENCE, WEIGHT, False),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a distillation trainer mixes its terms and samples.

    Attributes:
        divergence: a `Divergence` (kind, temperature, JSD beta).
        hard_label_weight: the weight of the next-token NLL; the divergence gets the rest.
        chunk_tokens: tokens a head chunk (`train.loss_chunk_tokens`).
        full: the plain path: keras-hub's full logits (`train.loss=full`).
        pad_id: the padding token (for the non-padding token count; sampled rows' filler).
        end_id: the end token (a sampled response ends with it).
        on_policy_fraction: GKD's lambda (0: off).
        on_policy_temperature: the student's sampling temperature.
    """

    divergence: Divergence
    hard_label_weight: float = 0.5
    chunk_tokens: int = 0
    full: bool = False
    pad_id: int = 0
    end_id: int = 1
    on_policy_fraction: float = 0.0
    on_policy_temperature: float = 1.0


def settings_of(config, tokenizer):
    """The `Settings` a run config asks for.

    Args:
        config: the validated run config.
        tokenizer: the model's tokenizer (its padding and end ids).
    """
    distill = config.distill
    return Settings(
        divergence=Divergence(distill.divergence, float(distill.temperature), float(distill.jsd_beta)),
        hard_label_weight=float(distill.hard_label_weight), chunk_tokens=int(config.train.loss_chunk_tokens),
        full=config.train.loss == "full", pad_id=int(tokenizer.pad_token_id), end_id=int(tokenizer.end_token_id),
        on_policy_fraction=float(distill.on_policy_fraction),
        on_policy_temperature=float(distill.on_policy_temperature),
    )


def _head(embedding):
    return losses.TiedHead(embedding) if losses.TiedHead.supports(embedding) else (lambda s: embedding(s, reverse=True))


def row_figures(per_position, weights, targets, settings):
    """A `[rows, 7]` output from per-position `(loss, nll, correct, divergence)` and the loss weights.

    Channel 0 is the row's share of the batch's weighted mean loss (so Keras' mean
    over rows is that mean); the others are weighted sums and token counts.

    Args:
        per_position: `(loss, nll, correct, divergence)`, each `[rows, positions]`.
        weights: `[rows, positions]` loss weights at the same positions.
        targets: `[rows, length]` every target of the rows (for the token counts).
        settings: the trainer's `Settings`.
    """
    import jax.numpy as jnp

    loss, nll, correct, divergence = per_position
    weights = weights.astype(jnp.float32)
    rows = weights.shape[0]
    row_weight = weights.sum(axis=1)
    total = row_weight.sum()
    share = jnp.where(total > 0, rows / jnp.maximum(total, 1e-30), 0.0)
    columns = [
        (loss * weights).sum(axis=1) * share, row_weight, (nll * weights).sum(axis=1), (correct * weights).sum(axis=1),
        (divergence * weights).sum(axis=1), jnp.full((rows,), targets.shape[1], jnp.float32),
        (targets != settings.pad_id).sum(axis=1).astype(jnp.float32),
    ]
    return jnp.stack(columns, axis=1)


class DistillationModel(keras.Model):
    """A student CausalLM and a frozen teacher: the model `fit` trains for `--objective distill`.

    Its input is a batch of `keras_tune.losses.add_loss_positions` plus
    `loss_weights` (`prepare_batches`); its output a `[rows, 7]` table (`row_figures`)
    that `RowLoss` and the `metric_set` read. Its trainable variables are the
    student's (LoRA, or all of them); the teacher's are non-trainable, so neither
    a gradient nor a checkpoint holds them.

    Args:
        causal_lm: the student, LoRA applied.
        teacher: the teacher CausalLM (frozen).
        settings: `Settings`.
        family: the student's family (its `decode_cache`, for on-policy sampling).
    """

    def __init__(self, causal_lm, teacher, settings, family=None, **kwargs):
        super().__init__(**kwargs)
        self.causal_lm = causal_lm
        self.teacher = teacher
        self.settings = settings
        self.family = family
        self.built = causal_lm.built and teacher.built

    def call(self, inputs, training=False):
        import jax

        settings = self.settings
        features = {"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]}
        student = self.causal_lm.backbone(features, training=training)
        teacher = jax.lax.stop_gradient(self.teacher.backbone(features, training=False))
        if settings.full:
            return self._full(student, teacher, inputs)
        positions, targets, weights = inputs["loss_positions"], inputs["targets"], inputs["loss_weights"]
        rows, capacity = positions.shape

        def at_positions(values):
            return jax.numpy.take_along_axis(values, positions[:, :, None] if values.ndim == 3 else positions, axis=1)

        student_states = at_positions(student).reshape(rows * capacity, -1)
        teacher_states = at_positions(teacher).reshape(rows * capacity, -1)
        picked = at_positions(targets).reshape(-1)
        student_head = _head(self.causal_lm.backbone.token_embedding)
        teacher_head = _head(self.teacher.backbone.token_embedding)
        nll, correct = losses.head_nll(student_states, picked, student_head, settings.chunk_tokens)
        divergence = head_divergence(student_states, teacher_states, student_head, teacher_head, settings.divergence,
                                     settings.chunk_tokens)
        per_position = self._mixed(nll, correct, divergence)
        per_position = tuple(value.reshape(rows, capacity) for value in per_position)
        return row_figures(per_position, at_positions(weights), targets, settings)

    def _mixed(self, nll, correct, divergence):
        """`(loss, nll, correct, divergence)` per position: the NLL and divergence mixed by the hard-label weight."""
        import jax

        weight = self.settings.hard_label_weight
        if weight == 0.0:  # the NLL is a metric only: no gradient pass through the head for it
            nll = jax.lax.stop_gradient(nll)
        return weight * nll + (1.0 - weight) * divergence, nll, correct, divergence

    def _full(self, student, teacher, inputs):
        """The plain path: keras-hub's `[rows, length, vocabulary]` logits of both models, at every position."""
        import jax
        import jax.numpy as jnp

        targets = inputs["targets"]
        student_logits = self.causal_lm.backbone.token_embedding(student, reverse=True).astype(jnp.float32)
        teacher_logits = self.teacher.backbone.token_embedding(teacher, reverse=True).astype(jnp.float32)
        picked = jnp.take_along_axis(student_logits, targets[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(student_logits, axis=-1) - picked
        correct = jax.lax.stop_gradient((jnp.argmax(student_logits, axis=-1) == targets).astype(jnp.float32))
        divergence = divergence_from_logits(student_logits, teacher_logits, self.settings.divergence)
        return row_figures(self._mixed(nll, correct, divergence), inputs["loss_weights"], targets, self.settings)

    def train_step(self, state, data):
        """Keras' train step; in an on-policy step the student first samples the rows' responses."""
        if self.settings.on_policy_fraction > 0:
            data = self._on_policy(state, data)
        return super().train_step(state, data)

    def _on_policy(self, state, data):
        """The batch with each row's response sampled by the student when the batch's draw says so."""
        import jax

        from keras_tune.objectives.sampling import sample_responses

        x, y = data[0], data[1]
        trainable, non_trainable = state[0], state[1]
        mapping = list(zip(self.trainable_variables, jax.lax.stop_gradient(list(trainable))))
        mapping += list(zip(self.non_trainable_variables, non_trainable))

        def sampled(x):
            with keras.StatelessScope(state_mapping=mapping):
                return sample_responses(self.causal_lm, self.family, x, self.settings)

        x = jax.lax.cond(x["on_policy"][0] > 0, sampled, lambda x: dict(x), x)
        return (x, (x["loss_weights"].sum(axis=1) > 0).astype(y.dtype)) + tuple(data[2:])


def compile_distillation(causal_lm, teacher, config, optimizer):
    """The compiled `DistillationModel` of a run: `RowLoss`, accuracy, perplexity, divergence, token counts.

    Args:
        causal_lm: the student (LoRA applied).
        teacher: the frozen teacher (`keras_tune.objectives.teacher.build_teacher`).
        config: the validated run config.
        optimizer: a Keras optimizer; built here.
    """
    from keras_tune.models import families

    causal_lm.compile(sampler="greedy")  # for samples; the trainer below does the training
    settings = settings_of(config, causal_lm.preprocessor.tokenizer)
    trainer = DistillationModel(causal_lm, teacher, settings, families.of_model(causal_lm))
    trainer.compile(optimizer=optimizer, loss=RowLoss(), metrics=metric_set(RATIOS, TOKENS, NON_PAD, ("divergence",)))
    optimizer.build(trainer.trainable_variables)
    return trainer


def prepare_batches(data, config):
    """A run's batches as the distillation trainer reads them: loss positions, `loss_weights` in the inputs.

    The loss weights move into the inputs (an on-policy step replaces them) and
    `y` becomes each row's weight; with on-policy sampling every batch also
    carries its draw (`on_policy`, `sample_seed`), a function of the seed and the
    batch's step alone, and the positions are the whole row (a sampled response
    may carry loss anywhere after the prompt).

    Args:
        data: the run's `DataBundle` (mapped in place).
        config: the validated run config.
    """
    fraction = float(config.distill.on_policy_fraction)
    if fraction > 0:
        layout = losses.WHOLE_ROW
    else:
        layout = losses.loss_positions_layout(data.report.loss_fraction, quantized=False)

    def rows(dataset):
        return losses.with_loss_positions(dataset, layout).map(_weights_as_inputs)

    data.map(rows)
    seed = int(config.train.seed)
    if data.stream is not None:
        stream = data.stream
        data.stream = lambda start_step=0: _with_draws(stream(start_step), start_step, seed, fraction)
    data.train = _with_draws(data.train, 0, seed, fraction)
    if data.validation is not None:
        data.validation = _with_draws(data.validation, 0, seed, 0.0)
    return data


def _weights_as_inputs(x, y, sample_weight):
    import tensorflow as tf

    x = {**x, "loss_weights": tf.cast(sample_weight, tf.float32)}
    return x, tf.cast(tf.reduce_any(sample_weight > 0, axis=1), tf.float32)


def _with_draws(dataset, start_step, seed, fraction):
    """Each batch with its on-policy draw: `on_policy` (1 in a `fraction` of the steps) and a `sample_seed`.

    A draw is a function of the seed and the batch's global step alone, so a run
    resumed at step k draws what the uninterrupted one does.
    """
    import tensorflow as tf

    def draw(step, batch):
        x, y = batch
        rows = tf.shape(y)[0]
        uniform = tf.random.stateless_uniform([], seed=tf.stack([tf.cast(seed, tf.int64), step]))
        flag = tf.cast(uniform < fraction, tf.int32) if fraction > 0 else tf.constant(0, tf.int32)
        sample_seed = tf.cast(tf.math.floormod(step * 1000003 + seed, 2**31 - 1), tf.int32)
        x = {**x, "on_policy": tf.fill([rows], flag), "sample_seed": tf.fill([rows], sample_seed)}
        return x, y

    return dataset.enumerate(int(start_step)).map(draw)


class Distill(Objective):
    """`--objective distill`: the teacher is checked, planned and built with the student; the trainer is a `DistillationModel`."""

    name = "distill"
    columns = ("divergence",)

    def __init__(self, config):
        super().__init__(config)
        self.teacher = None

    def check(self):
        check_teacher(self.config)

    def plan(self, plan):
        from keras_tune.distribution import plan_sharding
        from keras_tune.lora import count_parameters
        from keras_tune.models.loader import abstract_model

        teacher = teacher_config(self.config)
        weights = abstract_model(teacher, lora=False).weights
        teacher_plan = plan_sharding(teacher, weights, devices=list(plan.mesh.devices.flatten()))
        stored = f", {teacher.train.quantize} base" if teacher.train.quantize else ""
        adapter = f", adapter {teacher.model.adapter}" if teacher.model.adapter else ""
        print(f"teacher {teacher.preset}: {count_parameters(weights):,} parameters, frozen{stored}{adapter}; "
              f"layout {teacher_plan.layout.name}; {self.config.distill.divergence} at temperature "
              f"{self.config.distill.temperature:g}, hard-label weight {self.config.distill.hard_label_weight:g}")

    def build(self, causal_lm, plan):
        import time

        import keras

        started = time.perf_counter()
        try:
            self.teacher, _ = build_teacher(self.config, devices=list(plan.mesh.devices.flatten()))
        finally:
            keras.distribution.set_distribution(plan.distribution())  # the student's, for everything after
        check_same_tokenizer(self.config, causal_lm.preprocessor.tokenizer, self.teacher.preprocessor.tokenizer)
        print(f"teacher built in {time.perf_counter() - started:.1f}s")

    def prepare(self, data):
        return prepare_batches(data, self.config)

    def compile(self, causal_lm, optimizer):
        return compile_distillation(causal_lm, self.teacher, self.config, optimizer)

    def describe(self, results):
        return f"{super().describe(results)}, divergence {results.get('divergence', float('nan')):.4f}"

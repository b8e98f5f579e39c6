"""Optimizer builder: AdamW with weight-decay exclusion, or SGD; schedules, clipping, accumulation.

Example:

```python
optimizer = keras_tune.build_optimizer(config.optimizer, total_steps=1000)
causal_lm.compile(optimizer=optimizer, ...)
```
"""

import math

import keras

# Norm scales and biases are not weights that should be pulled towards zero:
# decaying an RMSNorm scale changes the activation scale of every layer.
NO_DECAY_NAMES = ("bias", "scale")
# RecurrentGemma's RG-LRU (its recurrence parameter and both gates, weights and
# biases), as the reference fine-tuning recipe excludes them: decay would shorten
# the recurrence's memory. Only that model has variables of these names.
RG_LRU_NAMES = ("a_param", "input_gate", "a_gate")


@keras.saving.register_keras_serializable(package="keras_tune")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then constant, cosine or linear decay to `peak * final_fraction`.

    Args:
        peak: learning rate reached at the end of warmup.
        total_steps: steps of the whole run (warmup included).
        warmup_steps: steps of linear warmup from 0.
        decay: "constant", "cosine" or "linear".
        final_fraction: where decay ends, as a fraction of `peak`.
    """

    def __init__(self, peak, total_steps, warmup_steps=0, decay="cosine", final_fraction=0.0):
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.final_fraction = float(final_fraction)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = keras.ops.cast(max(self.warmup_steps, 1), "float32")
        warm = self.peak * keras.ops.minimum(step + 1.0, warmup) / warmup
        if self.decay == "constant":
            decayed = keras.ops.convert_to_tensor(self.peak, "float32")
        else:
            span = float(max(self.total_steps - self.warmup_steps, 1))
            progress = keras.ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            if self.decay == "cosine":
                shape = 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
            else:
                shape = 1.0 - progress
            decayed = self.peak * (self.final_fraction + (1.0 - self.final_fraction) * shape)
        if self.warmup_steps == 0:
            return decayed
        return keras.ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "final_fraction": self.final_fraction,
        }


@keras.saving.register_keras_serializable(package="keras_tune")
class PerUpdate(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule of optimizer updates, read at Keras' batch count when gradients accumulate.

    With `gradient_accumulation_steps=N` Keras calls the schedule with the
    number of batches seen, not of updates made; this wrapper divides, so the
    learning rate an update applies is `schedule(update)`, what `metrics.csv` logs.

    Args:
        schedule: a `LearningRateSchedule` over optimizer updates.
        batches_per_update: N.
    """

    def __init__(self, schedule, batches_per_update):
        self.schedule = schedule
        self.batches_per_update = int(batches_per_update)

    def __call__(self, step):
        return self.schedule(keras.ops.floor_divide(step, self.batches_per_update))

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule),
                "batches_per_update": self.batches_per_update}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["schedule"]), config["batches_per_update"])


def learning_rate_schedule(optimizer_config, total_steps):
    """The learning rate (a float, or a schedule when warmup or decay is asked for).

    Args:
        optimizer_config: the `optimizer` section of a run config.
        total_steps: optimizer updates of the whole run (warmup counts updates too).
    """
    if optimizer_config.schedule == "constant" and optimizer_config.warmup_steps == 0:
        return optimizer_config.learning_rate
    return WarmupDecay(
        optimizer_config.learning_rate,
        total_steps=total_steps,
        warmup_steps=optimizer_config.warmup_steps,
        decay=optimizer_config.schedule,
    )


def build_optimizer(optimizer_config, total_steps):
    """Builds the optimizer the config describes.

    Args:
        optimizer_config: the `optimizer` section of a run config (name,
            learning_rate, weight_decay, exclude_embeddings_from_decay, betas,
            epsilon, momentum, schedule, warmup_steps, clipnorm,
            accumulation_steps).
        total_steps: optimizer updates of the whole run, for the schedule
            (with accumulation, Keras' batch count is read per update: `PerUpdate`).

    Returns:
        A `keras.optimizers.AdamW` or `keras.optimizers.SGD`.
    """
    rate, accumulation = learning_rate_schedule(optimizer_config, total_steps), optimizer_config.accumulation_steps
    if accumulation > 1 and callable(rate):
        rate = PerUpdate(rate, accumulation)
    common = dict(
        learning_rate=rate,
        global_clipnorm=optimizer_config.clipnorm or None,
        gradient_accumulation_steps=accumulation if accumulation > 1 else None,
    )
    if optimizer_config.name == "sgd":
        # The memory-light choice: no state at all without momentum.
        optimizer = keras.optimizers.SGD(
            momentum=optimizer_config.momentum, weight_decay=optimizer_config.weight_decay or None, **common
        )
    else:
        optimizer = keras.optimizers.AdamW(
            weight_decay=optimizer_config.weight_decay,
            beta_1=optimizer_config.beta_1,
            beta_2=optimizer_config.beta_2,
            epsilon=optimizer_config.epsilon,
            **common,
        )
    names = list(NO_DECAY_NAMES + RG_LRU_NAMES)
    if optimizer_config.exclude_embeddings_from_decay:
        names.append("embeddings")
    if optimizer.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=names)
    return optimizer


def optimizer_slots(optimizer_config):
    """State tensors the optimizer keeps per trainable variable (for memory planning)."""
    if optimizer_config.name == "sgd":
        return 1 if optimizer_config.momentum else 0
    return 2

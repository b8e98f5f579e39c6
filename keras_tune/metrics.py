"""Keras metrics keras_tune adds to `compile`: token counts for the throughput figures."""

import keras


@keras.saving.register_keras_serializable(package="keras_tune")
class TokenCount(keras.metrics.Metric):
    """Counts target positions in the batches seen since the last reset.

    `keras_tune.callbacks.Throughput` turns the running count into tokens/s; it
    is counted on device, so it costs no host sync.

    Args:
        pad_token_id: with `non_pad=True`, targets equal to it are not counted.
        non_pad: count only targets that are not padding.
    """

    def __init__(self, pad_token_id=0, non_pad=False, name=None, **kwargs):
        super().__init__(name=name or ("non_pad_tokens" if non_pad else "tokens"), **kwargs)
        self.pad_token_id = int(pad_token_id)
        self.non_pad = bool(non_pad)
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="count")

    def update_state(self, y_true, y_pred=None, sample_weight=None):
        if self.non_pad:
            counted = keras.ops.sum(keras.ops.cast(keras.ops.not_equal(y_true, self.pad_token_id), "float32"))
        else:
            counted = keras.ops.cast(keras.ops.size(y_true), "float32")
        self.count.assign_add(counted)

    def result(self):
        return keras.ops.convert_to_tensor(self.count)

    def get_config(self):
        return {**super().get_config(), "pad_token_id": self.pad_token_id, "non_pad": self.non_pad}


@keras.saving.register_keras_serializable(package="keras_tune")
class StepLoss(keras.metrics.Metric):
    """The loss of the latest batch alone: its token-weighted mean next-token NLL.

    The `loss` Keras logs during an epoch is the running mean of its batches, in
    float32; a step's own loss read back from two running means loses digits as
    the epoch grows (at step 600 of an epoch, about 1e-4), so a run resumed
    mid-epoch would log other numbers than the uninterrupted one. This metric is
    the batch's own figure, computed as the compiled loss computes it
    (`mean_with_sample_weight`), so `metrics.csv` logs each step's loss exactly,
    wherever an epoch starts. Give it in `weighted_metrics`.

    Args:
        from_logits: `y_pred` are logits (keras-hub's plain path); otherwise it is
            `SparseLossModel`'s output, whose first channel is the NLL.
        name: the metric's name.
    """

    def __init__(self, from_logits=False, name="step_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.from_logits = bool(from_logits)
        self.value = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="value")

    def update_state(self, y_true, y_pred, sample_weight=None):
        ops = keras.ops
        if self.from_logits:
            nll = ops.sparse_categorical_crossentropy(y_true, ops.cast(y_pred, "float32"), from_logits=True)
        else:
            nll = ops.cast(y_pred[..., 0], "float32")
        weights = ops.ones_like(nll) if sample_weight is None else ops.cast(sample_weight, "float32")
        self.value.assign(ops.divide_no_nan(ops.sum(nll * weights), ops.sum(weights)))

    def result(self):
        return keras.ops.convert_to_tensor(self.value)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}

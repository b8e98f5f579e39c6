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

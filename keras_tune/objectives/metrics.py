"""The loss and metrics of the objectives' trainers, read off one `[rows, channels]` output.

A distillation or preference trainer (`keras_tune.objectives.distill`,
`keras_tune.objectives.preference`) returns one row of figures per batch row
(a sequence, or a preference pair): channel 0 is the row's share of the batch
loss, already normalized by the batch's total loss weight, so Keras' mean over
rows is the token- (or pair-) weighted mean; the other channels are sums
(weighted NLL, weight, correct argmaxes, divergence, log-probabilities...).

A metric is then a ratio of two channels summed over everything seen
(`ChannelRatio`): exact over a whole evaluation, as keras_tune's perplexity is
(`keras_tune.losses.NllPerplexity`). With `step=True` it is the ratio over the
latest batch alone: what `metrics.csv` logs per step (as `metrics.StepLoss`
does for the loss), while the running one feeds the progress bar and validation.
"""

import keras


@keras.saving.register_keras_serializable(package="keras_tune")
class RowLoss(keras.losses.Loss):
    """The loss of an objective trainer: channel 0 of its output, averaged over rows.

    Args:
        name: the loss's name.
        reduction: a keras reduction (the mean over rows).
    """

    def __init__(self, name="row_loss", reduction="sum_over_batch_size", **kwargs):
        super().__init__(name=name, reduction=reduction, **kwargs)

    def call(self, y_true, y_pred):
        return y_pred[:, 0]


@keras.saving.register_keras_serializable(package="keras_tune")
class ChannelRatio(keras.metrics.Metric):
    """`sum(channel numerator) / sum(channel denominator)` over the batches seen (or the latest one).

    Args:
        numerator: the channel summed on top.
        denominator: the channel summed below; None counts rows.
        exponentiate: report `exp` of the ratio (a perplexity from NLLs).
        step: the latest batch's own ratio (`metrics.csv`'s per-step columns), not a running one.
        name: the metric's name.
    """

    def __init__(self, numerator, denominator=None, exponentiate=False, step=False, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.numerator, self.denominator = int(numerator), None if denominator is None else int(denominator)
        self.exponentiate, self.step = bool(exponentiate), bool(step)
        self.top = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="top")
        self.bottom = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="bottom")

    def update_state(self, y_true, y_pred, sample_weight=None):
        ops = keras.ops
        values = ops.cast(y_pred, "float32")
        top = ops.sum(values[:, self.numerator])
        if self.denominator is None:
            bottom = ops.cast(ops.shape(values)[0], "float32")
        else:
            bottom = ops.sum(values[:, self.denominator])
        if self.step:
            self.top.assign(top)
            self.bottom.assign(bottom)
        else:
            self.top.assign_add(top)
            self.bottom.assign_add(bottom)

    def result(self):
        ratio = keras.ops.divide_no_nan(self.top, self.bottom)
        return keras.ops.exp(ratio) if self.exponentiate else ratio

    def get_config(self):
        return {**super().get_config(), "numerator": self.numerator, "denominator": self.denominator,
                "exponentiate": self.exponentiate, "step": self.step}


@keras.saving.register_keras_serializable(package="keras_tune")
class ChannelSum(keras.metrics.Metric):
    """A channel summed since the last reset: the token counts `keras_tune.callbacks.Throughput` reads.

    Args:
        channel: the channel.
        name: "tokens" or "non_pad_tokens" (what `Throughput` looks for).
    """

    def __init__(self, channel, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.channel = int(channel)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.total.assign_add(keras.ops.sum(keras.ops.cast(y_pred[:, self.channel], "float32")))

    def result(self):
        return keras.ops.convert_to_tensor(self.total)

    def get_config(self):
        return {**super().get_config(), "channel": self.channel}


def metric_set(ratios, tokens_channel, non_pad_channel, columns=()):
    """The metrics of an objective trainer: running ratios, the per-step `step_<name>` of `columns`, token counts.

    Args:
        ratios: `{name: (numerator, denominator, exponentiate)}` (the loss is Keras' own).
        tokens_channel: the channel counting a row's positions.
        non_pad_channel: the channel counting a row's non-padding targets.
        columns: names among `ratios` that `metrics.csv` logs per step (and `step_loss`, always).

    Returns:
        A list of Keras metrics for `compile(metrics=...)`.
    """
    metrics = [ChannelRatio(top, bottom, exponentiate=exp, name=name) for name, (top, bottom, exp) in ratios.items()]
    metrics.append(ChannelRatio(0, None, step=True, name="step_loss"))
    metrics += [ChannelRatio(*ratios[name][:2], exponentiate=ratios[name][2], step=True, name=f"step_{name}")
                for name in columns]
    return metrics + [ChannelSum(tokens_channel, name="tokens"), ChannelSum(non_pad_channel, name="non_pad_tokens")]

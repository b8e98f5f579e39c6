"""The shared pipeline: examples -> tokens (in tf.data) -> rows -> `(x, y, sample_weight)` batches.

A recipe hands over a `Source`: tf.data datasets of examples, each example a list
of text *segments* with a loss weight each (a document is `[text]` with weight 1;
a translation pair is `[prompt, target]` with weights `[0, 1]`; a chat is its
turns). From there every recipe takes the same path, one module a step:

1. **Tokenize once, inside tf.data** (`keras_tune.data.tokens`).
2. **Lay tokens out in rows** of `length + 1` ids (`keras_tune.data.layout`):
   `pack` (documents cut from one stream, or whole examples placed best fit
   decreasing), `bucket` or `pad`; `auto` packs documents, and packs
   prompt/response and chat examples whole while that still fills a batch.
3. **Batch in tf.data** (`keras_tune.data.streams`): every epoch reshuffled,
   its order a function of the seed and the epoch alone, so a resumed run sees
   the batches an uninterrupted one does.

`make_bundle` puts them together and fills the `DataReport`. Each batch is
`({"token_ids": int32[B, L], "padding_mask": bool[B, L]}, y: int32[B, L],
sample_weight: float32[B, L])`, what keras-hub's Gemma causal LMs take in `fit`
with `preprocessor=None` (packed documents send int32 segment ids as the mask).
The weight is 0 on prompt and padding positions and 1 on targets (including
`<eos>`), times the key-token factor `alpha * (1 + number of key tokens in the
row)` when `key_token_alpha > 0` (training split only: validation loss stays a
plain mean, comparable across runs).
"""

import dataclasses
from collections import Counter

import numpy as np

from keras_tune.data.layout import (
    RowSpec,
    count_key_tokens,
    drop_without_target,
    key_token_sequences,
    lay_out,
    packs_a_batch,
    row_lengths,
)
from keras_tune.data.report import DataReport, SplitReport
from keras_tune.data.streams import train_stream, validation_dataset
from keras_tune.data.tokens import tokenize
from keras_tune.errors import UserError


REPORT_BATCHES = 32


@dataclasses.dataclass
class Source:
    """What a recipe hands to the pipeline.

    Attributes:
        recipe: the recipe's name.
        kind: "text" (documents: packed under `auto`) or "prompt" (examples with a
            prompt that carries no loss: bucketed under `auto`).
        train: tf.data.Dataset of `{"segments": tf.string[n], "weights": tf.float32[n]}`.
        train_source: where the training examples came from, in words.
        validation: the same for validation, or None.
        validation_source: where the validation examples came from, in words.
        train_dropped: reason -> examples the recipe read but could not use.
        validation_dropped: the same for validation.
        notes: lines for the report.
    """

    recipe: str
    kind: str
    train: object
    train_source: str
    validation: object = None
    validation_source: str = ""
    train_dropped: Counter = dataclasses.field(default_factory=Counter)
    validation_dropped: Counter = dataclasses.field(default_factory=Counter)
    notes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DataBundle:
    """The datasets `fit` trains and evaluates on, and what was done to make them.

    Attributes:
        train: tf.data.Dataset of `(x, y, sample_weight)` batches: the first epoch,
            the same batches on every pass. `train_stream()` continues with the
            next epochs, each reshuffled: train on that.
        validation: the same for validation (one pass, every example once), or None.
        report: a `DataReport`; `report.summary()` is printed at the start of a run.
        steps_per_epoch: batches in one pass over `train`.
        validation_steps: batches in one pass over `validation` (0 when None).
        stream: `start_step -> dataset`, what `train_stream` returns (None: `train` repeated).
    """

    train: object
    validation: object
    report: DataReport
    steps_per_epoch: int | None
    validation_steps: int = 0
    stream: object = None

    def train_stream(self, start_step=0):
        """The endless training stream from global step `start_step` (what `fit` trains on).

        Batch `s` is the same whichever step the stream starts at, so a run resumed
        at step `k` trains on what an uninterrupted run trains on after step `k`.

        Args:
            start_step: batches already trained (a resumed run's step).
        """
        if self.stream is not None:
            return self.stream(start_step)
        return self.train.repeat().skip(start_step)  # a bundle made by hand: its one epoch, over and over

    def map(self, function):
        """Applies `function` (dataset -> dataset) to train, validation and every `train_stream`.

        Args:
            function: takes and returns a tf.data.Dataset of batches.
        """
        self.train = function(self.train)
        self.validation = None if self.validation is None else function(self.validation)
        if self.stream is not None:
            stream = self.stream
            self.stream = lambda start_step=0: function(stream(start_step))
        return self


def make_bundle(source, tokenizer, data_config, seed=0, log=print):
    """Tokenizes a recipe's `Source` and returns a `DataBundle` of batched datasets.

    Args:
        source: a `Source` from a recipe.
        tokenizer: the preset's keras-hub tokenizer.
        data_config: the `data` section of the run config (seq_len, batch_size,
            batching, shuffle_buffer, key_tokens, key_token_alpha are read here).
        seed: seeds shuffling and mixing; the same seed gives the same batches.
        log: callable for progress lines (None for quiet).
    """
    seq_len, batch_size = int(data_config.seq_len), int(data_config.batch_size)
    batching = data_config.batching
    if batching not in ("auto", "pack", "bucket", "pad"):
        raise UserError(f"data.batching '{data_config.batching}'; expected one of auto, pack, bucket, pad")
    whole = source.kind != "text"  # prompt/response and chat examples are packed whole
    if batching == "auto" and not whole:
        batching = "pack"
    report = DataReport(recipe=source.recipe, batching=batching, seq_len=seq_len, batch_size=batch_size)
    report.notes += source.notes
    train_tok, val_tok = _tokenize_splits(source, tokenizer, seq_len, batching == "pack" and not whole, report, log,
                                          drop_overlong=data_config.get("overlong", "truncate") == "drop")
    if batching == "auto":  # whole examples: packed while that still fills a batch
        batching = report.batching = "pack" if packs_a_batch(train_tok, seq_len, batch_size) else "bucket"
    lengths = row_lengths(batching, train_tok, val_tok, seq_len, batch_size)
    report.bucket_lengths = tuple(int(n) for n in lengths)
    spec = RowSpec(
        seq_len, batch_size, int(tokenizer.start_token_id), int(tokenizer.end_token_id), int(tokenizer.pad_token_id),
        batching=batching, whole=whole,
        documents=batching == "pack" and not data_config.get("cross_document_attention", False),
    )
    report.document_masking = spec.documents
    report.whole_examples = batching == "pack" and whole
    train_groups = lay_out(train_tok, spec, lengths, report.train)
    report.train.sequences = int(sum(len(g) for g in train_groups))
    report.train.batches = int(sum(len(g) // batch_size for g in train_groups))
    report.train.left_out_per_epoch = int(sum(len(g) % batch_size for g in train_groups))
    if report.train.batches == 0:
        raise UserError(
            f"recipe '{source.recipe}': the training split makes {report.train.sequences} sequences of "
            f"length {seq_len}, fewer than batch_size {batch_size}; expected more data, a smaller "
            "seq_len or a smaller batch_size"
        )

    _weigh_key_tokens(train_groups, tokenizer, data_config, report)
    stream = train_stream(train_groups, batch_size, seed, int(data_config.shuffle_buffer))
    train = stream(0).take(report.train.batches)
    validation, validation_steps = None, 0
    if val_tok is not None:
        val_groups = lay_out(val_tok, spec, lengths, report.validation)
        val_groups = [g for g in val_groups if len(g)]
        validation, filler = validation_dataset(val_groups, batch_size)
        report.validation.sequences = int(sum(len(g) for g in val_groups))
        report.validation.filler_rows = filler
        validation_steps = (report.validation.sequences + filler) // batch_size
        report.validation.batches = validation_steps

    measure_padding(train, report)
    return DataBundle(train, validation, report, report.train.batches, validation_steps, stream)


def _tokenize_splits(source, tokenizer, seq_len, streamed, report, log, drop_overlong=False):
    """Tokenizes the train (and validation) examples; drops and counts the unusable ones.

    With `drop_overlong`, whole examples (not a stream of documents) longer than a
    row are dropped and counted instead of cut (`data.overlong = "drop"`).

    Returns:
        `(train Tokenized, validation Tokenized or None)`.

    Raises:
        UserError: no training example is left.
    """
    splits = {"train": (source.train, source.train_source, source.train_dropped)}
    if source.validation is not None:
        splits["validation"] = (source.validation, source.validation_source, source.validation_dropped)
    tokens = {}
    for split, (dataset, where, dropped) in splits.items():
        split_report = SplitReport(source=where, dropped=Counter(dropped))
        tok = tokenize(dataset, tokenizer, log=log, what=f"{split} examples")
        split_report.read = len(tok.lengths) + sum(dropped.values())
        empty = tok.lengths == 0
        split_report.dropped["empty after tokenizing"] += int(empty.sum())
        tok = drop_without_target(tok.select(~empty), seq_len, streamed, split_report)
        if drop_overlong and not streamed:
            fits = tok.lengths + 2 <= seq_len + 1  # with <bos> and <eos>, within a row of seq_len + 1 ids
            split_report.dropped[f"longer than seq_len {seq_len} (--overlong drop)"] += int((~fits).sum())
            tok = tok.select(fits)
        split_report.tokens = int(len(tok.ids))
        split_report.dropped = Counter({k: v for k, v in split_report.dropped.items() if v})
        tokens[split] = tok
        if split == "train":
            report.train = split_report
        else:
            report.validation = split_report
    if not len(tokens["train"].lengths):
        raise UserError(
            f"recipe '{source.recipe}': no usable training examples in {source.train_source} "
            f"(read {report.train.read}, dropped {dict(report.train.dropped)}); expected at least "
            f"{report.batch_size}"
        )
    validation = tokens.get("validation")
    if validation is not None and not len(validation.lengths):
        report.notes.append(f"no validation: no usable examples in {source.validation_source}")
        validation = None
    return tokens["train"], validation


def _weigh_key_tokens(train_groups, tokenizer, data_config, report):
    """Scales each training row's weights by `alpha * (1 + its key tokens)` when `key_token_alpha > 0`."""
    alpha = float(data_config.key_token_alpha)
    if alpha <= 0:
        return
    sequences = key_token_sequences(tokenizer, tuple(data_config.key_tokens))
    report.key_token_ids = {word: [list(s) for s in spellings] for word, spellings in sequences.items()}
    for rows in train_groups:
        scale = alpha * (1.0 + count_key_tokens(rows, sequences))
        rows.weights *= scale[:, None].astype(np.float32)


def measure_padding(train, report):
    """Fills the report's padding and loss shares from the first training batches."""
    positions = padding = loss = 0
    for x, _, weight in train.take(REPORT_BATCHES).as_numpy_iterator():
        positions += x["padding_mask"].size
        padding += int((x["padding_mask"] == 0).sum())  # a bool mask or segment ids
        loss += int((weight > 0).sum())
        report.sampled_batches += 1
    report.pad_fraction = padding / max(positions, 1)
    report.loss_fraction = loss / max(positions, 1)

"""The shared pipeline: examples -> tokens (in tf.data) -> rows -> `(x, y, sample_weight)` batches.

A recipe hands over a `Source`: tf.data datasets of examples, each example a list
of text *segments* with a loss weight each (a document is `[text]` with weight 1;
a translation pair is `[prompt, target]` with weights `[0, 1]`; a chat is its
turns). From there every recipe takes the same path:

1. **Tokenize once, inside tf.data.** Examples are batched and the keras-hub
   tokenizer runs as a TF graph op (tensorflow-text SentencePiece) in a parallel
   `map`, with prefetch. No Python call per example. The token ids of the whole
   split are kept in memory (4 bytes a token), which makes the counts in the
   report exact and lets every epoch reshuffle whole sequences cheaply.
2. **Lay tokens out in rows** of `length + 1` ids (x is a row without its last id,
   y is the row shifted by one, as keras-hub's `CausalLMPreprocessor` does):
   - `pack`, documents (text recipes): every example's tokens followed by
     `<eos>` form one stream, which is cut into rows of `seq_len` tokens, each
     row led by `<bos>` (Gemma expects `<bos>` at position 0). The targets of
     the rows, read in order, are the stream itself: every token exactly once,
     none thrown away. Only the last row is padded, and padding carries no loss.
   - `pack`, prompt/response and chat examples: whole examples (`<bos>` + tokens
     + `<eos>`) share rows, placed longest first into the row with the least
     room that holds them (best fit decreasing), never one across two rows, so
     a target always sits with its prompt. Each is a segment of its own
     (document masking), so its loss is the one it has alone in a row. `auto`
     packs them when that still makes a batch, and buckets them otherwise.
   - `bucket`: one example a row, `<bos>` + tokens + `<eos>`, padded to the
     smallest of a few bucket lengths (at most `MAX_BUCKETS`, chosen from the
     data's length histogram to waste the least padding); the few rows that
     would not fill a bucket's last batch move up a bucket, so fewer than one
     batch of rows sits out an epoch. Examples longer than
     `seq_len` are truncated and counted; a cut row ends where it is cut (no
     `<eos>` forced in, unlike keras-hub's packer, so no false ending is taught).
   - `pad`: the seeds' recipe: one example a row, padded to `seq_len`.
3. **Batch in tf.data**: each bucket's rows are shuffled, cut into batches of a
   static size (sharded across devices; the remainder sits out the epoch) and
   the buckets' batches mixed in a random order. Every epoch is reshuffled, and
   its order is a function of the seed and the epoch number alone
   (`epoch_order`): `DataBundle.train_stream(k)` from step k is the tail of the
   stream from step 0, so a resumed run sees the batches an uninterrupted one
   does. Shapes are static per bucket, so XLA compiles one program a bucket length.

Each batch is `({"token_ids": int32[B, L], "padding_mask": bool[B, L]},
y: int32[B, L], sample_weight: float32[B, L])`, what keras-hub's Gemma causal LMs
take in `fit` with `preprocessor=None`. The weight is 0 on prompt and padding
positions and 1 on targets (including `<eos>`), times the key-token factor
`alpha * (1 + number of key tokens in the row)` when `key_token_alpha > 0`
(training split only: validation loss stays a plain mean, comparable across runs).
"""

import dataclasses
import time
from collections import Counter

import numpy as np

from keras_tune.data.report import DataReport, SplitReport
from keras_tune.errors import UserError

MAX_BUCKETS = 4
TOKENIZE_BATCH = 256
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


@dataclasses.dataclass
class Tokenized:
    """Token ids of a split: example i is `ids[starts[i]:starts[i] + lengths[i]]`."""

    ids: np.ndarray
    weights: np.ndarray
    lengths: np.ndarray

    @property
    def starts(self):
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def select(self, keep):
        """Returns the examples where the boolean array `keep` is set."""
        owner = np.repeat(keep, self.lengths)
        return Tokenized(self.ids[owner], self.weights[owner], self.lengths[keep])


@dataclasses.dataclass
class Rows:
    """Rows of `length + 1` token ids, their loss weights and real-token mask.

    `segments`, when set, numbers the documents of each packed row (0 on
    padding); it replaces the padding mask so attention stays inside a document.
    `documents` counts the documents (or pieces of one) in each row.
    """

    ids: np.ndarray
    weights: np.ndarray
    mask: np.ndarray
    segments: np.ndarray = None
    documents: np.ndarray = None

    def __len__(self):
        return len(self.ids)

    def take(self, index):
        """The rows at `index` (an integer array), all fields alike."""
        pick = lambda array: None if array is None else array[index]  # noqa: E731
        return Rows(self.ids[index], self.weights[index], self.mask[index], pick(self.segments), pick(self.documents))

    def columns(self):
        """The per-row arrays a tf.data pipeline slices: ids, weights, and the mask or segment ids."""
        return self.ids, self.weights, (self.mask if self.segments is None else self.segments)


# ---------------------------------------------------------------------------
# Examples in, tokens out.


def examples_dataset(examples):
    """Returns a tf.data.Dataset of examples given as `(segments, weights)` pairs.

    Args:
        examples: a list of `(list of str, list of float)` of equal lengths.
    """
    import tensorflow as tf

    lengths = np.array([len(s) for s, _ in examples], np.int64)
    texts = [t for s, _ in examples for t in s]
    weights = np.array([w for _, ws in examples for w in ws], np.float32)
    segments = tf.RaggedTensor.from_row_lengths(tf.constant(texts, tf.string, shape=[len(texts)]), lengths)
    weights = tf.RaggedTensor.from_row_lengths(weights, lengths)
    return tf.data.Dataset.from_tensor_slices({"segments": segments, "weights": weights})


def document_example(text):
    """Maps a tf.string scalar to a one-segment example with weight 1 (for tf.data `map`)."""
    import tensorflow as tf

    return {"segments": tf.reshape(text, [-1]), "weights": tf.ones([1], tf.float32)}


def tokenize(dataset, tokenizer, log=None, what="examples"):
    """Tokenizes every example of `dataset` inside tf.data and returns a `Tokenized`.

    Args:
        dataset: tf.data.Dataset of `{"segments": tf.string[n], "weights": tf.float32[n]}`.
        tokenizer: a keras-hub tokenizer, run as a TF graph op.
        log: optional callable for progress lines on long inputs.
        what: the name of the split, for progress lines.
    """
    import tensorflow as tf

    def tokenize_batch(batch):
        segments, weights = batch["segments"], batch["weights"]
        if not isinstance(segments, tf.RaggedTensor):
            segments = tf.RaggedTensor.from_tensor(segments)
            weights = tf.RaggedTensor.from_tensor(weights)
        pieces = tokenizer(segments.flat_values)  # [segments, tokens]
        if not isinstance(pieces, tf.RaggedTensor):
            pieces = tf.RaggedTensor.from_tensor(pieces)
        token_weights = tf.repeat(weights.flat_values, pieces.row_lengths())
        per_example = tf.RaggedTensor.from_row_splits(pieces, segments.row_splits).merge_dims(1, 2)
        return (
            tf.cast(per_example.flat_values, tf.int32),
            per_example.row_lengths(),
            token_weights,
        )

    def run():
        batches = (
            dataset.ragged_batch(TOKENIZE_BATCH)
            .map(tokenize_batch, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE)
        )
        ids, lengths, weights = [], [], []
        count, last = 0, time.time()
        for batch_ids, batch_lengths, batch_weights in batches.as_numpy_iterator():
            ids.append(batch_ids)
            lengths.append(batch_lengths)
            weights.append(batch_weights)
            count += len(batch_lengths)
            if log and time.time() - last > 5:
                log(f"  tokenized {count} {what}")
                last = time.time()
        return ids, lengths, weights

    try:
        ids, lengths, weights = run()
    except tf.errors.NotFoundError as error:
        # `keras.utils.set_random_seed` (its `tf.random.set_seed`) after the tokenizer
        # was built drops the SentencePiece op's model resource: the tokenizer still
        # works eagerly but not inside tf.data. Building the op again restores it.
        if "SentencepieceOp" not in str(error) or not hasattr(tokenizer, "set_proto"):
            raise
        tokenizer.set_proto(tokenizer.proto)
        ids, lengths, weights = run()
    if not lengths:
        return Tokenized(np.zeros([0], np.int32), np.zeros([0], np.float32), np.zeros([0], np.int64))
    return Tokenized(np.concatenate(ids), np.concatenate(weights), np.concatenate(lengths).astype(np.int64))


# ---------------------------------------------------------------------------
# Tokens in, rows out.


def with_specials(tok, bos, eos):
    """Returns `tok` with `<eos>` after every example and, if `bos` is not None, `<bos>` before.

    `<bos>` carries weight 0 (nothing predicts it); `<eos>` takes the weight of the
    example's last token (1 after a document or a target, 0 after a prompt).
    """
    n = len(tok.lengths)
    extra = 1 if bos is None else 2
    lead = 0 if bos is None else 1
    lengths = tok.lengths + extra
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ids = np.empty(int(lengths.sum()), np.int32)
    weights = np.empty(len(ids), np.float32)
    owner = np.repeat(np.arange(n), tok.lengths)
    position = np.arange(len(tok.ids)) + owner * extra + lead
    ids[position] = tok.ids
    weights[position] = tok.weights
    if bos is not None:
        ids[starts] = bos
        weights[starts] = 0.0
    last = tok.starts + tok.lengths - 1
    ids[starts + lengths - 1] = eos
    weights[starts + lengths - 1] = tok.weights[last]
    return Tokenized(ids, weights, lengths)


def pack(tok, seq_len, bos, eos, pad, documents=False):
    """Packs examples into rows: `<bos>` + `seq_len` tokens of the `<eos>`-joined stream.

    Row i holds stream tokens `[i * seq_len, (i + 1) * seq_len)` after its `<bos>`,
    so the targets (`row[1:]`) of the rows in order are the stream, every token once.
    The last row is padded with `pad` (mask 0, weight 0).

    Args:
        tok: the split's tokens.
        seq_len: model input length.
        bos, eos, pad: special token ids.
        documents: mask documents apart: every example starts with its own
            `<bos>` (weight 0), as Gemma was trained, and the rows carry segment
            ids (see `keras_tune.models.document_mask`).
    """
    stream = with_specials(tok, bos if documents else None, eos)
    total = len(stream.ids)
    full, tail = divmod(total, seq_len)
    count = full + (1 if tail else 0)
    ids = np.full((count, seq_len + 1), pad, np.int32)
    weights = np.zeros((count, seq_len + 1), np.float32)
    mask = np.zeros((count, seq_len + 1), bool)
    ids[:, 0] = bos
    mask[:, 0] = True
    ids[:full, 1:] = stream.ids[: full * seq_len].reshape(full, seq_len)
    weights[:full, 1:] = stream.weights[: full * seq_len].reshape(full, seq_len)
    mask[:full, 1:] = True
    if tail:
        ids[full, 1 : 1 + tail] = stream.ids[full * seq_len :]
        weights[full, 1 : 1 + tail] = stream.weights[full * seq_len :]
        mask[full, 1 : 1 + tail] = True
    # A document starts where the stream does, and after every <eos>.
    starts = np.zeros((count, seq_len + 1), bool)
    flat = np.zeros(count * seq_len, bool)
    flat[stream.starts] = True
    starts[:, 1:] = flat.reshape(count, seq_len)
    starts &= mask
    # Pieces of documents a row holds: those that start in it, plus one continued into it.
    pieces = starts[:, 1:].sum(axis=1) + (mask[:, 1] & ~starts[:, 1])
    segments = None
    if documents:
        starts[:, 0] = True  # the row's leading <bos> opens segment 1
        segments = np.where(mask, np.cumsum(starts, axis=1), 0).astype(np.int32)
    return Rows(ids, weights, mask, segments, pieces.astype(np.int64))


def best_fit_decreasing(sizes, capacity):
    """Places items in bins: longest first, each into the fullest bin it fits (a new one if none).

    Returns `(bin, offset, ordinal)` per item: its bin, where it starts in the
    bin, and how many items the bin held before it. Bins are kept by free
    space, with a bit set (in one Python integer) for each free space some bin
    has, so finding the fullest bin that fits is a shift and a lowest-bit
    search: about a microsecond an item at row lengths in the thousands.

    Args:
        sizes: item sizes, each at most `capacity`.
        capacity: a bin's size.
    """
    sizes = np.asarray(sizes, np.int64)
    placed = np.empty((3, len(sizes)), np.int64)
    by_free = [[] for _ in range(capacity + 1)]  # free space -> bins with exactly that much left
    has_free = 0  # bit f set while by_free[f] holds a bin
    used, held = [], []  # per bin: length filled, items placed
    for item in np.argsort(-sizes, kind="stable"):
        size = int(sizes[item])
        fitting = has_free >> size
        if fitting:
            free = size + (fitting & -fitting).bit_length() - 1
            chosen = by_free[free].pop()
            if not by_free[free]:
                has_free &= ~(1 << free)
        else:
            chosen = len(used)
            used.append(0)
            held.append(0)
        placed[:, item] = chosen, used[chosen], held[chosen]
        used[chosen] += size
        held[chosen] += 1
        free = capacity - used[chosen]
        if free:
            by_free[free].append(chosen)
            has_free |= 1 << free
    return placed[0], placed[1], placed[2]


def pack_examples(tok, seq_len, bos, eos, pad, documents=True):
    """Packs whole examples into rows of `seq_len + 1` ids, none split across rows.

    Each example is `<bos>` + tokens + `<eos>` (one longer than a row is cut to
    it, as `pad_rows` cuts); rows are filled by `best_fit_decreasing` and padded
    at the end (mask 0, weight 0). A row's targets are its examples' targets as
    `pad_rows` lays each out alone, and the target after an example's `<eos>`
    (the next one's `<bos>`) carries no weight.

    Args:
        tok: the split's tokens.
        seq_len: model input length.
        bos, eos, pad: special token ids.
        documents: number the examples of a row as segments (1, 2, ...; 0 on
            padding) so attention stays inside each (`keras_tune.models.document_mask`).
    """
    wrapped = with_specials(tok, bos, eos)
    width = seq_len + 1
    need = np.minimum(wrapped.lengths, width)
    row_of, offset_of, ordinal = best_fit_decreasing(need, width)
    count = int(row_of.max()) + 1 if len(need) else 0
    # Every kept token's example, its index inside the example, and where it goes.
    owner = np.repeat(np.arange(len(need)), need)
    inside = np.arange(int(need.sum())) - np.repeat(np.cumsum(need) - need, need)
    source = wrapped.starts[owner] + inside
    row, column = row_of[owner], offset_of[owner] + inside
    ids = np.full((count, width), pad, np.int32)
    weights = np.zeros((count, width), np.float32)
    segments = np.zeros((count, width), np.int32)
    ids[row, column] = wrapped.ids[source]
    weights[row, column] = wrapped.weights[source]
    segments[row, column] = ordinal[owner] + 1
    per_row = np.bincount(row_of, minlength=count).astype(np.int64)
    return Rows(ids, weights, segments > 0, segments if documents else None, per_row)


def pad_rows(examples, length, pad):
    """One row per example (already wrapped in `<bos>`/`<eos>`), cut or padded to `length + 1`."""
    width = length + 1
    kept = np.minimum(examples.lengths, width)
    index = examples.starts[:, None] + np.arange(width)[None, :]
    mask = np.arange(width)[None, :] < kept[:, None]
    index = np.where(mask, index, 0)
    ids = np.where(mask, examples.ids[index], pad).astype(np.int32)
    weights = np.where(mask, examples.weights[index], 0).astype(np.float32)
    return Rows(ids, weights, mask)


def choose_buckets(train_needs, all_needs, seq_len, batch_size, max_buckets=MAX_BUCKETS):
    """Returns sorted input lengths that waste the least padding on `all_needs`.

    Lengths are multiples of 16 (8 when `seq_len < 128`) or `seq_len` itself; the
    longest covers the longest example; every bucket holds at least `batch_size`
    training examples, so every bucket yields training batches. Solved exactly by
    dynamic programming over the candidate lengths.

    Args:
        train_needs: input length each training example needs (1..seq_len).
        all_needs: the same for training and validation examples together.
        seq_len: the longest allowed length.
        batch_size: rows a batch.
        max_buckets: most lengths to return.
    """
    step = 16 if seq_len >= 128 else 8
    top_need = int(max(all_needs))
    candidates = sorted({min(seq_len, k * step) for k in range(1, seq_len // step + 2)})
    candidates = [c for c in candidates if c < top_need] + [min(c for c in candidates if c >= top_need)]
    edges = np.array([0] + candidates)
    train_count = np.histogram(train_needs, bins=edges + 0.5)[0]
    all_count = np.histogram(all_needs, bins=edges + 0.5)[0]
    train_cum = np.concatenate([[0], np.cumsum(train_count)])
    all_cum = np.concatenate([[0], np.cumsum(all_count)])
    m = len(candidates)
    inf = float("inf")
    # best[k][i]: least positions covering needs <= candidates[i] with k buckets, the last at i.
    best = np.full((max_buckets + 1, m), inf)
    back = np.full((max_buckets + 1, m), -2, np.int64)
    for i in range(m):
        if train_cum[i + 1] >= batch_size:
            best[1][i] = all_cum[i + 1] * candidates[i]
            back[1][i] = -1
    for k in range(2, max_buckets + 1):
        for i in range(m):
            for j in range(i):
                if best[k - 1][j] == inf or train_cum[i + 1] - train_cum[j + 1] < batch_size:
                    continue
                cost = best[k - 1][j] + (all_cum[i + 1] - all_cum[j + 1]) * candidates[i]
                if cost < best[k][i]:
                    best[k][i], back[k][i] = cost, j
    k = int(np.argmin(best[:, m - 1]))
    if best[k][m - 1] == inf:
        return [candidates[-1]]
    lengths, i = [], m - 1
    while i >= 0 and k >= 1:
        lengths.append(candidates[i])
        i, k = int(back[k][i]), k - 1
    return sorted(lengths)


def key_token_sequences(tokenizer, words):
    """Returns word -> token id sequences that count as that key token.

    A word counts in two spellings, bare and after a space (`"plt"`, `" plt"`); a
    spelling whose ids contain the other's is left out so no match counts twice.
    """
    out = {}
    for word in words:
        spellings = []
        for text in (word, " " + word):
            ids = tuple(int(i) for i in np.asarray(tokenizer(text)).reshape(-1))
            if ids and ids not in spellings:
                spellings.append(ids)
        spellings.sort(key=len)
        unique = []
        for ids in spellings:
            if not any(_contains(ids, shorter) for shorter in unique):
                unique.append(ids)
        out[word] = unique
    return out


def _contains(ids, part):
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def count_key_tokens(rows, sequences):
    """Returns, for each row, how many key-token id sequences its targets contain."""
    targets, valid = rows.ids[:, 1:], rows.mask[:, 1:]
    counts = np.zeros(len(rows), np.int64)
    width = targets.shape[1]
    for spellings in sequences.values():
        for ids in spellings:
            k = len(ids)
            if k > width:
                continue
            hit = valid[:, : width - k + 1].copy()
            for t, token in enumerate(ids):
                hit &= targets[:, t : width - k + 1 + t] == token
                hit &= valid[:, t : width - k + 1 + t]
            counts += hit.sum(axis=1)
    return counts


# ---------------------------------------------------------------------------
# Rows in, tf.data out.


def _to_batch(ids, weights, mask):
    import tensorflow as tf

    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return x, ids[:, 1:], tf.cast(weights[:, 1:], tf.float32)


def shuffled(count, shuffle_buffer, rng):
    """Returns an order of `count` rows: none (`shuffle_buffer <= 1`), local, or a full permutation.

    With `shuffle_buffer < count` each row moves about `shuffle_buffer` places at
    most, as in a buffered shuffle; otherwise every order is equally likely.

    Args:
        count: rows to order.
        shuffle_buffer: the shuffle window in rows.
        rng: a `numpy.random.Generator`.
    """
    if shuffle_buffer <= 1:
        return np.arange(count)
    if shuffle_buffer >= count:
        return rng.permutation(count)
    return np.argsort(np.arange(count) + rng.random(count) * shuffle_buffer, kind="stable")


def epoch_order(sizes, batch_size, seed, epoch, shuffle_buffer):
    """Returns the batches of one training epoch as `(group of each batch, row indices [batches, batch_size])`.

    A pure function of its arguments: the order a run sees depends on the seed
    and the epoch only, never on how many iterators were made before or at which
    step a run started (a resumed run sees what an uninterrupted one does).
    Each group's rows are shuffled and cut into whole batches (the remainder
    sits out this epoch), and the batches of the groups are mixed in a random
    order.

    Args:
        sizes: rows in each group (every group holds at least `batch_size`).
        batch_size: rows a batch.
        seed: the run's data seed.
        epoch: the 0-based epoch.
        shuffle_buffer: the shuffle window (`shuffled`).
    """
    rng = np.random.default_rng([int(seed) % 2**64, int(epoch)])
    counts = [size // batch_size for size in sizes]
    groups = rng.permutation(np.repeat(np.arange(len(sizes)), counts))
    rows = np.empty((len(groups), batch_size), np.int64)
    for k, (size, count) in enumerate(zip(sizes, counts)):
        order = shuffled(size, shuffle_buffer, rng)
        rows[groups == k] = order[: count * batch_size].reshape(count, batch_size)
    return groups.astype(np.int32), rows


def train_stream(groups, batch_size, seed, shuffle_buffer):
    """Returns `start_step -> dataset`: the endless training stream from a global step, each epoch reshuffled.

    Batch `s` of the stream is batch `s % steps_per_epoch` of epoch
    `s // steps_per_epoch` (`epoch_order`), whichever step the stream starts
    at and however many iterators are made of it: no tf.data shuffle state.

    Args:
        groups: list of `Rows`, one a bucket length.
        batch_size: static rows a batch.
        seed: seeds the shuffles and the mixing.
        shuffle_buffer: the shuffle window (<= 1 means no shuffle within a group).
    """
    import tensorflow as tf

    groups = [rows for rows in groups if len(rows) >= batch_size]  # the others never fill a batch
    sizes = [len(rows) for rows in groups]
    steps_per_epoch = sum(size // batch_size for size in sizes)
    tables = [tuple(tf.constant(column) for column in rows.columns()) for rows in groups]  # once, for every stream

    def plan(epoch):
        return epoch_order(sizes, batch_size, seed, int(epoch), shuffle_buffer)

    def epoch_batches(epoch):
        group, rows = tf.numpy_function(plan, [epoch], [tf.int32, tf.int64], stateful=False)
        group.set_shape([steps_per_epoch])
        rows.set_shape([steps_per_epoch, batch_size])
        return tf.data.Dataset.from_tensor_slices((group, rows))

    def gather(group, rows):
        branches = [lambda table=table: [tf.gather(column, rows) for column in table] for table in tables]
        columns = branches[0]() if len(branches) == 1 else tf.switch_case(group, branches)
        return _to_batch(*columns)

    def from_step(start_step=0):
        first_epoch, offset = divmod(int(start_step), steps_per_epoch)
        # Skipping within the first epoch skips (group, row indices) pairs: no rows are gathered.
        dataset = tf.data.Dataset.counter(first_epoch).flat_map(epoch_batches).skip(offset)
        return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    return from_step


def validation_dataset(groups, batch_size):
    """Returns the validation dataset: every row once, in order, last batches filled with weight-0 copies."""
    import tensorflow as tf

    parts, filler = [], 0
    for rows in groups:
        missing = -len(rows) % batch_size
        ids, weights, mask = rows.columns()
        if missing:
            take = np.arange(missing) % len(rows)
            ids, mask = np.concatenate([ids, ids[take]]), np.concatenate([mask, mask[take]])
            weights = np.concatenate([weights, np.zeros_like(weights[take])])
            filler += missing
        part = tf.data.Dataset.from_tensor_slices((ids, weights, mask))
        parts.append(part.batch(batch_size, drop_remainder=True))
    dataset = parts[0]
    for part in parts[1:]:
        dataset = dataset.concatenate(part)
    return dataset.map(_to_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE), filler


# ---------------------------------------------------------------------------
# The whole path.


def assign_buckets(need, lengths, batch_size):
    """Returns each example's bucket index: the shortest length that fits, then remainders moved up.

    Going from the shortest bucket up, the `count % batch_size` longest examples of
    a bucket move to the next one (they fit there too), so every bucket but the
    longest fills whole batches and fewer than `batch_size` rows sit out an epoch.
    """
    index = np.searchsorted(np.asarray(lengths), need)
    for k in range(len(lengths) - 1):
        members = np.flatnonzero(index == k)
        extra = len(members) % batch_size
        if extra:
            longest = members[np.argsort(need[members], kind="stable")[-extra:]]
            index[longest] = k + 1
    return index


def _layout(tok, batching, seq_len, lengths, batch_size, bos, eos, pad, report, documents=False, whole=False):
    """Turns one split's tokens into a list of `Rows`, one a length in `lengths`.

    `whole`: packing keeps each example in one row (`pack_examples`), for
    prompt/response and chat examples; otherwise `pack` cuts the stream.
    """
    if batching == "pack":
        if whole:
            rows = pack_examples(tok, seq_len, bos, eos, pad, documents=documents)
            report.truncated = int((tok.lengths + 2 > seq_len + 1).sum())
        else:
            rows = pack(tok, seq_len, bos, eos, pad, documents=documents)
        report.kept = len(tok.lengths)
        report.documents_per_row = float(rows.documents.mean()) if len(rows) else 0.0
        return [rows]
    wrapped = with_specials(tok, bos, eos)
    need = np.minimum(wrapped.lengths, seq_len + 1) - 1
    index = assign_buckets(need, lengths, batch_size)
    groups = [pad_rows(wrapped.select(index == k), length, pad) for k, length in enumerate(lengths)]
    report.truncated = int((wrapped.lengths > seq_len + 1).sum())
    report.kept = int(sum(len(g) for g in groups))
    return groups


def _drop_without_target(tok, seq_len, streamed, report):
    """Drops (and counts) examples whose rows would carry no loss.

    Under bucket and pad batching, and packing whole examples, an example's row
    holds its first `seq_len` tokens as targets (after `<bos>`); if none of them
    carries weight (a prompt that fills the row), the example is dropped.
    Packing a stream (`streamed`) keeps every token.
    """
    if not len(tok.lengths):
        return tok
    starts = tok.starts
    target = tok.weights > 0
    has_target = np.add.reduceat(target.astype(np.int64), starts) > 0
    if streamed:
        fits = has_target
    else:
        position = np.arange(len(tok.ids)) - np.repeat(starts, tok.lengths)
        fits = np.add.reduceat((target & (position < seq_len)).astype(np.int64), starts) > 0
    report.dropped["no target tokens"] += int((~has_target).sum())
    report.dropped["prompt fills seq_len: no target token fits"] += int((has_target & ~fits).sum())
    return tok.select(fits)


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
    bos, eos, pad = int(tokenizer.start_token_id), int(tokenizer.end_token_id), int(tokenizer.pad_token_id)

    report = DataReport(recipe=source.recipe, batching=batching, seq_len=seq_len, batch_size=batch_size)
    report.notes += source.notes
    streamed = batching == "pack" and not whole
    tokens = _tokenize_splits(source, tokenizer, seq_len, streamed, report, log)
    train_tok = tokens["train"]
    if not len(train_tok.lengths):
        raise UserError(
            f"recipe '{source.recipe}': no usable training examples in {source.train_source} "
            f"(read {report.train.read}, dropped {dict(report.train.dropped)}); expected at least {batch_size}"
        )
    val_tok = tokens.get("validation")
    if val_tok is not None and not len(val_tok.lengths):
        report.notes.append(f"no validation: no usable examples in {source.validation_source}")
        val_tok = None

    if batching == "auto":  # whole examples: packed while that still fills a batch
        batching = report.batching = "pack" if _packs_a_batch(train_tok, seq_len, batch_size) else "bucket"
    lengths = _row_lengths(batching, train_tok, val_tok, seq_len, batch_size)
    report.bucket_lengths = tuple(int(n) for n in lengths)

    documents = batching == "pack" and not data_config.get("cross_document_attention", False)
    report.document_masking = documents
    report.whole_examples = batching == "pack" and whole
    train_groups = _layout(train_tok, batching, seq_len, lengths, batch_size, bos, eos, pad, report.train, documents,
                           whole)
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
        val_groups = _layout(val_tok, batching, seq_len, lengths, batch_size, bos, eos, pad, report.validation,
                             documents, whole)
        val_groups = [g for g in val_groups if len(g)]
        validation, filler = validation_dataset(val_groups, batch_size)
        report.validation.sequences = int(sum(len(g) for g in val_groups))
        report.validation.filler_rows = filler
        validation_steps = (report.validation.sequences + filler) // batch_size
        report.validation.batches = validation_steps

    _measure_padding(train, report)
    return DataBundle(train, validation, report, report.train.batches, validation_steps, stream)


def _packs_a_batch(tok, seq_len, batch_size):
    """Whether `pack_examples` makes at least `batch_size` rows of `tok`.

    Packing makes at least `ceil(tokens / row)` rows, so only data that could
    fit fewer rows than a batch is placed here; `_layout` packs the rest once.
    """
    sizes = np.minimum(tok.lengths + 2, seq_len + 1)  # with <bos> and <eos>, cut to a row
    if -(-int(sizes.sum()) // (seq_len + 1)) >= batch_size:
        return True
    return int(best_fit_decreasing(sizes, seq_len + 1)[0].max()) + 1 >= batch_size


def _tokenize_splits(source, tokenizer, seq_len, streamed, report, log):
    """Tokenizes the train (and validation) examples; drops and counts the unusable ones."""
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
        tok = _drop_without_target(tok.select(~empty), seq_len, streamed, split_report)
        split_report.tokens = int(len(tok.ids))
        split_report.dropped = Counter({k: v for k, v in split_report.dropped.items() if v})
        tokens[split] = tok
        if split == "train":
            report.train = split_report
        else:
            report.validation = split_report
    return tokens


def _row_lengths(batching, train_tok, val_tok, seq_len, batch_size):
    """The input lengths rows come in: `seq_len` for pack and pad, the chosen buckets otherwise."""
    if batching in ("pack", "pad"):
        return [seq_len]

    def needs(tok):
        return np.minimum(tok.lengths + 2, seq_len + 1) - 1

    train_needs = needs(train_tok)
    all_needs = train_needs if val_tok is None else np.concatenate([train_needs, needs(val_tok)])
    return choose_buckets(train_needs, all_needs, seq_len, batch_size)


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


def _measure_padding(train, report):
    positions = padding = loss = 0
    for x, _, weight in train.take(REPORT_BATCHES).as_numpy_iterator():
        positions += x["padding_mask"].size
        padding += int((x["padding_mask"] == 0).sum())  # a bool mask or segment ids
        loss += int((weight > 0).sum())
        report.sampled_batches += 1
    report.pad_fraction = padding / max(positions, 1)
    report.loss_fraction = loss / max(positions, 1)

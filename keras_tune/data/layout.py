"""Tokens in, rows out: how examples are laid out in rows of `seq_len + 1` ids.

x is a row without its last id, y the row shifted by one, as keras-hub's
`CausalLMPreprocessor` does:

- `pack`, documents (text recipes): every example's tokens followed by `<eos>`
  form one stream, cut into rows of `seq_len` tokens, each led by `<bos>`
  (Gemma expects `<bos>` at position 0). The targets of the rows, read in
  order, are the stream itself: every token once, none thrown away. Only the
  last row is padded, and padding carries no loss.
- `pack`, prompt/response and chat examples (`whole`): whole examples (`<bos>`
  + tokens + `<eos>`) share rows, placed longest first into the row with the
  least room that holds them (`best_fit_decreasing`), never one across two
  rows, so a target always sits with its prompt. Each is a segment of its own
  (document masking), so its loss is the one it has alone in a row.
- `bucket`: one example a row, padded to the smallest of a few bucket lengths
  (at most `MAX_BUCKETS`, chosen from the data's length histogram to waste the
  least padding, `choose_buckets`); the few rows that would not fill a bucket's
  last batch move up a bucket (`assign_buckets`). Examples longer than
  `seq_len` are truncated and counted; a cut row ends where it is cut (no
  `<eos>` forced in, so no false ending is taught).
- `pad`: the seeds' recipe: one example a row, padded to `seq_len`.

Key tokens (`count_key_tokens`) weigh a row's loss by how many of a few words
its targets contain (the code recipe's key-token-weighted loss).
"""

import dataclasses

import numpy as np

from keras_tune.data.tokens import Tokenized


MAX_BUCKETS = 4


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


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """How a run lays tokens out in rows of `seq_len + 1` ids.

    Attributes:
        seq_len: model input length.
        batch_size: rows a batch.
        bos, eos, pad: the tokenizer's special token ids.
        batching: "pack", "bucket" or "pad" ("auto" already resolved).
        documents: packed rows carry segment ids (each document attends to itself only).
        whole: packing keeps each example in one row (prompt/response and chat
            examples); otherwise `pack` cuts the stream of documents.
    """

    seq_len: int
    batch_size: int
    bos: int
    eos: int
    pad: int
    batching: str = "pack"
    documents: bool = False
    whole: bool = False


def lay_out(tok, spec, lengths, report):
    """Turns one split's tokens into a list of `Rows`, one a length in `lengths`, and counts what it did.

    Args:
        tok: the split's `Tokenized`.
        spec: the run's `RowSpec`.
        lengths: the row lengths (`row_lengths`): one for pack and pad, the buckets otherwise.
        report: the split's `SplitReport` (truncated, kept, documents a row).
    """
    seq_len, bos, eos, pad = spec.seq_len, spec.bos, spec.eos, spec.pad
    if spec.batching == "pack":
        if spec.whole:
            rows = pack_examples(tok, seq_len, bos, eos, pad, documents=spec.documents)
            report.truncated = int((tok.lengths + 2 > seq_len + 1).sum())
        else:
            rows = pack(tok, seq_len, bos, eos, pad, documents=spec.documents)
        report.kept = len(tok.lengths)
        report.documents_per_row = float(rows.documents.mean()) if len(rows) else 0.0
        return [rows]
    wrapped = with_specials(tok, bos, eos)
    need = np.minimum(wrapped.lengths, seq_len + 1) - 1
    index = assign_buckets(need, lengths, spec.batch_size)
    groups = [pad_rows(wrapped.select(index == k), length, pad) for k, length in enumerate(lengths)]
    report.truncated = int((wrapped.lengths > seq_len + 1).sum())
    report.kept = int(sum(len(g) for g in groups))
    return groups


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


def packs_a_batch(tok, seq_len, batch_size):
    """Whether `pack_examples` makes at least `batch_size` rows of `tok`.

    Packing makes at least `ceil(tokens / row)` rows, so only data that could
    fit fewer rows than a batch is placed here; `lay_out` packs the rest once.
    """
    sizes = np.minimum(tok.lengths + 2, seq_len + 1)  # with <bos> and <eos>, cut to a row
    if -(-int(sizes.sum()) // (seq_len + 1)) >= batch_size:
        return True
    return int(best_fit_decreasing(sizes, seq_len + 1)[0].max()) + 1 >= batch_size


def row_lengths(batching, train_tok, val_tok, seq_len, batch_size):
    """The input lengths rows come in: `seq_len` for pack and pad, the chosen buckets otherwise."""
    if batching in ("pack", "pad"):
        return [seq_len]

    def needs(tok):
        return np.minimum(tok.lengths + 2, seq_len + 1) - 1

    train_needs = needs(train_tok)
    all_needs = train_needs if val_tok is None else np.concatenate([train_needs, needs(val_tok)])
    return choose_buckets(train_needs, all_needs, seq_len, batch_size)


def drop_without_target(tok, seq_len, streamed, report):
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

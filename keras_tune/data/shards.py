"""Token shards: a corpus tokenized once onto disk, and the training stream read back from it.

A run over a large corpus (`data.shards`: "on", or "auto" when the files hold
more than `AUTO_BYTES`) does not keep the corpus's token ids in memory. The
documents are read one at a time (`keras_tune.data.corpus`), filtered, split
into train and validation, tokenized in tf.data batches and appended to two
files of int32 ids, `train.tokens` and `validation.tokens`: the stream a
`pack` layout cuts into rows (each document `<bos>` + tokens + `<eos>`). The
shards sit under `cache_dir()/shards/<key>`, the key a hash of the files' paths,
sizes and modification times, the tokenizer, the filter and the split settings,
so the next run with the same inputs reuses them and tokenizes nothing; a crash
leaves no half-written shards (written beside, then renamed).

Training reads the shards memory-mapped: a batch is its rows' slices of the
stream, gathered when tf.data asks for it. Row `i` holds stream tokens
`[i * seq_len, (i + 1) * seq_len)` after a `<bos>`, exactly as `layout.pack`
lays them out, with segment ids where documents meet (document masking). The
epochs are shuffled as the in-memory stream is (`streams.epoch_order`, a
function of the seed and the epoch), so a resumed run continues exactly. What
memory a run takes then depends on the batch, not on the corpus: a few bytes a
row for an epoch's order.

Example:

```python
bundle = make_datasets(config.data, tokenizer)   # with data.shards = "on" (or a corpus above AUTO_BYTES)
print(bundle.report.summary())                     # ... note: token shards ... (reused)
```
"""

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from keras_tune.data import corpus
from keras_tune.data.layout import count_key_tokens, key_token_sequences, Rows
from keras_tune.data.report import DataReport, SplitReport
from keras_tune.data.streams import epoch_order, to_batch
from keras_tune.errors import UserError

FORMAT = 1
# Above this many bytes of input files, "auto" tokenizes onto disk instead of into memory.
AUTO_BYTES = 64 << 20
TOKENIZE_BATCH = 256
SHARD_MODES = ("auto", "on", "off")


def wanted(data_config, paths):
    """Whether a document corpus goes through token shards: `data.shards` on, or auto and large.

    Args:
        data_config: the `data` section of the run config.
        paths: the corpus files.
    """
    mode = data_config.get("shards", "auto")
    if mode == "on":
        return True
    return mode == "auto" and sum(os.path.getsize(path) for path in paths) > AUTO_BYTES


def shard_key(data_config, paths, validation_paths, tokenizer, seed):
    """The cache key of a corpus's shards: its files, the tokenizer and every setting that changes the ids.

    Args:
        data_config: the `data` section of the run config.
        paths: the corpus files.
        validation_paths: the validation files (`--validation-path`), or [].
        tokenizer: the keras-hub tokenizer (its SentencePiece model is hashed).
        seed: the hold-out's seed.
    """
    proto = getattr(tokenizer, "proto", None) or b""
    proto = proto if isinstance(proto, bytes) else str(proto).encode()
    settings = {
        "format": FORMAT, "files": corpus.fingerprint(paths), "validation": corpus.fingerprint(validation_paths),
        "tokenizer": hashlib.sha256(proto).hexdigest(), "recipe": data_config.name,
        "text_field": data_config.text_field, "keywords": list(data_config.get("filter_keywords", ())),
        "max_examples": int(data_config.max_examples), "seed": int(seed),
        "fraction": float(data_config.validation_fraction), "cap": int(data_config.max_validation_examples),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def _tokenized(texts, tokenizer):
    """Yields `(ids, lengths)` numpy arrays a batch of `texts` at a time, tokenized inside tf.data."""
    import tensorflow as tf

    from keras_tune.data.tokens import ready_for_tf_data

    ready_for_tf_data(tokenizer)
    dataset = tf.data.Dataset.from_generator(lambda: texts, output_signature=tf.TensorSpec([], tf.string))

    def tokenize(batch):
        pieces = tokenizer(batch)
        if not isinstance(pieces, tf.RaggedTensor):
            pieces = tf.RaggedTensor.from_tensor(pieces)
        return tf.cast(pieces.flat_values, tf.int32), pieces.row_lengths()

    batches = dataset.batch(TOKENIZE_BATCH).map(tokenize, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    yield from batches.as_numpy_iterator()


class _Split:
    """One shard file being written, and its counts."""

    def __init__(self, path, bos, eos):
        self.file, self.bos, self.eos = open(path, "wb"), bos, eos
        self.documents = self.tokens = self.stream = 0

    def add(self, ids, lengths):
        ends = np.cumsum(lengths)
        for start, end in zip(ends - lengths, ends):
            np.array([self.bos], np.int32).tofile(self.file)
            ids[start:end].tofile(self.file)
            np.array([self.eos], np.int32).tofile(self.file)
        self.documents += len(lengths)
        self.tokens += int(lengths.sum())
        self.stream += int(lengths.sum()) + 2 * len(lengths)

    def record(self):
        self.file.close()
        return {"documents": self.documents, "tokens": self.tokens, "stream": self.stream}


def selected(data_config, paths, validation_paths, seed, counts):
    """Yields `(text, is_validation)` for the documents the run keeps, counting the others in `counts`.

    Args:
        data_config: the `data` section of the run config (filter, limits, hold-out share).
        paths: the corpus files.
        validation_paths: `--validation-path`'s files (then nothing is held out of `paths`), or [].
        seed: the hold-out's seed.
        counts: a `Counter` for "read", "empty" and "no keyword".
    """
    keywords = tuple(data_config.get("filter_keywords", ()))
    field = "content" if data_config.name == "code" and data_config.text_field == "text" else data_config.text_field
    paragraphs = data_config.name == "text"
    limit, cap = int(data_config.max_examples), int(data_config.max_validation_examples)
    fraction = 0.0 if validation_paths else float(data_config.validation_fraction)
    kept = held = 0
    streams = [(corpus.documents(paths, field, paragraphs), False)]
    if validation_paths:
        streams.append((corpus.documents(validation_paths, field, paragraphs), True))
    for documents, validation in streams:
        for index, (_, text) in enumerate(documents):
            counts["read"] += 1
            if not text.strip():
                counts["empty"] += 1
            elif not corpus.mentions(text, keywords):
                counts["no keyword"] += 1
            elif validation or (fraction and (not cap or held < cap) and corpus.in_validation(index, seed, fraction)):
                held += 1
                yield text, True
            elif not limit or kept < limit:
                kept += 1
                yield text, False


def build(directory, data_config, paths, validation_paths, tokenizer, seed, log):  # many: the shards' inputs
    """Tokenizes the corpus into `directory` (written beside it, then renamed into place).

    Returns:
        The shards' record (counts, seconds).
    """
    bos, eos = int(tokenizer.start_token_id), int(tokenizer.end_token_id)
    partial = Path(f"{directory}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    splits = {"train": _Split(partial / "train.tokens", bos, eos),
              "validation": _Split(partial / "validation.tokens", bos, eos)}
    counts, started, last = Counter(), time.time(), time.time()
    pending = []  # each text's split, in the order tf.data tokenizes them
    texts = selected(data_config, paths, validation_paths, seed, counts)

    def tagged():
        for text, validation in texts:
            pending.append(validation)
            counts["bytes"] += len(text.encode("utf-8"))
            yield text

    for ids, lengths in _tokenized(tagged(), tokenizer):
        tags = np.array(pending[: len(lengths)], bool)
        del pending[: len(lengths)]
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for split, keep in (("validation", tags), ("train", ~tags)):
            if keep.any():
                pieces = [ids[starts[i]:starts[i + 1]] for i in np.flatnonzero(keep)]
                splits[split].add(np.concatenate(pieces), lengths[keep])
        if log and time.time() - last > 5:
            seconds = time.time() - started
            log(f"  shards: tokenized {splits['train'].documents + splits['validation'].documents:,} documents, "
                f"{splits['train'].tokens + splits['validation'].tokens:,} tokens ({counts['bytes'] / seconds / 1e6:.1f} MB/s)")
            last = time.time()
    record = {"format": FORMAT, "train": splits["train"].record(), "validation": splits["validation"].record(),
              "read": counts["read"], "dropped": {k: counts[k] for k in ("empty", "no keyword") if counts[k]},
              "bytes": counts["bytes"], "seconds": round(time.time() - started, 3)}
    if not record["train"]["documents"]:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"--data-path '{data_config.path}': no documents to train on (read {counts['read']}, "
                        f"dropped {record['dropped']}); expected text" + (f" mentioning {', '.join(data_config.filter_keywords)}"
                                                                           if data_config.get("filter_keywords") else ""))
    (partial / "meta.json").write_text(json.dumps(record, indent=2))
    if os.path.isdir(directory):  # another process (or run) finished the same shards first
        shutil.rmtree(partial, ignore_errors=True)
    else:
        os.rename(partial, directory)
    return record


class Shards:
    """A corpus's token shards, memory-mapped: `train` and `validation` int32 streams and their record.

    Args:
        directory: a folder `build` wrote.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.record = json.loads((self.directory / "meta.json").read_text())
        self.train = self._stream("train")
        self.validation = self._stream("validation")

    def _stream(self, split):
        path = self.directory / f"{split}.tokens"
        return np.memmap(path, dtype=np.int32, mode="r") if path.stat().st_size else np.zeros([0], np.int32)


def stream_rows(stream, index, spec):
    """Rows `index` of a shard stream laid out as `layout.pack` lays out documents.

    Args:
        stream: the int32 stream (`<bos>` doc `<eos>` ...), memory-mapped.
        index: row numbers (an int array).
        spec: the run's `layout.RowSpec`.
    """
    length, count = spec.seq_len, len(index)
    ids = np.full((count, length + 1), spec.pad, np.int32)
    mask = np.zeros((count, length + 1), bool)
    ids[:, 0], mask[:, 0] = spec.bos, True
    for row, number in enumerate(np.asarray(index, np.int64)):
        piece = np.asarray(stream[number * length:(number + 1) * length])
        ids[row, 1:1 + len(piece)] = piece
        mask[row, 1:1 + len(piece)] = True
    starts = (ids == spec.bos) & mask
    weights = (mask & ~starts).astype(np.float32)  # a document's <bos> is predicted by nothing
    starts[:, 0] = True  # the row's leading <bos> opens its first segment
    segments = np.where(mask, np.cumsum(starts, axis=1), 0).astype(np.int32) if spec.documents else None
    return Rows(ids, weights, mask, segments, None)


def _rows_dataset(shards, spec, batches, rows_of, key_weights):
    """tf.data batches: `batches` a dataset of row-index arrays, each gathered from the shards by `rows_of`."""
    import tensorflow as tf

    masks = tf.int32 if spec.documents else tf.bool

    def gather(index):
        rows = rows_of(index)
        if key_weights is not None:
            rows.weights *= key_weights(rows)[:, None].astype(np.float32)
        return rows.columns()

    def to_tensors(index):
        ids, weights, mask = tf.numpy_function(gather, [index], [tf.int32, tf.float32, masks], stateful=False)
        for tensor in (ids, weights, mask):
            tensor.set_shape([spec.batch_size, spec.seq_len + 1])
        return to_batch(ids, weights, mask)

    return batches.map(to_tensors, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def sharded_bundle(shards, spec, data_config, tokenizer, seed):  # many: the bundle's parts
    """The `DataBundle` of a run over token shards (see the module docstring)."""
    import tensorflow as tf

    from keras_tune.data.pipeline import DataBundle

    length, batch = spec.seq_len, spec.batch_size
    train_rows = -(-len(shards.train) // length)
    steps = train_rows // batch
    if not steps:
        raise UserError(f"recipe '{data_config.name}': the training shards make {train_rows} sequences of length "
                        f"{length}, fewer than batch_size {batch}; expected more data, a smaller seq_len or batch_size")
    key_weights = None
    alpha = float(data_config.key_token_alpha)
    if alpha > 0:
        sequences = key_token_sequences(tokenizer, tuple(data_config.key_tokens))
        key_weights = lambda rows: alpha * (1.0 + count_key_tokens(rows, sequences))  # noqa: E731
    shuffle = int(data_config.shuffle_buffer)

    def epoch(number):
        return epoch_order([train_rows], batch, seed, int(number), shuffle)[1]

    def from_step(start_step=0):
        first, offset = divmod(int(start_step), steps)

        def epoch_batches(number):
            order = tf.numpy_function(epoch, [number], tf.int64, stateful=False)
            order.set_shape([steps, batch])
            return tf.data.Dataset.from_tensor_slices(order)

        batches = tf.data.Dataset.counter(first).flat_map(epoch_batches).skip(offset)
        return _rows_dataset(shards, spec, batches, lambda index: stream_rows(shards.train, index, spec), key_weights)

    validation, validation_steps = None, 0
    validation_rows = -(-len(shards.validation) // length)
    if validation_rows:
        validation_steps = -(-validation_rows // batch)

        def validation_batch(number):  # in order; the last batch filled with weight-0 copies of the first rows
            index = np.arange(number * batch, (number + 1) * batch)
            copies = (index - validation_rows) % validation_rows
            rows = stream_rows(shards.validation, np.where(index < validation_rows, index, copies), spec)
            rows.weights[index >= validation_rows] = 0.0
            return rows

        numbers = tf.data.Dataset.range(validation_steps)
        validation = _rows_dataset(shards, spec, numbers, lambda number: validation_batch(int(number)), None)
    report = _report(shards, spec, data_config, train_rows, validation_rows, steps, validation_steps)
    return DataBundle(from_step(0).take(steps), validation, report, steps, validation_steps, from_step)


def _pieces_per_row(documents, rows):
    """Documents or pieces of one a row holds, on average: each row boundary (but the last) cuts one."""
    return (documents + rows - 1) / max(rows, 1)


def _report(shards, spec, data_config, train_rows, validation_rows, steps, validation_steps):  # many: its figures
    record, batch = shards.record, spec.batch_size
    dropped = Counter({f"{why}": n for why, n in record["dropped"].items()})
    train = SplitReport(source=f"token shards of '{data_config.path}'", read=record["read"],
                        kept=record["train"]["documents"], dropped=dropped, tokens=record["train"]["tokens"],
                        sequences=train_rows, batches=steps, left_out_per_epoch=train_rows - steps * batch,
                        documents_per_row=_pieces_per_row(record["train"]["documents"], train_rows))
    validation = None
    if validation_rows:
        validation = SplitReport(source="held-out documents" if not data_config.get("validation_path")
                                 else f"'{data_config.validation_path}'", read=record["validation"]["documents"],
                                 kept=record["validation"]["documents"], tokens=record["validation"]["tokens"],
                                 sequences=validation_rows, batches=validation_steps,
                                 filler_rows=validation_steps * batch - validation_rows,
                                 documents_per_row=_pieces_per_row(record["validation"]["documents"], validation_rows))
    report = DataReport(recipe=data_config.name, batching="pack", seq_len=spec.seq_len, batch_size=batch,
                        bucket_lengths=(spec.seq_len,), train=train, validation=validation,
                        document_masking=spec.documents)
    return report


def make_sharded_datasets(data_config, tokenizer, suffixes, seed=0, log=print):
    """The `DataBundle` of a document corpus through token shards (built once, then reused).

    Args:
        data_config: the `data` section of the run config (a code or text recipe with `data.path`).
        tokenizer: the preset's keras-hub tokenizer.
        suffixes: the recipe's file kinds.
        seed: fixes the validation hold-out and the epochs' order.
        log: callable for progress lines.
    """
    from keras_tune.data.layout import RowSpec
    from keras_tune.data.pipeline import measure_padding
    from keras_tune.models.cache import cache_dir

    paths = corpus.corpus_files(data_config, suffixes)
    validation_paths = corpus.corpus_files(data_config, suffixes, validation=True) \
        if data_config.get("validation_path") else []
    field = "content" if data_config.name == "code" and data_config.text_field == "text" else data_config.text_field
    corpus.check_readable(paths + validation_paths, field)
    directory = cache_dir() / "shards" / shard_key(data_config, paths, validation_paths, tokenizer, seed)
    if (directory / "meta.json").is_file():
        note = f"token shards reused: {directory}"
    else:
        log(f"shards: tokenizing {len(paths)} file(s) into {directory}")
        record = build(directory, data_config, paths, validation_paths, tokenizer, seed, log)
        rate = record["bytes"] / max(record["seconds"], 1e-9) / 1e6
        note = (f"token shards written: {directory} ({record['train']['tokens'] + record['validation']['tokens']:,} "
                f"tokens in {record['seconds']:.1f} s, {rate:.1f} MB/s of text)")
    spec = RowSpec(int(data_config.seq_len), int(data_config.batch_size), int(tokenizer.start_token_id),
                   int(tokenizer.end_token_id), int(tokenizer.pad_token_id), batching="pack",
                   documents=not data_config.get("cross_document_attention", False))
    bundle = sharded_bundle(Shards(directory), spec, data_config, tokenizer, seed)
    bundle.report.notes.append(note)
    measure_padding(bundle.train, bundle.report)
    return bundle

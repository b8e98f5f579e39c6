"""Examples in, token ids out: tokenizing a split once, inside tf.data.

Examples are batched and the keras-hub tokenizer runs as a TF graph op
(tensorflow-text SentencePiece) in a parallel `map`, with prefetch: no Python
call per example. The token ids of the whole split are kept in memory (4 bytes
a token), which makes the counts in the report exact and lets every epoch
reshuffle whole sequences cheaply.
"""

import dataclasses
import time

import numpy as np


TOKENIZE_BATCH = 256


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


def ready_for_tf_data(tokenizer):
    """Makes sure the tokenizer's SentencePiece op runs inside tf.data, rebuilding it once if it cannot.

    `keras.utils.set_random_seed` (its `tf.random.set_seed`) after the tokenizer
    was built drops the op's model resource: the tokenizer still works eagerly
    but not inside tf.data. A stream that cannot be restarted checks first.

    Args:
        tokenizer: a keras-hub SentencePiece tokenizer.
    """
    import tensorflow as tf

    probe = tf.data.Dataset.from_tensors(tf.constant(["a"])).map(tokenizer)
    try:
        for _ in probe:
            pass
    except tf.errors.NotFoundError as error:
        if "SentencepieceOp" not in str(error) or not hasattr(tokenizer, "set_proto"):
            raise
        tokenizer.set_proto(tokenizer.proto)

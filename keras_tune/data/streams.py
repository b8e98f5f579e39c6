"""Rows in, tf.data out: the training stream (every epoch reshuffled, resumable at any step) and validation.

Each group's rows (one group a bucket length) are shuffled, cut into batches of
a static size and the groups' batches mixed in a random order. An epoch's order
is a function of the seed and the epoch number alone (`epoch_order`), so
`train_stream(...)(k)` from step k is the tail of the stream from step 0: a
resumed run sees the batches an uninterrupted one does. Shapes are static per
group, so XLA compiles one program a bucket length.
"""

import numpy as np


def to_batch(ids, weights, mask):
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


def train_stream(groups, batch_size, seed, shuffle_buffer, batch_of=to_batch):
    """Returns `start_step -> dataset`: the endless training stream from a global step, each epoch reshuffled.

    Batch `s` of the stream is batch `s % steps_per_epoch` of epoch
    `s // steps_per_epoch` (`epoch_order`), whichever step the stream starts
    at and however many iterators are made of it: no tf.data shuffle state.

    Args:
        groups: list of `Rows`, one a bucket length.
        batch_size: static rows a batch.
        seed: seeds the shuffles and the mixing.
        shuffle_buffer: the shuffle window (<= 1 means no shuffle within a group).
        batch_of: `(ids, weights, mask) -> batch` of the gathered rows (`to_batch`; preference pairs have their own).
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
        return batch_of(*columns)

    def from_step(start_step=0):
        first_epoch, offset = divmod(int(start_step), steps_per_epoch)
        # Skipping within the first epoch skips (group, row indices) pairs: no rows are gathered.
        dataset = tf.data.Dataset.counter(first_epoch).flat_map(epoch_batches).skip(offset)
        return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    return from_step


def validation_dataset(groups, batch_size, batch_of=to_batch):
    """Returns the validation dataset: every row once, in order, last batches filled with weight-0 copies.

    Args:
        groups: list of `Rows`, one a bucket length.
        batch_size: rows a batch.
        batch_of: `(ids, weights, mask) -> batch` (`to_batch`; preference pairs have their own).
    """
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
    return dataset.map(batch_of, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE), filler

"""The training stream is a function of (seed, global step): a resumed run sees what an uninterrupted one sees.

Also across epoch ends, over several epochs, and under every batching mode; however
many iterators were made before (keras peeks one batch before it trains) and
whichever step a stream starts at. The data: a tiny MTNT data directory in the
TFDS format, six pairs of three lengths, so batches of 2 make 3 batches an epoch
in two buckets (2 packed: whole pairs share rows) and a run of 8 steps crosses two
epoch ends or more.
"""

import os
import shutil

import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune import training
from keras_tune.data import make_datasets, streams
from keras_tune.models.tiny import tiny_tokenizer

from helpers import adapter_arrays, assert_same_metrics, build_tfds_data_dir, max_diff

PAIRS = {
    "train": [(f"the cat number {i} sleeps" + " and purrs" * (3 * (i % 3)),
               f"le chat numero {i} dort" + " et ronronne" * (3 * (i % 3))) for i in range(6)],
    "valid": [("good morning", "bonjour"), ("thank you", "merci"), ("see you", "a bientot")],
    "test": [("yes", "oui")],
}
BATCHINGS = ("bucket", "pad", "pack")  # auto is pack for MTNT when that fills a batch
STEPS, SAVE_EVERY, EVAL_EVERY = 8, 2, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_tfds_data_dir(tmp_path_factory.mktemp("tiny_mtnt"), pairs=PAIRS)


def _config(data_dir, batching, out=""):
    overrides = {
        "data.name": "mtnt", "data.data_dir": data_dir, "data.batch_size": 2, "data.batching": batching,
        "train.steps": STEPS, "train.save_every": SAVE_EVERY, "train.eval_every": EVAL_EVERY,
        "train.eval_steps": 1, "train.keep_checkpoints": 10, "train.output_dir": str(out),
    }
    return config_lib.load_config("gemma_tiny", overrides=overrides)


def _bundle(data_dir, batching):
    """The data of a run, as a fresh process builds it (gemma_tiny's tokenizer, seed 0)."""
    return make_datasets(_config(data_dir, batching).data, tiny_tokenizer("gemma"), seed=0, log=None)


def _batches(dataset, count):
    return [(x["token_ids"], x["padding_mask"], y, w) for x, y, w in dataset.take(count).as_numpy_iterator()]


def _same(a, b):
    return len(a) == len(b) and all(
        all(np.array_equal(one, two) for one, two in zip(batch_a, batch_b)) for batch_a, batch_b in zip(a, b)
    )


def test_epoch_order_depends_on_the_seed_and_the_epoch_only():
    sizes, batch_size = [5, 8, 2], 2
    groups, rows = streams.epoch_order(sizes, batch_size, seed=3, epoch=4, shuffle_buffer=100)
    again = streams.epoch_order(sizes, batch_size, seed=3, epoch=4, shuffle_buffer=100)
    assert np.array_equal(groups, again[0]) and np.array_equal(rows, again[1])
    assert sorted(groups.tolist()) == [0, 0, 1, 1, 1, 1, 2]
    for k, size in enumerate(sizes):  # whole batches of distinct rows of the group
        picked = rows[groups == k].ravel()
        assert len(set(picked.tolist())) == len(picked) == size // batch_size * batch_size and picked.max() < size
    assert not np.array_equal(streams.epoch_order(sizes, batch_size, 3, 5, 100)[1], rows)  # next epoch
    assert not np.array_equal(streams.epoch_order(sizes, batch_size, 4, 4, 100)[1], rows)  # another seed
    assert streams.epoch_order([6], 2, seed=0, epoch=1, shuffle_buffer=0)[1].tolist() == [[0, 1], [2, 3], [4, 5]]
    order = streams.shuffled(1000, 4, np.random.default_rng(0))  # a window: rows move 4 places at most
    assert sorted(order.tolist()) == list(range(1000)) and np.abs(order - np.arange(1000)).max() <= 4


@pytest.mark.parametrize("batching", BATCHINGS)
def test_the_stream_from_step_k_is_the_tail_of_the_uninterrupted_stream(data_dir, batching):
    bundle = _bundle(data_dir, batching)
    per_epoch = bundle.steps_per_epoch
    assert per_epoch == (2 if batching == "pack" else 3)
    total = 3 * per_epoch + 2
    uninterrupted = bundle.train_stream(0)
    next(iter(uninterrupted))  # keras' look at one batch before it trains (`_symbolic_build`)
    reference = _batches(uninterrupted, total)
    epochs = [reference[e * per_epoch:(e + 1) * per_epoch] for e in range(3)]
    assert not _same(epochs[0], epochs[1]) and not _same(epochs[1], epochs[2])  # every epoch reshuffled
    assert _same(_batches(bundle.train, per_epoch + 1), epochs[0])  # one pass of `train` is the first epoch
    assert _same(_batches(bundle.train, per_epoch), epochs[0])  # on every pass
    if batching == "pad":  # every row once an epoch
        def rows_of(epoch):
            return sorted(row.tobytes() for batch in epoch for row in batch[0])

        assert rows_of(epochs[1]) == rows_of(epochs[2]) == rows_of(epochs[0])
    for k in (per_epoch - 1, per_epoch + 1, 2 * per_epoch + 1):  # in the first, second and third epoch
        resumed = _bundle(data_dir, batching)  # what the rerun after a kill builds
        stream = resumed.train_stream(k)
        next(iter(stream))
        for _ in range(k % 3):  # other iterators, in any number, change nothing
            _batches(resumed.train, per_epoch)
        assert _same(_batches(stream, total - k), reference[k:]), f"resumed at step {k}"
        assert _same(_batches(bundle.train_stream(k), total - k), reference[k:]), f"again at step {k}"


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """`batching -> run directory` of an uninterrupted gemma_tiny run (each run once, in this process)."""
    runs = {}

    def run(batching):
        if batching not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted-{batching}") / "run"
            training.run(_config(data_dir, batching, out))
            runs[batching] = str(out)
        return runs[batching]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("batching, killed_after", [("bucket", 2), ("bucket", 4), ("pack", 4)])
def test_a_run_resumed_across_epoch_ends_equals_the_uninterrupted_run(data_dir, uninterrupted, tmp_path, batching,
                                                                       killed_after):
    reference = uninterrupted(batching)
    out = tmp_path / "killed"
    shutil.copytree(reference, out)
    # What a kill -9 just after the checkpoint at `killed_after` leaves: no later checkpoint, no adapter.
    for step in os.listdir(out / "checkpoints"):
        if step.isdigit() and int(step) > killed_after:
            shutil.rmtree(out / "checkpoints" / step)
    os.remove(out / "adapter.npz")
    result = training.run(_config(data_dir, batching, out))
    assert result.initial_step == killed_after and result.final_step == STEPS
    assert max_diff(adapter_arrays(os.path.join(reference, "adapter.npz")), adapter_arrays(out / "adapter.npz")) <= 1e-6
    assert_same_metrics(reference, str(out), steps=STEPS)

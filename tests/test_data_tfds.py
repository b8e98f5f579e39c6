"""The TFDS recipes (imdb, mtnt) through real TFDS data directories built by the tests.

How the data directories are made (`helpers.build_tfds_data_dir`), without
network and without mocking the loading: the tests write small archives in the
exact layout of the real downloads (`aclImdb_v1.tar.gz` with
`aclImdb/{train,test}/{pos,neg}/*.txt`; `MTNT.1.1.tar.gz` with
`MTNT/{train,valid,test}/*.en-fr.tsv`) into a TFDS download directory, under the
file name and with the `.INFO` record that TFDS's own `DownloadManager` gives a
finished download (written with TFDS's `resource.write_info_file`). The real
builders (`imdb_reviews`, `mtnt/en-fr`) then run `download_and_prepare`: TFDS
finds the download cached, extracts or iterates the archive, runs the builder's
own example generation and writes the tfrecord shards and `dataset_info.json`.
The recipes read them with `tfds.load(name, data_dir=...)`, exactly as in
production. Sockets are disabled for every test here, so nothing can reach the
network.
"""

import keras_hub
import ml_collections
import numpy as np
import pytest

from keras_tune.data import make_datasets
from keras_tune.data.tfds_source import load_split
from keras_tune.errors import UserError
from keras_tune.models.tiny import tiny_tokenizer

from helpers import TFDS_PAIRS, TFDS_REVIEWS, build_tfds_data_dir, ids, rows

BOS, EOS, PAD = 2, 1, 0
# Sockets are disabled for every test here (conftest.py's `no_network`).
pytestmark = pytest.mark.usefixtures("no_network")

DEFAULTS = dict(
    name="imdb", path="", data_dir="", max_examples=0, seq_len=32, batch_size=2,
    validation_fraction=0.05, max_validation_examples=200, text_field="text", prompt_field="prompt",
    response_field="response", messages_field="messages", mtnt_pair="en-fr",
    prompt_template="Translate this into French:\n{source}\n", batching="auto",
    key_tokens=("plt", "pd", "sk", "fit", "predict"), key_token_alpha=0.0, shuffle_buffer=10000,
)

def data_config(**overrides):
    return ml_collections.ConfigDict(dict(DEFAULTS, **overrides))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return build_tfds_data_dir(tmp_path_factory.mktemp("tfds"), reviews=TFDS_REVIEWS, pairs=TFDS_PAIRS)


def test_imdb_from_tfds_dir_pad_matches_keras_hub(tfds_dir, tok):
    config = data_config(data_dir=tfds_dir, batching="pad", seq_len=24, shuffle_buffer=0)
    bundle = make_datasets(config, tok, seed=0, log=None)
    report = bundle.report
    assert report.train.read == 8 and report.train.kept == 8 and report.validation.read == 5
    assert "imdb_reviews train" in report.train.source and "test" in report.validation.source
    got = rows(bundle.train)
    texts = [t.decode() for t in (ex["text"].numpy() for ex in load_split("imdb_reviews", "train", tfds_dir)[0])]
    assert sorted(texts) == sorted(t.strip() for t in TFDS_REVIEWS["train"])  # labels dropped; the builder strips
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer=tiny_tokenizer("gemma"), sequence_length=24)
    x, y, w = preprocessor(texts)
    truncated = 0
    for i, (token_ids, mask, our_y, weight) in enumerate(got):
        np.testing.assert_array_equal(token_ids, np.asarray(x["token_ids"])[i])
        np.testing.assert_array_equal(mask, np.asarray(x["padding_mask"])[i])
        np.testing.assert_array_equal(weight, np.asarray(w)[i].astype(np.float32))
        if len(ids(tok, texts[i])) + 2 > 25:
            # A cut review ends where it is cut: keras-hub's packer would end it with <eos>.
            truncated += 1
            assert our_y[-1] == ids(tok, texts[i])[23] and np.asarray(y)[i][-1] == EOS
            np.testing.assert_array_equal(our_y[:-1], np.asarray(y)[i][:-1])
        else:
            np.testing.assert_array_equal(our_y, np.asarray(y)[i])
    assert report.train.truncated == truncated > 0


def test_imdb_packs_and_caps_examples(tfds_dir, tok):
    config = data_config(data_dir=tfds_dir, max_examples=4, max_validation_examples=2, seq_len=16)
    bundle = make_datasets(config, tok, seed=0, log=None)
    assert bundle.report.batching == "pack"
    assert bundle.report.train.read == 4 and bundle.report.validation.read == 2
    assert "train[:4]" in bundle.report.train.source
    texts = [ex["text"].numpy().decode() for ex in load_split("imdb_reviews", "train", tfds_dir, 4)[0]]
    total = sum(len(ids(tok, t)) + 1 for t in texts)
    assert bundle.report.train.sequences == -(-total // 16)


def test_mtnt_from_tfds_dir_exact_layout(tfds_dir, tok):
    config = data_config(name="mtnt", data_dir=tfds_dir, batching="pad", seq_len=40, shuffle_buffer=0)
    bundle = make_datasets(config, tok, seed=0, log=None)
    report = bundle.report
    assert report.train.read == 6 and report.validation.read == 3 and report.train.dropped == {}
    stored = [(ex["src"].numpy().decode(), ex["dst"].numpy().decode())
              for ex in load_split("mtnt/en-fr", "train", tfds_dir)[0]]
    assert sorted(stored) == sorted(TFDS_PAIRS["train"])
    for (token_ids, mask, y, w), (src, dst) in zip(rows(bundle.train), stored):
        prompt = ids(tok, f"Translate this into French:\n{src}\n")
        target = ids(tok, dst)
        row = [BOS] + prompt + target + [EOS]
        assert token_ids[: len(row) - 1].tolist() == row[:-1] and y[: len(row) - 1].tolist() == row[1:]
        assert (token_ids[len(row):] == PAD).all() and mask.sum() == len(row)
        assert w.tolist() == [0.0] * len(prompt) + [1.0] * (len(target) + 1) + [0.0] * (40 - len(row) + 1)
    val_targets = sorted(tuple(y[w > 0].tolist()) for _, _, y, w in rows(bundle.validation) if w.any())
    assert val_targets == sorted(tuple(ids(tok, d) + [EOS]) for _, d in TFDS_PAIRS["valid"])


def test_mtnt_auto_packs_whole_pairs_where_that_fills_a_batch_and_buckets_otherwise(tfds_dir, tok):
    config = data_config(name="mtnt", data_dir=tfds_dir, seq_len=256)
    bundle = make_datasets(config, tok, seed=0, log=None)
    # Six pairs of 25 tokens fit one row of 256: too few rows for a batch of 2, so one pair a row.
    assert bundle.report.batching == "bucket" and max(bundle.report.bucket_lengths) < 256
    for x, _, _ in bundle.train.as_numpy_iterator():
        assert x["token_ids"].shape[1] in bundle.report.bucket_lengths
    config.seq_len = 64  # two pairs a row, three rows
    packed = make_datasets(config, tok, seed=0, log=None)
    assert packed.report.batching == "pack" and packed.report.whole_examples
    assert packed.report.train.kept == 6 and packed.report.train.documents_per_row == 2
    x, y, w = next(packed.train.as_numpy_iterator())
    assert x["token_ids"].shape == (2, 64) and x["padding_mask"].max(axis=1).tolist() == [2, 2]  # segment ids


def test_unknown_split_and_missing_dataset(tfds_dir, tmp_path):
    with pytest.raises(UserError, match=r"has no split 'validation'.*expected one of test, train, unsupervised"):
        load_split("imdb_reviews", "validation", tfds_dir)
    with pytest.raises(UserError, match=r"'mtnt/en-fr' is not in .*unreachable"):
        load_split("mtnt/en-fr", "train", str(tmp_path / "empty"))

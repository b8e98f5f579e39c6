"""The TFDS recipes (imdb, mtnt) through real TFDS data directories built by the tests.

How the data directories are made, without network and without mocking the
loading: the tests write small archives in the exact layout of the real
downloads (`aclImdb_v1.tar.gz` with `aclImdb/{train,test}/{pos,neg}/*.txt`;
`MTNT.1.1.tar.gz` with `MTNT/{train,valid,test}/*.en-fr.tsv`) into a TFDS
download directory, under the file name and with the `.INFO` record that TFDS's
own `DownloadManager` gives a finished download (written with TFDS's
`resource.write_info_file`). The real builders (`imdb_reviews`, `mtnt/en-fr`)
then run `download_and_prepare`: TFDS finds the download cached, extracts or
iterates the archive, runs the builder's own example generation and writes the
tfrecord shards and `dataset_info.json`. The recipes read them with
`tfds.load(name, data_dir=...)`, exactly as in production. Sockets are disabled
for every test here, so nothing can reach the network.
"""

import io
import tarfile

import keras_hub
import ml_collections
import numpy as np
import pytest

from keras_tune.data import make_datasets
from keras_tune.data.tfds_source import load_split
from keras_tune.errors import UserError
from keras_tune.models.tiny import tiny_tokenizer
from test_data import ids

IMDB_URL = "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
MTNT_URL = "https://github.com/pmichel31415/mtnt/releases/download/v1.1/MTNT.1.1.tar.gz"
BOS, EOS, PAD = 2, 1, 0

DEFAULTS = dict(
    name="imdb", path="", data_dir="", max_examples=0, seq_len=32, batch_size=2,
    validation_fraction=0.05, max_validation_examples=200, text_field="text", prompt_field="prompt",
    response_field="response", messages_field="messages", mtnt_pair="en-fr",
    prompt_template="Translate this into French:\n{source}\n", batching="auto",
    key_tokens=("plt", "pd", "sk", "fit", "predict"), key_token_alpha=0.0, shuffle_buffer=10000,
)

REVIEWS = {
    "train": [f"Review {i}: the film was {'great' if i % 2 else 'dull'}; " + "really " * i for i in range(8)],
    "test": [f"Test review {i}, a {'fine' if i % 2 else 'bad'} movie." for i in range(5)],
}
PAIRS = {
    "train": [(f"hello number {i}", f"bonjour numero {i}") for i in range(6)],
    "valid": [("good morning", "bonjour"), ("thank you", "merci"), ("see you", "a bientot")],
    "test": [("yes", "oui")],
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr("socket.getaddrinfo", refuse)
    monkeypatch.setattr("socket.create_connection", refuse)


def data_config(**overrides):
    return ml_collections.ConfigDict(dict(DEFAULTS, **overrides))


def tar_gz(files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def prepare(name, url, archive, data_dir, download_dir):
    """Places `archive` where TFDS keeps a finished download of `url`, then runs the real builder."""
    import tensorflow_datasets as tfds
    from etils import epath
    from tensorflow_datasets.core.download import checksums, resource

    builder = tfds.builder(name, data_dir=str(data_dir))
    registered = builder.url_infos.get(url) if builder.url_infos else None
    # TFDS names a download by url and (when registered) checksum; the INFO file
    # next to it is what marks it as complete.
    path = epath.Path(download_dir) / resource.get_dl_fname(url, registered.checksum if registered else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(archive)
    info = registered or checksums.compute_url_info(path)
    resource.write_info_file(url=url, path=path, dataset_name=builder.name, original_fname=url.split("/")[-1],
                             url_info=info)
    builder.download_and_prepare(
        download_dir=str(download_dir), download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


def build_tfds_data_dir(root, reviews=None, pairs=None):
    """Prepares `imdb_reviews` and `mtnt/en-fr` under `root/data` offline; returns that data_dir.

    Other tests (e.g. `keras_tune.fit --data imdb --data-dir ...` end to end) can
    import this: `from test_data_tfds import build_tfds_data_dir`.

    Args:
        root: a fresh directory (pathlib.Path).
        reviews: {"train": [...], "test": [...]} review texts (default `REVIEWS`).
        pairs: {"train"|"valid"|"test": [(src, dst), ...]} (default `PAIRS`).
    """
    reviews, pairs = reviews or REVIEWS, pairs or PAIRS
    data_dir, downloads = root / "data", root / "downloads"
    imdb = {}
    for split, texts in reviews.items():
        for i, text in enumerate(texts):
            imdb[f"aclImdb/{split}/{'pos' if i % 2 else 'neg'}/{i}_{i % 10}.txt"] = text
    imdb["aclImdb/train/unsup/0_0.txt"] = "an unlabelled review"
    prepare("imdb_reviews", IMDB_URL, tar_gz(imdb), data_dir, downloads)
    mtnt = {
        f"MTNT/{split}/{split}.en-fr.tsv": "".join(f"{split}{i}\t{s}\t{d}\n" for i, (s, d) in enumerate(rows))
        for split, rows in pairs.items()
    }
    prepare("mtnt/en-fr", MTNT_URL, tar_gz(mtnt), data_dir, downloads)
    return str(data_dir)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return build_tfds_data_dir(tmp_path_factory.mktemp("tfds"))


def rows(dataset):
    out = []
    for x, y, w in dataset.as_numpy_iterator():
        out += [(x["token_ids"][i], x["padding_mask"][i], y[i], w[i]) for i in range(len(y))]
    return out


def test_imdb_from_tfds_dir_pad_matches_keras_hub(tfds_dir, tok):
    config = data_config(data_dir=tfds_dir, batching="pad", seq_len=24, shuffle_buffer=0)
    bundle = make_datasets(config, tok, seed=0, log=None)
    report = bundle.report
    assert report.train.read == 8 and report.train.kept == 8 and report.validation.read == 5
    assert "imdb_reviews train" in report.train.source and "test" in report.validation.source
    got = rows(bundle.train)
    texts = [t.decode() for t in (ex["text"].numpy() for ex in load_split("imdb_reviews", "train", tfds_dir)[0])]
    assert sorted(texts) == sorted(t.strip() for t in REVIEWS["train"])  # labels dropped; the builder strips
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
    assert sorted(stored) == sorted(PAIRS["train"])
    for (token_ids, mask, y, w), (src, dst) in zip(rows(bundle.train), stored):
        prompt = ids(tok, f"Translate this into French:\n{src}\n")
        target = ids(tok, dst)
        row = [BOS] + prompt + target + [EOS]
        assert token_ids[: len(row) - 1].tolist() == row[:-1] and y[: len(row) - 1].tolist() == row[1:]
        assert (token_ids[len(row):] == PAD).all() and mask.sum() == len(row)
        assert w.tolist() == [0.0] * len(prompt) + [1.0] * (len(target) + 1) + [0.0] * (40 - len(row) + 1)
    val_targets = sorted(tuple(y[w > 0].tolist()) for _, _, y, w in rows(bundle.validation) if w.any())
    assert val_targets == sorted(tuple(ids(tok, d) + [EOS]) for _, d in PAIRS["valid"])


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

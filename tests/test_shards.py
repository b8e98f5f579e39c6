"""Corpora larger than memory: token shards on disk that give the batches the in-memory path gives, reused by
the next run; Parquet and `datasets.save_to_disk` sources; keyword filters; bad corpora refused in one line."""

import json

import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune import fit
from keras_tune.data import check_data, make_datasets, shards
from keras_tune.errors import UserError

from helpers import write_corpus


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder / "a.txt", paragraphs=150, seed=1)
    write_corpus(folder / "b.txt", paragraphs=150, seed=2)
    validation = folder / "held"
    validation.mkdir()
    write_corpus(validation / "v.txt", paragraphs=40, seed=3)
    return folder, validation


@pytest.fixture
def shard_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_TUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "shards"


def _data(folder, validation, **overrides):
    fields = {"data.name": "text", "data.path": str(folder / "*.txt"), "data.validation_path": str(validation),
              "data.seq_len": 32, "data.batch_size": 4, **overrides}
    return config_lib.load_config("gemma3_tiny", overrides=fields).data


def _batches(dataset, count):
    return [tuple(np.asarray(part) if not isinstance(part, dict) else {k: np.asarray(v) for k, v in part.items()}
                  for part in batch) for batch in dataset.take(count).as_numpy_iterator()]


def _assert_same(first, second):
    assert len(first) == len(second)
    for (x1, y1, w1), (x2, y2, w2) in zip(first, second):
        np.testing.assert_array_equal(x1["token_ids"], x2["token_ids"])
        np.testing.assert_array_equal(x1["padding_mask"], x2["padding_mask"])  # the segment ids
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(w1, w2)


def test_shards_give_the_in_memory_batches_and_the_next_run_reuses_them(corpus_files, shard_cache, tok, monkeypatch):
    folder, validation = corpus_files
    in_memory = make_datasets(_data(folder, validation, **{"data.shards": "off"}), tok, seed=3, log=None)
    sharded = make_datasets(_data(folder, validation, **{"data.shards": "on"}), tok, seed=3, log=None)
    assert sharded.steps_per_epoch == in_memory.steps_per_epoch > 10
    assert sharded.validation_steps == in_memory.validation_steps
    _assert_same(_batches(sharded.train_stream(0), 2 * sharded.steps_per_epoch + 3),
                 _batches(in_memory.train_stream(0), 2 * in_memory.steps_per_epoch + 3))  # epochs reshuffled alike
    _assert_same(_batches(sharded.validation, sharded.validation_steps),
                 _batches(in_memory.validation, in_memory.validation_steps))
    # A resumed run's stream from step k is the tail of the stream from 0.
    _assert_same(_batches(sharded.train_stream(7), 3), _batches(sharded.train_stream(0), 10)[7:])
    report = sharded.report
    assert report.train.tokens == in_memory.report.train.tokens and report.train.kept == 300
    assert any(note.startswith("token shards written: ") for note in report.notes)
    (written,) = list(shard_cache.iterdir())
    assert sorted(p.name for p in written.iterdir()) == ["meta.json", "train.tokens", "validation.tokens"]
    assert len(np.memmap(written / "train.tokens", np.int32, mode="r")) == report.train.tokens + 2 * 300

    monkeypatch.setattr(shards, "build", lambda *args: pytest.fail("the corpus was tokenized again"))
    again = make_datasets(_data(folder, validation, **{"data.shards": "on"}), tok, seed=3, log=None)
    assert any(note.startswith("token shards reused: ") for note in again.report.notes)
    _assert_same(_batches(again.train, 3), _batches(sharded.train, 3))


def test_a_held_out_share_keyword_filter_and_key_tokens_on_shards(corpus_files, shard_cache, tok):
    folder, validation = corpus_files
    data = _data(folder, validation, **{"data.shards": "on", "data.validation_path": "",
                                        "data.validation_fraction": 0.1, "data.filter_keywords": "model,tiny",
                                        "data.key_token_alpha": 1.0, "data.key_tokens": "model"})
    bundle = make_datasets(data, tok, seed=0, log=None)
    report = bundle.report
    assert report.train.read == 300 and report.validation.kept > 0
    kept = report.train.kept + report.validation.kept + sum(report.train.dropped.values())
    assert kept == 300 and report.train.dropped["no keyword"] > 0
    weights = np.concatenate([w.reshape(-1) for _, _, w in bundle.train.take(5).as_numpy_iterator()])
    assert weights.max() > 1.0  # rows with the key token weigh more


def test_parquet_and_a_datasets_folder_are_read_in_memory_and_through_shards(tmp_path, shard_cache, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document {i}: the tiny corpus holds words and numbers like {i * 13}." for i in range(120)]
    table = pa.table({"text": texts, "id": list(range(120))})
    pq.write_table(table.slice(0, 60), tmp_path / "part.parquet", row_group_size=16)
    saved = tmp_path / "saved"  # what datasets.Dataset.save_to_disk writes: Arrow stream files and two JSON files
    saved.mkdir()
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.slice(60))
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (saved / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    for mode in ("off", "on"):
        for path in (tmp_path / "part.parquet", saved):
            data = config_lib.load_config("gemma3_tiny", overrides={
                "data.name": "text", "data.path": str(path), "data.shards": mode, "data.seq_len": 32,
                "data.batch_size": 2, "data.validation_fraction": 0.0}).data
            bundle = make_datasets(data, tok, seed=0, log=None)
            assert bundle.report.train.kept == 60, (mode, path)


def test_bad_corpora_are_one_line_before_any_model_is_built(tmp_path, capsys, no_model):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file PAR1")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.py").write_text("")
    (empty / "b.py").write_text("  \n\n")
    cases = [
        (["--data", "text", "--data-path", str(broken)], f"{broken}: not a readable Parquet file"),
        (["--data", "code", "--data-path", str(empty)], "hold no text; expected a corpus"),
        (["--data", "text", "--data-path", str(broken), "--shards", "sometimes"], "--shards 'sometimes'"),
    ]
    for argv, fragment in cases:
        assert fit.main(["--preset", "gemma3_tiny", *argv, "--output-dir", str(tmp_path / "run")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="no column 'content'"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": ["x = 1"]}), tmp_path / "code.parquet")
        check_data(config_lib.load_config("gemma3_tiny", overrides={
            "data.name": "code", "data.path": str(tmp_path / "code.parquet"), "data.shards": "on"}).data)

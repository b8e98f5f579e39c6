"""The data pipeline on small local inputs: exact layouts, packing, chat, key tokens, errors.

The TFDS recipes (imdb, mtnt) are tested in test_data_tfds.py on TFDS data
directories the tests prepare on disk.
"""

import json
import subprocess
import sys

import keras_hub
import ml_collections
import numpy as np
import pytest

from keras_tune.data import make_datasets, layout, tokens
from keras_tune.data.chat import END, MODEL, USER
from keras_tune.errors import UserError

from helpers import ids, rows

DEFAULTS = dict(
    name="code",
    path="",
    data_dir="",
    max_examples=0,
    seq_len=128,
    batch_size=2,
    validation_fraction=0.05,
    max_validation_examples=200,
    text_field="text",
    prompt_field="prompt",
    response_field="response",
    messages_field="messages",
    mtnt_pair="en-fr",
    prompt_template="Translate this into French:\n{source}\n",
    batching="auto",
    key_tokens=("plt", "pd", "sk", "fit", "predict"),
    key_token_alpha=0.0,
    shuffle_buffer=10000,
    # These tests pin the layout of packed rows without document masking
    # (tests/test_document_mask.py covers the default).
    cross_document_attention=True,
)
BOS, EOS, PAD = 2, 1, 0
# Any attempt to reach a host fails at once: these tests must work offline.
pytestmark = pytest.mark.usefixtures("no_network")


def data_config(**overrides):
    return ml_collections.ConfigDict(dict(DEFAULTS, **overrides))


def batches(dataset):
    return list(dataset.as_numpy_iterator())


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def quiet(line):
    pass


def put(directory, name, content):
    """Writes `content` (str or bytes) to `directory/name` and returns the path as a string."""
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


PAIRS = [
    {"prompt": "Say hi:\n", "response": "hi there"},
    {"prompt": "Count to three:\n", "response": "one two three"},
    {"prompt": "Q\n", "response": "A"},
    {"prompt": "Name a colour:\n", "response": "blue"},
]


def test_prompt_response_exact_layout(tmp_path, tok):
    """Pad batching: bos + prompt + response + eos, weight 1 exactly on response and eos."""
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = data_config(name="text", path=path, seq_len=24, batching="pad", validation_fraction=0.0, shuffle_buffer=0)
    bundle = make_datasets(config, tok, seed=0, log=quiet)
    got = rows(bundle.train)
    assert len(got) == 4 and bundle.steps_per_epoch == 2 and bundle.validation is None
    for (token_ids, mask, y, weight), pair in zip(got, PAIRS):
        prompt, response = ids(tok, pair["prompt"]), ids(tok, pair["response"])
        row = [BOS] + prompt + response + [EOS]
        full = row + [PAD] * (25 - len(row))
        assert token_ids.dtype == np.int32 and y.dtype == np.int32 and weight.dtype == np.float32
        assert mask.dtype == bool
        assert token_ids.tolist() == full[:-1]
        assert y.tolist() == full[1:]
        assert mask.tolist() == [True] * (len(row)) + [False] * (24 - len(row))
        # y[i] is row[i + 1]: weight 0 over the prompt, 1 over response and <eos>, 0 over padding.
        expected = [0.0] * len(prompt) + [1.0] * (len(response) + 1) + [0.0] * (24 - len(row) + 1)
        assert weight.tolist() == expected


def test_layout_matches_keras_hub_preprocessor(tmp_path, tok):
    """Our pad-batching rows equal what keras-hub's Gemma3CausalLMPreprocessor makes for fit."""
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = data_config(name="text", path=path, seq_len=16, batching="pad", validation_fraction=0.0, shuffle_buffer=0)
    got = rows(make_datasets(config, tok, seed=0, log=quiet).train)
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer=tok, image_converter=None, sequence_length=16)
    x, y, w = preprocessor({"prompts": [p["prompt"] for p in PAIRS], "responses": [p["response"] for p in PAIRS]})
    for i, (token_ids, mask, our_y, weight) in enumerate(got):
        np.testing.assert_array_equal(token_ids, np.asarray(x["token_ids"])[i])
        np.testing.assert_array_equal(mask, np.asarray(x["padding_mask"])[i])
        np.testing.assert_array_equal(our_y, np.asarray(y)[i])
        np.testing.assert_array_equal(weight, np.asarray(w)[i].astype(np.float32))


def test_bucketing_static_shapes_and_every_example_once(tmp_path, tok):
    records = [{"prompt": "p" * (i % 7 + 1) + ":\n", "response": "word " * (1 + (i * 5) % 23)} for i in range(60)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    config = data_config(name="text", path=path, seq_len=64, batch_size=4, validation_fraction=0.2, batching="bucket")
    bundle = make_datasets(config, tok, seed=3, log=quiet)
    report = bundle.report
    assert report.batching == "bucket" and 1 < len(report.bucket_lengths) <= layout.MAX_BUCKETS
    seen = 0
    for x, y, w in batches(bundle.train):
        assert x["token_ids"].shape[0] == 4 and x["token_ids"].shape[1] in report.bucket_lengths
        assert x["token_ids"].shape == x["padding_mask"].shape == y.shape == w.shape
        seen += 1
    assert seen == bundle.steps_per_epoch == report.train.batches
    assert report.train.sequences == report.train.kept == 48
    assert report.train.batches * 4 + report.train.left_out_per_epoch == 48
    assert report.train.left_out_per_epoch < 4  # remainders move up a bucket
    # Validation: every held-out example exactly once with weight; fillers carry none.
    val = [r for r in rows(bundle.validation) if r[3].sum() > 0]
    assert len(val) == 12 and bundle.validation_steps == report.validation.batches
    assert len(rows(bundle.validation)) == 12 + report.validation.filler_rows
    assert report.validation.filler_rows < 4
    assert 0.0 <= report.pad_fraction < 0.5


def test_packing_covers_every_token_once_in_order(tmp_path, tok):
    documents = [f"Document {i}: " + "the cat sat on the mat. " * (i % 5 + 1) for i in range(12)]
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    config = data_config(name="text", path=str(path), seq_len=16, validation_fraction=0.0, shuffle_buffer=0)
    bundle = make_datasets(config, tok, seed=0, log=quiet)
    assert bundle.report.batching == "pack"
    stream = [t for d in documents for t in ids(tok, d) + [EOS]]
    got = rows(bundle.train)
    assert all(r[0][0] == BOS for r in got)  # every row starts with <bos>
    targets = [t for _, _, y, w in got for t, wt in zip(y, w) if wt > 0]
    left = bundle.report.train.left_out_per_epoch
    assert len(got) == bundle.report.train.sequences - left
    # Targets in row order are the <eos>-joined stream, each token once; only the
    # last row (possibly sitting out with an odd row count) has padding.
    if left:
        assert targets == stream[: len(got) * 16]
    else:
        assert targets == stream
    for token_ids, mask, y, w in got[:-1]:
        assert mask.all() and (w == 1.0).all()
        np.testing.assert_array_equal(token_ids[1:], y[:-1])


def test_pack_unit_exact():
    tok = tokens.Tokenized(
        np.array([10, 11, 12, 20, 21, 30], np.int32), np.ones(6, np.float32), np.array([3, 2, 1])
    )
    r = layout.pack(tok, seq_len=4, bos=BOS, eos=EOS, pad=PAD)
    # stream: 10 11 12 1 20 21 1 30 1 -> rows of 4 after <bos>
    assert r.ids.tolist() == [[2, 10, 11, 12, 1], [2, 20, 21, 1, 30], [2, 1, 0, 0, 0]]
    assert r.mask.tolist() == [[True] * 5, [True] * 5, [True, True, False, False, False]]
    assert r.weights[:, 1:].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_pack_examples_unit_exact():
    # Three examples: (prompt 10, target 11), (prompt 20 21, target 22), (target 30 31 32 33 34 35 36).
    tok = tokens.Tokenized(
        np.array([10, 11, 20, 21, 22, 30, 31, 32, 33, 34, 35, 36], np.int32),
        np.array([0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], np.float32),
        np.array([2, 3, 7]),
    )
    r = layout.pack_examples(tok, seq_len=8, bos=BOS, eos=EOS, pad=PAD)
    # Wrapped sizes 4, 5, 9 in rows of 9: the longest is cut to the row, then 5 and 4 share one.
    assert r.ids.tolist() == [[2, 30, 31, 32, 33, 34, 35, 36, 1], [2, 20, 21, 22, 1, 2, 10, 11, 1]]
    assert r.segments.tolist() == [[1] * 9, [1, 1, 1, 1, 1, 2, 2, 2, 2]]
    assert r.mask.all() and r.documents.tolist() == [1, 2]
    # Targets (row[1:]): each example's as it has them alone; the next example's <bos> carries none.
    assert r.weights[:, 1:].tolist() == [[1] * 8, [0, 0, 1, 1, 0, 0, 1, 1]]
    leaky = layout.pack_examples(tok, seq_len=8, bos=BOS, eos=EOS, pad=PAD, documents=False)
    assert leaky.segments is None and leaky.ids.tolist() == r.ids.tolist()


def test_best_fit_decreasing_fills_the_fullest_row_that_fits():
    bins, offsets, ordinal = layout.best_fit_decreasing([3, 7, 5, 2, 4, 1], capacity=8)
    # 7 -> A(1 left); 5 -> B(3 left); 4 -> C(4 left); 3 -> B (the fullest that fits); 2 -> C; 1 -> A.
    assert bins.tolist() == [1, 0, 1, 2, 2, 0]
    assert offsets.tolist() == [5, 0, 0, 4, 0, 7]
    assert ordinal.tolist() == [1, 0, 0, 1, 0, 1]


def test_best_fit_decreasing_matches_the_textbook_loop_on_random_sizes():
    rng = np.random.default_rng(7)
    sizes = np.minimum(rng.lognormal(3.0, 0.8, 500).astype(np.int64) + 1, 65)
    bins, offsets, ordinal = layout.best_fit_decreasing(sizes, capacity=65)
    filled = np.bincount(bins, weights=sizes).astype(np.int64)
    assert (filled <= 65).all() and len(filled) == bins.max() + 1
    for b in range(len(filled)):  # items of a bin lie end to end, in the order of their ordinals
        members = np.flatnonzero(bins == b)
        members = members[np.argsort(ordinal[members])]
        assert ordinal[members].tolist() == list(range(len(members)))
        assert offsets[members].tolist() == np.concatenate([[0], np.cumsum(sizes[members])[:-1]]).tolist()
    # The textbook loop: each item, longest first, into the bin with the least room that holds it.
    # Bins with equal room are interchangeable, so the bins' fill levels must agree exactly.
    textbook = []
    for size in sorted(sizes.tolist(), reverse=True):
        fits = [k for k, used in enumerate(textbook) if used + size <= 65]
        if fits:
            best = max(fits, key=lambda k: textbook[k])
            textbook[best] += size
        else:
            textbook.append(size)
    assert sorted(filled.tolist()) == sorted(textbook)


def test_pairs_are_packed_whole_and_keep_the_targets_they_have_alone(tmp_path, tok):
    records = [{"prompt": "p" * (i % 7 + 1) + ":\n", "response": "word " * (1 + (i * 5) % 23)} for i in range(60)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    # Batch size 1: no row sits out an epoch, so both layouts hold every example.
    config = data_config(name="text", path=path, seq_len=64, batch_size=1, validation_fraction=0.2,
                         cross_document_attention=False)
    packed = make_datasets(config, tok, seed=3, log=quiet)
    report = packed.report
    assert report.batching == "pack" and report.whole_examples and report.document_masking
    assert "packed examples (whole, none split across rows)" in report.summary()
    assert report.train.kept == 48 and report.train.documents_per_row > 1.5
    alone = make_datasets(data_config(**dict(config, batching="pad")), tok, seed=3, log=quiet)

    def examples(bundle, split):
        """Each example's (input ids, targets, weights) as its own segment of a row holds them."""
        found = []
        for token_ids, segments, y, weight in rows(getattr(bundle, split)):
            segments = segments.astype(np.int64)
            for segment in range(1, segments.max() + 1):
                at = segments == segment
                if weight[at].sum() > 0:  # validation fillers carry no weight
                    found.append((tuple(token_ids[at]), tuple(y[at]), tuple(weight[at])))
        return sorted(found)

    for split in ("train", "validation"):
        mine, theirs = examples(packed, split), examples(alone, split)
        assert len(mine) == (48 if split == "train" else 12)
        # The last position of a packed example predicts the next one's <bos> with weight 0,
        # where its row alone predicts padding: compare everything but that target.
        assert [(i, y[:-1], w) for i, y, w in mine] == [(i, y[:-1], w) for i, y, w in theirs], split
    # Every row starts an example with <bos>, and each example (segment) opens with one.
    x, _, _ = next(packed.train.as_numpy_iterator())
    opens = np.diff(x["padding_mask"], axis=1, prepend=0) > 0
    assert (x["token_ids"][opens] == BOS).all() and opens[:, 0].all()


def test_auto_buckets_pairs_when_packing_would_not_fill_a_batch(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = data_config(name="text", path=path, seq_len=128, batch_size=2, validation_fraction=0.0)
    assert make_datasets(config, tok, seed=0, log=quiet).report.batching == "bucket"  # all four fit one row
    config.seq_len = 24
    report = make_datasets(config, tok, seed=0, log=quiet).report
    assert report.batching == "pack" and report.train.sequences >= 2


def test_packed_rows_shuffled_still_all_there(tmp_path, tok):
    documents = [f"Doc {i} " + "abc def " * (i + 2) for i in range(10)]
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(documents), encoding="utf-8")
    config = data_config(name="text", path=str(path), seq_len=8, batch_size=1, validation_fraction=0.0)
    bundle = make_datasets(config, tok, seed=5, log=quiet)
    got = sorted(tuple(r[2][r[3] > 0]) for r in rows(bundle.train))
    config.shuffle_buffer = 0
    ordered = make_datasets(config, tok, seed=5, log=quiet)
    want = sorted(tuple(r[2][r[3] > 0]) for r in rows(ordered.train))
    assert got == want


def test_chat_turns_and_loss_on_model_turns_only(tmp_path, tok):
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "model", "content": "Goodbye."},
    ]}
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation, {"prompt": "Yes?", "response": "No."}])
    config = data_config(name="chat", path=path, seq_len=96, batching="pad", validation_fraction=0.0, shuffle_buffer=0)
    bundle = make_datasets(config, tok, seed=0, log=quiet)
    (token_ids, mask, y, w), (t2, _, y2, w2) = rows(bundle.train)
    parts = [
        (USER + "Be brief.\n\nHi" + END, 0), (MODEL, 0), ("Hello!" + END, 1),
        (USER + "Bye" + END, 0), (MODEL, 0), ("Goodbye." + END, 1),
    ]
    row, weights = [BOS], [0.0]
    for text, weight in parts:
        piece = ids(tok, text)
        row += piece
        weights += [float(weight)] * len(piece)
    row.append(EOS)
    weights.append(1.0)
    n = len(row) - 1
    assert token_ids[:n].tolist() == row[:-1] and y[:n].tolist() == row[1:]
    assert w[:n].tolist() == weights[1:] and not w[n:].any()
    assert mask[: n + 1].all() and not mask[n + 1 :].any()  # x holds the <eos> too
    assert tok.token_to_id("<start_of_turn>") in token_ids.tolist()
    # The prompt/response record renders as one user turn and one model turn.
    expected = [BOS] + ids(tok, USER + "Yes?" + END) + ids(tok, MODEL) + ids(tok, "No." + END) + [EOS]
    assert t2[: len(expected) - 1].tolist() == expected[:-1]
    assert y2[w2 > 0].tolist() == ids(tok, "No." + END) + [EOS]


def test_key_token_weight(tmp_path, tok):
    source = "import matplotlib.pyplot as plt\nplt.plot(x)\nmodel.fit(x)\n"
    (tmp_path / "a.py").write_text(source, encoding="utf-8")
    config = data_config(name="code", path=str(tmp_path / "a.py"), seq_len=64, batch_size=1,
                         validation_fraction=0.0, key_token_alpha=0.5)
    bundle = make_datasets(config, tok, seed=0, log=quiet)
    ((_, _, y, w),) = rows(bundle.train)
    sequences = layout.key_token_sequences(tok, DEFAULTS["key_tokens"])
    count = 0
    targets = y[w > 0].tolist()
    for spellings in sequences.values():
        for seq in spellings:
            count += sum(targets[i : i + len(seq)] == list(seq) for i in range(len(targets)))
    assert count >= 2  # two plt, one fit at least in one spelling
    assert np.allclose(w[w > 0], 0.5 * (1 + count))
    assert bundle.report.key_token_ids


def test_code_directory_holds_out_whole_files(tmp_path, tok):
    for i in range(10):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n" * 3, encoding="utf-8")
    (tmp_path / "__init__.py").write_text("", encoding="utf-8")
    config = data_config(name="code", path=str(tmp_path), seq_len=16, validation_fraction=0.2)
    first = make_datasets(config, tok, seed=1, log=quiet)
    assert first.report.train.dropped == {"empty file": 1}
    assert first.report.train.kept == 8 and first.report.validation.kept == 2
    again = make_datasets(config, tok, seed=1, log=quiet)
    assert [r[2].tolist() for r in rows(first.validation)] == [r[2].tolist() for r in rows(again.validation)]


def test_code_jsonl_content_field(tmp_path, tok):
    path = write_jsonl(tmp_path / "code.jsonl", [{"content": "import pandas as pd\n"}, {"content": "x = 1\n"}])
    config = data_config(name="code", path=path, seq_len=8, batch_size=1, validation_fraction=0.0, shuffle_buffer=0)
    bundle = make_datasets(config, tok, seed=0, log=quiet)
    targets = [t for r in rows(bundle.train) for t in r[2][r[3] > 0]]
    assert targets == ids(tok, "import pandas as pd\n") + [EOS] + ids(tok, "x = 1\n") + [EOS]


def test_code_default_corpus_is_installed_sources(tok):
    lines = []
    config = data_config(name="code", max_examples=6, seq_len=32, validation_fraction=0.2)
    bundle = make_datasets(config, tok, seed=0, log=lines.append)
    assert bundle.report.train.kept + bundle.report.validation.kept == 6
    assert any("installed" in n for n in bundle.report.notes)
    assert bundle.steps_per_epoch > 0
    # Packed rows cut the stream, so the only padding is the tail of an epoch's last
    # batch: less than one batch in the batches sampled (which files are sampled
    # depends on what is installed; whether the last batch is among them, on the shuffle).
    report = bundle.report
    assert report.pad_fraction * report.sampled_batches * 2 * 32 < 2 * 32, report


def test_tokenizing_still_works_after_keras_set_random_seed():
    """A notebook that calls `keras.utils.set_random_seed` after loading the model can still make datasets.

    TensorFlow drops the SentencePiece op's resource on `tf.random.set_seed`; the
    tokenizer then fails inside tf.data only. Run in a child process: the call
    would break every tokenizer of this worker.
    """
    child = """
import keras
import tensorflow as tf
from keras_tune.data.tokens import document_example, tokenize
from keras_tune.models.tiny import tiny_tokenizer

tokenizer = tiny_tokenizer("gemma3")
texts = tf.data.Dataset.from_tensor_slices(["hello world", "a b c"]).map(document_example)
before = tokenize(texts, tokenizer)
keras.utils.set_random_seed(0)
after = tokenize(texts, tokenizer)
assert after.ids.tolist() == before.ids.tolist() and after.lengths.tolist() == before.lengths.tolist()
print("lengths", before.lengths.tolist())
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lengths [" in done.stdout and "lengths []" not in done.stdout, done.stdout


def test_csv_and_json_records(tmp_path, tok):
    (tmp_path / "a.csv").write_text('text,label\n"first, with comma",1\nsecond,0\n', encoding="utf-8")
    config = data_config(name="text", path=str(tmp_path / "a.csv"), seq_len=8, batch_size=1,
                         validation_fraction=0.0, shuffle_buffer=0)
    targets = [t for r in rows(make_datasets(config, tok, seed=0, log=quiet).train) for t in r[2][r[3] > 0]]
    assert targets == ids(tok, "first, with comma") + [EOS] + ids(tok, "second") + [EOS]
    (tmp_path / "b.json").write_text(json.dumps(PAIRS), encoding="utf-8")
    config = data_config(name="text", path=str(tmp_path / "b.json"), seq_len=24, validation_fraction=0.0)
    bundle = make_datasets(config, tok, seed=0, log=quiet)
    assert bundle.report.batching == "pack" and bundle.report.train.kept == 4


def test_prompt_too_long_is_dropped_and_counted(tmp_path, tok):
    records = PAIRS + [{"prompt": "a very long prompt " * 10, "response": "ok"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    config = data_config(name="text", path=path, seq_len=16, validation_fraction=0.0)
    report = make_datasets(config, tok, seed=0, log=quiet).report
    assert report.train.read == 5 and report.train.kept == 4
    assert report.train.dropped == {"prompt fills seq_len: no target token fits": 1}
    assert "dropped 1 (1 prompt fills seq_len" in report.summary()


def test_same_seed_same_batches(tmp_path, tok):
    records = [{"prompt": f"Q{i}:\n", "response": "answer " * (i % 9 + 1)} for i in range(40)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    config = data_config(name="text", path=path, seq_len=32, batch_size=2)

    def two_epochs(seed):
        bundle = make_datasets(config, tok, seed=seed, log=quiet)
        stream = bundle.train_stream().take(2 * bundle.steps_per_epoch)
        return [(x["token_ids"].tolist(), w.tolist()) for x, _, w in batches(stream)]

    first, second = two_epochs(7), two_epochs(7)
    assert first == second
    half = len(first) // 2
    assert first[:half] != first[half:]  # each epoch of the stream reshuffles
    assert two_epochs(8) != first


@pytest.mark.parametrize(
    "name, setup, overrides, message",
    [
        ("missing field", lambda d: write_jsonl(d / "a.jsonl", [{"prompt": "x"}]), {},
         "no field 'text' and no 'prompt'/'response' pair"),
        ("missing field later", lambda d: write_jsonl(d / "a.jsonl", [{"text": "x"}, {"body": "y"}]), {},
         "a.jsonl:2: no field 'text'"),
        ("empty file", lambda d: put(d, "a.txt", ""), {},
         "a.txt is empty"),
        ("undecodable", lambda d: put(d, "a.txt", b"ok \xff\xfe bad"), {},
         "are not UTF-8"),
        ("bad json", lambda d: put(d, "a.jsonl", '{"text": "x"}\n{oops\n'), {},
         "a.jsonl:2: not JSON"),
        ("no files", lambda d: str(d / "*.jsonl"), {}, "matched no files"),
        ("suffix", lambda d: put(d, "a.xlsx", "x"), {}, "has suffix '.xlsx'"),
        ("bad parquet", lambda d: put(d, "a.parquet", "x"), {}, "a.parquet: not a readable Parquet file"),
        ("no path", lambda d: "", {}, "needs --data-path"),
        ("chat role", lambda d: write_jsonl(d / "c.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}]),
         {"name": "chat"}, "role 'bot'"),
        ("chat seq_len", lambda d: write_jsonl(d / "c.jsonl", [{"prompt": "a", "response": "b"}]),
         {"name": "chat", "seq_len": 8}, "too small for the chat format"),
        ("chat txt", lambda d: put(d, "c.txt", "hi"), {"name": "chat"},
         "has suffix '.txt'"),
        ("mtnt seq_len", lambda d: "", {"name": "mtnt", "prompt_template": "Please translate " * 8 + "{source}"},
         "too small for the prompt template"),
        ("mtnt template", lambda d: "", {"name": "mtnt", "prompt_template": "Translate:"}, "'{source}'"),
        ("mtnt pair", lambda d: "", {"name": "mtnt", "mtnt_pair": "en-de"}, "data.mtnt_pair 'en-de'"),
        ("imdb path", lambda d: str(d), {"name": "imdb"}, "reads TFDS"),
        ("too few", lambda d: write_jsonl(d / "a.jsonl", [{"text": "x"}]), {"batch_size": 4},
         "fewer than batch_size 4"),
        ("recipe", lambda d: "", {"name": "wiki"}, "--data 'wiki'"),
        ("batching", lambda d: write_jsonl(d / "a.jsonl", [{"text": "x"}] * 4), {"batching": "greedy"},
         "data.batching 'greedy'"),
    ],
)
def test_bad_input_raises_user_error(tmp_path, tok, name, setup, overrides, message):
    path = setup(tmp_path)
    config = data_config(**dict({"name": "text", "path": path, "seq_len": 32}, **overrides))
    with pytest.raises(UserError) as caught:
        make_datasets(config, tok, seed=0, log=quiet)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_choose_buckets_each_bucket_fills_a_batch():
    rng = np.random.default_rng(0)
    needs = np.clip(rng.lognormal(3.2, 0.6, size=500).astype(int), 1, 256)
    lengths = layout.choose_buckets(needs, needs, seq_len=256, batch_size=8)
    assert lengths == sorted(lengths) and len(lengths) <= layout.MAX_BUCKETS
    assert lengths[-1] >= needs.max() and lengths[-1] <= 256
    low = 0
    for length in lengths:
        assert ((needs > low) & (needs <= length)).sum() >= 8
        low = length
    padded = sum(min(n for n in lengths if n >= need) for need in needs)
    assert padded < 0.7 * 256 * len(needs)
    # Too few examples for two buckets: one bucket covering everything.
    assert layout.choose_buckets(np.array([3, 40]), np.array([3, 40]), 64, 2) == [40]


def test_assign_buckets_moves_remainders_up():
    need = np.array([5, 6, 7, 20, 21, 22, 23, 24, 40])
    index = layout.assign_buckets(need, [8, 24, 48], batch_size=2)
    # bucket 8 has 3 -> its longest (7) moves up; bucket 24 then has 6 -> whole;
    # bucket 48 keeps 40 alone (sits out: fewer than a batch).
    assert index.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 2]
    assert all(length >= n for n, length in zip(need, np.array([8, 24, 48])[index]))


def test_dropped_examples_are_counted_with_reasons(tmp_path, tok):
    records = [
        {"messages": [{"role": "user", "content": "hi"}]},  # nothing to learn
        {"messages": [{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"}]},
        {"prompt": "q", "response": "a"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    config = data_config(name="chat", path=path, seq_len=32, batch_size=1, validation_fraction=0.0)
    report = make_datasets(config, tok, seed=0, log=quiet).report
    assert report.train.read == 3 and report.train.kept == 2
    assert report.train.dropped == {"no model turn": 1}
    empty = write_jsonl(tmp_path / "text.jsonl", [{"text": ""}, {"text": "a b c"}, {"text": " "}])
    config = data_config(name="text", path=empty, seq_len=8, batch_size=1, validation_fraction=0.0)
    report = make_datasets(config, tok, seed=0, log=quiet).report
    assert report.train.read == 3 and report.train.dropped == {"empty text": 2}


def test_benchmark_quick_smoke():
    from benchmarks.data_pipeline import run

    figures = run(quick=True, tokenizer="tiny", examples=300, batch_size=4)
    assert figures["seq_len"] == 256
    assert figures["passes"] and figures["useful_ratio"] >= 1.5
    assert set(figures["batching"]) == {"seeds_pad", "keras_tune_bucket", "keras_tune_auto"}
    assert figures["batching"]["keras_tune_auto"]["batching"] == "pack"
    assert figures["tokenize"]["seeds_numpy_function"]["tokens"] == figures["tokenize"]["keras_tune_graph_op"]["tokens"]

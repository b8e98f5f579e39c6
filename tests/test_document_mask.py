"""Packed rows that do not leak: each document attends only to itself (segment ids)."""

import ml_collections
import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune.data import make_datasets, layout, tokens
from keras_tune.models.document_mask import enable_document_masking
from keras_tune.models.loader import load_causal_lm

BOS, EOS, PAD = 2, 1, 0


def test_pack_with_documents_gives_each_its_bos_and_a_segment():
    tok = tokens.Tokenized(np.array([10, 11, 12, 20, 21, 30], np.int32), np.ones(6, np.float32), np.array([3, 2, 1]))
    rows = layout.pack(tok, seq_len=4, bos=BOS, eos=EOS, pad=PAD, documents=True)
    # stream: <bos> 10 11 12 <eos> <bos> 20 21 <eos> <bos> 30 <eos>, cut into rows of 4 after a leading <bos>
    assert rows.ids.tolist() == [[2, 2, 10, 11, 12], [2, 1, 2, 20, 21], [2, 1, 2, 30, 1]]
    assert rows.segments.tolist() == [[1, 2, 2, 2, 2], [1, 1, 2, 2, 2], [1, 1, 2, 2, 2]]
    # A document's own <bos> is never a target; its <eos> is.
    assert rows.weights[:, 1:].tolist() == [[0, 1, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1]]
    assert rows.documents.tolist() == [1, 2, 2]
    plain = layout.pack(tok, seq_len=4, bos=BOS, eos=EOS, pad=PAD)
    assert plain.segments is None and plain.documents.tolist() == [1, 2, 1]


def _data_config(**overrides):
    fields = dict(config_lib.base_config().data)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def test_packed_batches_send_segment_ids_and_the_report_counts_documents(tmp_path, tok):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(f"Doc {i}: " + "one two three " * (i % 3 + 1) for i in range(30)), encoding="utf-8")
    config = _data_config(name="text", path=str(path), seq_len=32, batch_size=2, validation_fraction=0.0, shuffle_buffer=0)
    bundle = make_datasets(config, tok, seed=0, log=None)
    x, y, weight = next(bundle.train.as_numpy_iterator())
    segments = x["padding_mask"]
    assert segments.dtype == np.int32 and segments.max() > 2
    # Every segment after the first starts with <bos>, whose prediction carries no loss.
    opens = np.flatnonzero(np.diff(segments[0]) == 1) + 1
    assert (x["token_ids"][0, opens] == BOS).all() and (weight[0, opens - 1] == 0).all()
    assert bundle.report.document_masking and bundle.report.train.documents_per_row > 2
    assert "documents a row on average" in bundle.report.summary()
    assert "attends only to itself" in bundle.report.summary()
    config.cross_document_attention = True
    leaky = make_datasets(config, tok, seed=0, log=None)
    assert next(leaky.train.as_numpy_iterator())[0]["padding_mask"].dtype == bool


def _packed_row(documents, seq_len):
    """One packed row (segment ids included) holding `documents` (lists of token ids)."""
    lengths = np.array([len(d) for d in documents])
    tok = tokens.Tokenized(np.concatenate(documents).astype(np.int32), np.ones(lengths.sum(), np.float32), lengths)
    rows = layout.pack(tok, seq_len=seq_len, bos=BOS, eos=EOS, pad=PAD, documents=True)
    assert len(rows) == 1, "the documents must fit one row"
    return rows.ids[:, :-1], rows.segments[:, :-1]


def _logits(model, token_ids, padding_mask):
    return np.asarray(model({"token_ids": token_ids, "padding_mask": padding_mask}))


def _check_each_document_sees_only_itself(model, documents, seq_len, atol):
    token_ids, segments = _packed_row(documents, seq_len)
    masked = _logits(model, token_ids, segments)
    leaky = _logits(model, token_ids, (segments > 0).astype("int32"))
    leaks = []
    for index, document in enumerate(documents):
        start = int(np.flatnonzero(segments[0] == index + 2)[0])  # the document's own <bos>
        alone_ids = np.full((1, seq_len), PAD, np.int32)
        alone_ids[0, : len(document) + 1] = [BOS, *document]
        alone = _logits(model, alone_ids, (alone_ids != PAD).astype("int32"))[0, : len(document) + 1]
        inside = masked[0, start : start + len(document) + 1]
        np.testing.assert_allclose(inside, alone, atol=atol, rtol=0, err_msg=f"document {index}")
        leaks.append(np.abs(leaky[0, start : start + len(document) + 1] - alone).max())
    return leaks


@pytest.mark.parametrize("preset", ["gemma_tiny", "gemma2_tiny", "gemma3_tiny"])
def test_a_document_in_a_packed_row_has_the_logits_it_has_alone(preset):
    model = load_causal_lm(config_lib.load_config(preset))
    assert enable_document_masking(model.backbone) == len(model.backbone.transformer_layers)
    assert enable_document_masking(model.backbone) == 0  # idempotent
    rng = np.random.default_rng(1)
    # The middle document is longer than Gemma 2/3 tiny's sliding windows (32 / 16 tokens).
    documents = [list(rng.integers(10, 1000, size=n)) for n in (9, 40, 7)]
    leaks = _check_each_document_sees_only_itself(model, documents, seq_len=64, atol=2e-5)
    # Without the mask every document sees what precedes it in the row (the first, the
    # row's leading <bos>): the leak the mask prevents.
    assert min(leaks) > 1e-3, leaks


@pytest.mark.slow
def test_the_real_270m_keeps_three_packed_texts_apart():
    model = load_causal_lm(config_lib.load_config("gemma3_270m_offline"))
    enable_document_masking(model.backbone)
    tokenizer = model.preprocessor.tokenizer
    texts = ["The cat sat on the mat.", "def add(a, b):\n    return a + b", "Paris is the capital of France."]
    documents = [[int(i) for i in np.asarray(tokenizer(text)).reshape(-1)] for text in texts]
    leaks = _check_each_document_sees_only_itself(model, documents, seq_len=48, atol=2e-3)
    assert min(leaks[1:]) > 1e-2, leaks

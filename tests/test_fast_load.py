"""The fast GGUF load: no random initialization, one copy out of the cache, layouts kept.

`load_gguf_causal_lm` creates the backbone's variables deferred and gives each
its GGUF weight as first value. These tests pin the behaviour that makes that
fast and safe (no initializer runs, the values are the cache's arrays, nothing
keeps a view of the cache file, sharding follows the layout map, the caller's
deferred variables are left alone) rather than timing it.
"""

import gc
import logging
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_IDS, copy_gguf, q8_0, sequence_logits, tiny_causal_lm, tp_layout_map


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory):
    """A quantized (cached) tiny Gemma 3 GGUF."""
    from keras_tune.models.exports.gguf import export_gguf

    folder = tmp_path_factory.mktemp("fast")
    f32 = export_gguf(tiny_causal_lm(seed=5), folder / "tiny-f32.gguf")
    return copy_gguf(f32, folder / "tiny-q8_0.gguf", q8_0)


@pytest.fixture
def initializer_calls(monkeypatch):
    """Initializer calls that made a concrete array of rank >= 1, as (class name, shape).

    Left out: calls under a JAX trace (Keras' placeholder for a deferred variable
    read while keras-hub traces the functional model: abstract, no cost) and
    scalars (the metric variables `CausalLM.compile` creates).
    """
    import jax
    import keras

    calls = []
    classes, stack = set(), [keras.initializers.Initializer]
    while stack:
        cls = stack.pop()
        if cls not in classes:
            classes.add(cls)
            stack.extend(cls.__subclasses__())
    for cls in classes:
        if "__call__" in vars(cls):
            original = vars(cls)["__call__"]

            def counted(self, shape, *args, _original=original, **kwargs):
                value = _original(self, shape, *args, **kwargs)
                if not isinstance(value, jax.core.Tracer) and len(shape) > 0:
                    calls.append((type(self).__name__, tuple(shape)))
                return value

            monkeypatch.setattr(cls, "__call__", counted)
    return calls


def _load(path, caplog=None, **kwargs):
    from keras_tune.models.gguf.load import load_gguf_causal_lm

    if caplog is None:
        return load_gguf_causal_lm(path, **kwargs), None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="keras_tune.models.gguf"):
        causal_lm = load_gguf_causal_lm(path, **kwargs)
    message = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded"))
    return causal_lm, message.split(" from ")[1].split(" ")[0]


def _cached_arrays(path, causal_lm):
    from keras_tune.models.gguf import cache as gguf_cache
    from keras_tune.models.gguf import tensors

    entries = tensors.tensor_map(causal_lm.backbone)
    shapes = {name: tuple(getattr(layer, attr).shape) for name, layer, attr, _ in entries}
    digest = gguf_cache.file_sha256(path)
    arrays = gguf_cache.open_cache(gguf_cache.cache_path(digest), digest, shapes)
    assert arrays is not None
    return entries, arrays


def _mapped(path):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    return str(path) in maps.read_text()


def test_cached_load_runs_no_initializer_and_equals_the_cache(q8_gguf, cache, caplog, initializer_calls):
    fresh, source = _load(q8_gguf, caplog)
    assert source == "gguf"
    assert initializer_calls == []  # the converting load does not initialize at random either
    cached, source = _load(q8_gguf, caplog)
    assert source == "cache"
    assert initializer_calls == []

    entries, arrays = _cached_arrays(q8_gguf, cached)
    assert len(entries) == len(cached.backbone.weights)  # every variable comes from the GGUF
    for name, layer, attr, kind in entries:
        value = np.asarray(getattr(layer, attr).value)
        expected = arrays[name] - np.float32(1.0) if kind == "norm" else arrays[name]
        np.testing.assert_array_equal(value, expected, err_msg=name)
    for original, loaded in zip(fresh.backbone.weights, cached.backbone.weights):
        np.testing.assert_array_equal(np.asarray(original.value), np.asarray(loaded.value), err_msg=original.path)
    np.testing.assert_array_equal(sequence_logits(cached, TINY_IDS), sequence_logits(fresh, TINY_IDS))
    assert not list(cache.glob("*.partial*"))


def test_weights_do_not_keep_the_cache_file_mapped(q8_gguf, cache, caplog):
    _load(q8_gguf, caplog)
    causal_lm, source = _load(q8_gguf, caplog)
    assert source == "cache"
    gc.collect()
    (cache_file,) = cache.glob("*.bin")
    # JAX adopts aligned host buffers as they are; a variable backed by the
    # read-only mapping would keep it mapped (and crash when donated).
    assert not _mapped(cache_file)
    assert np.abs(np.asarray(causal_lm.backbone.get_layer("token_embedding").embeddings.value)).max() > 0


def test_callers_deferred_variables_are_left_alone(q8_gguf, cache):
    import keras

    from keras_tune import compat

    with keras.StatelessScope(initialize_variables=False):
        mine = keras.Variable(initializer="ones", shape=(3,), name="mine")
    try:
        queued = list(compat.keras_global_attribute("uninitialized_variables", []))
        assert mine in queued
        _load(q8_gguf)
        assert compat.keras_global_attribute("uninitialized_variables", []) == queued
    finally:
        compat.set_keras_global_attribute("uninitialized_variables", [])


def test_leftover_variables_get_their_own_initializer():
    """Variables no GGUF tensor covers (none in keras-hub 0.32's Gemma 3) still get initialized."""
    import keras

    from keras_tune import compat
    from keras_tune.models.gguf.load import _initialize_leftovers

    with keras.StatelessScope(initialize_variables=False):
        other = keras.Variable(initializer="zeros", shape=(2,), name="other")
        leftover = keras.Variable(initializer="ones", shape=(3,), name="leftover")
    compat.set_keras_global_attribute("uninitialized_variables", [other])  # the caller's
    try:
        _initialize_leftovers([leftover])
        np.testing.assert_array_equal(np.asarray(leftover.value), np.ones(3, "float32"))
        assert compat.keras_global_attribute("uninitialized_variables") == [other]
    finally:
        compat.set_keras_global_attribute("uninitialized_variables", [])


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_sharded_load_equals_unsharded(q8_gguf, cache, caplog, dtype):
    import jax
    import keras

    reference, _ = _load(q8_gguf, caplog, dtype=dtype)  # builds the cache
    mesh = keras.distribution.DeviceMesh((1, 8), ("batch", "model"), devices=jax.devices()[:8])
    distribution = keras.distribution.ModelParallel(layout_map=tp_layout_map(mesh), batch_dim_name="batch")
    with distribution.scope():
        sharded, source = _load(q8_gguf, caplog, dtype=dtype)
        assert source == "cache"
        for variable in sharded.backbone.weights:
            expected = distribution.get_variable_layout(variable).backend_layout
            assert variable.value.sharding.is_equivalent_to(expected, variable.ndim), variable.path
        kernel = sharded.backbone.get_layer("decoder_block_1").gating_ffw.kernel.value
        assert len(kernel.sharding.device_set) == 8
        assert kernel.addressable_shards[0].data.shape == (64, 128 // 8)
        embeddings = sharded.backbone.get_layer("token_embedding").embeddings.value
        assert embeddings.addressable_shards[0].data.shape == (1024 // 8, 64)
        sharded_logits = sequence_logits(sharded, TINY_IDS)
    for original, loaded in zip(reference.backbone.weights, sharded.backbone.weights):
        assert str(loaded.dtype) == str(original.dtype)
        np.testing.assert_array_equal(
            np.asarray(original.value, dtype="float32"), np.asarray(loaded.value, dtype="float32"), err_msg=original.path
        )
    if dtype is None:  # in bfloat16, sharded matmuls round in another order: equal weights are the check
        np.testing.assert_allclose(sharded_logits, sequence_logits(reference, TINY_IDS), atol=1e-5)


def test_tokenizer_is_cached_by_content(q8_gguf, cache, monkeypatch):
    import keras_hub

    from keras_tune.models.gguf import cache as gguf_cache
    from keras_tune.models.gguf import vocabulary
    from keras_tune.models.gguf.vocabulary import gguf_tokenizer

    first = gguf_tokenizer(q8_gguf)
    (model_file,) = cache.glob("*-tokenizer-*.model")
    assert model_file == gguf_cache.tokenizer_path(gguf_cache.file_sha256(q8_gguf))

    def rebuilt(*args):
        raise AssertionError("the SentencePiece model was rebuilt despite its cache")

    with monkeypatch.context() as patch:
        patch.setattr(vocabulary, "sentencepiece_proto", rebuilt)
        second = gguf_tokenizer(q8_gguf)
    assert second.proto == first.proto
    # Same ids as a tokenizer keras-hub builds the ordinary (tracked, slow) way.
    plain = keras_hub.models.Gemma3Tokenizer(proto=first.proto, has_vision_tokens=False)
    assert second.get_vocabulary() == plain.get_vocabulary()
    for text in ("<start_of_turn>user\nHi 123<end_of_turn>\n", "café 😀\tx  y"):
        np.testing.assert_array_equal(np.asarray(second(text)), np.asarray(plain(text)))
    assert (second.start_token_id, second.end_token_id, second.pad_token_id) == (2, 1, 0)

    model_file.write_bytes(b"not a sentencepiece model")
    third = gguf_tokenizer(q8_gguf)  # rebuilt and rewritten
    assert third.proto == first.proto
    assert model_file.read_bytes() == first.proto
    assert not list(cache.glob("*.partial*"))


def test_float_gguf_tokenizer_is_not_cached(cache, tmp_path):
    from keras_tune.models.exports.gguf import export_gguf
    from keras_tune.models.gguf.vocabulary import gguf_tokenizer

    path = export_gguf(tiny_causal_lm(seed=6), tmp_path / "tiny-f32.gguf")
    gguf_tokenizer(path)
    assert not cache.exists() or not list(cache.glob("*.model"))


@pytest.mark.slow
def test_registry_model_loads_from_cache_without_initializers(initializer_calls):
    """The real 270M: no initializer runs, and every weight is the cache's array."""
    from keras_tune.models.gguf.registry import registry_gguf_path

    path = registry_gguf_path()
    causal_lm, _ = _load(path, sequence_length=64)  # converts once if the cache is cold
    del initializer_calls[:]
    causal_lm, _ = _load(path, sequence_length=64)
    assert initializer_calls == []
    entries, arrays = _cached_arrays(path, causal_lm)
    for name, layer, attr, kind in entries[:14] + entries[-1:]:
        expected = arrays[name] - np.float32(1.0) if kind == "norm" else arrays[name]
        np.testing.assert_array_equal(np.asarray(getattr(layer, attr).value), expected, err_msg=name)


def test_a_large_array_is_written_to_the_device_in_row_blocks(q8_gguf, cache, caplog):
    from keras_tune.models.gguf import cache as gguf_cache
    from keras_tune.models.gguf import load

    causal_lm, _ = _load(q8_gguf, caplog)  # builds the cache
    entries, arrays = _cached_arrays(q8_gguf, causal_lm)
    # 1,024 x 64 float32 rows in blocks of 300 rows: four blocks, the last one overlapping.
    blocked = arrays.device_array("token_embd.weight", "float32", block_bytes=300 * 64 * 4)
    np.testing.assert_array_equal(np.asarray(blocked), arrays["token_embd.weight"])
    assert isinstance(arrays, gguf_cache.CachedArrays) and load.QUANTIZE_ROWS_A_BLOCK > 0


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(q8_gguf, cache, caplog, monkeypatch, mode):
    """`load_gguf_causal_lm(quantize=)` from the cache: the same variables, bit for bit, as Keras' `quantize` after."""
    from keras_tune.models.gguf import load
    from keras_tune.models.quantize import quantize_base

    reference, _ = _load(q8_gguf, caplog)  # builds the cache
    quantize_base(reference, mode)
    monkeypatch.setattr(load, "QUANTIZE_ROWS_A_BLOCK", 300)  # several row blocks of the tiny embedding
    quantized, source = _load(q8_gguf, caplog, quantize=mode)
    assert source == "cache"
    expected = {v.path: v for v in reference.backbone.weights}
    assert sorted(expected) == sorted(v.path for v in quantized.backbone.weights)
    for variable in quantized.backbone.weights:
        assert str(variable.dtype) == str(expected[variable.path].dtype), variable.path
        np.testing.assert_array_equal(np.asarray(variable.value), np.asarray(expected[variable.path].value),
                                      err_msg=variable.path)
    embedding = quantized.backbone.get_layer("token_embedding")
    assert embedding.quantization_mode == mode and str(embedding.dtype_policy.name).startswith(mode)
    np.testing.assert_array_equal(sequence_logits(quantized, TINY_IDS), sequence_logits(reference, TINY_IDS))

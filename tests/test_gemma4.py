"""Gemma 4 text models: the same function as keras-hub's Gemma4CausalLM, sparse experts, masks, int8, chat turns."""

import jax
import jax.extend
import numpy as np
import pytest

from helpers import gemma4_causal_lm, jitted_logits, kerashub_gemma4_logits, kerashub_gemma4_twin

PRESETS = ("gemma4_tiny", "gemma4_moe_tiny")


@pytest.fixture(scope="module")
def models():
    """{preset: (config, keras_tune's CausalLM, keras-hub's twin on the same weights)}."""
    built = {}
    for preset in PRESETS:
        config, causal_lm = gemma4_causal_lm(preset)
        built[preset] = (config, causal_lm, kerashub_gemma4_twin(causal_lm))
    return built


def _batch(length=40, seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(3, 1024, size=(2, length)).astype("int32")
    token_ids[:, 0] = 2
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 30:] = 0
    return token_ids, padding_mask


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_and_loss_equal_keras_hubs_gemma4_causal_lm(models, preset):
    from keras_tune import losses

    config, causal_lm, twin = models[preset]
    token_ids, padding_mask = _batch()
    ours = jitted_logits(causal_lm, {"token_ids": token_ids, "padding_mask": padding_mask})
    theirs = kerashub_gemma4_logits(twin, token_ids, padding_mask)
    real = padding_mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=2e-4, rtol=1e-4)
    assert np.abs(theirs).max() > 1.0  # logits of a size where the soft cap (30) matters little but exists

    # The sparse loss head (soft cap once, at the loss positions) gives keras-hub's cross-entropy.
    targets = np.concatenate([token_ids[:, 1:], np.zeros((2, 1), "int32")], axis=1)
    weights = real.astype("float32")
    weights[:, -1] = 0
    weights[:, :8] = 0  # a prompt
    shifted = theirs - theirs.max(-1, keepdims=True)
    nll = np.log(np.exp(shifted).sum(-1)) - np.take_along_axis(shifted, targets[..., None], -1)[..., 0]
    expected = (nll * weights).sum() / weights.sum()
    trainer = losses.SparseLossModel(causal_lm, chunk_tokens=16)
    order = np.argsort(-(weights > 0).astype("int32"), axis=1, kind="stable").astype("int32")
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask, "loss_positions": order[:, :32], "targets": targets}
    output = jitted_logits(trainer, inputs)
    got = (output[..., 0] * weights).sum() / weights.sum()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def _dense_expert_tensors(fn, experts, tokens, width):
    """Shapes of the intermediates `fn`'s jaxpr makes that hold every expert for every token (`[experts, tokens, width]`)."""
    jaxpr = jax.make_jaxpr(fn)()
    found = []

    def walk(jaxpr):
        for equation in jaxpr.eqns:
            for variable in equation.outvars:
                shape = tuple(getattr(variable.aval, "shape", ()))
                if experts in shape and tokens in shape and width in shape:
                    found.append(shape)
            for sub in jax.extend.core.jaxprs_in_params(equation.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


def test_the_experts_compute_only_what_the_router_picked(models):
    """keras-hub's bank makes `[experts, tokens, intermediate]` tensors; the sparse one none, and the same output."""
    _, causal_lm, twin = models["gemma4_moe_tiny"]
    block, theirs = causal_lm.backbone.transformer_layers[0], twin.backbone.transformer_layers[0]
    experts, inner, tokens = block.num_experts, block.expert_intermediate_dim, 96
    x = np.random.default_rng(1).normal(size=(tokens, block.hidden_dim)).astype("float32")
    indices, weights, _ = block.moe_router(x)
    dense = theirs.moe_router(x)  # keras-hub: a [tokens, experts] dispatch matrix
    np.testing.assert_allclose(np.take_along_axis(np.asarray(dense), np.asarray(indices), -1), weights, rtol=1e-6)
    sparse_out = block.moe_expert_bank(x, indices, weights)
    dense_out = theirs.moe_expert_bank(x, dense)
    np.testing.assert_allclose(sparse_out, dense_out, atol=1e-5, rtol=1e-5)
    assert _dense_expert_tensors(lambda: theirs.moe_expert_bank(x, dense), experts, tokens, inner)
    assert not _dense_expert_tensors(lambda: block.moe_expert_bank(x, indices, weights), experts, tokens, inner)
    # Only the routed rows are multiplied: tokens x k rows, never experts x tokens.
    assert not _dense_expert_tensors(lambda: block.moe_expert_bank(x, indices, weights), experts, tokens,
                                     block.hidden_dim)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_packed_rows_documents_equal_their_logits_alone(models, preset):
    """Two documents in one row (segment ids 1 and 2) give each the logits it has alone, positions restarted."""
    _, causal_lm, _ = models[preset]
    rng = np.random.default_rng(3)
    first, second = rng.integers(4, 1024, size=21), rng.integers(4, 1024, size=27)
    first[0] = second[0] = 2  # each document opens with <bos>
    row = np.concatenate([first, second, np.zeros(8, np.int64)]).astype("int32")[None]
    segments = np.array([[1] * 21 + [2] * 27 + [0] * 8], "int32")
    packed = jitted_logits(causal_lm, {"token_ids": row, "padding_mask": segments})[0]
    for document, start in ((first, 0), (second, 21)):
        alone = jitted_logits(causal_lm, {"token_ids": document[None].astype("int32"),
                                          "padding_mask": np.ones((1, len(document)), "int32")})[0]
        # float32: the same numbers, summed in other orders by matmuls of other shapes
        np.testing.assert_allclose(packed[start:start + len(document)], alone, atol=1e-4, rtol=1e-4)


def _int8_rounded(path, value):
    """A weight as Keras' weight-only int8 stores it, back in float: per output channel, |w| max to 127.

    Reduced over what the layer contracts: a token embedding's row, a q/k/v
    kernel's hidden axis, the attention output's heads and head width, a 2-D
    kernel's inputs.
    """
    if path.endswith("embeddings"):
        axes = (1,)
    elif path.endswith("attention_output/kernel"):
        axes = (0, 1)
    elif value.ndim == 3:
        axes = (1,)
    else:
        axes = (0,)
    value = value.astype("float32")
    scale = np.float32(127.0) / (np.abs(value).max(axis=axes, keepdims=True) + np.float32(1e-7))  # Keras' float32 sums
    return (np.clip(np.round(value * scale), -127, 127) / scale).astype("float32")


def test_an_int8_base_computes_within_int8_rounding_where_keras_hubs_block_does_not():
    """keras-hub's FFW multiplies by `layer.kernel` directly: an int8 kernel without its scale.

    The reference is the float model with every quantized weight rounded as
    int8 stores it (the router stays float): what an int8 base should compute.
    """
    from keras_tune.models.quantize import quantize_base

    token_ids, padding_mask = _batch()
    x = {"token_ids": token_ids, "padding_mask": padding_mask}
    real = padding_mask.astype(bool)
    _, ours = gemma4_causal_lm("gemma4_tiny")
    theirs = kerashub_gemma4_twin(ours)
    quantize_base(theirs, "int8")  # the same layers as ours: which weights Keras stores int8
    int8_paths = {v.path for v in theirs.backbone.weights if np.asarray(v).dtype == np.int8}
    floats = {v.path: np.asarray(v) for v in ours.backbone.weights}
    quantized = [v for v in ours.backbone.weights if v.path in int8_paths]
    assert len(quantized) > 40
    for variable in quantized:
        variable.assign(_int8_rounded(variable.path, floats[variable.path]))
    reference = jitted_logits(ours, x)
    for variable in quantized:
        variable.assign(floats[variable.path])
    quantize_base(ours, "int8")
    assert ours.backbone.transformer_layers[0].ffw_linear.quantization_mode == "int8"
    np.testing.assert_allclose(jitted_logits(ours, x)[real], reference[real], atol=2e-4, rtol=1e-4)
    theirs_int8 = kerashub_gemma4_logits(theirs, token_ids, padding_mask)
    assert np.abs(theirs_int8[real] - reference[real]).max() > 1.0


def test_router_statistics_and_the_load_balancing_loss(models):
    """Each MoE block's expert shares sum to 1, its loss is Switch's E * sum(f * P), and the weighted loss trains."""
    import keras

    from keras_tune import losses
    from keras_tune.models.gemma4.moe import routing_statistics

    _, causal_lm, _ = models["gemma4_moe_tiny"]
    backbone = causal_lm.backbone
    token_ids, padding_mask = _batch()
    trainable = [v.value for v in backbone.trainable_variables]
    other = [v.value for v in backbone.non_trainable_variables]
    statistics, step = jax.jit(lambda t, o, x: (backbone.stateless_call(t, o, x)[0], backbone.router_statistics(),
                                                backbone.step_statistics())[1:])(
        trainable, other, {"token_ids": token_ids, "padding_mask": padding_mask})
    statistics, step = np.asarray(statistics), np.asarray(step)
    layers, experts = backbone.num_layers, backbone.num_experts
    assert statistics.shape == (layers, experts + 1)
    np.testing.assert_allclose(statistics[:, :-1].sum(-1), 1.0, rtol=1e-6)
    # By hand for one router: shares of the real tokens' top-2 and their mean probabilities.
    block = backbone.transformer_layers[0]
    mask = padding_mask.reshape(-1).astype(bool)
    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]], "float32")
    indices = np.array([[0, 1], [2, 0], [1, 2]], "int32")
    by_hand = np.asarray(routing_statistics(probabilities, indices, np.array([1, 1, 0]), 3))
    np.testing.assert_allclose(by_hand, [0.5, 0.25, 0.25, 3 * (0.5 * 0.3 + 0.25 * 0.2 + 0.25 * 0.5)], rtol=1e-6)
    assert mask.sum() < mask.size and block.num_experts == experts

    loads = statistics[:, :-1] * experts
    np.testing.assert_allclose(step, [loads.max(), loads.min(), statistics[:, -1].mean()], rtol=1e-6)
    # The training model reports them as metrics channels; a weighted loss joins the training loss.
    _, weighted = gemma4_causal_lm("gemma4_moe_tiny", overrides={"model.arch.router_aux_loss_weight": 0.5})
    trainer = losses.SparseLossModel(weighted)
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask, "loss_positions": np.tile(np.arange(40), (2, 1)),
              "targets": token_ids}
    trainable = [v.value for v in trainer.trainable_variables]
    other = [v.value for v in trainer.non_trainable_variables]
    output, _, added = jax.jit(lambda t, o, x: trainer.stateless_call(t, o, x, return_losses=True))(
        trainable, other, inputs)
    assert np.asarray(output).shape[-1] == 2 + 3
    assert len(added) == 1 and float(added[0]) > 0
    np.testing.assert_allclose(np.asarray(output)[0, 0, 4], float(added[0]) / 0.5, rtol=1e-6)
    assert [m.name for m in weighted.backbone.statistics_metrics(2)] == ["expert_load_max", "expert_load_min",
                                                                        "router_aux_loss"]
    assert isinstance(weighted.backbone.statistics_metrics(2)[0], keras.metrics.Metric)


def test_expert_lora_trains_merges_and_round_trips_through_an_adapter(tmp_path):
    from keras_tune.lora import apply_lora, load_adapter, merge_lora, save_adapter

    token_ids, padding_mask = _batch()
    x = {"token_ids": token_ids, "padding_mask": padding_mask}
    _, causal_lm = gemma4_causal_lm("gemma4_moe_tiny")
    adapted = apply_lora(causal_lm, 4, ("query", "moe_expert_bank"))
    assert "decoder_block_0/moe_expert_bank" in adapted
    bank = causal_lm.backbone.transformer_layers[0].moe_expert_bank
    assert not bank.gate_proj.trainable and len(bank.lora_variables) == 6
    rng = np.random.default_rng(5)
    for variable in causal_lm.backbone.trainable_weights:
        variable.assign(rng.normal(0.0, 0.05, size=variable.shape).astype("float32"))
    tuned = jitted_logits(causal_lm, x)
    path = tmp_path / "adapter.npz"
    metadata = save_adapter(causal_lm, path, preset="gemma4_moe_tiny")
    assert "decoder_block_0/moe_expert_bank/down_proj_lora_b" in metadata["variables"]
    _, fresh = gemma4_causal_lm("gemma4_moe_tiny")
    load_adapter(fresh, path, preset="gemma4_moe_tiny")
    np.testing.assert_allclose(jitted_logits(fresh, x), tuned, atol=1e-5)
    merge_lora(fresh)
    np.testing.assert_allclose(jitted_logits(fresh, x), tuned, atol=1e-5)


def test_gemma4_chat_turns_are_its_own_markers_as_single_pieces(models):
    from keras_tune import decoding
    from keras_tune.data import chat

    tokenizer = models["gemma4_tiny"][1].preprocessor.tokenizer
    turns = decoding.turn_format(tokenizer)
    assert turns is decoding.GEMMA4_TURNS
    for piece in ("<|turn>", "<turn|>"):
        assert tokenizer.id_to_token(tokenizer.token_to_id(piece)) == piece
    assert decoding.chat_prompt("Hi", tokenizer) == "<|turn>user\nHi<turn|>\n<|turn>model\n"
    assert decoding.stop_token_ids(tokenizer, chat=True) == (1, tokenizer.token_to_id("<turn|>"))
    segments, weights = chat.render([("system", "Be brief."), ("user", "Hi"), ("model", "Hello.")], turns)
    assert segments == ["<|turn>system\nBe brief.<turn|>\n", "<|turn>user\nHi<turn|>\n", "<|turn>model\n",
                        "Hello.<turn|>\n"]
    assert weights == [0.0, 0.0, 0.0, 1.0]
    # Gemma 1-3 tokenizers keep Gemma's turns (and their system text leads the user turn).
    from keras_tune.models.tiny import tiny_tokenizer

    assert decoding.turn_format(tiny_tokenizer("gemma3")) is decoding.GEMMA_TURNS


def test_generation_with_gemma4s_cache_equals_keras_hubs(models):
    _, causal_lm, twin = models["gemma4_moe_tiny"]
    causal_lm.compile(sampler="greedy")
    twin.compile(sampler="greedy")
    prompts = ["def fib(n):", "<|turn>user\nhello<turn|>\n<|turn>model\n"]
    assert causal_lm.generate(prompts, max_length=20) == twin.generate(prompts, max_length=20)

"""RecurrentGemma (Griffin): equal to the reference implementation, official checkpoints, cache, LoRA, layouts.

The reference is the `recurrentgemma` package (DeepMind's JAX implementation,
`pip install --no-deps recurrentgemma==1.0.1` next to flax; its metadata pins
numpy<2.4 and absl-py<2, which this environment's versions do not meet, though
its code runs on them). Tests that need it are skipped, saying so, where it is
not installed.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keras_tune import compat
from keras_tune import config as config_lib
from keras_tune.errors import UserError
from keras_tune.lora import apply_lora, trainable_report
from keras_tune.models.loader import abstract_model, build_model, load_causal_lm
from keras_tune.models.recurrent_gemma import RecurrentGemmaBackbone, RecurrentGemmaCausalLM
from keras_tune.models.recurrent_gemma.convert import backbone_params, load_params, write_checkpoint
from keras_tune.models.tiny import train_tiny_sentencepiece
from keras_tune.optim import build_optimizer

from helpers import assert_planned_specs, lora_model_under_plan

PARAMS_2B, PARAMS_9B = 2_682_862_080, 8_579_977_216
# Float32 rounding: the reference scans sequentially, ours in parallel (logits reach ~10).
TOLERANCE = 2e-5
LENGTH = 20


def _reference():
    return pytest.importorskip("recurrentgemma.jax", reason="the reference `recurrentgemma` package is not installed")


def _griffin(rg, backbone):
    """The reference model with the architecture of `backbone`."""
    kinds = {"recurrent": rg.TemporalBlockType.RECURRENT, "attention": rg.TemporalBlockType.ATTENTION}
    config = rg.GriffinConfig(
        vocab_size=backbone.vocabulary_size,
        width=backbone.hidden_dim,
        mlp_expanded_width=backbone.intermediate_dim,
        num_heads=backbone.num_heads,
        lru_width=backbone.lru_width,
        block_types=tuple(kinds[block.block_type] for block in backbone.transformer_layers),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=backbone.attention_window_size,
        logits_soft_cap=backbone.final_logit_soft_cap,
        scan_type=rg.ScanType.LINEAR_NATIVE,
    )
    return rg.Griffin(config, gradient_checkpointing=False)


def _randomize(backbone, seed=1):
    """Moves every weight off its initial value (norm scales and biases start at zero), so a misplaced one shows."""
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        variable.assign(np.asarray(variable.numpy()) + rng.normal(0, 0.05, variable.shape).astype("float32"))


def _logits_function(causal_lm):
    """`(token_ids, padding_mask) -> logits` of a causal LM, compiled (eager Keras is slow on 2 cores)."""
    trainable = [v.value for v in causal_lm.trainable_variables]
    non_trainable = [v.value for v in causal_lm.non_trainable_variables]
    inputs = lambda ids, mask: {"token_ids": ids, "padding_mask": mask}  # noqa: E731
    call = jax.jit(lambda ids, mask: causal_lm.stateless_call(trainable, non_trainable, inputs(ids, mask))[0])
    return lambda ids, mask: np.asarray(call(ids, mask))


def _tokens(vocabulary_size, batch=2, seed=0):
    return np.random.default_rng(seed).integers(3, vocabulary_size, (batch, LENGTH)).astype("int32")


@pytest.fixture(scope="module")
def pair():
    """(the reference's compiled `apply`, its parameter tree, our causal LM): the same random weights.

    5 blocks (recurrent, recurrent, attention, recurrent, recurrent), window 6.
    The tree is our weights written in the official format (`backbone_params`),
    so a mistake in that conversion shows up as different logits.
    """
    rg = _reference()
    compat.set_random_seed(0)  # keras.utils' tf.random.set_seed would drop the session tokenizer's TF resources
    backbone = RecurrentGemmaBackbone(
        vocabulary_size=128, num_layers=5, hidden_dim=64, intermediate_dim=96, num_heads=4, attention_window_size=6
    )
    _randomize(backbone)
    return jax.jit(_griffin(rg, backbone).apply), backbone_params(backbone), RecurrentGemmaCausalLM(backbone=backbone)


def _positions(segments):
    """The reference's `segment_pos`: restarts at 0 where the segment id changes."""
    positions = np.zeros_like(segments)
    for t in range(1, segments.shape[1]):
        positions[:, t] = np.where(segments[:, t] == segments[:, t - 1], positions[:, t - 1] + 1, 0)
    return positions


def test_full_sequence_logits_equal_the_reference(pair):
    apply, params, causal_lm = pair
    logits = _logits_function(causal_lm)
    tokens = _tokens(128)
    for segments in (
        np.ones((2, LENGTH), "int32"),
        # packed documents, and right padding (segment 0)
        np.array([[1] * 7 + [2] * 9 + [3] * 4, [1] * 12 + [2] * 5 + [0] * 3], "int32"),
    ):
        expected, _ = apply({"params": params}, jnp.asarray(tokens), jnp.asarray(_positions(segments)))
        ours = logits(tokens, segments)
        difference = float(np.abs(ours - np.asarray(expected)).max())
        print(f"full sequence: max |logit difference| {difference:.2e} (largest logit {np.abs(expected).max():.1f})")
        assert difference < TOLERANCE


def test_token_by_token_logits_equal_the_reference_sampling_mode(pair):
    apply, params, causal_lm = pair
    tokens = jnp.asarray(_tokens(128, seed=1))
    expected, cache = [], None
    for t in range(LENGTH):
        logits, cache = apply({"params": params}, tokens[:, t : t + 1], jnp.full((2, 1), t, jnp.int32), cache=cache)
        expected.append(np.asarray(logits[:, 0]))
    expected = np.stack(expected, axis=1)
    build = jax.jit(lambda ids, length: causal_lm.build_cache(ids, length)[1])
    step = jax.jit(lambda ids, cache, index: causal_lm.call_with_cache(ids, cache, index)[::2])
    # From an empty cache, and after a prompt run in one pass (shorter and longer than the window).
    for prompt in (0, 1, 5, 13):
        cache = build(tokens, prompt)
        ours = []
        for t in range(prompt, LENGTH):
            logits, cache = step(tokens[:, t : t + 1], cache, t)
            ours.append(np.asarray(logits[:, 0]))
        difference = float(np.abs(np.stack(ours, axis=1) - expected[:, prompt:]).max())
        print(f"token by token after a {prompt}-token prompt: max |logit difference| {difference:.2e}")
        assert difference < TOLERANCE


@pytest.mark.parametrize("name, params", [("recurrentgemma_2b", PARAMS_2B), ("recurrentgemma_9b_it", PARAMS_9B)])
def test_parameter_counts_equal_the_reference(name, params):
    config = config_lib.load_config(name)
    ours = sum(math.prod(v.shape) for v in abstract_model(config, lora=False).weights)
    assert ours == params
    rg = pytest.importorskip("recurrentgemma.jax", reason="the reference `recurrentgemma` package is not installed")
    preset = rg.Preset.RECURRENT_GEMMA_2B_V1 if "2b" in name else rg.Preset.RECURRENT_GEMMA_9B_V1
    griffin = rg.Griffin(rg.GriffinConfig.from_preset(preset), gradient_checkpointing=False)
    tokens = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: griffin.init(jax.random.PRNGKey(0), tokens, jnp.arange(4)[None]))
    assert sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes)) == ours


def _release_dir(root, params, variation="tiny", wrapped=False):
    """A directory laid out as the official Kaggle release: tokenizer.model and an Orbax checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(train_tiny_sentencepiece())
    write_checkpoint({"params": params} if wrapped else params, str(root / variation))
    return str(root)


def _flax_config(handle, **overrides):
    return config_lib.load_config(
        "recurrentgemma_tiny", overrides={"model.source": "flax", "model.handle": handle, "distribution.mesh": "1x8", **overrides}
    )


def test_official_checkpoint_written_by_the_reference_loads_with_its_logits(tmp_path):
    rg = _reference()
    source = load_causal_lm(config_lib.load_config("recurrentgemma_tiny", overrides={"train.seed": 3})).backbone
    _randomize(source, seed=3)
    griffin, params = _griffin(rg, source), backbone_params(source)
    tokens = _tokens(1024)
    positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (2, LENGTH))
    expected, _ = jax.jit(griffin.apply)({"params": params}, jnp.asarray(tokens), positions)
    causal_lm = build_model(_flax_config(_release_dir(tmp_path / "kaggle", params), **{"train.seed": 4})).causal_lm
    ours = _logits_function(causal_lm)(tokens, np.ones_like(tokens))
    assert float(np.abs(ours - np.asarray(expected)).max()) < TOLERANCE
    assert causal_lm.preprocessor.tokenizer.vocabulary_size() == 1024
    # The reference's own `save_parameters` nests the tree under "params": the same weights.
    _reference_utils = pytest.importorskip("recurrentgemma.jax.utils")
    _reference_utils.save_parameters(str(tmp_path / "nested"), params)
    from keras_tune.models.recurrent_gemma.convert import read_checkpoint

    load_params(causal_lm.backbone, read_checkpoint(str(tmp_path / "nested")))
    np.testing.assert_array_equal(_logits_function(causal_lm)(tokens, np.ones_like(tokens)), ours)


def test_official_format_round_trip_and_one_line_refusals(tmp_path):
    source = load_causal_lm(config_lib.load_config("recurrentgemma_tiny", overrides={"train.seed": 5}))
    handle = _release_dir(tmp_path / "release", backbone_params(source.backbone))
    loaded = build_model(_flax_config(handle)).causal_lm
    for ours, theirs in zip(source.backbone.weights, loaded.backbone.weights):
        assert ours.path == theirs.path
        np.testing.assert_array_equal(np.asarray(ours.numpy()), np.asarray(theirs.numpy()), err_msg=ours.path)
    with pytest.raises(UserError) as error:
        build_model(_flax_config(handle, **{"model.arch.num_layers": 4}))
    assert "decoder_block_3" in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "release" / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="no tokenizer.model found"):
        build_model(_flax_config(handle))
    with pytest.raises(UserError, match="expected family recurrentgemma"):
        config_lib.load_config("gemma_tiny", overrides={"model.source": "flax", "model.handle": handle})


@pytest.fixture(scope="module")
def tiny():
    return load_causal_lm(config_lib.load_config("recurrentgemma_tiny"))


def _cache_bytes(cache):
    return sum(int(np.prod(t.shape)) * t.dtype.itemsize for block in cache for t in block)


def test_generation_cache_stays_within_the_window_and_generates_what_full_passes_predict(tiny):
    window = tiny.backbone.attention_window_size  # 16
    cache_of = lambda ids: tiny.build_cache(ids, 1)[1]  # noqa: E731
    sizes = {
        length: _cache_bytes(jax.eval_shape(cache_of, jax.ShapeDtypeStruct((2, length), "int32")))
        for length in (8, 16, 64, 256, 4096)
    }
    assert sizes[8] < sizes[16] == sizes[64] == sizes[256] == sizes[4096]  # at most one window of keys and values
    length = 4 * window
    prompt = np.zeros((2, length), "int32")
    mask = np.zeros((2, length), bool)
    prompt[0, :3], prompt[1, :7] = [2, 40, 41], [2, 50, 51, 52, 53, 54, 55]
    mask[0, :3], mask[1, :7] = True, True
    tiny.compile(sampler="greedy")
    preprocessor, tiny.preprocessor = tiny.preprocessor, None  # token ids in, token ids out
    try:
        generated = tiny.generate({"token_ids": prompt, "padding_mask": mask}, stop_token_ids=None)["token_ids"]
        generated = np.asarray(generated)
    finally:
        tiny.preprocessor = preprocessor
    np.testing.assert_array_equal(generated[mask], prompt[mask])
    logits = _logits_function(tiny)(generated, np.ones_like(generated))
    for row, start in ((0, 3), (1, 7)):  # each generated token is the argmax of a full pass over what precedes it
        np.testing.assert_array_equal(generated[row, start:], logits[row, start - 1 : -1].argmax(-1))


def test_evaluate_texts_scores_through_stateless_call(tiny):
    from keras_tune.scoring import evaluate_texts

    text = "the model learns small words from a tiny corpus"
    result = evaluate_texts(tiny, [text], sequence_length=32)
    ids = np.asarray(tiny.preprocessor.tokenizer(text)).reshape(-1)
    assert result["windows"] == 1 and result["tokens"] == len(ids) < 31
    tokens = np.concatenate([[tiny.preprocessor.tokenizer.start_token_id], ids]).astype("int32")[None]
    logits = _logits_function(tiny)(tokens, np.ones_like(tokens))[0, :-1].astype("float64")
    shifted = logits - logits.max(-1, keepdims=True)
    nll = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(ids)), ids]
    assert result["nll"] == pytest.approx(nll.mean(), rel=1e-5)


def test_lora_adapts_the_named_projections_only():
    config = config_lib.load_config("recurrentgemma_tiny")
    causal_lm = load_causal_lm(config)
    adapted = apply_lora(causal_lm, 4, ("query", "value", "linear_x", "linear_y", "linear_out", "ffw_gating"))
    assert {path.split("/")[-1] for path in adapted} == {"query", "value", "linear_x", "linear_y", "linear_out", "ffw_gating"}
    paths = [v.path for v in causal_lm.backbone.trainable_weights]
    assert paths and all(p.endswith(("lora_kernel_a", "lora_kernel_b")) for p in paths)  # biases stay frozen
    assert trainable_report(causal_lm)["trainable"] == sum(math.prod(v.shape) for v in causal_lm.backbone.trainable_weights)
    with pytest.raises(UserError, match="--lora-targets: unknown"):
        config_lib.load_config("recurrentgemma_tiny", overrides={"lora.targets": ("rg_lru",)})


def test_weight_decay_skips_the_rg_lru_embeddings_biases_and_norm_scales():
    config = config_lib.load_config("recurrentgemma_tiny", overrides={"lora.rank": 0, "optimizer.learning_rate": 0.1})
    causal_lm = load_causal_lm(config)
    optimizer = build_optimizer(config.optimizer, total_steps=1)
    variables = causal_lm.backbone.trainable_weights
    before = {v.path: np.array(v.numpy()) for v in variables}
    optimizer.apply_gradients([(np.zeros(v.shape, "float32"), v) for v in variables])
    decayed = sorted({v.path.split("/")[-1] for v in variables if not np.array_equal(before[v.path], v.numpy())})
    kept = sorted({v.path.split("/")[-1] for v in variables if np.array_equal(before[v.path], v.numpy())})
    assert decayed == ["kernel"]  # every Dense kernel and the convolution's
    assert kept == sorted(
        ["a_gate_bias", "a_gate_kernel", "a_param", "bias", "embeddings", "input_gate_bias", "input_gate_kernel", "scale"]
    )


@pytest.mark.parametrize("layout", ["recurrentgemma_tp", "recurrentgemma_fsdp"])
def test_variables_carry_the_layout_partition_spec(layout):
    overrides = {"distribution.mesh": "2x4", "distribution.layout": layout}
    _, plan, causal_lm = lora_model_under_plan("recurrentgemma_tiny", overrides)
    sharded = sum(any(axes) and "lora_" not in path for path, axes in assert_planned_specs(causal_lm, plan))
    assert sharded == 1 + 2 * 6 + 4 + 3 * 3  # embedding; 6 per recurrent block, 4 per attention, 3 per MLP
    by_path = {p.path: p for p in plan.placements}
    assert by_path["decoder_block_0/recurrent/rg_lru/a_gate_kernel"].axes[0] == "model"  # 4 heads on 4


def test_dry_run_plans_the_9b_on_1x8(capsys):
    from keras_tune import fit

    assert fit.main(["--preset", "recurrentgemma_9b", "--mesh", "1x8", "--simulate-devices", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "preset recurrentgemma_9b: trainable" in out and "of 8,582,283,264 parameters" in out
    assert "layout recurrentgemma_tp" in out and "per device: base weights" in out

"""Model merging: each method against its formula in numpy, self-merges unchanged, adapters tuned on two tasks
merged between them, and the outputs read back by the tools users read them with (keras-hub, keras_tune's
GGUF loader and `evaluate`, Transformers and PEFT)."""

import json
import random
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from keras_tune import merging
from keras_tune.errors import UserError
from keras_tune.merge import main

from helpers import REPO, fixed_logits, lora_layers

METHODS_WITH_BASE = ("task_arithmetic", "ties", "dare", "dare_ties")


# --------------------------------------------------------------------------
# The formulas, written out in numpy (float64) as the papers and mergekit state them


def _ties_trim(delta, density):
    """mergekit's `magnitude`: keep the k = max(1, int(density * size)) largest |delta| (argsort order)."""
    if density >= 1:
        return delta
    keep = max(1, int(density * delta.size))
    mask = np.zeros(delta.size)
    mask[np.argsort(-np.abs(delta).ravel(), kind="stable")[:keep]] = 1
    return delta * mask.reshape(delta.shape)


def _reference(method, models, base, weights, densities, t=None, seed=0, key="tensor", scale=1.0):  # many: a formula's inputs
    models = [np.asarray(model, np.float64) for model in models]
    if method == "linear":
        return sum(w * x for w, x in zip(weights, models)) / sum(weights)
    if method == "slerp":
        v0, v1 = models
        norms = [np.linalg.norm(v) if np.linalg.norm(v) > 1e-8 else 1.0 for v in (v0, v1)]
        cosine = np.clip(np.sum(v0 / norms[0] * (v1 / norms[1])), -1, 1)
        if abs(cosine) > 0.9995:  # mergekit: (anti)parallel tensors interpolate linearly
            return (1 - t) * v0 + t * v1
        theta = np.arccos(cosine)
        return np.sin((1 - t) * theta) / np.sin(theta) * v0 + np.sin(t * theta) / np.sin(theta) * v1
    base = np.asarray(base, np.float64)
    deltas = [x - base for x in models]
    if method == "ties":
        deltas = [_ties_trim(delta, density) for delta, density in zip(deltas, densities)]
    if method in ("dare", "dare_ties"):
        for i, density in enumerate(densities):
            kept = np.random.default_rng([seed, zlib.crc32(key.encode()), i]).random(base.shape) < density
            deltas[i] = deltas[i] * kept / density
    weighted = [w * delta for w, delta in zip(weights, deltas)]
    if method in ("ties", "dare_ties"):
        elected = np.where(sum(weighted) >= 0, 1.0, -1.0)
        agrees = [np.sign(delta) == elected for delta in weighted]
        mixed = sum(delta * agree for delta, agree in zip(weighted, agrees))
        divisor = sum(w * agree for w, agree in zip(weights, agrees))
        mixed = mixed / np.where(divisor == 0, 1.0, divisor) if method == "ties" else mixed  # ties normalizes
    else:
        mixed = sum(weighted)
    return base + scale * mixed


def _settings(method, count, weights=None, densities=None, **options):
    weights = weights or [None] * count
    densities = densities or [None] * count
    models = [merging.MergeInput(f"m{i}", w, d) for i, (w, d) in enumerate(zip(weights, densities))]
    base = "base" if method in METHODS_WITH_BASE else None
    return merging.check_recipe(merging.MergeRecipe(method, models, base=base, **options))[0]


@pytest.mark.parametrize("method", ["linear", "slerp", *METHODS_WITH_BASE])
@pytest.mark.parametrize("block_elements", [merging.BLOCK_ELEMENTS, 7])
def test_each_method_equals_its_formula(method, block_elements):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 5, 4)).astype("float32")
    count = 2 if method == "slerp" else 3
    models = [(base + rng.normal(scale=0.3, size=base.shape)).astype("float32") for _ in range(count)]
    weights = None if method == "slerp" else [0.5, 0.3, 0.9]
    densities = [0.4, 0.7, 0.25] if method in ("ties", "dare", "dare_ties") else None
    options = {"t": 0.35} if method == "slerp" else {"seed": 11} if "dare" in method else {}
    if method == "task_arithmetic":
        options["scale"] = 0.8
    settings = _settings(method, count, weights, densities, **options)
    merged = merging.merge_arrays(settings, models, base if method in METHODS_WITH_BASE else None, key="layers/x/vars/0",
                                  block_elements=block_elements)
    expected = _reference(method, models, base, weights or [1, 1], densities or [1] * count, t=0.35, seed=11,
                          key="layers/x/vars/0", scale=options.get("scale", 1.0))
    assert merged.dtype == np.float32 and merged.shape == base.shape
    np.testing.assert_allclose(merged, expected, rtol=2e-5, atol=2e-6)
    if method != "linear":
        assert not np.allclose(merged, _reference("linear", models, base, [1] * count, None), atol=1e-3)


def test_ties_elects_the_sign_of_the_weighted_sum_and_averages_the_agreeing():
    base = np.zeros(5, np.float32)
    first = np.array([3.0, -1.0, 2.0, 0.0, 0.5], np.float32)
    second = np.array([-1.0, 2.0, -3.0, 0.0, -4.0], np.float32)
    merged = merging.merge_arrays(_settings("ties", 2), [first, second], base)
    # sums 2, 1, -1, 0, -3.5 elect + + - + -; only agreeing entries are averaged; all-zero stays zero
    np.testing.assert_array_equal(merged, [3.0, 2.0, -3.0, 0.0, -4.0])
    # the weighted sum elects: 4 x second outvotes first at 0; the mean divides by the agreeing weights
    weighted = merging.merge_arrays(_settings("ties", 2, [1.0, 4.0]), [first, second], base)
    np.testing.assert_allclose(weighted, [-1.0, 2.0, -3.0, 0.0, -4.0])
    # density 0.4 keeps each vector's two largest magnitudes: first [3, _, 2, _, _], second [_, _, -3, _, -4]
    trimmed = merging.merge_arrays(_settings("ties", 2, densities=[0.4, 0.4]), [first, second], base)
    np.testing.assert_array_equal(trimmed, [3.0, 0.0, -3.0, 0.0, -4.0])


def test_dare_keeps_a_seeded_fraction_and_rescales_it_by_the_density():
    base = np.zeros((40, 50), np.float32)
    model = np.ones_like(base)
    settings = _settings("dare", 1, densities=[0.25], seed=5)
    merged = merging.merge_arrays(settings, [model], base, key="k")
    kept = np.random.default_rng([5, zlib.crc32(b"k"), 0]).random(base.shape) < 0.25
    np.testing.assert_array_equal(merged, np.where(kept, 4.0, 0.0))
    assert abs(merged.mean() - 1.0) < 0.1  # the rescale keeps the task vector's expected value
    again = merging.merge_arrays(settings, [model], base, key="k", block_elements=64)
    np.testing.assert_array_equal(again, merged)  # the drop does not depend on how the tensor is read
    other_seed = merging.merge_arrays(_settings("dare", 1, densities=[0.25], seed=6), [model], base, key="k")
    assert not np.array_equal(other_seed, merged)
    unscaled = merging.merge_arrays(_settings("dare", 1, densities=[0.25], seed=5, rescale=False), [model], base, key="k")
    np.testing.assert_array_equal(unscaled, np.where(kept, 1.0, 0.0))


@pytest.mark.parametrize("method, options", [("linear", {"weights": [0.3, 0.7]}), ("slerp", {"t": 0.3})])
def test_merging_a_tensor_with_itself_returns_it_exactly(method, options):
    x = np.random.default_rng(0).normal(size=(9, 7)).astype("float32")
    settings = _settings(method, 2, options.get("weights"), t=options.get("t"))
    np.testing.assert_array_equal(merging.merge_arrays(settings, [x, x]), x)


@pytest.mark.parametrize(
    "recipe, fragment",
    [
        (dict(method="average", models=["a", "b"]), "merge method 'average'; expected one of linear, slerp"),
        (dict(method="slerp", models=["a", "b"], t=1.5), "slerp t 1.5; expected 0 <= t <= 1"),
        (dict(method="slerp", models=["a", "b"]), "slerp needs t, its interpolation factor; expected --t"),
        (dict(method="slerp", models=["a", "b"], t=0.5, weights=[1, 2]), "slerp takes t, not weights"),
        (dict(method="linear", models=["a", "b"], weights=[1, -1]), "sum to 0; linear divides by their sum"),
        (dict(method="linear", models=["a", "b"], densities=[0.5, 0.5]), "density is for ties, dare and dare_ties"),
        (dict(method="ties", models=["a", "b"], densities=[0, 0.5]), "density 0 for a; expected 0 < density <= 1"),
        (dict(method="linear", models=["a"], t=0.2), "t given for linear"),
        (dict(method="linear", models=["a"], scale=2.0), "lambda given for linear"),
    ],
)
def test_bad_recipes_are_refused_before_anything_is_read(recipe, fragment):
    count = len(recipe["models"])
    models = [merging.MergeInput(m, w, d) for m, w, d in
              zip(recipe["models"], recipe.get("weights", [None] * count), recipe.get("densities", [None] * count))]
    options = {key: recipe[key] for key in ("t", "scale") if key in recipe}
    with pytest.raises(UserError) as raised:
        merging.check_recipe(merging.MergeRecipe(recipe["method"], models, **options))
    assert fragment in str(raised.value)


def test_weights_not_summing_to_one_without_normalize_warn():
    models = [merging.MergeInput("a", 0.8), merging.MergeInput("b", 0.8)]
    _, warnings = merging.check_recipe(merging.MergeRecipe("linear", models, normalize=False))
    assert warnings == ["weights sum to 1.6, not 1, with normalize false: the merged weights are scaled by 1.6"]


# --------------------------------------------------------------------------
# Files: keras-hub presets, run directories, sharded and bfloat16 weights


def _save_preset(directory, preset="gemma3_tiny", seed=0, precision="float32", **save):
    import keras

    from keras_tune import config as config_lib
    from keras_tune.models.loader import load_causal_lm

    keras.config.set_dtype_policy(precision)
    config = config_lib.load_config(preset, overrides={"train.seed": seed, "train.precision": precision})
    causal_lm = load_causal_lm(config)
    causal_lm.save_to_preset(str(directory), **save)
    keras.config.set_dtype_policy("float32")
    return causal_lm


def _tensors(directory):
    """{key: array} of a merged preset's model.weights.h5 (bfloat16 read as float32)."""
    weights = merging.preset_weights(directory, str(directory))
    try:
        return {key: weights.read(key, 0, weights.shape(key)[0] if weights.shape(key) else 1).reshape(weights.shape(key))
                for key in weights.keys()}
    finally:
        weights.close()


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    models = {name: _save_preset(root / name, seed=seed) for name, seed in (("p0", 0), ("p1", 1))}
    _save_preset(root / "gemma", preset="gemma_tiny")
    return root, models


def test_a_model_merged_with_itself_is_unchanged_and_loads_in_keras_hub(presets, tmp_path):
    import keras_hub

    root, models = presets
    p0 = str(root / "p0")
    assert main([p0, p0, "--weight", "0.3", "0.7", "--out", str(tmp_path / "linear")]) == 0
    assert main(["--method", "slerp", "--t", "0.3", p0, p0, "--out", str(tmp_path / "slerp")]) == 0
    original = _tensors(p0)
    for name in ("linear", "slerp"):
        merged = _tensors(tmp_path / name)
        assert merged.keys() == original.keys()
        for key in original:
            np.testing.assert_array_equal(merged[key], original[key])
        loaded = keras_hub.models.CausalLM.from_preset(str(tmp_path / name))
        np.testing.assert_array_equal(fixed_logits(loaded), fixed_logits(models["p0"]))
    written = sorted(p.name for p in (tmp_path / "linear").iterdir())
    assert written == sorted([p.name for p in (root / "p0").iterdir()] + ["merge.json"])
    record = json.loads((tmp_path / "linear" / "merge.json").read_text())
    assert record["merge_method"] == "linear" and [m["weight"] for m in record["models"]] == [0.3, 0.7]


def test_two_presets_merge_by_the_formula_and_the_yaml_form_equals_the_flags(presets, tmp_path, capsys):
    root, _ = presets
    p0, p1 = str(root / "p0"), str(root / "p1")
    assert main(["--method", "slerp", "--t", "0.25", p0, p1, "--out", str(tmp_path / "flags")]) == 0
    assert "peak RSS: " in capsys.readouterr().out
    (tmp_path / "merge.yaml").write_text(
        f"merge_method: slerp\nbase_model: {p0}\nmodels:\n  - model: {p0}\n  - model: {p1}\n"
        "parameters:\n  t: 0.25\ndtype: float32\n"
    )
    assert main(["--yaml", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "yaml")]) == 0
    first, second = _tensors(p0), _tensors(p1)
    flags, from_yaml = _tensors(tmp_path / "flags"), _tensors(tmp_path / "yaml")
    for key in first:
        np.testing.assert_array_equal(flags[key], from_yaml[key])
        np.testing.assert_allclose(flags[key], _reference("slerp", [first[key], second[key]], None, None, None, t=0.25),
                                   rtol=1e-5, atol=1e-6)


def test_a_base_linear_does_not_use_is_a_warning_and_the_yaml_defaults_apply(presets, tmp_path, capsys):
    root, _ = presets
    p0, p1 = str(root / "p0"), str(root / "p1")
    (tmp_path / "merge.yaml").write_text(f"merge_method: linear\nbase_model: {p0}\nmodels: [{p0}, {p1}]\n"
                                         "parameters: {weight: 2}\n")
    assert main(["--yaml", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "out")]) == 0
    assert f"warning: base_model {p0} is not used: linear averages the models" in capsys.readouterr().err
    merged, first, second = _tensors(tmp_path / "out"), _tensors(p0), _tensors(p1)
    for key in merged:  # weight 2 for both, normalized: the plain mean
        np.testing.assert_allclose(merged[key], (first[key] + second[key]) / 2, rtol=1e-6, atol=1e-7)


def test_run_directories_sharded_and_bfloat16_presets_are_read(presets, tmp_path):
    from keras_tune import config as config_lib
    from keras_tune.rundir import write_text

    root, models = presets
    # Full-weight run directories: the preset `model/` beside the run's config, as training leaves it, and the
    # CausalLM's save_weights of earlier versions.
    run, legacy = tmp_path / "run", tmp_path / "legacy_run"
    for directory in (run, legacy):
        directory.mkdir()
        write_text(directory / "config.json",
                   config_lib.to_json(config_lib.load_config("gemma3_tiny", overrides={"train.seed": 1})))
    models["p1"].save_to_preset(str(run / "model"))
    models["p1"].save_weights(str(legacy / "model.weights.h5"))
    models["p0"].save_to_preset(str(tmp_path / "sharded"), max_shard_size=0.0003)
    assert (tmp_path / "sharded" / "model.weights.json").is_file()
    assert main([str(tmp_path / "sharded"), str(run), "--weight", "0.25", "0.75", "--out", str(tmp_path / "a")]) == 0
    assert main([str(root / "p0"), str(legacy), "--weight", "0.25", "0.75", "--out", str(tmp_path / "l")]) == 0
    assert main([str(root / "p0"), str(root / "p1"), "--weight", "0.25", "0.75", "--out", str(tmp_path / "b")]) == 0
    a, b, from_legacy = _tensors(tmp_path / "a"), _tensors(tmp_path / "b"), _tensors(tmp_path / "l")
    assert a.keys() == b.keys() == from_legacy.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(from_legacy[key], b[key])

    import keras_hub
    import ml_dtypes

    from_sharded = keras_hub.models.CausalLM.from_preset(str(tmp_path / "a"))  # the layout copied from shards loads
    np.testing.assert_array_equal(np.asarray(from_sharded.backbone.token_embedding.embeddings.value),
                                  a["layers/reversible_embedding/vars/0"])

    half = _save_preset(tmp_path / "bf16", precision="bfloat16")
    assert main([str(tmp_path / "bf16"), str(tmp_path / "bf16"), "--weight", "1", "3", "--out", str(tmp_path / "c")]) == 0
    with h5py.File(tmp_path / "c" / "model.weights.h5") as file:
        stored = file["layers/reversible_embedding/vars/0"]
        assert stored.attrs["dtype"] == "bfloat16"
        embedding = np.asarray(stored[()]).view(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(embedding, np.asarray(half.backbone.token_embedding.embeddings.value))
    loaded = keras_hub.models.CausalLM.from_preset(str(tmp_path / "c"))
    np.testing.assert_array_equal(np.asarray(loaded.backbone.token_embedding.embeddings.value, np.float32),
                                  embedding.astype(np.float32))


# --------------------------------------------------------------------------
# Adapters tuned on two tiny tasks


TASKS = {
    "colours": "red green blue yellow purple orange black white pink brown grey".split(),
    "numbers": "one two three four five six seven eight nine ten eleven".split(),
}


def _task_texts(task, count, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(TASKS[task]) for _ in range(rng.randint(20, 40))) + "." for _ in range(count)]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """Two LoRA runs of gemma3_tiny, one a task: the run directories."""
    import keras_tune

    root = tmp_path_factory.mktemp("tuned")
    runs = {}
    for task in TASKS:
        corpus = root / f"{task}.txt"
        corpus.write_text("\n\n".join(_task_texts(task, 200, seed=0)))
        config = keras_tune.load_config("gemma3_tiny", overrides={
            "data.name": "text", "data.path": str(corpus), "train.steps": 30, "optimizer.learning_rate": 1e-2,
            "train.output_dir": str(root / task), "train.sample_prompts": (), "train.eval_every": 30,
        })
        keras_tune.run(config)
        runs[task] = root / task
    return runs


def _nll(causal_lm, task):
    from keras_tune.scoring import evaluate_texts

    return evaluate_texts(causal_lm, _task_texts(task, 8, seed=1), sequence_length=64)["nll"]


def _with_adapter(path):
    from keras_tune import config as config_lib
    from keras_tune.lora import load_adapter
    from keras_tune.models.loader import load_causal_lm

    causal_lm = load_causal_lm(config_lib.load_config("gemma3_tiny"))
    load_adapter(causal_lm, str(path), preset="gemma3_tiny")
    return causal_lm


def test_two_adapters_merged_linearly_score_between_their_single_task_models(tuned, tmp_path, capsys):
    import keras_hub

    from keras_tune.evaluate import main as evaluate

    colours, numbers = (tuned[task] / "adapter.npz" for task in TASKS)
    out = tmp_path / "merged"
    assert main([str(colours), str(numbers), "--out", str(out), "--out", str(tmp_path / "merged.gguf"),
                 "--gguf-dtype", "f32"]) == 0
    assert main([str(tuned["colours"]), str(tuned["numbers"]), "--keep-lora", "--out", str(tmp_path / "m.npz")]) == 0
    merged = keras_hub.models.CausalLM.from_preset(str(out))
    singles = {task: _with_adapter(tuned[task] / "adapter.npz") for task in TASKS}
    for task, other in (("colours", "numbers"), ("numbers", "colours")):
        own, merged_nll, foreign = _nll(singles[task], task), _nll(merged, task), _nll(singles[other], task)
        assert own < merged_nll < foreign, (task, own, merged_nll, foreign)

    # The concatenated adapter (rank 4 + 4) is the same model.
    concatenated = _with_adapter(tmp_path / "m.npz")
    assert {layer.lora_rank for layer in lora_layers(concatenated)} == {8}
    np.testing.assert_allclose(fixed_logits(concatenated), fixed_logits(merged), rtol=1e-4, atol=1e-5)

    # The GGUF scores through evaluate as the preset does.
    text = tmp_path / "colours.txt"
    text.write_text(" ".join(_task_texts("colours", 4, seed=2)))
    capsys.readouterr()
    assert evaluate(["--weights", str(tmp_path / "merged.gguf"), "--seq-len", "64", str(text)]) == 0
    from_gguf = float(capsys.readouterr().out.strip().splitlines()[-1].split()[2])
    from keras_tune.scoring import evaluate_texts

    expected = evaluate_texts(merged, [text.read_text()], sequence_length=64)["nll"]
    assert from_gguf == pytest.approx(expected, abs=2e-4)


def test_ties_and_dare_over_adapters_use_their_updates_as_task_vectors(tuned, tmp_path):
    from keras_tune.lora import read_adapter

    recipe = {"merge_method": "dare_ties", "base_model": "gemma3_tiny", "seed": 3, "models": [
        {"model": str(tuned[task] / "adapter.npz"), "parameters": {"weight": w, "density": 0.5}}
        for task, w in zip(TASKS, (0.7, 0.3))]}
    result = merging.merge_models(recipe, out=str(tmp_path / "dt"), log=lambda line: None)
    assert result["method"] == "dare_ties" and result["peak_rss_bytes"] > 0
    base = tmp_path / "base"
    _save_preset(base)
    merged, base_tensors = _tensors(tmp_path / "dt"), _tensors(base)
    structure = merging.preset_weights(base, "base")
    for layer in ("decoder_block_1/attention/query", "decoder_block_0/attention/value"):
        key = structure.kernel_key(layer)
        updates = []
        for task in TASKS:
            record, arrays = read_adapter(str(tuned[task] / "adapter.npz"))
            a, b = arrays[f"{layer}/lora_kernel_a"], arrays[f"{layer}/lora_kernel_b"]
            updates.append(base_tensors[key] + record["alpha"] / record["rank"] * np.matmul(a, b))
        expected = _reference("dare_ties", updates, base_tensors[key], [0.7, 0.3], [0.5, 0.5], seed=3, key=key)
        np.testing.assert_allclose(merged[key], expected, rtol=1e-4, atol=1e-6)
    untouched = structure.kernel_key("decoder_block_0/ffw_linear")
    np.testing.assert_array_equal(merged[untouched], base_tensors[untouched])  # no adapter there: the base
    structure.close()


def test_a_peft_adapter_merges_as_peft_merges_it(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from keras_tune.models.exports.transformers import export_transformers

    base_lm = _save_preset(tmp_path / "base")
    export_transformers(base_lm, str(tmp_path / "hf_base"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_base"), dtype=torch.float32)
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so q/k updates are full rank-r, not Keras' per-head form.
    tuned = get_peft_model(hf, LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                                          init_lora_weights=False))
    tuned.save_pretrained(str(tmp_path / "peft"))
    expected = {k: v.detach().numpy() for k, v in tuned.merge_and_unload().state_dict().items()}
    merging.merge_models({"merge_method": "linear", "base_model": str(tmp_path / "base"),
                          "models": [{"model": str(tmp_path / "peft")}]},
                         out=str(tmp_path / "merged"), transformers=str(tmp_path / "hf"), log=lambda line: None)
    merged = load_file(str(tmp_path / "hf" / "model.safetensors"))
    base = load_file(str(tmp_path / "hf_base" / "model.safetensors"))
    changed = [key for key in merged if not np.array_equal(merged[key], base[key])]
    assert sorted({key.split(".")[-2] for key in changed}) == ["down_proj", "k_proj", "o_proj", "q_proj"]
    for key, value in merged.items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


# --------------------------------------------------------------------------
# Refusals: one line, exit 2, before any model is built; nothing already written is lost


@pytest.fixture
def refusal_inputs(presets, tmp_path):
    from keras_tune.lora import ADAPTER_FORMAT, write_adapter_file

    root, _ = presets
    vocabulary = tmp_path / "vocab_copy"
    shutil.copytree(root / "p0", vocabulary)
    spm = vocabulary / "assets" / "tokenizer" / "vocabulary.spm"
    spm.write_bytes(spm.read_bytes() + b"\0")
    record = {"format": ADAPTER_FORMAT, "rank": 1, "alpha": 1.0, "targets": ["query"], "variables": {}}
    for name, preset in (("a", "gemma3_tiny"), ("b", "gemma_tiny")):
        write_adapter_file(str(tmp_path / f"{name}.npz"), {**record, "preset": preset}, {})
    (tmp_path / "bad.yaml").write_text("merge_method: linear\nslices: []\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    return {"P0": str(root / "p0"), "P1": str(root / "p1"), "GEMMA": str(root / "gemma"), "VOCAB": str(vocabulary),
            "TMP": str(tmp_path)}


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--method", "ties", "P0", "P1", "--out", "TMP/o"], "ties merges differences from a base model, and P0 is a whole"),
        (["P0", "GEMMA", "--out", "TMP/o"], "different architectures: P0 is a Gemma3Backbone, GEMMA a GemmaBackbone"),
        (["P0", "VOCAB", "--out", "TMP/o"], "different vocabularies: P0 and VOCAB differ in assets/tokenizer/vocabulary.spm"),
        (["P0", "P1", "--out", "TMP/full"], "--out TMP/full: the directory exists and is not empty"),
        (["TMP/a.npz", "TMP/b.npz", "--out", "TMP/o"], "adapters of different base presets: TMP/a.npz (gemma3_tiny), TMP/b.npz"),
        (["P0", "P1", "--out", "TMP/o.npz"], "an adapter output needs --keep-lora"),
        (["P0", "P1", "--keep-lora", "--out", "TMP/o.npz"], "--keep-lora concatenates keras_tune adapters; P0 is a preset"),
        (["P0", "TMP/nothing", "--out", "TMP/o"], "merge input TMP/nothing: no such file or directory, and not a preset"),
        (["--method", "slerp", "--t", "0.5", "P0", "P1", "P0", "--out", "TMP/o"], "slerp merges two models; got 3"),
        (["P0", "P1", "--weight", "1", "2", "3", "--out", "TMP/o"], "--weight got 3 values for 2 models"),
        (["--yaml", "TMP/bad.yaml", "--out", "TMP/o"], "unknown key 'slices'"),
        (["--yaml", "TMP/bad.yaml", "P0", "--out", "TMP/o"], "describes the whole merge, but P0 was given too"),
        (["P0", "P1", "--out", "TMP/o.gguf", "--out", "TMP/o2.gguf"], "a second gguf output"),
        (["P0", "P1"], "nothing to write; expected --out"),
    ],
)
def test_refusals_are_one_line_before_any_model_is_built(argv, fragment, refusal_inputs, no_model, capsys):
    def fill(text):
        for name, value in refusal_inputs.items():
            text = text.replace(name, value)
        return text

    assert main([fill(arg) for arg in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert fill(fragment) in err[0]
    tmp = Path(refusal_inputs["TMP"])
    assert not [path.name for path in tmp.iterdir() if path.name.startswith("o")]  # nothing written
    assert [path.name for path in (tmp / "full").iterdir()] == ["keep.txt"] and (tmp / "full" / "keep.txt").read_text() == "mine"


def test_a_gguf_of_a_family_without_one_is_refused_before_merging(presets, tmp_path, capsys):
    root, _ = presets
    gemma = str(root / "gemma")
    assert main([gemma, gemma, "--out", str(tmp_path / "g.gguf")]) == 2
    assert "a GGUF is written for Gemma 3 or Gemma 4 models; these are Gemma" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_readme_merge_examples_run_as_written(tuned, tmp_path, monkeypatch):
    """README's `## Merging` commands, run from a directory holding runs/a and runs/b."""
    import re

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Merging", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in re.findall(r"^python -m keras_tune\.merge .*$", section, re.M)]
    yaml_text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert commands and "merge_method" in yaml_text
    (tmp_path / "runs").mkdir()
    for name, task in zip("ab", TASKS):
        shutil.copytree(tuned[task], tmp_path / "runs" / name)
    (tmp_path / "merge.yaml").write_text(yaml_text.replace("gemma3_270m_offline", "gemma3_tiny"))
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = command.split()[3:]
        assert main([arg.replace("gemma3_270m_offline", "gemma3_tiny") for arg in argv]) == 0, command
        out = Path(argv[argv.index("--out") + 1])
        if out.suffix == ".gguf":
            assert out.read_bytes()[:4] == b"GGUF"
        else:
            assert json.loads((out / "config.json").read_text())["class_name"] == "Gemma3Backbone"

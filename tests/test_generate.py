"""Adapters (round trip, refusal), merging and export, and the generate CLI, on the tiny Gemma."""

import io
import os

import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune import decoding, generate
from keras_tune.models.exports import keras_preset, transformers
from keras_tune.errors import UserError
from keras_tune.lora import apply_lora, load_adapter, save_adapter
from keras_tune.models.loader import load_causal_lm
from keras_tune.models.tiny import tiny_tokenizer

TOKENS = np.array([[2, 17, 300, 45, 999, 8, 61, 5], [2, 9, 9, 120, 4, 0, 0, 0]], dtype="int32")
INPUTS = {"token_ids": TOKENS, "padding_mask": TOKENS != 0}


def _logits(causal_lm):
    return np.asarray(causal_lm(INPUTS))


def _tuned(preset="gemma_tiny", rank=4, seed=1):
    """A tiny model with LoRA whose adapters are not zero (as after training)."""
    causal_lm = load_causal_lm(config_lib.load_config(preset))
    apply_lora(causal_lm, rank, ("query", "value"))
    rng = np.random.default_rng(seed)
    for variable in causal_lm.backbone.trainable_weights:
        variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    return causal_lm


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    causal_lm = _tuned()
    path = str(tmp_path_factory.mktemp("adapter") / "adapter.npz")
    save_adapter(causal_lm, path, preset="gemma_tiny")
    return path, _logits(causal_lm)


def test_adapter_round_trip_gives_identical_logits(adapter):
    path, expected = adapter
    fresh = load_causal_lm(config_lib.load_config("gemma_tiny"))
    assert not np.allclose(_logits(fresh), expected)  # the adapter matters
    metadata = load_adapter(fresh, path, preset="gemma_tiny")
    assert metadata["rank"] == 4 and metadata["targets"] == ["query", "value"]
    np.testing.assert_array_equal(_logits(fresh), expected)


def test_adapter_of_another_preset_or_rank_is_refused_whole(adapter):
    path, _ = adapter
    model = load_causal_lm(config_lib.load_config("gemma_tiny"))
    with pytest.raises(UserError, match="was trained on preset gemma_tiny but the model is gemma3_tiny"):
        load_adapter(model, path, preset="gemma3_tiny")
    apply_lora(model, 8, ("query", "value"))
    before = [np.array(v.numpy()) for v in model.backbone.trainable_weights]
    with pytest.raises(UserError, match=r"rank 4 does not match the model's 8"):
        load_adapter(model, path, preset="gemma_tiny")
    for variable, value in zip(model.backbone.trainable_weights, before):
        np.testing.assert_array_equal(variable.numpy(), value)  # nothing loaded half-way


def test_merged_model_gives_the_same_logits_and_reloads_from_its_preset(adapter, tmp_path):
    path, expected = adapter
    model = load_causal_lm(config_lib.load_config("gemma_tiny"))
    load_adapter(model, path, preset="gemma_tiny")
    out = str(tmp_path / "merged")
    lines = []
    result = keras_preset.merge_and_export(model, out, log=lines.append)
    np.testing.assert_allclose(_logits(model), expected, rtol=1e-5, atol=1e-5)
    assert os.path.isfile(os.path.join(out, "model.weights.h5")) and os.path.isfile(os.path.join(out, "config.json"))
    config = config_lib.load_config("gemma_tiny", overrides={"model.source": "local", "model.handle": out})
    reloaded = load_causal_lm(config)
    assert not any("lora" in v.path for v in reloaded.backbone.weights)
    np.testing.assert_allclose(_logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    # safetensors is a dependency, so the Transformers export must have been written.
    assert os.path.isfile(os.path.join(out, "transformers", "model.safetensors")), result["transformers"]
    assert os.path.isfile(os.path.join(out, "transformers", "config.json"))
    with pytest.raises(UserError, match="exists and is not empty"):
        keras_preset.merge_and_export(model, out, log=lines.append)


def test_cli_generates_for_each_prompt_and_seeded_sampling_repeats(adapter, capsys, monkeypatch):
    path, _ = adapter
    argv = ["--preset", "gemma_tiny", "--adapter", path, "--max-length", "12"]
    assert generate.main([*argv, "hello", "the model"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(">>> hello\n") and "\n>>> the model\n" in out
    sampled = [*argv, "--sampler", "top_p", "--top-p", "0.9", "--temperature", "1.5", "--seed", "3"]
    monkeypatch.setattr("sys.stdin", io.StringIO("first prompt\n\nsecond prompt\n"))
    assert generate.main(sampled) == 0
    first = capsys.readouterr().out
    assert ">>> first prompt\n" in first and ">>> second prompt\n" in first
    monkeypatch.setattr("sys.stdin", io.StringIO("first prompt\nsecond prompt\n"))
    assert generate.main(sampled) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--sampler", "beam", "x"], "argument --sampler: invalid choice: 'beam'"),
        (["--adapter", "/nonexistent/adapter.npz", "x"], "--adapter /nonexistent/adapter.npz: no such file"),
        (["--sampler", "top_p", "--top-p", "1.5", "x"], "--top-p 1.5: expected a probability"),
        (["--max-length", "1", "x"], "--max-length 1: expected at least 2"),
        ([], "no prompt given"),
    ],
)
def test_cli_bad_input_is_one_error_line(argv, fragment, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert generate.main(["--preset", "gemma_tiny", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


class _Recorder:
    """Stands in for a CausalLM: records what `generate` receives."""

    preprocessor = None

    def generate(self, inputs, max_length, stop_token_ids, strip_prompt):
        self.call = dict(inputs=inputs, max_length=max_length, stop_token_ids=stop_token_ids, strip_prompt=strip_prompt)
        return ["ok"] * len(inputs)


def test_instruct_prompts_use_the_gemma_chat_turn_format():
    tokenizer = tiny_tokenizer("gemma")

    class Preprocessor:
        pass

    preprocessor = Preprocessor()
    preprocessor.tokenizer = tokenizer
    recorder = _Recorder()
    assert decoding.generate_texts(recorder, preprocessor, ["Best comedy movies in the 90s"], 32, chat=True) == ["ok"]
    assert recorder.call["inputs"] == [
        "<start_of_turn>user\nBest comedy movies in the 90s<end_of_turn>\n<start_of_turn>model\n"
    ]
    end_of_turn = int(tokenizer.token_to_id("<end_of_turn>"))
    assert recorder.call["stop_token_ids"] == (int(tokenizer.end_token_id), end_of_turn)
    assert recorder.preprocessor is None  # put back as it was
    decoding.generate_texts(recorder, preprocessor, ["plain"], 32, chat=False)
    assert recorder.call["inputs"] == ["plain"] and recorder.call["stop_token_ids"] == (int(tokenizer.end_token_id),)


def test_gemma2_is_not_exported_to_transformers_as_gemma1():
    from keras_tune.models.loader import abstract_model

    gemma2 = abstract_model(config_lib.load_config("gemma2_tiny"), lora=False)
    problem = transformers.transformers_export_problem(gemma2)
    assert "model_type 'gemma' (Gemma 1)" in problem and "use_post_ffw_norm" in problem
    for preset in ("gemma_tiny", "gemma3_tiny"):
        assert transformers.transformers_export_problem(abstract_model(config_lib.load_config(preset), lora=False)) is None

"""Gemma 4 as a llama.cpp `gemma4` GGUF: a LoRA-tuned model's export, run by llama.cpp (llama-cpp-python)."""

import numpy as np
import pytest

from helpers import gemma4_causal_lm, jitted_logits, random_lora

pytestmark = pytest.mark.usefixtures("no_network")

# ggml's CPU GELU reads a float16 table, so llama.cpp's logits (about 1 in size
# here) differ from float32 Keras by a few 1e-3; a dropped LoRA update moves them by over 0.1.
LLAMA_CPP_ATOL = 1e-2
GGML_TYPE_F32 = 0  # llama.cpp's key/value cache is float16 unless asked otherwise

# llama.cpp's gemma4 takes shared keys and values from the last two layers that own
# them (sliding, then global); gemma4_tiny's own layers end with a sliding one, so the
# dense case shares from layer 3 on (layers s s g | s s g), which E2B's layout has.
DENSE_LLAMA_CPP_LAYOUT = {"model.arch.num_kv_shared_layers": 3}
CHAT_TEXT = "<|turn>user\ndef f(x):<turn|>\n  Hello, the quick brown fox."


def _tokens(length=40, seed=3):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 1024, size=(1, length)).astype("int32")
    tokens[:, 0] = 2
    return tokens


def _llama_cpp(path, tokens, text):
    """llama.cpp on the GGUF: every position's logits of `tokens` (ids fed directly), and its ids for `text`."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, verbose=False,
                          type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    try:
        llm.eval([int(i) for i in tokens])
        return np.array(llm.scores[: len(tokens)]), llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()


@pytest.mark.parametrize("preset, overrides, targets, dtype, atol", [
    ("gemma4_tiny", DENSE_LLAMA_CPP_LAYOUT,
     ("query", "value", "ffw_gating", "per_layer_input_gate", "per_layer_model_projection"), "f32", LLAMA_CPP_ATOL),
    ("gemma4_moe_tiny", None, ("query", "attention_output", "ffw_linear", "moe_expert_bank"), "f32", LLAMA_CPP_ATOL),
    # Rounding every matrix to float16 adds its own error on top of GELU's.
    ("gemma4_tiny", DENSE_LLAMA_CPP_LAYOUT, ("key", "ffw_linear", "per_layer_up_proj"), "f16", 5e-2),
])
def test_the_gguf_of_a_lora_tuned_model_gives_keras_logits_in_llama_cpp(tmp_path, preset, overrides, targets,
                                                                        dtype, atol):
    import gguf

    from keras_tune.lora import merge_lora
    from keras_tune.models.exports.gguf import export_gguf

    _, causal_lm = gemma4_causal_lm(preset, overrides=overrides)
    tokens = _tokens()
    inputs = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    base = np.asarray(jitted_logits(causal_lm, inputs))[0]
    random_lora(causal_lm, targets)
    tuned = np.asarray(jitted_logits(causal_lm, inputs))[0]
    merge_lora(causal_lm)
    path = export_gguf(causal_lm, tmp_path / "tuned.gguf", dtype=dtype)

    reader = gguf.GGUFReader(str(path))
    architecture = reader.get_field("general.architecture")
    assert architecture.contents() == "gemma4"
    matrix_types = {t.tensor_type for t in reader.tensors if len(t.shape) > 1}
    assert matrix_types == {gguf.GGMLQuantizationType.F32 if dtype == "f32" else gguf.GGMLQuantizationType.F16}
    assert np.abs(tuned - base).max() > 10 * atol  # an export without the LoRA update would fail below
    logits, text_ids = _llama_cpp(path, tokens[0], CHAT_TEXT)
    np.testing.assert_allclose(logits, tuned, atol=atol, rtol=0)
    assert text_ids == [int(i) for i in np.asarray(causal_lm.preprocessor.tokenizer(CHAT_TEXT))]


def test_kv_sharing_llama_cpp_would_read_from_other_layers_is_refused_in_one_line(tmp_path, capsys):
    from keras_tune.export import main

    # gemma4_tiny's layers are s s g s | s g: layer 5 (global) shares layer 2's keys and values.
    assert main(["--preset", "gemma4_tiny", "--gguf", str(tmp_path / "tiny.gguf")]) == 2
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "Traceback" not in stderr
    assert "reuse layer 2's keys and values, and llama.cpp's gemma4 would read layer 3's" in error
    assert not (tmp_path / "tiny.gguf").exists()


def test_kv_sharing_problem_accepts_the_e2b_layout():
    from keras_tune.models.gemma4.gguf import kv_sharing_problem

    e2b = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(35)]
    assert kv_sharing_problem(e2b, 20) is None
    assert kv_sharing_problem(e2b, 0) is None
    assert "reuse layer 9's" in kv_sharing_problem(e2b, 21)  # owning layers would end with two sliding ones

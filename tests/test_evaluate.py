"""evaluate_texts: windowing, agreement with a direct computation, and the CLI.

The real-model NLL checks live in test_gguf.py, next to the one loaded 270M model.
"""

import math

import numpy as np
import pytest

from keras_tune.errors import UserError

from helpers import TINY_ARCH

TEXTS = [
    "The river rises in the hills and flows east to the sea.",
    "",
    "def add(a, b):\n    return a + b\n\n" * 3,
    "x",
]


@pytest.fixture(scope="module")
def tiny_lm():
    import keras_hub

    from keras_tune.models.tiny import tiny_tokenizer

    # The GGUF tests' tiny Gemma 3, narrower.
    backbone = keras_hub.models.Gemma3Backbone(**dict(TINY_ARCH, hidden_dim=32, intermediate_dim=64, head_dim=8))
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        variable.assign(rng.normal(0, 0.2, size=variable.shape).astype("float32"))
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tiny_tokenizer("gemma3"), image_converter=None, sequence_length=16
    )
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)


def _reference_nll(causal_lm, text, sequence_length):
    """Direct computation: one forward pass per window, log-softmax in float64.

    Windows are right-padded to `sequence_length` (one compiled shape); causal
    attention keeps the padding from affecting the real positions.
    """
    tokenizer = causal_lm.preprocessor.tokenizer
    ids = np.asarray(tokenizer(text)).tolist()
    total, count = 0.0, 0
    for start in range(0, len(ids), sequence_length - 1):
        window = [tokenizer.start_token_id] + ids[start : start + sequence_length - 1]
        padding = sequence_length - len(window)
        inputs = {
            "token_ids": np.array([window + [0] * padding], "int32"),
            "padding_mask": np.array([[1] * len(window) + [0] * padding], "int32"),
        }
        logits = np.asarray(causal_lm(inputs), dtype=np.float64)[0]
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        for position in range(len(window) - 1):
            total -= log_probs[position, window[position + 1]]
            count += 1
    return total, count


def test_windows_start_with_bos_and_cover_every_token_once():
    from keras_tune.scoring import _windows

    token_lists = [np.array([], "int32"), np.arange(10, 13), np.arange(20, 27)]
    token_ids, mask, targets, weights, owners = _windows(token_lists, 4, bos_id=2, pad_id=0)
    assert owners.tolist() == [1, 2, 2, 2]
    assert (token_ids[:, 0] == 2).all()
    assert token_ids[1].tolist() == [2, 20, 21, 22]
    assert token_ids[3].tolist() == [2, 26, 0, 0]
    assert mask[3].tolist() == [1, 1, 0, 0]
    assert weights[3].tolist() == [1, 0, 0, 0]
    assert targets[1].tolist() == [20, 21, 22, 0]
    # every text token is a weighted target exactly once
    scored = targets[weights > 0].tolist()
    assert sorted(scored) == list(range(10, 13)) + list(range(20, 27))


@pytest.mark.parametrize("sequence_length", [6, 64])
def test_matches_direct_computation(tiny_lm, sequence_length):
    from keras_tune.scoring import evaluate_texts

    result = evaluate_texts(tiny_lm, TEXTS, sequence_length=sequence_length)
    totals = [_reference_nll(tiny_lm, text, sequence_length) for text in TEXTS]
    for row, (total, count) in zip(result["texts"], totals):
        assert row["tokens"] == count
        if count:
            assert row["nll"] == pytest.approx(total / count, abs=1e-4)
            assert row["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
        else:
            assert math.isnan(row["nll"]) and math.isnan(row["perplexity"])
    all_tokens = sum(count for _, count in totals)
    assert result["tokens"] == all_tokens
    assert result["nll"] == pytest.approx(sum(total for total, _ in totals) / all_tokens, abs=1e-4)
    expected_windows = sum(math.ceil(count / (sequence_length - 1)) for _, count in totals)
    assert result["windows"] == expected_windows


def test_batch_size_does_not_change_scores(tiny_lm):
    from keras_tune.scoring import evaluate_texts

    one = evaluate_texts(tiny_lm, TEXTS, sequence_length=8, batch_size=1)
    three = evaluate_texts(tiny_lm, TEXTS, sequence_length=8, batch_size=3)
    assert three["windows"] == one["windows"]
    assert three["nll"] == pytest.approx(one["nll"], abs=1e-5)
    for a, b in zip(one["texts"], three["texts"]):
        assert a["tokens"] == b["tokens"]
        if a["tokens"]:
            assert b["nll"] == pytest.approx(a["nll"], abs=1e-5)


def test_bad_arguments(tiny_lm):
    from keras_tune.scoring import evaluate_texts

    with pytest.raises(UserError, match="at least 2"):
        evaluate_texts(tiny_lm, ["text"], sequence_length=1)
    with pytest.raises(TypeError):
        evaluate_texts(tiny_lm, "a single string", sequence_length=8)
    empty = evaluate_texts(tiny_lm, [""], sequence_length=8)
    assert empty["tokens"] == 0 and math.isnan(empty["nll"])


def test_table_format():
    from keras_tune.evaluate import format_table

    result = {
        "tokens": 30,
        "nll": 2.0,
        "perplexity": math.exp(2.0),
        "texts": [{"tokens": 10, "nll": 1.0, "perplexity": math.e}, {"tokens": 20, "nll": 2.5, "perplexity": math.exp(2.5)}],
    }
    lines = format_table(["a.txt", "long/name.txt"], result).splitlines()
    assert lines[0].split() == ["text", "tokens", "nll", "perplexity"]
    assert lines[1].split() == ["a.txt", "10", "1.0000", "2.718"]
    assert lines[-1].split()[0] == "overall" and lines[-1].split()[1] == "30"


# --------------------------------------------------------------------------
# CLI, on the tiny random-init preset


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text("The river rises in the hills and flows east to the sea.\n" * 4, encoding="utf-8")
    return path


def test_cli_prints_a_table(text_file, capsys):
    from keras_tune.evaluate import main

    assert main(["--preset", "gemma3_tiny", "--seq-len", "16", str(text_file), str(text_file)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["text", "tokens", "nll", "perplexity"]
    assert len(lines) == 4 and lines[-1].startswith("overall")
    per_file, overall = lines[1].split(), lines[-1].split()
    assert int(overall[1].replace(",", "")) == 2 * int(per_file[1].replace(",", ""))
    assert float(overall[2]) == pytest.approx(float(per_file[2]), abs=1e-3)
    # random init over a 1024-piece vocabulary: close to uniform
    assert abs(float(overall[2]) - math.log(1024)) < 2.0


def test_cli_with_adapter(text_file, tmp_path, capsys):
    import keras

    from keras_tune.config import load_config
    from keras_tune.evaluate import main
    from keras_tune.lora import apply_lora, save_adapter
    from keras_tune.models.loader import load_causal_lm

    config = load_config("gemma3_tiny")
    causal_lm = load_causal_lm(config)
    apply_lora(causal_lm, config.lora.rank, config.lora.targets, config.lora.alpha)
    rng = np.random.default_rng(0)
    for variable in causal_lm.trainable_variables:
        if "lora_kernel_b" in variable.path:
            variable.assign(rng.normal(0, 0.5, size=variable.shape).astype("float32"))
    adapter = tmp_path / "adapter.npz"
    save_adapter(causal_lm, str(adapter), preset="gemma3_tiny")
    keras.distribution.set_distribution(None)

    assert main(["--preset", "gemma3_tiny", str(text_file)]) == 0
    base = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert main(["--preset", "gemma3_tiny", "--adapter", str(adapter), str(text_file)]) == 0
    tuned = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert tuned[1] == base[1]
    assert float(tuned[2]) != pytest.approx(float(base[2]), abs=1e-4)


def test_cli_errors_are_one_line(tmp_path, text_file, capsys):
    from keras_tune.evaluate import main

    assert main(["--preset", "gemma3_tiny", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.txt" in err and err.count("\n") == 1
    assert main(["--preset", "gemma3_tiny", "--adapter", str(tmp_path / "none.npz"), str(text_file)]) == 2
    assert "error: --adapter" in capsys.readouterr().err
    assert main(["--preset", "no_such_preset", str(text_file)]) == 2
    assert capsys.readouterr().err.startswith("error: ")

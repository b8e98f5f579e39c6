"""The code recipe trained from scratch, end to end: a tokenizer trained on the corpus, a Gemma 3 around it, a
full-weight run that every tool (and Transformers) loads; bad tokenizer inputs refused in one line."""

import random

import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune import evaluate, export, fit, generate, tokenizer
from keras_tune.rundir import read_rows

LIBRARIES = ("import pandas as pd", "import matplotlib.pyplot as plt", "from sklearn.linear_model import LinearRegression")


def write_python(folder, count=160, seed=0):
    """Small data-science scripts: the code recipe's kind of corpus."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        lines = [rng.choice(LIBRARIES), "import numpy as np", ""]
        for j in range(rng.randint(3, 9)):
            name = rng.choice(["df", "data", "frame", "table"])
            lines += [f"{name}_{j} = pd.DataFrame({{'x': np.arange({rng.randint(2, 50)}), 'y': np.arange({j})}})",
                      f"plt.scatter({name}_{j}.x, {name}_{j}.y)",
                      f"model = LinearRegression().fit({name}_{j}[['x']], {name}_{j}.y)"]
        (folder / f"script_{i}.py").write_text("\n".join(lines) + "\nplt.show()\n")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tokenizer trained on the corpus, then a model trained from scratch around it (full weights)."""
    root = tmp_path_factory.mktemp("scratch")
    code = write_python(root / "code")
    model_file = root / "code.model"
    assert tokenizer.main(["train", "--data", "code", "--data-path", str(code), "--vocab-size", "600",
                           "--output", str(model_file)]) == 0
    flags = ["--preset", "gemma3_tiny", "--set", f"model.tokenizer={model_file}", "--lora-rank", "0",
             "--data", "code", "--data-path", str(code), "--steps", "80", "--accumulation-steps", "2",
             "--learning-rate", "3e-3", "--seq-len", "64", "--batch-size", "8", "--eval-every", "40",
             "--mesh", "1x8", "--output-dir", str(root / "run")]
    assert fit.main(flags) == 0
    return root, code, model_file


@pytest.mark.slow
def test_a_tokenizer_trained_on_the_corpus_then_a_model_from_scratch_every_tool_loads(trained, capsys, tmp_path):
    root, code, model_file = trained
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    assert 300 < processor.get_piece_size() <= 600  # as many as the corpus has to learn, at most the size asked
    assert [processor.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    indented = "def f(df):\n    return df.x\n"
    assert processor.decode(processor.encode(indented)) == indented  # whitespace and newlines survive

    rows = [row for row in read_rows(str(root / "run" / "metrics.csv")) if row["val_loss"] is not None]
    before, after = rows[0]["val_perplexity"], rows[-1]["val_perplexity"]
    assert after < before / 5, (before, after)  # validation perplexity falls clearly
    model_dir = root / "run" / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.weights.h5").is_file()

    prompt = "import pandas as pd\n"
    assert generate.main(["--init-from", str(model_dir), "--max-length", "40", prompt]) == 0
    generated = capsys.readouterr().out
    assert generated.startswith(f">>> {prompt}") and len(generated) > len(prompt) + 10
    sample = code / "script_3.py"
    assert evaluate.main(["--init-from", str(model_dir), "--seq-len", "64", str(sample)]) == 0
    table = capsys.readouterr().out
    perplexity = float(table.strip().splitlines()[-1].split()[-1])
    assert perplexity < processor_size(model_file) / 5  # far better than a uniform guess over the vocabulary

    hf, gguf_file = tmp_path / "hf", tmp_path / "model.gguf"
    assert export.main(["--init-from", str(model_dir), "--transformers", str(hf), "--gguf", str(gguf_file),
                        "--gguf-dtype", "f32"]) == 0
    capsys.readouterr()
    _same_logits_in_transformers(model_dir, hf, sample.read_text()[:200])
    # The GGUF carries the trained tokenizer (llama.cpp's reader sees its pieces) and scores as the model does.
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == processor_size(model_file)
    assert evaluate.main(["--weights", str(gguf_file), "--seq-len", "64", str(sample)]) == 0
    from_gguf = float(capsys.readouterr().out.strip().splitlines()[-1].split()[-1])
    assert abs(from_gguf - perplexity) <= 1e-3 * perplexity, (from_gguf, perplexity)


def processor_size(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def _same_logits_in_transformers(model_dir, hf, text):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import keras_hub

    keras_lm = keras_hub.models.Gemma3CausalLM.from_preset(str(model_dir))
    hf_tokenizer = AutoTokenizer.from_pretrained(hf)
    ids = np.asarray(keras_lm.preprocessor.tokenizer(text)).tolist()[:48]
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"][:48] == ids
    ids = [int(keras_lm.preprocessor.tokenizer.start_token_id)] + ids
    ours = np.asarray(keras_lm({"token_ids": np.array([ids]), "padding_mask": np.ones((1, len(ids)), bool)}))
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-3)


def test_bad_tokenizer_inputs_are_one_line_exit_2_before_any_model(tmp_path, capsys, no_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.py").write_text("\n")
    code = write_python(tmp_path / "code", count=4)
    (tmp_path / "bad.parquet").write_text("not parquet")
    other = tmp_path / "other.model"
    other.write_bytes(b"\x00\x01 not a sentencepiece model")
    cases = [
        (tokenizer.main, ["train", "--data", "code", "--data-path", str(code), "--vocab-size", "100",
                          "--output", str(tmp_path / "t.model")], "--vocab-size 100: too small"),
        (tokenizer.main, ["train", "--data", "code", "--data-path", str(empty), "--output", str(tmp_path / "e.model")],
         "hold no text"),
        (fit.main, ["--preset", "gemma3_tiny", "--set", f"model.tokenizer={other}", "--output-dir",
                    str(tmp_path / "run")], "not a SentencePiece model"),
        (fit.main, ["--preset", "gemma3_tiny", "--set", f"model.tokenizer={tmp_path / 'missing.model'}"],
         "no such file"),
        (fit.main, ["--preset", "gemma3_tiny", "--data", "text", "--data-path", str(tmp_path / "bad.parquet"),
                    "--output-dir", str(tmp_path / "run")], "not a readable Parquet file"),
        (fit.main, ["--preset", "gemma3_tiny", "--data", "code", "--data-path", str(empty),
                    "--output-dir", str(tmp_path / "run")], "hold no text"),
    ]
    for main, argv, fragment in cases:
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "t.model").exists() and not (tmp_path / "run").exists()


def test_the_code_from_scratch_preset_carries_the_seed_s_numbers():
    config = config_lib.load_config("code_from_scratch")
    assert (config.data.batch_size, config.optimizer.accumulation_steps, config.data.seq_len) == (32, 8, 128)
    assert (config.optimizer.learning_rate, config.optimizer.weight_decay) == (5e-4, 0.1)
    assert (config.optimizer.warmup_steps, config.optimizer.schedule, config.train.eval_every) == (1000, "cosine", 5000)
    assert config.lora.rank == 0 and config.data.key_token_alpha == 1.0
    assert set(config.data.filter_keywords) == {"pandas", "sklearn", "matplotlib", "seaborn"}
    from keras_tune.lora import count_parameters
    from keras_tune.models.loader import abstract_model

    parameters = count_parameters(abstract_model(config, lora=False).weights)
    assert 100e6 < parameters < 140e6  # GPT-2 small's size
    assert np.isfinite(parameters)

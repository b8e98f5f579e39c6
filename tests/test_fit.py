"""The fit CLI: bad flags end in one `error:` line, and a default-style run leaves every artifact."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune import cli, fit, training
from keras_tune.rundir import read_rows

from helpers import REPO, unmatched_layout, write_corpus

# TensorFlow and XLA log a few lines to stderr when they load; they are not ours.
_LIBRARY_LOG = re.compile(r"^(WARNING: All log messages before absl|[IWE]\d{4} )")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--mesh", "3x3"], "--mesh 3x3 needs 9 devices but 8 were found"),
        (["--mesh", "0x8"], "--mesh 0x8: both axes must be at least 1"),
        (["--lora-rank", "-1"], "--lora-rank -1: expected 0"),
        (["--layout", "gemma_diagonal"], "unknown layout 'gemma_diagonal'"),
        (["--layout", "UNMATCHED"], "rule 'decoder_block.*mlp/kernel' matches no variable"),
        (["--lora-rank", "four"], "argument --lora-rank: invalid int value: 'four'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints 0: expected at least 1"),
        (["--resume", "--output-dir", "EMPTY"], "holds no checkpoint"),
        (["--set", "train.stepz=3"], "unknown config field 'train.stepz'"),
        (["--peak-tflops", "-1"], "--peak-tflops -1.0: expected >= 0"),
        (["--sample-max-length", "1"], "--sample-max-length 1: expected at least 2"),
        (["--keep-activations", "some"], "train.keep_activations 'some'; expected one of ('matmuls', 'all')"),
    ],
)
def test_bad_flags_print_one_error_line_and_build_nothing(argv, fragment, tmp_path, capsys, no_model):
    argv = [a.replace("UNMATCHED", unmatched_layout(tmp_path)).replace("EMPTY", str(tmp_path / "run")) for a in argv]
    code = fit.main(["--preset", "gemma_tiny", *argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert fragment in lines[0]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--data", "text"], "recipe 'text' needs --data-path: expected a directory, glob or file"),
        (["--data", "chat", "--data-path", "TMP/*.jsonl"], "--data-path glob 'TMP/*.jsonl' matched no files; recipe 'chat'"),
        (["--data", "code", "--data-path", "TMP/notes.txt"], "has suffix '.txt'; recipe 'code' expects .py, .jsonl, .json"),
        (["--data", "imdb", "--data-path", "TMP/notes.txt"], "with recipe 'imdb', which reads TFDS; expected --data-dir"),
        (["--data", "mtnt", "--set", "data.mtnt_pair=en-xx"], "data.mtnt_pair 'en-xx'; expected one of"),
    ],
)
def test_a_wrong_data_input_is_one_line_before_the_model_and_the_run_directory(argv, fragment, tmp_path, capsys,
                                                                              no_model):
    (tmp_path / "notes.txt").write_text("some notes\n")
    run_dir = tmp_path / "run"
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    code = fit.main(["--preset", "gemma_tiny", "--output-dir", str(run_dir), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment.replace("TMP", str(tmp_path)) in lines[0]
    assert not run_dir.exists()  # nothing written for a run that cannot start


def test_unknown_preset_is_one_line(capsys, no_model):
    assert fit.main(["--preset", "gemma_8b_en"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown preset 'gemma_8b_en'")


def test_a_bad_flag_in_a_real_process_exits_2_without_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "keras_tune.fit", "--preset", "gemma_tiny", "--mesh", "3x3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.strip() and not _LIBRARY_LOG.match(line)]
    assert ours == ["error: --mesh 3x3 needs 9 devices but 8 were found; use a mesh whose product is 8 "
                    "(e.g. 1x8), or --simulate-devices 9 on CPU"]


def test_every_flag_is_a_config_field():
    fields = config_lib.base_config()
    for flag, field, _, _ in cli.MODEL_FLAGS + fit.FIT_FLAGS:
        section, name = field.split(".")
        assert name in fields[section], flag
    parser = fit.build_parser()
    args = parser.parse_args(["--sample-prompt", "a", "--sample-prompt", "b c", "--resume", "--save-every", "5"])
    overrides = cli.overrides_from_args(args, fit.FIT_FLAGS)
    assert overrides == {"train.sample_prompts": ("a", "b c"), "train.resume": True, "train.save_every": 5}


@pytest.mark.parametrize(
    "total, eval_every, save_every, initial, expected",
    [
        (10, 0, 0, 0, (10, 1, 0, [1])),
        (10, 4, 0, 0, (4, 3, 0, [1, 2, 3])),  # the last epoch is cut at step 10 and validated
        (24, 6, 4, 0, (2, 12, 0, [3, 6, 9, 12])),
        (24, 6, 4, 8, (2, 12, 4, [3, 6, 9, 12])),
        (12, 0, 5, 0, (5, 3, 0, [3])),
        (30, 0, 0, 20, (20, 2, 1, [2])),  # a finished run resumed with more --steps
    ],
)
def test_epoch_plan_puts_evaluations_and_checkpoints_on_epoch_ends(total, eval_every, save_every, initial, expected):
    assert training.epoch_plan(total, eval_every, save_every, initial) == expected


def test_default_style_run_leaves_every_artifact(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    config = config_lib.load_config(
        "gemma_tiny",
        overrides={
            "data.name": "text", "data.path": corpus, "train.steps": 8, "train.eval_every": 4,
            "train.save_every": 4, "train.output_dir": str(out), "train.sample_prompts": ("the model",),
            "train.peak_tflops": 1.0,
        },
    )
    result = training.run(config)
    printed = capsys.readouterr().out
    for name in ("config.json", "metrics.csv", "loss.png", "samples.txt", "adapter.npz"):
        assert (out / name).is_file(), name
    assert sorted(os.listdir(out / "checkpoints")) == ["4", "8"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    rows = read_rows(str(out / "metrics.csv"))
    assert [int(r["step"]) for r in rows] == list(range(9))
    evaluated = [int(r["step"]) for r in rows if r["val_loss"] is not None]
    assert evaluated == [0, 4, 8]
    for row in rows[1:]:
        assert math.isfinite(row["loss"]) and row["tokens_per_s"] > 0 and row["mfu"] > 0
        assert row["learning_rate"] == pytest.approx(1e-3)
    # The loss is a mean over target tokens, so exp(val_loss) is close to the exact perplexity.
    last = rows[-1]
    assert last["val_perplexity"] == pytest.approx(math.exp(last["val_loss"]), rel=0.02)
    assert result.validation["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    samples = (out / "samples.txt").read_text()
    assert "=== step 0 (before training) ===" in samples and "=== step 8 (after training) ===" in samples
    assert samples.count(">>> the model") == 2
    assert "validation before training" in printed and "MFU against 1 TFLOP/s" in printed
    with np.load(out / "adapter.npz") as adapter:
        assert any(key.endswith("lora_kernel_b") and np.abs(adapter[key]).max() > 0 for key in adapter.files)


def test_keep_activations_matmuls_trains_from_the_command_line(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    code = fit.main(["--preset", "gemma3_tiny", "--data", "text", "--data-path", corpus, "--steps", "3",
                         "--keep-activations", "matmuls", "--output-dir", str(out)])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["train"]["keep_activations"] == "matmuls"
    rows = read_rows(str(out / "metrics.csv"))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows[1:])
    assert (out / "adapter.npz").is_file()


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", paragraphs=120)
    out = tmp_path / "run"
    code = fit.main([
        "--preset", "gemma_tiny", "--data", "text", "--data-path", corpus, "--steps", "12", "--save-every", "1",
        "--learning-rate", "1e30", "--clipnorm", "0", "--output-dir", str(out),
    ])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3
    match = re.search(r"loss became (nan|inf) at step (\d+); stopped\. Last good checkpoint: .*checkpoints/(\d+)", error)
    assert match, error
    bad, kept = int(match.group(2)), int(match.group(3))
    assert kept == bad - 1
    assert max(int(step) for step in os.listdir(out / "checkpoints")) == kept
    assert not (out / "adapter.npz").exists()
    assert (out / "loss.png").exists()


@pytest.mark.parametrize("mesh, device_count", [("1x1", 1), ("2x4", 8)])
def test_the_train_step_compiles_once_across_epochs(mesh, device_count, tmp_path, caplog):
    """A second compile of the step (14 s on the real 270M) comes from arguments that change sharding between
    steps: Keras leaves a one-device model's arrays uncommitted and resets metrics to fresh arrays each epoch."""
    import logging

    import jax

    corpus = write_corpus(tmp_path / "corpus.txt")
    config = config_lib.load_config(
        "gemma_tiny",
        overrides={
            "data.name": "text", "data.path": corpus, "train.steps": 4, "train.eval_every": 2,
            "train.output_dir": str(tmp_path / "run"), "train.sample_prompts": (), "distribution.mesh": mesh,
        },
    )
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            training.run(config, devices=jax.devices()[:device_count])
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(train_step)")]
    assert len(compiles) == 1, "\n".join(line[:300] for line in compiles)
    assert read_rows(str(tmp_path / "run" / "metrics.csv"))[-1]["step"] == 4  # two epochs

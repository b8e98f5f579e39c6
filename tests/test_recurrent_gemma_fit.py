"""RecurrentGemma through the training path: the MTNT recipe end to end, any mesh, resume after kill -9."""

import os
import sys

import keras
import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune import training
from keras_tune.rundir import read_rows

from helpers import (adapter_arrays, assert_same_metrics, build_tfds_data_dir, kill_9_once_written, max_diff, one_step,
                     run_to_end)

STEPS, SAVE_EVERY, EVAL_EVERY = 8, 2, 4
PROMPT = "Translate this into French:\nhello\n"
# 20 batches of 2: the run stays inside its first epoch (resume across epochs is
# tested on Gemma in tests/test_data_resume.py).
PAIRS = {
    "train": [(f"the cat number {i} sleeps", f"le chat numero {i} dort") for i in range(40)],
    "valid": [("good morning", "bonjour"), ("thank you", "merci"), ("see you", "a bientot")],
    "test": [("yes", "oui")],
}


def _flags(data_dir, out):
    """The command line of `mtnt_run`, without its sample prompt (samples do not touch training)."""
    return [
        "--preset", "recurrentgemma_tiny", "--data", "mtnt", "--data-dir", data_dir, "--batch-size", "2",
        "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--eval-every", str(EVAL_EVERY), "--eval-steps", "1",
        "--output-dir", str(out),
    ]


@pytest.fixture(scope="module")
def mtnt_run(tmp_path_factory):
    """One uninterrupted MTNT run of the tiny RecurrentGemma, in this process, as `_flags` describes it (+ samples)."""
    root = tmp_path_factory.mktemp("recurrentgemma")
    data_dir = build_tfds_data_dir(root, pairs=PAIRS)
    out = root / "uninterrupted"
    overrides = {
        "data.name": "mtnt", "data.data_dir": data_dir, "data.batch_size": 2, "train.steps": STEPS,
        "train.save_every": SAVE_EVERY, "train.eval_every": EVAL_EVERY, "train.eval_steps": 1,
        "train.sample_prompts": (PROMPT,), "train.output_dir": str(out),
    }
    result = training.run(config_lib.load_config("recurrentgemma_tiny", overrides=overrides))
    return data_dir, str(out), result


def test_mtnt_recipe_runs_end_to_end(mtnt_run):
    _, out, result = mtnt_run
    for name in ("config.json", "metrics.csv", "loss.png", "samples.txt", "adapter.npz"):
        assert os.path.isfile(os.path.join(out, name)), name
    rows = read_rows(os.path.join(out, "metrics.csv"))
    assert [int(r["step"]) for r in rows] == list(range(STEPS + 1))
    assert [int(r["step"]) for r in rows if r["val_loss"] is not None] == [0, 4, 8]
    assert all(np.isfinite(r["loss"]) for r in rows[1:])
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # it learns
    assert result.final_step == STEPS and result.plan.layout.name == "recurrentgemma_tp"
    samples = open(os.path.join(out, "samples.txt")).read()
    assert "=== step 0 (before training) ===" in samples and f"=== step {STEPS} (after training) ===" in samples
    adapter = adapter_arrays(os.path.join(out, "adapter.npz"))
    assert {key.split("/")[-2] for key in adapter} == {"query", "value", "linear_x", "linear_y"}
    assert any(key.endswith("lora_kernel_b") and np.abs(value).max() > 0 for key, value in adapter.items())


def test_one_step_gives_the_same_loss_and_lora_update_on_every_mesh():
    devices = keras.distribution.list_devices()
    reference_loss, reference_lora, before, after = one_step("recurrentgemma_tiny", "1x1", devices[:1])
    for path in before:  # LoRA training leaves the base weights bit-identical
        np.testing.assert_array_equal(before[path], after[path], err_msg=path)
    for mesh in ("1x8",):
        loss, lora, _, _ = one_step("recurrentgemma_tiny", mesh, devices)
        print(f"{mesh}: loss {loss:.7f} (1x1: {reference_loss:.7f})")
        np.testing.assert_allclose(loss, reference_loss, rtol=1e-5, err_msg=mesh)
        for path, value in reference_lora.items():
            np.testing.assert_allclose(lora[path], value, rtol=1e-5, atol=1e-6, err_msg=f"{mesh} {path}")


@pytest.mark.slow
def test_kill_9_then_resume_matches_the_uninterrupted_run(mtnt_run, tmp_path):
    data_dir = mtnt_run[0]
    # The reference is a fresh process too, started the way the killed run is, so the
    # two differ only in the kill.
    reference = str(tmp_path / "uninterrupted")
    finished = run_to_end([sys.executable, "-m", "keras_tune.fit", *_flags(data_dir, reference)])
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "keras_tune.fit", *_flags(data_dir, out)]
    first = out / "checkpoints" / str(SAVE_EVERY)
    kill_9_once_written(command, first, tmp_path / "first.log")
    assert first.is_dir(), (tmp_path / "first.log").read_text()[-3000:]
    assert not (out / "adapter.npz").exists(), "the run finished before it was killed"
    saved = max(int(step) for step in os.listdir(out / "checkpoints") if step.isdigit())

    resumed = run_to_end(command)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resuming from {out}/checkpoints/{saved}: step {saved} of {STEPS}" in resumed.stdout
    assert max_diff(adapter_arrays(os.path.join(reference, "adapter.npz")), adapter_arrays(out / "adapter.npz")) <= 1e-6
    assert_same_metrics(reference, str(out), steps=None)

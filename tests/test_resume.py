"""Checkpoints and resume end to end: kill -9, corruption fallback, refusal of another model's checkpoint."""

import os
import shutil
import signal
import sys

import pytest

from keras_tune import config as config_lib
from keras_tune import training
from keras_tune.errors import UserError

from helpers import adapter_arrays, assert_same_metrics, kill_9_once_written, max_diff, run_to_end, write_corpus

STEPS, SAVE_EVERY, EVAL_EVERY = 40, 4, 8


def _flags(corpus, out):
    return [
        "--preset", "gemma_tiny", "--data", "text", "--data-path", corpus, "--steps", str(STEPS),
        "--save-every", str(SAVE_EVERY), "--eval-every", str(EVAL_EVERY), "--eval-steps", "2",
        "--sample-prompt", "the model", "--output-dir", str(out),
    ]


def _config(corpus, out, **extra):
    overrides = {
        "data.name": "text", "data.path": corpus, "train.steps": STEPS, "train.save_every": SAVE_EVERY,
        "train.eval_every": EVAL_EVERY, "train.eval_steps": 2, "train.sample_prompts": ("the model",),
        "train.output_dir": str(out),
    }
    overrides.update(extra)
    return config_lib.load_config(overrides.pop("preset", "gemma_tiny"), overrides=overrides)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One run that nobody interrupts (in this process), shared by the tests below."""
    root = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(root / "corpus.txt")
    out = root / "uninterrupted"
    result = training.run(_config(corpus, out))
    return corpus, str(out), result


def test_kill_9_between_checkpoints_then_resume_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    corpus, reference, _ = uninterrupted
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "keras_tune.fit", *_flags(corpus, out)]
    first = out / "checkpoints" / str(SAVE_EVERY)
    process = kill_9_once_written(command, first, tmp_path / "first.log")
    assert first.is_dir(), (tmp_path / "first.log").read_text()[-3000:]
    assert process.returncode == -signal.SIGKILL
    assert not (out / "adapter.npz").exists(), "the run finished before it was killed"
    saved = sorted(int(step) for step in os.listdir(out / "checkpoints") if step.isdigit())
    assert saved[-1] < STEPS

    resumed = run_to_end(command)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resuming from {out}/checkpoints/{saved[-1]}: step {saved[-1]} of {STEPS}" in resumed.stdout

    difference = max_diff(adapter_arrays(os.path.join(reference, "adapter.npz")), adapter_arrays(out / "adapter.npz"))
    print(f"resume vs uninterrupted: max abs difference of the LoRA weights {difference:.3g}")
    assert difference <= 1e-6
    assert_same_metrics(reference, str(out), steps=STEPS)
    with open(os.path.join(reference, "samples.txt")) as a, open(out / "samples.txt") as b:
        assert a.read() == b.read()


def _damage(step_dir):
    """Truncates every array-data file of a checkpoint (a disk that filled up, a copy cut short)."""
    damaged = 0
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) != "d":
            continue
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                data = file.read()
            with open(path, "wb") as file:
                file.write(data[: len(data) // 3])
            damaged += 1
    assert damaged


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path, capsys):
    corpus, reference, _ = uninterrupted
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    steps = sorted(int(s) for s in os.listdir(out / "checkpoints"))
    assert steps == [STEPS - 2 * SAVE_EVERY, STEPS - SAVE_EVERY, STEPS]  # --keep-checkpoints 3
    _damage(str(out / "checkpoints" / str(STEPS)))
    result = training.run(_config(corpus, out))
    captured = capsys.readouterr()
    assert f"checkpoints/{STEPS} is unusable" in captured.err
    assert result.initial_step == STEPS - SAVE_EVERY and result.final_step == STEPS
    assert os.listdir(out / "checkpoints-corrupt")
    # Nothing else lost: the steps after the fallback point are trained again, to the same weights.
    assert max_diff(adapter_arrays(os.path.join(reference, "adapter.npz")), adapter_arrays(out / "adapter.npz")) <= 1e-6
    assert_same_metrics(reference, str(out), steps=STEPS)


@pytest.mark.parametrize(
    "extra, mine, theirs",
    [
        ({"lora.rank": 8}, "lora.rank 4", "lora.rank 8"),
        ({"preset": "gemma3_tiny"}, "preset gemma_tiny", "preset gemma3_tiny"),
        ({"distribution.layout": "gemma_fsdp"}, "layout gemma_tp", "layout gemma_fsdp"),
    ],
)
def test_checkpoint_of_another_model_is_refused_before_building(uninterrupted, extra, mine, theirs, monkeypatch):
    corpus, reference, _ = uninterrupted
    from keras_tune.models import loader

    monkeypatch.setattr(loader, "load_causal_lm", lambda config: pytest.fail("a model was built"))
    with pytest.raises(UserError) as error:
        training.run(_config(corpus, reference, **extra))
    message = str(error.value)
    assert f"was written for {mine}" in message and f"this run has {theirs}" in message
    assert "\n" not in message

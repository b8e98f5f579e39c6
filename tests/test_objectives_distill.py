"""Distillation: the blockwise divergences equal the plain full-logits computation; a distilled student is closer to its teacher."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from keras_tune import config as config_lib
from keras_tune import fit, losses, training
from keras_tune.memory.plan import plan_memory
from keras_tune.models.loader import build_model
from keras_tune.objectives import distill, divergence
from keras_tune.objectives.teacher import build_teacher
from keras_tune.rundir import read_rows

from helpers import loss_batch, random_adapter, write_corpus

KINDS = ("forward_kl", "reverse_kl", "jsd")


def _small_blocks(monkeypatch):
    """Chunks of 16 tokens take the table 256 rows a block: the tiny vocabularies in several blocks."""
    monkeypatch.setattr(losses, "LOGITS_PER_BLOCK", 16 * 256)
    monkeypatch.setattr(losses, "MIN_BLOCK_ROWS", 32)
    monkeypatch.setattr(losses, "WHOLE_TABLE_LOGITS", 0)


def _reference(student_logits, teacher_logits, targets, weight, kind, temperature, beta, hard):  # many: the formula's terms
    """The loss written out on full `[rows, length, vocabulary]` float32 logits, with no keras_tune code."""
    log_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    p_s, p_t = jnp.exp(log_s), jnp.exp(log_t)
    if kind == "forward_kl":
        per_token = (p_t * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":
        per_token = (p_s * (log_s - log_t)).sum(-1)
    else:
        log_m = jnp.log(beta * p_t + (1 - beta) * p_s)
        per_token = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(student_logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return ((hard * nll + (1 - hard) * per_token) * weight).sum() / weight.sum()


def _variables(model):
    return [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]


@pytest.mark.parametrize("mesh", ["1x1", "1x8"])
@pytest.mark.parametrize("preset", ["gemma_tiny", "gemma2_tiny", "gemma3_tiny"])
def test_distillation_loss_and_gradients_equal_the_full_logits_reference(preset, mesh, tmp_path, monkeypatch):
    _small_blocks(monkeypatch)
    devices = jax.devices()[:1] if mesh == "1x1" else None
    teacher_adapter = random_adapter(preset, tmp_path / "teacher.npz", seed=5, rank=2, targets=("query", "ffw_linear"))
    config = config_lib.load_config(preset, overrides={
        "distribution.mesh": mesh, "lora.targets": "query,value,ffw_linear", "train.objective": "distill",
        "distill.teacher": preset, "distill.teacher_adapter": teacher_adapter})
    built = build_model(config, lora=True, devices=devices)
    student = built.causal_lm
    rng = np.random.default_rng(3)
    for variable in student.trainable_variables:  # LoRA B starts at 0: make every adapter matter
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    teacher, _ = build_teacher(config, devices=devices)
    import keras

    keras.distribution.set_distribution(built.plan.distribution())
    if preset == "gemma2_tiny":
        assert student.backbone.final_logit_soft_cap  # the soft-cap is on both heads' path
    x, y, weight = loss_batch(student.backbone.vocabulary_size, "targets")
    positions, _, _ = losses.add_loss_positions({k: tf.constant(v) for k, v in x.items()}, tf.constant(y),
                                                tf.constant(weight))
    inputs = {**{k: np.asarray(v) for k, v in positions.items()}, "loss_weights": weight}
    assert inputs["loss_positions"].shape[1] < 24  # the head runs at the loss positions only
    teacher_logits = np.asarray(teacher(x), np.float32)
    student_trainable, student_other = _variables(student)

    def reference_loss(values, kind):
        logits, _ = student.stateless_call(values, student_other, x)
        return _reference(logits.astype(jnp.float32), teacher_logits, y, weight, kind, 2.0, 0.3, 0.25)

    for kind in KINDS:
        settings = distill.Settings(divergence.Divergence(kind, temperature=2.0, beta=0.3), hard_label_weight=0.25,
                                    chunk_tokens=16)
        trainer = distill.DistillationModel(student, teacher, settings)
        assert len(trainer.trainable_variables) == len(student.trainable_variables)  # the teacher is frozen
        trainable, other = _variables(trainer)

        def loss_fn(values):
            rows, _ = trainer.stateless_call(values, other, inputs)
            return rows[:, distill.LOSS].mean()  # what `RowLoss` reduces to

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)
        want, want_grads = jax.jit(jax.value_and_grad(reference_loss), static_argnums=1)(student_trainable, kind)
        np.testing.assert_allclose(loss, want, rtol=1e-5, err_msg=kind)
        for variable, got, expected in zip(student.trainable_variables, grads, want_grads):
            scale = float(np.abs(expected).max())
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{kind} {variable.path}")


def test_a_teacher_with_another_vocabulary_is_one_line_and_exit_2_before_the_model(tmp_path, capsys, no_model):
    teacher = tmp_path / "wide_teacher.py"
    teacher.write_text(
        "from keras_tune.presets.gemma3_tiny import get_config as tiny\n\n\n"
        "def get_config():\n    config = tiny()\n    config.preset = 'wide_teacher'\n"
        "    config.model.arch['vocabulary_size'] = 2048\n    return config\n")
    code = fit.main(["--preset", "gemma3_tiny", "--objective", "distill", "--teacher", str(teacher),
                     "--data", "text", "--data-path", write_corpus(tmp_path / "c.txt"), "--output-dir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines == [f"error: --teacher {teacher} has a vocabulary of 2,048 entries but the student gemma3_tiny has "
                     "1,024; expected a teacher with the student's tokenizer"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--objective", "distill"], "--objective distill needs --teacher PRESET"),
        (["--objective", "distill", "--teacher", "gemma3_huge"], "--teacher 'gemma3_huge': unknown preset"),
        (["--teacher", "gemma3_tiny"], "--teacher gemma3_tiny: only --objective distill uses a teacher; got --objective sft"),
        (["--objective", "distill", "--teacher", "gemma3_tiny", "--divergence", "tvd"],
         "--divergence 'tvd'; expected one of forward_kl, reverse_kl, jsd"),
        (["--objective", "distill", "--teacher", "gemma3_tiny", "--temperature", "0"], "--temperature 0.0: expected a positive"),
        (["--objective", "distill", "--teacher", "gemma3_tiny", "--hard-label-weight", "2"], "expected a weight in [0, 1]"),
        (["--objective", "distill", "--teacher", "gemma3_tiny", "--on-policy-fraction", "0.5"],
         "expected --batching bucket or pad (one example a row), got auto"),
        (["--objective", "distill", "--teacher", "gemma3_tiny", "--teacher-adapter", "missing.npz"],
         "--teacher-adapter missing.npz: no such file; expected an adapter .npz"),
    ],
)
def test_bad_distillation_flags_are_one_line(argv, fragment, capsys, no_model):
    assert fit.main(["--preset", "gemma3_tiny", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_on_policy_sampling_keeps_each_prompt_and_writes_what_the_student_would():
    """At a temperature near 0 the sample is the greedy continuation of full forward passes; the response ends at <eos>."""
    from keras_tune.models import families
    from keras_tune.objectives.sampling import sample_responses

    config = config_lib.load_config("gemma3_tiny", overrides={"distribution.mesh": "1x1"})
    causal_lm = build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm
    length, prompt = 12, [2, 40, 41, 42, 43]
    ids = np.zeros((2, length + 1), np.int32)
    ids[0, :5], ids[1, :3] = prompt, prompt[:3]  # row 1 has a shorter prompt
    ids[:, 5:9] = [20, 21, 22, 1]
    weights = np.zeros((2, length), np.float32)
    weights[0, 4:8], weights[1, 2:8] = 1, 1  # the targets after each prompt
    x = {"token_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_weights": weights, "padding_mask": ids[:, :-1] > 0,
         "sample_seed": np.array([7, 7], np.int32)}
    x["padding_mask"][:, 0] = True

    trainable = [v.value for v in causal_lm.trainable_variables]
    other = [v.value for v in causal_lm.non_trainable_variables]
    # Causal: the logits at a position see only the tokens up to it, so one padded shape serves every length.
    forward = jax.jit(lambda row: causal_lm.stateless_call(
        trainable, other, {"token_ids": row, "padding_mask": jnp.ones_like(row, bool)})[0])

    def greedy(row, start):
        tokens = list(ids[row, :start])
        while len(tokens) < length + 1:
            padded = np.array([tokens + [0] * (length - len(tokens))], np.int32)
            tokens.append(int(np.asarray(forward(padded))[0, len(tokens) - 1].argmax()))
        return tokens

    expected = [greedy(0, 5), greedy(1, 3)]
    settings = distill.Settings(divergence.Divergence(), on_policy_temperature=1e-4, pad_id=0, end_id=expected[0][7])
    out = jax.jit(lambda x: sample_responses(causal_lm, families.of_model(causal_lm), x, settings))(x)
    full = np.concatenate([np.asarray(out["token_ids"]), np.asarray(out["targets"])[:, -1:]], axis=1)
    assert full[0, :8].tolist() == expected[0][:8]  # the prompt, then greedy tokens up to the chosen "<eos>"
    assert full[0, 8:].tolist() == [0] * (length - 7)  # after it: padding
    assert np.asarray(out["loss_weights"])[0].tolist() == [0.0] * 4 + [1.0] * 3 + [0.0] * (length - 7)
    assert np.asarray(out["padding_mask"])[0].tolist() == [True] * 8 + [False] * (length - 8)
    end_in_row_1 = [i for i in range(3, length + 1) if expected[1][i] == settings.end_id]
    stop = end_in_row_1[0] if end_in_row_1 else length
    assert full[1, :stop + 1].tolist() == expected[1][:stop + 1]
    assert np.asarray(out["loss_weights"])[1, 2:stop].min() == 1.0


def test_on_policy_draws_are_a_function_of_the_seed_and_the_step():
    dataset = tf.data.Dataset.from_tensors(({"token_ids": tf.zeros([2, 4], tf.int32)}, tf.ones([2]))).repeat(40)
    whole = [(int(x["on_policy"][0]), int(x["sample_seed"][0])) for x, _ in distill._with_draws(dataset, 0, 3, 0.5)]
    resumed = [(int(x["on_policy"][0]), int(x["sample_seed"][0])) for x, _ in distill._with_draws(dataset.skip(25), 25, 3, 0.5)]
    assert resumed == whole[25:]  # a run resumed at step 25 draws what the uninterrupted one does
    share = sum(flag for flag, _ in whole) / len(whole)
    assert 0.25 < share < 0.75 and len({seed for _, seed in whole}) == 40
    assert all(flag == 0 for flag, _ in
               ((int(x["on_policy"][0]), 0) for x, _ in distill._with_draws(dataset, 0, 3, 0.0)))


def test_the_planner_counts_the_teacher_its_forward_pass_and_its_logits():
    def plan(**overrides):
        config = config_lib.load_config("gemma3_tiny", overrides={"distribution.mesh": "1x1", **overrides})
        return plan_memory(config, devices=jax.devices()[:1])

    sft = plan()
    teacher = plan(**{"train.objective": "distill", "distill.teacher": "gemma3_tiny"})
    int8 = plan(**{"train.objective": "distill", "distill.teacher": "gemma3_tiny", "distill.teacher_quantize": "int8"})
    assert teacher.teacher_weights == sft.base_weights  # the same architecture, frozen, float32
    assert int8.teacher_weights < teacher.teacher_weights / 3
    assert teacher.second_forward > 0 and teacher.objective_buffers == teacher.logits
    assert teacher.total == sft.total + teacher.teacher_weights + teacher.second_forward + teacher.objective_buffers
    sampled = plan(**{"train.objective": "distill", "distill.teacher": "gemma3_tiny", "distill.on_policy_fraction": 0.5,
                      "data.batching": "bucket"})
    assert sampled.objective_buffers > teacher.objective_buffers  # the sampling's key/value cache


def test_distillation_trains_from_the_command_line_on_policy_and_keeps_the_teacher_out_of_checkpoints(tmp_path, capsys):
    from keras_tune.checkpoint import load_state_arrays

    records = tmp_path / "pairs.jsonl"
    records.write_text("".join('{"prompt": "Count to %d:", "response": "%s"}\n' % (i % 7, " ".join(map(str, range(i % 7 + 1))))
                               for i in range(48)))
    teacher = random_adapter("gemma3_tiny", tmp_path / "teacher.npz", seed=2)
    out = tmp_path / "run"
    code = fit.main(["--preset", "gemma3_tiny", "--objective", "distill", "--teacher", "gemma3_tiny", "--teacher-adapter",
                     teacher, "--divergence", "jsd", "--on-policy-fraction", "0.5", "--batching", "bucket",
                     "--data", "text", "--data-path", str(records), "--seq-len", "32", "--steps", "4",
                     "--eval-every", "2", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "teacher gemma3_tiny: 184,960 parameters, frozen, adapter" in printed and "jsd at temperature 1" in printed
    rows = read_rows(str(out / "metrics.csv"))
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3, 4]
    assert all(row["divergence"] is not None and math.isfinite(row["divergence"]) for row in rows[1:])
    assert [row["val_divergence"] is not None for row in rows] == [True, False, True, False, True]
    assert rows[0]["val_divergence"] > 0.0  # the teacher's adapter makes it differ from the student's base
    arrays = load_state_arrays(str(out))
    trained = [name for name in arrays if name.startswith("trainable/")]
    assert len(trained) == 8 and all("lora_kernel" in name for name in trained)  # the student's LoRA only
    assert (out / "adapter.npz").is_file() and (out / "loss.png").is_file()


@pytest.mark.slow
def test_a_distilled_student_ends_closer_to_its_teacher_than_sft_alone(tmp_path):
    """A teacher trained in full on another corpus; two students on the same corpus, one with SFT, one distilled.

    On held-out text of the students' corpus the distilled one's forward KL to the teacher is far lower.
    """
    from importlib import resources

    teacher_corpus = tmp_path / "teacher.txt"
    teacher_corpus.write_text(resources.files("keras_tune.assets").joinpath("tiny_corpus.txt").read_text())
    corpus, held_out = write_corpus(tmp_path / "corpus.txt"), write_corpus(tmp_path / "held.txt", paragraphs=30, seed=9)
    devices = jax.devices()[:1]
    common = {"data.name": "text", "data.seq_len": 32, "distribution.mesh": "1x1", "lora.rank": 0,
              "data.validation_fraction": 0.0, "train.steps": 100, "train.sample_prompts": ()}

    def run(name, **overrides):
        config = config_lib.load_config("gemma3_tiny", overrides={**common, "train.output_dir": str(tmp_path / name),
                                                                   **overrides})
        training.run(config, devices=devices)
        return tmp_path / name / "model"

    teacher = run("teacher", **{"data.path": str(teacher_corpus), "optimizer.learning_rate": 3e-3})
    students = {
        "sft": run("sft", **{"data.path": corpus, "optimizer.learning_rate": 1e-2}),
        "distilled": run("distilled", **{"data.path": corpus, "optimizer.learning_rate": 1e-2,
                                         "train.objective": "distill", "distill.teacher": str(teacher)}),
    }
    from keras_tune.data.files import paragraphs
    from keras_tune.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer("gemma3")
    rows = [[2] + [int(i) for i in np.asarray(tokenizer(text))] for text in paragraphs(open(held_out).read())]
    tokens = np.array([row[:33] for row in rows if len(row) >= 33], np.int32)
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((len(tokens), 32), bool)}

    def log_probs(directory):
        config = config_lib.load_config("gemma3_tiny", overrides={"model.handle": str(directory), "model.source": "local",
                                                                  "distribution.mesh": "1x1"})
        logits = np.asarray(build_model(config, devices=devices).causal_lm(x), np.float64)
        logits -= logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    reference = log_probs(teacher)
    kl = {name: float((np.exp(reference) * (reference - log_probs(path))).sum(-1).mean())
          for name, path in students.items()}
    assert len(tokens) >= 10 and kl["distilled"] < 0.5 * kl["sft"], kl

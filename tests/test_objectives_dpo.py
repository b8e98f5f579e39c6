"""Preference tuning: DPO's formula, its reference the LoRA-off network (the base once), pairs read and counted, accuracy learned."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune import fit, training
from keras_tune.data.preference import make_preference_datasets
from keras_tune.lora import count_parameters
from keras_tune.memory.plan import plan_memory
from keras_tune.models.loader import build_model
from keras_tune.objectives import preference
from keras_tune.rundir import read_rows

from helpers import assert_same_metrics, write_preferences

COLUMNS = ("chosen_logp", "rejected_logp", "reward_margin", "preference_accuracy")


def _sigmoid_loss(x):
    return math.log1p(math.exp(-x))


def test_dpo_and_orpo_losses_equal_their_formulas_on_hand_made_log_probabilities():
    policy_chosen = np.array([-10.0, -4.0, -7.5, -3.0], np.float32)
    policy_rejected = np.array([-12.0, -3.0, -7.5, -9.0], np.float32)
    reference_chosen = np.array([-11.0, -4.5, -7.0, -3.0], np.float32)
    reference_rejected = np.array([-11.0, -4.0, -7.0, -8.0], np.float32)
    loss, margin = preference.dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, 0.1)
    for i in range(4):  # Rafailov et al.: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
        logits = 0.1 * ((policy_chosen[i] - reference_chosen[i]) - (policy_rejected[i] - reference_rejected[i]))
        assert float(margin[i]) == pytest.approx(logits, abs=1e-6)
        assert float(loss[i]) == pytest.approx(_sigmoid_loss(logits), rel=1e-6)
    assert float(loss[2]) == pytest.approx(math.log(2.0))  # no preference yet: log 2
    assert np.asarray(preference.preference_accuracy(margin)).tolist() == [1.0, 0.0, 0.5, 1.0]  # a tie counts a half
    means = np.array([-0.5, -2.0, -1e-9], np.float32), np.array([-1.5, -1.0, -0.3], np.float32)
    loss, ratio = preference.orpo_loss(*means, 0.2)
    for i in range(3):  # Hong et al.: NLL(chosen) - lambda * log sigmoid(log odds(chosen) - log odds(rejected))
        odds = [min(float(m[i]), -1e-6) - math.log(1 - math.exp(min(float(m[i]), -1e-6))) for m in means]
        assert float(ratio[i]) == pytest.approx(odds[0] - odds[1], rel=1e-5)
        assert float(loss[i]) == pytest.approx(-float(means[0][i]) + 0.2 * _sigmoid_loss(odds[0] - odds[1]), rel=1e-5)


def _pair_batch(config, causal_lm):
    """The first training batch of `write_preferences` pairs as the DPO trainer reads it (numpy)."""
    from keras_tune import objectives

    objective = objectives.get(config)
    data = objective.prepare(objective.datasets(causal_lm.preprocessor.tokenizer, seed=0))
    x, y = next(data.train.as_numpy_iterator())
    return x, y


def _summed_logps(causal_lm, x, values=None):
    """log p(response | prompt) of every row from keras-hub's full logits: `[pairs, 2]`."""
    pairs, _, length = x["token_ids"].shape
    flat = {"token_ids": x["token_ids"].reshape(-1, length), "padding_mask": x["padding_mask"].reshape(-1, length)}
    if values is None:
        logits = causal_lm(flat)
    else:
        logits, _ = causal_lm.stateless_call(values, [v.value for v in causal_lm.non_trainable_variables], flat)
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, x["targets"].reshape(-1, length)[..., None], axis=-1)[..., 0]
    return (picked * x["response_weights"].reshape(-1, length)).sum(-1).reshape(pairs, 2)


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory):
    """A gemma3_tiny DPO config on preference pairs, its LoRA model with non-zero adapters, and one batch."""
    import keras

    keras.distribution.set_distribution(None)
    prefs = write_preferences(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", count=40)
    config = config_lib.load_config("gemma3_tiny", overrides={
        "train.objective": "dpo", "data.name": "text", "data.path": prefs, "data.seq_len": 32,
        "distribution.mesh": "1x1", "lora.targets": "query,value,ffw_linear", "preference.beta": 0.5})
    causal_lm = build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm
    rng = np.random.default_rng(0)
    for variable in causal_lm.trainable_variables:
        variable.assign(rng.normal(0, 0.1, variable.shape).astype("float32"))
    x, y = _pair_batch(config, causal_lm)
    yield config, causal_lm, x, y
    keras.distribution.set_distribution(None)


def test_dpo_loss_and_gradients_equal_the_formula_on_full_logits_with_the_lora_off_network_as_reference(dpo_setup):
    config, causal_lm, x, y = dpo_setup
    trainer = preference.PreferenceModel(causal_lm, "dpo", beta=0.5, chunk_tokens=16)
    assert x["token_ids"].shape[1] == 2 and x["loss_positions"].shape[:2] == x["token_ids"].shape[:2]
    # The reference: the same base built without LoRA at all.
    plain = build_model(config, lora=False, devices=jax.devices()[:1]).causal_lm
    reference = np.asarray(_summed_logps(plain, x))
    trainable = [v.value for v in causal_lm.trainable_variables]

    def full_loss(values):  # keras-hub's logits, the formula written out
        policy = _summed_logps(causal_lm, x, values)
        margin = 0.5 * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
        return jnp.mean(jnp.log1p(jnp.exp(-margin)))

    other = [v.value for v in trainer.non_trainable_variables]

    def trainer_loss(values):
        rows, _ = trainer.stateless_call(values, other, x)
        return rows[:, preference.LOSS].mean(), rows

    assert y.tolist() == [1.0] * len(y)  # every pair of a training batch is real
    (loss, rows), grads = jax.jit(jax.value_and_grad(trainer_loss, has_aux=True))(trainable)
    want, want_grads = jax.jit(jax.value_and_grad(full_loss))(trainable)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(loss) != pytest.approx(math.log(2.0), abs=1e-3)  # the adapters moved the policy off the reference
    for variable, got, expected in zip(causal_lm.trainable_variables, grads, want_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()),
                                   err_msg=variable.path)
    policy = np.asarray(_summed_logps(causal_lm, x))
    np.testing.assert_allclose(rows[:, preference.CHOSEN], policy[:, 0], rtol=1e-5)
    np.testing.assert_allclose(rows[:, preference.REJECTED], policy[:, 1], rtol=1e-5)
    margin = 0.5 * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    np.testing.assert_allclose(rows[:, preference.MARGIN], margin, rtol=1e-4, atol=1e-5)
    # ORPO needs no reference: its loss from the same log-probabilities and response lengths.
    orpo = preference.PreferenceModel(causal_lm, "orpo", beta=0.5, chunk_tokens=16)
    orpo_rows = np.asarray(orpo(x))
    lengths = x["response_weights"].sum(-1)
    expected, _ = preference.orpo_loss(policy[:, 0] / lengths[:, 0], policy[:, 1] / lengths[:, 1], 0.5)
    np.testing.assert_allclose(orpo_rows[:, preference.LOSS], expected, rtol=1e-5)


def test_the_reference_is_no_second_copy_of_the_base_in_the_model_or_the_plan(dpo_setup):
    config, causal_lm, _, _ = dpo_setup
    trainer = preference.PreferenceModel(causal_lm, "dpo", beta=0.1)
    assert count_parameters(trainer.weights) == count_parameters(causal_lm.weights)
    assert [v.path for v in trainer.trainable_variables] == [v.path for v in causal_lm.trainable_variables]
    sft = config_lib.load_config("gemma3_tiny", overrides={"distribution.mesh": "1x1"})
    planned = {name: plan_memory(c, devices=jax.devices()[:1]) for name, c in (("sft", sft), ("dpo", config))}
    assert planned["dpo"].base_weights == planned["sft"].base_weights  # the base, once
    assert planned["dpo"].teacher_weights == 0
    assert 0 < planned["dpo"].second_forward < planned["dpo"].activations  # a forward pass that keeps nothing
    # A pair is two sequences: the policy's activations are those of twice the batch.
    doubled = config_lib.load_config("gemma3_tiny", overrides={"distribution.mesh": "1x1", "data.seq_len": 32,
                                                               "data.batch_size": 16,
                                                               "lora.targets": "query,value,ffw_linear"})
    assert planned["dpo"].activations == plan_memory(doubled, devices=jax.devices()[:1]).activations


def _preference_run(tmp_path, name, objective="dpo", steps=20, extra=None):
    prefs = write_preferences(tmp_path / "prefs.jsonl", count=96)
    overrides = {
        "train.objective": objective, "data.name": "text", "data.path": prefs, "data.seq_len": 32,
        "data.validation_fraction": 0.25, "train.steps": steps, "train.eval_every": 10,
        "optimizer.learning_rate": 1e-2, "preference.beta": 0.5, "train.output_dir": str(tmp_path / name),
        **(extra or {}),
    }
    config = config_lib.load_config("gemma3_tiny", overrides=overrides)
    return training.run(config), read_rows(str(tmp_path / name / "metrics.csv"))


def test_dpo_preference_accuracy_rises_from_a_half_to_above_0_9(tmp_path, capsys):
    result, rows = _preference_run(tmp_path, "dpo")
    printed = capsys.readouterr().out
    assert "validation before training: loss 0.6931, preference accuracy 0.500, reward margin 0.0000" in printed
    assert "objective dpo: beta 0.5, reference: the same network with LoRA off" in printed
    assert "preference pairs: every count above is a pair" in printed
    assert [int(row["step"]) for row in rows] == list(range(21))
    first, last = rows[0], rows[-1]
    assert first["val_preference_accuracy"] == 0.5 and first["val_reward_margin"] == 0.0  # policy = reference
    assert first["val_loss"] == pytest.approx(math.log(2.0), rel=1e-5)
    assert last["val_preference_accuracy"] > 0.9 and last["val_reward_margin"] > 0.5
    for row in rows[1:]:  # a column each, every step
        assert all(row[column] is not None and math.isfinite(row[column]) for column in COLUMNS)
        assert row["chosen_logp"] < 0 and row["rejected_logp"] < 0 and 0 <= row["preference_accuracy"] <= 1
    assert result.validation["preference_accuracy"] == last["val_preference_accuracy"]
    assert (tmp_path / "dpo" / "adapter.npz").is_file()
    from matplotlib import image

    # loss.png: the loss, then a 2.2-inch panel a column under it (7 x 4 inches at 100 dpi alone).
    assert image.imread(str(tmp_path / "dpo" / "loss.png")).shape[:2] == (400 + 220 * len(COLUMNS), 700)
    import tensorflow as tf

    tags = set()
    for events in (tmp_path / "dpo" / "tensorboard").glob("events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            tags |= {value.tag for value in event.summary.value}
    assert {f"train/{c}" for c in COLUMNS} | {f"validation/{c}" for c in COLUMNS} <= tags


def test_orpo_on_chat_messages_learns_the_preference_without_a_reference(tmp_path):
    prefs = write_preferences(tmp_path / "prefs.jsonl", count=96, form="implicit")
    config = config_lib.load_config("gemma3_tiny", overrides={
        "train.objective": "orpo", "data.name": "chat", "data.path": prefs, "data.seq_len": 32,
        "data.validation_fraction": 0.25, "train.steps": 20, "train.eval_every": 20, "optimizer.learning_rate": 1e-2,
        "preference.beta": 0.5, "train.output_dir": str(tmp_path / "orpo")})
    training.run(config)
    rows = read_rows(str(tmp_path / "orpo" / "metrics.csv"))
    assert rows[0]["val_preference_accuracy"] < 0.8  # no preference learned yet
    assert rows[-1]["val_preference_accuracy"] > 0.9
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]


def test_a_resumed_dpo_run_logs_what_an_uninterrupted_one_does(tmp_path):
    _preference_run(tmp_path, "whole", steps=6, extra={"train.eval_every": 3, "train.save_every": 3})
    _preference_run(tmp_path, "resumed", steps=3, extra={"train.eval_every": 3, "train.save_every": 3})
    _preference_run(tmp_path, "resumed", steps=6, extra={"train.eval_every": 3, "train.save_every": 3})
    assert_same_metrics(str(tmp_path / "whole"), str(tmp_path / "resumed"), steps=6)
    for column in COLUMNS:
        whole = [row[column] for row in read_rows(str(tmp_path / "whole" / "metrics.csv"))]
        resumed = [row[column] for row in read_rows(str(tmp_path / "resumed" / "metrics.csv"))]
        assert whole[1:] == pytest.approx(resumed[1:], rel=1e-4, abs=1e-5), column


def test_the_data_report_counts_pairs_truncations_and_dropped_pairs(tmp_path, tok):
    records = [{"prompt": f"Describe {i}:", "chosen": "blue calm", "rejected": f"red loud {i}"} for i in range(10)]
    records += [{"prompt": "Same:", "chosen": "green", "rejected": "green"}] * 2  # dropped: equal responses
    records.append({"prompt": "Long:", "chosen": "warm " * 40, "rejected": "cold"})  # longer than seq_len: cut
    records.append({"prompt": "x " * 60, "chosen": "kind", "rejected": "rude"})  # the prompt fills the row
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = config_lib.load_config("gemma3_tiny", overrides={
        "train.objective": "dpo", "data.name": "text", "data.path": str(path), "data.seq_len": 24,
        "data.batch_size": 2, "data.validation_fraction": 0.0})
    report = make_preference_datasets(config.data, tok, seed=0, log=None).report
    assert (report.train.read, report.train.kept, report.train.truncated) == (14, 11, 1)
    assert dict(report.train.dropped) == {"chosen equals rejected": 2, "prompt fills seq_len: no response token fits": 1}
    assert report.train.sequences == 11 and report.validation is None
    summary = report.summary()
    assert "examples: read 14, kept 11, truncated 1, dropped 3" in summary
    assert "a batch holds 2 pairs, 4 rows" in summary
    dropping = config_lib.load_config("gemma3_tiny", overrides={
        "train.objective": "dpo", "data.name": "text", "data.path": str(path), "data.seq_len": 24,
        "data.batch_size": 2, "data.validation_fraction": 0.0, "data.overlong": "drop"})
    report = make_preference_datasets(dropping.data, tok, seed=0, log=None).report
    assert (report.train.kept, report.train.truncated) == (10, 0)
    assert report.train.dropped["longer than seq_len 24 (--overlong drop)"] == 1


def test_chat_preference_forms_render_the_prompt_without_loss_and_the_responses_with_it(tmp_path, tok):
    from keras_tune.data.preference import read_pairs

    for form in ("messages", "implicit"):
        path = write_preferences(tmp_path / f"{form}.jsonl", count=4, form=form)
        config = config_lib.load_config("gemma3_tiny", overrides={
            "train.objective": "dpo", "data.name": "chat", "data.path": path})
        read, _ = read_pairs(config.data, tok)
        (chosen, chosen_weights), (rejected, rejected_weights) = read.examples[0]
        prompt = "<start_of_turn>user\nDescribe the thing number 0:<end_of_turn>\n"
        assert chosen[:2] == [prompt, "<start_of_turn>model\n"] and chosen_weights == [0.0, 0.0, 1.0], form
        assert rejected[:2] == chosen[:2] and rejected_weights == [0.0, 0.0, 1.0], form
        assert chosen[2].endswith("<end_of_turn>\n") and chosen[2] != rejected[2]


@pytest.mark.parametrize(
    "records, fragment",
    [
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
         "prefs.jsonl:2: no field 'rejected' (fields: chosen, prompt); expected a preference record with prompt, "
         "chosen and rejected"),
        ([{"prompt": "a", "chosen": "same", "rejected": "same"}] * 3,
         "in every one of its 3 pairs the chosen response equals the rejected one; expected pairs whose responses "
         "differ"),
        ([{"prompt": "a", "chosen": 3, "rejected": "c"}], "field 'chosen' is a int; expected a string"),
    ],
)
def test_a_bad_preference_file_is_one_line_and_exit_2_before_the_model(records, fragment, tmp_path, capsys, no_model):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    code = fit.main(["--preset", "gemma3_tiny", "--objective", "dpo", "--data", "text", "--data-path", str(path),
                     "--output-dir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--objective", "dpo", "--data", "code"], "--objective dpo reads preference records (prompt, chosen, rejected); "
                                                   "expected --data text or chat, got --data code"),
        (["--objective", "dpo", "--lora-rank", "0", "--data", "text"], "expected --lora-rank > 0"),
        (["--objective", "dpo", "--data", "text", "--batching", "pack"], "expected --batching auto, bucket or pad"),
        (["--objective", "kto"], "--objective 'kto'; expected one of sft, distill, dpo, orpo"),
        (["--objective", "orpo", "--data", "text", "--beta", "0"], "--beta 0.0: expected a positive number"),
    ],
)
def test_bad_preference_flags_are_one_line(argv, fragment, capsys, no_model):
    assert fit.main(["--preset", "gemma3_tiny", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines

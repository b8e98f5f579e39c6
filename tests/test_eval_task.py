"""`fit --eval-task translation`: chrF and BLEU of greedy translations at each evaluation of a run.

The MTNT split is a real TFDS `mtnt/en-fr` dataset prepared offline from an
archive in MTNT's own layout (tests/helpers.py). Half of the held-out
references are the untrained tiny model's own greedy translations, so the
scores before training are far from 0 and from 100; every evaluation's figures
in `metrics.csv` must be sacrebleu's on the translations the run wrote in
`translations.jsonl`.
"""

import json

import pytest
import sacrebleu

from keras_tune import fit
from keras_tune.rundir import read_rows

from helpers import MTNT_URL, prepare_tfds, tar_gz

PRESET = "gemma3_tiny"
SEQ_LEN = 40
TEMPLATE = "Translate this into French:\n{source}\n"
SOURCES = ["good morning", "thank you very much", "see you soon", "the cat sleeps", "I like the sea", "it rains"]


@pytest.fixture(scope="module")
def mtnt_dir(tmp_path_factory):
    from keras_tune import config as config_lib
    from keras_tune.decoding import generate_texts
    from keras_tune.models.loader import build_model

    causal_lm = build_model(config_lib.load_config(PRESET)).causal_lm  # tiny presets are seeded: the run's start
    causal_lm.compile(sampler="greedy")
    prompts = [TEMPLATE.format(source=source) for source in SOURCES]
    own = [text.strip() for text in generate_texts(causal_lm, causal_lm.preprocessor, prompts, SEQ_LEN)]
    # MTNT's files hold one pair a line: the model's own text, flattened, stands for the even references.
    valid = [(source, " ".join(own[i].split()) or "bonjour" if i % 2 == 0 else f"une phrase numero {i}")
             for i, source in enumerate(SOURCES)]
    pairs = {"train": [(f"hello number {i}", f"bonjour numero {i}") for i in range(12)], "valid": valid,
             "test": [("yes", "oui")]}
    root = tmp_path_factory.mktemp("mtnt")
    archive = tar_gz({f"MTNT/{split}/{split}.en-fr.tsv": "".join(f"{split}{i}\t{s}\t{d}\n" for i, (s, d) in enumerate(rows))
                      for split, rows in pairs.items()})
    prepare_tfds("mtnt/en-fr", MTNT_URL, archive, root / "data", root / "downloads")
    return str(root / "data"), dict(valid)


def test_each_evaluation_row_holds_sacrebleu_scores_of_the_translations_the_run_wrote(mtnt_dir, tmp_path, capsys):
    data_dir, references = mtnt_dir
    run_dir = tmp_path / "run"
    code = fit.main(["--preset", PRESET, "--data", "mtnt", "--data-dir", data_dir, "--seq-len", str(SEQ_LEN),
                     "--batch-size", "2", "--batching", "pad", "--steps", "4", "--eval-every", "2",
                     "--learning-rate", "0.01", "--eval-task", "translation", "--eval-task-examples", "5",
                     "--log-every", "0", "--output-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {int(row["step"]): row for row in read_rows(run_dir / "metrics.csv")}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    records = [json.loads(line) for line in (run_dir / "translations.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records}) == [0, 2, 4]
    for step, row in rows.items():
        if step % 2:  # no evaluation: no scores
            assert row["val_chrf"] is None and row["val_bleu"] is None and row["val_loss"] is None, row
            continue
        written = [r for r in records if r["step"] == step]
        # The first 5 held-out pairs (TFDS keeps its own order of a split), each with its own reference.
        assert len(written) == 5 and len({r["prompt"] for r in written}) == 5
        for record in written:
            source = record["prompt"][len("Translate this into French:\n"):-1]
            assert record["prompt"] == TEMPLATE.format(source=source) and record["reference"] == references[source]
        hypotheses, held_out = [r["hypothesis"] for r in written], [r["reference"] for r in written]
        assert row["val_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [held_out]).score, abs=5e-4)
        assert row["val_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [held_out]).score, abs=5e-4)
        assert row["val_loss"] is not None
    assert 0 < rows[0]["val_chrf"] < 100, rows[0]  # some references are the model's own translations
    assert f"translation before training: chrF {rows[0]['val_chrf']:.2f}" in out
    assert f"translation after training: chrF {rows[4]['val_chrf']:.2f}" in out
    from matplotlib import image

    # The loss, then chrF and BLEU a panel each (points at the evaluations).
    assert image.imread(str(run_dir / "loss.png")).shape[:2] == (400 + 220 * 2, 700)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--eval-task", "bleu"], "--eval-task 'bleu'; expected translation"),
        (["--eval-task", "translation", "--data", "imdb", "--data-dir", "TMP"],
         "--eval-task translation scores the held-out (prompt, reference) pairs of --data mtnt or text; got --data imdb"),
        (["--eval-task", "translation", "--data", "text", "--data-path", "TMP/pairs.jsonl",
          "--set", "data.validation_fraction=0"], "data.validation_fraction is 0.0, expected above 0"),
        (["--eval-task", "translation", "--data", "mtnt", "--eval-task-examples", "0"],
         "--eval-task-examples 0: expected at least 1"),
    ],
)
def test_a_wrong_eval_task_is_one_line_before_the_model(argv, fragment, tmp_path, capsys, no_model):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    code = fit.main(["--preset", PRESET, "--output-dir", str(tmp_path / "run"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "run").exists()

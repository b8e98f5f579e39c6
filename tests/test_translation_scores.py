"""Task scores: `evaluate --task translation` translates a held-out split greedily and prints sacrebleu's figures.

The MTNT split is a real TFDS `mtnt/en-fr` dataset prepared offline from an
archive in MTNT's own layout (tests/helpers.py); the prompt/response split is a
user's JSONL whose held-out references are, for some pairs, the model's own
greedy translation (so chrF and BLEU are far from 0 and from 100).
"""

import json
import re

import pytest
import sacrebleu

from helpers import MTNT_URL, prepare_tfds, tar_gz

PRESET = "gemma3_tiny"
MAX_LENGTH = 40
VALID = [("good morning", "bonjour"), ("thank you very much", "merci beaucoup"), ("see you soon", "a bientot"),
         ("the cat sleeps", "le chat dort"), ("I like the sea", "j'aime la mer")]


@pytest.fixture(scope="module")
def mtnt_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtnt")
    pairs = {"train": [(f"hello number {i}", f"bonjour numero {i}") for i in range(4)], "valid": VALID,
             "test": [("yes", "oui")]}
    archive = tar_gz({f"MTNT/{split}/{split}.en-fr.tsv": "".join(f"{split}{i}\t{s}\t{d}\n" for i, (s, d) in enumerate(rows))
                      for split, rows in pairs.items()})
    prepare_tfds("mtnt/en-fr", MTNT_URL, archive, root / "data", root / "downloads")
    return str(root / "data")


@pytest.fixture(scope="module")
def tiny_lm():
    """The preset's model as the tool builds it (tiny presets are seeded: the same weights every build)."""
    from keras_tune import config as config_lib
    from keras_tune.models.loader import build_model

    causal_lm = build_model(config_lib.load_config(PRESET)).causal_lm
    causal_lm.compile(sampler="greedy")
    return causal_lm


def _greedy(causal_lm, prompts):
    from keras_tune.decoding import generate_texts

    return [t.strip() for t in generate_texts(causal_lm, causal_lm.preprocessor, prompts, MAX_LENGTH)]


def _printed(out):
    return {name: float(value) for name, value in re.findall(r"^(chrF|BLEU)\s+([\d.]+)$", out, re.M)}


def _run(argv, capsys):
    from keras_tune.evaluate import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_mtnt_split_is_translated_greedily_and_scored_as_sacrebleu_scores_it(mtnt_dir, tiny_lm, tmp_path, capsys):
    out_path = tmp_path / "hypotheses.jsonl"
    code, out, err = _run(["--preset", PRESET, "--task", "translation", "--data", "mtnt", "--data-dir", mtnt_dir,
                           "--max-length", str(MAX_LENGTH), "--batch-size", "2", "--hypotheses", str(out_path)], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    # TFDS keeps its own order of a split: every pair once, its prompt from the template.
    assert sorted((r["prompt"], r["reference"]) for r in rows) == sorted(
        (f"Translate this into French:\n{source}\n", target) for source, target in VALID)
    assert [r["hypothesis"] for r in rows] == _greedy(tiny_lm, [r["prompt"] for r in rows])
    hypotheses, references = [r["hypothesis"] for r in rows], [r["reference"] for r in rows]
    printed = _printed(out)
    assert printed["chrF"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score, abs=5e-5)
    assert printed["BLEU"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score, abs=5e-5)
    assert f"task translation: {len(VALID)} pairs from tfds mtnt/en-fr valid" in out


def test_prompt_response_file_scores_match_sacrebleu_and_the_library_function(tiny_lm, tmp_path, capsys):
    from keras_tune.translation import translation_scores

    prompts = [f"Translate this into French:\nsentence {word}\n" for word in
               ("one", "two", "three", "four", "five", "six", "seven", "eight")]
    own = _greedy(tiny_lm, prompts)
    # Every other reference is the model's own translation: chrF and BLEU land between 0 and 100.
    references = [own[i] if i % 2 == 0 else f"une phrase numero {i}" for i in range(len(prompts))]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, references)))
    out_path = tmp_path / "hypotheses.jsonl"
    code, out, err = _run(["--preset", PRESET, "--task", "translation", "--data", "text", "--data-path", str(data),
                           "--set", "data.validation_fraction=0.5", "--max-length", str(MAX_LENGTH),
                           "--hypotheses", str(out_path)], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert len(rows) == 4 and {r["prompt"] for r in rows} <= set(prompts)
    assert [r["hypothesis"] for r in rows] == [own[prompts.index(r["prompt"])] for r in rows]
    hypotheses, held_out = [r["hypothesis"] for r in rows], [r["reference"] for r in rows]
    expected = {"chrF": sacrebleu.corpus_chrf(hypotheses, [held_out]).score,
                "BLEU": sacrebleu.corpus_bleu(hypotheses, [held_out]).score}
    assert 0 < expected["chrF"] < 100 and 0 < expected["BLEU"] < 100, expected
    assert _printed(out) == pytest.approx(expected, abs=5e-5)
    scores = translation_scores(tiny_lm, [(r["prompt"], r["reference"]) for r in rows], MAX_LENGTH, batch_size=3)
    assert scores["hypotheses"] == hypotheses
    assert scores["chrf"] == pytest.approx(expected["chrF"]) and scores["bleu"] == pytest.approx(expected["BLEU"])


def test_translation_refusals_are_one_line(tmp_path, capsys, no_model):
    documents = tmp_path / "notes.txt"
    documents.write_text("one document.\n\nanother one.")
    cases = [
        (["--task", "translation", str(documents)], "expected the pairs from --data"),
        (["--task", "translation", "--data", "text", "--data-path", str(tmp_path / "none.jsonl")], "none.jsonl"),
        (["--task", "translation", "--data", "mtnt", "--hypotheses", str(tmp_path / "no" / "h.jsonl")],
         "its folder does not exist"),
        (["--task", "perplexity"], "no text file given"),
    ]
    for argv, fragment in cases:
        code, _, err = _run(["--preset", PRESET] + argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], (argv, lines)


def test_documents_are_not_translation_pairs(tmp_path, capsys):
    documents = tmp_path / "notes.txt"
    documents.write_text("one document.\n\nanother one.\n\na third.\n\nand a fourth one.")
    code, _, err = _run(["--preset", PRESET, "--task", "translation", "--data", "text", "--data-path", str(documents),
                         "--set", "data.validation_fraction=0.5"], capsys)
    assert code == 2 and "expected prompt/target pairs" in err.strip().splitlines()[-1]

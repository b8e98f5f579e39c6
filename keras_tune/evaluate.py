"""`python -m keras_tune.evaluate`: perplexity of text files, or a task score (`--task translation`).

The shared model flags choose the model (`--preset`, `--adapter`, `--weights`,
...); each file is scored as one text, in windows of `--seq-len` tokens that
each start with `<bos>` (the rule is `keras_tune.scoring`'s). Progress goes to
stderr, the table to stdout.

`--task translation` translates the held-out pairs of a data recipe greedily
(`--data mtnt` with `--data-dir`, or `--data text` with a prompt/response
`--data-path`) and prints sacrebleu's corpus chrF and BLEU
(`keras_tune.translation`); `--hypotheses FILE` writes each prompt, reference
and translation as JSON lines.

Examples:

```
python -m keras_tune.evaluate --preset gemma3_270m_offline --adapter runs/x/adapter.npz --seq-len 256 notes.txt
python -m keras_tune.evaluate --preset gemma3_270m_offline --adapter runs/x/adapter.npz --task translation --data mtnt --data-dir ~/tensorflow_datasets
```

Exit codes: 0 done, 2 a user error (one `error:` line on stderr).
"""

import os
import sys

from keras_tune import cli
from keras_tune.errors import UserError


TASK_FLAGS = (
    ("--data", "data.name", str, "--task translation: the recipe whose held-out pairs are translated (mtnt, text)"),
    ("--data-path", "data.path", str, "--task translation: your prompt/response .jsonl/.json/.csv file(s)"),
    ("--data-dir", "data.data_dir", str, "--task translation: TFDS data directory (mtnt)"),
)


def build_parser():
    """The `evaluate` tool's parser: the shared model flags plus the files and window, or a task."""
    parser = cli.tool_parser(
        "python -m keras_tune.evaluate",
        "Score text files with a preset (+ adapter): token count, mean next-token NLL (nats), perplexity; "
        "or translate a held-out split and print chrF and BLEU (--task translation).",
        TASK_FLAGS,
    )
    parser.add_argument("files", nargs="*", metavar="TEXT_FILE", help="UTF-8 text files, each scored as one text")
    parser.add_argument("--task", choices=("perplexity", "translation"), default="perplexity",
                        help="perplexity of the files (default), or chrF and BLEU of translations")
    parser.add_argument("--seq-len", type=int, help="window length in tokens, BOS included (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="windows (perplexity, default 1) or prompts (translation, "
                        "default 8) per compiled call")
    parser.add_argument("--max-length", type=int, help="--task translation: prompt + translation tokens (default: --seq-len)")
    parser.add_argument("--hypotheses", metavar="FILE", help="--task translation: write prompt, reference and "
                        "translation as JSON lines here")
    return parser


def format_table(names, result):
    """The tool's table: one row per text and an overall row.

    Args:
        names: the texts' names, in order.
        result: `keras_tune.scoring.evaluate_texts`' result.
    """
    width = max([len("overall"), *(len(name) for name in names)])
    lines = [f"{'text':<{width}}  {'tokens':>9}  {'nll':>8}  {'perplexity':>11}"]
    rows = list(zip(names, result["texts"])) + [("overall", result)]
    for name, row in rows:
        lines.append(f"{name:<{width}}  {row['tokens']:>9,}  {row['nll']:>8.4f}  {row['perplexity']:>11.3f}")
    return "\n".join(lines)


def _read_texts(paths):
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                texts.append(handle.read())
        except FileNotFoundError:
            raise UserError(f"{path}: no such file; expected a UTF-8 text file") from None
        except UnicodeDecodeError as error:
            raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        except OSError as error:
            raise UserError(f"{path}: cannot read it ({error.strerror})") from None
    return texts


def evaluate_files(args, log=cli.log_stderr):
    """Loads the model the flags describe and scores the files; returns (names, result).

    Args:
        args: the parsed arguments.
        log: where progress lines go.
    """
    from keras_tune.models.loader import build_model
    from keras_tune.scoring import evaluate_texts

    if not args.files:
        raise UserError("no text file given; expected TEXT_FILE arguments (or --task translation)")
    texts = _read_texts(args.files)
    config = cli.load_tool_config(args, TASK_FLAGS, data__seq_len=args.seq_len)
    built = build_model(config)
    log(f"model loaded in {built.seconds:.1f}s")
    result = evaluate_texts(built.causal_lm, texts, sequence_length=config.data.seq_len, batch_size=args.batch_size or 1)
    if result["tokens"] == 0:
        raise UserError("the text files hold no tokens; expected some text to score")
    return list(args.files), result


def translate_split(args, log=cli.log_stderr):
    """Loads the model, translates the recipe's held-out pairs and scores them; returns (where, scores).

    Args:
        args: the parsed arguments.
        log: where progress lines go.
    """
    import json

    from keras_tune.data import check_data
    from keras_tune.models.loader import build_model
    from keras_tune.rundir import atomic_write
    from keras_tune.translation import translation_examples, translation_scores

    if args.files:
        raise UserError(f"--task translation with text files ({args.files[0]}); expected the pairs from --data "
                        "(mtnt with --data-dir, or text with a prompt/response --data-path)")
    if args.hypotheses and not os.path.isdir(os.path.dirname(os.path.abspath(args.hypotheses))):
        raise UserError(f"--hypotheses {args.hypotheses}: its folder does not exist; expected a file in an existing folder")
    config = cli.load_tool_config(args, TASK_FLAGS, data__seq_len=args.seq_len)
    check_data(config.data)  # a missing file or unknown recipe costs no model load
    built = build_model(config)
    log(f"model loaded in {built.seconds:.1f}s")
    examples, where = translation_examples(config.data, built.causal_lm.preprocessor.tokenizer, seed=config.train.seed,
                                           log=log)
    log(f"translating {len(examples)} held-out pairs: {where}")
    max_length = args.max_length or config.data.seq_len
    scores = translation_scores(built.causal_lm, examples, max_length, batch_size=args.batch_size or 8)
    if args.hypotheses:
        with atomic_write(args.hypotheses) as partial, open(partial, "w", encoding="utf-8") as out:
            for (prompt, reference), hypothesis in zip(examples, scores["hypotheses"]):
                out.write(json.dumps({"prompt": prompt, "reference": reference, "hypothesis": hypothesis},
                                     ensure_ascii=False) + "\n")
    return where, scores


def format_scores(where, scores):
    """The translation task's table: the examples and sacrebleu's chrF and BLEU.

    Args:
        where: where the pairs came from.
        scores: `keras_tune.translation.translation_scores`' result.
    """
    return "\n".join([f"task translation: {len(scores['hypotheses'])} pairs from {where}",
                      f"chrF  {scores['chrf']:.4f}", f"BLEU  {scores['bleu']:.4f}"])


def main(argv=None):
    """CLI entry point; returns the process exit code."""

    def work(args):
        if args.task == "translation":
            print(format_scores(*translate_split(args)))
            return
        names, result = evaluate_files(args)
        print(format_table(names, result))

    return cli.run_cli(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())

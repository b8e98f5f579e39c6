"""`python -m keras_tune.evaluate`: token count, mean next-token NLL and perplexity of text files.

The shared model flags choose the model (`--preset`, `--adapter`, `--weights`,
...); each file is scored as one text, in windows of `--seq-len` tokens that
each start with `<bos>` (the rule is `keras_tune.scoring`'s). Progress goes to
stderr, the table to stdout.

Example:

```
python -m keras_tune.evaluate --preset gemma3_270m_offline --adapter runs/x/adapter.npz --seq-len 256 notes.txt
```

Exit codes: 0 done, 2 a user error (one `error:` line on stderr).
"""

import sys

from keras_tune import cli
from keras_tune.errors import UserError


def build_parser():
    """The `evaluate` tool's parser: the shared model flags plus the files and window."""
    parser = cli.tool_parser(
        "python -m keras_tune.evaluate",
        "Score text files with a preset (+ adapter): token count, mean next-token NLL (nats), perplexity.",
    )
    parser.add_argument("files", nargs="+", metavar="TEXT_FILE", help="UTF-8 text files, each scored as one text")
    parser.add_argument("--seq-len", type=int, help="window length in tokens, BOS included (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per compiled call (default 1)")
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

    texts = _read_texts(args.files)
    config = cli.load_tool_config(args, data__seq_len=args.seq_len)
    built = build_model(config)
    log(f"model loaded in {built.seconds:.1f}s")
    result = evaluate_texts(built.causal_lm, texts, sequence_length=config.data.seq_len, batch_size=args.batch_size)
    if result["tokens"] == 0:
        raise UserError("the text files hold no tokens; expected some text to score")
    return list(args.files), result


def main(argv=None):
    """CLI entry point; returns the process exit code."""

    def work(args):
        names, result = evaluate_files(args)
        print(format_table(names, result))

    return cli.run_cli(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())

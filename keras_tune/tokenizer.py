"""`python -m keras_tune.tokenizer train`: a Gemma-style SentencePiece tokenizer trained on a recipe's corpus.

For a model trained from scratch (the code recipe's seed): the tokenizer learns
the corpus's own pieces (indentation, `import pandas as pd`, ...), then a preset
with a random-init model takes it with `--set model.tokenizer=PATH` (any
vocabulary size: the model's embedding is sized to it). The corpus is any data
recipe's training split (`--data`, `--data-path`, `--max-examples`); its
validation split measures the tokenizer: tokens per byte, beside the Gemma 3
tokenizer's when the offline Gemma 3 270M is installed.

Example:

```
python -m keras_tune.tokenizer train --data code --data-path 'project/**/*.py' --vocab-size 16384 --output code.model
python -m keras_tune.fit --preset code_from_scratch --set model.tokenizer=code.model --data code --data-path 'project/**/*.py'
```

Exit codes: 0 done, 2 a user error (one `error:` line on stderr).
"""

import sys

from keras_tune import cli
from keras_tune import config as config_lib

# The corpus flags of `fit` this tool shares (a data recipe and where it reads).
DATA_FLAGS = (
    ("--data", "data.name", str, "recipe whose training split is the corpus: code, text, chat, imdb, mtnt"),
    ("--data-path", "data.path", str, "your files: directory, glob, .txt, .jsonl, .csv"),
    ("--data-dir", "data.data_dir", str, "TFDS data directory (imdb, mtnt)"),
    ("--max-examples", "data.max_examples", int, "read at most N examples (0 = all)"),
)


def build_parser():
    """The tool's parser: `train` and its flags."""
    parser = cli.ArgumentParser(prog="python -m keras_tune.tokenizer",
                                description="Train a Gemma-style SentencePiece tokenizer on a corpus.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a tokenizer on a recipe's training split")
    cli.add_flags(train, DATA_FLAGS)
    train.add_argument("--vocab-size", type=int, default=16384, help="pieces in all (default 16384)")
    train.add_argument("--output", required=True, metavar="FILE", help="the .model file to write (must not exist)")
    train.add_argument("--max-sentences", type=int, default=1_000_000,
                       help="text pieces kept for training, sampled from the corpus (bounds memory; default 1M)")
    train.add_argument("--seed", type=int, default=0, help="the validation hold-out's seed")
    train.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="any data field, e.g. --set data.validation_fraction=0.1")
    return parser


def run_train(args, log=cli.log_stderr):
    """What `train` does, given parsed arguments; returns `keras_tune.train_tokenizer`'s report."""
    from keras_tune.vocabulary import train_tokenizer

    data_config = config_lib.data_config(cli.overrides_from_args(args, DATA_FLAGS))
    return train_tokenizer(data_config, args.vocab_size, args.output, max_sentences=args.max_sentences,
                           seed=args.seed, log=log)


def main(argv=None):
    """CLI entry point; returns the process exit code."""

    def work(args):
        result = run_train(args)
        fewer = f" (the corpus had no more to learn than {result['pieces']:,} of --vocab-size {args.vocab_size:,})" \
            if result["pieces"] < args.vocab_size else ""
        print(f"tokenizer: {args.output} ({result['pieces']:,} pieces){fewer}")
        if result["tokens_per_byte"] is not None:
            line = f"held-out text: {result['tokens_per_byte']:.4f} tokens a byte"
            if result["gemma3_tokens_per_byte"] is not None:
                line += f" (Gemma 3's tokenizer: {result['gemma3_tokens_per_byte']:.4f})"
            print(line)

    return cli.run_cli(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())

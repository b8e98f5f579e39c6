"""`python -m keras_tune.generate`: text from a preset (+ a LoRA adapter); merge and export.

Prompts come from the command line, or one a line from stdin when none are
given. Instruct presets (`model.instruct`) get Gemma's chat turn format and stop
at `<end_of_turn>` (`keras_tune.decoding`); `--raw` sends prompts as they are.
Each result is printed as `>>> prompt`, then the generated text (the prompt
itself stripped). `--merge OUT_DIR` folds the adapter into the base weights and
writes a keras-hub preset plus, where keras-hub can convert the model, a
Transformers directory `OUT_DIR/transformers` (`keras_tune.models.exports`);
`python -m keras_tune.export` writes GGUF and PEFT files too.

Examples:

```
python -m keras_tune.generate --preset gemma_tiny "The weather today"
echo "Best comedy movies in the 90s" | python -m keras_tune.generate --preset gemma2_instruct_2b_en --adapter runs/x/adapter.npz
python -m keras_tune.generate --preset gemma3_270m_offline --sampler top_p --top-p 0.9 --temperature 0.8 --seed 1 "def fib(n):"
python -m keras_tune.generate --preset gemma_tiny --adapter runs/x/adapter.npz --merge exported/gemma_tiny_tuned
```

Exit codes: 0 done, 2 a user error (one `error:` line on stderr).
"""

import sys

from keras_tune import cli
from keras_tune.errors import UserError
from keras_tune.decoding import SAMPLERS, generate_texts, make_sampler


def build_parser():
    """The `generate` tool's parser: the shared model flags plus sampling options."""
    parser = cli.tool_parser(
        "python -m keras_tune.generate",
        "Generate text with a Gemma preset (+ LoRA adapter); merge and export the tuned model.",
    )
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (default: one a line from stdin)")
    parser.add_argument("--max-length", type=int, default=128, help="prompt + generated tokens (default 128)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="greedy", help="greedy (default), top_k or top_p")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (top_k, top_p)")
    parser.add_argument("--top-k", type=int, default=50, help="candidates kept by top_k (default 50)")
    parser.add_argument("--top-p", type=float, default=0.9, help="probability mass kept by top_p (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat format (instruct presets)")
    parser.add_argument("--merge", metavar="OUT_DIR", help="merge the adapter into the weights and save a keras-hub preset (+ Transformers) there")
    return parser


def _read_stdin_prompts():
    if sys.stdin is None or sys.stdin.isatty():
        return []
    return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]


def run_generate(args, log=print):
    """What the CLI does, given parsed arguments; returns the list of generated texts."""
    from keras_tune.models.exports.keras_preset import merge_and_export
    from keras_tune.models.loader import build_model

    if args.max_length < 2:
        raise UserError(f"--max-length {args.max_length}: expected at least 2 tokens")
    prompts = list(args.prompts) or ([] if args.merge else _read_stdin_prompts())
    if not prompts and not args.merge:
        raise UserError("no prompt given; expected prompts as arguments or one a line on stdin")
    config = cli.load_tool_config(args, train__seed=args.seed)
    sampler = make_sampler(args.sampler, args.temperature, args.top_k, args.top_p, seed=args.seed)
    built = build_model(config)
    log(f"model loaded in {built.seconds:.1f}s")
    if built.adapter:
        log(f"adapter {config.model.adapter}: rank {built.adapter['rank']}, targets {','.join(built.adapter['targets'])}")
    causal_lm = built.causal_lm
    if args.merge:
        merge_and_export(causal_lm, args.merge, log=log)
    if not prompts:
        return []
    causal_lm.compile(sampler=sampler)
    chat = bool(config.model.instruct) and not args.raw
    texts = generate_texts(causal_lm, causal_lm.preprocessor, prompts, args.max_length, chat=chat)
    for prompt, text in zip(prompts, texts):
        print(f">>> {prompt}\n{text.rstrip()}\n", flush=True)
    return texts


def main(argv=None):
    """CLI entry point; returns the process exit code."""

    def work(args):
        run_generate(args, log=cli.log_stderr)

    return cli.run_cli(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m keras_tune.export`: a tuned model for llama.cpp, Transformers, PEFT or keras-hub.

One model (the shared model flags: `--preset`, `--adapter`, `--weights`, ...),
any of four outputs, each named by its own flag:

- `--peft DIR`: the adapter alone in Hugging Face PEFT's layout
  (`adapter_config.json` + `adapter_model.safetensors`), loadable on the
  Transformers base model without merging (Gemma 1/3).
- `--transformers DIR`: the merged model as a Transformers directory, with a
  `tokenizer.json` (Gemma 1/3).
- `--gguf FILE` (`--gguf-dtype f32|f16`): the merged model for llama.cpp and
  Ollama (Gemma 3 and Gemma 4).
- `--keras-preset DIR`: the merged model as a keras-hub preset (every family;
  the only output for RecurrentGemma).

Every output is checked before the model is built: an existing file or a
non-empty directory is refused, so nothing already written is lost.

Examples:

```
python -m keras_tune.export --adapter runs/x/adapter.npz --gguf tuned-f16.gguf --gguf-dtype f16
python -m keras_tune.export --preset gemma_2b_en --adapter runs/y/adapter.npz --peft peft/ --transformers hf/
```

Exit codes: 0 done, 2 a user error (one `error:` line on stderr).
"""

import sys

from keras_tune import cli, rundir
from keras_tune.errors import UserError

GGUF_DTYPES = ("f32", "f16")


def build_parser():
    """The `export` tool's parser: the shared model flags plus one flag per output."""
    parser = cli.tool_parser(
        "python -m keras_tune.export",
        "Write a (LoRA-tuned) model as GGUF, a Transformers directory, a PEFT adapter or a keras-hub preset.",
    )
    parser.add_argument("--gguf", metavar="FILE", help="write the merged model as a llama.cpp GGUF (Gemma 3, Gemma 4)")
    parser.add_argument("--gguf-dtype", choices=GGUF_DTYPES, default="f16", help="GGUF weight type (default f16)")
    parser.add_argument("--transformers", metavar="DIR", help="write the merged model as a Transformers directory")
    parser.add_argument("--peft", metavar="DIR", help="write the adapter in Hugging Face PEFT's layout (needs --adapter)")
    parser.add_argument("--keras-preset", metavar="DIR", help="write the merged model as a keras-hub preset")
    return parser


def _outputs(args):
    outputs = {"--peft": args.peft, "--keras-preset": args.keras_preset,
               "--transformers": args.transformers, "--gguf": args.gguf}
    return {flag: path for flag, path in outputs.items() if path}


def check_outputs(args, config):
    """Refuses what cannot be written before the model is built.

    Args:
        args: the parsed arguments.
        config: the validated config they describe.
    """
    from keras_tune.models.exports.transformers import family_export_problem

    outputs = _outputs(args)
    if not outputs:
        raise UserError("nothing to export; expected at least one of --gguf, --transformers, --peft, --keras-preset")
    problem = family_export_problem(config, list(outputs))
    if problem:  # e.g. RecurrentGemma: a keras-hub preset only; GGUF: Gemma 3 and Gemma 4 only
        raise UserError(problem)
    if args.peft and not config.model.adapter:
        raise UserError("--peft needs --adapter FILE: the PEFT layout holds an adapter, and none was given")
    for flag, path in outputs.items():
        rundir.refuse_existing(path, flag)


def run_export(args, log=cli.log_stderr):
    """What the CLI does, given parsed arguments; returns `{flag: path written}`."""
    from keras_tune.lora import merge_lora
    from keras_tune.models.exports.gguf import export_gguf
    from keras_tune.models.exports.transformers import export_transformers
    from keras_tune.models.loader import build_model

    config = cli.load_tool_config(args)
    check_outputs(args, config)
    built = build_model(config)
    log(f"model loaded in {built.seconds:.1f}s")
    causal_lm, written = built.causal_lm, {}
    if args.peft:
        from keras_tune.peft import save_peft_adapter

        written["--peft"] = save_peft_adapter(causal_lm, args.peft, base_model_name_or_path=config.model.handle)
    merge_lora(causal_lm)
    if args.keras_preset:
        causal_lm.save_to_preset(args.keras_preset)
        written["--keras-preset"] = args.keras_preset
    if args.transformers:
        written["--transformers"] = export_transformers(causal_lm, args.transformers)
    if args.gguf:
        written["--gguf"] = export_gguf(causal_lm, args.gguf, dtype=args.gguf_dtype)
    for flag, path in written.items():
        print(f"{flag.removeprefix('--')}: {path}")
    return written


def main(argv=None):
    """CLI entry point; returns the process exit code."""

    def work(args):
        run_export(args)

    return cli.run_cli(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())

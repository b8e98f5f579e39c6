"""The front door of the four command-line tools: flags, one-line errors, exit codes.

`fit`, `generate`, `evaluate` and `export` share one set of model flags
(`MODEL_FLAGS`: which model, on which mesh, at which precision, with which
adapter), each with one help text; every flag is a config field, so a tool only
turns flags into `load_config` overrides and calls the library. A user's
mistake is one `error:` line and exit code 2, never a traceback, whether
argparse or keras_tune finds it. `python -m keras_tune.fit` runs `fit_main`
below; `keras_tune/fit.py` itself is library code a notebook imports.

Exit codes: 0 done, 2 a user error, 3 the loss became NaN/inf, 4 an output could not be
written (what was there before is intact), 130 interrupted, 143 stopped by SIGTERM after a checkpoint.
"""

import argparse
import os
import sys

from keras_tune import config as config_lib
from keras_tune.errors import UserError

# The Keras distributed-Gemma tutorial lets XLA take all accelerator memory.
MEM_FRACTION_DEFAULT = "1.00"

# flag, config field, type, help. A `bool` type is a switch; a `list` type a repeatable flag.
MODEL_FLAGS = (
    ("--weights", "model.weights", str, "a Gemma 3 .gguf file to load instead of the preset's weights"),
    ("--adapter", "model.adapter", str, "a LoRA adapter .npz written by keras_tune.fit (fit: start from it)"),
    ("--mesh", "distribution.mesh", str, "device mesh BxM (batch x model), e.g. 1x8, 2x4, 8x1; 'auto' = 1xN"),
    ("--layout", "distribution.layout", str, "layout name (see layouts/) or path to a layout .json"),
    ("--simulate-devices", "distribution.simulate_devices", int, "CPU only: expose N host devices to try any mesh"),
    ("--precision", "train.precision", str, "float32, mixed_bfloat16 or bfloat16 (weights and compute; LoRA stays float32)"),
)

FIT_FLAGS = (
    ("--lora-rank", "lora.rank", int, "LoRA rank; 0 = full fine-tuning"),
    ("--lora-targets", "lora.targets", str, "comma list of layers: query,key,value,attention_output,ffw_gating,ffw_gating_2,ffw_linear; "
     "RecurrentGemma's recurrent blocks also linear_x,linear_y,linear_out"),
    ("--lora-alpha", "lora.alpha", float, "LoRA alpha (update scaled by alpha/rank); 0 = rank"),
    ("--data", "data.name", str, "recipe: imdb, mtnt, code, text, chat"),
    ("--data-path", "data.path", str, "your files: directory, glob, .txt, .jsonl, .csv"),
    ("--data-dir", "data.data_dir", str, "TFDS data directory (imdb, mtnt)"),
    ("--max-examples", "data.max_examples", int, "use at most N examples (0 = all)"),
    ("--seq-len", "data.seq_len", int, "tokens per training sequence"),
    ("--batch-size", "data.batch_size", int, "global batch size (split over the mesh's batch axis)"),
    ("--batching", "data.batching", str, "auto, pack, bucket or pad"),
    ("--epochs", "train.epochs", int, "passes over the data (ignored when --steps is set)"),
    ("--steps", "train.steps", int, "optimizer steps in total (0 = --epochs passes)"),
    ("--learning-rate", "optimizer.learning_rate", float, "peak learning rate"),
    ("--optimizer", "optimizer.name", str, "adamw or sgd"),
    ("--weight-decay", "optimizer.weight_decay", float, "decoupled weight decay (norm scales and biases excluded)"),
    ("--schedule", "optimizer.schedule", str, "constant, cosine or linear decay after warmup"),
    ("--warmup-steps", "optimizer.warmup_steps", int, "linear warmup steps"),
    ("--clipnorm", "optimizer.clipnorm", float, "global gradient-norm clipping (0 = off)"),
    ("--accumulation-steps", "optimizer.accumulation_steps", int, "gradient accumulation steps"),
    ("--output-dir", "train.output_dir", str, "run directory (default runs/<preset>-<time>); one with checkpoints is continued"),
    ("--seed", "train.seed", int, "random seed for init, data order and sampling"),
    ("--eval-every", "train.eval_every", int, "validate every N steps (0 = at the end); also once before training"),
    ("--eval-steps", "train.eval_steps", int, "validation batches per evaluation (0 = all)"),
    ("--save-every", "train.save_every", int, "Orbax checkpoint every N steps (0 = at the end only)"),
    ("--keep-checkpoints", "train.keep_checkpoints", int, "checkpoints kept; older ones are deleted"),
    ("--resume", "train.resume", bool, "continue from the newest checkpoint of --output-dir (default: the newest runs/<preset>-*)"),
    ("--sample-prompt", "train.sample_prompts", list, "prompt to generate from before/after training and every --sample-every steps (repeatable)"),
    ("--sample-every", "train.sample_every", int, "generate samples every N steps (0 = before and after only)"),
    ("--sample-max-length", "train.sample_max_length", int, "prompt + generated tokens of a sample"),
    ("--peak-tflops", "train.peak_tflops", float, "peak TFLOP/s of one device for the MFU estimate (0 = from the device table)"),
    ("--quantize", "train.quantize", str, "store the frozen base as int8 or int4 (QLoRA-style; LoRA stays float32)"),
    ("--remat", "train.remat", bool, "recompute each decoder block in the backward pass (less memory, ~1/3 more compute)"),
    ("--keep-activations", "train.keep_activations", str, "what a Gemma block keeps for the backward pass: all "
     "(the default) or matmuls (their outputs; the rest is recomputed: less memory, a few percent more time)"),
    ("--device-memory", "train.device_memory", str, "memory of one device for the --dry-run planner, e.g. 16GiB or 80GB (default: the device's own figure or the device table)"),
    ("--coordinator", "distribution.coordinator", str, "multi-process: HOST:PORT of process 0"),
    ("--num-processes", "distribution.num_processes", int, "multi-process: how many processes (hosts) take part"),
    ("--process-id", "distribution.process_id", int, "multi-process: this process's index, 0 .. N-1"),
    ("--show-sharding", "run.show_sharding", bool, "print the sharding table"),
    ("--dry-run", "run.dry_run", bool, "plan only: shapes, sharding and memory, no weights"),
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (exit 2), like every other user error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def add_flags(parser, flags):
    """Adds `(flag, field, type, help)` rows to `parser`, each storing under its config field.

    Args:
        parser: an `ArgumentParser`.
        flags: rows such as `MODEL_FLAGS`.
    """
    for flag, field, kind, text in flags:
        if kind is bool:
            parser.add_argument(flag, dest=field, action="store_true", default=None, help=text)
        elif kind is list:
            parser.add_argument(flag, dest=field, action="append", default=None, help=text, metavar="TEXT")
        else:
            parser.add_argument(flag, dest=field, type=kind, default=None, help=text, metavar=field.split(".")[-1].upper())


def tool_parser(prog, description, flags=()):
    """A tool's parser with the shared model flags, its own `flags`, and `--set`.

    Args:
        prog: e.g. "python -m keras_tune.generate".
        description: one line for `--help`.
        flags: the tool's own config-field flags (rows like `FIT_FLAGS`).
    """
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--preset", help=f"preset name (default {config_lib.DEFAULT_PRESET}; see fit --list-presets)")
    parser.add_argument("--config", help="a copied and edited presets/*.py file to use instead of --preset")
    add_flags(parser, MODEL_FLAGS + tuple(flags))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any config field, e.g. --set optimizer.beta_2=0.95")
    return parser


def parse_set_flags(items):
    """Turns repeated `--set FIELD=VALUE` flags into a dict of config overrides.

    Args:
        items: the strings given to `--set`.
    """
    overrides = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item}: expected FIELD=VALUE, e.g. --set optimizer.beta_2=0.95")
        overrides[field] = value
    return overrides


def overrides_from_args(args, flags=()):
    """Collects the config-field flags that were given (and `--set`) into dotted overrides.

    `--weights FILE` also switches the model source to GGUF (a Gemma 3 file).

    Args:
        args: parsed arguments of a `tool_parser`.
        flags: the tool's own flag rows, besides `MODEL_FLAGS`.
    """
    overrides = {}
    for _, field, kind, _ in MODEL_FLAGS + tuple(flags):
        value = getattr(args, field, None)
        if value is not None and not (kind is bool and value is False):
            overrides[field] = tuple(value) if isinstance(value, list) else value
    if overrides.get("model.weights"):
        overrides.update({"model.source": "gguf", "model.family": "gemma3"})
    overrides.update(parse_set_flags(getattr(args, "set", [])))
    return overrides


def load_tool_config(args, flags=(), **extra):
    """The validated config a tool's flags describe.

    Args:
        args: parsed arguments of a `tool_parser`.
        flags: the tool's own flag rows.
        **extra: more overrides, as dotted names with `.` written `__`
            (`data__seq_len=64`), for tool flags that are not config fields.
    """
    overrides = overrides_from_args(args, flags)
    overrides.update({name.replace("__", "."): value for name, value in extra.items() if value is not None})
    return config_lib.load_config(args.preset, config_file=args.config, overrides=overrides)


def run_cli(parser, argv, work):
    """Parses `argv` and runs `work(args)`; returns the process exit code.

    `--simulate-devices` is applied here, before anything starts JAX. A
    `UserError` prints as one line and exits with its `exit_code` (2 unless the
    error class says otherwise); Ctrl-C exits with 130.

    Args:
        parser: the tool's `ArgumentParser`.
        argv: arguments (None means `sys.argv[1:]`).
        work: function of the parsed arguments; may return an exit code.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION_DEFAULT)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a bad flag already reported in one line
        return done.code if isinstance(done.code, int) else 2
    try:
        simulated = getattr(args, "distribution.simulate_devices", None)
        if simulated:
            from keras_tune.distribution import simulate_devices

            simulate_devices(simulated)
        return work(args) or 0
    except UserError as error:
        print(f"{getattr(error, 'label', 'error')}: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------
# python -m keras_tune.fit


def build_fit_parser():
    """The `fit` tool's parser: the model flags, one flag per training field, and actions."""
    parser = tool_parser(
        "python -m keras_tune.fit",
        "LoRA fine-tuning of Gemma-family models with Keras 3 + keras-hub on a device mesh.",
        FIT_FLAGS,
    )
    parser.add_argument("--list-presets", action="store_true", help="list presets with parameter counts and exit")
    return parser


def aligned_table(header, rows, right=()):
    """Rows of text as columns as wide as their widest cell; the last column is not padded.

    Args:
        header: the column titles.
        rows: tuples of cells (strings), one per column.
        right: indices of right-aligned (numeric) columns.
    """
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(row):
        cells = [f"{cell:>{width}}" if i in right else f"{cell:<{width}}"
                 for i, (cell, width) in enumerate(zip(row[:-1], widths))]
        return "  ".join([*cells, str(row[-1])]).rstrip()

    return "\n".join(line(row) for row in (header, *rows))


def list_presets_table():
    """Table of every shipped preset with its parameter count (planned, no download)."""
    from keras_tune.lora import count_parameters
    from keras_tune.models.loader import abstract_model

    rows = []
    for name in config_lib.list_presets():
        config = config_lib.load_config(name)
        description = config.description
        try:
            count = f"{count_parameters(abstract_model(config, lora=False).weights):,}"
        except UserError as error:  # e.g. the registry package is not installed: say why after the description
            count, description = "?", f"{description} (parameters unknown: {error})"
        rows.append((name, config.model.family, config.model.source, count, description))
    return aligned_table(("preset", "family", "source", "parameters", "description"), rows, right=(3,))


def fit_main(argv=None):
    """`python -m keras_tune.fit`; returns the process exit code (see the module docstring)."""

    def work(args):
        if args.list_presets:
            print(list_presets_table())
            return 0
        from keras_tune.fit import run

        run(load_tool_config(args, FIT_FLAGS))

    return run_cli(build_fit_parser(), argv, work)


def log_stderr(line):
    """Progress lines of the inference tools go to stderr, so stdout holds only results."""
    print(line, file=sys.stderr)

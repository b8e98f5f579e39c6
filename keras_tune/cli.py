"""What the command-line tools share: the model flags, one-line errors, exit codes.

Each tool is a thin module named after its command (`keras_tune/fit.py` is
`python -m keras_tune.fit`; likewise `generate`, `evaluate`, `export`) that
turns flags into a config and calls the library (`keras_tune.training`,
`keras_tune.decoding`, `keras_tune.scoring`, `keras_tune.models.exports`). They
share one set of model flags (`MODEL_FLAGS`: which model, on which mesh, at
which precision, with which adapter), each with one help text; every flag is a
config field. A user's mistake is one `error:` line and exit code 2, never a
traceback, whether argparse or keras_tune finds it; a run that fails
(`keras_tune.errors.RunFailed`) is one line with its own exit code.

Exit codes: 0 done, 2 a user error, 3 the loss became NaN/inf, 4 an output could not be
written (what was there before is intact), 5 no progress for `--step-timeout` seconds (a
dead or hung peer), 130 interrupted, 143 stopped by SIGTERM.
"""

import argparse
import os
import sys

from keras_tune import config as config_lib
from keras_tune.errors import KerasTuneError, RunFailed, UserError

# The Keras distributed-Gemma tutorial lets XLA take all accelerator memory.
MEM_FRACTION_DEFAULT = "1.00"

# flag, config field, type, help. A `bool` type is a switch; a `list` type a repeatable flag.
MODEL_FLAGS = (
    ("--weights", "model.weights", str, "a Gemma 3 .gguf file to load instead of the preset's weights"),
    ("--adapter", "model.adapter", str, "a LoRA adapter .npz written by keras_tune.fit (fit: start from it)"),
    ("--init-from", "model.handle", str, "a keras-hub preset directory (a full-weight run's model/, export "
     "--keras-preset's) whose architecture, weights and tokenizer replace the preset's (fit: start from it)"),
    ("--mesh", "distribution.mesh", str, "device mesh BxM (batch x model), e.g. 1x8, 2x4, 8x1; 'auto' = 1xN"),
    ("--layout", "distribution.layout", str, "layout name (see layouts/) or path to a layout .json"),
    ("--simulate-devices", "distribution.simulate_devices", int, "CPU only: expose N host devices to try any mesh"),
    ("--precision", "train.precision", str, "float32, mixed_bfloat16, mixed_float16 (dynamic loss scaling: T4, P100) or "
     "bfloat16 (weights and compute; LoRA stays float32)"),
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


def tool_parser(prog, description, flags=(), without=()):
    """A tool's parser with the shared model flags, its own `flags`, and `--set`.

    Args:
        prog: e.g. "python -m keras_tune.generate".
        description: one line for `--help`.
        flags: the tool's own config-field flags (rows like `FIT_FLAGS`).
        without: shared model flags the tool defines its own way (serve's repeatable `--adapter NAME=PATH`).
    """
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--preset", help=f"preset name (default {config_lib.DEFAULT_PRESET}; see fit --list-presets)")
    parser.add_argument("--config", help="a copied and edited presets/*.py file to use instead of --preset")
    add_flags(parser, tuple(row for row in MODEL_FLAGS if row[0] not in without) + tuple(flags))
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

    `--weights FILE` also switches the model source to GGUF (a Gemma 3 file: the
    family with a GGUF importer); `--init-from DIR` to that keras-hub preset
    directory, whose family its config.json says.

    Args:
        args: parsed arguments of a `tool_parser`.
        flags: the tool's own flag rows, besides `MODEL_FLAGS`.
    """
    overrides = {}
    for _, field, kind, _ in MODEL_FLAGS + tuple(flags):
        value = getattr(args, field, None)
        if value is not None and not (kind is bool and value is False):
            overrides[field] = tuple(value) if isinstance(value, list) else value
    from keras_tune.models import families

    if overrides.get("model.weights"):
        readers = families.for_source("gguf")  # the family whose GGUF files --weights loads
        overrides.update({"model.source": "gguf", "model.family": readers[0].name})
    if overrides.get("model.handle") and getattr(args, "model.handle", None):  # --init-from DIR
        overrides.update({"model.source": "local", "model.family": families.of_preset_dir(overrides["model.handle"]).name})
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
    `KerasTuneError` prints as one line and exits with its `exit_code` (2 for a
    `UserError`, a `RunFailed` says its own); Ctrl-C exits with 130.

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
    except KerasTuneError as error:
        print(f"{error.label}: {error}", file=sys.stderr, flush=True)
        if isinstance(error, RunFailed):
            _leave_a_failed_multi_process_run(error.exit_code)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def log_stderr(line):
    """Progress lines of the inference tools go to stderr, so stdout holds only results."""
    print(line, file=sys.stderr)


def _leave_a_failed_multi_process_run(code):
    """Ends a failed process of a multi-process run now: JAX's shutdown barrier would wait for a lost peer.

    Args:
        code: the exit code.
    """
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
        sys.stdout.flush()
        os._exit(code)

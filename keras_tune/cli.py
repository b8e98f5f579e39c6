"""Plumbing the command-line tools share (`fit`, `generate`, `evaluate`).

A user's mistake is one `error:` line and exit code 2, never a traceback, whether
argparse or keras_tune finds it; the model an inference tool needs is built the
same way everywhere: planned, sharded, then the adapter checked and loaded.
"""

import argparse
import os
import sys

from keras_tune.errors import UserError

# The Keras distributed-Gemma tutorial lets XLA take all accelerator memory.
MEM_FRACTION_DEFAULT = "1.00"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (exit 2), like every other user error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


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


def run_cli(parser, argv, work):
    """Parses `argv` and runs `work(args)`; returns the process exit code.

    A `UserError` prints as one line and exits with its `exit_code` (2 unless
    the error class says otherwise); Ctrl-C exits with 130.

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
        return work(args) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def load_model(config, adapter=None):
    """Builds the config's CausalLM under its distribution and loads an adapter.

    The adapter file is read before the model is built, and its preset, rank and
    targets are checked against the model (`keras_tune.lora.load_adapter`):
    another preset's adapter is refused whole.

    Args:
        config: a validated run config.
        adapter: path of an adapter `.npz`, or None.

    Returns:
        `(causal_lm, adapter_metadata or None)`.
    """
    import keras

    from keras_tune.distribution import plan_sharding
    from keras_tune.lora import load_adapter, read_adapter
    from keras_tune.models.loader import abstract_model, load_causal_lm

    if adapter:
        read_adapter(adapter)  # an unreadable file fails before the model is built
    plan = plan_sharding(config, abstract_model(config, lora=False).weights)
    keras.config.set_dtype_policy(config.train.precision)
    keras.distribution.set_distribution(plan.distribution())
    keras.utils.set_random_seed(config.train.seed)
    causal_lm = load_causal_lm(config)
    metadata = load_adapter(causal_lm, adapter, preset=config.preset) if adapter else None
    return causal_lm, metadata

"""`python -m keras_tune.fit`: LoRA fine-tuning of a Gemma preset, end to end.

The whole training path reads top to bottom in `run()`: config -> sharding plan
-> model under the distribution -> LoRA -> data -> optimizer -> keras `fit` ->
run directory. The CLI only turns flags into config fields; a notebook calls the
same functions (`keras_tune.run(keras_tune.load_config(...))`).

Examples:

```
python -m keras_tune.fit                                               # offline Gemma 3 270M
python -m keras_tune.fit --preset gemma_7b_en --lora-rank 4 --mesh 1x8   # Kaggle TPU v3-8
python -m keras_tune.fit --preset gemma2_9b_en --mesh 2x4 --layout gemma2_fsdp
python -m keras_tune.fit --preset gemma_7b_en --mesh 1x8 --simulate-devices 8 --dry-run
```
"""

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time

from keras_tune import config as config_lib
from keras_tune.errors import UserError

# flag, config field, type, help. Every flag is a config field; `--set` reaches the rest.
FLAGS = (
    ("--lora-rank", "lora.rank", int, "LoRA rank; 0 = full fine-tuning"),
    ("--lora-targets", "lora.targets", str, "comma list of layers: query,key,value,attention_output,ffw_gating,ffw_gating_2,ffw_linear"),
    ("--lora-alpha", "lora.alpha", float, "LoRA alpha (update scaled by alpha/rank); 0 = rank"),
    ("--mesh", "distribution.mesh", str, "device mesh BxM (batch x model), e.g. 1x8, 2x4, 8x1; 'auto' = 1xN"),
    ("--layout", "distribution.layout", str, "layout name (see layouts/) or path to a layout .json"),
    ("--simulate-devices", "distribution.simulate_devices", int, "CPU only: expose N host devices to try any mesh"),
    ("--weights", "model.weights", str, "a Gemma 3 .gguf file to import instead of the preset's weights"),
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
    ("--output-dir", "train.output_dir", str, "run directory (default runs/<preset>-<time>)"),
    ("--seed", "train.seed", int, "random seed for init, data order and sampling"),
    ("--precision", "train.precision", str, "float32, mixed_bfloat16 or bfloat16"),
    ("--eval-every", "train.eval_every", int, "validate every N steps (0 = at the end)"),
    ("--eval-steps", "train.eval_steps", int, "validation batches per evaluation (0 = all)"),
)


def build_parser():
    """The argparse parser: one flag per config field, plus actions."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_tune.fit",
        description="LoRA fine-tuning of Gemma-family models with Keras 3 + keras-hub on a device mesh.",
    )
    parser.add_argument("--preset", help=f"preset name (default {config_lib.DEFAULT_PRESET}; see --list-presets)")
    parser.add_argument("--config", help="a copied and edited presets/*.py file to use instead of --preset")
    for flag, field, kind, text in FLAGS:
        parser.add_argument(flag, dest=field, type=kind, default=None, help=text, metavar=field.split(".")[-1].upper())
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any config field, e.g. --set optimizer.beta_2=0.95")
    parser.add_argument("--show-sharding", action="store_true", default=None, dest="run.show_sharding", help="print the sharding table")
    parser.add_argument("--dry-run", action="store_true", default=None, dest="run.dry_run", help="plan only: shapes, sharding and memory, no weights")
    parser.add_argument("--list-presets", action="store_true", help="list presets with parameter counts and exit")
    return parser


def overrides_from_args(args):
    """Collects the flags that were given into dotted config overrides."""
    overrides = {}
    for flag, field, _, _ in FLAGS:
        value = getattr(args, field)
        if value is not None:
            overrides[field] = value
    for field in ("run.show_sharding", "run.dry_run"):
        if getattr(args, field):
            overrides[field] = True
    if args.__dict__.get("model.weights"):
        overrides["model.source"] = "gguf"
        overrides["model.family"] = "gemma3"
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item}: expected FIELD=VALUE, e.g. --set optimizer.beta_2=0.95")
        overrides[field] = value
    return overrides


def list_presets_table():
    """Table of every shipped preset with its parameter count (planned, no download)."""
    from keras_tune.models.loader import abstract_model, count_parameters

    lines = [f"{'preset':<28} {'family':<7} {'source':<7} {'parameters':>15}  description"]
    for name in config_lib.list_presets():
        config = config_lib.load_config(name)
        try:
            count = f"{count_parameters(abstract_model(config, lora=False).weights):,}"
        except UserError as error:  # e.g. the registry package is not installed
            count = f"? ({error})"
        lines.append(f"{name:<28} {config.model.family:<7} {config.model.source:<7} {count:>15}  {config.description}")
    return "\n".join(lines)


@contextlib.contextmanager
def detached_preprocessor(causal_lm):
    """Runs `fit`/`evaluate` on already-tokenized batches, then restores the preprocessor."""
    preprocessor = causal_lm.preprocessor
    causal_lm.preprocessor = None
    try:
        yield causal_lm
    finally:
        causal_lm.preprocessor = preprocessor


@dataclasses.dataclass
class RunResult:
    """What `run` leaves behind."""

    output_dir: str
    plan: object
    causal_lm: object = None
    history: dict = None
    trainable: dict = None


def default_output_dir(config):
    return os.path.join("runs", f"{config.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}")


def run(config, devices=None, callbacks=()):
    """Trains as the config says; returns the run's result.

    Args:
        config: a validated run config (`keras_tune.load_config`).
        devices: devices for the mesh; defaults to all JAX devices.
        callbacks: extra keras callbacks.
    """
    import keras

    from keras_tune.distribution import format_bytes, plan_sharding
    from keras_tune.lora import apply_lora, format_report, save_adapter, trainable_report
    from keras_tune.models.loader import abstract_model, check_source, load_causal_lm
    from keras_tune.optim import build_optimizer, optimizer_slots

    train = config.train
    # 1. Plan on shapes only: mesh, layout and memory are checked before any weight exists.
    abstract = abstract_model(config)
    plan = plan_sharding(config, abstract.weights, devices=devices)
    planned = trainable_report(abstract)
    print(f"preset {config.preset}: {format_report(planned)}")
    print(f"mesh {plan.mesh.shape} over {len(plan.mesh.devices.flatten())} devices, layout {plan.layout.name}")
    if config.run.show_sharding or config.run.dry_run:
        print(plan.table())
    if config.run.dry_run:
        memory = plan.memory(optimizer_slots(config.optimizer))
        print(
            "per device: base weights {frozen}, trainable weights {trainable}, optimizer state {optimizer} "
            "(of which replicated {replicated})".format(**{k: format_bytes(v) for k, v in memory.items()})
        )
        return RunResult(output_dir="", plan=plan, trainable=planned)
    check_source(config)

    output_dir = train.output_dir or default_output_dir(config)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.json"), "w") as file:
        file.write(config_lib.to_json(config))

    # 2. Build the model inside the distribution, then toggle LoRA.
    keras.utils.set_random_seed(train.seed)
    keras.config.set_dtype_policy(train.precision)
    keras.distribution.set_distribution(plan.distribution())
    started = time.time()
    causal_lm = load_causal_lm(config)
    apply_lora(causal_lm, config.lora.rank, config.lora.targets, config.lora.alpha)
    trainable = trainable_report(causal_lm)
    print(f"model built in {time.time() - started:.1f}s: {format_report(trainable)}")

    # 3. Data through the shared module, tokenized by this model's tokenizer.
    from keras_tune.data import make_datasets

    data = make_datasets(config.data, causal_lm.preprocessor.tokenizer, seed=train.seed)
    print(data.report.summary())
    if train.steps:
        total_steps = train.steps
    elif data.steps_per_epoch:
        total_steps = data.steps_per_epoch * train.epochs
    else:
        raise UserError("the data set's length is unknown; pass --steps N")
    # Keras epochs double as evaluation points: one "epoch" per --eval-every steps.
    steps_per_epoch = min(train.eval_every or total_steps, total_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)

    # 4. Optimizer and keras fit.
    optimizer = build_optimizer(config.optimizer, total_steps)
    causal_lm.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    validation_steps = train.eval_steps or None
    run_callbacks = [keras.callbacks.CSVLogger(os.path.join(output_dir, "metrics.csv")), *callbacks]
    with detached_preprocessor(causal_lm):
        if data.validation is not None:
            before = causal_lm.evaluate(data.validation, steps=validation_steps, verbose=0, return_dict=True)
            print(f"validation before training: loss {before['loss']:.4f}, perplexity {math.exp(before['loss']):.2f}")
        history = causal_lm.fit(
            data.train.repeat(),
            validation_data=data.validation,
            validation_steps=validation_steps,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=run_callbacks,
            verbose=1 if sys.stdout.isatty() else 2,
        )
    history = history.history
    if "val_loss" in history:
        print(f"validation after training: loss {history['val_loss'][-1]:.4f}, perplexity {math.exp(history['val_loss'][-1]):.2f}")

    # 5. What the run leaves: adapter (or full weights) and a summary.
    if config.lora.rank:
        save_adapter(causal_lm, os.path.join(output_dir, "adapter.npz"), preset=config.preset)
    else:
        causal_lm.save_weights(os.path.join(output_dir, "model.weights.h5"))
    print(f"run directory: {output_dir}")
    return RunResult(output_dir=output_dir, plan=plan, causal_lm=causal_lm, history=history, trainable=trainable)


def main(argv=None):
    """CLI entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = overrides_from_args(args)
        # Devices must be simulated before anything starts JAX.
        if overrides.get("distribution.simulate_devices"):
            from keras_tune.distribution import simulate_devices

            simulate_devices(overrides["distribution.simulate_devices"])
        if args.list_presets:
            print(list_presets_table())
            return 0
        config = config_lib.load_config(args.preset, config_file=args.config, overrides=overrides)
        run(config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m keras_tune.fit`: LoRA fine-tuning of a Gemma preset, end to end.

The whole training path reads top to bottom in `run()`: config -> sharding plan
-> model under the distribution -> LoRA -> data -> optimizer -> keras `fit` ->
run directory. The CLI only turns flags into config fields; a notebook calls the
same functions (`keras_tune.run(keras_tune.load_config(...))`).

A run directory holds `config.json`, `metrics.csv` (a row a step, validation
columns where an evaluation ran), `tensorboard/`, `samples.txt`, `loss.png`,
`checkpoints/` (Orbax) and `adapter.npz` (or `model.weights.h5` when
`--lora-rank 0`). Running again into a directory that holds checkpoints
continues from the newest good one: the same final weights and metrics as a run
that was never interrupted.

Examples:

```
python -m keras_tune.fit                                               # offline Gemma 3 270M
python -m keras_tune.fit --preset gemma_7b_en --lora-rank 4 --mesh 1x8   # Kaggle TPU v3-8
python -m keras_tune.fit --preset gemma2_9b_en --mesh 2x4 --layout gemma2_fsdp
python -m keras_tune.fit --preset gemma_7b_en --mesh 1x8 --simulate-devices 8 --dry-run
python -m keras_tune.fit --output-dir runs/mine --save-every 50     # killed? the same line continues it
python -m keras_tune.fit --preset gemma_tiny --resume                  # continue the newest runs/gemma_tiny-*
```

Exit codes: 0 done, 2 a user error (one `error:` line on stderr), 3 the loss
became NaN/inf (the last good checkpoint is kept), 130 interrupted.
"""

import contextlib
import dataclasses
import glob
import json
import math
import os
import shutil
import sys
import time

from keras_tune import config as config_lib
from keras_tune.cli import ArgumentParser, parse_set_flags, run_cli
from keras_tune.errors import UserError

# flag, config field, type, help. Every flag is a config field; `--set` reaches the rest.
# A `bool` type is a switch; a `list` type is a repeatable flag.
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
    ("--output-dir", "train.output_dir", str, "run directory (default runs/<preset>-<time>); one with checkpoints is continued"),
    ("--seed", "train.seed", int, "random seed for init, data order and sampling"),
    ("--precision", "train.precision", str, "float32, mixed_bfloat16 (train on GPU/TPU) or bfloat16 (inference)"),
    ("--eval-every", "train.eval_every", int, "validate every N steps (0 = at the end); also once before training"),
    ("--eval-steps", "train.eval_steps", int, "validation batches per evaluation (0 = all)"),
    ("--save-every", "train.save_every", int, "Orbax checkpoint every N steps (0 = at the end only)"),
    ("--keep-checkpoints", "train.keep_checkpoints", int, "checkpoints kept; older ones are deleted"),
    ("--resume", "train.resume", bool, "continue from the newest checkpoint of --output-dir (default: the newest runs/<preset>-*)"),
    ("--sample-prompt", "train.sample_prompts", list, "prompt to generate from before/after training and every --sample-every steps (repeatable)"),
    ("--sample-every", "train.sample_every", int, "generate samples every N steps (0 = before and after only)"),
    ("--sample-max-length", "train.sample_max_length", int, "prompt + generated tokens of a sample"),
    ("--peak-tflops", "train.peak_tflops", float, "peak TFLOP/s of one device for the MFU estimate (0 = from the device table)"),
)


class LossNotFinite(UserError):
    """The training loss became NaN or infinite; the run stopped (the CLI exits with 3)."""

    exit_code = 3


def build_parser():
    """The argparse parser: one flag per config field, plus actions."""
    parser = ArgumentParser(
        prog="python -m keras_tune.fit",
        description="LoRA fine-tuning of Gemma-family models with Keras 3 + keras-hub on a device mesh.",
    )
    parser.add_argument("--preset", help=f"preset name (default {config_lib.DEFAULT_PRESET}; see --list-presets)")
    parser.add_argument("--config", help="a copied and edited presets/*.py file to use instead of --preset")
    for flag, field, kind, text in FLAGS:
        if kind is bool:
            parser.add_argument(flag, dest=field, action="store_true", default=None, help=text)
        elif kind is list:
            parser.add_argument(flag, dest=field, action="append", default=None, help=text, metavar="TEXT")
        else:
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
            overrides[field] = tuple(value) if isinstance(value, list) else value
    for field in ("run.show_sharding", "run.dry_run"):
        if getattr(args, field):
            overrides[field] = True
    if args.__dict__.get("model.weights"):
        overrides["model.source"] = "gguf"
        overrides["model.family"] = "gemma3"
    overrides.update(parse_set_flags(args.set))
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
    initial_step: int = 0
    final_step: int = 0
    validation: dict = None


def default_output_dir(config):
    return os.path.join("runs", f"{config.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_output_dir(config):
    """The run directory: `--output-dir`, else with `--resume` the newest `runs/<preset>-*` holding checkpoints."""
    train = config.train
    if train.output_dir:
        return train.output_dir
    if train.resume:
        pattern = os.path.join("runs", f"{config.preset or 'custom'}-*")
        candidates = [d for d in glob.glob(pattern) if os.path.isdir(os.path.join(d, "checkpoints"))]
        if not candidates:
            raise UserError(
                f"--resume: no run of preset {config.preset} under runs/ holds a checkpoint; "
                "expected --output-dir DIR naming the run to continue"
            )
        return max(candidates, key=os.path.getmtime)
    return default_output_dir(config)


def epoch_plan(total_steps, eval_every=0, save_every=0, initial_step=0):
    """Keras epochs for a run: their length divides every evaluation and checkpoint step.

    Evaluations and checkpoints then happen at epoch ends (after keras has
    validated), and a resumed run starts on an epoch boundary.

    Returns:
        `(steps_per_epoch, epochs, initial_epoch, validation_epochs)`, the last a
        list of 1-based epoch numbers for keras' `validation_freq`.
    """
    period = 0
    for every in (eval_every, save_every, initial_step):
        if every:
            period = math.gcd(period, int(every))
    period = min(period or total_steps, total_steps)
    epochs = math.ceil(total_steps / period)
    validation_epochs = [
        epoch for epoch in range(1, epochs + 1)
        if epoch == epochs or (eval_every and (epoch * period) % eval_every == 0)
    ]
    return period, epochs, initial_step // period, validation_epochs


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "arch":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def changed_settings(saved_config, config):
    """Fields that differ between a checkpoint's config and this run's, as `field old -> new` strings."""
    ignore = ("train.output_dir", "train.resume", "run.")
    old, new = _flatten(saved_config), _flatten(json.loads(config_lib.to_json(config)))
    return [
        f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if not key.startswith(ignore) and old.get(key) != new.get(key)
    ]


def peak_flops(config, devices):
    """`(total peak FLOP/s, per-device TFLOP/s, device kind)` for the MFU estimate (0 when unknown)."""
    from keras_tune.callbacks import peak_tflops_per_device

    kind = getattr(devices[0], "device_kind", str(devices[0]))
    per_device = config.train.peak_tflops or peak_tflops_per_device(kind)
    return per_device * 1e12 * len(devices), per_device, kind


def _write_json(path, text):
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w") as file:
        file.write(text)
    os.replace(partial, path)


def run(config, devices=None, callbacks=()):
    """Trains as the config says; returns the run's result.

    Continues from the newest good checkpoint when the run directory holds one.

    Args:
        config: a validated run config (`keras_tune.load_config`).
        devices: devices for the mesh; defaults to all JAX devices.
        callbacks: extra keras callbacks.

    Raises:
        UserError: bad input, or a checkpoint of another model in the run directory.
        LossNotFinite: the loss became NaN/inf (the last
            good checkpoint is kept, no adapter is written).
    """
    from keras_tune.checkpoint import CheckpointStore, check_identity, checkpoint_identity
    from keras_tune.distribution import format_bytes, plan_sharding
    from keras_tune.lora import format_report, trainable_report
    from keras_tune.models.loader import abstract_model, check_source
    from keras_tune.optim import optimizer_slots

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

    # The run directory; a checkpoint of another model there is refused before any weight exists.
    output_dir = resolve_output_dir(config)
    store = CheckpointStore(output_dir, keep=train.keep_checkpoints)
    try:
        identity = checkpoint_identity(config, plan.layout.name)
        newest_step, newest_meta = store.newest_meta()
        if newest_meta is not None:
            check_identity(newest_meta.get("identity", {}), identity, store.path(newest_step))
        elif train.resume and not store.steps():
            raise UserError(f"--resume: {output_dir} holds no checkpoint; expected the directory of a run that saved one")
        os.makedirs(output_dir, exist_ok=True)
        _write_json(os.path.join(output_dir, "config.json"), config_lib.to_json(config))
        return _train(config, plan, store, identity, output_dir, callbacks)
    finally:
        store.close()


def _train(config, plan, store, identity, output_dir, callbacks):
    """`run` from the model on: build, data, compile, resume, fit, outputs."""
    import keras
    import keras_hub

    from keras_tune import callbacks as cb
    from keras_tune.lora import apply_lora, format_report, save_adapter, trainable_report
    from keras_tune.models.loader import load_causal_lm
    from keras_tune.optim import build_optimizer, learning_rate_schedule

    train = config.train

    # 2. Build the model inside the distribution, then toggle LoRA.
    keras.utils.set_random_seed(train.seed)
    keras.config.set_dtype_policy(train.precision)
    keras.distribution.set_distribution(plan.distribution())
    started = time.time()
    causal_lm = load_causal_lm(config)
    apply_lora(causal_lm, config.lora.rank, config.lora.targets, config.lora.alpha)
    trainable = trainable_report(causal_lm)
    preprocessor = causal_lm.preprocessor
    print(f"model built in {time.time() - started:.1f}s: {format_report(trainable)}")

    # 3. Data through the shared module, tokenized by this model's tokenizer.
    from keras_tune.data import make_datasets

    data = make_datasets(config.data, preprocessor.tokenizer, seed=train.seed)
    print(data.report.summary())
    if train.steps:
        total_steps = train.steps
    elif data.steps_per_epoch:
        total_steps = data.steps_per_epoch * train.epochs
    else:
        raise UserError("the data set's length is unknown; pass --steps N")

    # 4. Optimizer and compile. The loss is the mean over target tokens (sample
    # weights), so exp(loss) is a perplexity; the perplexity metric is exact over
    # a whole evaluation (token-weighted, not a mean of batch means).
    optimizer = build_optimizer(config.optimizer, total_steps)
    pad_id = int(preprocessor.tokenizer.pad_token_id)
    causal_lm.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras_hub.metrics.Perplexity(from_logits=True, name="perplexity"),
        ],
        metrics=[cb.TokenCount(pad_id), cb.TokenCount(pad_id, non_pad=True)],
        sampler="greedy",
    )
    optimizer.build(causal_lm.trainable_variables)

    # 5. Resume: weights, optimizer state and RNG from the newest good checkpoint;
    # the data stream skips the batches already trained on.
    initial_step = 0
    if store.steps():
        meta = store.restore_latest(causal_lm, identity)
        if meta is not None:
            initial_step = int(meta["step"])
            print(f"resuming from {store.path(initial_step)}: step {initial_step} of {total_steps}, "
                  f"skipping {meta['data_position']} training batches")
            for line in changed_settings(meta.get("config", {}), config):
                print(f"warning: resuming with a changed setting: {line}", file=sys.stderr)
    metrics_path = os.path.join(output_dir, "metrics.csv")
    samples_path = os.path.join(output_dir, "samples.txt")
    # What a killed run logged after its last checkpoint is logged again below.
    if cb.is_primary():
        cb.truncate_rows(metrics_path, initial_step if initial_step else -1)
        cb.truncate_samples(samples_path, initial_step if initial_step else -1)
        if not initial_step:  # a fresh start: no events from an attempt that saved no checkpoint
            shutil.rmtree(os.path.join(output_dir, "tensorboard"), ignore_errors=True)

    validation_steps = train.eval_steps or None
    before = None
    with detached_preprocessor(causal_lm):
        if data.validation is not None and initial_step == 0:
            before = causal_lm.evaluate(data.validation, steps=validation_steps, verbose=0, return_dict=True)
            cb.log_evaluation(output_dir, 0, before)
            print(f"validation before training: loss {before['loss']:.4f}, perplexity {before['perplexity']:.2f}")

    # 6. keras fit, its epochs cut so evaluations and checkpoints fall on epoch ends.
    progress = cb.Progress(total_steps=total_steps, step=initial_step, initial_step=initial_step)
    history = {}
    if initial_step < total_steps:
        period, epochs, initial_epoch, validation_epochs = epoch_plan(
            total_steps, train.eval_every, train.save_every, initial_step
        )
        mesh_devices = list(plan.mesh.devices.flatten())
        flops = cb.model_flops_per_token(causal_lm.backbone, config.data.seq_len)
        peak, per_device, kind = peak_flops(config, mesh_devices)
        if peak:
            print(f"MFU against {per_device:g} TFLOP/s per device ({kind}) x {len(mesh_devices)}, "
                  f"{flops / 1e9:.3g} GFLOP a token")
        else:
            print(f"MFU not estimated: no peak FLOP/s known for device '{kind}' (pass --peak-tflops)")
        schedule = learning_rate_schedule(config.optimizer, total_steps)
        accumulation = max(1, config.optimizer.accumulation_steps)
        rate_at = cb.learning_rate_at(schedule)
        throughput = cb.Throughput(flops, peak)
        run_callbacks = [
            cb.StepTracker(progress),
            throughput,
            cb.MetricsLog(progress, output_dir, learning_rate=lambda step: rate_at(step // accumulation)),
        ]
        if train.sample_prompts:
            from keras_tune.generate import generate_texts

            chat = bool(config.model.instruct)
            run_callbacks.append(
                cb.Samples(
                    progress, train.sample_prompts, samples_path, every=train.sample_every,
                    generate=lambda model, prompts: generate_texts(
                        model, preprocessor, prompts, train.sample_max_length, chat=chat
                    ),
                )
            )
        config_record = json.loads(config_lib.to_json(config))
        run_callbacks.append(
            cb.Checkpoints(
                progress, store, train.save_every,
                metadata=lambda step, logs: {
                    "identity": identity,
                    "config": config_record,
                    "data_position": step,
                    "total_steps": total_steps,
                    "metrics": {k: v for k, v in logs.items() if isinstance(v, float) and math.isfinite(v)},
                },
            )
        )
        run_callbacks += [*callbacks, throughput.clock()]
        dataset = data.train.repeat()
        if initial_step:
            dataset = dataset.skip(initial_step)
        with detached_preprocessor(causal_lm):
            fitted = causal_lm.fit(
                dataset,
                validation_data=data.validation,
                validation_steps=validation_steps,
                validation_freq=validation_epochs,
                epochs=epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=period,
                shuffle=False,  # the data module shuffles, seeded
                callbacks=run_callbacks,
                verbose=1 if sys.stdout.isatty() else 2,
            )
        history = fitted.history
    else:
        print(f"{output_dir} is already trained to step {initial_step} (of {total_steps}); nothing to train")
    store.wait()

    # 7. What the run leaves: the loss picture, adapter (or full weights) and a summary.
    if cb.is_primary():
        cb.plot_losses(metrics_path, os.path.join(output_dir, "loss.png"), title=f"{config.preset}: loss")
    if progress.diverged:
        steps = store.steps()
        kept = f"{store.path(steps[-1])} (step {steps[-1]})" if steps else "none was written yet"
        raise LossNotFinite(
            f"the training loss became {progress.nonfinite_loss} at step {progress.nonfinite_step}; stopped. "
            f"Last good checkpoint: {kept}. Lower --learning-rate or check the data, then run again with "
            f"--output-dir {output_dir} to continue from it"
        )
    validation = None
    if "val_loss" in history:
        validation = {"loss": history["val_loss"][-1], "perplexity": history.get("val_perplexity", [math.nan])[-1]}
        print(f"validation after training: loss {validation['loss']:.4f}, perplexity {validation['perplexity']:.2f}")
    if cb.is_primary():
        if config.lora.rank:
            save_adapter(causal_lm, os.path.join(output_dir, "adapter.npz"), preset=config.preset)
        else:
            causal_lm.save_weights(os.path.join(output_dir, "model.weights.h5"))
    print(f"run directory: {output_dir}")
    return RunResult(
        output_dir=output_dir, plan=plan, causal_lm=causal_lm, history=history, trainable=trainable,
        initial_step=initial_step, final_step=progress.step, validation=validation,
    )


def main(argv=None):
    """CLI entry point; returns the process exit code (0 done, 2 bad input, 3 NaN loss, 130 interrupted)."""

    def work(args):
        overrides = overrides_from_args(args)
        # Devices must be simulated before anything starts JAX.
        if overrides.get("distribution.simulate_devices"):
            from keras_tune.distribution import simulate_devices

            simulate_devices(overrides["distribution.simulate_devices"])
        if args.list_presets:
            print(list_presets_table())
            return 0
        run(config_lib.load_config(args.preset, config_file=args.config, overrides=overrides))

    return run_cli(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())

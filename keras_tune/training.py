"""The training path (library code): `run(config)` fine-tunes a Gemma preset end to end.

`run` reads as the path data takes, one named step a function: plan (mesh,
layout, memory on shapes only) -> the run directory -> build the model under
its distribution -> data -> compile -> resume -> keras `fit` with the
callbacks -> finish (loss picture, adapter). A notebook calls the same
functions the command line does (`python -m keras_tune.fit`, `keras_tune/fit.py`,
only turns flags into a config and calls `run`):

```python
import keras_tune
config = keras_tune.load_config("gemma_tiny", overrides={"train.steps": 20})
result = keras_tune.run(config)
print(result.output_dir, result.validation)
```

A run directory holds `config.json`, `metrics.csv`, `tensorboard/`,
`samples.txt`, `loss.png`, `checkpoints/` (Orbax) and `adapter.npz` (or
`model.weights.h5` when `--lora-rank 0`); see `keras_tune.rundir`. Running again
into a directory that holds checkpoints continues from the newest good one:
the same final weights and metrics as a run that was never interrupted.

Examples:

```
python -m keras_tune.fit                                               # offline Gemma 3 270M
python -m keras_tune.fit --preset gemma_7b_en --lora-rank 4 --mesh 1x8   # Kaggle TPU v3-8 / v5e-8
python -m keras_tune.fit --preset gemma2_9b_en --mesh 2x4 --layout gemma2_fsdp
python -m keras_tune.fit --preset gemma_7b_en --mesh 1x8 --simulate-devices 8 --dry-run
python -m keras_tune.fit --output-dir runs/mine --save-every 50     # killed? the same line continues it
python -m keras_tune.fit --preset gemma_tiny --resume                  # continue the newest runs/gemma_tiny-*
```

Exit codes: 0 done, 2 a user error (one `error:` line on stderr), 3 the loss
became NaN/inf (the last good checkpoint is kept), 4 a checkpoint or adapter
could not be written (the previous ones are intact), 130 interrupted, 143
stopped by SIGTERM after writing a checkpoint (rerun to continue).
"""

import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
import shutil
import sys
import time

from keras_tune import config as config_lib
from keras_tune import rundir
from keras_tune.errors import LossNotFinite, UserError, WriteFailed


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


def run(config, devices=None, callbacks=()):
    """Trains as the config says; returns the run's result.

    Continues from the newest good checkpoint when the run directory holds one.

    Args:
        config: a validated run config (`keras_tune.load_config`).
        devices: devices for the mesh; defaults to all JAX devices.
        callbacks: extra keras callbacks.

    Raises:
        UserError: bad input, or a checkpoint of another model in the run directory.
        LossNotFinite: the loss became NaN/inf (the last good checkpoint is
            kept, no adapter is written).
    """
    from keras_tune.checkpoint import CheckpointStore
    from keras_tune.data import check_data
    from keras_tune.models.loader import check_source

    from keras_tune.distribution import start_processes

    output_dir = None if config.run.dry_run else check_output_dir(resolve_output_dir(config))
    start_processes(config)  # before anything touches a device
    plan, planned = plan_run(config, devices)
    if config.run.dry_run:
        return RunResult(output_dir="", plan=plan, trainable=planned)
    check_source(config)
    check_data(config.data)  # a wrong --data-path costs no model load and leaves no run directory
    store = CheckpointStore(output_dir, keep=config.train.keep_checkpoints)
    try:
        identity = prepare_run_dir(config, plan, store, output_dir)
        return train(config, plan, store, identity, output_dir, callbacks)
    finally:
        store.close()


def train(config, plan, store, identity, output_dir, callbacks=()):
    """`run` from the model on: build, data, compile, resume, fit, finish.

    Args:
        config: the validated run config.
        plan: its sharding plan (`plan_run`).
        store: the run's `CheckpointStore`.
        identity: what a checkpoint must match (`checkpoint_identity`).
        output_dir: the run directory (already holding `config.json`).
        callbacks: extra keras callbacks.
    """
    import jax

    from keras_tune.environment import release_freed_memory, release_memory_after_compiles
    from keras_tune.lora import format_report, trainable_report
    from keras_tune.models.loader import build_model

    release_memory_after_compiles()  # the compiler's freed heap is not the training step's
    built = build_model(config, lora=True, plan=plan)
    # Loading and quantizing compiled an executable for every eager op and
    # shape it met (~50 MiB on the 270M with --quantize int8), never run
    # again; dropped before the train step compiles. (Every jitted function in
    # the process recompiles at its next call: in a notebook, once.)
    jax.clear_caches()
    release_freed_memory()
    causal_lm, trainable = built.causal_lm, trainable_report(built.causal_lm)
    print(f"model built in {built.seconds:.1f}s: {format_report(trainable)}")
    data, total_steps = setup_data(config, causal_lm.preprocessor.tokenizer)
    trainer = compile_model(causal_lm, config, total_steps)
    initial_step = resume(trainer, config, store, identity, total_steps)
    restart_logs(output_dir, initial_step)
    evaluate_before(trainer, data, config, output_dir, initial_step)
    progress, history = fit_steps(
        trainer, causal_lm, data, config, plan, store, identity, output_dir, total_steps, initial_step, callbacks
    )
    validation = finish(causal_lm, config, store, output_dir, progress, history)
    return RunResult(
        output_dir=output_dir, plan=plan, causal_lm=causal_lm, history=history, trainable=trainable,
        initial_step=initial_step, final_step=progress.step, validation=validation,
    )


# ---------------------------------------------------------------------------
# 1. Plan on shapes only: mesh, layout and memory are checked before any weight exists.


def plan_run(config, devices=None):
    """Plans the sharding on an abstract model and prints it; with `--dry-run`, the memory too.

    Args:
        config: the validated run config.
        devices: devices for the mesh (default: all).

    Returns:
        `(plan, planned trainable report)`.
    """
    from keras_tune.distribution import format_bytes, plan_sharding
    from keras_tune.lora import format_report, trainable_report
    from keras_tune.models.loader import abstract_model
    from keras_tune.optim import optimizer_slots

    context = trained_context_length(config)
    if config.data.seq_len > context:
        print(f"warning: --seq-len {config.data.seq_len} is beyond the {context} tokens {config.preset} was trained "
              "on; positions past it are untrained extrapolation", file=sys.stderr)
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
        from keras_tune.memory import PLANNED_FAMILIES, format_memory_report, plan_memory

        if config.model.family in PLANNED_FAMILIES:
            print(format_memory_report(plan_memory(config, plan)))
    return plan, planned


# ---------------------------------------------------------------------------
# 2. The run directory.


def default_output_dir(config):
    """`runs/<preset>-<date>-<time>`."""
    return os.path.join("runs", f"{config.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_output_dir(config):
    """The run directory: `--output-dir`, else with `--resume` the newest `runs/<preset>-*` holding checkpoints."""
    train_config = config.train
    if train_config.output_dir:
        return train_config.output_dir
    if train_config.resume:
        pattern = os.path.join("runs", f"{config.preset or 'custom'}-*")
        candidates = [d for d in glob.glob(pattern) if os.path.isdir(os.path.join(d, "checkpoints"))]
        if not candidates:
            raise UserError(
                f"--resume: no run of preset {config.preset} under runs/ holds a checkpoint; "
                "expected --output-dir DIR naming the run to continue"
            )
        return max(candidates, key=os.path.getmtime)
    return default_output_dir(config)


def check_output_dir(output_dir):
    """Refuses a run directory that cannot be written, before anything is built or written.

    Args:
        output_dir: the run directory.

    Returns:
        `output_dir`.
    """
    flag = f"--output-dir {output_dir}"
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"{flag}: is a file; expected a directory (new, or a run to continue)")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):  # the nearest folder that exists must let us create the rest
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag}: cannot create it ({existing} is a file); expected a directory you can write")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: cannot create it ({existing} is not writable); expected a directory you can write")
    return output_dir


def _make_run_dir(output_dir):
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:  # no permission, a read-only disk: what os.access cannot tell root
        raise UserError(f"--output-dir {output_dir}: cannot create it ({error.strerror or error}); "
                        "expected a directory you can write")


def trained_context_length(config):
    """The context length the preset's model was trained at (for the `--seq-len` warning).

    Args:
        config: the run config.
    """
    if config.model.family == "gemma3":
        return 32768 if int(config.model.arch.get("num_layers", 0)) <= 26 else 131072
    return 8192


def prepare_run_dir(config, plan, store, output_dir):
    """Refuses a checkpoint of another model in `output_dir`, then writes `config.json`.

    Returns:
        The checkpoint identity of this run.
    """
    from keras_tune.checkpoint import check_identity, checkpoint_identity

    identity = checkpoint_identity(config, plan.layout.name)
    newest_step, newest_meta = store.newest_meta()
    if newest_meta is not None:
        check_identity(newest_meta.get("identity", {}), identity, store.path(newest_step))
    elif config.train.resume and not store.steps():
        raise UserError(f"--resume: {output_dir} holds no checkpoint; expected the directory of a run that saved one")
    _make_run_dir(output_dir)
    if rundir.is_primary():
        rundir.write_text(os.path.join(output_dir, "config.json"), config_lib.to_json(config))
    return identity


def restart_logs(output_dir, initial_step):
    """Drops what a killed run logged after its last checkpoint; it is logged again."""
    if not rundir.is_primary():
        return
    rundir.truncate_rows(os.path.join(output_dir, "metrics.csv"), initial_step if initial_step else -1)
    rundir.truncate_samples(os.path.join(output_dir, "samples.txt"), initial_step if initial_step else -1)
    if not initial_step:  # a fresh start: no events from an attempt that saved no checkpoint
        shutil.rmtree(os.path.join(output_dir, "tensorboard"), ignore_errors=True)


# ---------------------------------------------------------------------------
# 3. Data, compile, resume.


def setup_data(config, tokenizer):
    """The data set through the shared module, tokenized by the model's tokenizer.

    With the sparse loss, each batch also carries its loss positions (`keras_tune.losses`).

    Returns:
        `(DataBundle, total optimizer steps)`.
    """
    from keras_tune.data import make_datasets
    from keras_tune.losses import loss_positions_layout, with_loss_positions

    data = make_datasets(config.data, tokenizer, seed=config.train.seed)
    print(data.report.summary())
    if config.train.loss == "sparse":  # train, validation and the training stream alike
        layout = loss_positions_layout(data.report.loss_fraction, quantized=bool(config.train.quantize))
        data.map(functools.partial(with_loss_positions, layout=layout))
    if config.train.steps:
        return data, config.train.steps
    if data.steps_per_epoch:
        return data, data.steps_per_epoch * config.train.epochs
    raise UserError("the data set's length is unknown; pass --steps N")


def compile_model(causal_lm, config, total_steps):
    """Compiles the model `fit` runs with the optimizer, the token-mean loss and the metrics.

    The loss is the mean over target tokens (sample weights), so exp(loss) is a
    perplexity; the perplexity metric is exact over a whole evaluation
    (token-weighted, not a mean of batch means). With `train.loss = "sparse"`
    the model fit runs is a `keras_tune.losses.SparseLossModel` around the
    CausalLM (same variables, same figures, logits only where the loss is).

    Returns:
        The model to `fit` and `evaluate`: the CausalLM, or its `SparseLossModel`.
    """
    import keras
    import keras_hub

    from keras_tune import losses
    from keras_tune.metrics import TokenCount
    from keras_tune.optim import build_optimizer

    optimizer = build_optimizer(config.optimizer, total_steps)
    pad_id = int(causal_lm.preprocessor.tokenizer.pad_token_id)
    counts = [TokenCount(pad_id), TokenCount(pad_id, non_pad=True)]
    if config.train.loss == "sparse":
        causal_lm.compile(sampler="greedy")  # for samples; the trainer below does the training
        trainer = losses.SparseLossModel(causal_lm, config.train.loss_chunk_tokens)
        trainer.compile(
            optimizer=optimizer,
            loss=losses.PositionNll(),
            weighted_metrics=[
                keras.metrics.MeanMetricWrapper(losses.position_accuracy, name="accuracy"),
                losses.NllPerplexity(name="perplexity"),
            ],
            metrics=counts,
        )
    else:
        trainer = causal_lm
        causal_lm.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
            weighted_metrics=[
                keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                keras_hub.metrics.Perplexity(from_logits=True, name="perplexity"),
            ],
            metrics=counts,
            sampler="greedy",
        )
    optimizer.build(trainer.trainable_variables)
    return trainer


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


def resume(trainer, config, store, identity, total_steps):
    """Restores weights, optimizer state and RNG from the newest good checkpoint.

    Args:
        trainer: the compiled model `fit` runs (its optimizer is built).
        config: the run config.
        store: the run's `CheckpointStore`.
        identity: what the checkpoint must match.
        total_steps: the run's length, for the message.

    Returns:
        The step to continue from (0 for a fresh run); the training stream starts
        there (`DataBundle.train_stream`), after that many batches.
    """
    if not store.steps():
        return 0
    meta = store.restore_latest(trainer, identity)
    if meta is None:
        return 0
    step = int(meta["step"])
    print(f"resuming from {store.path(step)}: step {step} of {total_steps}, "
          f"skipping {meta['data_position']} training batches")
    for line in changed_settings(meta.get("config", {}), config):
        print(f"warning: resuming with a changed setting: {line}", file=sys.stderr)
    return step


@contextlib.contextmanager
def detached_preprocessor(model):
    """Runs `fit`/`evaluate` on already-tokenized batches, then restores the preprocessor."""
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is None:  # a SparseLossModel, or a CausalLM without one
        yield model
        return
    model.preprocessor = None
    try:
        yield model
    finally:
        model.preprocessor = preprocessor


def evaluate_before(trainer, data, config, output_dir, initial_step):
    """Validates once before a fresh run trains, and logs it as step 0."""
    if data.validation is None or initial_step:
        return None
    with detached_preprocessor(trainer):
        before = trainer.evaluate(data.validation, steps=config.train.eval_steps or None, verbose=0, return_dict=True)
    if rundir.is_primary():
        rundir.log_evaluation(output_dir, 0, before)
    print(f"validation before training: loss {before['loss']:.4f}, perplexity {before['perplexity']:.2f}")
    return before


# ---------------------------------------------------------------------------
# 4. keras fit, its epochs cut so evaluations and checkpoints fall on epoch ends.


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


def training_callbacks(causal_lm, config, plan, store, identity, output_dir, progress, total_steps):
    """The callbacks of a run, in the order they must run (see `keras_tune.callbacks`)."""
    from keras_tune import callbacks as cb
    from keras_tune import flops
    from keras_tune.decoding import generate_texts
    from keras_tune.optim import learning_rate_schedule

    train_config, preprocessor = config.train, causal_lm.preprocessor
    per_token = flops.model_flops_per_token(causal_lm.backbone, config.data.seq_len)
    devices = list(plan.mesh.devices.flatten())
    peak, per_device, kind = flops.peak_flops(devices, train_config.peak_tflops)
    if peak:
        print(f"MFU against {per_device:g} TFLOP/s per device ({kind}) x {len(devices)}, "
              f"{per_token / 1e9:.3g} GFLOP a token")
    else:
        print(f"MFU not estimated: no peak FLOP/s known for device '{kind}' (pass --peak-tflops)")
    rate_at = cb.learning_rate_at(learning_rate_schedule(config.optimizer, total_steps))
    accumulation = max(1, config.optimizer.accumulation_steps)
    throughput = cb.Throughput(per_token, peak)
    metrics_log = cb.MetricsLog(progress, output_dir, learning_rate=lambda step: rate_at(step // accumulation))
    callbacks = [cb.CommittedState(), cb.StepTracker(progress), throughput, metrics_log]
    if train_config.sample_prompts:
        chat = bool(config.model.instruct)
        callbacks.append(cb.Samples(
            progress, train_config.sample_prompts, os.path.join(output_dir, "samples.txt"),
            every=train_config.sample_every,
            # The CausalLM, not the model fit holds: `Samples` reads `self.model` first,
            # which syncs the weights into the variables both share.
            generate=lambda model, prompts: generate_texts(
                causal_lm, preprocessor, prompts, train_config.sample_max_length, chat=chat
            ),
        ))
    config_record = json.loads(config_lib.to_json(config))

    def metadata(step, logs):
        return {
            "identity": identity, "config": config_record, "data_position": step, "total_steps": total_steps,
            "metrics": {k: v for k, v in logs.items() if isinstance(v, float) and math.isfinite(v)},
        }

    def save_now(step, model, logs):
        store.save(step, model, metadata(step, logs))
        store.wait()
        return store.path(step)

    callbacks.append(cb.Checkpoints(progress, store, train_config.save_every, metadata=metadata))
    callbacks.append(cb.Preemption(progress, save_now, before_save=[metrics_log.flush]))
    return callbacks, throughput.clock()


def fit_steps(trainer, causal_lm, data, config, plan, store, identity, output_dir, total_steps, initial_step,
              callbacks=()):
    """Runs keras `fit` on `trainer` from `initial_step` to `total_steps`.

    Returns:
        `(Progress, keras history dict)`.
    """
    from keras_tune.callbacks import Progress

    progress = Progress(total_steps=total_steps, step=initial_step, initial_step=initial_step)
    if initial_step >= total_steps:
        print(f"{output_dir} is already trained to step {initial_step} (of {total_steps}); nothing to train")
        return progress, {}
    period, epochs, initial_epoch, validation_epochs = epoch_plan(
        total_steps, config.train.eval_every, config.train.save_every, initial_step
    )
    ours, clock = training_callbacks(causal_lm, config, plan, store, identity, output_dir, progress, total_steps)
    # Batch s is a function of (seed, s) alone: resumed, the stream goes on where the
    # uninterrupted one is at initial_step, across epoch ends, however many iterators keras makes.
    dataset = data.train_stream(initial_step)
    with detached_preprocessor(trainer):
        fitted = trainer.fit(
            dataset,
            validation_data=data.validation,
            validation_steps=config.train.eval_steps or None,
            validation_freq=validation_epochs,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=period,
            shuffle=False,  # the data module shuffles, seeded
            callbacks=[*ours, *callbacks, clock],  # the clock last: callback work is not step time
            verbose=(1 if sys.stdout.isatty() else 2) if rundir.is_primary() else 0,  # one progress bar
        )
    return progress, fitted.history


# ---------------------------------------------------------------------------
# 5. What the run leaves: the loss picture, the adapter (or full weights).


def finish(causal_lm, config, store, output_dir, progress, history):
    """Waits for checkpoints, draws `loss.png`, stops on divergence, writes the adapter.

    Returns:
        The last validation `{"loss", "perplexity"}`, or None.
    """
    from keras_tune.lora import save_adapter

    store.wait()
    if rundir.is_primary():
        rundir.plot_losses(os.path.join(output_dir, "metrics.csv"), os.path.join(output_dir, "loss.png"),
                           title=f"{config.preset}: loss")
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
    if rundir.is_primary():
        path = os.path.join(output_dir, "adapter.npz" if config.lora.rank else "model.weights.h5")
        try:
            if config.lora.rank:
                save_adapter(causal_lm, path, preset=config.preset)
            else:
                with rundir.atomic_write(path, suffix=".weights.h5") as partial:  # keras wants the suffix
                    causal_lm.save_weights(partial)
        except OSError as error:
            steps = store.steps()
            kept = f"checkpoint {store.path(steps[-1])}" if steps else "no checkpoint"
            raise WriteFailed(f"could not write {path}: {error.strerror or error}; any earlier {os.path.basename(path)} "
                              f"and the {kept} are intact") from None
    print(f"run directory: {output_dir}")
    return validation


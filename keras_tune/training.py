"""The training path (library code): `run(config)` fine-tunes a preset end to end.

`run` reads as the path data takes, one named step a function, each taking the
one `RunState` the steps before it filled in: plan (mesh, layout, memory on
shapes only) -> the run directory -> build the model under its distribution ->
data -> compile -> resume -> keras `fit` with the callbacks -> finish (loss
picture, adapter). A notebook calls the same functions the command line does
(`python -m keras_tune.fit`, `keras_tune/fit.py`, only turns flags into a config
and calls `run`):

```python
import keras_tune
config = keras_tune.load_config("gemma_tiny", overrides={"train.steps": 20})
result = keras_tune.run(config)
print(result.output_dir, result.validation)
```

A run directory holds `config.json`, `metrics.csv`, `tensorboard/`,
`samples.txt`, `loss.png`, `checkpoints/` (Orbax) and `adapter.npz` (or, with
`--lora-rank 0`, the whole model as a keras-hub preset directory `model/`), and with
`--eval-task translation` `translations.jsonl` (chrF and BLEU join the evaluations'
rows); see `keras_tune.rundir`. Running again
into a directory that holds checkpoints continues from the newest good one:
the same final weights and metrics as a run that was never interrupted.
Failures are `keras_tune.errors`' kinds (a `UserError` before anything is
built; `LossNotFinite`, `WriteFailed`, `Preempted` once it runs).
"""

import contextlib
import dataclasses
import json
import math
import os
import sys

from keras_tune import config as config_lib
from keras_tune import rundir
from keras_tune.errors import LossNotFinite, PeerLost, UserError, WriteFailed
from keras_tune.models import families


@dataclasses.dataclass
class RunState:
    """Everything one run is, filled in by its steps in order.

    Attributes:
        config: the validated run config.
        output_dir: the run directory ("" for a dry run).
        callbacks: extra keras callbacks the caller passed.
        plan: the sharding plan (`plan_run`).
        planned: the planned trainable report of the abstract model.
        store: the run's `CheckpointStore`.
        identity: what a checkpoint must match (`checkpoint_identity`).
        causal_lm: the built CausalLM (`build`).
        trainable: its trainable report.
        data: the `DataBundle` (`setup_data`).
        total_steps: optimizer updates of the whole run (what `--steps` counts).
        trainer: the compiled model `fit` runs (`compile_model`).
        initial_step: the batch the run continues from (0 when fresh; a
            checkpoint's data position; with accumulation, updates x batches_per_update).
        progress: the callbacks' shared `Progress` (`fit_steps`).
        history: keras' history dict.
        watchdog: the run's `keras_tune.watchdog.Watchdog` while the loop runs (`guarded`).
        guard: its `SigtermGuard`.
        objective: what the run trains for (`keras_tune.objectives`; `objective_of` makes it).
        task_scores: `(model, step) -> {score: value}` of `--eval-task` (`setup_task`), or None.
    """

    config: object
    output_dir: str = ""
    callbacks: tuple = ()
    plan: object = None
    planned: dict = None
    store: object = None
    identity: dict = None
    causal_lm: object = None
    trainable: dict = None
    data: object = None
    total_steps: int = 0
    trainer: object = None
    initial_step: int = 0
    progress: object = None
    history: dict = dataclasses.field(default_factory=dict)
    watchdog: object = None
    guard: object = None
    objective: object = None
    task_scores: object = None


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
    from keras_tune.distribution import start_processes
    from keras_tune.models.loader import check_source

    state = RunState(config=config, callbacks=tuple(callbacks))
    if not config.run.dry_run:
        state.output_dir = rundir.check_output_dir(rundir.resolve_output_dir(config))
    start_processes(config)  # before anything touches a device
    plan_run(state, devices)
    if config.run.dry_run:
        return RunResult(output_dir="", plan=state.plan, trainable=state.planned)
    check_source(config)
    check_data(config.data)  # a wrong --data-path costs no model load and leaves no run directory
    objective_of(state).check()  # its own inputs too (a teacher's vocabulary, preference pairs)
    state.store = CheckpointStore(state.output_dir, keep=config.train.keep_checkpoints)
    try:
        prepare_run_dir(state)
        return train(state)
    finally:
        state.store.close()


def objective_of(state):
    """The run's objective (`keras_tune.objectives`), made once from its config.

    Args:
        state: the run's `RunState`.
    """
    if state.objective is None:
        from keras_tune import objectives

        state.objective = objectives.get(state.config)
    return state.objective


def train(state):
    """`run` from the model on: build, data, compile, resume, fit, finish.

    Args:
        state: a `RunState` with its plan, store, identity and run directory.
    """
    build(state)
    setup_data(state)
    setup_task(state)
    compile_model(state)
    resume(state)
    restart_logs(state)
    with guarded(state):  # from here on the processes meet in collectives: no silent hang
        evaluate_before(state)
        fit_steps(state)
    validation = finish(state)
    return RunResult(
        output_dir=state.output_dir, plan=state.plan, causal_lm=state.causal_lm, history=state.history,
        trainable=state.trainable, initial_step=state.initial_step // _batches_per_update(state.config),
        final_step=state.progress.update,
        validation=validation,
    )


# ---------------------------------------------------------------------------
# 1. Plan on shapes only: mesh, layout and memory are checked before any weight exists.


def plan_run(state, devices=None):
    """Plans the sharding on an abstract model and prints it; with `--dry-run`, the memory too.

    Args:
        state: the run's `RunState` (its `plan` and `planned` are set here).
        devices: devices for the mesh (default: all).
    """
    from keras_tune.distribution import format_bytes, plan_sharding
    from keras_tune.lora import format_report, trainable_report
    from keras_tune.memory.figures import covers
    from keras_tune.memory.plan import format_memory_report, plan_memory
    from keras_tune.models.loader import abstract_model
    from keras_tune.optim import optimizer_slots

    config = state.config
    context = trained_context_length(config)
    if config.data.seq_len > context:
        print(f"warning: --seq-len {config.data.seq_len} is beyond the {context} tokens {config.preset} was trained "
              "on; positions past it are untrained extrapolation", file=sys.stderr)
    abstract = abstract_model(config)
    plan = state.plan = plan_sharding(config, abstract.weights, devices=devices)
    state.planned = trainable_report(abstract)
    print(f"preset {config.preset}: {format_report(state.planned)}")
    print(f"mesh {plan.mesh.shape} over {len(plan.mesh.devices.flatten())} devices, layout {plan.layout.name}")
    objective_of(state).plan(plan)  # a teacher on the same mesh, say
    if config.run.show_sharding or config.run.dry_run:
        print(plan.table())
    if config.run.dry_run:
        memory = plan.memory(optimizer_slots(config.optimizer))
        print(
            "per device: base weights {frozen}, trainable weights {trainable}, optimizer state {optimizer}; "
            "weights held whole on every device {replicated}".format(**{k: format_bytes(v) for k, v in memory.items()})
        )
        if covers(families.get(config.model.family)):  # else the sharding figures above are the plan
            print(format_memory_report(plan_memory(config, plan)))


def trained_context_length(config):
    """The context length the preset's model was trained at (for the `--seq-len` warning).

    Args:
        config: the run config.
    """
    family = families.get(config.model.family)
    return family.context_length(family.backbone_kwargs(config))


# ---------------------------------------------------------------------------
# 2. The run directory.


def prepare_run_dir(state):
    """Refuses a checkpoint of another model in the run directory, then writes `config.json`.

    Args:
        state: the run's `RunState` (its `identity` is set here).
    """
    from keras_tune.checkpoint import check_identity, checkpoint_identity

    config, store = state.config, state.store
    state.identity = checkpoint_identity(config, state.plan.layout.name)
    newest_step, newest_meta = store.newest_meta()
    if newest_meta is not None:
        check_identity(newest_meta.get("identity", {}), state.identity, store.path(newest_step))
    elif config.train.resume and not store.steps():
        raise UserError(f"--resume: {state.output_dir} holds no checkpoint; "
                        "expected the directory of a run that saved one")
    rundir.make_run_dir(state.output_dir)
    if rundir.is_primary():
        rundir.write_text(os.path.join(state.output_dir, "config.json"), config_lib.to_json(config))


def restart_logs(state):
    """Drops what a killed run logged after its last checkpoint; it is logged again.

    Args:
        state: the run's `RunState` (after `resume`).
    """
    if not rundir.is_primary():
        return
    last = state.initial_step // _batches_per_update(state.config) if state.initial_step else -1
    rundir.truncate_rows(os.path.join(state.output_dir, "metrics.csv"), last)
    rundir.truncate_samples(os.path.join(state.output_dir, "samples.txt"), last)
    _truncate_translations(os.path.join(state.output_dir, "translations.jsonl"), last)
    if not state.initial_step:  # a fresh start: no events from an attempt that saved no checkpoint
        import shutil

        shutil.rmtree(os.path.join(state.output_dir, "tensorboard"), ignore_errors=True)
        # Nor its metrics.csv header: this attempt's columns (objective, --eval-task) may differ.
        metrics = os.path.join(state.output_dir, "metrics.csv")
        if os.path.exists(metrics) and not rundir.read_rows(metrics):
            os.remove(metrics)


def _truncate_translations(path, last_step):
    """Drops the `translations.jsonl` lines of evaluations after `last_step` (a killed run's; they are made again)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines):
        rundir.write_text(path, "".join(line + "\n" for line in kept))


@contextlib.contextmanager
def guarded(state):
    """Runs the training loop under a watchdog and a SIGTERM guard (`keras_tune.watchdog`).

    Args:
        state: the run's `RunState` (its `watchdog` and `guard` are set inside).
    """
    from keras_tune.watchdog import SigtermGuard, Watchdog, process_label

    train_config, label = state.config.train, process_label()
    store = state.store

    def last_checkpoint():
        steps = store.steps()
        return f"checkpoint {store.path(steps[-1])}" if steps else "the start (no checkpoint yet)"

    with Watchdog(train_config.step_timeout, train_config.compile_timeout, label) as state.watchdog, \
            SigtermGuard(train_config.sigterm_grace, label, last_checkpoint) as state.guard:
        try:
            yield state
        except Exception as error:
            if not _collective_failed(error):
                raise
            raise PeerLost(f"{label} lost a peer {state.watchdog.phase}: {_first_line(error)}; "
                           f"a rerun continues from {last_checkpoint()}") from None


def _collective_failed(error):
    """Whether an error from the loop is a collective that failed across processes (a peer gone)."""
    import jax

    return jax.process_count() > 1 and type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError")


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------------------
# 3. The model, the data, compile, resume.


def build(state):
    """Builds the model under the plan's distribution, with LoRA as the config asks.

    Args:
        state: the run's `RunState` (its `causal_lm` and `trainable` are set here).
    """
    import jax

    from keras_tune.environment import release_freed_memory, release_memory_after_compiles
    from keras_tune.lora import format_report, trainable_report
    from keras_tune.models.loader import build_model

    release_memory_after_compiles()  # the compiler's freed heap is not the training step's
    built = build_model(state.config, lora=True, plan=state.plan)
    # Loading and quantizing compiled an executable for every eager op and
    # shape it met, never run again; dropped before the train step compiles.
    # (Every jitted function in the process recompiles at its next call: in a notebook, once.)
    jax.clear_caches()
    release_freed_memory()
    state.causal_lm, state.trainable = built.causal_lm, trainable_report(built.causal_lm)
    print(f"model built in {built.seconds:.1f}s: {format_report(state.trainable)}")
    objective_of(state).build(state.causal_lm, state.plan)  # a distillation's teacher, on the same mesh


def setup_data(state):
    """The data set through the shared module, tokenized by the model's tokenizer; the run's length.

    With the sparse loss, each batch also carries its loss positions (`keras_tune.losses`).

    Args:
        state: the run's `RunState` with its model (its `data` and `total_steps` are set here).
    """
    config, objective = state.config, objective_of(state)
    state.data = objective.datasets(state.causal_lm.preprocessor.tokenizer, config.train.seed)
    print(state.data.report.summary())
    objective.prepare(state.data)  # the loss positions: train, validation and the training stream alike
    state.total_steps = run_length(config, state.data.steps_per_epoch)


# The scores each `--eval-task` adds to an evaluation (metrics.csv's `val_<score>` columns).
TASK_SCORES = {"": (), "translation": ("chrf", "bleu")}


def setup_task(state):
    """The scorer of `--eval-task translation`: greedy translations of the first held-out pairs, chrF and BLEU.

    At each evaluation it translates the first `train.eval_task_examples` pairs
    of the recipe's held-out split (prompt + translation at most `--seq-len`
    tokens), appends them to `translations.jsonl` (one `{"step", "prompt",
    "reference", "hypothesis"}` a line) and returns sacrebleu's corpus chrF and
    BLEU of exactly those hypotheses (`keras_tune.translation`).

    Args:
        state: the run's `RunState` with its model and data (its `task_scores` is set here).
    """
    config = state.config
    if not config.train.eval_task:
        return
    from keras_tune.translation import translation_examples, translation_scores

    causal_lm = state.causal_lm
    preprocessor = causal_lm.preprocessor  # kept: fit detaches it from the model while it runs
    examples, where = translation_examples(config.data, preprocessor.tokenizer, seed=config.train.seed)
    examples = examples[: config.train.eval_task_examples]
    print(f"--eval-task translation: {len(examples)} held-out pairs ({where}) translated greedily at each evaluation")
    path = os.path.join(state.output_dir, "translations.jsonl")

    def score(model, step):
        # `model` is what fit holds: the caller read it, which synced its weights into `causal_lm`.
        scores = translation_scores(causal_lm, examples, config.data.seq_len, batch_size=min(8, len(examples)),
                                    preprocessor=preprocessor)
        if rundir.is_primary():
            rundir.append_text(path, "".join(
                json.dumps({"step": step, "prompt": prompt, "reference": reference, "hypothesis": hypothesis},
                           ensure_ascii=False) + "\n"
                for (prompt, reference), hypothesis in zip(examples, scores["hypotheses"])))
        return {name: scores[name] for name in TASK_SCORES["translation"]}

    state.task_scores = score


def _describe_scores(results, names):
    """`chrF 41.20, BLEU 12.03`: a task's scores in a results dict, in words."""
    labels = {"chrf": "chrF", "bleu": "BLEU"}
    return ", ".join(f"{labels.get(name, name)} {results[name]:.2f}" for name in names if name in results)


def _batches_per_update(config):
    return max(1, int(config.optimizer.accumulation_steps))


def run_length(config, batches_per_epoch):
    """Optimizer updates the run makes, said in one line: `--steps`, else `--epochs` passes over the data.

    Args:
        config: the run config.
        batches_per_epoch: training batches in one pass over the data (0 or None: unknown).

    Returns:
        The number of optimizer updates.
    """
    per_update = _batches_per_update(config)
    if config.train.steps:
        updates = int(config.train.steps)
    elif batches_per_epoch:
        updates = batches_per_epoch * config.train.epochs // per_update
        if not updates:
            raise UserError(f"--epochs {config.train.epochs} of {batches_per_epoch} batches make no optimizer update "
                            f"of {per_update} batches; expected more data, more --epochs or fewer --accumulation-steps")
    else:
        raise UserError("the data set's length is unknown; pass --steps N")
    batches = updates * per_update
    passes = f", {batches / batches_per_epoch:.3g} passes over the data" if batches_per_epoch else ""
    accumulated = f" of {per_update} batches each ({batches} batches)" if per_update > 1 else ""
    print(f"training: {updates} optimizer updates{accumulated}{passes}")
    return updates


def compile_model(state):
    """Compiles the model `fit` runs: the optimizer over the run's length, the loss and metrics.

    Args:
        state: the run's `RunState` with its model and length (its `trainer` is set here).
    """
    from keras_tune.optim import build_optimizer

    optimizer = build_optimizer(state.config.optimizer, state.total_steps)
    state.trainer = objective_of(state).compile(state.causal_lm, optimizer)


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
    """Fields that differ between a checkpoint's config and this run's, as `field old -> new` strings.

    Args:
        saved_config: the config dict a checkpoint recorded.
        config: this run's config.
    """
    ignore = ("train.output_dir", "train.resume", "run.")
    old, new = _flatten(saved_config), _flatten(json.loads(config_lib.to_json(config)))
    return [
        f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if not key.startswith(ignore) and old.get(key) != new.get(key)
    ]


def resume(state):
    """Restores weights, optimizer state and RNG from the newest good checkpoint.

    The training stream then starts at the restored step (`DataBundle.train_stream`),
    after that many batches.

    Args:
        state: the run's `RunState` with its compiled trainer (its `initial_step` is set here).
    """
    store = state.store
    state.initial_step = 0
    if not store.steps():
        return
    meta = store.restore_latest(state.trainer, state.identity)
    if meta is None:
        return
    state.initial_step = int(meta["data_position"])
    print(f"resuming from {store.path(int(meta['step']))}: step {int(meta['step'])} of {state.total_steps}, "
          f"skipping {meta['data_position']} training batches")
    for line in changed_settings(meta.get("config", {}), state.config):
        print(f"warning: resuming with a changed setting: {line}", file=sys.stderr)


@contextlib.contextmanager
def detached_preprocessor(model):
    """Runs `fit`/`evaluate` on already-tokenized batches, then restores the preprocessor.

    Args:
        model: the model `fit` runs (a CausalLM, or a `SparseLossModel` that has none).
    """
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is None:  # a SparseLossModel, or a CausalLM without one
        yield model
        return
    model.preprocessor = None
    try:
        yield model
    finally:
        model.preprocessor = preprocessor


def validation_steps(state):
    """Batches an evaluation takes: `--eval-steps`, else the whole split, counted before any step.

    Every process evaluates exactly this many global batches: Keras gives each
    its share of every batch, and a count fixed in advance ends the loop on
    every process at the same step (no process may stop at its data's end
    while another waits for it in a collective).

    Args:
        state: the run's `RunState` with its data.
    """
    known, asked = state.data.validation_steps, state.config.train.eval_steps
    if not known:  # a bundle made by hand: its length is not known in advance
        return asked or None
    return min(asked, known) if asked else known


def evaluate_before(state):
    """Validates once before a fresh run trains, and logs it as step 0.

    Args:
        state: the run's `RunState`, compiled and resumed.

    Returns:
        Keras' results dict, or None when there is nothing to do.
    """
    from keras_tune.callbacks import Heartbeat

    data = state.data
    if data.validation is None or state.initial_step:
        return None
    heartbeat = [Heartbeat(state.watchdog)] if state.watchdog is not None else []
    with detached_preprocessor(state.trainer):
        before = state.trainer.evaluate(data.validation, steps=validation_steps(state), verbose=0,
                                        return_dict=True, callbacks=heartbeat)
    objective, scores = objective_of(state), TASK_SCORES[state.config.train.eval_task]
    if state.task_scores is not None:
        before.update(state.task_scores(state.trainer, 0))
    if rundir.is_primary():
        if scores:  # the header first: the task's columns are no objective's
            from keras_tune.callbacks import metrics_header

            rundir.append_rows(os.path.join(state.output_dir, "metrics.csv"), [],
                               columns=metrics_header(objective.columns, scores))
        rundir.log_evaluation(state.output_dir, 0, before, columns=tuple(objective.columns) + scores)
    print(f"validation before training: {objective.describe(before)}")
    if scores:
        print(f"{state.config.train.eval_task} before training: {_describe_scores(before, scores)}")
    return before


# ---------------------------------------------------------------------------
# 4. keras fit, its epochs cut so evaluations and checkpoints fall on epoch ends.


def epoch_plan(total_steps, eval_every=0, save_every=0, initial_step=0):
    """Keras epochs for a run: their length divides every evaluation and checkpoint step.

    Evaluations and checkpoints then happen at epoch ends (after keras has
    validated), and a resumed run starts on an epoch boundary.

    Args:
        total_steps: optimizer steps of the whole run.
        eval_every: steps between evaluations (0: at the end only).
        save_every: steps between checkpoints (0: at the end only).
        initial_step: the step a resumed run starts from.

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


def _mfu_estimate(state):
    """`(FLOPs a token, peak FLOP/s of the mesh)`, said in one line (0 peak: unknown device)."""
    from keras_tune import flops

    per_token = flops.model_flops_per_token(state.causal_lm.backbone, state.config.data.seq_len)
    devices = list(state.plan.mesh.devices.flatten())
    peak, per_device, kind = flops.peak_flops(devices, state.config.train.peak_tflops)
    if peak:
        print(f"MFU against {per_device:g} TFLOP/s per device ({kind}) x {len(devices)}, "
              f"{per_token / 1e9:.3g} GFLOP a token")
    else:
        print(f"MFU not estimated: no peak FLOP/s known for device '{kind}' (pass --peak-tflops)")
    return per_token, peak


def _samples(state):
    """The `Samples` callback for `--sample-prompt`, or None."""
    from keras_tune import callbacks as cb
    from keras_tune.decoding import generate_texts

    train_config, causal_lm = state.config.train, state.causal_lm
    if not train_config.sample_prompts:
        return None
    from keras_tune.data import prompt_format

    chat = (train_config.sample_format or prompt_format(state.config.data)) == "chat"
    preprocessor = causal_lm.preprocessor
    return cb.Samples(
        state.progress, train_config.sample_prompts, os.path.join(state.output_dir, "samples.txt"),
        every=train_config.sample_every,
        # The CausalLM, not the model fit holds: `Samples` reads `self.model` first,
        # which syncs the weights into the variables both share.
        generate=lambda model, prompts: generate_texts(
            causal_lm, preprocessor, prompts, train_config.sample_max_length, chat=chat
        ),
    )


def checkpoint_metadata(state):
    """`(progress, logs) -> the record a checkpoint keeps beside the arrays` (its data position: batches).

    Args:
        state: the run's `RunState`.
    """
    config_record = json.loads(config_lib.to_json(state.config))

    def metadata(progress, logs):
        return {
            "identity": state.identity, "config": config_record, "data_position": progress.step,
            "total_steps": state.total_steps,
            "metrics": {k: v for k, v in logs.items() if isinstance(v, float) and math.isfinite(v)},
        }

    return metadata


def training_callbacks(state):
    """The callbacks of a run, in the order they must run (see `keras_tune.callbacks`), and the step clock.

    Args:
        state: the run's `RunState` with its `progress`.

    Returns:
        `(callbacks, clock)`: the clock goes last, so callback work is not step time.
    """
    from keras_tune import callbacks as cb
    from keras_tune.optim import learning_rate_schedule

    config, store, progress = state.config, state.store, state.progress
    per_token, peak = _mfu_estimate(state)
    rate_at = cb.learning_rate_at(learning_rate_schedule(config.optimizer, state.total_steps))
    throughput = cb.Throughput(per_token, peak)
    metrics_log = cb.MetricsLog(progress, state.output_dir, learning_rate=rate_at,
                                every_seconds=config.train.log_every_seconds, columns=objective_of(state).columns,
                                scores=TASK_SCORES[config.train.eval_task])
    loss_scaled = config.train.precision == "mixed_float16"
    callbacks = [cb.CommittedState(), cb.StepTracker(progress, loss_scaled=loss_scaled), throughput, metrics_log]
    if state.task_scores is not None:  # before MetricsLog: it writes the figures this adds to the logs
        callbacks.insert(callbacks.index(metrics_log), cb.TaskScores(progress, state.task_scores))
    if state.watchdog is not None:
        callbacks.insert(0, cb.Heartbeat(state.watchdog, progress))
    samples = _samples(state)
    if samples is not None:
        callbacks.append(samples)
    metadata = checkpoint_metadata(state)

    def save_now(progress, model, logs):
        store.save(progress.update, model, metadata(progress, logs))
        store.wait()
        return store.path(progress.update)

    callbacks.append(cb.Checkpoints(progress, store, config.train.save_every, metadata=metadata))
    if state.guard is not None:
        callbacks.append(cb.Preemption(progress, save_now, state.guard, before_save=[metrics_log.flush]))
    return callbacks, throughput.clock()


def fit_steps(state):
    """Runs keras `fit` on the trainer from the run's initial step to its total.

    Args:
        state: the run's `RunState`, compiled and resumed (its `progress` and `history` are set here).
    """
    from keras_tune.callbacks import Progress
    from keras_tune.environment import stdout_is_terminal

    config, per_update, start = state.config, _batches_per_update(state.config), state.initial_step
    total = state.total_steps * per_update  # Keras counts batches
    state.progress = Progress(total_steps=total, step=start, initial_step=start, batches_per_update=per_update)
    if start >= total:
        print(f"{state.output_dir} is already trained to step {state.progress.update} (of {state.total_steps}); "
              "nothing to train")
        return
    period, epochs, initial_epoch, validation_epochs = epoch_plan(
        total, config.train.eval_every * per_update, config.train.save_every * per_update, start
    )
    ours, clock = training_callbacks(state)
    # Batch s is a function of (seed, s) alone: resumed, the stream goes on where the
    # uninterrupted one is at the initial step, across epoch ends, however many iterators keras makes.
    dataset = state.data.train_stream(start)
    with detached_preprocessor(state.trainer):
        fitted = state.trainer.fit(
            dataset,
            validation_data=state.data.validation,
            validation_steps=validation_steps(state) if state.data.validation is not None else None,
            validation_freq=validation_epochs,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=period,
            shuffle=False,  # the data module shuffles, seeded
            callbacks=[*ours, *state.callbacks, clock],  # the clock last: callback work is not step time
            verbose=(1 if stdout_is_terminal() else 2) if rundir.is_primary() else 0,  # one progress bar
        )
    state.history = fitted.history


# ---------------------------------------------------------------------------
# 5. What the run leaves: the loss picture, the adapter (or full weights).


def finish(state):
    """Waits for checkpoints, draws `loss.png`, stops on divergence, writes the adapter (or the model).

    Args:
        state: the run's `RunState` after `fit_steps`.

    Returns:
        The last validation `{"loss", "perplexity"}`, or None.
    """
    config, store, progress, output_dir = state.config, state.store, state.progress, state.output_dir
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
    if "val_loss" in state.history:
        history = state.history
        validation = {"loss": history["val_loss"][-1], "perplexity": history.get("val_perplexity", [math.nan])[-1]}
        scores = TASK_SCORES[config.train.eval_task]
        validation.update({key[4:]: values[-1] for key, values in history.items()
                           if key.startswith("val_") and key[4:] in (*objective_of(state).columns, *scores)})
        print(f"validation after training: {objective_of(state).describe(validation)}")
        if scores:
            print(f"{config.train.eval_task} after training: {_describe_scores(validation, scores)}")
    if rundir.is_primary():
        write_weights(state)
    print(f"run directory: {output_dir}")
    return validation


def write_weights(state):
    """Writes what the run trained: `adapter.npz` (LoRA), or the whole model as a keras-hub preset in `model/`.

    The preset directory (config, weights, tokenizer) is what `generate`,
    `evaluate`, `export` and `fit --init-from` load, and keras-hub's
    `CausalLM.from_preset` too. It is written beside and moved into place, so
    an earlier one stays whole until the new one is.

    Args:
        state: the run's `RunState`.

    Raises:
        WriteFailed: it could not be written; an earlier one and the checkpoints are intact.
    """
    from keras_tune.lora import save_adapter

    config, store = state.config, state.store
    path = os.path.join(state.output_dir, "adapter.npz" if config.lora.rank else "model")
    try:
        if config.lora.rank:
            save_adapter(state.causal_lm, path, preset=config.preset)
        else:
            rundir.write_directory(path, state.causal_lm.save_to_preset)
    except OSError as error:
        steps = store.steps()
        kept = f"checkpoint {store.path(steps[-1])}" if steps else "no checkpoint"
        raise WriteFailed(f"could not write {path}: {error.strerror or error}; any earlier {os.path.basename(path)} "
                          f"and the {kept} are intact") from None

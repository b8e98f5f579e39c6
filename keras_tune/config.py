"""The run configuration: schema, preset lookup, overrides and validation.

A run is described by one `ml_collections.ConfigDict`. A preset file
(`presets/<name>.py`, a `get_config()` function) fills in the model; flags and
`--set key=value` override fields; `validate()` is the one place that checks
them. Everything downstream reads the validated config and nothing else.

Example:

```python
import keras_tune
config = keras_tune.load_config("gemma_tiny", overrides={"lora.rank": 8})
print(config.model.arch.num_layers, config.lora.rank)
```
"""

import importlib
import importlib.util
import json
import os
import re
from pathlib import Path

import ml_collections

from keras_tune.errors import UserError
from keras_tune.models import families

DEFAULT_PRESET = "gemma3_270m_offline"
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
RECIPES = ("imdb", "mtnt", "code", "text", "chat")
BATCHINGS = ("auto", "pack", "bucket", "pad")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16", "bfloat16")
OVERLONG = ("truncate", "drop")
SAMPLE_FORMATS = ("", "chat", "plain")
LOSSES = ("sparse", "full")
QUANTIZATIONS = ("", "int8", "int4")
KEPT_ACTIVATIONS = ("matmuls", "all")
# What a run trains for (`keras_tune.objectives`): next-token SFT, distillation from a
# teacher, preference tuning (DPO against the LoRA-off network, reference-free ORPO).
OBJECTIVES = ("sft", "distill", "dpo", "orpo")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# A task scored at each evaluation during a run (`--eval-task`; "" = none), and the
# recipes whose held-out split holds its (prompt, reference) pairs.
EVAL_TASKS = ("", "translation")
EVAL_TASK_RECIPES = {"translation": ("mtnt", "text")}
_MESH_PATTERN = re.compile(r"^(auto|\d+x\d+(x\d+)?)$")  # BxM, or BxMxE with an experts axis


def base_config():  # long: the whole schema, one field a line, is easiest read in one place
    """Returns the schema with every field at its default.

    Presets start from this and set the model section; the CLI and notebooks
    override single fields with `apply_overrides`.
    """
    return ml_collections.ConfigDict(
        {
            "preset": "",
            "description": "",
            "model": {
                # A registered family (keras_tune.models.families): picks the
                # classes, sources, LoRA targets, layouts and exports.
                "family": "",
                # kaggle: keras-hub handle through kagglehub; local: a keras-hub
                # preset directory; tiny: random init + offline tokenizer;
                # gguf: weights imported from a GGUF file (Gemma 3); flax: the
                # official RecurrentGemma checkpoints.
                "source": "kaggle",
                "handle": "",
                # A .gguf path, or "registry" for the Gemma 3 270M package.
                "weights": "",
                # A LoRA adapter .npz to load (generate, evaluate, export) or to
                # start training from (fit).
                "adapter": "",
                # A SentencePiece model (`python -m keras_tune.tokenizer train`) for a
                # randomly initialized model (source "tiny"): the vocabulary size is
                # the tokenizer's. "" = the tiny offline tokenizer.
                "tokenizer": "",
                "instruct": False,
                # keras-hub backbone constructor arguments, so planning needs
                # no download.
                "arch": {},
            },
            "distribution": {
                "mesh": "auto",
                "layout": "",
                "simulate_devices": 0,
                # Multi-process runs (JAX multi-controller through
                # keras.distribution.initialize): "HOST:PORT" of process 0, the
                # process count and this process's index. Empty/0/-1: read
                # Keras' KERAS_DISTRIBUTION_* variables, or a single process.
                "coordinator": "",
                "num_processes": 0,
                "process_id": -1,
            },
            "lora": {
                "rank": 4,
                "targets": ("query", "value"),
                # Scale of the update is alpha / rank; 0 means alpha = rank.
                "alpha": 0.0,
            },
            "optimizer": {
                "name": "adamw",
                "learning_rate": 5e-5,
                "weight_decay": 0.01,
                "exclude_embeddings_from_decay": False,
                "beta_1": 0.9,
                "beta_2": 0.999,
                "epsilon": 1e-7,
                "momentum": 0.0,
                "schedule": "constant",
                "warmup_steps": 0,
                "clipnorm": 1.0,
                "accumulation_steps": 1,
            },
            "data": {
                "name": "code",
                "path": "",
                "data_dir": "",
                "max_examples": 0,
                "seq_len": 128,
                "batch_size": 2,
                "validation_fraction": 0.05,
                "max_validation_examples": 200,
                "text_field": "text",
                "prompt_field": "prompt",
                "response_field": "response",
                "messages_field": "messages",
                "mtnt_pair": "en-fr",
                "prompt_template": "Translate this into French:\n{source}\n",
                "batching": "auto",
                "key_tokens": ("plt", "pd", "sk", "fit", "predict"),
                # Examples longer than seq_len: "truncate" (cut to a row) or "drop" (left
                # out, counted); documents packed from a stream are never cut away.
                "overlong": "truncate",
                # Documents must mention one of these words to be kept ("" = all), on any source.
                "filter_keywords": (),
                # Files read as the validation split instead of a held-out share (a path, glob or directory).
                "validation_path": "",
                # Token shards on disk for a document corpus (code, text): "on", "off", or
                # "auto" (on above 64 MB of input files; keras_tune.data.shards).
                "shards": "auto",
                "key_token_alpha": 0.0,
                # Preference records (--objective dpo/orpo): the preferred and the
                # dispreferred response to the prompt (`prompt_field`).
                "chosen_field": "chosen",
                "rejected_field": "rejected",
                "shuffle_buffer": 10000,
                # Packed rows: False masks attention to each document (segment
                # ids); True lets every token see the documents before it.
                "cross_document_attention": False,
            },
            "train": {
                "epochs": 1,
                "steps": 0,
                "seed": 0,
                "output_dir": "",
                "precision": "float32",
                "eval_every": 0,
                "eval_steps": 0,
                "save_every": 0,
                "keep_checkpoints": 3,
                "resume": False,
                # metrics.csv rows and TensorBoard scalars are written at least
                # this often while training (seconds; 0 = at each epoch end only).
                "log_every_seconds": 30.0,
                # A step (or evaluation batch) that makes no progress for this
                # long ends the run with one line and exit code 5: a dead or
                # hung peer never leaves a run hanging (0 = never).
                "step_timeout": 300.0,
                # The same for slow phases: a first step, a compile, a checkpoint.
                "compile_timeout": 1800.0,
                # After SIGTERM, seconds the run has to finish its step and write
                # a checkpoint before it stops without one (a second SIGTERM: at once).
                "sigterm_grace": 30.0,
                # A task scored at each evaluation ("translation": greedy translations
                # of the first `eval_task_examples` held-out pairs, sacrebleu's chrF and
                # BLEU in metrics.csv; the translations in translations.jsonl).
                "eval_task": "",
                "eval_task_examples": 32,
                "sample_prompts": (),
                # How --sample-prompt is sent: "chat" (the model's turn format),
                # "plain", or "" = as the data recipe trains (chat for the chat recipe).
                "sample_format": "",
                "sample_every": 0,
                "sample_max_length": 64,
                "peak_tflops": 0.0,
                # The training loss: "sparse" computes the output head and the
                # cross-entropy only at positions that carry loss, in chunks of
                # `loss_chunk_tokens` tokens (0 = one chunk) and blocks of
                # vocabulary rows holding about 1M float32 logits (4 MiB;
                # `losses.LOGITS_PER_BLOCK`; a float table whole while a chunk's
                # logits are at most 32M); "full" is keras-hub's plain path
                # (logits at every position). Every chunk reads the whole table:
                # once when it is frozen (LoRA: the states' gradient is made in
                # the forward sweep), three times when it trains (forward,
                # recomputation, gradient); fewer, larger chunks cost less time.
                "loss": "sparse",
                "loss_chunk_tokens": 1024,
                # What the run trains for: "sft" (next-token loss), "distill" (a
                # teacher's distributions, the `distill` section), "dpo" or "orpo"
                # (preference pairs, the `preference` section); keras_tune.objectives.
                "objective": "sft",
                # Frozen base weights stored as "int8" or "int4" (QLoRA-style);
                # "" keeps them in the training precision.
                "quantize": "",
                # Recompute each decoder block's activations in the backward pass.
                "remat": False,
                # What a Gemma decoder block keeps for the backward pass when
                # `remat` is off: "all" keeps whatever autodiff keeps;
                # "matmuls" keeps its weight matmuls' outputs and recomputes
                # the rest (norms, GELU, attention scores and softmax) from
                # them: the same numbers, a third less kept, but on CPU a
                # slower step and a larger compile (`loader.keep_matmul_outputs_only`).
                "keep_activations": "all",
                # Memory of one device for the planner, e.g. "16GiB" ("" = from
                # the device table or the device itself).
                "device_memory": "",
            },
            # --objective distill: the teacher and how its distributions are matched.
            "distill": {
                # A preset name, a copied preset .py file or a keras-hub preset directory
                # (a full-weight run's model/), with the student's tokenizer.
                "teacher": "",
                "teacher_weights": "",
                "teacher_adapter": "",
                # The teacher's frozen base stored as "int8" ("" = the run's precision).
                "teacher_quantize": "",
                # forward_kl KL(teacher || student), reverse_kl KL(student || teacher),
                # or jsd: the generalized Jensen-Shannon divergence of weight jsd_beta.
                "divergence": "forward_kl",
                "jsd_beta": 0.5,
                # Both distributions are softmax(logits / temperature).
                "temperature": 1.0,
                # loss = w * next-token NLL + (1 - w) * divergence, at the loss positions.
                "hard_label_weight": 0.5,
                # GKD's lambda: the share of batches whose responses the student samples
                # itself (the teacher scores them); 0 = the data's responses only.
                "on_policy_fraction": 0.0,
                "on_policy_temperature": 1.0,
            },
            # --objective dpo / orpo on {"prompt", "chosen", "rejected"} records.
            "preference": {
                # DPO's beta (the strength of the KL tie to the LoRA-off reference);
                # ORPO's lambda (the weight of its odds-ratio term).
                "beta": 0.1,
            },
            "run": {
                "dry_run": False,
                "show_sharding": False,
                # Native start-up lines a run would hide (gloo's, of a multi-process run).
                "verbose": False,
            },
        }
    )


def preset_dir():
    """Directory holding the shipped preset files (works from a wheel too)."""
    spec = importlib.util.find_spec("keras_tune.presets")
    return Path(list(spec.submodule_search_locations)[0])


def list_presets():
    """Returns the names of the shipped presets, sorted."""
    return sorted(
        path.stem for path in preset_dir().glob("*.py") if not path.stem.startswith("_")
    )


def _config_from_file(path):
    spec = importlib.util.spec_from_file_location(f"_keras_tune_preset_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # a user's file: report where it broke, in one line
        raise UserError(f"--config {path}: could not be loaded ({type(error).__name__}: {error})")
    if not hasattr(module, "get_config"):
        raise UserError(f"--config {path}: defines no get_config(); expected a copy of a presets/*.py file")
    return module.get_config()


def preset_config(name):
    """Returns the unvalidated config of a shipped preset.

    Args:
        name: a preset name from `list_presets()`.
    """
    names = list_presets()
    if name not in names:
        close = [n for n in names if name.split("_")[0] in n][:6] or names[:6]
        raise UserError(
            f"unknown preset '{name}'; expected one of {len(names)} presets such as "
            f"{', '.join(close)} (see --list-presets)"
        )
    module = importlib.import_module(f"keras_tune.presets.{name}")
    return module.get_config()


def _parse_value(text, current):
    """Parses a `--set` value to the type of the field it replaces."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got '{text}'")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, (tuple, list)):
        return tuple(part for part in text.split(",") if part)
    return text


def apply_overrides(config, overrides):
    """Sets dotted fields (`{"lora.rank": 8}`) on `config`, refusing unknown ones.

    String values are parsed to the field's type, so `--set` and flags share
    one path.

    Args:
        config: a `ConfigDict` from a preset.
        overrides: mapping of dotted field name to value (or string).
    """
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise UserError(f"unknown config field '{dotted}'; expected e.g. lora.rank, data.seq_len, train.steps")
            node = node[part]
        if leaf not in node and not (parents and parents[-1] == "arch"):
            raise UserError(
                f"unknown config field '{dotted}'; fields of '{'.'.join(parents) or 'config'}' are: "
                f"{', '.join(sorted(node.keys()))}"
            )
        current = node[leaf] if leaf in node else None
        if isinstance(value, str) and current is not None and not isinstance(current, str):
            try:
                value = _parse_value(value, current)
            except ValueError as error:
                raise UserError(f"--set {dotted}={value}: {error}")
        if isinstance(value, list):
            value = tuple(value)
        with node.ignore_type():
            node[leaf] = value
    return config


def _check(condition, message):
    if not condition:
        raise UserError(message)


def validate(config):
    """Checks every field a user can set; raises `UserError` with a one-line reason.

    Only cheap checks live here (no JAX, no files opened): mesh against the
    device count and layouts against real variables are checked in
    `keras_tune.distribution`, still before any weight exists.

    Args:
        config: the `ConfigDict` to check.
    """
    model, dist, lora, opt, data, train = (
        config.model,
        config.distribution,
        config.lora,
        config.optimizer,
        config.data,
        config.train,
    )
    family = families.get(model.family)
    _check_source(config.preset, family, model.source)
    if model.source in ("kaggle", "local", "flax"):
        _check(bool(model.handle), f"preset '{config.preset}' has source {model.source} but no model.handle")
    if model.source == "gguf":
        _check(bool(model.weights), "model.source is gguf but model.weights is empty; pass --weights PATH.gguf")
        if model.weights != "registry":
            _check(
                os.path.isfile(model.weights),
                f"--weights {model.weights}: no such file; expected a .gguf file",
            )
    if model.adapter:
        _check(os.path.isfile(model.adapter), f"--adapter {model.adapter}: no such file; expected an adapter .npz")
    if model.tokenizer:
        _check(model.source == "tiny", f"model.tokenizer {model.tokenizer}: a tokenizer file is for a randomly "
                                       f"initialized model (model.source tiny); this preset's source is {model.source}")
        _check(os.path.isfile(model.tokenizer),
               f"model.tokenizer {model.tokenizer}: no such file; expected a SentencePiece .model file "
               "(python -m keras_tune.tokenizer train)")
    _check(
        isinstance(dist.mesh, str) and bool(_MESH_PATTERN.match(dist.mesh)),
        f"--mesh '{dist.mesh}' is not of the form BxM (e.g. 1x8, 2x4), BxMxE (e.g. 1x2x4, experts last) or 'auto'",
    )
    if dist.mesh != "auto":
        axes = [int(n) for n in dist.mesh.split("x")]
        _check(min(axes) > 0, f"--mesh {dist.mesh}: {'both axes' if len(axes) == 2 else 'every axis'} must be at "
                              "least 1, e.g. 1x8")
    _check(dist.simulate_devices >= 0, f"--simulate-devices {dist.simulate_devices}: expected 0 (off) or a positive count")
    _check(lora.rank >= 0, f"--lora-rank {lora.rank}: expected 0 (full fine-tuning) or a positive rank such as 4")
    unknown = [t for t in lora.targets if t not in family.lora_targets]
    _check(not unknown, f"--lora-targets: unknown {unknown} for {family.name} models; "
                        f"expected a comma list of {','.join(family.lora_targets)}")
    _check(len(lora.targets) > 0 or lora.rank == 0, "--lora-targets is empty; expected e.g. query,value")
    _check(lora.alpha >= 0, f"lora.alpha {lora.alpha}: expected >= 0 (0 means alpha = rank)")
    _validate_training(lora, opt, data, train)
    _validate_objective(config)
    _validate_eval_task(train, data)
    _check(dist.num_processes >= 0, f"--num-processes {dist.num_processes}: expected a positive count (0 = auto)")
    _check(dist.process_id >= -1, f"--process-id {dist.process_id}: expected 0 .. num_processes - 1")
    if dist.num_processes and dist.process_id >= 0:
        _check(
            dist.process_id < dist.num_processes,
            f"--process-id {dist.process_id}: expected 0 .. {dist.num_processes - 1} for --num-processes {dist.num_processes}",
        )
    _check(train.peak_tflops >= 0, f"--peak-tflops {train.peak_tflops}: expected >= 0 (0 = from the device table)")
    # A GGUF carries its architecture in its metadata, a preset directory in its config.json;
    # every other source needs it here.
    _check(
        len(model.arch) > 0 or model.source in ("gguf", "local"),
        f"preset '{config.preset}' has no model.arch numbers; expected keras-hub backbone arguments",
    )
    return config


def _check_source(preset, family, source):
    """A family loads from its own sources; another family's source says which family has it."""
    if source in family.sources:
        return
    owners = [other.name for other in families.for_source(source)]
    if not owners:
        everything = sorted({s for name in families.names() for s in families.get(name).sources})
        raise UserError(f"model.source '{source}' is not supported; expected one of {', '.join(everything)}")
    raise UserError(f"preset '{preset}': model.source {source} is not a source of {family.name} models "
                    f"({', '.join(family.sources)}); expected family {' or '.join(owners)} for {source}")


def _validate_training(lora, opt, data, train):
    """The optimizer, data and training checks of `validate`."""
    _check(opt.name in OPTIMIZERS, f"--optimizer '{opt.name}'; expected one of {OPTIMIZERS}")
    _check(opt.learning_rate > 0, f"--learning-rate {opt.learning_rate}: expected a positive number such as 5e-5")
    _check(opt.weight_decay >= 0, f"--weight-decay {opt.weight_decay}: expected >= 0")
    _check(opt.schedule in SCHEDULES, f"--schedule '{opt.schedule}'; expected one of {SCHEDULES}")
    _check(opt.warmup_steps >= 0, f"--warmup-steps {opt.warmup_steps}: expected >= 0")
    _check(opt.clipnorm >= 0, f"--clipnorm {opt.clipnorm}: expected >= 0 (0 disables clipping)")
    _check(opt.accumulation_steps >= 1, f"--accumulation-steps {opt.accumulation_steps}: expected >= 1")
    _check(data.name in RECIPES, f"--data '{data.name}'; expected one of {RECIPES}")
    _check(data.batching in BATCHINGS, f"--batching '{data.batching}'; expected one of {BATCHINGS}")
    _check(data.seq_len >= 8, f"--seq-len {data.seq_len}: expected at least 8 tokens")
    _check(data.overlong in OVERLONG, f"--overlong '{data.overlong}'; expected one of {', '.join(OVERLONG)}")
    _check(data.shards in ("auto", "on", "off"), f"--shards '{data.shards}'; expected auto, on or off")
    _check(data.batch_size >= 1, f"--batch-size {data.batch_size}: expected at least 1")
    _check(data.max_examples >= 0, f"--max-examples {data.max_examples}: expected >= 0 (0 means all)")
    _check(0.0 <= data.validation_fraction < 1.0, f"data.validation_fraction {data.validation_fraction}: expected in [0, 1)")
    _check(train.epochs >= 1, f"--epochs {train.epochs}: expected at least 1")
    _check(train.steps >= 0, f"--steps {train.steps}: expected >= 0 (0 means one pass over the data)")
    _check(train.precision in PRECISIONS, f"--precision '{train.precision}'; expected one of {PRECISIONS}")
    for field in ("eval_every", "eval_steps", "save_every", "sample_every"):
        _check(train[field] >= 0, f"train.{field} {train[field]}: expected >= 0 (0 disables)")
    _check(train.keep_checkpoints >= 1, f"--keep-checkpoints {train.keep_checkpoints}: expected at least 1")
    _check(train.log_every_seconds >= 0, f"--log-every {train.log_every_seconds}: expected seconds >= 0 (0 = each epoch end)")
    _check(train.step_timeout >= 0, f"--step-timeout {train.step_timeout}: expected seconds >= 0 (0 = never)")
    _check(train.compile_timeout >= 0, f"train.compile_timeout {train.compile_timeout}: expected seconds >= 0")
    _check(train.sigterm_grace > 0, f"train.sigterm_grace {train.sigterm_grace}: expected seconds > 0")
    _check(train.sample_format in SAMPLE_FORMATS,
           f"--sample-format '{train.sample_format}'; expected chat, plain or nothing (as the data recipe trains)")
    _check(train.sample_max_length >= 2, f"--sample-max-length {train.sample_max_length}: expected at least 2 tokens")
    _check(
        all(isinstance(p, str) and p.strip() for p in train.sample_prompts),
        "--sample-prompt: expected non-empty prompt text",
    )
    _check(train.loss in LOSSES, f"train.loss '{train.loss}'; expected one of {LOSSES}")
    _check(train.loss_chunk_tokens >= 0, f"train.loss_chunk_tokens {train.loss_chunk_tokens}: expected >= 0 (0 = one chunk)")
    _check(train.keep_activations in KEPT_ACTIVATIONS,
           f"train.keep_activations '{train.keep_activations}'; expected one of {KEPT_ACTIVATIONS}")
    _check(train.quantize in QUANTIZATIONS, f"--quantize '{train.quantize}'; expected int8, int4 or nothing")
    _check(
        train.quantize == "" or lora.rank > 0,
        f"--quantize {train.quantize} freezes the base weights; expected --lora-rank > 0 to train adapters on top",
    )


def _validate_eval_task(train, data):
    """The checks of `--eval-task`: a known task, on a recipe whose held-out split holds its pairs."""
    task = train.eval_task
    _check(task in EVAL_TASKS, f"--eval-task '{task}'; expected translation (or nothing for none)")
    if not task:
        return
    recipes = EVAL_TASK_RECIPES[task]
    _check(data.name in recipes, f"--eval-task {task} scores the held-out (prompt, reference) pairs of --data "
                                 f"{' or '.join(recipes)}; got --data {data.name}")
    _check(train.objective in ("sft", "distill"), f"--eval-task {task} needs (prompt, reference) pairs; --objective "
                                                  f"{train.objective} reads preference records")
    _check(data.name != "text" or data.validation_fraction > 0,
           f"--eval-task {task} with --data text translates the held-out share; data.validation_fraction is "
           f"{data.validation_fraction}, expected above 0")
    _check(train.eval_task_examples >= 1,
           f"--eval-task-examples {train.eval_task_examples}: expected at least 1 held-out pair")


def _validate_objective(config):
    """The checks of `train.objective` and its `distill` / `preference` sections (no file is read)."""
    train, distill, preference, data = config.train, config.distill, config.preference, config.data
    objective = train.objective
    _check(objective in OBJECTIVES, f"--objective '{objective}'; expected one of {', '.join(OBJECTIVES)}")
    if objective == "distill":
        _check(bool(distill.teacher), "--objective distill needs --teacher PRESET; expected the preset of the model "
                                      "to learn from (it must share the student's tokenizer)")
        if os.path.isdir(distill.teacher):
            _check(os.path.isfile(os.path.join(distill.teacher, "config.json")),
                   f"--teacher {distill.teacher}: a directory without config.json; expected a keras-hub preset "
                   "directory (a full-weight run's model/)")
        elif not distill.teacher.endswith(".py"):
            _check(distill.teacher in list_presets(), f"--teacher '{distill.teacher}': unknown preset; expected one of "
                                                      "--list-presets, a copied preset .py file or a preset directory")
        else:
            _check(os.path.isfile(distill.teacher), f"--teacher {distill.teacher}: no such file; expected a preset "
                                                    "name or a copied presets/*.py file")
    else:
        for field in ("teacher", "teacher_weights", "teacher_adapter"):
            _check(not distill[field], f"--{field.replace('_', '-')} {distill[field]}: only --objective distill "
                                       f"uses a teacher; got --objective {objective}")
    for field, what in (("teacher_weights", "a .gguf file"), ("teacher_adapter", "an adapter .npz")):
        _check(not distill[field] or os.path.isfile(distill[field]),
               f"--{field.replace('_', '-')} {distill[field]}: no such file; expected {what}")
    _check(distill.divergence in DIVERGENCES, f"--divergence '{distill.divergence}'; expected one of "
                                              f"{', '.join(DIVERGENCES)}")
    _check(0.0 < distill.jsd_beta < 1.0, f"distill.jsd_beta {distill.jsd_beta}: expected strictly between 0 and 1")
    _check(distill.temperature > 0, f"--temperature {distill.temperature}: expected a positive number such as 1.0")
    _check(0.0 <= distill.hard_label_weight <= 1.0,
           f"--hard-label-weight {distill.hard_label_weight}: expected a weight in [0, 1]")
    _check(0.0 <= distill.on_policy_fraction <= 1.0,
           f"--on-policy-fraction {distill.on_policy_fraction}: expected a share of batches in [0, 1]")
    _check(distill.on_policy_temperature > 0,
           f"distill.on_policy_temperature {distill.on_policy_temperature}: expected a positive number")
    _check(distill.teacher_quantize in ("", "int8"),
           f"--teacher-quantize '{distill.teacher_quantize}'; expected int8 or nothing")
    if objective == "distill" and distill.on_policy_fraction > 0:
        _check(data.batching in ("bucket", "pad"), f"--on-policy-fraction {distill.on_policy_fraction} samples a "
                                                   f"response after each row's prompt; expected --batching bucket "
                                                   f"or pad (one example a row), got {data.batching}")
    _check(preference.beta > 0, f"--beta {preference.beta}: expected a positive number such as 0.1")
    if objective in ("dpo", "orpo"):
        _check(data.name in ("text", "chat"), f"--objective {objective} reads preference records "
                                              f"(prompt, chosen, rejected); expected --data text or chat, "
                                              f"got --data {data.name}")
        _check(data.batching != "pack", f"--batching pack: --objective {objective} keeps a pair's two rows apart; "
                                        "expected --batching auto, bucket or pad")
    if objective == "dpo":
        _check(config.lora.rank > 0, "--objective dpo takes its reference model from the network with LoRA off; "
                                     "expected --lora-rank > 0 (full fine-tuning would need a second copy of the base)")


def _given_settings_win(config, overrides):
    """Settings a user gave override the preset's settings they would otherwise lose to.

    `--epochs` without `--steps` trains that many passes even where the preset
    sets `train.steps`; switching to SGD drops the preset's AdamW weight decay
    and clipping unless they are given too (the seeds' SGD uses neither).
    """
    if "train.epochs" in overrides and "train.steps" not in overrides:
        config.train.steps = 0
    if overrides.get("optimizer.name") == "sgd":
        for field in ("weight_decay", "clipnorm"):
            if f"optimizer.{field}" not in overrides:
                config.optimizer[field] = 0.0


def load_config(preset=None, config_file=None, overrides=None):
    """Builds and validates a run config.

    Args:
        preset: a shipped preset name; defaults to the offline Gemma 3 270M.
        config_file: a user's copy of a preset file (its `get_config()` is used
            instead of `preset`).
        overrides: dotted field overrides such as `{"lora.rank": 8}`.

    A setting given in `overrides` wins over the preset's defaults it would
    otherwise lose to: `train.epochs` clears the preset's `train.steps`, and
    `optimizer.name=sgd` clears the preset's weight decay and clipping unless
    those are given too.

    Returns:
        A validated, locked `ConfigDict` (fields can be changed, none added).
    """
    if config_file:
        if not os.path.isfile(config_file):
            raise UserError(f"--config {config_file}: no such file; expected a copy of a presets/*.py file")
        config = _config_from_file(config_file)
    else:
        config = preset_config(preset or DEFAULT_PRESET)
    # A copied preset from an older version still gets every field.
    merged = base_config()
    merged.update(config)
    config = merged
    apply_overrides(config, overrides)
    _given_settings_win(config, overrides or {})
    validate(config)
    config.lock()
    return config


def data_config(overrides=None):
    """The `data` section alone, at its defaults with `overrides` applied and checked (tools with no model).

    Args:
        overrides: dotted fields such as `{"data.name": "code", "data.path": "src/"}`.
    """
    config = base_config()
    apply_overrides(config, overrides)
    _validate_training(config.lora, config.optimizer, config.data, config.train)
    return config.data


def to_json(config):
    """Serializes a config to JSON text (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text):
    """Rebuilds a config saved by `to_json` (used by resume and adapters)."""
    data = json.loads(text)
    config = base_config()
    config.update(_tuples(data))
    return config


def _tuples(value):
    if isinstance(value, dict):
        return {k: (v if k == "arch" else _tuples(v)) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(value)
    return value

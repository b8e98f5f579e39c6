"""`python -m keras_tune.fit`: LoRA (or full) fine-tuning of a Gemma-family preset on a device mesh.

Every flag is a field of the run config (`FIT_FLAGS`, plus the model flags every
tool shares in `keras_tune.cli`); this module only turns flags into a config and
calls `keras_tune.training.run`, which a notebook calls the same way.

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
could not be written (the previous ones are intact), 5 no progress for
`--step-timeout` seconds (a dead or hung peer process), 130 interrupted, 143
stopped by SIGTERM (after writing a checkpoint when the step could finish; rerun
to continue).
"""

import sys

from keras_tune import cli
from keras_tune import config as config_lib
from keras_tune.errors import UserError

FIT_FLAGS = (
    ("--lora-rank", "lora.rank", int, "LoRA rank; 0 = full fine-tuning"),
    ("--lora-targets", "lora.targets", str, "comma list of layers: query,key,value,attention_output,ffw_gating,ffw_gating_2,ffw_linear; "
     "RecurrentGemma's recurrent blocks also linear_x,linear_y,linear_out; Gemma 4's per-layer inputs and experts "
     "also per_layer_input_gate,per_layer_up_proj,per_layer_model_projection,moe_expert_bank"),
    ("--lora-alpha", "lora.alpha", float, "LoRA alpha (update scaled by alpha/rank); 0 = rank"),
    ("--data", "data.name", str, "recipe: imdb, mtnt, code, text, chat"),
    ("--data-path", "data.path", str, "your files: directory, glob, .txt, .jsonl, .csv"),
    ("--data-dir", "data.data_dir", str, "TFDS data directory (imdb, mtnt)"),
    ("--validation-path", "data.validation_path", str, "files read as the validation split instead of a held-out share"),
    ("--filter-keywords", "data.filter_keywords", str, "comma list: keep only documents mentioning one of these words"),
    ("--shards", "data.shards", str, "tokenize a document corpus once onto disk and stream it: auto (above 64 MB), on, off"),
    ("--max-examples", "data.max_examples", int, "use at most N examples (0 = all)"),
    ("--seq-len", "data.seq_len", int, "tokens per training sequence"),
    ("--batch-size", "data.batch_size", int, "global batch size (split over the mesh's batch axis)"),
    ("--batching", "data.batching", str, "auto, pack, bucket or pad"),
    ("--overlong", "data.overlong", str, "examples longer than --seq-len: truncate (default) or drop (counted in the report)"),
    ("--key-token-alpha", "data.key_token_alpha", float, "weigh each row's loss by alpha * (1 + its key tokens); 0 = off"),
    ("--epochs", "train.epochs", int, "passes over the data (given alone, it wins over a preset's --steps)"),
    ("--steps", "train.steps", int, "optimizer updates in total (0 = --epochs passes)"),
    ("--learning-rate", "optimizer.learning_rate", float, "peak learning rate"),
    ("--optimizer", "optimizer.name", str, "adamw or sgd"),
    ("--weight-decay", "optimizer.weight_decay", float, "decoupled weight decay (norm scales and biases excluded)"),
    ("--schedule", "optimizer.schedule", str, "constant, cosine or linear decay after warmup"),
    ("--warmup-steps", "optimizer.warmup_steps", int, "linear warmup, in optimizer updates"),
    ("--clipnorm", "optimizer.clipnorm", float, "global gradient-norm clipping (0 = off)"),
    ("--accumulation-steps", "optimizer.accumulation_steps", int, "batches whose gradients make one optimizer update"),
    ("--output-dir", "train.output_dir", str, "run directory (default runs/<preset>-<time>); one with checkpoints is continued"),
    ("--seed", "train.seed", int, "random seed for init, data order and sampling"),
    ("--eval-every", "train.eval_every", int, "validate every N optimizer updates (0 = at the end); also once before training"),
    ("--eval-steps", "train.eval_steps", int, "validation batches per evaluation (0 = all)"),
    ("--save-every", "train.save_every", int, "Orbax checkpoint every N optimizer updates (0 = at the end only)"),
    ("--keep-checkpoints", "train.keep_checkpoints", int, "checkpoints kept; older ones are deleted"),
    ("--log-every", "train.log_every_seconds", float, "write metrics.csv rows and TensorBoard scalars at least every N seconds (0 = at epoch ends)"),
    ("--step-timeout", "train.step_timeout", float, "seconds a step may make no progress before the run stops with exit 5 "
     "(a dead or hung peer; slow phases get train.compile_timeout); 0 = never"),
    ("--resume", "train.resume", bool, "continue from the newest checkpoint of --output-dir (default: the newest runs/<preset>-*)"),
    ("--eval-task", "train.eval_task", str, "score a task at each evaluation: translation (greedy translations of "
     "held-out --data mtnt/text pairs; sacrebleu's chrF and BLEU in metrics.csv, translations.jsonl)"),
    ("--eval-task-examples", "train.eval_task_examples", int, "held-out pairs --eval-task translates at each "
     "evaluation (the first N)"),
    ("--sample-prompt", "train.sample_prompts", list, "prompt to generate from before/after training and every --sample-every steps (repeatable)"),
    ("--sample-every", "train.sample_every", int, "generate samples every N optimizer updates (0 = before and after only)"),
    ("--sample-max-length", "train.sample_max_length", int, "prompt + generated tokens of a sample"),
    ("--sample-format", "train.sample_format", str, "send --sample-prompt as chat turns or plain text "
     "(default: as the data recipe trains)"),
    ("--peak-tflops", "train.peak_tflops", float, "peak TFLOP/s of one device for the MFU estimate (0 = from the device table)"),
    ("--quantize", "train.quantize", str, "store the frozen base as int8 or int4 (QLoRA-style; LoRA stays float32)"),
    ("--remat", "train.remat", bool, "recompute each decoder block in the backward pass (less memory, ~1/3 more compute)"),
    ("--keep-activations", "train.keep_activations", str, "what a Gemma block keeps for the backward pass: all "
     "(the default) or matmuls (their outputs; the rest is recomputed: less memory, a few percent more time)"),
    ("--objective", "train.objective", str, "what to train for: sft (next-token loss), distill (a --teacher's "
     "distributions), dpo or orpo (preference pairs: prompt, chosen, rejected); docs/objectives.md"),
    ("--teacher", "distill.teacher", str, "distill: the teacher's preset (same tokenizer as the student)"),
    ("--teacher-weights", "distill.teacher_weights", str, "distill: a Gemma 3 .gguf file for the teacher's weights"),
    ("--teacher-adapter", "distill.teacher_adapter", str, "distill: a LoRA adapter .npz applied to the teacher"),
    ("--teacher-quantize", "distill.teacher_quantize", str, "distill: store the frozen teacher as int8"),
    ("--divergence", "distill.divergence", str, "distill: forward_kl, reverse_kl or jsd (generalized, distill.jsd_beta)"),
    ("--temperature", "distill.temperature", float, "distill: both distributions are softmax(logits / T)"),
    ("--hard-label-weight", "distill.hard_label_weight", float, "distill: loss = w * next-token NLL + (1 - w) * divergence"),
    ("--on-policy-fraction", "distill.on_policy_fraction", float, "distill: share of batches whose responses the "
     "student samples and the teacher scores (GKD's lambda; needs --batching bucket or pad)"),
    ("--beta", "preference.beta", float, "dpo: beta (the tie to the LoRA-off reference); orpo: the odds-ratio term's weight"),
    ("--device-memory", "train.device_memory", str, "memory of one device for the --dry-run planner, e.g. 16GiB or 80GB (default: the device's own figure or the device table)"),
    ("--coordinator", "distribution.coordinator", str, "multi-process: HOST:PORT of process 0"),
    ("--num-processes", "distribution.num_processes", int, "multi-process: how many processes (hosts) take part"),
    ("--process-id", "distribution.process_id", int, "multi-process: this process's index, 0 .. N-1"),
    ("--show-sharding", "run.show_sharding", bool, "print the sharding table"),
    ("--dry-run", "run.dry_run", bool, "plan only: shapes, sharding and memory, no weights"),
    ("--verbose", "run.verbose", bool, "show native start-up lines keras_tune hides (gloo's connection lines)"),
)


def build_parser():
    """The `fit` tool's parser: the model flags, one flag per training field, and actions."""
    parser = cli.tool_parser(
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


def main(argv=None):
    """`python -m keras_tune.fit`; returns the process exit code (see the module docstring)."""

    def work(args):
        if args.list_presets:
            print(list_presets_table())
            return 0
        from keras_tune.training import run

        run(cli.load_tool_config(args, FIT_FLAGS))

    return cli.run_cli(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())

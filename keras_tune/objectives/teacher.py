"""The teacher of a distillation run: its config, the tokenizer check, and the frozen model on the student's mesh.

The teacher is a preset of its own (`--teacher`: a preset name, a copied preset file,
or a keras-hub preset directory such as a full-weight run's `model/`), with
its own weights (`--teacher-weights`) and adapter (`--teacher-adapter`), built
on the student's mesh, precision and sequence length and planned with its own
family's layout; `--teacher-quantize int8` stores its frozen base as int8
(`keras_tune.models.quantize`). Teacher and student must share a tokenizer: the
vocabulary sizes are compared before anything is built (for a GGUF teacher,
from its metadata), the pieces once both tokenizers exist.

Example:

```python
config = keras_tune.load_config("gemma3_tiny", overrides={"train.objective": "distill",
                                                          "distill.teacher": "gemma3_tiny"})
check_teacher(config)                       # a teacher with another vocabulary: one UserError
teacher = build_teacher(config, devices)    # frozen, sharded on the student's mesh
```
"""

import os

from keras_tune import config as config_lib
from keras_tune.errors import UserError
from keras_tune.models import families


def teacher_config(config):
    """The teacher's validated run config: its preset with the student's mesh, precision, length and seed.

    Args:
        config: the student's validated run config (`distill.*`).

    Raises:
        UserError: the teacher's preset, weights or adapter are not usable, said with `--teacher` in front.
    """
    distill = config.distill
    overrides = {
        "distribution.mesh": config.distribution.mesh,
        "distribution.simulate_devices": config.distribution.simulate_devices,
        "train.precision": config.train.precision,
        "train.seed": config.train.seed,
        "train.quantize": distill.teacher_quantize,
        "data.seq_len": config.data.seq_len,
        "model.adapter": distill.teacher_adapter,
    }
    if distill.teacher_weights:  # a GGUF file: the family that reads GGUF files, as --weights does
        overrides.update({"model.weights": distill.teacher_weights, "model.source": "gguf",
                          "model.family": families.for_source("gguf")[0].name})
    as_file = distill.teacher.endswith(".py") and os.path.isfile(distill.teacher)
    preset = None if as_file else distill.teacher
    if os.path.isdir(distill.teacher):  # a keras-hub preset directory (a full-weight run's model/), as --init-from
        preset = config.preset
        overrides.update({"model.handle": distill.teacher, "model.source": "local",
                          "model.family": families.of_preset_dir(distill.teacher).name})
    try:
        return config_lib.load_config(preset, config_file=distill.teacher if as_file else None, overrides=overrides)
    except UserError as error:
        raise UserError(f"--teacher {distill.teacher}: {error}") from None


def vocabulary_size(config):
    """Entries of a config's vocabulary, from its architecture (a GGUF's metadata, a preset directory's config).

    Args:
        config: a validated run config.
    """
    return int(families.get(config.model.family).backbone_kwargs(config)["vocabulary_size"])


def check_teacher(config):
    """Refuses a teacher whose vocabulary is not the student's, before any model is built.

    Args:
        config: the student's validated run config.

    Returns:
        The teacher's config.
    """
    from keras_tune.models.loader import check_source

    teacher = teacher_config(config)
    check_source(teacher)
    mine, theirs = vocabulary_size(config), vocabulary_size(teacher)
    if mine != theirs:
        raise UserError(f"--teacher {config.distill.teacher} has a vocabulary of {theirs:,} entries but the student "
                        f"{config.preset} has {mine:,}; expected a teacher with the student's tokenizer")
    return teacher


def check_same_tokenizer(config, student_tokenizer, teacher_tokenizer):
    """Refuses two tokenizers of one size whose pieces differ (the size was compared before the build).

    Args:
        config: the student's run config (for the message).
        student_tokenizer: the student's keras-hub tokenizer.
        teacher_tokenizer: the teacher's.
    """
    mine, theirs = student_tokenizer.get_vocabulary(), teacher_tokenizer.get_vocabulary()
    if mine != theirs:
        first = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        raise UserError(f"--teacher {config.distill.teacher}: its tokenizer differs from the student's at id {first} "
                        f"({theirs[first]!r} vs {mine[first]!r}); expected a teacher with the student's tokenizer")


def build_teacher(config, devices=None):
    """Builds the frozen teacher on the student's mesh; the student's distribution is the caller's to restore.

    Args:
        config: the student's validated run config.
        devices: the devices of the student's mesh (default: all).

    Returns:
        `(teacher CausalLM, its config)`.
    """
    from keras_tune.models.loader import build_model

    teacher_settings = teacher_config(config)
    teacher = build_model(teacher_settings, lora=False, devices=devices).causal_lm
    teacher.trainable = False  # its variables are the trainer's non-trainable ones: never in a gradient or checkpoint
    return teacher, teacher_settings

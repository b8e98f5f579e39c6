"""What an objective adds to a training step's memory (`keras_tune.objectives`), on shapes only.

- **preference pairs** (dpo, orpo): a batch of B pairs is 2B sequences; the
  activations, logits and workspace are counted for 2B rows (`rows_per_example`).
- **second forward pass**: DPO's reference (the same network with LoRA off,
  under `stop_gradient`) or a distillation's teacher. A forward pass that keeps
  nothing for a backward pass holds its largest block's buffers while it runs
  and the final hidden states it hands on (the teacher's stay for the whole
  step: the divergence reads them forward and backward).
- **teacher weights**: the teacher's frozen variables as its own sharding plan
  places them on the same mesh (`--teacher-quantize int8`: Keras' int8 layout).
- **objective buffers**: the divergence holds a block of the teacher's logits
  beside the student's (the sparse loss buffer once more); on-policy sampling
  holds the student's key/value cache.

The weights of DPO's reference are the policy's own: nothing is counted for them
(a LoRA run holds one copy of the base).
"""

from keras_tune.memory import activations

PREFERENCE = ("dpo", "orpo")


def rows_per_example(config):
    """Sequences one batch row holds: 2 for preference pairs (chosen and rejected), else 1.

    Args:
        config: the run config.
    """
    return 2 if config.train.objective in PREFERENCE else 1


def forward_pass_bytes(shapes, rows, seq, compute_bytes):
    """Bytes a forward pass without a backward pass holds at its peak: its largest block's buffers and its output.

    Args:
        shapes: the model's `ModelShapes` (on one device).
        rows: sequences on this device.
        seq: tokens a sequence.
        compute_bytes: bytes of an activation element.
    """
    groups = [group for _, group in shapes.layer_groups] or [shapes]
    largest = max(activations.block_activations(group, rows, seq, compute_bytes) for group in groups)
    if shapes.recurrent_layers:
        largest = max(largest, activations.recurrent_block_activations(shapes, rows, seq, compute_bytes))
    return largest + rows * seq * shapes.hidden * compute_bytes


def _teacher(config, plan):
    """`(teacher config, its plan on the run's devices, its ModelShapes)`."""
    from keras_tune.distribution import plan_sharding
    from keras_tune.models import families
    from keras_tune.models.loader import abstract_model
    from keras_tune.objectives.teacher import teacher_config

    teacher = teacher_config(config)
    # With its preset's LoRA layers the base is frozen, as the teacher's is (int8 where it is stored so).
    teacher_plan = plan_sharding(teacher, abstract_model(teacher, lora=True).weights,
                                 devices=list(plan.mesh.devices.flatten()))
    family = families.get(teacher.model.family)
    shapes = family.planner_shapes(teacher_plan, family.backbone_kwargs(teacher))
    return teacher, teacher_plan, shapes


def objective_bytes(config, plan, shapes, rows, seq, compute_bytes, logits):  # many: one step's figures
    """`{second_forward, objective_buffers, teacher}` of the run's objective, per device.

    `teacher` is `(teacher config, its ShardingPlan)` for a distillation (its frozen
    base is counted as every model's is: `keras_tune.memory.figures.weight_bytes`), else None.

    Args:
        config: the run config (`train.objective`, `distill.*`).
        plan: the run's `ShardingPlan`.
        shapes: the student's `ModelShapes`.
        rows: sequences on this device (pairs already doubled).
        seq: tokens a sequence.
        compute_bytes: bytes of an activation element.
        logits: the planned logits/loss buffer of the student (`activations.logits_bytes`).
    """
    figures = {"second_forward": 0, "objective_buffers": 0, "teacher": None}
    objective = config.train.objective
    if objective == "dpo":
        figures["second_forward"] = forward_pass_bytes(shapes, rows, seq, compute_bytes)
    elif objective == "distill":
        teacher, teacher_plan, teacher_shapes = _teacher(config, plan)
        figures["teacher"] = (teacher, teacher_plan)
        figures["second_forward"] = forward_pass_bytes(teacher_shapes, rows, seq, compute_bytes)
        figures["objective_buffers"] = logits  # the teacher's block of logits beside the student's
        if config.distill.on_policy_fraction > 0:  # the sampling's key/value cache
            figures["objective_buffers"] += (shapes.layers * rows * (seq + 1) * 2 * shapes.kv_heads * shapes.head_dim
                                             * compute_bytes)
    return figures

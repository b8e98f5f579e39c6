"""The planned bytes of one training step: weights, gradients, optimizer state, activations, logits.

`figures` puts `keras_tune.memory.activations` and the weight counts here
together into a `MemoryReport` (no verdict yet: `keras_tune.memory.plan` adds it).
"""

import dataclasses
import math

from keras_tune.errors import UserError
from keras_tune.memory import activations
from keras_tune.memory.objective import objective_bytes, rows_per_example
from keras_tune.models import families


_COMPUTE_BYTES = {"float32": 4, "mixed_bfloat16": 2, "mixed_float16": 2, "bfloat16": 2}


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "int8": 1, "float64": 8}


def _in_out(placement):
    # (inputs, outputs) of a kernel as Keras quantizes it: the embedding's rows
    # are its outputs; q/k/v contract the hidden dimension, attention_output
    # the heads, a 2-D kernel its first dimension.
    shape, path = placement.shape, placement.path
    if path.endswith("embeddings"):
        return shape[1], shape[0]
    if len(shape) == 3:
        inputs = shape[0] * shape[1] if path.endswith("attention_output/kernel") else shape[1]
        return inputs, math.prod(shape) // inputs
    return shape[0], math.prod(shape[1:])


def quantized_bytes(placement, mode):
    """Bytes of a frozen matrix stored as Keras' int8 or int4 (keras_tune's `quantize_base`).

    int8: one byte a weight and a float32 scale an output channel. int4: half a
    byte a weight, a float32 scale and an int8 zero point an output channel
    per block of 128 inputs, and a float32 input-order index.

    Args:
        placement: the variable's `Placement`.
        mode: "int8" or "int4".
    """
    inputs, outputs = _in_out(placement)
    if mode == "int8":
        return inputs * outputs + 4 * outputs
    return inputs * outputs / 2 + 5 * math.ceil(inputs / 128) * outputs + 4 * inputs


def weight_bytes(plan, config):
    """Per-device bytes of base weights, trainable weights, gradients, optimizer state and transient weights.

    Args:
        plan: the `ShardingPlan`.
        config: the run config (optimizer, quantize, precision).

    Returns:
        A dict with keys base, trainable, gradients, optimizer, transient.
    """
    from keras_tune.optim import optimizer_slots

    sizes = plan.mesh_sizes
    slots = optimizer_slots(config.optimizer) + (1 if config.optimizer.accumulation_steps > 1 else 0)
    compute = _COMPUTE_BYTES[config.train.precision]
    quantize = config.train.quantize
    totals = dict(base=0.0, trainable=0.0, gradients=0.0, optimizer=0.0, transient=0.0)
    for placement in plan.placements:
        shard = placement.shard_factor(sizes)
        elements = math.prod(placement.shape)
        stored = _DTYPE_BYTES.get(placement.dtype, 4)
        if placement.trainable:
            nbytes = elements * stored / shard
            totals["trainable"] += nbytes
            totals["gradients"] += nbytes
            totals["optimizer"] += slots * nbytes  # slots take the variable's dtype and layout
        elif quantize and len(placement.shape) >= 2:
            totals["base"] += quantized_bytes(placement, quantize) / shard
            stored = None  # dequantized for the compute
        else:
            totals["base"] += elements * stored / shard
        # As the compute sees it: gathered over 'batch', cast or dequantized.
        gathered = shard // (sizes.get("batch", 1) if "batch" in placement.axes else 1)
        if stored != compute or gathered != shard:
            totals["transient"] = max(totals["transient"], elements * compute / gathered)
    return {key: int(value) for key, value in totals.items()}


@dataclasses.dataclass
class MemoryReport:
    """Planned bytes per device of one training step, and what they are compared with.

    Attributes:
        preset, mesh, layout, devices, batch_size, seq_len, precision,
        optimizer, lora_rank, quantize, loss, remat: what was planned.
        base_weights, trainable_weights, optimizer_state, gradients: bytes.
        activations: kept for the backward pass, with the configured remat;
            `activations_no_remat` and `activations_remat` give both.
        backward_workspace, logits: the peak holds the larger of the two.
        transient_weights: the largest weight gathered/cast for the compute.
        total: the planned peak.
        device_memory: bytes of one device (None: unknown, no verdict).
        device_source: where `device_memory` comes from.
        fits: True, False, or None when the device memory is unknown.
        verdict: "fits (N GiB free)", "does not fit: needs N GiB more", or why there is none.
        suggestion: a change the planner checked fits, e.g. "try --lora-rank 4".
        suggested: that change as config overrides, e.g. `{"lora.rank": 4}`.
        objective: the run's `train.objective` (`keras_tune.memory.objective`).
        teacher_weights: a distillation's frozen teacher on this device.
        second_forward: DPO's reference pass or the teacher's forward pass (no backward).
        objective_buffers: the teacher's block of logits, on-policy sampling's cache.
    """

    preset: str
    mesh: str
    layout: str
    devices: int
    batch_size: int
    seq_len: int
    precision: str
    optimizer: str
    lora_rank: int
    quantize: str
    loss: str
    remat: bool
    base_weights: int
    trainable_weights: int
    optimizer_state: int
    gradients: int
    activations: int
    activations_no_remat: int
    activations_remat: int
    backward_workspace: int
    logits: int
    transient_weights: int
    total: int
    device_memory: int = None
    device_source: str = ""
    fits: bool = None
    verdict: str = ""
    suggestion: str = ""
    suggested: dict = None
    objective: str = "sft"
    teacher_weights: int = 0
    second_forward: int = 0
    objective_buffers: int = 0

    def as_dict(self):
        """The report as a JSON-ready dict."""
        return dataclasses.asdict(self)


def covers(family):
    """Whether the planner covers a family: its `planner_shapes` reads a model.

    Args:
        family: a `keras_tune.models.families.Family`.
    """
    return type(family).planner_shapes is not families.Family.planner_shapes


def planner_family(config):
    """The config's family, if the planner covers it (its `planner_shapes` reads a model).

    Args:
        config: a validated run config.

    Raises:
        UserError: the family has no planner view.
    """
    family = families.get(config.model.family)
    if not covers(family):
        covered = [name for name in families.names() if covers(families.get(name))]
        raise UserError(f"the memory planner covers {', '.join(covered)} models, not {family.name}; "
                        "expected one of those presets")
    return family


def figures(config, plan, arch=None):
    """The planned bytes of one training step, without a verdict.

    Args:
        config: the run config the plan was made for.
        plan: its `ShardingPlan` (of the abstract model with LoRA).
        arch: backbone arguments (default: read from the config).

    Returns:
        A `MemoryReport` with `fits` None.
    """
    family = planner_family(config)
    shapes = family.planner_shapes(plan, arch if arch is not None else family.backbone_kwargs(config))
    batch_axis = plan.mesh_sizes.get("batch", 1)
    # Sequences on a device: a preference pair is two (chosen, rejected).
    batch, seq = config.data.batch_size // batch_axis * rows_per_example(config), config.data.seq_len
    compute = _COMPUTE_BYTES[config.train.precision]
    weights = weight_bytes(plan, config)
    no_remat = activations.activation_bytes(shapes, batch, seq, compute, remat=False)
    remat = activations.activation_bytes(shapes, batch, seq, compute, remat=True)
    kept = remat if config.train.remat else no_remat
    workspace = activations.backward_workspace(shapes, batch, seq, compute)
    logits = activations.logits_bytes(shapes, batch * seq, compute, batch_axis, config.train)
    extra = objective_bytes(config, plan, shapes, batch, seq, compute, logits)
    teacher_weights = weight_bytes(extra["teacher"][1], extra["teacher"][0])["base"] if extra["teacher"] else 0
    total = (
        weights["base"] + weights["trainable"] + weights["optimizer"] + weights["gradients"]
        + kept + max(logits, workspace) + weights["transient"]
        + teacher_weights + extra["second_forward"] + extra["objective_buffers"]
    )
    return MemoryReport(
        preset=config.preset, mesh="x".join(str(n) for n in plan.mesh.shape), layout=plan.layout.name,
        devices=math.prod(plan.mesh.shape), batch_size=config.data.batch_size, seq_len=seq,
        precision=config.train.precision, optimizer=config.optimizer.name, lora_rank=config.lora.rank,
        quantize=config.train.quantize, loss=config.train.loss, remat=bool(config.train.remat),
        base_weights=weights["base"], trainable_weights=weights["trainable"],
        optimizer_state=weights["optimizer"], gradients=weights["gradients"],
        activations=kept, activations_no_remat=no_remat, activations_remat=remat,
        backward_workspace=workspace, logits=logits, transient_weights=weights["transient"], total=int(total),
        objective=config.train.objective, teacher_weights=int(teacher_weights),
        second_forward=int(extra["second_forward"]), objective_buffers=int(extra["objective_buffers"]),
    )

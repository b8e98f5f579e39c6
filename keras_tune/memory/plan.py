"""The memory plan of a run: bytes per device of one training step, and whether they fit.

Everything is computed from shapes: the abstract model and its sharding plan,
nothing allocated (planning Gemma 2 27B takes about a second). What each figure
counts, and an example, are in `keras_tune.memory`.
"""

from keras_tune.distribution import format_bytes, plan_sharding
from keras_tune.memory.devices import GIB, device_memory
from keras_tune.memory.figures import figures, planner_family
from keras_tune.memory.suggest import Replanner, as_flags, suggest


def _verdict(total, memory):
    if total <= memory:
        return True, f"fits ({(memory - total) / GIB:.1f} GiB free)"
    return False, f"does not fit: needs {(total - memory) / GIB:.1f} GiB more"


def plan_memory(config, plan=None, devices=None, suggest_change=True):
    """Plans the memory of one training step per device and says whether it fits.

    Shapes only: the abstract model and its sharding plan; nothing is allocated.

    Args:
        config: a validated run config (`train.device_memory` optional).
        plan: its `ShardingPlan` (default: planned here on the abstract model).
        devices: devices of the mesh (default: the plan's, else all JAX devices).
        suggest_change: when it does not fit, re-plan candidate changes and
            name the first that fits (a few seconds for a large model).

    Returns:
        A `MemoryReport`.
    """
    arch = planner_family(config).backbone_kwargs(config)
    if plan is None:
        if devices is None:
            import keras

            devices = keras.distribution.list_devices()
        replanner = Replanner(devices, arch)
        plan = plan_sharding(config, replanner.variables(config), devices=devices)
    else:
        replanner = Replanner([], arch)
    replanner.devices = list(plan.mesh.devices.flatten())
    report = figures(config, plan, arch)
    memory, source = device_memory(config, replanner.devices)
    report.device_memory, report.device_source = memory, source
    if memory is None:
        report.verdict = "no verdict: device memory " + source
        return report
    report.fits, report.verdict = _verdict(report.total, memory)
    if not report.fits and suggest_change:
        overrides, fitting = suggest(config, replanner, memory)
        if overrides is None:
            report.suggestion = (
                f"nothing the planner tried fits in {format_bytes(memory)} on {report.devices} devices; "
                "use more devices or devices with more memory"
            )
        else:
            report.suggested = overrides
            report.suggestion = (
                f"try {as_flags(overrides)} (planned {format_bytes(fitting.total)}: {_verdict(fitting.total, memory)[1]})"
            )
    return report


def format_memory_report(report):
    """The report as the lines `--dry-run` prints.

    Args:
        report: a `MemoryReport`.
    """
    lora = f"LoRA rank {report.lora_rank}" if report.lora_rank else "full fine-tuning"
    quantize = f", {report.quantize} base" if report.quantize else ""
    rows = [
        ("base weights", report.base_weights, report.quantize or report.precision),
        ("trainable weights", report.trainable_weights, lora),
        ("optimizer state", report.optimizer_state, report.optimizer),
        ("gradients", report.gradients, ""),
        ("activations", report.activations,
         f"with --remat (without: {format_bytes(report.activations_no_remat)})" if report.remat
         else f"without remat (with --remat: {format_bytes(report.activations_remat)})"),
        ("logits/loss buffer", report.logits, f"{report.loss} loss"),
        ("backward workspace", report.backward_workspace, "the peak holds the larger of this and the logits"),
        ("transient weights", report.transient_weights, "the largest weight gathered/cast for the compute"),
    ]
    # What an objective adds (keras_tune.memory.objective): rows only where it adds something.
    second = "the teacher's forward pass" if report.teacher_weights else "DPO's reference: the base with LoRA off"
    rows += [row for row in (
        ("teacher weights", report.teacher_weights, "frozen, on the same mesh"),
        ("second forward pass", report.second_forward, f"{second}, no backward"),
        ("objective buffers", report.objective_buffers, "the teacher's logits block (and sampling cache)"),
    ) if row[1]]
    rows.append(("total (planned peak)", report.total, ""))
    lines = [
        f"memory per device: mesh {report.mesh} ({report.devices} devices), layout {report.layout}, "
        f"batch {report.batch_size} x {report.seq_len} tokens, {report.precision}, {lora}{quantize}"
        + (f", objective {report.objective}" if report.objective != "sft" else "")
        + (" (a batch row is a pair: 2 sequences)" if report.objective in ("dpo", "orpo") else "")
    ]
    lines += [f"  {name:<21}{format_bytes(value):>11}  {note}".rstrip() for name, value, note in rows]
    device = format_bytes(report.device_memory) if report.device_memory else "unknown"
    lines.append(f"device memory {device} ({report.device_source}): {report.verdict}")
    if report.suggestion:
        lines.append(f"  {report.suggestion}")
    return "\n".join(lines)

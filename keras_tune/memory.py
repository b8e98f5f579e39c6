"""The memory planner: bytes per device of a training step, and whether they fit.

Everything is computed from shapes: the abstract model (`abstract_model`, no
weights) and its sharding plan (`plan_sharding`). Planning Gemma 2 27B takes
about a second and allocates nothing.

What is counted, per device (each tensor divided by its placement's shards):

- **base weights**: every frozen variable in its stored dtype; with
  `train.quantize`, the matrices as Keras stores them (int8: a byte a weight
  and a float32 scale an output channel; int4: half a byte, a float32 scale
  and an int8 zero point per 128 inputs of an output channel).
- **trainable weights** (LoRA matrices, or everything at `--lora-rank 0`),
  **gradients** (one per trainable variable, same dtype and placement) and
  **optimizer state** (Keras keeps each slot in its variable's dtype and
  layout: AdamW 2, SGD 1 with momentum else 0, one more for accumulation).
- **activations**: what the backward pass keeps of each decoder block,
  derived op by op from keras-hub's Gemma blocks by the chain rule:

  | op | kept for the backward pass |
  | --- | --- |
  | RMSNorm (float32 inside) | its input (compute dtype) and 1/rms; x/rms too if the scale trains |
  | q/k/v, gate/up, output, down projections | the input, only where the kernel trains (full or LoRA) |
  | RoPE, scaling, residual adds | nothing (linear) |
  | q.k^T, probabilities.v | q and k; the probabilities (compute dtype) and v |
  | masked softmax (float32) | the exp of the shifted scores, and the mask (a byte a pair) |
  | attention soft cap (Gemma 2) | its tanh |
  | tanh-GELU(gate) * up | gate and up outputs, the tanh, the GELU |

  Token tensors hold `batch / batch axis` sequences; heads, FFW and vocabulary
  divide by the model axis where the layout splits that dimension of their
  kernel. D-wide tensors (the residual stream, norm inputs) are whole on every
  device, except where the layout splits the hidden dimension of q/k/v (the
  fallback for heads that do not divide the axis) or a kernel's output: XLA
  then keeps them split. With `train.remat` a block keeps only its input, plus
  one block recomputed during its backward pass; both figures are reported.
  `train.keep_activations=matmuls` is counted as this table too: an
  upper bound, as the blocks then keep only their matmul outputs and recompute
  the rest, but how much that saves depends on where XLA schedules the
  recomputation (the 270M int8 step on CPU: 294 -> 197 MiB of temporaries;
  gemma3_tiny at 256 tokens, a few blocks of mostly attention scores: 2%).
- **RecurrentGemma** (Griffin): its local-attention blocks are counted as
  above (one key/value head; the code masks a full T x T score matrix to the
  2,048-token window, so the scores are T x T whatever the window), its
  recurrent blocks by `recurrent_block_activations` (linear_y's GELU branch,
  the convolution, the float32 RG-LRU gates and the parallel scan's levels:
  linear in T), both with the norms and gated MLP of a Gemma block.
- **backward workspace**: one block's float32 score gradient and gate/up
  gradients while its backward pass runs (a recurrent block: its scan's).
- **logits/loss buffer**: `full`: tokens x vocabulary of float32 shifted
  logits, their exp and their gradient (plus the compute-dtype logits when
  those are narrower, the soft cap's tanh, a second gradient when the
  embedding trains); `sparse` (`keras_tune.losses`): the forward and
  recomputed logits of one block of vocabulary rows for one chunk of
  `train.loss_chunk_tokens` tokens (the worst case: every position carries
  loss), plus the gathered table of fsdp layouts. The peak holds the larger of this
  buffer and the backward workspace, not both.
- **transient weights**: the largest weight as the compute uses it, where that
  differs from how it is stored: gathered over the 'batch' axis (fsdp
  layouts), cast (mixed precision) or dequantized.

Not counted: the data batch (KiB), LoRA's rank-wide `x A` (XLA recomputes
it), XLA's scratch and the runtime's reserve. The tests hold the total within
20% of XLA's compiled train step (`memory_analysis()`) on CPU, float32, for
the tiny presets on several meshes and the real Gemma 3 270M (recurrentgemma_tiny:
1.00-1.14; XLA keeps about one float32 logits buffer less than planned there,
and nothing of the first block's temporal part when none of it trains). Where XLA
differs from the plan, on purpose: on CPU it sometimes keeps a third `B H T T`
buffer a block (the normalized softmax); it upcasts bfloat16 matmuls to
float32 (so bfloat16 plans are checked on shapes only); and its scheduler
hoists the recomputation of Keras' per-block remat, so on CPU `train.remat`
saves little. A fused attention kernel (TPU, cuDNN) keeps no `B H T T` scores
at all: there the plan is an upper bound.

Example:

```python
import keras_tune
from keras_tune.memory import format_memory_report
config = keras_tune.load_config("gemma_7b_en", overrides={
    "distribution.mesh": "1x8", "train.device_memory": "16GiB"})
print(format_memory_report(keras_tune.plan_memory(config)))
```
"""

import dataclasses
import math
import re

from keras_tune.distribution import format_bytes, plan_sharding
from keras_tune.errors import UserError

GIB = 1024**3

# The families whose decoder blocks the activation count describes.
PLANNED_FAMILIES = ("gemma", "gemma2", "gemma3", "recurrentgemma")

# GiB of memory of one JAX device, by `device_kind`; first match wins. A TPU
# v2/v3 device is one core (half a chip); v4 and later expose one chip.
DEVICE_MEMORY_GIB = (
    (r"TPU v2", 8),
    (r"TPU v3", 16),
    (r"TPU v4", 32),
    (r"TPU v5 ?(lite|e)", 16),
    (r"TPU v5", 95),  # v5p
    (r"TPU v6", 32),  # v6e (Trillium)
    (r"H200", 141),
    (r"H100", 80),
    (r"A100.*80", 80),
    (r"A100", 40),
    (r"L40S", 48),
    (r"\bL4\b", 24),
    (r"\bT4\b", 16),
)

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}

# Command-line spelling of each lever the planner may suggest (the rest: --set).
_FLAGS = {
    "lora.rank": "--lora-rank",
    "data.batch_size": "--batch-size",
    "train.precision": "--precision",
    "train.quantize": "--quantize",
    "train.remat": "--remat",  # a switch
    "distribution.mesh": "--mesh",
    "distribution.layout": "--layout",
}

_COMPUTE_BYTES = {"float32": 4, "mixed_bfloat16": 2, "bfloat16": 2}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "int8": 1, "float64": 8}


def parse_memory_size(text, flag="--device-memory"):
    """Bytes in a size such as "16GiB", "80GB", "24 G" or "1.5TiB".

    GB/MB are decimal (10^9), GiB/MiB and a bare G/M binary (2^30).

    Args:
        text: the size as the user wrote it.
        flag: the flag named in the error message.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise UserError(
            f"{flag} '{text}': expected a size with a unit such as 16GiB, 80GB or 24G (GiB/G binary, GB decimal)"
        )
    size = float(match.group(1)) * _UNITS[unit]
    if size < 2**20:
        raise UserError(f"{flag} '{text}': expected at least 1MiB of device memory, e.g. 16GiB")
    return int(size)


def known_device_memory(device_kind):
    """Bytes of memory of one device from the table, or None if the kind is unknown.

    Args:
        device_kind: `jax.devices()[0].device_kind`, e.g. "TPU v5 lite" or "NVIDIA H100 80GB HBM3".
    """
    for pattern, gib in DEVICE_MEMORY_GIB:
        if re.search(pattern, device_kind or "", flags=re.IGNORECASE):
            return gib * GIB
    return None


def _jax_device(device):
    # A keras mesh holds "platform:id" strings; memory_stats needs the JAX device.
    if not isinstance(device, str):
        return device
    import jax

    platform, _, index = device.partition(":")
    try:
        return next(d for d in jax.devices(platform) if str(d.id) == index)
    except (RuntimeError, StopIteration):  # no such backend here: keep the name
        return device


def device_memory(config, devices=None):
    """Memory of one device and where the figure comes from.

    In order: `train.device_memory`; the device's own `memory_stats()`
    "bytes_limit" (what JAX may use); the table of known devices. CPU devices
    have no figure.

    Args:
        config: the run config.
        devices: the mesh's devices (default: none looked at).

    Returns:
        `(bytes or None, source)`, the source a few words for the report.
    """
    if config.train.device_memory:
        return parse_memory_size(config.train.device_memory), f"--device-memory {config.train.device_memory}"
    if not devices:
        return None, "unknown (no devices; pass --device-memory 16GiB)"
    device = _jax_device(devices[0])
    kind = getattr(device, "device_kind", str(device))
    if getattr(device, "platform", str(device).split(":")[0]) == "cpu":
        return None, f"unknown for CPU devices ({kind}); pass --device-memory 16GiB to plan for an accelerator"
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # some backends do not implement memory_stats
        limit = None
    if limit:
        return int(limit), f"{kind} (memory_stats bytes_limit)"
    known = known_device_memory(kind)
    if known:
        return known, f"{kind} (device table)"
    return None, f"unknown for '{kind}'; pass --device-memory"


# ---------------------------------------------------------------------------
# Shapes of the model, read off the plan's placements.


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """The numbers the activation count needs, already divided over the model axis.

    Attributes:
        layers: decoder blocks.
        hidden: residual width D.
        heads, kv_heads: query and key/value heads on one device.
        head_dim: h.
        ffw: width of the gate (and of up) on one device.
        vocab: vocabulary entries of the logits on one device.
        splits: how many ways the model axis splits each D-wide tensor:
            "residual" (the residual stream and the q/k/v input: split where
            the layout splits the hidden dimension of a q/k/v kernel, as it
            does for heads that do not divide the axis), "attention_output"
            and "ffw_output" (split where that kernel splits its output D),
            "ffw_input" (where the gate kernel splits its input D).
        trained: block layers whose input the backward pass needs ("query",
            "ffw_linear", ...; "norm" when the norm scales train).
        lora_width: per token, the width of `x A` summed over LoRA targets.
        post_norms, qk_norm: Gemma 2/3 extra norms.
        attention_soft_cap, final_soft_cap: Gemma 2 soft caps.
        embeddings_trained: the (tied) embedding trains.
        head_on_batch_axis: the layout splits the embedding over the batch axis.
        recurrent_layers: RecurrentGemma's blocks with a recurrent temporal
            block (the other `layers - recurrent_layers` attend); 0 for Gemma.
        lru: width of the recurrence (linear_x, linear_y, the RG-LRU) on one device.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffw: int
    vocab: int
    splits: dict
    trained: frozenset
    lora_width: int
    post_norms: bool
    qk_norm: bool
    attention_soft_cap: bool
    final_soft_cap: bool
    embeddings_trained: bool
    head_on_batch_axis: bool
    recurrent_layers: int = 0
    lru: int = 0


def _layer_name(path):
    # "decoder_block_0/attention/query/lora_kernel_a" -> "query"
    parts = path.split("/")
    return parts[-2] if len(parts) >= 2 else parts[0]


def _trained(block, hidden, in_width):
    trained, lora_width = set(), 0
    for name, placement in block.items():
        layer = _layer_name(placement.path)
        if placement.trainable:
            trained.add("norm" if name.endswith("norm/scale") else layer)
        if name.endswith("lora_kernel_a"):
            lora_width += math.prod(placement.shape) // in_width.get(layer, hidden)
    return frozenset(trained), lora_width


def model_shapes(plan, arch):
    """Reads the block structure and its per-device split off a sharding plan.

    Args:
        plan: a `ShardingPlan` of the model (LoRA included).
        arch: the backbone arguments (for the soft caps).
    """
    if any(p.path.endswith("/temporal_pre_norm/scale") for p in plan.placements):
        return griffin_shapes(plan, arch)
    model_axis = plan.mesh_sizes.get("model", 1)
    block = {p.path.split("/", 1)[1]: p for p in plan.placements if p.path.startswith("decoder_block_0/")}
    embedding = next(p for p in plan.placements if p.path.endswith("token_embedding/embeddings"))

    def split(name, dim):
        return model_axis if block[name].axes[dim] == "model" else 1

    heads, hidden, head_dim = block["attention/query/kernel"].shape
    ffw = block["ffw_gating/kernel"].shape[1]
    trained, lora_width = _trained(block, hidden, {"attention_output": heads * head_dim, "ffw_linear": ffw})
    residual = max(split(f"attention/{name}/kernel", 1) for name in ("query", "key", "value"))
    return ModelShapes(
        layers=sum(1 for p in plan.placements if re.fullmatch(r"decoder_block_\d+/pre_attention_norm/scale", p.path)),
        hidden=hidden,
        heads=heads // split("attention/query/kernel", 0),
        kv_heads=block["attention/key/kernel"].shape[0] // split("attention/key/kernel", 0),
        head_dim=head_dim,
        ffw=ffw // split("ffw_gating/kernel", 1),
        vocab=embedding.shape[0] // (model_axis if embedding.axes[0] == "model" else 1),
        splits={
            "residual": residual,
            "attention_output": split("attention/attention_output/kernel", 2),
            "ffw_output": split("ffw_linear/kernel", 1),
            "ffw_input": split("ffw_gating/kernel", 0),
        },
        trained=trained,
        lora_width=lora_width,
        post_norms="post_attention_norm/scale" in block,
        qk_norm="attention/query_norm/scale" in block,
        attention_soft_cap=bool(arch.get("attention_logit_soft_cap")),
        final_soft_cap=bool(arch.get("final_logit_soft_cap")),
        embeddings_trained=embedding.trainable,
        head_on_batch_axis="batch" in embedding.axes,
    )


def _first_block(plan, temporal):
    # The first residual block whose temporal block is `temporal` ("recurrent" or "attention"), by sub-path.
    blocks = {}
    for p in plan.placements:
        index, _, rest = p.path.partition("/")
        if index.startswith("decoder_block_"):
            blocks.setdefault(int(index.rsplit("_", 1)[1]), {})[rest] = p
    return next((block for _, block in sorted(blocks.items()) if any(k.startswith(f"{temporal}/") for k in block)), {})


def griffin_shapes(plan, arch):
    """`model_shapes` of a RecurrentGemma (Griffin) model: recurrent and local-attention residual blocks.

    Dense kernels are `(inputs, outputs)`: query `(D, heads x h)`, key/value
    `(D, h)` (one key/value head), linear_x/linear_y `(D, lru)`. A head split
    over more devices than there are heads leaves a whole head a device.

    Args:
        plan: a `ShardingPlan` of the model (LoRA included).
        arch: the backbone arguments (`num_heads`).
    """
    model_axis = plan.mesh_sizes.get("model", 1)
    recurrent, attention = _first_block(plan, "recurrent"), _first_block(plan, "attention")
    either = recurrent or attention
    embedding = next(p for p in plan.placements if p.path.endswith("token_embedding/embeddings"))

    def split(block, name, dim):
        return model_axis if name in block and block[name].axes[dim] == "model" else 1

    hidden, ffw = either["mlp/ffw_gating/kernel"].shape
    heads = int(arch.get("num_heads", 1))
    head_dim = attention["attention/query/kernel"].shape[1] // heads if attention else hidden // heads
    lru = recurrent["recurrent/linear_x/kernel"].shape[1] if recurrent else 0
    widths = {"attention_output": heads * head_dim, "ffw_linear": ffw, "linear_out": lru}
    trained, lora_width = _trained({**recurrent, **attention}, hidden, widths)
    paths = {p.path for p in plan.placements}
    layers = [path.split("/")[0] for path in paths if path.endswith("/temporal_pre_norm/scale")]
    return ModelShapes(
        layers=len(layers),
        hidden=hidden,
        heads=math.ceil(heads / split(attention, "attention/query/kernel", 1)),
        kv_heads=1,
        head_dim=head_dim,
        ffw=ffw // split(either, "mlp/ffw_gating/kernel", 1),
        vocab=embedding.shape[0] // (model_axis if embedding.axes[0] == "model" else 1),
        splits={
            "residual": max(split(attention, f"attention/{n}/kernel", 0) for n in ("query", "key", "value")),
            "attention_output": split(attention, "attention/attention_output/kernel", 1),
            "ffw_output": split(either, "mlp/ffw_linear/kernel", 1),
            "ffw_input": split(either, "mlp/ffw_gating/kernel", 0),
            "recurrent_input": max(split(recurrent, f"recurrent/linear_{n}/kernel", 0) for n in "xy"),
        },
        trained=trained,
        lora_width=lora_width,
        post_norms=False,
        qk_norm=False,
        attention_soft_cap=False,
        final_soft_cap=bool(arch.get("final_logit_soft_cap")),
        embeddings_trained=embedding.trainable,
        head_on_batch_axis="batch" in embedding.axes,
        recurrent_layers=sum(f"{layer}/recurrent/linear_x/kernel" in paths for layer in layers),
        lru=lru // split(recurrent, "recurrent/linear_x/kernel", 1),
    )


# ---------------------------------------------------------------------------
# Activations, the backward workspace and the logits, from the block structure.


def _norms(shapes, tokens, compute_bytes, projections=("query", "key", "value"), split="residual"):
    """The RMSNorms: each keeps its input and 1/rms; a trained scale also needs x/rms.

    The norm computes in float32, but XLA keeps its input in the compute dtype
    and fuses the cast into the backward pass. `projections` read the first
    norm's output (`split` names how that input is split).
    """
    s, width, a = shapes, shapes.hidden, compute_bytes
    inputs = [s.splits["residual"]] * 2  # the block input and attention + x
    if s.post_norms:
        inputs += [s.splits["attention_output"], s.splits["ffw_output"]]
    kept = sum(tokens * width * a // split for split in inputs) + len(inputs) * tokens * 4
    if "norm" in s.trained:
        kept += sum(tokens * width * a // split for split in inputs)
    # The normed inputs of the q/k/v (or linear_x/y) and gate/up projections, where those train.
    if s.trained & set(projections):
        kept += tokens * width * a // s.splits[split]
    if s.trained & {"ffw_gating", "ffw_gating_2"}:
        kept += tokens * width * a // s.splits["ffw_input"]
    return kept


def block_activations(shapes, batch, seq, compute_bytes):
    """Bytes one decoder block keeps for its backward pass, on one device (see the module docstring).

    Args:
        shapes: `ModelShapes` (already divided over the model axis).
        batch: sequences on this device.
        seq: tokens a sequence.
        compute_bytes: bytes of an activation element (4 float32, 2 bfloat16).
    """
    s, a = shapes, compute_bytes
    tokens = batch * seq
    query = tokens * s.heads * s.head_dim * a
    key_value = tokens * s.kv_heads * s.head_dim * a
    kept = _norms(s, tokens, a)
    if s.qk_norm:  # Gemma 3's q/k norms: their inputs and 1/rms
        kept += query + key_value + tokens * (s.heads + s.kv_heads) * 4
    kept += query + 2 * key_value  # q and k for q.k^T, v for probabilities.v
    # Scores: the float32 exp of the masked softmax, the probabilities in the
    # compute dtype, the soft cap's tanh; the mask, one byte a query-key pair.
    scores = batch * s.heads * seq * seq
    kept += scores * (4 + a + (a if s.attention_soft_cap else 0)) + batch * seq * seq
    if "attention_output" in s.trained:
        kept += query
    # tanh-GELU(gate) * up: the gate and up outputs, the tanh and the GELU.
    kept += 4 * tokens * s.ffw * a
    if "ffw_linear" in s.trained:
        kept += tokens * s.ffw * a
    return kept


def recurrent_block_activations(shapes, batch, seq, compute_bytes):
    """Bytes one RecurrentGemma recurrent block keeps for its backward pass, on one device.

    What JAX saves of `linear_out(rg_lru(conv_1d(linear_x(x))) * gelu(linear_y(x)))`
    (`jax.ad_checkpoint.print_saved_residuals`), tensor by tensor, each `lru` wide:

    | op | kept |
    | --- | --- |
    | linear_y, tanh-GELU | its output, the tanh, two GELU intermediates and the GELU (compute dtype) |
    | conv_1d (linear in x: 4 shifted taps) | its output, the RG-LRU's input |
    | RG-LRU gates (float32) | both sigmoids (one with its logistic: 3), a and a^2, 1 - a^2 (the sqrt's input), the multiplier, the gated input |
    | parallel scan (float32) | its output h (the other factor of `x * y`), and at each of its log2(T) levels ~5 slices of that level's `(a, h)` pairs: ~5 (T - 2) tokens in all |

    Then the two RMSNorms and the gated MLP, as in a Gemma block; the inputs of
    linear_x/linear_y, linear_out and the convolution only where they train.
    XLA on CPU keeps ~4% less of this block than counted.

    Args:
        shapes: `ModelShapes` of a RecurrentGemma model.
        batch: sequences on this device.
        seq: tokens a sequence.
        compute_bytes: bytes of an activation element (4 float32, 2 bfloat16).
    """
    s, a = shapes, compute_bytes
    tokens = batch * seq
    width = tokens * s.lru
    kept = _norms(s, tokens, a, projections=("linear_x", "linear_y"), split="recurrent_input")
    kept += 6 * width * a + 9 * width * 4  # the GELU branch and conv output; the gates and h
    kept += 5 * batch * max(seq - 2, 0) * s.lru * 4  # the scan's levels
    if "linear_out" in s.trained:
        kept += width * a  # x * y
    if "conv_1d" in s.trained:
        kept += width * a  # linear_x's output, for the taps' gradient
    if "rg_lru" in s.trained:
        kept += width * 4  # the gates' float32 input
    kept += 4 * tokens * s.ffw * a  # the gated MLP, as in Gemma
    if "ffw_linear" in s.trained:
        kept += tokens * s.ffw * a
    return kept


def backward_workspace(shapes, batch, seq, compute_bytes):
    """Bytes of one block's gradients in flight during its backward pass.

    The float32 gradient of the attention scores (XLA forms the gradients of
    the probabilities and of the scores in one pass) and those of gate and up;
    a recurrent block's float32 gradients of the scan's `(a, h)` instead of the scores.

    Args:
        shapes: `ModelShapes`.
        batch: sequences on this device.
        seq: tokens a sequence.
        compute_bytes: bytes of an activation element.
    """
    scores = batch * shapes.heads * seq * seq if shapes.layers > shapes.recurrent_layers else 0
    recurrent = 2 * batch * seq * shapes.lru if shapes.recurrent_layers else 0
    return max(scores, recurrent) * 4 + 2 * batch * seq * shapes.ffw * compute_bytes


def activation_bytes(shapes, batch, seq, compute_bytes, remat):
    """Bytes all decoder blocks (and the final norm) keep for the backward pass.

    RecurrentGemma: `recurrent_block_activations` for its recurrent blocks,
    `block_activations` for its local-attention blocks.

    Args:
        shapes: `ModelShapes`.
        batch: sequences on this device.
        seq: tokens a sequence.
        compute_bytes: bytes of an activation element.
        remat: each block is recomputed in the backward pass: only its input
            is kept, plus one block's activations while it is recomputed.
    """
    tokens = batch * seq
    residual = tokens * shapes.hidden // shapes.splits["residual"]
    final = residual * compute_bytes + tokens * 4  # the final RMSNorm
    if shapes.embeddings_trained:  # the output projection's input, and x/rms for the trained scale
        final += tokens * shapes.hidden * compute_bytes + residual * compute_bytes
    attention_layers = shapes.layers - shapes.recurrent_layers
    blocks = [(attention_layers, block_activations(shapes, batch, seq, compute_bytes) if attention_layers else 0)]
    if shapes.recurrent_layers:  # RecurrentGemma
        blocks.append((shapes.recurrent_layers, recurrent_block_activations(shapes, batch, seq, compute_bytes)))
    if remat:
        return shapes.layers * residual * compute_bytes + max(kept for _, kept in blocks) + final
    return sum(count * kept for count, kept in blocks) + final


def logits_bytes(shapes, tokens, compute_bytes, loss="full", chunk_tokens=0, batch_axis=1, quantize="",
                 mixed_precision=False):
    """Bytes of the logits and the loss's buffers at their peak, on one device.

    Args:
        shapes: `ModelShapes`.
        tokens: tokens on this device (batch / batch axis x seq_len); all
            carry loss in the worst case the plan assumes.
        compute_bytes: bytes of an activation element.
        loss: "full" (logits at every position) or "sparse" (the output head
            only where the loss is, `chunk_tokens` tokens at a time).
        chunk_tokens: tokens a chunk for the sparse loss, over the whole mesh
            (0 = all at once).
        batch_axis: size of the mesh's batch axis, which splits a chunk.
        quantize: "int4": the sparse loss goes through keras-hub's head (the
            whole vocabulary at once); otherwise it takes the table in blocks
            of `losses.vocabulary_block_rows` rows.
        mixed_precision: float32 weights computed in bfloat16 (a block is
            cast, so the table is never taken whole).
    """
    # The float32 logits (shifted by their max) and the exp the cross-entropy
    # keeps, and their float32 gradient; logits in a narrower compute dtype are
    # cast first, and the soft cap keeps its tanh.
    per_element = 4 + 4 + 4 + (compute_bytes if compute_bytes != 4 else 0)
    if shapes.final_soft_cap:
        per_element += compute_bytes
    if shapes.embeddings_trained:  # a second float32 gradient for the embedding's weight gradient
        per_element += 4
    if loss != "sparse":
        return tokens * shapes.vocab * per_element
    # The sparse loss's hand-written gradient keeps no autodiff residuals: the
    # forward logits and the backward pass's recomputed logits, which become the
    # gradient in place (XLA reuses one buffer for both on the 270M; not on the
    # tiny models, so the plan counts two).
    per_element = 8 + (compute_bytes if compute_bytes != 4 else 0)
    if shapes.final_soft_cap:
        per_element += compute_bytes
    if shapes.embeddings_trained:
        per_element += 4
    # The sparse loss flattens the batch's loss positions and cuts them into
    # chunks of the whole mesh's tokens; the batch axis splits a chunk unless
    # the head itself is split over that axis (fsdp layouts): then XLA gives
    # every device the whole chunk.
    total = tokens * batch_axis
    chunk = min(chunk_tokens or total, total)
    rows = chunk // (1 if shapes.head_on_batch_axis else batch_axis)
    from keras_tune.losses import vocabulary_block_rows

    # The tied head takes the table a block of rows at a time (`losses.TiedHead`).
    # A float table used as stored (no int8 or mixed-precision cast) is taken whole for small chunks.
    as_stored = not quantize and not mixed_precision
    if quantize == "int4":
        vocab, converted = shapes.vocab, 0
    else:  # a converted block (int8 to float, or a cast) is a buffer of its own
        vocab = vocabulary_block_rows(shapes.vocab, chunk, as_stored, 0 if as_stored else shapes.hidden)
        converted = 0 if as_stored else vocab * shapes.hidden * compute_bytes
    # One chunk's buffers at a time (a loop, recomputed in the backward pass);
    # the hand-written gradient needs no one-hot buffer. A table split over the
    # batch axis (fsdp) is gathered whole for the loop: a copy on every device.
    gathered = shapes.vocab * shapes.hidden * compute_bytes if shapes.head_on_batch_axis else 0
    return rows * vocab * per_element + converted + gathered


# ---------------------------------------------------------------------------
# Weights, gradients and optimizer state, from the plan's placements.


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


# ---------------------------------------------------------------------------
# The report.


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

    def as_dict(self):
        """The report as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _arch(config):
    from keras_tune.models.loader import backbone_kwargs

    return backbone_kwargs(config)


def figures(config, plan, arch=None):
    """The planned bytes of one training step, without a verdict.

    Args:
        config: the run config the plan was made for.
        plan: its `ShardingPlan` (of the abstract model with LoRA).
        arch: backbone arguments (default: read from the config).

    Returns:
        A `MemoryReport` with `fits` None.
    """
    shapes = model_shapes(plan, arch if arch is not None else _arch(config))
    batch_axis = plan.mesh_sizes.get("batch", 1)
    batch, seq = config.data.batch_size // batch_axis, config.data.seq_len
    compute = _COMPUTE_BYTES[config.train.precision]
    weights = weight_bytes(plan, config)
    no_remat = activation_bytes(shapes, batch, seq, compute, remat=False)
    remat = activation_bytes(shapes, batch, seq, compute, remat=True)
    activations = remat if config.train.remat else no_remat
    workspace = backward_workspace(shapes, batch, seq, compute)
    logits = logits_bytes(shapes, batch * seq, compute, config.train.loss, config.train.loss_chunk_tokens, batch_axis,
                          config.train.quantize, config.train.precision == "mixed_bfloat16")
    total = (
        weights["base"] + weights["trainable"] + weights["optimizer"] + weights["gradients"]
        + activations + max(logits, workspace) + weights["transient"]
    )
    return MemoryReport(
        preset=config.preset, mesh="x".join(str(n) for n in plan.mesh.shape), layout=plan.layout.name,
        devices=math.prod(plan.mesh.shape), batch_size=config.data.batch_size, seq_len=seq,
        precision=config.train.precision, optimizer=config.optimizer.name, lora_rank=config.lora.rank,
        quantize=config.train.quantize, loss=config.train.loss, remat=bool(config.train.remat),
        base_weights=weights["base"], trainable_weights=weights["trainable"],
        optimizer_state=weights["optimizer"], gradients=weights["gradients"],
        activations=activations, activations_no_remat=no_remat, activations_remat=remat,
        backward_workspace=workspace, logits=logits, transient_weights=weights["transient"], total=int(total),
    )


def _verdict(total, memory):
    if total <= memory:
        return True, f"fits ({(memory - total) / GIB:.1f} GiB free)"
    return False, f"does not fit: needs {(total - memory) / GIB:.1f} GiB more"


# ---------------------------------------------------------------------------
# Suggestions: re-plan candidate changes in a fixed order; name the first that fits.


class Replanner:
    """Plans variants of a config on the same devices, building each abstract model once.

    Args:
        devices: the devices every variant's mesh is made of.
        arch: the backbone arguments (soft caps).
    """

    def __init__(self, devices, arch):
        self.devices = list(devices)
        self.arch = arch
        self._variables = {}

    def variables(self, config):
        """The abstract model's variables for the config's LoRA and precision (cached)."""
        from keras_tune.models.loader import abstract_model

        key = (config.lora.rank, tuple(config.lora.targets), config.train.precision)
        if key not in self._variables:
            self._variables[key] = list(abstract_model(config).weights)
        return self._variables[key]

    def report(self, config):
        """`figures` of `config` on these devices."""
        plan = plan_sharding(config, self.variables(config), devices=self.devices)
        return figures(config, plan, self.arch)


def variant(config, overrides):
    """A validated copy of `config` with dotted `overrides` applied.

    Args:
        config: a run config.
        overrides: e.g. `{"lora.rank": 4}`.
    """
    from keras_tune import config as config_lib

    changed = config_lib.from_json(config_lib.to_json(config))
    config_lib.apply_overrides(changed, overrides)
    return config_lib.validate(changed)


def as_flags(overrides):
    """The command-line spelling of config changes, e.g. "--lora-rank 4 --remat --set train.loss=sparse"."""
    parts = []
    for field, value in overrides.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if field in _FLAGS and value is True:
            parts.append(_FLAGS[field])
        else:
            parts.append(f"{_FLAGS[field]} {text}" if field in _FLAGS else f"--set {field}={text}")
    return " ".join(parts)


def _mesh_changes(config, device_count):
    batch_axis, model_axis = (int(n) for n in plan_mesh_text(config, device_count).split("x"))
    layout = config.distribution.layout or f"{config.model.family}_tp"
    fsdp = f"{config.model.family}_fsdp"
    meshes = [f"{device_count // m}x{m}" for m in range(device_count, 0, -1) if device_count % m == 0]
    current = f"{batch_axis}x{model_axis}"
    changes = [{"distribution.mesh": mesh} for mesh in meshes if int(mesh.split("x")[1]) > model_axis]
    if layout != fsdp and device_count > 1:
        for mesh in [current] + [mesh for mesh in meshes if mesh != current]:
            changes.append({"distribution.layout": fsdp, **({} if mesh == current else {"distribution.mesh": mesh})})
    return changes


def plan_mesh_text(config, device_count):
    """The config's mesh as "BxM" ("auto" is 1xN)."""
    mesh = config.distribution.mesh
    return f"1x{device_count}" if mesh == "auto" else mesh


def candidate_changes(config, device_count):
    """The single changes `suggest` tries, in its fixed order.

    More model parallelism (the same layout on a mesh with a larger model
    axis), the fsdp layout (this mesh, then the others), LoRA rank 4 instead
    of full fine-tuning, a smaller batch (halving), bfloat16, remat, the
    sparse loss, an int8 then int4 base.

    Args:
        config: the run config.
        device_count: devices of the mesh.
    """
    changes = _mesh_changes(config, device_count)
    if config.lora.rank == 0:
        changes.append({"lora.rank": 4})
    batch, batch_axis = config.data.batch_size // 2, int(plan_mesh_text(config, device_count).split("x")[0])
    while batch >= batch_axis and batch % batch_axis == 0:
        changes.append({"data.batch_size": batch})
        batch //= 2
    if config.train.precision != "bfloat16":
        changes.append({"train.precision": "bfloat16"})
    if not config.train.remat:
        changes.append({"train.remat": True})
    if config.train.loss != "sparse":
        changes.append({"train.loss": "sparse"})
    if not config.train.quantize:
        rank = {} if config.lora.rank else {"lora.rank": 4}
        changes += [{**rank, "train.quantize": "int8"}, {**rank, "train.quantize": "int4"}]
    return changes


def _try(replanner, config, overrides, memory):
    try:
        report = replanner.report(variant(config, overrides))
    except UserError:  # the change does not apply here (a layout that cannot shard, a batch that does not divide)
        return None
    return report if report.total <= memory else None


def suggest(config, replanner, memory):
    """The first candidate change that fits, or the first fitting combination of them.

    Args:
        config: the run config that does not fit.
        replanner: a `Replanner` on the run's devices.
        memory: bytes of one device.

    Returns:
        `(overrides, report)` of the change, or `(None, None)` if nothing tried fits.
    """
    changes = candidate_changes(config, len(replanner.devices))
    for overrides in changes:
        report = _try(replanner, config, overrides, memory)
        if report:
            return overrides, report
    # No single change is enough: add the levers up one after another, on each mesh and layout.
    levers = [c for c in changes if "distribution.mesh" not in c and "distribution.layout" not in c
              and "data.batch_size" not in c and "train.quantize" not in c]
    levers.append({"train.quantize": "int4"} if config.lora.rank else {"lora.rank": 4, "train.quantize": "int4"})
    for layout_change in [{}] + [c for c in changes if "distribution.layout" in c or "distribution.mesh" in c]:
        combined = dict(layout_change)
        for lever in levers:
            combined.update(lever)
            report = _try(replanner, config, combined, memory)
            if report:
                return combined, report
    return None, None


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

    if config.model.family not in PLANNED_FAMILIES:
        raise UserError(
            f"the memory planner covers {', '.join(PLANNED_FAMILIES)} models, not {config.model.family}; "
            "expected one of those presets"
        )
    arch = _arch(config)
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
        ("total (planned peak)", report.total, ""),
    ]
    lines = [
        f"memory per device: mesh {report.mesh} ({report.devices} devices), layout {report.layout}, "
        f"batch {report.batch_size} x {report.seq_len} tokens, {report.precision}, {lora}{quantize}"
    ]
    lines += [f"  {name:<21}{format_bytes(value):>11}  {note}".rstrip() for name, value, note in rows]
    device = format_bytes(report.device_memory) if report.device_memory else "unknown"
    lines.append(f"device memory {device} ({report.device_source}): {report.verdict}")
    if report.suggestion:
        lines.append(f"  {report.suggestion}")
    return "\n".join(lines)

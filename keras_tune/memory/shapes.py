"""The planner's view of a model: the numbers the activation count needs, read off a sharding plan.

A family reads its own variables into a `ModelShapes`
(`Family.planner_shapes`); the helpers here are what every reading shares.
"""

import dataclasses
import math


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
        layer_groups: `((count, ModelShapes), ...)` for models whose blocks
            differ (Gemma 4: head widths, shared keys and values, MLP widths,
            experts): each group's numbers describe `count` blocks alike, and
            the activation count sums over the groups; empty: `layers` blocks
            of the numbers above.
        value_norm: the block normalizes its values (Gemma 4's parameter-free norm).
        experts, experts_per_token, expert_ffw: a mixture of experts beside the
            MLP (Gemma 4 26B-A4B): experts on one device, k, and each expert's
            intermediate width on one device.
        per_layer_width: width of Gemma 4's per-layer input gate (0: none).
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
    layer_groups: tuple = ()
    value_norm: bool = False
    experts: int = 0
    experts_per_token: int = 0
    expert_ffw: int = 0
    per_layer_width: int = 0


def layer_name(path):
    """The layer a variable belongs to: "decoder_block_0/attention/query/lora_kernel_a" -> "query".

    Args:
        path: a variable path.
    """
    parts = path.split("/")
    return parts[-2] if len(parts) >= 2 else parts[0]


def trained_layers(block, hidden, in_width):
    """`(layers whose input the backward pass needs, summed width of LoRA's x A)` of one block.

    Args:
        block: sub-path -> `Placement` of one block's variables.
        hidden: the residual width, the input width of most kernels.
        in_width: layer name -> input width where it is not `hidden`.
    """
    trained, lora_width = set(), 0
    for name, placement in block.items():
        layer = layer_name(placement.path)
        if placement.trainable:
            trained.add("norm" if name.endswith("norm/scale") else layer)
        if name.endswith("lora_kernel_a"):
            lora_width += math.prod(placement.shape) // in_width.get(layer, hidden)
    return frozenset(trained), lora_width

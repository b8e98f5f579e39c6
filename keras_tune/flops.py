"""FLOPs a training token costs, the devices' peak FLOP/s, and MFU.

MFU ("model FLOPs utilization") counts the FLOPs the model needs, not what the
hardware ran: per token `4 N + 2 N_trainable` for the dense layers (forward,
gradient with respect to activations, and weight gradients only where weights
train: 6 N for full fine-tuning, as in PaLM's definition) plus
`12 * layers * seq_len * heads * head_dim` for attention (no causal or sliding
window discount, so an upper bound there), divided by the peak dense bf16 FLOP/s
of the devices (`keras_tune.memory.devices`, or `--peak-tflops` per device).

RecurrentGemma (Griffin) attends only in its local-attention blocks (one in
three), and a query there sees at most `attention_window_size + 1` keys (the
window before it and itself), so its attention term is
`12 * attention_layers * min(seq_len, window + 1) * heads * head_dim`. Its
recurrent blocks have no quadratic term: their projections, convolution and
block-diagonal RG-LRU gates are dense weights used once a token (in `N`), and
the scan is elementwise (O(width) a token, not counted, as norms are not).

Example:

```python
from keras_tune import flops
per_token = flops.model_flops_per_token(causal_lm.backbone, seq_len=128)
peak, per_device, kind = flops.peak_flops(jax.devices())
mfu = tokens_per_second * per_token / peak
```
"""

from keras_tune.memory.devices import peak_tflops_per_device
from keras_tune.models import families


def peak_flops(devices, peak_tflops=0.0):
    """Peak FLOP/s of a set of devices for the MFU estimate.

    Args:
        devices: the mesh's devices.
        peak_tflops: per-device TFLOP/s to use instead of the table (0 = the table).

    Returns:
        `(total peak FLOP/s, per-device TFLOP/s, device kind)`; 0 FLOP/s when unknown.
    """
    kind = getattr(devices[0], "device_kind", str(devices[0]))
    per_device = peak_tflops or peak_tflops_per_device(kind)
    return per_device * 1e12 * len(devices), per_device, kind


def flops_per_token(total_params, trainable_params, num_layers, attention_width, seq_len):
    """Training FLOPs per token: dense layers plus attention (see the module docstring).

    Args:
        total_params: every parameter of the model (tied embeddings count once:
            they are the output projection).
        trainable_params: parameters that receive weight gradients.
        num_layers: blocks that attend.
        attention_width: query heads times head dimension.
        seq_len: keys a query attends over (tokens per sequence; at most the
            window for RecurrentGemma, see `attention_span`).
    """
    dense = 4 * total_params + 2 * trainable_params
    attention = 12 * num_layers * seq_len * attention_width
    return float(dense + attention)


def attention_span(backbone, seq_len):
    """`(blocks that attend, keys a query attends over)` of a backbone, as its family counts them.

    Gemma: every block, over the whole sequence. RecurrentGemma: its
    "attention" blocks only, over at most its window (see the module docstring).

    Args:
        backbone: a backbone of a registered family.
        seq_len: tokens per training sequence.
    """
    return families.of_model(backbone).attention_span(backbone, seq_len)


def model_flops_per_token(backbone, seq_len):
    """`flops_per_token` for a keras-hub Gemma backbone or a RecurrentGemma one.

    Args:
        backbone: the model's backbone (its LoRA, if any, already enabled).
        seq_len: tokens per training sequence.
    """
    from keras_tune.lora import trainable_report

    report = trainable_report(backbone)
    width = int(getattr(backbone, "num_query_heads", 0)) * int(getattr(backbone, "head_dim", 0))
    layers, span = attention_span(backbone, seq_len)
    return flops_per_token(report["total"], report["trainable"], layers, width, span)

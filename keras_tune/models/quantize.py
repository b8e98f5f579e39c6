"""Frozen base weights stored as int8 or int4 (QLoRA-style), with Keras' own `quantize`.

Weight-only: the scales are per output channel (int8) or per block of 128 inputs
(int4) and activations stay in the compute precision, so the only change to the
function the model computes is the weights' rounding. LoRA, enabled afterwards,
trains float32 matrices on top; their shapes are the unquantized model's, so an
adapter moves between the two.
"""

from keras_tune.errors import UserError


def quantization_config(mode):
    """Keras' weight-only quantization config for `--quantize mode` ("int8" or "int4").

    Args:
        mode: "int8" or "int4".
    """
    import keras

    if mode == "int8":
        return keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    if mode == "int4":
        return keras.quantizers.Int4QuantizationConfig(activation_quantizer=None, block_size=128)
    raise UserError(f"--quantize {mode}: expected int8 or int4")


def quantize_base(causal_lm, mode):
    """Stores the frozen base weights as int8 or int4 (Keras' own `quantize`), QLoRA-style.

    (The GGUF loader quantizes as it loads instead: `load_gguf_causal_lm(quantize=)`.)

    Args:
        causal_lm: a keras-hub CausalLM, LoRA not yet enabled.
        mode: "int8" or "int4".
    """
    import warnings

    config = quantization_config(mode)
    with warnings.catch_warnings():  # norms, rotary embeddings, dropout: nothing to quantize, as intended
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        causal_lm.backbone.quantize(mode, config=config)

"""Writing a tuned model for other tools: a merged keras-hub preset and a Transformers directory.

(GGUF for llama.cpp is `keras_tune.models.gguf.export_gguf`; an unmerged PEFT
adapter is `keras_tune.peft.save_peft_adapter`.)

keras-hub 0.32 converts Gemma 1 and Gemma 3 to Transformers. Its Gemma 1
attention weights are right for Gemma 2B only, so they are rewritten here (see
`_rewrite_gemma1_attention`). It would write a Gemma 2 model as a Gemma 1 one
(dropping its extra norms, soft-capping and sliding window), so for Gemma 2 the
Transformers export is refused with that reason.
Beside keras-hub's files, the Transformers directory gets a `tokenizer.json`, so
`AutoTokenizer` loads a fast tokenizer with no SentencePiece conversion.

Example:

```python
from keras_tune.models import export
export.merge_and_export(causal_lm, "exported/tuned")   # preset + exported/tuned/transformers
```
"""

import os

from keras_tune.errors import UserError

# Gemma 2 features keras-hub's Transformers exporter (0.32) does not carry: it writes
# every GemmaBackbone as HF model_type "gemma" (Gemma 1), which has none of them.
_GEMMA2_FEATURES = (
    "use_post_ffw_norm",
    "use_post_attention_norm",
    "final_logit_soft_cap",
    "attention_logit_soft_cap",
    "use_sliding_window_attention",
)


# Families for which only some outputs of `python -m keras_tune.export` exist:
# family -> the flags it supports. The others are refused before any model is built.
FAMILY_EXPORTS = {"recurrentgemma": ("--keras-preset",)}
_FORMATS = {"--gguf": "GGUF", "--transformers": "Transformers", "--peft": "PEFT",
            "--keras-preset": "a merged keras-hub preset, as generate --merge writes"}


def family_export_problem(config, flags):
    """The one-line refusal of export flags the config's model family has no exporter for, or None.

    RecurrentGemma has no Transformers, PEFT or GGUF writer (neither keras-hub
    nor llama.cpp's Gemma converter knows Griffin); a merged keras-hub preset it has.

    Args:
        config: the validated run config (`model.family`, `preset`).
        flags: the export flags asked for, e.g. `["--gguf", "--peft"]`.
    """
    family = config.model.family
    supported = FAMILY_EXPORTS.get(family)
    refused = [flag for flag in flags if supported is not None and flag not in supported]
    if not refused:
        return None
    asked = " and ".join(_FORMATS[flag] for flag in refused)
    offered = " or ".join(f"{flag} ({_FORMATS[flag]})" for flag in supported)
    return (f"{', '.join(refused)}: {asked} export is not implemented for {family} models (preset {config.preset}); "
            f"for {family}, expected {offered}")


def transformers_export_problem(backbone):
    """Why `export_to_transformers` would write a wrong model for this backbone, or None.

    Args:
        backbone: a keras-hub backbone (shapes suffice: an abstract one works).
    """
    if type(backbone).__name__ == "RecurrentGemmaBackbone":
        return "Transformers export is not implemented for recurrentgemma models; use the keras-hub preset instead"
    if type(backbone).__name__ != "GemmaBackbone":
        return None
    used = [name for name in _GEMMA2_FEATURES if getattr(backbone, name, None)]
    if used:
        return (
            "keras-hub exports a GemmaBackbone as Hugging Face model_type 'gemma' (Gemma 1), which would drop "
            f"this Gemma 2 model's {', '.join(used)}; use the keras-hub preset instead"
        )
    return None


def _hf_projection(kernel):
    """A keras `(heads, hidden, head_dim)` kernel as HF's `[heads * head_dim, hidden]` weight."""
    import numpy as np

    heads, hidden, head_dim = kernel.shape
    return np.ascontiguousarray(np.transpose(kernel, (0, 2, 1)).reshape(heads * head_dim, hidden))


def _rewrite_gemma1_attention(backbone, directory):
    """Rewrites q/k/v_proj of a keras-hub Gemma 1 export with the right values.

    keras-hub 0.32 writes k_proj/v_proj from key/value head 0 only and reshapes
    the query kernel as if heads x head_dim were the hidden size, which is right
    for Gemma 2B alone (one key/value head, 8 x 256 = 2048); Gemma 7B and any
    other shape came out wrong. The exporter is otherwise correct, so only these
    three tensors a layer are replaced.
    """
    import numpy as np
    from keras import ops
    from safetensors.numpy import load_file, save_file

    from keras_tune.rundir import atomic_write

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    for index in range(backbone.num_layers):
        attention = backbone.get_layer(f"decoder_block_{index}").attention
        for module, layer in (("q_proj", attention.query_dense), ("k_proj", attention.key_dense),
                              ("v_proj", attention.value_dense)):
            name = f"model.layers.{index}.self_attn.{module}.weight"
            kernel = np.asarray(ops.convert_to_numpy(layer.kernel))
            tensors[name] = _hf_projection(kernel).astype(tensors[name].dtype)
    with atomic_write(path, suffix=".safetensors") as partial:
        save_file(tensors, partial, metadata={"format": "pt"})


def refuse_existing(path, flag):
    """Refuses an output that exists and is not empty, before any model is built.

    Args:
        path: a directory or file the export would write.
        flag: the command-line flag naming it, for the message.
    """
    if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
        raise UserError(f"{flag} {path}: the directory exists and is not empty; expected a new directory"
                        if os.path.isdir(path) else f"{flag} {path}: the file exists; expected a new path")


def export_transformers(causal_lm, directory):
    """Writes a Hugging Face Transformers directory (weights as they are: merge LoRA first).

    Args:
        causal_lm: a keras-hub Gemma or Gemma 3 CausalLM with its preprocessor.
        directory: the folder to write.

    Raises:
        UserError: keras-hub cannot convert this model faithfully (Gemma 2), or
            a package it needs is missing.
    """
    problem = transformers_export_problem(causal_lm.backbone)
    if problem:
        raise UserError(f"cannot export to Transformers: {problem}")
    try:
        causal_lm.export_to_transformers(directory)
    except ModuleNotFoundError as error:
        raise UserError(f"cannot export to Transformers: {error.name} is not installed (pip install {error.name})")
    except (ValueError, NotImplementedError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot export to Transformers: keras-hub cannot export this model ({reason})")
    if type(causal_lm.backbone).__name__ == "GemmaBackbone":
        _rewrite_gemma1_attention(causal_lm.backbone, directory)
    from keras_tune.models.hf_tokenizer import write_tokenizer_json

    write_tokenizer_json(causal_lm.preprocessor.tokenizer, directory)
    return directory


def merge_and_export(causal_lm, out_dir, transformers=True, log=print):
    """Folds LoRA into the base weights and writes a keras-hub preset (and a Transformers copy).

    The preset loads anywhere with `keras_hub.models.CausalLM.from_preset(out_dir)`,
    or here with `--set model.source=local --set model.handle=out_dir`.

    Args:
        causal_lm: a CausalLM, with or without LoRA.
        out_dir: the preset directory to write.
        transformers: also write `out_dir/transformers` where keras-hub can.
        log: where progress lines go.

    Returns:
        A dict with `preset` (the directory) and `transformers` (a directory, or
        the reason it was not written).
    """
    from keras_tune.lora import merge_lora

    refuse_existing(out_dir, "--merge")
    merge_lora(causal_lm)
    causal_lm.save_to_preset(out_dir)
    log(f"merged keras-hub preset: {out_dir}")
    result = {"preset": out_dir, "transformers": "not requested"}
    if transformers:
        target = os.path.join(out_dir, "transformers")
        try:
            result["transformers"] = export_transformers(causal_lm, target)
            log(f"Hugging Face Transformers export: {target}")
        except UserError as error:
            result["transformers"] = f"skipped: {str(error).removeprefix('cannot export to Transformers: ')}"
            log(f"Hugging Face Transformers export {result['transformers']}")
    return result

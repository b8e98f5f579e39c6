"""The merged model as a keras-hub preset directory (and a Transformers copy where keras-hub can write one).

The preset loads anywhere with `keras_hub.models.CausalLM.from_preset(out_dir)`,
or here with `--set model.source=local --set model.handle=out_dir`.
"""

import os

from keras_tune.errors import UserError
from keras_tune.models.exports.transformers import export_transformers
from keras_tune.rundir import refuse_existing


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

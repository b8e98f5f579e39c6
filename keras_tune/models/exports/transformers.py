"""A tuned model as a Hugging Face Transformers directory (keras-hub's exporter, mended where it errs).

keras-hub 0.32 converts Gemma 1 and Gemma 3 to Transformers; what it writes
wrong for a family is mended by the family (`Family.after_transformers_export`:
Gemma 1's attention weights), and a family it would write wrongly is refused
with the reason (`Family.transformers_problem`: a Gemma 2 would become a Gemma
1). Beside keras-hub's files, the directory gets a `tokenizer.json`, so
`AutoTokenizer` loads a fast tokenizer with no SentencePiece conversion.

Example:

```python
from keras_tune.models.exports.transformers import export_transformers
export_transformers(causal_lm, "exported/hf")   # merge LoRA first: keras_tune.merge_lora
```
"""

from keras_tune.errors import UserError
from keras_tune.models import families


def family_export_problem(config, flags):
    """The one-line refusal of export flags the config's model family has no exporter for, or None.

    Args:
        config: the validated run config (`model.family`, `preset`).
        flags: the export flags asked for, e.g. `["--gguf", "--peft"]`.
    """
    family = families.get(config.model.family)
    refused = [flag for flag in flags if flag not in family.exports]
    if not refused:
        return None
    formats = families.EXPORT_FORMATS
    asked = " and ".join(formats[flag] for flag in refused)
    offered = " or ".join(f"{flag} ({formats[flag]})" for flag in family.exports)
    elsewhere = ""
    for flag in refused:  # where the refused output does exist, say which presets have it
        titles = [families.get(name).title for name in families.names() if flag in families.get(name).exports]
        elsewhere += f"; for {flag}, expected a {' or '.join(titles)} preset" if titles else ""
    return (f"{', '.join(refused)}: {asked} export is not implemented for {family.name} models "
            f"(preset {config.preset}); for {family.name}, expected {offered}{elsewhere}")


def transformers_export_problem(backbone):
    """Why `export_to_transformers` would write a wrong model for this backbone, or None.

    Args:
        backbone: a backbone of a registered family (shapes suffice: an abstract one works).
    """
    return families.of_model(backbone).transformers_problem(backbone)


def export_transformers(causal_lm, directory):
    """Writes a Hugging Face Transformers directory (weights as they are: merge LoRA first).

    Args:
        causal_lm: a CausalLM of a family that exports to Transformers, with its preprocessor.
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
    families.of_model(causal_lm).after_transformers_export(causal_lm.backbone, directory)
    from keras_tune.models.exports.hf_tokenizer import write_tokenizer_json

    write_tokenizer_json(causal_lm.preprocessor.tokenizer, directory)
    return directory

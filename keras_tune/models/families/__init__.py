"""The model family registry: one module a family, looked up by name or by model.

Everything that depends on which family a model is (its keras-hub classes,
sources, LoRA targets, layouts, exports, document masking, FLOPs and planner
shapes) is a method or attribute of its `Family` (`base.py`); the rest of
keras_tune asks the registry and never compares family names. Adding a family
is a module here, its presets, its layouts and its tests.

Example:

```python
from keras_tune.models import families
print(families.names())                    # ('gemma', 'gemma2', 'gemma3', 'recurrentgemma', 'gemma4')
family = families.get("gemma2")
family = families.of_model(causal_lm)      # the family a built model belongs to
```
"""

from keras_tune.errors import UserError
from keras_tune.models.families.base import EXPORT_FORMATS, GENERIC_SOURCES, Family, saved_backbone
from keras_tune.models.families.gemma import Gemma
from keras_tune.models.families.gemma2 import Gemma2
from keras_tune.models.families.gemma3 import Gemma3
from keras_tune.models.families.gemma4 import Gemma4
from keras_tune.models.families.recurrent_gemma import RecurrentGemma

_REGISTRY = {}


def register(family):
    """Adds a family to the registry (a later one with the same name replaces it).

    Args:
        family: a `Family` instance with a `name`.

    Returns:
        The family.
    """
    if not family.name:
        raise ValueError("a family needs a name")
    _REGISTRY[family.name] = family
    return family


def unregister(name):
    """Removes a family (tests that plug in a fake one).

    Args:
        name: the family's name.
    """
    _REGISTRY.pop(name, None)


def names():
    """The registered family names, in registration order."""
    return tuple(_REGISTRY)


def get(name):
    """The family called `name`.

    Args:
        name: a `model.family` value.

    Raises:
        UserError: no family has that name.
    """
    family = _REGISTRY.get(name)
    if family is None:
        raise UserError(f"model.family '{name}' is not supported; expected one of {', '.join(_REGISTRY)}")
    return family


def of_model(model):
    """The family a built (or abstract) model belongs to; the latest registered that owns it wins.

    Args:
        model: a CausalLM or its backbone.

    Raises:
        UserError: no registered family owns the model.
    """
    backbone = getattr(model, "backbone", model)
    for family in reversed(list(_REGISTRY.values())):
        if family.owns(backbone):
            return family
    raise UserError(f"a {type(backbone).__name__} is not a model of any supported family "
                    f"({', '.join(_REGISTRY)})")


def of_preset_dir(directory):
    """The family of the model a keras-hub preset directory holds (from its config.json).

    Args:
        directory: a folder written by `save_to_preset`.

    Raises:
        UserError: not a preset directory, or no registered family owns its backbone.
    """
    class_name, arguments = saved_backbone(directory)
    for family in reversed(list(_REGISTRY.values())):
        if family.owns_config(class_name, arguments):
            return family
    raise UserError(f"{directory}: a {class_name} is not a model of any supported family ({', '.join(_REGISTRY)})")


def for_source(source):
    """The families that load from a `model.source` (e.g. "gguf": those with a GGUF importer).

    Args:
        source: a `model.source` value.
    """
    return tuple(family for family in _REGISTRY.values() if source in family.sources)


def lora_targets():
    """Every LoRA target name some family has, in a stable order."""
    return tuple(dict.fromkeys(target for family in _REGISTRY.values() for target in family.lora_targets))


for _family in (Gemma(), Gemma2(), Gemma3(), RecurrentGemma(), Gemma4()):
    register(_family)

__all__ = ["EXPORT_FORMATS", "GENERIC_SOURCES", "Family", "for_source", "get", "lora_targets", "names", "of_model",
           "of_preset_dir",
           "register", "unregister"]

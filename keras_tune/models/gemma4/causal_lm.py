"""`Gemma4TextCausalLM`: keras-hub's `Gemma4CausalLM` over the text-only backbone.

Generation (Gemma 4's key/value cache, shared across the key/value-sharing
layers, `<turn|>` as a stop token) is keras-hub's; `from_preset` builds the
text model only (`keras_tune.models.gemma4.source`); the logits are soft-capped
once, by the tied embedding (keras-hub's `final_logit_cap` would cap them a
second time and is not used); `export_to_transformers` writes a checkpoint
Transformers' `Gemma4ForCausalLM` loads (`keras_tune.models.gemma4.transformers`).

Example:

```python
causal_lm = Gemma4TextCausalLM.from_preset("kaggle://keras/gemma4/keras/gemma4_instruct_2b/2", dtype="bfloat16")
causal_lm.generate("<|turn>user\\nHello<turn|>\\n<|turn>model\\n", max_length=64)
```
"""

import keras
import keras_hub

from keras_tune.models.gemma4.backbone import Gemma4TextBackbone


@keras.saving.register_keras_serializable(package="keras_tune")
class Gemma4TextCausalLM(keras_hub.models.Gemma4CausalLM):
    """A text-only Gemma 4 causal LM (keras-hub's task over `Gemma4TextBackbone`).

    Args:
        preprocessor: a `keras_hub.models.Gemma4CausalLMPreprocessor` (text only), or None.
        backbone: a `Gemma4TextBackbone`.
        final_logit_cap: ignored: the backbone's tied embedding applies
            `final_logit_soft_cap` (keras-hub would apply a second cap on top).
    """

    backbone_cls = Gemma4TextBackbone
    preprocessor_cls = keras_hub.models.Gemma4CausalLMPreprocessor

    def __init__(self, preprocessor, backbone, final_logit_cap=None, **kwargs):
        super().__init__(preprocessor=preprocessor, backbone=backbone, final_logit_cap=None, **kwargs)

    @classmethod
    def from_preset(cls, preset, load_weights=True, sequence_length=1024, dtype=None, **kwargs):
        """The text model of a Gemma 4 keras-hub preset or Transformers checkpoint, with a text-only preprocessor.

        Args:
            preset: `kaggle://...`, `hf://...`, or a directory (keras-hub preset or Transformers checkpoint).
            load_weights: read the weights (else random ones of the preset's architecture).
            sequence_length: the preprocessor's sequence length.
            dtype: the dtype policy.
            **kwargs: passed to the task.
        """
        from keras_tune.models.gemma4.source import load_text_model

        backbone, tokenizer = load_text_model(preset, dtype=dtype, load_weights=load_weights)
        preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor(tokenizer=tokenizer, sequence_length=sequence_length)
        return cls(preprocessor=preprocessor, backbone=backbone, **kwargs)

    def export_to_transformers(self, path):
        """Writes a Transformers `Gemma4ForCausalLM` checkpoint (weights as they are: merge LoRA first).

        Args:
            path: the directory to write.
        """
        from keras_tune.models.gemma4.transformers import export_transformers

        export_transformers(self, path)

"""Tokenizer glue: RecurrentGemma uses the Gemma tokenizer and Gemma's causal-LM preprocessing unchanged.

The official checkpoints ship the Gemma SentencePiece model (`tokenizer.model`,
256,000 pieces); keras-hub's `GemmaTokenizer` reads it as it is, and the tiny
preset uses keras_tune's offline tiny Gemma tokenizer. Preprocessing is
keras-hub's Gemma one (`<bos>` + text [+ `<eos>`], right-padded), so the data
recipes, `generate` and `evaluate_texts` treat the model like a Gemma.

Example:

```python
preprocessor = RecurrentGemmaCausalLMPreprocessor(tokenizer=gemma_tokenizer(path), sequence_length=128)
```
"""

import keras
from keras_hub.models import GemmaCausalLMPreprocessor, GemmaTokenizer

from keras_tune.models.recurrent_gemma.backbone import RecurrentGemmaBackbone


@keras.saving.register_keras_serializable(package="keras_tune")
class RecurrentGemmaCausalLMPreprocessor(GemmaCausalLMPreprocessor):
    """keras-hub's `GemmaCausalLMPreprocessor`, tied to `RecurrentGemmaBackbone` for presets."""

    backbone_cls = RecurrentGemmaBackbone
    tokenizer_cls = GemmaTokenizer


def gemma_tokenizer(path):
    """keras-hub's `GemmaTokenizer` from a SentencePiece model file.

    Args:
        path: a `tokenizer.model` file.
    """
    return GemmaTokenizer(proto=str(path))

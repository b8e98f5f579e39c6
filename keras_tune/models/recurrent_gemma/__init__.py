"""RecurrentGemma (Griffin) in Keras 3: backbone, causal LM, official checkpoints.

keras-hub has no RecurrentGemma; this package builds it from Keras layers so
that it plugs into keras_tune like a keras-hub Gemma (loader, layouts, LoRA,
optimizer, data, fit, generate, evaluate, checkpoints, adapters).

| module | holds |
| --- | --- |
| `layers.py` | RMSNorm, temporal Conv1D, RG-LRU, rotary embeddings, segment positions |
| `blocks.py` | recurrent block, local attention, gated MLP, residual block |
| `backbone.py` | `RecurrentGemmaBackbone` |
| `causal_lm.py` | `RecurrentGemmaCausalLM` (constant-size generation cache) |
| `preprocessor.py` | the Gemma tokenizer and preprocessor |
| `convert.py` | the official Flax/Orbax parameter tree <-> Keras weights |
| `source.py` | official checkpoints from Kaggle or a local directory |
"""

from keras_tune.models.recurrent_gemma.backbone import RecurrentGemmaBackbone
from keras_tune.models.recurrent_gemma.causal_lm import RecurrentGemmaCausalLM
from keras_tune.models.recurrent_gemma.preprocessor import RecurrentGemmaCausalLMPreprocessor, gemma_tokenizer

__all__ = ["RecurrentGemmaBackbone", "RecurrentGemmaCausalLM", "RecurrentGemmaCausalLMPreprocessor", "gemma_tokenizer"]

"""Gemma 4 text models in keras_tune: keras-hub's Gemma 4 without its encoders, with sparse experts.

keras-hub 0.32 builds every Gemma 4 with its vision (and audio) encoder, runs
each token through all 128 experts of the 26B-A4B, and multiplies by its
feed-forward kernels directly (wrong under int8/int4). This package is the text
model that keras_tune tunes, with keras-hub's layers and weight names:

| module | holds |
| --- | --- |
| `grouped.py` | grouped matrix products over expert-sorted rows (ragged_dot on TPU/GPU, a tiled loop on CPU) |
| `moe.py` | the top-k router, the sparse expert bank (LoRA per expert, expert parallelism), routing statistics |
| `block.py` | the decoder block: FFW through its layers, sparse experts, document masks |
| `backbone.py` | `Gemma4TextBackbone`: per-layer embeddings, key/value sharing, per-document positions |
| `causal_lm.py` | `Gemma4TextCausalLM`: generation, text-only `from_preset`, Transformers export |
| `source.py` | keras-hub presets and Transformers checkpoints, text weights only |
| `transformers.py` | the Transformers `Gemma4ForCausalLM` checkpoint, config mended |
"""

from keras_tune.models.gemma4.backbone import Gemma4TextBackbone
from keras_tune.models.gemma4.causal_lm import Gemma4TextCausalLM

__all__ = ["Gemma4TextBackbone", "Gemma4TextCausalLM"]

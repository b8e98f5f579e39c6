"""Gemma 3 and GGUF (llama.cpp's format): reading, the conversion cache, the vocabulary, the weight layout.

A GGUF file holds everything a Gemma 3 text model needs: the architecture
numbers as metadata, the SentencePiece vocabulary (pieces, scores, token types)
and the weights, possibly quantized. keras_tune reads one offline into a
keras-hub `Gemma3CausalLM` and writes a (merged, fine-tuned) one back
(`keras_tune.models.exports.gguf`) for llama.cpp or Ollama.

| module | holds |
| --- | --- |
| `file.py` | the reader: header, metadata, tensor index, dequantized tensors |
| `registry.py` | the offline Gemma 3 270M from its registry package |
| `tensors.py` | llama.cpp's `gemma3` constants, tensor names and layouts, both ways |
| `vocabulary.py` | GGUF vocabulary <-> SentencePiece model, both ways |
| `cache.py` | converted weights and tokenizers cached by the file's sha256 |
| `load.py` | `load_gguf_causal_lm`, `gguf_backbone_kwargs` |
"""

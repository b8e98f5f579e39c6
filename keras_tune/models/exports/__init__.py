"""A tuned model written for other tools: Transformers, GGUF (llama.cpp), a merged keras-hub preset.

| module | writes |
| --- | --- |
| `transformers.py` | a Transformers directory (keras-hub's exporter, mended per family) |
| `hf_tokenizer.py` | the `tokenizer.json` beside it |
| `gguf.py` | a llama.cpp `gemma3` GGUF |
| `keras_preset.py` | the merged model as a keras-hub preset (+ a Transformers copy) |

The unmerged adapter in PEFT's layout is `keras_tune.peft`. Which outputs a
family has is the family's `exports`; `python -m keras_tune.export` refuses the
others before building anything.
"""

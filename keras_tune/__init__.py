"""keras_tune: distributed LoRA fine-tuning of Gemma-family models with Keras 3 and keras-hub.

The public API, in the order of the training path:

```python
import keras, keras_tune

config = keras_tune.load_config("gemma_tiny", overrides={"distribution.mesh": "2x4"})
built = keras_tune.build_model(config, lora=True)   # planned, sharded, LoRA on
causal_lm = built.causal_lm
print(built.plan.table())
data = keras_tune.make_datasets(config.data, causal_lm.preprocessor.tokenizer)
optimizer = keras_tune.build_optimizer(config.optimizer, total_steps=100)
# ... or all of it at once, as the CLI does:
keras_tune.run(config)
```

Names are imported lazily, so `import keras_tune` does not start JAX: a
notebook can still call `keras_tune.simulate_devices(8)` first.
"""

import importlib
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

# Before anything imports TensorFlow or JAX: TensorFlow's and SentencePiece's
# start-up logs off (TF_CPP_MIN_LOG_LEVEL=0 brings them back), TensorFlow on CPU only.
from keras_tune.environment import prefer_memory_optimized_cpu_schedule, quiet_start  # noqa: E402

quiet_start()
prefer_memory_optimized_cpu_schedule()  # read when JAX starts its CPU backend

_EXPORTS = {
    "UserError": "keras_tune.errors",
    "load_config": "keras_tune.config",
    "list_presets": "keras_tune.config",
    "base_config": "keras_tune.config",
    "data_config": "keras_tune.config",
    "simulate_devices": "keras_tune.distribution",
    "make_mesh": "keras_tune.distribution",
    "load_layout": "keras_tune.distribution",
    "list_layouts": "keras_tune.distribution",
    "plan_sharding": "keras_tune.distribution",
    "plan_memory": "keras_tune.memory.plan",
    "format_memory_report": "keras_tune.memory.plan",
    "abstract_model": "keras_tune.models.loader",
    "load_causal_lm": "keras_tune.models.loader",
    "build_model": "keras_tune.models.loader",
    "apply_lora": "keras_tune.lora",
    "trainable_report": "keras_tune.lora",
    "save_adapter": "keras_tune.lora",
    "load_adapter": "keras_tune.lora",
    "merge_lora": "keras_tune.lora",
    "build_optimizer": "keras_tune.optim",
    "make_datasets": "keras_tune.data",
    "train_tokenizer": "keras_tune.vocabulary",
    "evaluate_texts": "keras_tune.scoring",
    "generate_texts": "keras_tune.decoding",
    "make_sampler": "keras_tune.decoding",
    "chat_prompt": "keras_tune.decoding",
    "merge_and_export": "keras_tune.models.exports.keras_preset",
    "merge_models": "keras_tune.merging",
    "export_transformers": "keras_tune.models.exports.transformers",
    "save_peft_adapter": "keras_tune.peft",
    "load_peft_adapter": "keras_tune.peft",
    "read_peft_adapter": "keras_tune.peft",
    "count_parameters": "keras_tune.lora",
    "read_rows": "keras_tune.rundir",
    "plot_losses": "keras_tune.rundir",
    "load_gguf_causal_lm": "keras_tune.models.gguf.load",
    "export_gguf": "keras_tune.models.exports.gguf",
    "registry_gguf_path": "keras_tune.models.gguf.registry",
    "run": "keras_tune.training",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'keras_tune' has no attribute {name!r}")

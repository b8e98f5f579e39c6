"""The training path step by step through the public API, as a notebook would run it.

Run with `python examples/notebook_api.py`: it simulates 8 CPU devices, shards a tiny
Gemma 3 over a 2x4 mesh, prints the sharding table, fine-tunes with LoRA on a few
lines of text, and writes the adapter.
"""

import os
import tempfile

import keras_tune

keras_tune.simulate_devices(8)  # before anything starts JAX

import keras  # noqa: E402

workdir = tempfile.mkdtemp(prefix="keras_tune_example_")
corpus = os.path.join(workdir, "corpus.txt")
with open(corpus, "w") as file:
    for index in range(400):
        file.write(f"Line {index}: the quick brown fox jumps over {index % 7} lazy dogs.\n")

config = keras_tune.load_config(
    "gemma3_tiny",
    overrides={
        "distribution.mesh": "2x4",
        "data.name": "text",
        "data.path": corpus,
        "train.steps": 20,
        "train.output_dir": os.path.join(workdir, "run"),
    },
)

# 1. Plan on shapes only, then build under the distribution.
plan = keras_tune.plan_sharding(config, keras_tune.abstract_model(config).weights)
print(plan.table())
keras.distribution.set_distribution(plan.distribution())
causal_lm = keras_tune.load_causal_lm(config)
keras_tune.apply_lora(causal_lm, config.lora.rank, config.lora.targets)
print(keras_tune.trainable_report(causal_lm))

# 2. Data and optimizer from the same config.
data = keras_tune.make_datasets(config.data, causal_lm.preprocessor.tokenizer, seed=config.train.seed)
print(data.report.summary())
causal_lm.compile(
    optimizer=keras_tune.build_optimizer(config.optimizer, total_steps=config.train.steps),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
)
preprocessor, causal_lm.preprocessor = causal_lm.preprocessor, None  # batches are tokenized already
causal_lm.fit(data.train_stream(), steps_per_epoch=config.train.steps, epochs=1, verbose=2)
causal_lm.preprocessor = preprocessor

# 3. Save the adapter; or do all of the above with keras_tune.run(config).
keras_tune.save_adapter(causal_lm, os.path.join(workdir, "adapter.npz"), preset=config.preset)
print("wrote", os.path.join(workdir, "adapter.npz"))

"""Helpers shared by the test modules (`from helpers import ...`): no test module imports another.

Plain functions and constants. Nothing here imports JAX, Keras or keras_tune when
the module loads (conftest.py sets the XLA flags before JAX is first imported);
the functions that need them import them when called.
"""

import io
import json
import os
import pathlib
import random
import signal
import subprocess
import tarfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# Training data


def write_corpus(path, paragraphs=300, seed=0):
    """A text file of blank-line separated paragraphs over a small vocabulary.

    Args:
        path: where to write it.
        paragraphs: how many paragraphs (of 20 to 60 words each).
        seed: the words' random seed.

    Returns:
        The path, as a string.
    """
    words = ("the model learns small words from a tiny corpus and every step makes the loss go down "
             "while the data stays the same").split()
    rng = random.Random(seed)
    with open(path, "w") as file:
        file.write("\n\n".join(
            " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "." for _ in range(paragraphs)
        ))
    return str(path)


def ids(tok, text):
    """The token ids of `text` under the tokenizer `tok`, as a flat list of ints."""
    return [int(i) for i in np.asarray(tok(text)).reshape(-1)]


def rows(dataset):
    """All rows of a dataset as (token_ids, padding_mask, y, weight) tuples, batch by batch."""
    out = []
    for x, y, w in dataset.as_numpy_iterator():
        for i in range(len(y)):
            out.append((x["token_ids"][i], x["padding_mask"][i], y[i], w[i]))
    return out


IMDB_URL = "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
MTNT_URL = "https://github.com/pmichel31415/mtnt/releases/download/v1.1/MTNT.1.1.tar.gz"
# What `build_tfds_data_dir` writes unless told otherwise.
TFDS_REVIEWS = {
    "train": [f"Review {i}: the film was {'great' if i % 2 else 'dull'}; " + "really " * i for i in range(8)],
    "test": [f"Test review {i}, a {'fine' if i % 2 else 'bad'} movie." for i in range(5)],
}
TFDS_PAIRS = {
    "train": [(f"hello number {i}", f"bonjour numero {i}") for i in range(6)],
    "valid": [("good morning", "bonjour"), ("thank you", "merci"), ("see you", "a bientot")],
    "test": [("yes", "oui")],
}


def tar_gz(files):
    """The bytes of a .tar.gz archive holding `files` ({name in the archive: text})."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def prepare_tfds(name, url, archive, data_dir, download_dir):
    """Places `archive` where TFDS keeps a finished download of `url`, then runs the real builder.

    Args:
        name: the TFDS builder (e.g. "imdb_reviews", "mtnt/en-fr").
        url: the url the builder downloads.
        archive: the bytes of that download.
        data_dir: the TFDS data directory to prepare.
        download_dir: the TFDS download directory.
    """
    import tensorflow_datasets as tfds
    from etils import epath
    from tensorflow_datasets.core.download import checksums, resource

    builder = tfds.builder(name, data_dir=str(data_dir))
    registered = builder.url_infos.get(url) if builder.url_infos else None
    # TFDS names a download by url and (when registered) checksum; the INFO file
    # next to it is what marks it as complete.
    path = epath.Path(download_dir) / resource.get_dl_fname(url, registered.checksum if registered else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(archive)
    info = registered or checksums.compute_url_info(path)
    resource.write_info_file(url=url, path=path, dataset_name=builder.name, original_fname=url.split("/")[-1],
                             url_info=info)
    builder.download_and_prepare(
        download_dir=str(download_dir), download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


def build_tfds_data_dir(root, reviews=None, pairs=None):
    """Prepares `imdb_reviews` and `mtnt/en-fr` under `root/data` offline; returns that data_dir.

    See tests/test_data_tfds.py's docstring for how (real archives, real builders).

    Args:
        root: a fresh directory (pathlib.Path).
        reviews: {"train": [...], "test": [...]} review texts (default `TFDS_REVIEWS`).
        pairs: {"train"|"valid"|"test": [(src, dst), ...]} (default `TFDS_PAIRS`).
    """
    reviews, pairs = reviews or TFDS_REVIEWS, pairs or TFDS_PAIRS
    data_dir, downloads = root / "data", root / "downloads"
    imdb = {}
    for split, texts in reviews.items():
        for i, text in enumerate(texts):
            imdb[f"aclImdb/{split}/{'pos' if i % 2 else 'neg'}/{i}_{i % 10}.txt"] = text
    imdb["aclImdb/train/unsup/0_0.txt"] = "an unlabelled review"
    prepare_tfds("imdb_reviews", IMDB_URL, tar_gz(imdb), data_dir, downloads)
    mtnt = {
        f"MTNT/{split}/{split}.en-fr.tsv": "".join(f"{split}{i}\t{s}\t{d}\n" for i, (s, d) in enumerate(split_pairs))
        for split, split_pairs in pairs.items()
    }
    prepare_tfds("mtnt/en-fr", MTNT_URL, tar_gz(mtnt), data_dir, downloads)
    return str(data_dir)


def unmatched_layout(directory):
    """A copy of the gemma_tp layout with one more rule, which matches no variable; returns its path."""
    from keras_tune.distribution import layout_dir

    layout = json.loads((layout_dir() / "gemma_tp.json").read_text())
    layout["rules"].append({"pattern": "decoder_block.*mlp/kernel", "axes": [None, "model"]})
    path = directory / "broken.json"
    path.write_text(json.dumps(layout))
    return str(path)


# --------------------------------------------------------------------------
# Runs: adapters, metrics, processes


def adapter_arrays(path):
    """The arrays of an adapter .npz file, {name: array}, without its metadata entries (`__...`)."""
    with np.load(path) as data:
        return {key: np.array(data[key]) for key in data.files if not key.startswith("__")}


def max_diff(a, b):
    """The largest absolute difference between two {name: array} dicts of the same names."""
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


COMPARED = ("step", "loss", "learning_rate", "val_loss", "val_perplexity", "val_accuracy")


def assert_same_metrics(a, b, steps):
    """The two run directories logged the same rows of metrics.csv.

    Args:
        a, b: the run directories.
        steps: the rows are steps 0..steps; None: any steps, but the same in both.
    """
    import pytest

    from keras_tune.rundir import read_rows

    rows_a, rows_b = read_rows(os.path.join(a, "metrics.csv")), read_rows(os.path.join(b, "metrics.csv"))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    if steps is not None:
        assert [r["step"] for r in rows_a] == list(range(steps + 1))
    for row_a, row_b in zip(rows_a, rows_b):
        for column in COMPARED:
            if row_a[column] is None:
                assert row_b[column] is None, (row_a["step"], column)
            else:
                assert row_b[column] == pytest.approx(row_a[column], rel=1e-4, abs=1e-6), (row_a["step"], column)


def subprocess_env():
    """This process's environment, with Python's output unbuffered (a child's log is whole when it is killed)."""
    return dict(os.environ, PYTHONUNBUFFERED="1")


def run_to_end(command, timeout_s=300):
    """Runs `command` from the repository root to its end; returns the CompletedProcess (text output captured)."""
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=timeout_s)


def kill_9_once_written(command, checkpoint, log_path, limit_s=240):
    """Starts `command` and kill -9s it once the directory `checkpoint` exists.

    It is killed as well when `limit_s` pass first; it may also have ended by itself.

    Args:
        command: the argv (from the repository root, `subprocess_env()`).
        checkpoint: the directory (pathlib.Path) whose appearance is awaited.
        log_path: where the process's stdout and stderr go.
        limit_s: the most seconds to wait.

    Returns:
        The process, finished.
    """
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
        deadline = time.time() + limit_s
        while not checkpoint.is_dir() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    return process


# --------------------------------------------------------------------------
# Models: sharding, one training step, losses


def lora_model_under_plan(preset, overrides, devices=None):
    """A LoRA model of `preset` built under its sharding plan, whose distribution stays set (conftest resets it).

    Args:
        preset: the preset name.
        overrides: config overrides (the mesh and layout among them).
        devices: the devices of the mesh (default: all).

    Returns:
        (config, plan, causal_lm).
    """
    import keras

    from keras_tune import config as config_lib
    from keras_tune.distribution import plan_sharding
    from keras_tune.lora import apply_lora
    from keras_tune.models.loader import abstract_model, load_causal_lm

    config = config_lib.load_config(preset, overrides=overrides)
    plan = plan_sharding(config, abstract_model(config).weights, devices=devices)
    keras.distribution.set_distribution(plan.distribution())
    causal_lm = load_causal_lm(config)
    apply_lora(causal_lm, config.lora.rank, config.lora.targets)
    return config, plan, causal_lm


def assert_planned_specs(causal_lm, plan):
    """Asserts that every backbone variable carries the PartitionSpec `plan` gives it.

    Returns:
        [(variable path, planned axes)] of every backbone variable, in order.
    """
    expected = {p.path: p.axes for p in plan.placements}
    checked = []
    for variable in causal_lm.backbone.weights:
        spec = tuple(variable.value.sharding.spec)
        axes = expected[variable.path]
        assert spec + (None,) * (len(axes) - len(spec)) == axes, variable.path
        checked.append((variable.path, axes))
    return checked


def one_step(preset, mesh, devices):
    """One training step of `preset` (LoRA, seed 7) on `mesh` over `devices`, on a fixed batch with a prompt.

    Returns:
        (loss, {path: LoRA weight after}, {path: base weight before}, {path: base weight after}).
    """
    import keras

    from keras_tune.optim import build_optimizer

    config, _, causal_lm = lora_model_under_plan(preset, {"distribution.mesh": mesh, "train.seed": 7}, devices)
    causal_lm.compile(
        optimizer=build_optimizer(config.optimizer, total_steps=10),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    batch, length = config.data.batch_size, config.data.seq_len
    tokens = rng.integers(4, 1000, size=(batch, length + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((batch, length), bool)}
    weights = np.ones((batch, length), "float32")
    weights[:, :5] = 0.0  # a prompt: no loss there
    base_before = {v.path: np.array(v.numpy()) for v in causal_lm.backbone.weights if "lora" not in v.path}
    causal_lm.preprocessor = None
    loss = float(causal_lm.train_on_batch(x, tokens[:, 1:], sample_weight=weights, return_dict=True)["loss"])
    lora = {v.path: np.array(v.numpy()) for v in causal_lm.backbone.trainable_weights}
    base_after = {v.path: np.array(v.numpy()) for v in causal_lm.backbone.weights if "lora" not in v.path}
    keras.distribution.set_distribution(None)
    return loss, lora, base_before, base_after


def loss_batch(vocabulary, kind, seed=0, batch=4, length=24):
    """A random batch for the loss tests, row 1 padded from position 18.

    Args:
        vocabulary: the vocabulary size (ids are drawn from 3 up).
        kind: "targets" (loss from position 10 on, as translation data), "key_tokens" (a weight
            factor per row, as the code recipe's) or anything else (every real position).
        seed: the random seed.
        batch: the rows (4 for "key_tokens").
        length: the sequence length.

    Returns:
        (x, y, weight).
    """
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(3, vocabulary, size=(batch, length)).astype(np.int32)
    token_ids[:, 0] = 2
    padding_mask = np.ones((batch, length), bool)
    padding_mask[1, 18:] = False
    targets = np.concatenate([token_ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    weight = padding_mask.astype(np.float32)
    weight[:, -1] = 0
    if kind == "targets":  # loss on a target span only, as translation data
        weight[:, :10] = 0
    elif kind == "key_tokens":  # the code recipe's key-token factor per row
        weight *= np.array([1.0, 2.5, 1.0, 4.0], np.float32)[:, None]
    return {"token_ids": token_ids, "padding_mask": padding_mask}, targets, weight


def loss_and_grads(model, x, y, weight):
    """The weighted mean loss of `model` on (x, y) and its gradients for the trainable variables (jitted).

    A `SparseLossModel` gives its per-position loss itself; any other model, logits.
    """
    import jax
    import keras

    from keras_tune import losses

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss_fn(values):
        output, _ = model.stateless_call(values, non_trainable, x, training=False)
        if output.shape[-1] == 2 and isinstance(model, losses.SparseLossModel):
            per_position = output[..., 0]
        else:
            per_position = keras.losses.sparse_categorical_crossentropy(y, output, from_logits=True)
        return (per_position * weight).sum() / weight.sum()

    return jax.jit(jax.value_and_grad(loss_fn))(trainable)


def lora_layers(causal_lm):
    """The backbone's layers that have LoRA enabled."""
    from keras_tune import compat

    return [layer for layer in compat.sublayers(causal_lm.backbone) if getattr(layer, "lora_enabled", False)]


def fixed_logits(causal_lm):
    """The logits of `causal_lm` on a fixed unpadded batch of 2 x 16 tokens (ids 4 to 35)."""
    tokens = np.arange(4, 36, dtype="int32").reshape(2, 16)
    return np.asarray(causal_lm({"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}))


# --------------------------------------------------------------------------
# A tiny Gemma 3 and its GGUF files


# The tiny Gemma 3 of the GGUF tests (a keras_hub.models.Gemma3Backbone's arguments).
TINY_ARCH = dict(
    vocabulary_size=1024, image_size=None, num_layers=2, num_query_heads=4, num_key_value_heads=1, hidden_dim=64,
    intermediate_dim=128, head_dim=16, query_head_dim_normalize=True, use_query_key_norm=True, use_post_ffw_norm=True,
    use_post_attention_norm=True, use_sliding_window_attention=True, sliding_window_size=8, layer_norm_epsilon=1e-6,
)
# Token ids of one test sequence (within the tiny vocabulary).
TINY_IDS = [2, 17, 300, 5, 999, 42, 8, 8, 8, 511, 1000, 3, 77, 64, 12, 700, 33, 1]


def randomize_for_gguf(backbone, seed=0):
    """Random weights; norm scales on a 1/64 grid so llama.cpp's +1 round-trips exactly."""
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        if variable.path.endswith("scale"):
            value = rng.integers(-32, 33, size=variable.shape) / 64.0
        else:
            value = rng.normal(0.0, 0.08, size=variable.shape)
        variable.assign(value.astype("float32"))


def tiny_causal_lm(seed=0, sequence_length=32):
    """A `TINY_ARCH` Gemma 3 causal LM with random weights (`randomize_for_gguf`) and the tiny tokenizer."""
    import keras_hub

    from keras_tune.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer("gemma3")
    backbone = keras_hub.models.Gemma3Backbone(**TINY_ARCH)
    randomize_for_gguf(backbone, seed)
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer, image_converter=None, sequence_length=sequence_length
    )
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)


def sequence_logits(causal_lm, token_ids):
    """Logits of one sequence, through one jitted call (eager op-by-op dispatch is slow when sharded)."""
    import jax

    token_ids = np.asarray(token_ids, dtype="int32")[None, :]
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    forward = jax.jit(lambda trainable, other, x: causal_lm.stateless_call(trainable, other, x)[0])
    trainable = [v.value for v in causal_lm.trainable_variables]
    other = [v.value for v in causal_lm.non_trainable_variables]
    return np.asarray(forward(trainable, other, inputs), dtype="float32")


def tp_layout_map(mesh):
    """A Keras LayoutMap that shards a Gemma 3's embedding, queries and MLP over the `model` axis of `mesh`."""
    import keras

    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["token_embedding/embeddings"] = ("model", None)
    layout_map["decoder_block.*attention/query/kernel"] = (None, "model", None)
    layout_map["decoder_block.*ffw_gating(_2)?/kernel"] = (None, "model")
    layout_map["decoder_block.*ffw_linear/kernel"] = ("model", None)
    return layout_map


def copy_gguf(source_path, path, convert):
    """Rewrites a GGUF tensor by tensor: `convert(name, float32 array)` -> (array, raw ggml type or None).

    Args:
        source_path: the GGUF file to read.
        path: the GGUF file to write (metadata copied).
        convert: what each tensor becomes.

    Returns:
        `path`.
    """
    import gguf

    from keras_tune.models.gguf.file import read_gguf

    with read_gguf(source_path) as source:
        writer = gguf.GGUFWriter(str(path), source.metadata["general.architecture"])
        for key, value in source.metadata.items():
            if key == "general.architecture":
                continue
            if isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, (list, np.ndarray)):
                writer.add_array(key, list(value) if isinstance(value, list) else value.tolist())
            elif isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            else:
                writer.add_uint32(key, value)
        for name in source.tensors:
            array, raw_dtype = convert(name, source.tensor(name))
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def q8_0(name, array):
    """A `copy_gguf` conversion: 2-D tensors to Q8_0 (as llama-quantize would), norms stay F32."""
    import gguf

    if array.ndim < 2:
        return array, None
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


# --------------------------------------------------------------------------
# Serving: adapters, a server in a thread, waiting


def random_adapter(preset, path, seed, rank=4, targets=("query", "value")):
    """Writes an adapter of `preset` whose LoRA weights are random (as after training); returns its path.

    Args:
        preset: the base preset (a tiny one).
        path: the .npz to write.
        seed: the weights' random seed.
        rank: the LoRA rank.
        targets: the adapted layers.
    """
    from keras_tune import config as config_lib
    from keras_tune.lora import apply_lora, save_adapter
    from keras_tune.models.loader import load_causal_lm

    causal_lm = load_causal_lm(config_lib.load_config(preset))
    apply_lora(causal_lm, rank, tuple(targets))
    rng = np.random.default_rng(seed)
    for layer in lora_layers(causal_lm):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(0, 0.5, size=variable.shape).astype("float32"))
    save_adapter(causal_lm, str(path), preset=preset)
    return str(path)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_in_thread(app, port, timeout_s=60):
    """Runs an ASGI app with uvicorn on 127.0.0.1:`port` in a thread; returns a function that stops it.

    Args:
        app: the application.
        port: a free port.
        timeout_s: the most seconds to wait for it to listen (and, when stopping, to end).
    """
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, timeout_s), "the server did not start"

    def stop():
        server.should_exit = True
        thread.join(timeout_s)
        assert not thread.is_alive(), "the server did not stop"

    return stop


def wait_until(predicate, timeout_s, interval_s=0.05):
    """Polls `predicate` until it is true or `timeout_s` pass; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


# --------------------------------------------------------------------------
# Gemma 4: the tiny models, keras-hub's twin of one, one training step


def gemma4_causal_lm(preset, seed=0, overrides=None):
    """A tiny Gemma 4 preset's CausalLM (keras_tune's loader) with its norm and router scales set at random.

    Scales of exactly 1 would hide a norm applied as `1 + scale` or a scale left out.

    Returns:
        (config, causal_lm).
    """
    from keras_tune import config as config_lib
    from keras_tune.models.loader import load_causal_lm

    config = config_lib.load_config(preset, overrides=overrides or {})
    causal_lm = load_causal_lm(config)
    rng = np.random.default_rng(seed)
    for variable in causal_lm.backbone.weights:
        if variable.path.endswith("scale") and variable.trainable:
            variable.assign((1.0 + rng.normal(0.0, 0.2, size=variable.shape)).astype("float32"))
    return config, causal_lm


def kerashub_gemma4_twin(causal_lm):
    """keras-hub's own `Gemma4CausalLM` with the architecture and weights of a keras_tune Gemma 4 (its preprocessor shared)."""
    import keras_hub

    backbone = causal_lm.backbone
    config = backbone.get_config()
    arguments = {k: v for k, v in config.items() if k not in ("name", "trainable", "dtype", "router_aux_loss_weight")}
    twin = keras_hub.models.Gemma4Backbone(**arguments, dtype="float32")
    values = {variable.path: variable for variable in backbone.weights}
    for variable in twin.weights:
        variable.assign(np.asarray(values[variable.path]))
    return keras_hub.models.Gemma4CausalLM(backbone=twin, preprocessor=causal_lm.preprocessor)


def kerashub_gemma4_logits(twin, token_ids, padding_mask):
    """keras-hub's Gemma 4 logits (it takes the positions as an input: 0, 1, ... a row)."""
    positions = np.ascontiguousarray(np.broadcast_to(np.arange(token_ids.shape[1], dtype="int32"), token_ids.shape))
    return jitted_logits(twin, {"token_ids": token_ids, "padding_mask": padding_mask, "position_ids": positions})


def random_lora(causal_lm, targets, seed=1):
    """LoRA rank 4 on `targets`, every factor random (B too: an update that is not zero)."""
    from keras_tune.lora import apply_lora

    apply_lora(causal_lm, 4, targets, alpha=8.0)
    rng = np.random.default_rng(seed)
    for variable in causal_lm.backbone.trainable_weights:
        variable.assign(rng.normal(0.0, 0.05, size=variable.shape).astype("float32"))


def sgd_step(preset, mesh, devices, targets, learning_rate=0.1):
    """One SGD step of LoRA (rank 4, `targets`, seed 7) on a fixed batch with a prompt, on `mesh`.

    SGD's update is the gradient times the rate, so two meshes' updates agree
    to the gradients' rounding (Adam's first step divides near-zero gradients by
    themselves).

    Returns:
        (loss, {path: LoRA weight after}).
    """
    import keras

    overrides = {"distribution.mesh": mesh, "train.seed": 7, "lora.targets": tuple(targets)}
    config, _, causal_lm = lora_model_under_plan(preset, overrides, devices)
    causal_lm.compile(optimizer=keras.optimizers.SGD(learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    batch, length = config.data.batch_size, config.data.seq_len
    tokens = rng.integers(4, 1000, size=(batch, length + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((batch, length), bool)}
    weights = np.ones((batch, length), "float32")
    weights[:, :5] = 0.0
    causal_lm.preprocessor = None
    loss = float(causal_lm.train_on_batch(x, tokens[:, 1:], sample_weight=weights, return_dict=True)["loss"])
    lora = {v.path: np.array(v.numpy()) for v in causal_lm.backbone.trainable_weights}
    keras.distribution.set_distribution(None)
    return loss, lora


def transformers_logits(directory, token_ids, adapter=None):
    """Logits of a Transformers checkpoint directory (and a PEFT adapter on it, unmerged) on `token_ids`, float32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(token_ids), dtype=torch.long)).logits.numpy()


def jitted_logits(model, inputs):
    """`model(inputs)` as a numpy array, through one jitted call (Keras' eager op-by-op dispatch is slow on CPU)."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    other = [v.value for v in model.non_trainable_variables]
    return np.asarray(jax.jit(lambda t, o, x: model.stateless_call(t, o, x)[0])(trainable, other, inputs))


# --------------------------------------------------------------------------
# Objectives: preference pairs


# Words the "chosen" responses of `write_preferences` are made of, and those of the "rejected" ones.
PREFERRED_WORDS = ("blue", "calm", "green", "soft", "bright", "warm", "clear", "kind")
DISPREFERRED_WORDS = ("red", "loud", "grey", "hard", "dark", "cold", "dull", "rude")


def write_preferences(path, count=96, seed=0, form="text"):
    """A JSONL of preference records whose chosen responses use one set of words and rejected ones another.

    No model has seen that pattern: a random-init model prefers either side of a pair about
    as often, and a tuned one learns to prefer the chosen words.

    Args:
        path: the file to write.
        count: records.
        seed: the words' random seed.
        form: "text" (prompt, chosen, rejected strings), "messages" (a prompt of messages and
            responses of one model message each) or "implicit" (two whole conversations).

    Returns:
        The path, as a string.
    """
    rng = random.Random(seed)
    with open(path, "w") as file:
        for i in range(count):
            prompt = f"Describe the thing number {i % 11}:"
            chosen = " ".join(rng.choice(PREFERRED_WORDS) for _ in range(rng.randint(3, 6)))
            rejected = " ".join(rng.choice(DISPREFERRED_WORDS) for _ in range(rng.randint(3, 6)))
            if form == "messages":
                record = {"prompt": [{"role": "user", "content": prompt}],
                          "chosen": [{"role": "assistant", "content": chosen}],
                          "rejected": [{"role": "assistant", "content": rejected}]}
            elif form == "implicit":
                user = {"role": "user", "content": prompt}
                record = {"chosen": [user, {"role": "model", "content": chosen}],
                          "rejected": [user, {"role": "model", "content": rejected}]}
            else:
                record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            file.write(json.dumps(record) + "\n")
    return str(path)

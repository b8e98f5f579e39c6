"""The sparse loss path: logits only where the loss is, in chunks; the same loss and gradients as keras-hub's."""

import jax
import numpy as np
import pytest
import tensorflow as tf

from keras_tune import config as config_lib
from keras_tune import losses, training
from keras_tune.models.loader import build_model
from keras_tune.rundir import read_rows

from helpers import loss_and_grads, loss_batch, write_corpus


def test_capacities_are_a_few_multiples_of_8():
    assert losses.capacities(128) == [16, 32, 64, 128]
    assert losses.capacities(20) == [8, 16, 20]
    assert losses.capacities(128, losses.BRANCH_FRACTIONS) == [32, 64, 128]  # a compiled step's branches


def test_loss_positions_list_the_weighted_positions_first_in_order():
    weight = np.array([[0, 1, 1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]], np.float32)
    targets = np.arange(16, dtype=np.int32).reshape(2, 8)
    x = {"token_ids": tf.constant(targets), "padding_mask": tf.ones([2, 8], tf.bool)}
    out, y, w = losses.add_loss_positions(x, tf.constant(targets), tf.constant(weight))
    positions = out["loss_positions"].numpy()
    assert positions.shape == (2, 8)  # 3 positions carry loss; capacities of 8 are [8]
    assert positions.tolist() == [[1, 2, 5, 0, 3, 4, 6, 7], [4, 0, 1, 2, 3, 5, 6, 7]]  # loss first, then the rest
    assert "loss_counts" not in out and out["targets"].numpy().tolist() == targets.tolist()
    branched = losses.add_loss_positions(x, tf.constant(targets), tf.constant(weight), layout=losses.BRANCHED)[0]
    assert branched["loss_positions"].numpy().tolist() == positions.tolist()
    assert branched["loss_counts"].numpy().tolist() == [3, 1]
    wide = {"token_ids": tf.zeros([2, 128], tf.int32), "padding_mask": tf.ones([2, 128], tf.bool)}
    few = np.zeros([2, 128], np.float32)
    few[0, 100:120] = 1  # 20 positions: capacity 32
    shaped = losses.add_loss_positions(wide, tf.zeros([2, 128], tf.int32), tf.constant(few))[0]
    assert shaped["loss_positions"].shape == (2, 32)
    for layout in (losses.BRANCHED, losses.WHOLE_ROW):
        out = losses.add_loss_positions(wide, tf.zeros([2, 128], tf.int32), tf.constant(few), layout=layout)[0]
        assert out["loss_positions"].shape == (2, 128)
        assert out["loss_positions"].numpy()[0, :20].tolist() == list(range(100, 120))
        assert ("loss_counts" in out) == (layout == losses.BRANCHED)


def test_branched_batches_of_any_fullness_have_one_shape_so_the_step_compiles_once():
    rows = np.zeros([3, 2, 128], np.float32)
    rows[0, 0, 100:110] = 1  # 10 loss positions: capacity 16
    rows[1, 1, 20:80] = 1  # 60: capacity 64
    rows[2, :, :] = 1  # every position: 128
    dataset = tf.data.Dataset.from_tensor_slices(
        ({"token_ids": tf.zeros([3, 2, 128], tf.int32), "padding_mask": tf.ones([3, 2, 128], tf.bool)},
         tf.zeros([3, 2, 128], tf.int32), rows))
    branched = losses.with_loss_positions(dataset, losses.BRANCHED)
    assert branched.element_spec[0]["loss_positions"].shape.as_list() == [2, 128]
    assert [b[0]["loss_counts"].numpy().max() for b in branched] == [10, 60, 128]
    shaped = losses.with_loss_positions(dataset, losses.SHAPED)
    assert [b[0]["loss_positions"].shape[1] for b in shaped] == [16, 64, 128]  # a compiled step each
    with pytest.raises(ValueError, match="layout must be one of"):
        losses.with_loss_positions(dataset, "ragged")
    with pytest.raises(ValueError, match="layout must be one of"):  # the map itself refuses it too
        losses.add_loss_positions({"token_ids": tf.zeros([2, 8], tf.int32)}, tf.zeros([2, 8], tf.int32),
                                  tf.ones([2, 8]), layout="ragged")


def test_a_run_picks_the_loss_positions_layout_from_its_data_and_base():
    assert losses.loss_positions_layout(0.15, quantized=False) == losses.SHAPED
    assert losses.loss_positions_layout(0.15, quantized=True) == losses.BRANCHED
    assert losses.loss_positions_layout(0.5, quantized=True) == losses.BRANCHED
    # Loss on more than half the positions: every batch needs the whole row.
    assert losses.loss_positions_layout(0.9, quantized=False) == losses.WHOLE_ROW
    assert losses.loss_positions_layout(0.9, quantized=True) == losses.WHOLE_ROW


def test_the_head_runs_at_the_smallest_capacity_that_holds_the_fullest_row():
    """The branch is picked by `loss_counts`: positions past the capacity get no NLL (their weight is 0 in real batches)."""
    config = config_lib.load_config("gemma_tiny", overrides={"distribution.mesh": "1x1"})
    trainer = losses.SparseLossModel(build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm)
    length = 24  # branches 8, 16, 24
    x = {"token_ids": np.full((2, length), 5, np.int32), "padding_mask": np.ones((2, length), bool),
         "loss_positions": np.tile(np.arange(length, dtype=np.int32), (2, 1)), "targets": np.full((2, length), 7, np.int32)}
    for counts, capacity in (([3, 1], 8), ([9, 2], 16), ([8, 8], 8), ([1, 17], 24)):
        out = np.asarray(trainer({**x, "loss_counts": np.array(counts, np.int32)})[..., 0])
        assert (out[:, :capacity] > 0).all() and (out[:, capacity:] == 0).all(), (counts, capacity)
    without_counts = np.asarray(trainer({**x, "loss_positions": x["loss_positions"][:, :16]})[..., 0])
    assert (without_counts[:, :16] > 0).all() and (without_counts[:, 16:] == 0).all()  # the positions' width


def _small_blocks(monkeypatch):
    """Chunks of 16 tokens take the table 256 rows a block (the real vocabularies: 65,536)."""
    monkeypatch.setattr(losses, "LOGITS_PER_BLOCK", 16 * 256)
    monkeypatch.setattr(losses, "MIN_BLOCK_ROWS", 32)
    monkeypatch.setattr(losses, "WHOLE_TABLE_LOGITS", 0)  # float tables in blocks as well


def test_block_rows_divide_the_vocabulary_and_grow_as_chunks_shrink():
    assert losses.vocabulary_block_rows(262144, 256) == 4096  # 1M logits: 4 MiB of float32
    assert losses.vocabulary_block_rows(262144, 64) == 16384
    assert losses.vocabulary_block_rows(262144, 1 << 20) == 512  # never below MIN_BLOCK_ROWS
    assert losses.vocabulary_block_rows(256000, 256) == 4000  # Gemma 1 and 2: a divisor
    assert losses.vocabulary_block_rows(1000, 256) == 1000  # small: whole
    assert losses.vocabulary_block_rows(262147, 256) == 262147  # a prime: no divisor near, whole
    # A table used as stored is taken whole while a chunk's logits are at most 32M (128 MiB).
    assert losses.vocabulary_block_rows(262144, 128, whole_when_small=True) == 262144
    assert losses.vocabulary_block_rows(262144, 129, whole_when_small=True) == 4096
    assert losses.vocabulary_block_rows(256000, 256, whole_when_small=True) == 4000
    # A converted (int8) block is held to 1M floats as well: 1,024 rows of 640 (the 270M), 512 of 2,048.
    assert losses.vocabulary_block_rows(262144, 64, converted_width=640) == 1024
    assert losses.vocabulary_block_rows(262144, 1024, converted_width=640) == 1024
    assert losses.vocabulary_block_rows(256000, 256, converted_width=2048) == 512


def test_a_float_table_is_taken_whole_for_small_chunks_and_an_int8_one_in_blocks(monkeypatch):
    monkeypatch.setattr(losses, "WHOLE_TABLE_LOGITS", 16 * 1024)
    monkeypatch.setattr(losses, "LOGITS_PER_BLOCK", 16 * 32)
    monkeypatch.setattr(losses, "MIN_BLOCK_ROWS", 32)
    for quantize in ("", "int8"):
        config = config_lib.load_config("gemma3_tiny", overrides={"distribution.mesh": "1x1", "train.quantize": quantize})
        head = losses.TiedHead(build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm.backbone.token_embedding)
        vocabulary = head.embedding.input_dim
        assert vocabulary == 1024  # 16 tokens x 1,024 rows: at the whole-table limit
        assert head.block_rows(16) == (32 if quantize else vocabulary), quantize
        assert head.block_rows(17) == 32, quantize


@pytest.mark.parametrize("mesh", ["1x1", "1x8"])
@pytest.mark.parametrize("preset", ["gemma_tiny", "gemma2_tiny", "gemma3_tiny"])
def test_sparse_loss_and_gradients_equal_the_full_logits_path(preset, mesh, monkeypatch):
    _small_blocks(monkeypatch)  # the tiny vocabularies in several blocks
    devices = jax.devices()[:1] if mesh == "1x1" else None
    config = config_lib.load_config(preset, overrides={"distribution.mesh": mesh, "lora.targets": "query,value,ffw_linear"})
    causal_lm = build_model(config, lora=True, devices=devices).causal_lm
    rng = np.random.default_rng(3)
    for variable in causal_lm.trainable_variables:  # LoRA B starts at 0: make every adapter matter
        variable.assign(rng.normal(0, 0.02, variable.shape).astype("float32"))
    trainer = losses.SparseLossModel(causal_lm, chunk_tokens=16)  # several chunks, the last one padded
    assert 32 <= losses.TiedHead(causal_lm.backbone.token_embedding).block_rows(16) < causal_lm.backbone.vocabulary_size
    if preset == "gemma2_tiny":
        assert causal_lm.backbone.final_logit_soft_cap  # the soft-cap is on this path
    for kind in ("targets", "key_tokens", "all"):
        x, y, weight = loss_batch(causal_lm.backbone.vocabulary_size, kind)
        full_loss, full_grads = loss_and_grads(causal_lm, x, y, weight)
        sparse_x, _, _ = losses.add_loss_positions(
            {k: tf.constant(v) for k, v in x.items()}, tf.constant(y), tf.constant(weight)
        )
        assert sparse_x["loss_positions"].shape[1] < 24 or kind != "targets"
        sparse_loss, sparse_grads = loss_and_grads(trainer, {k: np.asarray(v) for k, v in sparse_x.items()}, y, weight)
        np.testing.assert_allclose(sparse_loss, full_loss, rtol=1e-5)
        for full, sparse in zip(full_grads, sparse_grads):
            scale = float(np.abs(full).max())
            np.testing.assert_allclose(sparse, full, rtol=1e-5, atol=1e-5 * scale)


def _compare_sparse_and_full(causal_lm, chunk_tokens=16, kinds=("targets", "key_tokens", "all"), layout=losses.SHAPED):
    trainer = losses.SparseLossModel(causal_lm, chunk_tokens=chunk_tokens)
    for kind in kinds:
        x, y, weight = loss_batch(causal_lm.backbone.vocabulary_size, kind)
        full_loss, full_grads = loss_and_grads(causal_lm, x, y, weight)
        sparse_x, _, _ = losses.add_loss_positions(
            {k: tf.constant(v) for k, v in x.items()}, tf.constant(y), tf.constant(weight), layout=layout
        )
        sparse_loss, sparse_grads = loss_and_grads(trainer, {k: np.asarray(v) for k, v in sparse_x.items()}, y, weight)
        np.testing.assert_allclose(sparse_loss, full_loss, rtol=1e-5, err_msg=kind)
        assert len(full_grads) == len(sparse_grads) == len(causal_lm.trainable_variables)
        for variable, full, sparse in zip(causal_lm.trainable_variables, full_grads, sparse_grads):
            scale = float(np.abs(full).max())
            np.testing.assert_allclose(sparse, full, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{kind} {variable.path}")


def test_a_whole_float_table_gives_the_full_paths_loss_and_gradients():
    """Small chunks take a float table whole (one block): same loss and gradients, soft-cap included."""
    config = config_lib.load_config("gemma2_tiny", overrides={"distribution.mesh": "1x1", "lora.targets": "query,value,ffw_linear"})
    causal_lm = build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm
    assert losses.TiedHead(causal_lm.backbone.token_embedding).block_rows(16) == causal_lm.backbone.vocabulary_size
    rng = np.random.default_rng(5)
    for variable in causal_lm.trainable_variables:
        variable.assign(rng.normal(0, 0.02, variable.shape).astype("float32"))
    _compare_sparse_and_full(causal_lm, kinds=("targets", "all"))


@pytest.mark.parametrize("preset", ["gemma2_tiny", "gemma3_tiny"])
def test_full_fine_tuning_gets_the_same_embedding_gradient(preset, monkeypatch):
    """lora.rank 0: the tied table trains, through the head's hand-written gradient too (block by block).

    Gemma 3 takes its batches branched (the capacity picked in a `lax.switch`): the table's gradient comes out of it.
    """
    _small_blocks(monkeypatch)
    config = config_lib.load_config(preset, overrides={"distribution.mesh": "1x1", "lora.rank": 0})
    causal_lm = build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm
    embedding = causal_lm.backbone.token_embedding.embeddings
    assert any(v is embedding for v in causal_lm.trainable_variables)
    layout = losses.BRANCHED if preset == "gemma3_tiny" else losses.SHAPED
    _compare_sparse_and_full(causal_lm, kinds=("targets", "all"), layout=layout)


def _table_block_matmuls(jaxpr, block_shape):
    """dot_generals in `jaxpr` (and the jaxprs inside it) with a `block_shape` operand or result."""
    count = 0
    for eqn in jaxpr.eqns:
        shapes = [tuple(v.aval.shape) for v in list(eqn.invars) + list(eqn.outvars) if hasattr(v.aval, "shape")]
        if eqn.primitive.name == "dot_general" and block_shape in shapes:
            count += 1
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    count += _table_block_matmuls(inner, block_shape)
    return count


@pytest.mark.parametrize("rank", [4, 0])
def test_a_frozen_table_takes_two_head_matmuls_a_block_and_a_trained_one_four(rank, monkeypatch):
    """LoRA (the table frozen): the states' gradient is made in the forward sweep, as the plain path's two
    matmuls; full fine-tuning recomputes each block's logits in the backward pass and also pulls back into the table."""
    _small_blocks(monkeypatch)
    config = config_lib.load_config("gemma3_tiny", overrides={"distribution.mesh": "1x1", "lora.rank": rank})
    embedding = build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm.backbone.token_embedding
    head = losses.TiedHead(embedding)
    assert head.table_gradient == (rank == 0)
    tokens, width = 16, embedding.output_dim
    rows = head.block_rows(tokens)
    assert rows not in (tokens, embedding.input_dim)  # blocks, and told apart from the token axis
    hidden = np.random.default_rng(0).normal(size=(tokens, width)).astype("float32")
    targets = np.arange(tokens, dtype="int32") * 7
    jaxpr = jax.make_jaxpr(jax.grad(lambda h: losses.head_nll(h, targets, head, chunk_tokens=tokens)[0].sum()))(hidden)
    assert _table_block_matmuls(jaxpr.jaxpr, (rows, width)) == (2 if rank else 4)


def test_an_int8_table_in_vocabulary_blocks_equals_keras_int8_head(monkeypatch):
    """--quantize int8: the sparse head's online log-sum-exp over blocks of rows equals keras' int8 logits.

    Batches come branched, as a quantized run's do (one compiled step, the capacity picked in a `lax.switch`).
    """
    _small_blocks(monkeypatch)
    config = config_lib.load_config("gemma2_tiny", overrides={
        "distribution.mesh": "1x1", "train.quantize": "int8", "lora.targets": "query,value,ffw_linear",
    })
    causal_lm = build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm
    head = losses.TiedHead(causal_lm.backbone.token_embedding)
    assert head.quantized and 32 <= head.block_rows(16) <= 256 < causal_lm.backbone.vocabulary_size
    rng = np.random.default_rng(4)
    for variable in causal_lm.trainable_variables:
        variable.assign(rng.normal(0, 0.02, variable.shape).astype("float32"))
    _compare_sparse_and_full(causal_lm, chunk_tokens=16, layout=losses.BRANCHED)


@pytest.mark.slow
def test_the_real_270m_validation_loss_is_the_full_paths(tmp_path):
    """The issue's check on the real model: validation loss of sparse vs full within 1e-4 (relative)."""
    from benchmarks.loss_path import write_code_corpus
    from benchmarks.validation_quality import evaluate_row

    data_path = write_code_corpus(tmp_path, count=16)
    one_device = jax.devices()[:1]
    sparse = evaluate_row(data_path, 16, {"train.loss": "sparse"}, devices=one_device)
    full = evaluate_row(data_path, 16, {"train.loss": "full"}, devices=one_device)
    assert sparse[3] == full[3] > 100  # the same loss tokens
    assert abs(sparse[0] - full[0]) <= 1e-4 * abs(full[0]), (sparse, full)
    assert abs(sparse[1] - full[1]) <= 1e-4 * abs(full[1]), (sparse, full)
    assert 1.0 < full[0] < 5.0  # a pretrained model on Python source


def _run(tmp_path, loss):
    corpus = write_corpus(tmp_path / "corpus.txt")
    config = config_lib.load_config("gemma_tiny", overrides={
        "data.name": "text", "data.path": corpus, "train.steps": 4, "train.eval_every": 2,
        "train.output_dir": str(tmp_path / loss), "train.loss": loss, "train.loss_chunk_tokens": 32,
    })
    return training.run(config), read_rows(str(tmp_path / loss / "metrics.csv"))


def test_a_sparse_run_logs_the_same_losses_and_metrics_as_a_full_one(tmp_path):
    sparse, sparse_rows = _run(tmp_path, "sparse")
    full, full_rows = _run(tmp_path, "full")
    assert [r["step"] for r in sparse_rows] == [r["step"] for r in full_rows] == [0, 1, 2, 3, 4]
    for column in ("loss", "val_loss", "val_perplexity", "val_accuracy"):
        got = [r[column] for r in sparse_rows if r[column] is not None]
        want = [r[column] for r in full_rows if r[column] is not None]
        np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=column)
    assert sparse.validation["loss"] == pytest.approx(full.validation["loss"], rel=2e-5)

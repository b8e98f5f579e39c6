"""The four tools' one front door: shared model flags, one-line errors, the export tool."""

import os

import numpy as np
import pytest

from keras_tune import cli, evaluate, export, fit, generate
from keras_tune import config as config_lib
from keras_tune.lora import apply_lora, save_adapter
from keras_tune.models.loader import build_model, load_causal_lm
from keras_tune.models import families

PARSERS = {
    "fit": fit.build_parser,
    "generate": generate.build_parser,
    "evaluate": evaluate.build_parser,
    "export": export.build_parser,
}
# What each tool needs besides the shared flags to parse at all.
POSITIONAL = {"fit": [], "generate": ["a prompt"], "evaluate": ["text.txt"], "export": []}
SHARED = [
    "--preset", "gemma3_tiny", "--weights", "m.gguf", "--adapter", "a.npz", "--mesh", "2x4",
    "--layout", "gemma3_fsdp", "--simulate-devices", "8", "--precision", "bfloat16", "--set", "train.seed=3",
]


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_every_tool_reads_the_shared_model_flags_into_the_same_overrides(tool):
    args = PARSERS[tool]().parse_args(SHARED + POSITIONAL[tool])
    assert args.preset == "gemma3_tiny"
    assert cli.overrides_from_args(args) == {
        "model.weights": "m.gguf", "model.source": "gguf", "model.family": "gemma3", "model.adapter": "a.npz",
        "distribution.mesh": "2x4", "distribution.layout": "gemma3_fsdp", "distribution.simulate_devices": 8,
        "train.precision": "bfloat16", "train.seed": "3",
    }


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_help_prints_every_flag_and_exits_0(tool, capsys):
    """`--help` formats every help text (a bare % in one would make argparse raise instead)."""
    parser = PARSERS[tool]()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    assert flags and all(flag in text for flag in flags), [flag for flag in flags if flag not in text]


def test_the_shared_flags_have_one_help_text_across_tools():
    def help_of(parser, flag):
        return next(action.help for action in parser._actions if flag in action.option_strings)

    for flag in ["--preset", "--config", "--set"] + [row[0] for row in cli.MODEL_FLAGS]:
        texts = {help_of(make(), flag) for make in PARSERS.values()}
        assert len(texts) == 1, (flag, texts)


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_a_missing_adapter_is_one_line_and_exit_2_on_every_tool(tool, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("hello")
    main = {"fit": fit.main, "generate": generate.main, "evaluate": evaluate.main, "export": export.main}[tool]
    extra = {"fit": [], "generate": ["hi"], "evaluate": [str(text)], "export": ["--gguf", str(tmp_path / "x.gguf")]}
    code = main(["--preset", "gemma3_tiny", "--adapter", str(tmp_path / "none.npz"), *extra[tool]])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines == [f"error: --adapter {tmp_path / 'none.npz'}: no such file; expected an adapter .npz"]


@pytest.fixture(scope="module")
def tuned_adapter(tmp_path_factory):
    """A gemma3_tiny adapter whose LoRA B matrices are non-zero, and the logits it gives."""
    import keras

    keras.distribution.set_distribution(None)
    config = config_lib.load_config("gemma3_tiny")
    model = load_causal_lm(config)
    apply_lora(model, 4, ("query", "value"), alpha=8.0)
    rng = np.random.default_rng(0)
    for variable in model.backbone.trainable_weights:
        variable.assign(rng.normal(0, 0.05, variable.shape).astype("float32"))
    path = str(tmp_path_factory.mktemp("adapter") / "adapter.npz")
    save_adapter(model, path, preset="gemma3_tiny")
    return path, _logits(model)


def _logits(model):
    ids = np.array([[2, 17, 29, 5, 40, 41, 8, 9]], dtype="int32")
    return np.asarray(model({"token_ids": ids, "padding_mask": np.ones_like(ids)}))


def test_build_model_loads_the_adapter_and_fit_can_start_from_it(tuned_adapter):
    path, expected = tuned_adapter
    config = config_lib.load_config("gemma3_tiny", overrides={"model.adapter": path, "lora.alpha": 8.0})
    built = build_model(config)
    assert built.adapter["rank"] == 4 and built.seconds > 0
    np.testing.assert_allclose(_logits(built.causal_lm), expected, rtol=1e-5, atol=1e-5)
    trained = build_model(config, lora=True)  # fit's path: LoRA from the config, weights from the file
    np.testing.assert_allclose(_logits(trained.causal_lm), expected, rtol=1e-5, atol=1e-5)


def test_export_writes_every_format_and_the_gguf_reloads_with_the_tuned_logits(tuned_adapter, tmp_path, capsys):
    from keras_tune.models.gguf.load import load_gguf_causal_lm

    path, expected = tuned_adapter
    out = {name: str(tmp_path / name) for name in ("keras", "hf", "peft")}
    gguf_file = str(tmp_path / "tuned.gguf")
    code = export.main([
        "--preset", "gemma3_tiny", "--adapter", path, "--gguf", gguf_file, "--gguf-dtype", "f32",
        "--keras-preset", out["keras"], "--transformers", out["hf"], "--peft", out["peft"],
    ])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"gguf: {gguf_file}" in printed.out
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(out["hf"], name)), name
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert os.path.isfile(os.path.join(out["peft"], name)), name
    assert os.path.isfile(os.path.join(out["keras"], "config.json"))
    reloaded = load_gguf_causal_lm(gguf_file)
    np.testing.assert_allclose(_logits(reloaded), expected, rtol=1e-4, atol=1e-4)


def test_export_refuses_existing_outputs_and_bad_requests_before_building(tuned_adapter, tmp_path, capsys, monkeypatch):
    path, _ = tuned_adapter

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before the outputs were checked")

    monkeypatch.setattr("keras_tune.models.loader.build_model", must_not_build)
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"keep me")
    cases = [
        (["--gguf", str(existing)], f"--gguf {existing}: the file exists; expected a new path"),
        ([], "nothing to export; expected at least one of --gguf, --transformers, --peft, --keras-preset"),
        (["--peft", str(tmp_path / "p")], "--peft needs --adapter FILE"),
    ]
    for argv, message in cases:
        adapter = ["--adapter", path] if "--peft" not in argv else []
        assert export.main(["--preset", "gemma3_tiny", *adapter, *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert existing.read_bytes() == b"keep me"
    assert export.main(["--preset", "gemma_tiny", "--gguf", str(tmp_path / "g.gguf")]) == 2
    assert "expected a Gemma 3 or Gemma 4 preset" in capsys.readouterr().err


def test_gemma1_transformers_export_projects_every_head_like_the_keras_model(tmp_path):
    """keras-hub 0.32 alone keeps key/value head 0 and scrambles the query of non-2B shapes."""
    from keras import ops
    from safetensors.numpy import load_file

    from keras_tune.models.exports.transformers import export_transformers

    model = load_causal_lm(config_lib.load_config("gemma_tiny"))  # 8 key/value heads, 8 x 16 != 64
    export_transformers(model, str(tmp_path / "hf"))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    x = np.random.default_rng(0).normal(size=model.backbone.hidden_dim).astype("float32")
    attention = model.backbone.get_layer("decoder_block_1").attention
    for module, layer in (("q_proj", attention.query_dense), ("k_proj", attention.key_dense),
                          ("v_proj", attention.value_dense)):
        kernel = np.asarray(ops.convert_to_numpy(layer.kernel))  # (heads, hidden, head_dim)
        expected = np.einsum("d,ndh->nh", x, kernel).reshape(-1)
        np.testing.assert_allclose(tensors[f"model.layers.1.self_attn.{module}.weight"] @ x, expected, rtol=1e-5, atol=1e-5)
    heads = np.random.default_rng(1).normal(size=(attention.num_query_heads, attention.head_dim)).astype("float32")
    kernel = np.asarray(ops.convert_to_numpy(attention.output_dense.kernel))  # (heads, head_dim, hidden)
    np.testing.assert_allclose(tensors["model.layers.1.self_attn.o_proj.weight"] @ heads.reshape(-1),
                               np.einsum("nh,nhd->d", heads, kernel), rtol=1e-5, atol=1e-5)


def test_building_a_model_leaves_tokenizers_built_before_it_working(tok):
    """tf.random.set_seed (inside keras.utils.set_random_seed) would drop their SentencePiece resources."""
    import tensorflow as tf

    before = list(tf.data.Dataset.from_tensor_slices(["hello world"]).map(tok).as_numpy_iterator())
    build_model(config_lib.load_config("gemma3_tiny"))
    after = list(tf.data.Dataset.from_tensor_slices(["hello world"]).map(tok).as_numpy_iterator())
    np.testing.assert_array_equal(after[0], before[0])


def test_generation_pads_the_prompts_to_the_mesh_batch_axis():
    from keras_tune.decoding import generate_texts

    config = config_lib.load_config("gemma_tiny", overrides={"distribution.mesh": "8x1"})
    causal_lm = build_model(config).causal_lm
    causal_lm.compile(sampler="greedy")
    texts = generate_texts(causal_lm, causal_lm.preprocessor, ["one", "two", "three"], max_length=8)
    assert len(texts) == 3


# ---------------------------------------------------------------------------
# RecurrentGemma: what export refuses, and the CLI's text.


def test_recurrentgemma_transformers_peft_and_gguf_exports_are_refused_before_building(tmp_path, capsys, monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before the export was refused")

    monkeypatch.setattr("keras_tune.models.loader.build_model", must_not_build)
    monkeypatch.setattr("keras_tune.models.loader.abstract_model", must_not_build)
    adapter = tmp_path / "adapter.npz"
    adapter.write_bytes(b"never read")
    cases = [
        (["--transformers", str(tmp_path / "hf")], "--transformers: Transformers export"),
        (["--peft", str(tmp_path / "peft")], "--peft: PEFT export"),  # refused before "--peft needs --adapter"
        (["--gguf", str(tmp_path / "m.gguf")], "--gguf: GGUF export"),
        (["--keras-preset", str(tmp_path / "keras"), "--gguf", str(tmp_path / "m.gguf")], "--gguf: GGUF export"),
    ]
    for argv, asked in cases:
        assert export.main(["--preset", "recurrentgemma_tiny", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: {asked} is not implemented for recurrentgemma models "
                                   "(preset recurrentgemma_tiny); for recurrentgemma, expected --keras-preset"), lines
    assert sorted(os.listdir(tmp_path)) == ["adapter.npz"]  # nothing written
    # The adapter file is not even opened: the family is refused first.
    assert export.main(["--preset", "recurrentgemma_2b", "--adapter", str(adapter), "--peft", str(tmp_path / "p")]) == 2
    assert "--peft: PEFT export is not implemented for recurrentgemma" in capsys.readouterr().err


def test_generate_merge_skips_the_transformers_copy_of_a_recurrentgemma_with_the_reason():
    from keras_tune.models.exports.transformers import transformers_export_problem
    from keras_tune.models.loader import abstract_model

    problem = transformers_export_problem(abstract_model(config_lib.load_config("recurrentgemma_tiny")))
    assert "not implemented for recurrentgemma" in problem and "keras-hub preset" in problem
    assert transformers_export_problem(abstract_model(config_lib.load_config("gemma3_tiny"))) is None


def test_lora_targets_help_names_the_recurrent_block_targets():
    parser = fit.build_parser()
    text = next(action.help for action in parser._actions if "--lora-targets" in action.option_strings)
    for target in ("query", "ffw_linear", "linear_x", "linear_y", "linear_out"):
        assert target in text
    assert set(families.lora_targets()) <= set(text.replace(";", ",").replace(" ", ",").split(","))


def test_list_presets_columns_line_up_for_the_longest_names(monkeypatch):
    from keras_tune.errors import UserError

    # Parameter counts of every width (and one unknown), without building 35 abstract models.
    def count(weights):
        return weights

    def model(config, lora=False):
        if config.preset == "gemma3_270m_offline":
            raise UserError("registry package not installed")
        return type("Model", (), {"weights": 7 ** (len(config.preset) % 13)})

    monkeypatch.setattr("keras_tune.lora.count_parameters", count)
    monkeypatch.setattr("keras_tune.models.loader.abstract_model", model)
    lines = fit.list_presets_table().splitlines()
    header, rows = lines[0], lines[1:]
    assert len(rows) == len(config_lib.list_presets())
    assert any(row.startswith("recurrentgemma_9b_it ") and " recurrentgemma " in row for row in rows)
    starts = [header.index(title) for title in ("family", "source", "description")]
    right_edge = header.index("parameters") + len("parameters")
    for row in rows:
        for start in starts:  # left-aligned columns start in the header's column, after a gap
            assert row[start - 2:start] == "  " and row[start] != " ", (row, start)
        assert row[right_edge - 1] in "0123456789?" and row[right_edge:right_edge + 2] == "  ", row
    unknown = next(row for row in rows if row.startswith("gemma3_270m_offline "))
    assert unknown.endswith("(parameters unknown: registry package not installed)")

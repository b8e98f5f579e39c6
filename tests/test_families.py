"""The family registry: every family answers for itself, and a new one plugs in through the registry alone."""

import json

import keras_hub
import pytest

from keras_tune import config as config_lib
from keras_tune import flops, training
from keras_tune.distribution import layout_dir, plan_sharding
from keras_tune.errors import UserError
from keras_tune.memory.plan import plan_memory
from keras_tune.models import families
from keras_tune.models.exports.transformers import family_export_problem, transformers_export_problem
from keras_tune.models.families.gemma import Gemma
from keras_tune.models.loader import abstract_model, build_model


@pytest.mark.parametrize(
    "preset, family",
    [("gemma_tiny", "gemma"), ("gemma2_tiny", "gemma2"), ("gemma3_tiny", "gemma3"),
     ("recurrentgemma_tiny", "recurrentgemma")],
)
def test_each_family_owns_its_models_and_no_other(preset, family):
    backbone = abstract_model(config_lib.load_config(preset), lora=False)
    owners = [name for name in families.names() if families.get(name).owns(backbone)]
    assert owners == [family]
    assert families.of_model(backbone).name == family


def test_unknown_family_and_a_source_of_another_family_are_one_line_errors():
    with pytest.raises(UserError, match="model.family 'gemma9' is not supported; expected one of gemma, gemma2"):
        config_lib.load_config("gemma_tiny", overrides={"model.family": "gemma9"})
    with pytest.raises(UserError, match="model.source gguf is not a source of gemma models .*expected family gemma3"):
        config_lib.load_config("gemma_tiny", overrides={"model.source": "gguf", "model.weights": "registry"})
    with pytest.raises(UserError, match=r"--lora-targets: unknown \['linear_x'\] for gemma models"):
        config_lib.load_config("gemma_tiny", overrides={"lora.targets": "query,linear_x"})
    assert config_lib.load_config("recurrentgemma_tiny", overrides={"lora.targets": "query,linear_x"})


class FakeBackbone(keras_hub.models.GemmaBackbone):
    """A Gemma backbone under another class: the model of a family keras_tune has never heard of."""


class FakeFamily(Gemma):
    """A made-up family: Gemma's classes, its own backbone, layouts written by the test, two LoRA targets."""

    name = "fakegemma"
    title = "Fake Gemma"
    sources = ("tiny",)
    lora_targets = ("query", "value")
    exports = ("--keras-preset",)

    def __init__(self, layouts):
        self.layouts = layouts

    def classes(self):
        return FakeBackbone, keras_hub.models.GemmaCausalLMPreprocessor, keras_hub.models.GemmaCausalLM

    def owns(self, backbone):
        return type(backbone) is FakeBackbone

    def layout(self, style="tp"):
        return str(self.layouts[style])

    def context_length(self, arch):
        return 48  # below the tiny preset's 64: the --seq-len warning must come from here


@pytest.fixture
def fake_family(tmp_path):
    layouts = {}
    for style in ("tp", "fsdp"):
        layout = json.loads((layout_dir() / f"gemma_{style}.json").read_text())
        layout["family"] = "fakegemma"
        layouts[style] = tmp_path / f"fakegemma_{style}.json"
        layouts[style].write_text(json.dumps(layout))
    family = families.register(FakeFamily(layouts))
    yield family
    families.unregister(family.name)


def _fake_config(tmp_path, **overrides):
    return config_lib.load_config("gemma_tiny", overrides={
        "model.family": "fakegemma", "distribution.layout": "", "distribution.mesh": "2x4",
        "train.output_dir": str(tmp_path / "run"), **overrides,
    })


def test_a_new_family_plugs_in_through_the_registry_alone(fake_family, tmp_path, capsys):
    config = _fake_config(tmp_path, **{"train.steps": 2, "data.name": "text", "data.path": str(_corpus(tmp_path))})
    with pytest.raises(UserError, match=r"unknown \['key'\] for fakegemma models"):
        _fake_config(tmp_path, **{"lora.targets": "query,key"})
    abstract = abstract_model(config)
    assert type(abstract) is FakeBackbone
    plan = plan_sharding(config, abstract.weights)
    assert plan.layout.name == "fakegemma_tp" and plan.layout.family == "fakegemma"
    assert plan_memory(config, plan).total > 0  # Gemma's planner view, inherited
    assert "fakegemma models" in family_export_problem(config, ["--gguf"])
    assert transformers_export_problem(abstract).startswith("Transformers export is not implemented for fakegemma")

    result = training.run(config)
    assert families.of_model(result.causal_lm) is fake_family
    assert flops.attention_span(result.causal_lm.backbone, 64) == (2, 64)
    assert result.final_step == 2 and (tmp_path / "run" / "adapter.npz").is_file()
    assert "beyond the 48 tokens" in capsys.readouterr().err


def test_a_fake_family_model_builds_without_the_registry_knowing_its_name_elsewhere(fake_family, tmp_path):
    built = build_model(_fake_config(tmp_path), lora=True)
    assert type(built.causal_lm.backbone) is FakeBackbone
    assert built.plan.layout.name == "fakegemma_tp"


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"paragraph {i} of a small corpus, with words enough to fill a row." * 3
                                for i in range(60)))
    return path

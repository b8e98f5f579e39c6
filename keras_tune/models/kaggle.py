"""Kaggle access: whether a `kaggle://` model handle can be downloaded, said before anything is built."""

import glob
import os


def kaggle_credentials_problem(handle):
    """Says why a Kaggle handle cannot be fetched, or returns None if it can.

    Credentials count from `KAGGLE_USERNAME`/`KAGGLE_KEY`, a `kaggle.json` or an
    access token in `~/.kaggle` (or `$KAGGLE_CONFIG_DIR`), a Kaggle notebook, or
    the model already sitting in the kagglehub cache.

    Args:
        handle: a `kaggle://owner/model/framework/variation/version` handle.
    """
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return None
    if os.environ.get("KAGGLE_API_TOKEN") or os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return None
    config_dir = os.environ.get("KAGGLE_CONFIG_DIR") or os.path.expanduser("~/.kaggle")
    if any(os.path.isfile(os.path.join(config_dir, name)) for name in ("kaggle.json", "access_token")):
        return None
    cache = os.environ.get("KAGGLEHUB_CACHE") or os.path.expanduser("~/.cache/kagglehub")
    parts = handle.removeprefix("kaggle://").split("/")
    if glob.glob(os.path.join(cache, "models", *parts[:4], parts[4] if len(parts) > 4 else "*", "config.json")):
        return None
    return (
        f"cannot download {handle}: no Kaggle credentials found; set KAGGLE_USERNAME and KAGGLE_KEY "
        "(from kaggle.com > Settings > API > Create New Token), or save that kaggle.json in ~/.kaggle/, "
        "and accept the Gemma license on the model's Kaggle page"
    )

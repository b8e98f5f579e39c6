"""Loading a TensorFlow Datasets split: the real `tfds` path, with its errors made plain.

`load_split` prepares the dataset if `data_dir` does not hold it yet (which
downloads it: needs network) and reads one split with `tfds.load`, after
checking that the split exists.

Example:

```python
dataset = load_split("imdb_reviews", "train", data_dir="", max_examples=2000)
```
"""

import socket

from keras_tune.errors import UserError

# Where each dataset's builder downloads from: checked before a download so an
# offline machine fails in seconds instead of after the downloader's retries.
DOWNLOAD_HOSTS = {"imdb_reviews": "ai.stanford.edu", "mtnt": "github.com"}


def reachable(host, timeout=5.0):
    """Whether a TCP connection to `host`:443 opens within `timeout` seconds."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def builder(name, data_dir):
    """Returns the prepared `tfds` builder for `name` ("imdb_reviews", "mtnt/en-fr", ...)."""
    import tensorflow_datasets as tfds

    try:
        found = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # unknown name or config: tfds raises several kinds
        raise UserError(f"TFDS dataset '{name}' is not known to tensorflow-datasets ({e}); expected a valid name") from None
    if not found.is_prepared():
        where = data_dir or "the TFDS default data directory"
        host = DOWNLOAD_HOSTS.get(name.split("/")[0])
        if host and not reachable(host):
            raise UserError(
                f"TFDS dataset '{name}' is not in {where} and its download host {host} is unreachable; "
                "expected a prepared dataset there (--data-dir) or network access"
            )
        try:
            found.download_and_prepare()
        except Exception as e:
            raise UserError(
                f"TFDS dataset '{name}' is not in {where} and could not be downloaded "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); expected a prepared "
                "dataset there (--data-dir) or network access"
            ) from None
    return found


def load_split(name, split, data_dir="", max_examples=0):
    """Returns `split` of TFDS dataset `name` as a tf.data.Dataset of feature dicts.

    Args:
        name: TFDS name with config, e.g. "mtnt/en-fr".
        split: a split name of that dataset ("train", "test", "valid", ...).
        data_dir: TFDS data directory ("" = the TFDS default).
        max_examples: read only the first this many examples (0 = all).
    """
    import tensorflow_datasets as tfds

    found = builder(name, data_dir)
    splits = found.info.splits
    if split not in splits:
        raise UserError(
            f"TFDS dataset '{name}' has no split '{split}' (in {found.data_dir}); "
            f"expected one of {', '.join(sorted(splits.keys()))}"
        )
    total = splits[split].num_examples
    selected = f"{split}[:{max_examples}]" if max_examples and max_examples < total else split
    dataset = tfds.load(name, split=selected, data_dir=data_dir or None, download=False, shuffle_files=False)
    count = min(max_examples, total) if max_examples else total
    return dataset, f"tfds {name} {selected} ({count} of {total} examples)"

"""A corpus read a document at a time: text files, records, Parquet, and Hugging Face datasets saved to disk.

For corpora larger than memory (`keras_tune.data.shards` tokenizes them once into
token shards). Every reader streams: a `.jsonl` a line at a time, a Parquet file a
row group at a time, a `datasets.Dataset.save_to_disk` folder's Arrow files a
record batch at a time; only a plain text file is read whole (one document, or
its blank-line-separated paragraphs). `--filter-keywords` keeps the documents
that mention one of its words (the code recipe's seed keeps files using pandas,
scikit-learn, matplotlib or seaborn), and the validation split is either
`--validation-path` or a seeded share of the documents, chosen by a hash of
their position so it needs no second pass.

Example:

```python
paths = corpus.corpus_files(config.data, "code")
for where, text in corpus.documents(paths, text_field="content"):
    ...
```
"""

import hashlib
import json
import os
from pathlib import Path

from keras_tune.data import files
from keras_tune.errors import UserError

SUFFIXES = (".py", ".txt", ".md", ".jsonl", ".json", ".csv", ".parquet", ".arrow")
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
_PARQUET_BATCH = 1024


def corpus_files(data_config, suffixes, validation=False):
    """The files of the corpus (`data.path`) or of its validation set (`data.validation_path`).

    Args:
        data_config: the `data` section of the run config.
        suffixes: the recipe's file kinds.
        validation: the validation files instead.
    """
    path = data_config.validation_path if validation else data_config.path
    return files.find_files(path, suffixes, data_config.name)


def check_readable(paths, text_field=None):
    """Refuses, in one line, a Parquet or Arrow file that cannot be read or has no `text_field` column.

    Reads each file's footer or schema only: milliseconds, before anything is built.

    Args:
        paths: the corpus files.
        text_field: the column documents are read from (None: any columns).
    """
    for path in paths:
        if path.suffix not in (".parquet", ".arrow"):
            continue
        columns = _columns(path, text_field or "text")
        if text_field and text_field not in columns:
            raise UserError(f"{path}: no column '{text_field}' (columns: {', '.join(columns) or 'none'}); expected "
                            f"the documents in a string column '{text_field}' (--set data.text_field=NAME)")


def _columns(path, text_field):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.ParquetFile(path).schema_arrow.names
        with pa.memory_map(str(path)) as source:
            return _arrow_reader(source).schema.names
    except (OSError, pa.ArrowException) as error:
        kind = "Parquet" if path.suffix == ".parquet" else "Arrow (datasets.save_to_disk)"
        raise UserError(f"{path}: not a readable {kind} file ({str(error).splitlines()[0]}); "
                        f"expected a {kind} file with a '{text_field}' column") from None


def _arrow_reader(source):
    """Hugging Face `datasets` writes Arrow's stream format; Arrow's file format is read too."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def _column_values(path, text_field):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=_PARQUET_BATCH):
            yield from batch.column(0).to_pylist()
        return
    with pa.memory_map(str(path)) as source:
        reader = _arrow_reader(source)
        batches = reader if hasattr(reader, "read_next_batch") else (reader.get_batch(i) for i in range(
            reader.num_record_batches))
        for batch in batches:
            yield from batch.column(batch.schema.get_field_index(text_field)).to_pylist()


def _jsonl_records(path):
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            text = files.decode_utf8(line, f"{path}:{number}")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not JSON ({error.msg}); expected one JSON object a line") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: a JSON {type(record).__name__}; expected an object")
            yield f"{path}:{number}", record


def documents(paths, text_field="text", paragraphs=False):
    """Yields `(where, text)` for every document of the corpus files, in order, streaming.

    Args:
        paths: files from `corpus_files`.
        text_field: the field or column holding a record's text.
        paragraphs: a `.txt` file's blank-line-separated paragraphs are documents
            (the text recipe); otherwise a text file is one document (code).
    """
    for path in paths:
        if path.suffix in (".parquet", ".arrow"):
            for index, value in enumerate(_column_values(path, text_field)):
                if value is not None and not isinstance(value, str):
                    raise UserError(f"{path}[{index}]: column '{text_field}' holds a {type(value).__name__}; "
                                    "expected strings")
                yield f"{path}[{index}]", value or ""
        elif path.suffix == ".jsonl":
            for where, record in _jsonl_records(path):
                yield where, files.field(record, text_field, where)
        elif path.suffix in (".json", ".csv"):
            for where, record in files.iter_records(path):
                yield where, files.field(record, text_field, where)
        elif paragraphs and path.suffix == ".txt":
            for index, text in enumerate(files.paragraphs(files.read_text(path))):
                yield f"{path} paragraph {index + 1}", text
        else:
            yield str(path), files.read_text(path)


def mentions(text, keywords):
    """Whether `text` mentions one of `keywords` (all texts do when there are none).

    Args:
        text: a document.
        keywords: words, any of which keeps it.
    """
    return not keywords or any(word in text for word in keywords)


def in_validation(index, seed, fraction):
    """Whether document `index` is held out: a seeded hash of its position falls below `fraction`.

    Args:
        index: the document's position in the corpus.
        seed: the run's data seed.
        fraction: the validation share.
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def fingerprint(paths):
    """What identifies the corpus files' content without reading it: each file's path, size and mtime.

    Args:
        paths: the corpus files.
    """
    entries = []
    for path in paths:
        stat = os.stat(path)
        entries.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return entries


def has_text(paths):
    """Whether any corpus file holds something other than whitespace (a first look, not a read).

    Args:
        paths: the corpus files.
    """
    for path in paths:
        if path.suffix in (".parquet", ".arrow"):
            return True  # judged by their rows while reading
        with open(path, "rb") as file:
            while chunk := file.read(1 << 16):
                if chunk.strip():
                    return True
    return False

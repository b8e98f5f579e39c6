"""A user's local files: finding them, reading them as UTF-8, records from JSONL/JSON/CSV.

Every problem with the input is a `UserError` naming the file (and line), what
was found and what was expected, raised while the data is read, before training.

Example:

```python
paths = find_files("my_data/*.jsonl", (".jsonl",), "chat")
for where, record in iter_records(paths[0]):
    ...
```
"""

import csv
import dataclasses
import glob
import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from keras_tune.data.pipeline import Source
from keras_tune.data.tokens import examples_dataset
from keras_tune.errors import UserError

SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".venv", "node_modules"}
# What Hugging Face `datasets.Dataset.save_to_disk` writes beside its Arrow files.
DATASETS_METADATA = ("dataset_info.json", "state.json")


def find_files(path, suffixes, recipe):
    """Returns the sorted files that `path` names: a file, a directory (searched recursively) or a glob.

    Args:
        path: the `--data-path` value.
        suffixes: accepted file suffixes, e.g. `(".txt", ".jsonl")`.
        recipe: the recipe's name, for messages.
    """
    expected = ", ".join(suffixes)
    if not path:
        raise UserError(f"recipe '{recipe}' needs --data-path: expected a directory, glob or file ({expected})")
    if os.path.isfile(path):
        if not path.endswith(tuple(suffixes)):
            raise UserError(f"--data-path '{path}' has suffix '{Path(path).suffix}'; recipe '{recipe}' expects {expected}")
        return [Path(path)]
    if os.path.isdir(path):
        found = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
            if any(n.endswith(".arrow") for n in names):  # a datasets.save_to_disk folder: its JSON is metadata
                names = [n for n in names if n not in DATASETS_METADATA]
            found += [Path(root) / n for n in names if n.endswith(tuple(suffixes)) and not n.startswith(".")]
    else:
        found = [Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p) and p.endswith(tuple(suffixes))]
    if not found:
        what = "directory" if os.path.isdir(path) else "glob" if glob.has_magic(path) else "path"
        raise UserError(f"--data-path {what} '{path}' matched no files; recipe '{recipe}' expects files ending in {expected}")
    return sorted(found)


def decode_utf8(data, where):
    """Returns `data` (bytes) decoded as UTF-8, or raises a `UserError` naming the bad bytes."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 4]
        raise UserError(
            f"{where}: bytes {bad!r} at offset {e.start} are not UTF-8; expected UTF-8 text"
        ) from None


def read_text(path):
    """Returns the UTF-8 text of a file (a BOM is dropped)."""
    text = decode_utf8(Path(path).read_bytes(), str(path))
    return text[1:] if text.startswith("\ufeff") else text


def iter_records(path):
    """Yields `(where, record)` for each record of a `.jsonl`, `.json` (a list), `.csv`, `.parquet` or `.arrow` file.

    `where` is `"file:line"` (`"file[row]"` for Parquet and the Arrow files of a
    `datasets.Dataset.save_to_disk` folder). Blank JSONL lines are skipped.
    """
    path = Path(path)
    if path.suffix in (".parquet", ".arrow"):
        yield from _table_records(path)
        return
    text = read_text(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            if None in row:
                raise UserError(
                    f"{path}:{reader.line_num}: {len(row) - 1 + len(row[None])} cells, "
                    f"expected {len(reader.fieldnames)} (the header's columns)"
                )
            yield f"{path}:{reader.line_num}", row
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not JSON ({e.msg}); expected a JSON list of objects") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: a JSON {type(data).__name__}; expected a list of objects (or use .jsonl)")
        for i, record in enumerate(data):
            yield _object(record, f"{path}[{i}]")
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not JSON ({e.msg}); expected one JSON object a line") from None
            yield _object(record, f"{path}:{number}")


def _table_records(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        else:
            source = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_stream(source)  # what Hugging Face `datasets` writes
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
            batches = reader if hasattr(reader, "read_next_batch") else (
                reader.get_batch(i) for i in range(reader.num_record_batches))
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield f"{path}[{row}]", record
                row += 1
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"{path}: not a readable {'Parquet' if path.suffix == '.parquet' else 'Arrow'} file "
                        f"({str(error).splitlines()[0]}); expected records with named columns") from None


def _object(record, where):
    if not isinstance(record, dict):
        raise UserError(f"{where}: a JSON {type(record).__name__}; expected an object with named fields")
    return where, record


def field(record, name, where, kind="string"):
    """Returns `record[name]`, raising a `UserError` if it is missing or of the wrong type."""
    if name not in record:
        have = ", ".join(sorted(map(str, record))) or "none"
        raise UserError(f"{where}: no field '{name}' (fields: {have}); expected a {kind} field '{name}'")
    value = record[name]
    if kind == "string" and not isinstance(value, str):
        raise UserError(f"{where}: field '{name}' is a {type(value).__name__}; expected a string")
    if kind == "list" and not isinstance(value, list):
        raise UserError(f"{where}: field '{name}' is a {type(value).__name__}; expected a list")
    return value


def hold_out(count, data_config, seed):
    """Returns (train indices, validation indices) for `count` examples, fixed by `seed`.

    The validation share is `validation_fraction` of the examples (at least one
    when the fraction is above zero and there are two or more), at most
    `max_validation_examples` (0 = no cap). Train indices keep the input order.
    """
    fraction = float(data_config.validation_fraction)
    cap = int(data_config.max_validation_examples)
    wanted = 0 if fraction <= 0 or count < 2 else max(1, int(round(fraction * count)))
    if cap > 0:
        wanted = min(wanted, cap)
    wanted = min(wanted, count - 1) if count > 1 else 0
    order = np.random.default_rng(seed).permutation(count)
    validation = np.sort(order[:wanted])
    train = np.sort(order[wanted:])
    return train, validation


def empty_file_error(path, recipe):
    return UserError(f"{path} is empty; recipe '{recipe}' expects text in it")


_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def paragraphs(text):
    """Returns the blank-line-separated documents of `text` (empty ones left out)."""
    return [p for p in _BLANK_LINE.split(text.strip("\n")) if p.strip()]


def read_examples(paths, data_config, recipe, to_record_example, txt_ok=True, limit=None):
    """Reads examples from local files until `max_examples` (0 = all).

    Args:
        paths: files from `files.find_files`.
        data_config: the `data` config section.
        recipe: the recipe's name, for messages.
        to_record_example: `(record, where) -> (segments, weights) | str` for a
            JSONL/JSON/CSV record; a string is a reason to drop the record.
        txt_ok: whether `.txt` files are documents for this recipe.
        limit: the most examples to read (default `data.max_examples`; 0 = all).

    Returns:
        (examples, dropped): examples as `(segments, weights)`, and reason -> count.
    """
    limit = int(data_config.max_examples) if limit is None else int(limit)
    examples, dropped = [], Counter()
    for path in paths:
        before = len(examples) + sum(dropped.values())
        if path.suffix == ".txt":
            if not txt_ok:
                raise UserError(f"{path}: recipe '{recipe}' reads .jsonl, .json or .csv records, not .txt")
            for document in paragraphs(read_text(path)):
                examples.append(([document], [1.0]))
                if limit and len(examples) >= limit:
                    return examples, dropped
        else:
            for where, record in iter_records(path):
                example = to_record_example(record, where)
                if isinstance(example, str):
                    dropped[example] += 1
                else:
                    examples.append(example)
                if limit and len(examples) >= limit:
                    return examples, dropped
        if len(examples) + sum(dropped.values()) == before:
            if len(paths) == 1:
                raise empty_file_error(path, recipe)
            dropped["empty file"] += 1
    if not examples and not dropped:
        raise UserError(f"--data-path '{data_config.path}': all {len(paths)} files are empty; expected text")
    return examples, dropped


def read_validation(data_config, suffixes, recipe, to_record_example, txt_ok=True):  # many: read_examples' own
    """The examples of `--validation-path` (at most `max_validation_examples`), or None when it is not given.

    Args:
        data_config: the `data` config section.
        suffixes: the recipe's file suffixes.
        recipe: the recipe's name.
        to_record_example: as for `read_examples`.
        txt_ok: as for `read_examples`.
    """
    if not data_config.get("validation_path"):
        return None
    paths = find_files(data_config.validation_path, suffixes, recipe)
    examples, dropped = read_examples(paths, data_config, recipe, to_record_example, txt_ok,
                                      limit=int(data_config.max_validation_examples))
    return ReadExamples(recipe, "", examples, dropped, f"{len(paths)} file(s) at '{data_config.validation_path}'")


@dataclasses.dataclass
class ReadExamples:
    """What a file recipe read, before the validation hold-out.

    Attributes:
        recipe: the recipe's name.
        kind: "text" (documents) or "prompt" (examples whose prompt carries no loss).
        examples: `(segments, weights)` pairs.
        dropped: reason -> records read but not used.
        where: where they came from, in words.
        notes: lines for the data report.
    """

    recipe: str
    kind: str
    examples: list
    dropped: Counter
    where: str
    notes: tuple = ()


def keyword_filtered(read, keywords):
    """`read` without the examples that mention none of `keywords` (counted as dropped).

    Args:
        read: a recipe's `ReadExamples`.
        keywords: words, any of which keeps an example (none: all are kept).
    """
    if not keywords:
        return read
    kept = [example for example in read.examples if any(word in "".join(example[0]) for word in keywords)]
    dropped = Counter(read.dropped)
    if len(kept) < len(read.examples):
        dropped[f"mentions none of {', '.join(keywords)}"] += len(read.examples) - len(kept)
    return dataclasses.replace(read, examples=kept, dropped=dropped)


def split_source(read, data_config, seed, validation=None):
    """Holds out a seeded validation share of what a recipe read (or takes `validation`) and returns its `Source`.

    `--filter-keywords` applies to both splits.

    Args:
        read: the recipe's `ReadExamples`.
        data_config: the `data` section of the run config (validation share and cap).
        seed: seeds the hold-out.
        validation: the `ReadExamples` of `--validation-path`, used whole instead of a hold-out.
    """
    keywords = tuple(data_config.get("filter_keywords", ()))
    read = keyword_filtered(read, keywords)
    examples, dropped = read.examples, read.dropped
    if not examples:
        raise UserError(f"--data-path '{data_config.path}': no example left after --filter-keywords "
                        f"{','.join(keywords)} (read {sum(dropped.values())}); expected some mentioning one of them")
    if validation is not None:
        validation = keyword_filtered(validation, keywords)
        source = _source(read, data_config, seed, examples, validation.examples)
        source.validation_source = f"{validation.where}: {len(validation.examples)} examples (--validation-path)"
        source.validation_dropped = Counter(validation.dropped)
        return source
    train_index, val_index = hold_out(len(examples), data_config, seed)
    return _source(read, data_config, seed, [examples[i] for i in train_index], [examples[i] for i in val_index])


def _source(read, data_config, seed, train, validation):
    where = read.where
    source = Source(
        recipe=read.recipe,
        kind=read.kind,
        train=examples_dataset(train),
        train_source=f"{where}: {len(train)} of {len(read.examples)} examples",
        train_dropped=Counter(read.dropped),
        notes=list(read.notes),
    )
    if validation:
        source.validation = examples_dataset(validation)
        source.validation_source = f"{where}: {len(validation)} held-out examples (seed {seed})"
    else:
        source.notes.append(f"no validation: {len(read.examples)} example(s) and validation_fraction "
                            f"{data_config.validation_fraction}")
    return source

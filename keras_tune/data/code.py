"""Recipe `code`: a Python code corpus, documents packed whole into full-length rows.

Sources:

- `data.path` set: a `.py` file, a directory (searched recursively) or a glob of
  `.py` files, and/or JSONL (or a JSON list) whose records hold the code in a
  `content` field (the codeparrot layout; a non-default `data.text_field` names
  another field). Each file or record is one document.
- `data.path` empty (the offline default): the Python sources installed for the
  running interpreter (its site-packages), filtered like codeparrot-ds to files
  that mention pandas, sklearn, matplotlib or seaborn, visited in a seeded
  order; topped up from the standard library if too few match. At most
  `data.max_examples` files are read (`DEFAULT_FILES` when it is 0), so the
  default run starts in seconds.

Documents are tokenized whole, joined with `<eos>` and cut into rows of
`seq_len` tokens (`batching="auto"` packs): no text is thrown away and no
padding is trained on. A seeded `data.validation_fraction` of the documents
(whole files) is held out. With `data.key_token_alpha > 0` each row's loss is
weighted by `alpha * (1 + number of key tokens)` (`data.key_tokens`, default
plt, pd, sk, fit, predict), as in the code-model tutorial.

Example:

```python
config.data.name, config.data.path = "code", "my_project/**/*.py"
bundle = make_datasets(config.data, tokenizer, seed=0)
```
"""

import os
import site
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np

from keras_tune.data import files
from keras_tune.data.files import ReadExamples, split_source
from keras_tune.errors import UserError

# How a model tuned on this recipe is prompted: in chat turns, or with plain text.
PROMPT_FORMAT = "plain"
KEYWORDS = ("pandas", "sklearn", "matplotlib", "seaborn")
DEFAULT_FILES = 100
MAX_DEFAULT_FILE_BYTES = 128 * 1024
SUFFIXES = (".py", ".jsonl", ".json", ".parquet", ".arrow")


def _python_files(roots, exclude=()):
    found = set()
    for root in roots:
        if not root or not os.path.isdir(root):
            continue
        for here, dirs, names in os.walk(root):
            dirs[:] = sorted(
                d for d in dirs
                if d not in files.SKIP_DIRS and not d.startswith(".")
                and os.path.join(here, d) not in exclude
            )
            found.update(os.path.join(here, n) for n in names if n.endswith(".py"))
    return sorted(found)


def installed_files():
    """Returns the `.py` files in the running interpreter's site-packages."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    return _python_files(sorted(roots))


def stdlib_files():
    """Returns the `.py` files of the standard library (without site-packages)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return _python_files([stdlib], exclude={os.path.join(stdlib, "site-packages")})


def mentions_keyword(text, keywords=KEYWORDS):
    """Whether `text` mentions any keyword (the codeparrot-ds filter)."""
    return any(k in text for k in keywords)


def _scan(paths, limit, keep, log, what):
    """Reads files in order, keeping those `keep(text)` accepts, until `limit` are kept."""
    kept, dropped, scanned = [], Counter(), 0
    for path in paths:
        if len(kept) >= limit:
            break
        scanned += 1
        if scanned % 2000 == 0:
            log(f"  code: scanned {scanned} {what} files, kept {len(kept)}")
        try:
            if os.path.getsize(path) > MAX_DEFAULT_FILE_BYTES:
                dropped["file larger than 128 KB"] += 1
                continue
            data = Path(path).read_bytes()
        except OSError:
            dropped["unreadable file"] += 1
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            dropped["not UTF-8"] += 1
            continue
        if not text.strip():
            dropped["empty file"] += 1
            continue
        if keep(text):
            kept.append(text)
    return kept, dropped, scanned


def default_corpus(data_config, seed, log):
    """Returns (documents, dropped, description, notes) for the installed-sources corpus."""
    limit = int(data_config.max_examples) or DEFAULT_FILES
    rng = np.random.default_rng(seed)
    candidates = installed_files()
    order = [candidates[i] for i in rng.permutation(len(candidates))]
    documents, dropped, scanned = _scan(order, limit, mentions_keyword, log, "installed")
    notes = [
        f"code corpus: {len(documents)} installed files mentioning {'/'.join(KEYWORDS)} "
        f"(scanned {scanned} of {len(candidates)} in site-packages, seed {seed})"
    ]
    if len(documents) < limit:
        standard = stdlib_files()
        order = [standard[i] for i in rng.permutation(len(standard))]
        more, more_dropped, _ = _scan(order, limit - len(documents), lambda text: True, log, "stdlib")
        documents += more
        dropped.update(more_dropped)
        notes.append(f"code corpus: too few matches, added {len(more)} standard-library files")
    log(f"code: {len(documents)} files from the installed Python sources")
    return documents, dropped, "installed Python sources", notes


def user_corpus(data_config, seed, log, path=None, limit=None):
    """Returns (documents, dropped, description, notes) for the files at `data_config.path` (or `path`).

    Args:
        data_config: the `data` config section.
        seed: shuffles the order the files are read in.
        log: callable for progress lines.
        path: another path to read (the validation files).
        limit: the most documents (default `data.max_examples`; 0 = all).
    """
    path = path or data_config.path
    paths = files.find_files(path, SUFFIXES, "code")
    limit = int(data_config.max_examples if limit is None else limit)
    field = "content" if data_config.text_field == "text" else data_config.text_field
    sources = [p for p in paths if p.suffix == ".py"]
    records = [p for p in paths if p.suffix != ".py"]
    sources = [sources[i] for i in np.random.default_rng(seed).permutation(len(sources))]
    documents, dropped = [], Counter()
    for path in sources:
        if limit and len(documents) >= limit:
            break
        text = files.read_text(path)
        if not text.strip():
            if len(paths) == 1:
                raise files.empty_file_error(path, "code")
            dropped["empty file"] += 1
            continue
        documents.append(text)
    for path in records:
        count = 0
        for where, record in files.iter_records(path):
            if limit and len(documents) >= limit:
                break
            count += 1
            text = files.field(record, field, where)
            if text.strip():
                documents.append(text)
            else:
                dropped[f"empty '{field}'"] += 1
        if not count and not (limit and len(documents) >= limit):
            if len(paths) == 1:
                raise files.empty_file_error(path, "code")
            dropped["empty file"] += 1
    if not documents:
        raise UserError(f"--data-path '{path}': no code in {len(paths)} file(s); expected Python source")
    log(f"code: {len(documents)} documents from {len(paths)} file(s)")
    return documents, dropped, f"{len(paths)} file(s) at '{path}'", []


def check(data_config):
    """The checks that need no tokenizer (`keras_tune.data.check_data`): a `--data-path` names code files."""
    if data_config.path:
        files.find_files(data_config.path, SUFFIXES, "code")


def source(data_config, tokenizer, seed=0, log=print):
    """Returns the `Source` for a code corpus."""
    corpus = user_corpus if data_config.path else default_corpus
    documents, dropped, where, notes = corpus(data_config, seed, log)
    examples = [([text], [1.0]) for text in documents]
    validation = None
    if data_config.get("validation_path"):
        held, held_dropped, held_where, _ = user_corpus(data_config, seed, log, path=data_config.validation_path,
                                                         limit=data_config.max_validation_examples)
        validation = ReadExamples("code", "text", [([text], [1.0]) for text in held], held_dropped, held_where)
    read = ReadExamples("code", "text", examples, dropped, where, tuple(notes))
    return split_source(read, data_config, seed, validation)

"""Preference pairs for DPO and ORPO: (prompt, chosen, rejected) records in, batches of row pairs out.

The recipes users already name read them (`--objective dpo --data text
--data-path prefs.jsonl`), from `.jsonl`, `.json`, `.csv`, Parquet or Arrow records
(`data.prompt_field`, `data.chosen_field`, `data.rejected_field`):

- `text`: `{"prompt": "...", "chosen": "...", "rejected": "..."}`, plain text; a
  row is `<bos> prompt response <eos>`, the loss weights on the response and
  its `<eos>` (no prompt field: the whole text is the response).
- `chat`: the same strings, the prompt a user turn and each response a model
  turn in the model's chat format (`keras_tune.data.chat.render`); or messages
  lists: a prompt of turns (`prompt` or `data.messages_field`) and responses of
  model turns, or, with no prompt, two whole conversations whose shared leading
  turns are the prompt (TRL's implicit prompt). Loss on the responses' model turns.

A record without a chosen or rejected field is one `UserError` naming its file
and line; a pair whose responses are equal is dropped (counted), and a file
where every pair is so is refused (`check_preferences`, before any model is
built). Each pair is two rows of one length, the chosen then the rejected:
pairs are bucketed by the longer of their two rows (`--batching pad`: all at
`--seq-len`), never packed. A row longer than `--seq-len` is cut at its end (the
pair counted as truncated) or, with `--overlong drop`, the pair is dropped; a
pair where a prompt fills the row is dropped. Batches are
`({"token_ids", "padding_mask", "targets", "response_weights"}: [pairs, 2, length], pair weight [pairs])`,
epochs reshuffled by seed as every recipe's are (`keras_tune.data.streams`).

Example:

```python
config = keras_tune.load_config("gemma3_tiny", overrides={"train.objective": "dpo", "data.name": "text",
                                                          "data.path": "prefs.jsonl"})
bundle = make_preference_datasets(config.data, tokenizer, seed=0)
print(bundle.report.summary())   # read, kept, truncated and dropped pairs
```
"""

from collections import Counter

import numpy as np

from keras_tune.data import chat, files
from keras_tune.data.layout import Rows, assign_buckets, choose_buckets, pad_rows, with_specials
from keras_tune.data.pipeline import DataBundle
from keras_tune.data.report import DataReport, SplitReport
from keras_tune.data.streams import train_stream, validation_dataset
from keras_tune.data.tokens import examples_dataset, tokenize
from keras_tune.decoding import turn_format
from keras_tune.errors import UserError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
SAME = "chosen equals rejected"
REPORT_BATCHES = 32


def _turns(value, where, field):
    """`(role, text)` turns of a messages list (roles as the chat recipe reads them)."""
    turns = []
    for i, message in enumerate(value):
        at = f"{where} {field}[{i}]"
        if not isinstance(message, dict):
            raise UserError(f"{at}: a {type(message).__name__}; expected an object with role and content")
        role = files.field(message, "role", at)
        if role not in chat.ROLES:
            raise UserError(f"{at}: role '{role}'; expected one of {', '.join(chat.ROLES)}")
        turns.append((chat.ROLES[role], files.field(message, "content", at)))
    return turns


def _present(record, name, where):
    """`record[name]`, or the one line saying which field a preference record lacks."""
    if name not in record:
        have = ", ".join(sorted(map(str, record))) or "none"
        raise UserError(f"{where}: no field '{name}' (fields: {have}); expected a preference record with "
                        "prompt, chosen and rejected")
    return record[name]


def _response(record, name, where):
    """A response field: a string (one model turn) or a messages list."""
    value = _present(record, name, where)
    if isinstance(value, str):
        return [("model", value)]
    if isinstance(value, list):
        return _turns(value, where, name)
    raise UserError(f"{where}: field '{name}' is a {type(value).__name__}; expected a string or a messages list")


def _chat_pair(record, where, data_config, markers):
    """`(chosen example, rejected example)` of a chat record, or a reason to drop it."""
    chosen = _response(record, data_config.chosen_field, where)
    rejected = _response(record, data_config.rejected_field, where)
    prompt_field, messages_field = data_config.prompt_field, data_config.messages_field
    if prompt_field in record:
        value = record[prompt_field]
        prompt = [("user", value)] if isinstance(value, str) else _turns(files.field(record, prompt_field, where,
                                                                                     kind="list"), where, prompt_field)
    elif messages_field in record:
        prompt = _turns(files.field(record, messages_field, where, kind="list"), where, messages_field)
    else:  # two whole conversations: their shared leading turns are the prompt
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if chosen == rejected:
        return SAME
    if not all(any(role == "model" and text.strip() for role, text in side) for side in (chosen, rejected)):
        return "a response without a model turn"

    def example(response):
        segments, weights = chat.render(prompt, markers) if prompt else ([], [])
        answer, answer_weights = chat.render(response, markers)
        return segments + answer, [0.0] * len(weights) + answer_weights

    return example(chosen), example(rejected)


def _text_pair(record, where, data_config):
    """`(chosen example, rejected example)` of a plain-text record, or a reason to drop it."""
    for name in (data_config.chosen_field, data_config.rejected_field):
        _present(record, name, where)
    chosen = files.field(record, data_config.chosen_field, where)
    rejected = files.field(record, data_config.rejected_field, where)
    prompt = files.field(record, data_config.prompt_field, where) if data_config.prompt_field in record else ""
    if chosen == rejected:
        return SAME
    if not chosen.strip() or not rejected.strip():
        return "an empty response"
    if not prompt:
        return ([chosen], [1.0]), ([rejected], [1.0])
    return ([prompt, chosen], [0.0, 1.0]), ([prompt, rejected], [0.0, 1.0])


def _reader(data_config, tokenizer):
    markers = turn_format(tokenizer)
    if data_config.name == "chat":
        return lambda record, where: _chat_pair(record, where, data_config, markers)
    if data_config.name == "text":
        return lambda record, where: _text_pair(record, where, data_config)
    raise UserError(f"preference pairs are read by --data text or chat; got --data {data_config.name}")


def read_pairs(data_config, tokenizer=None):
    """The pairs of `--data-path` (and of `--validation-path`), read and checked; no tokenizer needed.

    Args:
        data_config: the `data` section of the run config.
        tokenizer: the model's tokenizer (its chat format), or None (Gemma's).

    Returns:
        `(ReadExamples of the training files, ReadExamples of --validation-path or None)`;
        each example is a `(chosen, rejected)` pair of `(segments, weights)`.

    Raises:
        UserError: a record without a response field, or files where every pair is equal or unusable.
    """
    recipe = data_config.name
    to_pair = _reader(data_config, tokenizer)
    paths = files.find_files(data_config.path, SUFFIXES, recipe)
    pairs, dropped = files.read_examples(paths, data_config, recipe, to_pair, txt_ok=False)
    if not pairs:
        read = sum(dropped.values())
        if dropped[SAME] == read:
            raise UserError(f"--data-path '{data_config.path}': in every one of its {read} pairs the chosen response "
                            "equals the rejected one; expected pairs whose responses differ")
        raise UserError(f"--data-path '{data_config.path}': no usable preference pair among {read} "
                        f"({', '.join(f'{n} {why}' for why, n in sorted(dropped.items()))}); expected "
                        "records with a prompt and two different responses")
    where = f"{len(paths)} file(s) at '{data_config.path}'"
    validation = files.read_validation(data_config, SUFFIXES, recipe, to_pair, txt_ok=False)
    return files.ReadExamples(recipe, "pairs", pairs, dropped, where), validation


def check_preferences(data_config):
    """Reads every record once, so a bad pair file is one line before any model is built.

    Args:
        data_config: the `data` section of the run config.
    """
    read_pairs(data_config)


def _keyword_filtered(pairs, keywords, dropped):
    if not keywords:
        return pairs
    kept = [pair for pair in pairs if any(word in "".join(pair[0][0] + pair[1][0]) for word in keywords)]
    if len(kept) < len(pairs):
        dropped[f"mentions none of {', '.join(keywords)}"] += len(pairs) - len(kept)
    return kept


def _rows_of(pairs, tokenizer, seq_len, what, log):
    """Both sides of `pairs` tokenized and laid out: `(chosen Rows, rejected Rows, truncated, input needs)` at seq_len."""
    bos, eos, pad = int(tokenizer.start_token_id), int(tokenizer.end_token_id), int(tokenizer.pad_token_id)
    sides, needs, truncated = [], [], np.zeros(len(pairs), bool)
    for index, name in ((0, "chosen"), (1, "rejected")):
        tokens = tokenize(examples_dataset([pair[index] for pair in pairs]), tokenizer, log=log,
                          what=f"{what} {name} responses")
        wrapped = with_specials(tokens, bos, eos)
        truncated |= wrapped.lengths > seq_len + 1
        needs.append(np.minimum(wrapped.lengths, seq_len + 1) - 1)
        sides.append(pad_rows(wrapped, seq_len, pad))
    return sides[0], sides[1], truncated, np.maximum(*needs)


def _split(pairs, tokenizer, data_config, split_report, log, what="train"):
    """One split's pairs as full-length rows, with its unusable pairs dropped and counted.

    Returns:
        `(chosen Rows, rejected Rows, input needs)` of the kept pairs.
    """
    seq_len = int(data_config.seq_len)
    chosen, rejected, truncated, needs = _rows_of(pairs, tokenizer, seq_len, what, log)
    fits = (chosen.weights[:, 1:] > 0).any(axis=1) & (rejected.weights[:, 1:] > 0).any(axis=1)
    split_report.dropped["prompt fills seq_len: no response token fits"] += int((~fits).sum())
    keep = fits
    if data_config.get("overlong", "truncate") == "drop":
        split_report.dropped[f"longer than seq_len {seq_len} (--overlong drop)"] += int((fits & truncated).sum())
        keep = fits & ~truncated
    split_report.truncated = int((keep & truncated).sum())
    split_report.kept = int(keep.sum())
    split_report.tokens = int((chosen.mask[keep].sum() + rejected.mask[keep].sum()))
    split_report.dropped = Counter({k: v for k, v in split_report.dropped.items() if v})
    return chosen.take(np.flatnonzero(keep)), rejected.take(np.flatnonzero(keep)), needs[keep]


def _groups(chosen, rejected, needs, lengths, batch_size):
    """`Rows` of pairs (`[pairs, 2, length + 1]`), one group a bucket length."""
    index = assign_buckets(needs, lengths, batch_size)
    groups = []
    for k, length in enumerate(lengths):
        picked = np.flatnonzero(index == k)

        def both(field, picked=picked, length=length):
            return np.stack([getattr(chosen, field)[picked, :length + 1], getattr(rejected, field)[picked, :length + 1]],
                            axis=1)

        groups.append(Rows(both("ids"), both("weights"), both("mask")))
    return groups


def pair_batch(ids, weights, mask):
    """A batch of pairs from gathered `[pairs, 2, length + 1]` rows: inputs, and each pair's weight (0: a filler)."""
    import tensorflow as tf

    weights = tf.cast(weights[..., 1:], tf.float32)
    x = {"token_ids": ids[..., :-1], "padding_mask": mask[..., :-1], "targets": ids[..., 1:], "response_weights": weights}
    real = tf.reduce_all(tf.reduce_any(weights > 0, axis=2), axis=1)
    return x, tf.cast(real, tf.float32)


def make_preference_datasets(data_config, tokenizer, seed=0, log=print):  # long: read, split, lay out, report
    """Returns a `DataBundle` of preference-pair batches (see the module docstring) and its report.

    Args:
        data_config: the `data` section of the run config.
        tokenizer: the model's keras-hub tokenizer.
        seed: fixes the validation hold-out and every epoch's order.
        log: callable for progress lines (None for quiet).
    """
    from keras_tune import environment

    environment.keep_tensorflow_off_accelerators()
    log = log or (lambda line: None)
    seq_len, batch_size = int(data_config.seq_len), int(data_config.batch_size)
    read, validation_read = read_pairs(data_config, tokenizer)
    dropped = Counter(read.dropped)
    pairs = _keyword_filtered(read.examples, tuple(data_config.get("filter_keywords", ())), dropped)
    if validation_read is not None:
        train_pairs, held, held_source = pairs, list(validation_read.examples), \
            f"{validation_read.where}: {len(validation_read.examples)} pairs (--validation-path)"
    else:
        train_index, held_index = files.hold_out(len(pairs), data_config, seed)
        train_pairs, held = [pairs[i] for i in train_index], [pairs[i] for i in held_index]
        held_source = f"{read.where}: {len(held)} held-out pairs (seed {seed})"
    log(f"{read.recipe}: read {len(read.examples)} preference pairs from {read.where}")
    batching = "pad" if data_config.batching == "pad" else "bucket"
    report = DataReport(recipe=read.recipe, batching=batching, seq_len=seq_len, batch_size=batch_size)
    report.train = SplitReport(source=f"{read.where}: {len(train_pairs)} of {len(pairs)} pairs", dropped=dropped,
                               read=len(train_pairs) + sum(dropped.values()))
    train = _split(train_pairs, tokenizer, data_config, report.train, log)
    if not len(train[2]):
        raise UserError(f"--data-path '{data_config.path}': no usable preference pair left (dropped "
                        f"{dict(report.train.dropped)}); expected shorter prompts or a longer --seq-len")
    held_rows = None
    if held:
        report.validation = SplitReport(source=held_source, read=len(held))
        held_rows = _split(held, tokenizer, data_config, report.validation, log, "validation")
        if not len(held_rows[2]):
            report.notes.append(f"no validation: no usable pair in {held_source}")
            report.validation, held_rows = None, None
    all_needs = train[2] if held_rows is None else np.concatenate([train[2], held_rows[2]])
    lengths = [seq_len] if batching == "pad" else choose_buckets(train[2], all_needs, seq_len, batch_size)
    report.bucket_lengths = tuple(int(n) for n in lengths)
    train_groups = _groups(*train, lengths, batch_size)
    report.train.sequences = int(sum(len(g) for g in train_groups))
    report.train.batches = int(sum(len(g) // batch_size for g in train_groups))
    report.train.left_out_per_epoch = int(sum(len(g) % batch_size for g in train_groups))
    if report.train.batches == 0:
        raise UserError(f"the training split holds {report.train.sequences} preference pairs, fewer than "
                        f"--batch-size {batch_size}; expected more pairs or a smaller batch")
    report.notes.append(f"preference pairs: every count above is a pair (a chosen and a rejected row); a batch holds "
                        f"{batch_size} pairs, {2 * batch_size} rows")
    stream = train_stream(train_groups, batch_size, seed, int(data_config.shuffle_buffer), batch_of=pair_batch)
    train_dataset = stream(0).take(report.train.batches)
    validation, validation_steps = None, 0
    if held_rows is not None:
        groups = [g for g in _groups(*held_rows, lengths, batch_size) if len(g)]
        validation, filler = validation_dataset(groups, batch_size, batch_of=pair_batch)
        report.validation.sequences = int(sum(len(g) for g in groups))
        report.validation.filler_rows = filler
        validation_steps = report.validation.batches = (report.validation.sequences + filler) // batch_size
    _measure(train_dataset, report)
    return DataBundle(train_dataset, validation, report, report.train.batches, validation_steps, stream)


def _measure(train, report):
    """The report's padding and loss shares, over the first training batches."""
    positions = padding = loss = 0
    for x, _ in train.take(REPORT_BATCHES).as_numpy_iterator():
        positions += x["padding_mask"].size
        padding += int((x["padding_mask"] == 0).sum())
        loss += int((x["response_weights"] > 0).sum())
        report.sampled_batches += 1
    report.pad_fraction = padding / max(positions, 1)
    report.loss_fraction = loss / max(positions, 1)

"""What the data pipeline read, kept, cut and dropped: printed once at the start of a run.

Example:

```python
bundle = make_datasets(data_config, tokenizer, seed=0)
print(bundle.report.summary())
bundle.report.to_dict()  # the same figures as JSON-ready data
```
"""

import dataclasses
from collections import Counter


@dataclasses.dataclass
class SplitReport:
    """Counts for one split (train or validation).

    Attributes:
        source: where the examples came from, in words.
        read: examples read from the source.
        kept: examples that became (part of) a training sequence.
        truncated: kept examples cut at the sequence length (bucket/pad batching, packed whole examples).
        dropped: reason -> number of examples that were read but not kept.
        tokens: tokenizer tokens of the kept examples (before `<bos>`/`<eos>`).
        sequences: rows of length `seq_len + 1` (or a bucket length + 1) made.
        batches: batches in one pass over the split.
        left_out_per_epoch: sequences that do not fill a last batch of their
            bucket and so sit out each epoch (a different few every epoch).
        filler_rows: validation only: copies with weight 0 that fill a last batch.
        documents_per_row: pack only: documents (or pieces of one) a row holds, on average.
    """

    source: str = ""
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)
    tokens: int = 0
    sequences: int = 0
    batches: int = 0
    left_out_per_epoch: int = 0
    filler_rows: int = 0
    documents_per_row: float = 0.0

    def lines(self, name):
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items()))
        out = [
            f"  {name}: {self.source}",
            f"    examples: read {self.read}, kept {self.kept}, truncated {self.truncated}, "
            f"dropped {dropped}" + (f" ({reasons})" if reasons else ""),
            f"    tokens {self.tokens}, sequences {self.sequences}, batches {self.batches}"
            + (f", {self.documents_per_row:.2f} documents a row on average" if self.documents_per_row else ""),
        ]
        if self.left_out_per_epoch:
            out.append(
                f"    {self.left_out_per_epoch} sequences do not fill a last batch and sit out each epoch "
                "(different ones each epoch)"
            )
        if self.filler_rows:
            out.append(f"    last batches filled with {self.filler_rows} weight-0 copies")
        return out


@dataclasses.dataclass
class DataReport:
    """Everything `make_datasets` measured, for the run log.

    Attributes:
        recipe: the recipe name ("imdb", "mtnt", "code", "text", "chat").
        batching: the batching used ("pack", "bucket" or "pad"; "auto" resolved).
        seq_len: model input length (the longest bucket).
        batch_size: rows a batch.
        bucket_lengths: the input lengths batches come in (one for pack and pad).
        train: counts for the training split.
        validation: counts for the validation split, or None.
        pad_fraction: share of input positions that are padding, measured on
            `sampled_batches` batches of the training dataset.
        loss_fraction: share of input positions whose target carries loss.
        sampled_batches: how many training batches the two fractions are measured on.
        key_token_ids: token id sequences counted for the key-token weight, if on.
        document_masking: packed rows carry segment ids, so each document attends only to itself.
        whole_examples: packed rows hold whole prompt/response or chat examples
            (none split across two rows).
        notes: anything else worth a line.
    """

    recipe: str
    batching: str
    seq_len: int
    batch_size: int
    bucket_lengths: tuple = ()
    train: SplitReport = dataclasses.field(default_factory=SplitReport)
    validation: SplitReport | None = None
    pad_fraction: float = 0.0
    loss_fraction: float = 0.0
    sampled_batches: int = 0
    key_token_ids: dict = dataclasses.field(default_factory=dict)
    document_masking: bool = False
    whole_examples: bool = False
    notes: list = dataclasses.field(default_factory=list)

    @property
    def examples_read(self):
        return self.train.read + (self.validation.read if self.validation else 0)

    @property
    def train_batches(self):
        return self.train.batches

    @property
    def validation_batches(self):
        return self.validation.batches if self.validation else 0

    def summary(self):
        """Returns a multi-line description for the start of a run."""
        lengths = ", ".join(str(n) for n in self.bucket_lengths)
        out = [
            f"data: recipe {self.recipe}, batching {self.batching}, batch {self.batch_size} x "
            f"length {self.seq_len}" + (f" (buckets {lengths})" if self.batching == "bucket" else ""),
        ]
        out += self.train.lines("train")
        if self.validation is not None:
            out += self.validation.lines("validation")
        else:
            out.append("  validation: none")
        out.append(
            f"  padding {self.pad_fraction:.1%}, loss on {self.loss_fraction:.1%} of input positions "
            f"(over {self.sampled_batches} training batches)"
        )
        if self.batching == "pack":
            what = "examples (whole, none split across rows)" if self.whole_examples else "documents"
            out.append(f"  packed {what}: " + ("each starts with <bos> and attends only to itself (segment ids)"
                                                 if self.document_masking else
                                                 "attend to the documents before them in a row "
                                                 "(data.cross_document_attention=true)"))
        if self.key_token_ids:
            keys = ", ".join(f"{k}={v}" for k, v in self.key_token_ids.items())
            out.append(f"  key-token weight on: {keys}")
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)

    def to_dict(self):
        """Returns the report as plain data (for `config.json`-style logs)."""
        return dataclasses.asdict(self)

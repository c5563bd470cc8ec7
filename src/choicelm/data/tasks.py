"""Task files -> checked records -> token-id examples -> padded batches for the one training loop.

    classify   CSV (header row) or JSONL: a text column and a label column (--finetune.text_column, label_column)
    seq2seq    TSV (source<TAB>target; a first line "source<TAB>target" is a header) or JSONL: source and target
    sft        JSONL: {"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content": ...}, ...]}

Every problem names the file and line and says what to fix. The example datasets give the training
loop's sampler what TokenDataset gives it (n_windows, batch), so order, resume and rank sharding
are the same as in pretraining; a batch is a tuple whose last tensor is the targets (-100 = ignored):

    classification   (ids_BT, mask_BT, labels_B)           right-padded; mask 1 on real tokens
    seq2seq          (src_BS, src_mask_BS, tgt_in_BT, targets_BT)   see data/pairs.py
    sft              (x_BT, y_BT)                           y = -100 on prompt tokens and padding
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

import torch

from ..core.errors import ChoicelmError
from ..text.chat_template import render_chat
from ..models import registry
from .loader import LMBatchSampler
from .pairs import IGNORE_INDEX, PairDataset

TASKS = ("classify", "seq2seq", "sft")


# ----------------------------------------------------------------------------- reading files

def _rows(path: Path, delimiter: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSONL file (one object per line) or a CSV/TSV file with a header row. A file that is
    not UTF-8, or a CSV the csv module cannot read (a NUL byte, a field over its size limit), is a ChoicelmError."""
    if not path.is_file():
        raise ChoicelmError(f"data file {path} does not exist")
    try:
        yield from _read_rows(path, delimiter)
    except UnicodeDecodeError:
        _utf8_text(path)  # raises the ChoicelmError naming the line and byte
        raise


def _utf8_text(path: Path) -> str:
    if not path.is_file():
        raise ChoicelmError(f"data file {path} does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ChoicelmError(f"{path}:{line}: not UTF-8 text (invalid byte "
                            f"0x{data[e.start]:02x} at byte offset {e.start}); convert the file to UTF-8 (e.g. iconv "
                            "-f latin1 -t utf-8)") from None


def _read_rows(path: Path, delimiter: str | None) -> Iterator[tuple[int, dict]]:
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ChoicelmError(f"{path}:{n}: not valid JSON ({e}); write one JSON object per line") from None
                if not isinstance(row, dict):
                    raise ChoicelmError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
                yield n, row
        elif suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter=delimiter or ("\t" if suffix == ".tsv" else ","))
            try:
                for row in reader:
                    yield reader.line_num, row
            except csv.Error as e:
                raise ChoicelmError(f"{path}:{reader.line_num + 1}: cannot read this line as "
                                    f"{suffix[1:].upper()} ({e}); fix the line") from None
        else:
            raise ChoicelmError(f"{path}: unknown file type {suffix!r}; use .csv, .tsv or .jsonl")


def _field(path: Path, line: int, row: dict, column: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        have = ", ".join(k for k in row if k) or "none"
        raise ChoicelmError(f"{path}:{line}: the column {column!r} is missing or empty (columns here: {have}); "
                            f"fix the line or name the column with --finetune.{_option_for(column)}")
    return str(value)


def _option_for(column: str) -> str:
    return {"text": "text_column", "label": "label_column", "source": "source_column",
            "target": "target_column"}.get(column, "text_column / label_column / source_column / target_column")


def read_classification(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str]]:
    """(text, label) of every row."""
    path = Path(path)
    rows = [(_field(path, n, r, text_column), _field(path, n, r, label_column)) for n, r in _rows(path)]
    if not rows:
        raise ChoicelmError(f"{path} holds no examples")
    return rows


def read_pairs(path: str | Path, source_column: str = "source", target_column: str = "target") -> list[tuple[str, str]]:
    """(source, target) of every line: JSONL objects, or TSV lines of exactly two fields."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json", ".csv"):
        pairs = [(_field(path, n, r, source_column), _field(path, n, r, target_column)) for n, r in _rows(path)]
    elif path.suffix.lower() == ".tsv":
        pairs = []
        for n, line in enumerate(_utf8_text(path).splitlines(), 1):
            if not line.strip() or (n == 1 and line.split("\t") == [source_column, target_column]):
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not all(x.strip() for x in fields):
                raise ChoicelmError(f"{path}:{n}: expected a source and a target separated by one tab, found "
                                    f"{len(fields)} field(s){' (one is empty)' if len(fields) == 2 else ''}")
            pairs.append((fields[0], fields[1]))
    else:
        raise ChoicelmError(f"{path}: unknown pair file type {path.suffix!r}; use .tsv or .jsonl")
    if not pairs:
        raise ChoicelmError(f"{path} holds no pairs")
    return pairs


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Each line's conversation as messages: {"prompt", "response"} becomes a user and an assistant message."""
    path = Path(path)
    out = []
    for n, row in _rows(path):
        if "messages" in row:
            messages = row["messages"]
            ok = isinstance(messages, list) and messages and all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages)
            if not ok:
                raise ChoicelmError(f"{path}:{n}: messages must be a non-empty list of {{\"role\": system|user|"
                                    f"assistant, \"content\": str}}")
            if not any(m["role"] == "assistant" for m in messages):
                raise ChoicelmError(f"{path}:{n}: the conversation has no assistant message, so nothing to learn")
        elif "prompt" in row or "response" in row:
            messages = [{"role": "user", "content": _field(path, n, row, "prompt")},
                        {"role": "assistant", "content": _field(path, n, row, "response")}]
        else:
            raise ChoicelmError(f"{path}:{n}: expected \"prompt\" and \"response\", or \"messages\"; found "
                                f"{', '.join(row) or 'nothing'}")
        out.append(messages)
    if not out:
        raise ChoicelmError(f"{path} holds no conversations")
    return out


def label_names(train_labels: list[str]) -> list[str]:
    """The classes, sorted (class id = index), from the training labels."""
    names = sorted(set(train_labels))
    if len(names) < 2:
        raise ChoicelmError(f"the training file has {len(names)} label(s) ({', '.join(names)}); a classifier "
                            "needs at least 2 classes")
    return names


def label_ids(labels: list[str], names: list[str], where: str) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    unseen = sorted(set(labels) - set(index))
    if unseen:
        raise ChoicelmError(f"{where} has label(s) {', '.join(map(repr, unseen[:5]))} that the model was not "
                            f"trained on; known labels: {', '.join(names)}")
    return [index[label] for label in labels]


# ----------------------------------------------------------------------------- encoding

def classification_ids(tokenizer, text: str, kind: str, max_len: int) -> list[int]:
    """An encoder reads [BOS] text [EOS] and pools the first position (BERT's [CLS] ... [SEP]); a decoder reads
    text [EOS] and pools the last, the EOS, which has seen the whole text. Long texts keep their start."""
    if registry.get(kind).encodes:
        bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return [bos] + tokenizer.encode(text)[:max_len - 2] + [tokenizer.eos_id]
    return tokenizer.encode(text)[:max_len - 1] + [tokenizer.eos_id]


def source_ids(tokenizer, text: str, max_len: int) -> list[int]:
    """An encoder-decoder's source: the text's first max_len - 1 tokens, then EOS (as Marian's tokenizer does)."""
    return tokenizer.encode(text)[:max_len - 1] + [tokenizer.eos_id]


def decoder_start_id(tokenizer) -> int:
    """The encoder-decoder's first decoder input: BOS, or the pad token where there is none (Marian)."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id_or_eos


def sft_ids(tokenizer, template: str, messages: list[dict], max_len: int) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation under `template`, and which of them are trained (the text the template adds
    for each assistant message: the reply, its end token, the template's own suffix). Segments are tokenized
    apart, cut where the generation prompt ends, so training sees the reply tokens generation produces."""
    kw = dict(bos_token=tokenizer.special_tokens.get("bos", ""), eos_token=tokenizer.special_tokens["eos"])
    ids: list[int] = []
    trained: list[bool] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(template, messages[:i], add_generation_prompt=True, **kw)
        full = render_chat(template, messages[:i + 1], **kw)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ChoicelmError("the chat template renders a conversation differently from its beginning, so the "
                                "reply tokens cannot be found; use a template whose output only grows per message")
        for text, learn in ((prompt[len(done):], False), (full[len(prompt):], True)):
            piece = tokenizer.encode(text) if text else []
            ids += piece
            trained += [learn] * len(piece)
        done = full
    return ids[:max_len + 1], trained[:max_len + 1]


# ----------------------------------------------------------------------------- datasets

class ExampleDataset:
    """Examples of different lengths, served to LMBatchSampler / eval_batches as TokenDataset serves windows."""

    def __len__(self) -> int:
        raise NotImplementedError

    def n_tokens(self, index: int) -> int:
        raise NotImplementedError

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def n_windows(self, block_size: int) -> int:
        return len(self)

    def batch(self, indices: list[int], block_size: int) -> tuple[torch.Tensor, ...]:
        return self.collate([int(i) for i in indices])


class ClassificationDataset(ExampleDataset):
    def __init__(self, ids: list[list[int]], labels: list[int], pad_id: int):
        self.ids, self.labels, self.pad_id = ids, labels, pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def n_tokens(self, index: int) -> int:
        return len(self.ids[index])

    def collate(self, indices):
        rows = [self.ids[i] for i in indices]
        T = max(map(len, rows))
        ids_BT = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask_BT = torch.zeros(len(rows), T, dtype=torch.long)
        for b, row in enumerate(rows):
            ids_BT[b, :len(row)] = torch.tensor(row)
            mask_BT[b, :len(row)] = 1
        return ids_BT, mask_BT, torch.tensor([self.labels[i] for i in indices])


class SFTDataset(ExampleDataset):
    def __init__(self, ids: list[list[int]], trained: list[list[bool]], pad_id: int):
        self.ids, self.trained, self.pad_id = ids, trained, pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def n_tokens(self, index: int) -> int:
        return len(self.ids[index]) - 1

    def collate(self, indices):
        T = max(len(self.ids[i]) for i in indices) - 1
        x_BT = torch.full((len(indices), T), self.pad_id, dtype=torch.long)
        y_BT = torch.full((len(indices), T), IGNORE_INDEX, dtype=torch.long)
        for b, i in enumerate(indices):
            ids, learn = torch.tensor(self.ids[i]), torch.tensor(self.trained[i])
            n = len(ids) - 1
            x_BT[b, :n] = ids[:-1]
            y_BT[b, :n] = torch.where(learn[1:], ids[1:], IGNORE_INDEX)  # predict a token only if it is trained
        return x_BT, y_BT


class PairExamples(ExampleDataset):
    """data/pairs.py's PairDataset as loop batches."""

    def __init__(self, pairs: PairDataset):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def n_tokens(self, index: int) -> int:
        src, tgt = self.pairs.pairs[index]
        return len(src) + len(tgt) + 1

    def collate(self, indices):
        b = self.pairs.collate(indices)
        return b.src_BS, b.src_mask_BS, b.tgt_in_BT, b.targets_BT


class ExampleBatchSampler(LMBatchSampler):
    """LMBatchSampler over examples (same order, resume and rank sharding); tokens_per_step counts the tokens of
    the examples of the step last served, over all ranks (examples differ in length, windows do not)."""

    def __init__(self, dataset: ExampleDataset, *args, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self._last_tokens = 0

    def next_step(self):
        first = self.step * self.global_batch_size
        self._last_tokens = sum(self.dataset.n_tokens(self.window_of(g))
                                for g in range(first, first + self.global_batch_size))
        return super().next_step()

    @property
    def tokens_per_step(self) -> int:
        return self._last_tokens

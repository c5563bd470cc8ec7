"""Byte-level BPE and character tokenizers, with Hugging Face `tokenizers` underneath.

    tok = Tokenizer.train(["corpus/"], vocab_size=8192)           # GPT-2 style byte-level BPE
    tok = Tokenizer.train(["corpus/"], vocab_size=512, kind="char")
    tok.save("tok/")                                               # tok/tokenizer.json + tokenizer_config.json
    tok = Tokenizer.load("tok/")
    ids = tok.encode("To be, or not to be")                        # no BOS/EOS added
    assert tok.decode(ids) == "To be, or not to be"                # lossless for any UTF-8 text

Both kinds are lossless: decode(encode(s)) == s for every string without lone surrogates.

- "bpe": GPT-2's recipe. The text is cut by GPT-2's regex (ByteLevel pre-tokenizer, no prefix
  space), every byte is a base token (256), and merges are learned on top. Every string encodes.
- "char": every distinct character of the training text is a token; a character never seen in
  training (emoji, CJK, ...) is spelled with byte tokens `<0x00>`..`<0xFF>` (byte fallback, as in
  Llama's tokenizer) and decodes back exactly. `vocab_size` is an upper bound here: when the text
  has more distinct characters than fit, the rarest ones fall back to bytes.

Special tokens, always ids 0, 1, 2: `<|endoftext|>` (end of document; `eot_id`), `<|pad|>`,
`<|mask|>`. No unknown token is needed: both kinds can spell any byte. Like GPT-2, the literal text
`<|endoftext|>` inside a string encodes to the special id (so it round-trips, but as one token);
`encode(text, allow_special=False)` spells it as plain text instead (for text a user typed).

Tokenizers from elsewhere (a Hugging Face GPT-2, Llama or BERT folder, via `choicelm convert from-hf`)
keep their own special tokens: `load` reads them from tokenizer_config.json (eos_token, bos_token,
pad_token, mask_token), so an imported GPT-2 tokenizer has `eos_id` 50256 and `pad_id` None. The
roles are `tok.special_tokens`; generation reads `eos_id`, and `pad_id_or_eos` when it must pad.
`tok.kind` names what was imported: "wordpiece" (BERT), "unigram", "wordlevel", "bpe" (byte-level) or "char"
(any other BPE, e.g. Llama's byte-fallback one).

The saved folder loads in transformers: `PreTrainedTokenizerFast.from_pretrained(folder)` or
`PreTrainedTokenizerFast(tokenizer_file=folder/"tokenizer.json")` give the same ids.
(Not `GPT2TokenizerFast(vocab_file=..., merges_file=...)`: in transformers 5.x it encodes to [].)

Training reads its text through `choicelm.text.files` (shared with `choicelm prepare`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..core.errors import ChoicelmError, naming
from .files import TextStats, iter_text_files

log = logging.getLogger(__name__)

EOT, PAD, MASK = "<|endoftext|>", "<|pad|>", "<|mask|>"
SPECIAL_TOKENS = (EOT, PAD, MASK)
KINDS = ("bpe", "char")
N_BYTES = 256
MIN_VOCAB = N_BYTES + len(SPECIAL_TOKENS)  # every byte plus the specials
MAX_VOCAB = 1_000_000
CHUNK_CHARS = 8192  # pieces this long keep every core busy in the batch encoder


# Places where cutting a text cannot change its byte-level BPE tokens: GPT-2's regex never puts a
# pre-token across a '\n' with non-space characters on both sides, nor across the boundary before
# " <ASCII letter>" (" ?\p{L}+" starts there). Characters tokens never span anything.
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)|(?<=\S)(?= [A-Za-z])")


def split_text(text: str, target_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `target_chars` at safe places, so that encoding the pieces
    one by one (in parallel) gives exactly the ids of encoding `text` whole."""
    pieces, start = [], 0
    while len(text) - start > target_chars:
        m = _SAFE_CUT.search(text, start + target_chars)
        if m is None:
            break
        pieces.append(text[start:m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    """A choicelm tokenizer: a Hugging Face `tokenizers.Tokenizer` plus its kind and special ids."""

    def __init__(self, hf: HFTokenizer, kind: str | None = None, special_tokens: dict[str, str | None] | None = None):
        """special_tokens: role (eos, bos, pad, mask) -> token text, or None for no such token. Roles not
        given default to choicelm's own tokens where the vocabulary has them (eos = bos = <|endoftext|>)."""
        self.hf = hf
        self._kind = kind or _infer_kind(hf)
        self.train_stats: TextStats | None = None  # set by train(): files read and skipped
        self.chat_template: str | None = None  # Jinja chat template (text/chat_template.py); saved with the tokenizer
        roles = {role: token for role, token in _DEFAULT_ROLES.items() if hf.token_to_id(token) is not None}
        for role, token in (special_tokens or {}).items():
            if role not in _DEFAULT_ROLES:
                raise ChoicelmError(f"unknown special-token role {role!r}; choose from {', '.join(_DEFAULT_ROLES)}")
            if token is not None and hf.token_to_id(token) is None:
                raise ChoicelmError(f"the {role} token {token!r} is not in the vocabulary; fix {role}_token in "
                                    f"tokenizer_config.json")
            roles[role] = token
        self.special_tokens: dict[str, str] = {role: t for role, t in roles.items() if t is not None}
        if "eos" not in self.special_tokens:
            raise ChoicelmError(f"this tokenizer has no end-of-text token ({EOT}, or eos_token in "
                                f"tokenizer_config.json); train one with `choicelm tokenizer train`")
        self._eot_id = self._id("eos")

    # --- training

    @classmethod
    def train(cls, files: list[str | os.PathLike], vocab_size: int | None, kind: str = "bpe",
              errors: str = "strict") -> "Tokenizer":
        """Train on the text files (or folders) in `files`, read one at a time.

        vocab_size counts the special tokens. For "bpe" it is the exact target (fewer tokens result
        only if the text runs out of merges); for "char" it is an upper bound (None = no bound).
        """
        if kind not in KINDS:
            raise ChoicelmError(f"tokenizer kind {kind!r} is not allowed; choose bpe or char")
        _check_vocab_size(vocab_size, kind)
        stats = TextStats()
        texts = iter_text_files(files, errors=errors, stats=stats)
        tok = _train_bpe(texts, vocab_size) if kind == "bpe" else _train_char(texts, vocab_size)
        log.info("trained a %s tokenizer with %d tokens on %d files (%d bytes)",
                 kind, tok.vocab_size, len(stats.files), stats.total_bytes)
        tok.train_stats = stats
        return tok

    # --- save / load

    def save(self, out_dir: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write out_dir/tokenizer.json and out_dir/tokenizer_config.json (transformers reads both).
        With overwrite=False an existing tokenizer there is an error instead of being replaced."""
        out = Path(out_dir)
        if not overwrite and (out / "tokenizer.json").exists():
            raise ChoicelmError(f"{out} already holds a tokenizer; pass --overwrite to replace it or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "tokenizer.json", self.hf.to_str(pretty=True))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.special_tokens["eos"],
            "bos_token": self.special_tokens.get("bos"),  # GPT-2's convention: <|endoftext|>; encode() never inserts it
            "pad_token": self.special_tokens.get("pad"),
            "mask_token": self.special_tokens.get("mask"),
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # keep decode lossless in transformers too
            "model_max_length": 1_000_000_000_000,
            "choicelm": {"kind": self.kind, "sha256": self.sha256()},
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a folder written by `save` (or a bare tokenizer.json). The special tokens named in the
        folder's tokenizer_config.json / special_tokens_map.json (Hugging Face's files) are used."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ChoicelmError(f"no tokenizer at {file}; train one with `choicelm tokenizer train --out DIR`")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ChoicelmError(f"{file} is not a valid tokenizer.json ({str(e)[:200]}); "
                                f"re-create it with `choicelm tokenizer train`") from None
        # Hub files may pad to a fixed length and truncate (all-MiniLM: 128); transformers switches both off on
        # load, and so does choicelm: encode() returns the text's ids, nothing more or less
        hf.no_padding()
        hf.no_truncation()
        tok = cls(hf, special_tokens=read_special_tokens(path) if path.is_dir() else None)
        tok.chat_template = read_chat_template(path) if path.is_dir() else None
        return tok

    # --- encoding

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; no special tokens are added. With allow_special=False the text of a special
        token (`<|endoftext|>`) is encoded as plain text, never as the special token: for text a user typed."""
        hf = self.hf if allow_special else self._hf_text_only()
        return hf.encode(text, add_special_tokens=False).ids

    def special_token_ids(self) -> dict[str, int]:
        """Text -> id of every special token in the vocabulary (what allow_special=False spells as text)."""
        return {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def _hf_text_only(self) -> HFTokenizer:
        """A copy of the HF tokenizer that encodes special tokens' text as text (made once; never mutated, so
        threads may share it)."""
        if getattr(self, "_text_only", None) is None:
            hf = HFTokenizer.from_str(self.hf.to_str())
            hf.encode_special_tokens = True
            self._text_only = hf
        return self._text_only

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, run in parallel by the Rust batch encoder."""
        fast = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # no offsets: faster
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, parallel even across one long text: each is cut at safe places
        (`split_text`), the pieces are batch-encoded and the ids joined again."""
        pieces, owner = [], []
        for i, text in enumerate(texts):
            for piece in split_text(text):
                pieces.append(piece)
                owner.append(i)
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(owner, self.encode_batch(pieces)):
            out[i].extend(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens included (so decode(encode(s)) == s)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    # --- facts

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """End of text: what ends a document and stops generation (= eos_id)."""
        return self._eot_id

    @property
    def eos_id(self) -> int:
        return self._eot_id

    @property
    def bos_id(self) -> int | None:
        return self._id("bos")

    @property
    def pad_id(self) -> int | None:
        """None when the tokenizer has no padding token (GPT-2)."""
        return self._id("pad")

    @property
    def pad_id_or_eos(self) -> int:
        """The id to fill padded positions with: pad_id, or eos_id when there is none (HF's convention;
        padded positions are masked out, so the value only has to be a valid id)."""
        pad = self.pad_id
        return self._eot_id if pad is None else pad

    @property
    def mask_id(self) -> int | None:
        return self._id("mask")

    def sha256(self) -> str:
        """Hash of the canonical tokenizer.json (sorted keys, no spaces): equal across save/load."""
        canonical = json.dumps(json.loads(self.hf.to_str()), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each token id stands for (int64, indexed by id), for bits-per-byte.
        A special token counts as its literal text."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.hf.get_vocab(with_added_tokens=False).items():
            if self.kind == "bpe":
                lengths[i] = len(token)  # byte-level alphabet: one character stands for one byte
            elif self.kind == "wordpiece":  # "##ing" continues a word: the text is "ing"
                lengths[i] = len(token.removeprefix("##").encode("utf-8"))
            else:
                lengths[i] = 1 if _BYTE_TOKEN.fullmatch(token) else len(token.encode("utf-8"))
        for i, added in self.hf.get_added_tokens_decoder().items():
            lengths[i] = len(added.content.encode("utf-8"))
        return lengths

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    def _id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.hf.token_to_id(token)


_DEFAULT_ROLES = {"eos": EOT, "bos": EOT, "pad": PAD, "mask": MASK}


def read_special_tokens(folder: Path) -> dict[str, str | None]:
    """Roles named in Hugging Face's tokenizer_config.json and special_tokens_map.json (the latter wins,
    as in transformers). A value is a string or an AddedToken dict {"content": ...}; null = none. A folder
    that names no eos but a sep_token (BERT) gets [SEP] as eos and its cls_token as bos."""
    roles: dict[str, str | None] = {}
    bert: dict[str, str] = {}  # BERT names no eos/bos: its [SEP] ends a text and its [CLS] starts one
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ChoicelmError(f"{file} is not valid JSON ({e}); fix or delete it") from None
        for role, key in [(r, f"{r}_token") for r in _DEFAULT_ROLES] + [("eos", "sep_token"), ("bos", "cls_token")]:
            if key in config:
                value = config[key]
                value = value.get("content") if isinstance(value, dict) else value
                if key == f"{role}_token":
                    roles[role] = value
                elif isinstance(value, str):
                    bert[role] = value
    if roles.get("eos") is None and "eos" in bert:
        roles.update({role: token for role, token in bert.items() if roles.get(role) is None})
    return roles


def read_chat_template(folder: Path) -> str | None:
    """The Jinja chat template of a tokenizer folder: chat_template.jinja, or "chat_template" in
    tokenizer_config.json (transformers writes one or the other); None when there is none."""
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template") if config_file.is_file() else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _check_vocab_size(vocab_size: int | None, kind: str) -> None:
    if vocab_size is None and kind == "char":
        return
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool) \
            or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ChoicelmError(f"vocab_size={vocab_size!r} is out of range; choose an integer from {MIN_VOCAB} "
                            f"({N_BYTES} bytes + {len(SPECIAL_TOKENS)} special tokens) to {MAX_VOCAB:,}")


def _infer_kind(hf: HFTokenizer) -> str:
    """The kind follows from the model and the decoder: an imported WordPiece (BERT), Unigram or WordLevel model is
    that; a BPE with the ByteLevel decoder is byte-level BPE; any other BPE (choicelm's char vocabulary, Llama's
    byte-fallback BPE) is counted as char (byte tokens <0xNN> are one byte each)."""
    spec = json.loads(hf.to_str())
    model = (spec.get("model") or {}).get("type")
    if model in ("WordPiece", "Unigram", "WordLevel"):
        return model.lower()
    decoder = spec.get("decoder") or {}
    return "bpe" if decoder.get("type") == "ByteLevel" else "char"


def _special_tokens() -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]


def _train_bpe(texts: Iterator[tuple[Path, str]], vocab_size: int) -> Tokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_special_tokens(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The reader raises ChoicelmError from inside the iterator, which the Rust trainer would
    # swallow into a generic error: keep it aside and re-raise it as it was.
    failure: list[BaseException] = []

    def pieces() -> Iterator[str]:
        try:
            for _, text in texts:
                yield from split_text(text)
        except ChoicelmError as e:
            failure.append(e)
            raise

    try:
        hf.train_from_iterator(pieces(), trainer=trainer)
    except Exception:
        if failure:
            raise failure[0] from None
        raise
    return Tokenizer(hf, kind="bpe")


def _train_char(texts: Iterator[tuple[Path, str]], vocab_size: int | None) -> Tokenizer:
    counts: Counter[str] = Counter()
    for _, text in texts:
        counts.update(text)
    room = None if vocab_size is None else vocab_size - MIN_VOCAB
    # Keep the most frequent characters (ties by code point, so training is deterministic) and
    # give them ids in code-point order, which makes the vocabulary easy to read.
    kept = sorted(counts, key=lambda c: (-counts[c], c))[:room]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(N_BYTES):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in sorted(kept):
        vocab[c] = len(vocab)
    # A BPE model without merges is a character lookup; byte_fallback spells unknown characters
    # as their UTF-8 bytes, and the ByteFallback decoder turns those back into the characters.
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(_special_tokens())
    return Tokenizer(hf, kind="char")


def _write_atomic(path: Path, text: str) -> None:
    """Write `path` through a temporary file beside it, which a failure (a full disk) removes again."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with naming(path):
            tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""tiktoken BPE files (base64 token + rank per line) -> GPT-2's vocab.json / merges.txt.

    ranks = read_tiktoken("gpt2.tiktoken")            # {b"Hello": 15496, ...}
    vocab, merges = tiktoken_to_vocab_merges(ranks)   # {"Hello": 15496, "Ġworld": 995, ...}, [("Ġ", "t"), ...]
    write_vocab_merges(out_dir, vocab, merges)        # out_dir/vocab.json + merges.txt
    tok = byte_level_tokenizer(vocab, merges)         # a `tokenizers.Tokenizer` with GPT-2's pipeline

A tiktoken file stores no merges, only ranks: the token of rank r is the r-th thing BPE learned
(GPT-2: the 256 bytes, then one token per merge). tiktoken encodes by repeatedly joining the
adjacent pair whose concatenation has the lowest rank, so the merge that made a token is found by
running exactly that on the token's own bytes with only lower-ranked tokens allowed: it stops at
two parts, the left and right halves of the merge. One merge per token, in rank order, which is
what the original merges.txt holds.

vocab.json uses GPT-2's byte-to-unicode alphabet (every byte is a printable character; a space is
"Ġ"), so Hugging Face's byte-level BPE reads the result as it reads GPT-2's own files.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from ..core.errors import ChoicelmError

ENDOFTEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters: bytes that are printable stay
    themselves, the other 68 go to chr(256), chr(257), ... in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def read_tiktoken(path: str | os.PathLike) -> dict[bytes, int]:
    """{token bytes: rank} from a .tiktoken file; a bad line is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ChoicelmError(f"tiktoken file {path} does not exist; pass a file of 'base64-token rank' lines")
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ChoicelmError(f"{path}:{n} is not a 'base64-token rank' line: {line[:80]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ChoicelmError(f"{path}: the ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts tiktoken's BPE leaves when it encodes `token` with only lower-ranked tokens."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ChoicelmError(f"token {token!r} (rank {limit}) cannot be built from lower-ranked tokens; "
                            f"the file is not a BPE vocabulary")
    return parts[0], parts[1]


def tiktoken_to_vocab_merges(ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None
                             ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in GPT-2's byte-level alphabet. special_tokens default to GPT-2's
    {"<|endoftext|>": len(ranks)} (50256 for GPT-2's 50,256 ranks)."""
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ChoicelmError(f"the tiktoken vocabulary lacks single-byte tokens (e.g. byte {missing[0]}); "
                            f"a byte-level BPE needs all 256")
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [tuple(map(text, _merge_of(token, ranks)))
              for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    specials = {ENDOFTEXT: len(ranks)} if special_tokens is None else special_tokens
    for token, i in specials.items():
        vocab[token] = i
    return vocab, merges


def write_vocab_merges(out_dir: str | os.PathLike, vocab: dict[str, int], merges: list[tuple[str, str]]) -> Path:
    """out_dir/vocab.json and out_dir/merges.txt in the format of GPT-2's own files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def read_vocab_merges(folder: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    folder = Path(folder)
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise ChoicelmError(f"cannot read {folder}/vocab.json and merges.txt: {e}") from None
    merges = []
    for n, line in enumerate(lines, start=1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ChoicelmError(f"{folder}/merges.txt:{n} is not a pair of tokens: {line[:80]!r}")
        merges.append((pair[0], pair[1]))
    return vocab, merges


def byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]],
                         special_tokens: tuple[str, ...] = (ENDOFTEXT,)):
    """GPT-2's tokenizer pipeline (as in its tokenizer.json on the Hub) over vocab and merges:
    GPT-2's regex, no prefix space, byte-level BPE, `<|endoftext|>` a special token."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens if t in vocab])
    return hf

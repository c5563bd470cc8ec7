"""Token ids -> text deltas, never splitting a multi-byte UTF-8 character.

A byte-level BPE token (or a char tokenizer's byte-fallback token) can hold part of a character:
an emoji is 4 bytes and may come as 2-4 tokens. Decoding such a partial sequence gives U+FFFD, so
a delta is only released once the text decoded so far no longer ends in U+FFFD (the method of
Hugging Face's TextStreamer / text-generation-inference: decode a short window of recent ids, not
the whole sequence, so each step costs O(1) tokens).

RowText combines that with stop strings: it keeps the row's text, cuts it at the earliest stop
string, and holds back a tail that could still turn into a stop string, so nothing it has emitted
ever has to be taken back. The concatenated deltas always equal `.text`, the row's final text.
"""

from __future__ import annotations

from .stopping import StopStrings

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """push(id) -> newly complete text ('' while a character is incomplete); flush() -> the rest."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decoded cleanly last time: the context for the next window
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        if len(now) > len(done) and not now.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is left, incomplete bytes shown as U+FFFD (the model stopped mid-character)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(done):]


class RowText:
    """One sequence's generated text: push(token) -> delta safe to show; `.stopped` once a stop string
    appeared; finish() -> the last delta. `.text` is the text so far, cut before any stop string."""

    def __init__(self, tokenizer, stop: StopStrings | None = None):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = stop if stop else None
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._add(self.decoder.push(token_id), final=False)

    def finish(self) -> str:
        if self.stopped:
            return self._release(len(self.text))
        return self._add(self.decoder.flush(), final=True)

    def _add(self, piece: str, final: bool) -> str:
        searched = len(self.text)
        self.text += piece
        if self.stop is not None and piece:
            at = self.stop.find(self.text, searched)
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
                return self._release(len(self.text))
        keep = 0 if final or self.stop is None else self.stop.holdback(self.text)
        return self._release(len(self.text) - keep)

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta

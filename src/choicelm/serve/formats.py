"""The JSON a completion or a chat completion answers with: the whole response, the SSE chunks of a stream, and
log-probabilities of the tokens kept in the text."""

from dataclasses import dataclass


@dataclass
class CompletionFormat:
    """/v1/completions: `echoes[p]` is prompt p's text when echo=true (else ""), n choices per prompt."""

    tokenizer: object
    cid: str
    created: int
    model: str
    n: int
    n_prompts: int
    echo: bool
    echoes: list[str]
    logprobs: int | None
    strip_first = False  # completions keep the text exactly as generated

    def opening(self) -> list[dict]:
        """Chunks before any text: echo goes out as the first text of each choice."""
        return [self._chunk(i, self.echoes[i // self.n], None) for i in range(self.n_prompts * self.n) if self.echo]

    def delta(self, index: int, text: str | None, reason: str | None) -> dict:
        return self._chunk(index, text or "", reason)

    def usage(self, usage: dict) -> dict:
        return {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}

    def final(self, texts, reasons, usage, token_logprobs) -> dict:
        choices = [{"index": i, "text": self.echoes[i // self.n] + t, "finish_reason": r,
                    "logprobs": None if self.logprobs is None else completion_logprobs(self.tokenizer, lps, t)}
                   for i, (t, r, lps) in enumerate(zip(texts, reasons, token_logprobs))]
        return {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def _chunk(self, index, text, reason) -> dict:
        return {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}


@dataclass
class ChatFormat:
    """/v1/chat/completions: one prompt (the templated conversation), n choices."""

    tokenizer: object
    cid: str
    created: int
    model: str
    n: int
    logprobs: int | None
    strip_first = True  # the template leaves the space after "Assistant:" to the model; the reply drops it

    def opening(self) -> list[dict]:
        """The role chunk of each choice."""
        return [self._chunk(i, {"role": "assistant", "content": ""}, None) for i in range(self.n)]

    def delta(self, index: int, text: str | None, reason: str | None) -> dict:
        return self._chunk(index, {"content": text} if text is not None else {}, reason)

    def usage(self, usage: dict) -> dict:
        return {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}

    def final(self, texts, reasons, usage, token_logprobs) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                    "logprobs": None if self.logprobs is None else chat_logprobs(self.tokenizer, lps, t)}
                   for i, (t, r, lps) in enumerate(zip(texts, reasons, token_logprobs))]
        return {"id": self.cid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def _chunk(self, index, delta, reason) -> dict:
        return {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def _kept_tokens(tokenizer, token_logprobs: list, text: str, lstripped: bool = False) -> list[tuple]:
    """(token string, offset in the text, logprob, top) for the tokens that made the returned text: a stop string
    cuts the text, and the tokens that only spelled the stop string are dropped with it."""
    pieces = [tokenizer.decode([tok]) for tok, _, _ in token_logprobs]
    raw = "".join(pieces)
    skip = len(raw) - len(raw.lstrip()) if lstripped else 0  # the chat reply's leading space is stripped
    out, offset = [], -skip
    for piece, (tok, lp, top) in zip(pieces, token_logprobs):
        if offset >= len(text):
            break
        out.append((piece, max(offset, 0), lp, top))
        offset += len(piece)
    return out


def completion_logprobs(tokenizer, token_logprobs: list, text: str) -> dict:
    kept = _kept_tokens(tokenizer, token_logprobs, text)
    return {"tokens": [p for p, _, _, _ in kept], "token_logprobs": [lp for _, _, lp, _ in kept],
            "top_logprobs": [{tokenizer.decode([t]): v for t, v in top} for _, _, _, top in kept],
            "text_offset": [o for _, o, _, _ in kept]}


def _logprob_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(tokenizer, token_logprobs: list, text: str) -> dict:
    kept = _kept_tokens(tokenizer, token_logprobs, text, lstripped=True)
    return {"content": [{**_logprob_entry(p, lp),
                         "top_logprobs": [_logprob_entry(tokenizer.decode([t]), v) for t, v in top]}
                        for p, _, lp, top in kept], "refusal": None}

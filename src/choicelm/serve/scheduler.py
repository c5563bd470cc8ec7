"""Continuous batching: one background thread decodes every running sequence together, one token per step.

    the KV cache is one static tensor of --max-batch rows x block_size columns; each running sequence owns
    one row, and rows are kept packed (a finished sequence's row is refilled by the last one), so a step
    runs the model on exactly the running rows;
    all rows write their next token at one shared column `cur`; a row's tokens sit in columns start..cur-1
    and everything left of `start` is masked out, with position ids counting from 0 at `start` (the
    left-padding scheme of generation/generate.py, so a row's output never depends on its neighbours);
    a new request is prefilled alone (exactly as lm.generate prefills it), its keys/values are copied into
    free rows ending at column cur, and it joins the batch at the next step;
    when `cur` reaches the block size every row is shifted left by the smallest start (a running sequence
    always has at least 2 free columns on its left then, because prompt + max_tokens <= block size);
    each sequence has its own sampling options, processors, RNG (seed) and stop strings, and stops on its own;
    a cancelled request (client gone) leaves at the next step boundary, freeing its rows at once.

Events go back to the caller through `Request.sink(event)`, called on the scheduler thread:
    ("delta", index, text)                    new text of choice `index` (UTF-8 safe, never part of a stop string)
    ("finish", index, reason, n_tokens)       reason "stop" (EOS or a stop string) or "length"
    ("logprob", index, token, logprob, top)   only when Request.logprobs is set: the model's log-probability of
                                              each generated token (raw logits, before penalties, temperature
                                              and filtering) and the `logprobs` most likely [(token, logprob)]
    ("error", message)                        the request failed; no more events follow
"""

from __future__ import annotations

import collections
import itertools
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core.errors import ChoicelmError
from ..generation.step import decode_step
from ..generation.options import GenerationConfig
from ..generation.processors import apply_processors
from ..generation.stopping import StopStrings
from ..generation.streaming import RowText


class QueueFull(ChoicelmError):
    """More requests are waiting than --max-queue allows."""


@dataclass
class Request:
    """One prompt, continued `n` times. cfg carries the sampling options (num_return_sequences stays 1:
    the n choices are n sequences here); presence/frequency penalties follow OpenAI's definition."""

    prompt: list[int]
    cfg: GenerationConfig
    sink: Callable[[tuple], None]
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    index_base: int = 0  # choice index of the first sequence (several prompts in one API call)
    logprobs: int | None = None  # None = no log-probabilities; k = the chosen token's and the top k
    cancelled: bool = False
    id: int = field(default_factory=itertools.count().__next__)


class Sequence:
    """One running choice: its tokens, its sampler and its text."""

    def __init__(self, request: Request, index: int, tokenizer, device):
        cfg = request.cfg
        self.request, self.index = request, index
        self.ids = list(request.prompt)
        self.generated = 0
        self.procs = cfg.processors()
        self.greedy = cfg.greedy
        self.eos = set(cfg.eos_token_id or [])
        self.max_new_tokens = cfg.max_new_tokens
        self.text = RowText(tokenizer, StopStrings(cfg.stop))
        self.generator = None
        if cfg.seed is not None:  # choice i draws from seed + i: choice 0 equals lm.generate(seed=seed)
            self.generator = torch.Generator(device=device).manual_seed(cfg.seed + index)
        self.penalized = bool(request.presence_penalty or request.frequency_penalty)
        self.counts_V = None  # generated-token counts, for the OpenAI penalties
        self.start = 0  # cache column of the first prompt token
        self.pending = None  # sampled token not yet fed to the model

    def scores(self, logits_V: torch.Tensor) -> torch.Tensor:
        """Processed fp32 scores [1, V] for the next token."""
        scores_1V = logits_V.float()[None]
        if self.penalized and self.counts_V is not None:
            # OpenAI: logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty (generated tokens)
            r = self.request
            scores_1V = scores_1V - (self.counts_V * r.frequency_penalty + (self.counts_V > 0) * r.presence_penalty)
        if self.procs:
            ids_1T = torch.tensor([self.ids], device=logits_V.device)
            scores_1V = apply_processors(self.procs, ids_1T, scores_1V)
        return scores_1V


class Scheduler:
    """Owns the model while it serves. submit() from any thread; events come back through Request.sink."""

    def __init__(self, lm, max_batch: int = 16, max_queue: int = 64):
        from ..models.gpt import GPT

        if not isinstance(lm.model, GPT):
            kind = getattr(getattr(lm.config, "model", None), "kind", type(lm.model).__name__)
            raise ChoicelmError(f"serve needs a decoder-only transformer (GPT, dense or MoE) checkpoint; this one is "
                                f"a {kind} model, whose state cannot share a batched KV cache. Use `choicelm generate` "
                                "or `choicelm chat` for it")
        if lm.model.classifier is not None:
            raise ChoicelmError("this GPT is a classifier (it has a classification head), not a text generator; "
                                "classify with lm.classify(...) or `choicelm evaluate --data FILE`")
        if max_batch < 1 or max_queue < 1:
            raise ChoicelmError(f"max_batch={max_batch} and max_queue={max_queue} must both be >= 1")
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        self.block_size = self.model.config.block_size
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(self.model.parameters()).device
        self.cache = self.model.new_kv_cache(max_batch, self.block_size)
        self.decode = decode_step(self.model)  # the weights do not change while serving
        self.rows: list[Sequence] = []  # row i of the cache
        self.cur = 0  # the column every row writes next
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.counters = collections.Counter()  # requests, tokens, cancelled sequences, shifts
        self.thread = threading.Thread(target=self._run, name="choicelm-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------- any thread

    def submit(self, request: Request) -> None:
        if request.n > self.max_batch:
            raise ChoicelmError(f"n={request.n} is more than the server's --max-batch {self.max_batch}")
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are already waiting "
                                f"(--max-queue {self.max_queue}); retry later")
            self.waiting.append(request)
            self.counters["requests"] += 1
            self.lock.notify()

    def cancel(self, request: Request) -> None:
        """Drop a request (its client went away): its rows are freed before the next decode step."""
        with self.lock:
            request.cancelled = True
            self.lock.notify()

    def stats(self) -> dict:
        with self.lock:
            return {"running": len(self.rows), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, **dict(self.counters)}

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------------- scheduler thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.lock:
                    self._drop_cancelled()
                    while not self.rows and not self.waiting and not self.stopping:
                        self.lock.wait()
                    if self.stopping:
                        return
                    admit = self._take_admissible()
                try:
                    for request in admit:
                        try:
                            self._admit(request)
                        except ChoicelmError as e:  # nothing of it joined the batch
                            request.sink(("error", str(e)))
                    if self.rows:
                        self._step()
                except Exception as e:  # a bug or OOM: fail the running requests, keep serving
                    traceback.print_exc()
                    for request in {id(s.request): s.request for s in self.rows}.values():
                        request.sink(("error", f"generation failed: {type(e).__name__}: {e}"))
                    self.rows.clear()
                    self.cur = 0

    def _drop_cancelled(self) -> None:
        gone = [i for i, s in enumerate(self.rows) if s.request.cancelled]
        self.counters["cancelled"] += len(gone)
        self._free(gone)
        self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)

    def _take_admissible(self) -> list[Request]:
        """Waiting requests that fit into the free rows now, in arrival order (a big n waits its turn)."""
        taken, free = [], self.max_batch - len(self.rows)
        while self.waiting and self.waiting[0].n <= free:
            request = self.waiting.popleft()
            free -= request.n
            taken.append(request)
        return taken

    def _admit(self, request: Request) -> None:
        P = len(request.prompt)
        if not self.rows:
            self.cur = P
        elif self.cur < P:  # the prompt needs P columns left of cur: move every row right
            self._shift(P - self.cur)
        # prefill alone, exactly as lm.generate does, then copy the keys/values into the new rows
        prompt_1P = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        tmp = self.model.new_kv_cache(1, P)
        logits_V = self.model(prompt_1P, kv_cache=tmp, logits_to_keep=1).logits[0, -1]
        first = len(self.rows)
        rows = slice(first, first + request.n)
        self.cache.k[:, rows, :, self.cur - P:self.cur] = tmp.k[:, :1]
        self.cache.v[:, rows, :, self.cur - P:self.cur] = tmp.v[:, :1]
        seqs = [Sequence(request, request.index_base + i, self.tokenizer, self.device) for i in range(request.n)]
        for seq in seqs:
            seq.start = self.cur - P
            self.rows.append(seq)
        finished = []
        for i, seq in enumerate(seqs):
            tok = self._sample(seq, logits_V)
            self._logprob(seq, logits_V, tok)
            if self._accept(seq, tok):
                finished.append(first + i)
        self._free(finished)

    def _step(self) -> None:
        """Feed every row its pending token at column cur; sample each row's next token."""
        if self.cur == self.block_size:
            self._shift(-min(s.start for s in self.rows))
        B, cur = len(self.rows), self.cur
        tok_B = torch.tensor([s.pending for s in self.rows], dtype=torch.long, device=self.device)
        start_B = torch.tensor([s.start for s in self.rows], device=self.device)
        mask_BS = torch.arange(cur + 1, device=self.device)[None, :] >= start_B[:, None]
        logits_BV = self.decode(tok_B, self.cache.rows(B), cur, mask_BS, cur - start_B)  # the running rows
        self.cur += 1
        plain = [b for b, s in enumerate(self.rows) if s.greedy and not s.procs and not s.penalized]
        tokens = [0] * B
        if plain:  # greedy rows without history processors: one argmax for all of them
            for b, tok in zip(plain, logits_BV[plain].float().argmax(dim=-1).tolist()):
                tokens[b] = tok
        plain_set = set(plain)
        for b, seq in enumerate(self.rows):
            if b not in plain_set:
                tokens[b] = self._sample(seq, logits_BV[b])
        for b, seq in enumerate(self.rows):
            self._logprob(seq, logits_BV[b], tokens[b])
        finished = [b for b, seq in enumerate(self.rows) if self._accept(seq, tokens[b])]
        self._free(finished)

    def _sample(self, seq: Sequence, logits_V: torch.Tensor) -> int:
        scores_1V = seq.scores(logits_V)
        if seq.greedy:
            return int(scores_1V.argmax(dim=-1))
        return int(torch.multinomial(scores_1V.softmax(dim=-1), 1, generator=seq.generator))

    def _logprob(self, seq: Sequence, logits_V: torch.Tensor, tok: int) -> None:
        k = seq.request.logprobs
        if k is None or tok in seq.eos:  # EOS is not part of the output
            return
        logp_V = torch.log_softmax(logits_V.float(), dim=-1)
        top = []
        if k > 0:
            values, ids = torch.topk(logp_V, k)
            top = list(zip(ids.tolist(), values.tolist()))
        seq.request.sink(("logprob", seq.index, tok, float(logp_V[tok]), top))

    def _accept(self, seq: Sequence, tok: int) -> bool:
        """Record a sampled token and send its text; True when the sequence has finished."""
        reason = None
        if tok in seq.eos:
            reason = "stop"
        else:
            seq.ids.append(tok)
            seq.generated += 1
            self.counters["tokens"] += 1
            if seq.penalized:
                if seq.counts_V is None:
                    seq.counts_V = torch.zeros(self.model.config.vocab_size, device=self.device)
                seq.counts_V[tok] += 1
            delta = seq.text.push(tok)
            if delta:
                seq.request.sink(("delta", seq.index, delta))
            if seq.text.stopped:
                reason = "stop"
            elif seq.generated >= seq.max_new_tokens:
                reason = "length"
        if reason is None:
            seq.pending = tok
            return False
        tail = seq.text.finish()
        if tail:
            seq.request.sink(("delta", seq.index, tail))
        seq.request.sink(("finish", seq.index, reason, seq.generated))
        return True

    def _free(self, rows: list[int]) -> None:
        """Remove these rows; the last rows move into the holes so the running rows stay packed."""
        for b in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if b != last:
                self.cache.k[:, b] = self.cache.k[:, last]
                self.cache.v[:, b] = self.cache.v[:, last]
                self.rows[b] = self.rows[last]
            self.rows.pop()

    def _shift(self, d: int) -> None:
        """Move every running row's columns by d (left when d < 0), keeping cur the shared write column."""
        B, cur = len(self.rows), self.cur
        lo = min(s.start for s in self.rows)
        for t in (self.cache.k, self.cache.v):
            t[:, :B, :, lo + d:cur + d] = t[:, :B, :, lo:cur].clone()
        for s in self.rows:
            s.start += d
        self.cur += d
        self.counters["shifts"] += 1


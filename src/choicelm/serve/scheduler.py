"""Continuous batching: one background thread runs the decoding engine (generation/engine.py) over every running
sequence, one token per step, while requests join and leave.

    the engine has --max-batch fixed rows of one static KV cache of block_size columns; each running sequence owns
    one row, and the rows stay packed, so a step runs the model on exactly the running rows;
    a new request is prefilled alone (exactly as lm.generate prefills one prompt) and its n choices get n rows
    (left padding, shared write column and shifts: see engine.py), joining the batch at once;
    each request has its own options (GenerationConfig: processors, presence/frequency penalties), each choice
    its own RNG (choice i draws with seed + i: choice 0 equals lm.generate(seed=seed)) and stop strings, and
    stops on its own; rows of any requests with the same logit rules are processed together;
    a cancelled request (client gone) leaves at the next step boundary, freeing its rows at once;
    a failure in one sequence (its sampling, its text, its client's sink) ends that request alone, with an
    error; the other requests' sequences go on.

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
from ..generation.config import GenerationConfig
from ..generation.engine import Engine, Sequence
from ..generation.sampling import sampler_for, seeded
from ..generation.step import CausalDecoder
from ..models import registry


class QueueFull(ChoicelmError):
    """More requests are waiting than --max-queue allows."""


@dataclass
class Request:
    """One prompt, continued cfg.num_return_sequences times (the n choices: sequences of their own here, choice
    index_base + i drawing with seed + index_base + i). cfg carries every option, the OpenAI penalties included."""

    prompt: list[int]
    cfg: GenerationConfig
    sink: Callable[[tuple], None]
    index_base: int = 0  # choice index of the first sequence (several prompts in one API call)
    logprobs: int | None = None  # None = no log-probabilities; k = the chosen token's and the top k
    cancelled: bool = False
    failed: bool = False
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def n(self) -> int:
        return self.cfg.num_return_sequences


class Scheduler:
    """Owns the model while it serves. submit() from any thread; events come back through Request.sink."""

    def __init__(self, lm, max_batch: int = 16, max_queue: int = 64):
        spec = registry.find(lm.model)
        if spec is None or not spec.servable:
            kind = spec.kind if spec is not None else type(lm.model).__name__
            raise ChoicelmError(f"serve needs a decoder-only transformer (GPT, dense or MoE) checkpoint; this one is "
                                f"a {kind} model, whose state cannot share a batched KV cache. Use `choicelm generate` "
                                "or `choicelm chat` for it")
        if lm.is_classifier:
            raise ChoicelmError("this GPT is a classifier (it has a classification head), not a text generator; "
                                "classify with lm.classify(...) or `choicelm evaluate --data FILE`")
        if max_batch < 1 or max_queue < 1:
            raise ChoicelmError(f"max_batch={max_batch} and max_queue={max_queue} must both be >= 1")
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.engine = Engine(CausalDecoder(self.model), columns=self.model.config.block_size, slots=max_batch)
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.counters = collections.Counter()  # requests, tokens, cancelled sequences
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
            shifts = {"shifts": self.engine.shifts} if self.engine.shifts else {}
            return {"running": len(self.engine.seqs), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, **dict(self.counters), **shifts}

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------------- scheduler thread

    def _run(self) -> None:
        engine = self.engine
        with torch.inference_mode():
            while True:
                with self.lock:
                    self._drop_cancelled()
                    while not engine.seqs and not self.waiting and not self.stopping:
                        self.lock.wait()
                    if self.stopping:
                        return
                    admit = self._take_admissible()
                try:
                    for request in admit:
                        try:
                            advanced = engine.admit([self._sequences(request)])
                        except ChoicelmError as e:  # nothing of it joined the batch
                            self._fail(request, e, str(e))
                            continue
                        except Exception as e:  # its prefill failed: the running requests go on
                            traceback.print_exc()
                            self._fail(request, e)
                            continue
                        self._emit(advanced)
                    if engine.seqs:
                        self._emit(engine.step())
                except Exception as e:  # the batch's forward failed (a bug, OOM): fail the running requests
                    traceback.print_exc()
                    for request in {id(s.tag[0]): s.tag[0] for s in engine.seqs}.values():
                        self._fail(request, e)
                    engine.clear()

    def _sequences(self, request: Request) -> list[Sequence]:
        cfg = request.cfg
        sampler = sampler_for(cfg)
        return [Sequence(request.prompt, sampler, max_new_tokens=cfg.max_new_tokens, eos=cfg.eos_token_id,
                         tokenizer=self.tokenizer, stop=cfg.stop, logprobs=request.logprobs,
                         generator=seeded(cfg.seed, request.index_base + i, self.engine.device),
                         tag=(request, request.index_base + i)) for i in range(request.n)]

    def _emit(self, advanced: list[Sequence]) -> None:
        """Send each advanced sequence's events; a sequence that failed (or whose sink fails) fails its request."""
        for seq in advanced:
            request, index = seq.tag
            if request.failed:
                continue
            try:
                if seq.error is not None:
                    raise seq.error
                if seq.finish_reason != "eos":
                    self.counters["tokens"] += 1
                if seq.logprob is not None:
                    request.sink(("logprob", index, *seq.logprob))
                if seq.delta:
                    request.sink(("delta", index, seq.delta))
                if seq.done:
                    request.sink(("finish", index, "length" if seq.finish_reason == "length" else "stop",
                                  len(seq.ids)))
            except Exception as e:
                if not isinstance(e, ChoicelmError):
                    traceback.print_exception(e)
                self._fail(request, e)

    def _fail(self, request: Request, error: BaseException, message: str | None = None) -> None:
        """End a request with an error event; its other sequences leave the batch now."""
        request.failed = True
        self.engine.free([b for b, s in enumerate(self.engine.seqs) if s.tag[0] is request])
        try:
            request.sink(("error", message or f"generation failed: {type(error).__name__}: {error}"))
        except Exception:  # its client is gone or broken: nothing more to tell it
            traceback.print_exc()

    def _drop_cancelled(self) -> None:
        gone = [b for b, s in enumerate(self.engine.seqs) if s.tag[0].cancelled]
        self.counters["cancelled"] += len(gone)
        self.engine.free(gone)
        self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)

    def _take_admissible(self) -> list[Request]:
        """Waiting requests that fit into the free rows now, in arrival order (a big n waits its turn)."""
        taken, free = [], self.max_batch - len(self.engine.seqs)
        while self.waiting and self.waiting[0].n <= free:
            request = self.waiting.popleft()
            free -= request.n
            taken.append(request)
        return taken

"""The decoding engine: sequences in the slots (rows) of one cache, one token per running row per step.

Everything that decodes drives it: generate and stream (generate.py), beam search (beam.py), encoder-decoders
(seq2seq.py) and the server's continuous batching (serve/scheduler.py). What differs per model kind is the
decoder (step.py, seq2seq.py): new_cache, prefill and step.

    rows      row i of the cache holds one running sequence; rows stay packed (a finished row is refilled by the
              last one), so a step runs the model on exactly the running rows
    columns   every row writes its next token at one shared column `cur`; a row's tokens sit in columns
              start..cur-1, everything left of start is padding, masked out, and position ids count from 0 at
              start (Hugging Face's left-padding convention; built in one place, `padding`), so a row's output
              never depends on the other rows
    prefill   a fresh engine prefills all its prompts together, left-padded to the longest; an engine with
              fixed slots (the server's) prefills each new prompt alone into a scratch cache and copies its
              keys/values into free rows ending at `cur`. `copies` > 1 gives a prompt several rows from one
              prefill (n choices, beams)
    step      feed every row its pending token; each row's Sampler (sampling.py) picks its next token, rows
              with the same logit rules in one batch, and its Sequence accepts it (EOS, stop strings,
              max_new_tokens); finished rows leave
    shift     (fixed slots) when `cur` reaches the last column, every row moves left by the smallest start; a
              prompt longer than `cur` moves them right first
    failure   an exception while picking or accepting one row's token ends that sequence alone (Sequence.error);
              the other rows go on. (A failing model forward fails the step: it is every row's.)

The tokens of each row are kept beside the cache (ids_BS, same columns): the processors' history.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .sampling import Sampler, sampler_for, seeded
from .stopping import StopStrings
from .streaming import RowText


class Sequence:
    """One sequence being decoded: its prompt, its sampler and RNG, the tokens it generated (EOS excluded), its
    text (with a tokenizer: UTF-8 safe deltas, cut before the earliest stop string) and why it ended:
    "eos", "stop" (a stop string), "length" (max_new_tokens) or "error" (see .error). After each token, .delta
    holds the text it released and .logprob (when logprobs is set) (token, log-probability, top logprobs) of the
    raw logits. tag is the driver's (a prompt index, a request)."""

    def __init__(self, prompt: list[int], sampler: Sampler | None, *, max_new_tokens: int, eos=(), tokenizer=None,
                 stop=(), generator: torch.Generator | None = None, logprobs: int | None = None, tag=None):
        self.prompt, self.sampler, self.generator = list(prompt), sampler, generator
        self.max_new_tokens, self.eos = max_new_tokens, frozenset(eos or ())
        self.text = RowText(tokenizer, StopStrings(stop)) if tokenizer is not None else None
        self.logprobs, self.tag = logprobs, tag
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.delta = ""
        self.logprob: tuple | None = None
        self.pending: int | None = None  # the accepted token the model has not read yet

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def output(self) -> str:
        return self.text.text if self.text is not None else ""

    def accept(self, tok: int, logits_V: torch.Tensor | None = None) -> None:
        """Take the next token: EOS ends the sequence (not part of it); a stop string or max_new_tokens may too."""
        self.delta, self.logprob = "", None
        if len(self.ids) >= self.max_new_tokens:  # max_new_tokens=0
            return self.finish("length")
        if tok in self.eos:
            return self.finish("eos")
        if self.logprobs is not None and logits_V is not None:
            logp_V = torch.log_softmax(logits_V.float(), dim=-1)
            top = []
            if self.logprobs > 0:
                values, ids = torch.topk(logp_V, self.logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
            self.logprob = (tok, float(logp_V[tok]), top)
        self.ids.append(tok)
        if self.text is not None:
            self.delta = self.text.push(tok)
            if self.text.stopped:
                return self.finish("stop")
        if len(self.ids) >= self.max_new_tokens:
            return self.finish("length")
        self.pending = tok

    def finish(self, reason: str) -> None:
        self.finish_reason, self.pending = reason, None
        if self.text is not None:
            self.delta += self.text.finish()

    def fail(self, error: BaseException) -> None:
        self.finish_reason, self.error, self.pending, self.delta, self.logprob = "error", error, None, "", None


def sequences(prompts: list[list[int]], cfg, tokenizer=None, device=None) -> list[list[Sequence]]:
    """The sequences of a GenerationConfig, one group per prompt: cfg.num_return_sequences when sampling (choice
    i draws with seed + i, so each equals a single sequence with that seed), else one."""
    sampler = sampler_for(cfg)
    n = cfg.num_return_sequences if cfg.sampling else 1
    return [[Sequence(p, sampler, max_new_tokens=cfg.max_new_tokens, eos=cfg.eos_token_id, tokenizer=tokenizer,
                      stop=cfg.stop, generator=seeded(cfg.seed, i, device), tag=j) for i in range(n)]
            for j, p in enumerate(prompts)]


def padding(start_B: list[int], begin: int, end: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For rows whose first real token sits at column start_B[b]: the attention mask [B, end] (True = a real
    token) and the position ids [B, end - begin] of columns begin..end-1, counting from 0 at each row's start.
    (None, None) when no row is padded."""
    if not any(start_B):
        return None, None
    start_B1 = torch.tensor(start_B, device=device)[:, None]
    mask_BS = torch.arange(end, device=device)[None, :] >= start_B1
    pos_BT = (torch.arange(begin, end, device=device)[None, :] - start_B1).clamp(min=0)
    return mask_BS, pos_BT


class Engine:
    """Rows of one cache, decoded together. decoder: step.CausalDecoder, step.NGramDecoder, seq2seq.EncoderDecoder.
    columns: the cache's length. slots: None = a fresh engine (the cache is made for its first prefill, sized to
    it); a number = that many fixed rows, prompts joining while others run (the server's)."""

    def __init__(self, decoder, columns: int, slots: int | None = None):
        self.decoder, self.columns, self.slots = decoder, columns, slots
        self.device = decoder.device
        self.cache = decoder.new_cache(slots, columns) if slots is not None else None
        self.ids_BS = torch.zeros(slots, columns, dtype=torch.long, device=self.device) if slots is not None else None
        self.start: list[int] = []  # per row: the column of its first prompt token
        self.seqs: list[Sequence | None] = []  # per row (None: a beam, driven by beam search)
        self.cur = 0
        self.shifts = 0

    # ------------------------------------------------------------------------- rows and columns

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], copies: int | list[int] = 1) -> torch.Tensor:
        """Give each prompt `copies` new rows (consecutive, after the running ones) and prefill it; the logits
        [new rows, V] of their next token."""
        copies = [copies] * len(prompts) if isinstance(copies, int) else list(copies)
        if self.slots is None:
            return self._prefill_fresh(prompts, copies)
        return torch.cat([self._prefill_joining(p, n) for p, n in zip(prompts, copies)])

    def _prefill_fresh(self, prompts: list[list[int]], copies: list[int]) -> torch.Tensor:
        B, L = len(prompts), max(len(p) for p in prompts)
        ids_BL = torch.zeros(B, L, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            ids_BL[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        self.start, self.cur = [L - len(p) for p in prompts], L
        self.seqs = [None] * B
        self.cache = self.decoder.new_cache(B, self.columns)
        self.ids_BS = torch.zeros(B, max(self.columns, L), dtype=torch.long, device=self.device)
        self.ids_BS[:, :L] = ids_BL
        mask_BS, pos_BL = padding(self.start, 0, L, self.device)
        logits_BV = self.decoder.prefill(self.cache, ids_BL, mask_BS, pos_BL)
        if any(n != 1 for n in copies):
            rows_N = torch.arange(B, device=self.device).repeat_interleave(torch.tensor(copies, device=self.device))
            self.reorder(rows_N)
            logits_BV = logits_BV[rows_N]
        return logits_BV

    def _prefill_joining(self, prompt: list[int], copies: int) -> torch.Tensor:
        P = len(prompt)
        if not self.start:
            self.cur = P
        elif self.cur < P:  # the prompt needs P columns left of cur: move every row right
            self._shift(P - self.cur)
        ids_1P = torch.tensor([prompt], dtype=torch.long, device=self.device)
        scratch = self.decoder.new_cache(1, P)  # alone, exactly as a fresh engine prefills one prompt
        logits_1V = self.decoder.prefill(scratch, ids_1P)
        rows = slice(len(self.start), len(self.start) + copies)
        self.cache.k[:, rows, :, self.cur - P:self.cur] = scratch.k[:, :1]
        self.cache.v[:, rows, :, self.cur - P:self.cur] = scratch.v[:, :1]
        self.ids_BS[rows, self.cur - P:self.cur] = ids_1P
        self.start += [self.cur - P] * copies
        self.seqs += [None] * copies
        return logits_1V.expand(copies, -1)

    @torch.no_grad()
    def forward(self, tok_B: torch.Tensor) -> torch.Tensor:
        """Feed row b the token tok_B[b] at column cur; the logits [rows, V] of each row's next token."""
        if self.slots is not None and self.cur == self.columns:
            self._shift(-min(self.start))
        B, cur = len(self.start), self.cur
        self.ids_BS[:B, cur] = tok_B
        mask_BS, pos_B1 = padding(self.start, cur, cur + 1, self.device)
        cache = self.cache
        if not hasattr(cache, "reorder") and cache.batch_size != B:
            cache = cache.rows(B)  # a KVCache with free rows: run only the running ones
        logits_BV = self.decoder.step(cache, tok_B, cur, mask_BS, None if pos_B1 is None else pos_B1[:, 0])
        self.cur += 1
        return logits_BV

    def reorder(self, rows_N: torch.Tensor) -> None:
        """Row i becomes a copy of row rows_N[i] (beam search: each beam continues its parent; rows may repeat)."""
        if hasattr(self.cache, "reorder"):
            self.cache.reorder(rows_N)
        else:
            self.cache.k = self.cache.k.index_select(1, rows_N)
            self.cache.v = self.cache.v.index_select(1, rows_N)
        self.ids_BS = self.ids_BS.index_select(0, rows_N)
        rows = rows_N.tolist()
        self.start = [self.start[r] for r in rows]
        self.seqs = [self.seqs[r] for r in rows]

    def free(self, rows: list[int]) -> None:
        """Remove these rows; the last rows move into the holes, so the running rows stay packed."""
        if not rows:
            return
        order = list(range(len(self.start)))
        for b in sorted(set(rows), reverse=True):
            order[b] = order[-1]
            order.pop()
        if hasattr(self.cache, "reorder"):  # a small state (recurrent, n-gram) or an encoder-decoder's: rebuilt
            self.cache.reorder(torch.tensor(order, dtype=torch.long, device=self.device))
        for i, src in enumerate(order):
            if src != i:  # src is beyond the new last row: nothing moved there yet
                if not hasattr(self.cache, "reorder"):
                    self.cache.k[:, i] = self.cache.k[:, src]
                    self.cache.v[:, i] = self.cache.v[:, src]
                self.ids_BS[i] = self.ids_BS[src]
        self.start = [self.start[r] for r in order]
        self.seqs = [self.seqs[r] for r in order]

    def clear(self) -> None:
        """Drop every row (the cache stays)."""
        self.start, self.seqs, self.cur = [], [], 0

    def _shift(self, d: int) -> None:
        """Move every running row's columns by d (left when d < 0), keeping cur the shared write column."""
        B, cur, lo = len(self.start), self.cur, min(self.start)
        for t in (self.cache.k, self.cache.v):
            t[:, :B, :, lo + d:cur + d] = t[:, :B, :, lo:cur].clone()
        self.ids_BS[:B, lo + d:cur + d] = self.ids_BS[:B, lo:cur].clone()
        self.start = [s + d for s in self.start]
        self.cur += d
        self.shifts += 1

    # ------------------------------------------------------------------------- sequences

    def admit(self, groups: list[list[Sequence]]) -> list[Sequence]:
        """Give each group (the sequences of one prompt) a row per sequence, prefill the prompts (once each) and
        take every new row's first token. Returns the new sequences (some may be done already)."""
        first = len(self.start)
        try:
            logits_NV = self.prefill([g[0].prompt for g in groups], [len(g) for g in groups])
        except BaseException:  # none of them joins (a shift made for them keeps the rows as they were)
            del self.start[first:], self.seqs[first:]
            raise
        self.seqs[first:] = [s for g in groups for s in g]
        return self._advance(list(range(first, len(self.start))), logits_NV)

    def step(self) -> list[Sequence]:
        """Every running sequence's next token. Returns the sequences it advanced (in row order; the finished
        ones have left their rows)."""
        tok_B = torch.tensor([s.pending for s in self.seqs], dtype=torch.long, device=self.device)
        return self._advance(list(range(len(self.start))), self.forward(tok_B))

    def _advance(self, rows: list[int], logits_NV: torch.Tensor) -> list[Sequence]:
        """Pick and accept a token for each of these rows (logits_NV[i] is row rows[i]'s); free the finished."""
        by_sampler: dict = {}
        for i, r in enumerate(rows):
            by_sampler.setdefault(id(self.seqs[r].sampler), []).append(i)
        groups = by_sampler
        if len(by_sampler) > 1:  # samplers of equal rules (other requests' with the same options) go together
            groups = {}
            for idx in by_sampler.values():
                groups.setdefault(self.seqs[rows[idx[0]]].sampler.key, []).extend(idx)
            groups = {key: sorted(idx) for key, idx in groups.items()}
        toks: list = [None] * len(rows)
        for idx in groups.values():
            try:
                picked = self._pick(rows, idx, logits_NV)
            except Exception:  # find the row(s) at fault: the others go on
                picked = []
                for i in idx:
                    try:
                        picked += self._pick(rows, [i], logits_NV)
                    except Exception as e:
                        self.seqs[rows[i]].fail(e)
                        picked.append(None)
            for i, tok in zip(idx, picked):
                toks[i] = tok
        advanced = [self.seqs[r] for r in rows]
        for i, seq in enumerate(advanced):
            if seq.error is None:
                try:
                    seq.accept(toks[i], logits_NV[i] if seq.logprobs is not None else None)
                except Exception as e:
                    seq.fail(e)
        self.free([r for r in rows if self.seqs[r].done])
        return advanced

    def _pick(self, rows: list[int], idx: list[int], logits_NV: torch.Tensor) -> list[int]:
        """The tokens of rows rows[i] for i in idx (one sampler)."""
        sampler = self.seqs[rows[idx[0]]].sampler
        chosen = [rows[i] for i in idx]
        whole = len(idx) == logits_NV.shape[0]
        logits = logits_NV if whole else logits_NV[torch.tensor(idx, device=logits_NV.device)]
        generators = [self.seqs[r].generator for r in chosen]
        if not sampler.processors:
            return sampler.pick(logits, generators=generators)
        if chosen == list(range(len(chosen))):
            ids_BT = self.ids_BS[:len(chosen), :self.cur]
        else:
            ids_BT = self.ids_BS[torch.tensor(chosen, device=self.device), :self.cur]
        starts = [self.start[r] for r in chosen]
        n_pad_B = torch.tensor(starts, device=self.device) if any(starts) else None
        n_new_B = None
        if sampler.counts_new:
            n_new_B = torch.tensor([len(self.seqs[r].ids) for r in chosen], device=self.device)
        return sampler.pick(logits, ids_BT, n_pad_B, n_new_B, generators)


def decode(decoder, groups: list[list[Sequence]]) -> Iterator[list[Sequence]]:
    """Decode these groups (each: the sequences of one prompt) together in a fresh engine. Yields, after each
    step, the sequences it advanced (their .delta, .ids, .finish_reason); a sequence's failure is raised."""
    prompts = [g[0].prompt for g in groups]
    max_new = max(s.max_new_tokens for g in groups for s in g)
    decoder.check(prompts, max_new)
    engine = Engine(decoder, columns=max(len(p) for p in prompts) + max(max_new, 1) - 1)
    advanced = engine.admit(groups)
    while True:
        for seq in advanced:
            if seq.error is not None:
                raise seq.error
        yield advanced
        if not engine.seqs:
            return
        advanced = engine.step()

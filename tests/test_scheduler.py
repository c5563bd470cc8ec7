"""The server's scheduler without HTTP: it runs the same engine as lm.generate (identical greedy tokens, the same
seeded draws and penalties while requests join and leave the batch), and a failure in one sequence ends its
request alone while the rest of the batch finishes."""

import threading

import pytest
import torch
import yaml

import choicelm
from choicelm.core import checkpoint as ckpt
from choicelm.core.config import Config, ModelConfig
from choicelm.generation.sampling import Sampler
from choicelm.models import GPT
from choicelm.serve import scheduler as scheduler_module
from choicelm.serve.scheduler import Request, Scheduler
from choicelm.text import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. END of line\n"
PROMPTS = ["the ", "over the lazy ", "a", "jumps over", "dog. END of line\nthe quick"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny GPT with peaked (random) next-token distributions and a char tokenizer, saved and loaded as a user
    would (so it decodes through the fast decode step when oneDNN is there)."""
    root = tmp_path_factory.mktemp("sched")
    (root / "a.txt").write_text(TEXT * 20 + "".join(chr(c) for c in range(32, 127)) + "\n")
    tok = Tokenizer.train([root / "a.txt"], None, kind="char")
    tok.save(root / "tok")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32,
                            dropout=0.0)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20)
    cfg = Config.from_dict({"model": dict(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32)})
    ckpt.save_checkpoint(root / "run", 1, model, None, {}, yaml.safe_dump(cfg.to_dict()), root / "tok", None)
    return choicelm.load(root / "run", "cpu")


class Client:
    """One request's events, collected on the scheduler thread."""

    def __init__(self, fail_on_delta: bool = False):
        self.events, self.fail_on_delta = [], fail_on_delta
        self.done = threading.Event()
        self.open = None

    def sink(self, event):
        self.events.append(event)
        if event[0] == "delta" and self.fail_on_delta:
            raise ConnectionError("the client's socket broke")
        if event[0] == "error" or (event[0] == "finish" and sum(e[0] == "finish" for e in self.events) == self.open):
            self.done.set()

    def texts(self, n: int = 1) -> list[str]:
        out = [""] * n
        for e in self.events:
            if e[0] == "delta":
                out[e[1] - self.base] += e[2]
        return out

    @property
    def errors(self) -> list:
        return [e for e in self.events if e[0] == "error"]


def run(scheduler, lm, jobs: list[tuple[str, dict]], clients=None) -> list[Client]:
    """Submit every (prompt, options) at once and wait until each request ended (finished or failed)."""
    clients = clients or [Client() for _ in jobs]
    for (prompt, options), client in zip(jobs, clients):
        cfg = lm.generation_config(**options)
        client.open, client.base = cfg.num_return_sequences, 0
        scheduler.submit(Request(lm.tokenizer.encode(prompt), cfg, client.sink))
    for client in clients:
        assert client.done.wait(60), client.events
    return clients


def test_the_scheduler_gives_lm_generate_tokens(lm):
    """Greedy, penalized and seeded requests of different lengths, decoded together on 3 rows (so they queue,
    join mid-batch and shift), give exactly lm.generate's text; choice i of n draws with seed + i."""
    greedy = [(p, dict(max_new_tokens=20 + 7 * i, temperature=0)) for i, p in enumerate(PROMPTS)]
    penalized = [(p, dict(max_new_tokens=30, temperature=0, presence_penalty=0.5, frequency_penalty=1.0))
                 for p in PROMPTS[:3]]
    sampled = [(p, dict(max_new_tokens=25, temperature=1.2, top_k=8, seed=11 + i)) for i, p in enumerate(PROMPTS[:2])]
    stop = lm.generate("the ", max_new_tokens=60, temperature=0)[10:13]  # a stop string the text holds
    stopped = [("the ", dict(max_new_tokens=60, temperature=0, stop=["qqq", stop]))]
    jobs = greedy + penalized + sampled + stopped
    scheduler = Scheduler(lm, max_batch=3, max_queue=64)
    try:
        clients = run(scheduler, lm, jobs)
        assert [c.texts()[0] for c in clients] == [lm.generate(p, **o) for p, o in jobs]
        assert all(not c.errors for c in clients)
        assert clients[-1].events[-1][:3] == ("finish", 0, "stop")
        # n choices: choice i is lm.generate(seed=seed + i), and lm.generate's own choices are the same draws
        options = dict(max_new_tokens=25, temperature=1.2, top_k=8, seed=4, num_return_sequences=3)
        (client,) = run(scheduler, lm, [("jumps", options)])
        assert client.texts(3) == lm.generate("jumps", **options)
        assert client.texts(3) == [lm.generate("jumps", **{**options, "num_return_sequences": 1, "seed": 4 + i})
                                   for i in range(3)]
    finally:
        scheduler.close()
    assert scheduler.stats()["running"] == 0


class Picky:
    """A logit rule that fails for any batch holding a row whose prompt has the marker token, once that row has
    generated 3 tokens (so it fails mid-batch, on a step that picks every row's token together)."""

    key = ("picky",)

    def __init__(self, marker: int):
        self.marker = marker

    def __call__(self, ids_BT, scores_BV, n_pad_B=None, n_new_B=None):
        T = ids_BT.shape[1]
        for b, row in enumerate(ids_BT.tolist()):
            start = 0 if n_pad_B is None else int(n_pad_B[b])
            if self.marker in row[start:T - int(n_new_B[b])] and int(n_new_B[b]) >= 3:
                raise RuntimeError("this row cannot be decoded")
        return scores_BV


def test_a_failing_sequence_ends_its_request_alone(lm, monkeypatch):
    """issue 18 item 10: a failure in one sequence (its sampling: here a rule that fails on one row of a batch
    processed together; or its client's sink) ends that request with an error; every other request of the batch
    finishes with exactly lm.generate's text."""
    marker = lm.tokenizer.encode("#")[0]
    real = scheduler_module.sampler_for

    def sampler_for(cfg):  # every request gets the same extra rule, so their rows are processed as one batch
        return Sampler(real(cfg).processors + [Picky(marker)], greedy=cfg.greedy)

    monkeypatch.setattr(scheduler_module, "sampler_for", sampler_for)
    good = [(p, dict(max_new_tokens=40, temperature=0)) for p in PROMPTS]
    jobs = good[:2] + [("the #", dict(max_new_tokens=40, temperature=0))] + good[2:4] + [("dog", dict(max_new_tokens=40, temperature=0))] + good[4:]
    clients = [Client(fail_on_delta=(i == 5)) for i in range(len(jobs))]  # request 5's client breaks
    scheduler = Scheduler(lm, max_batch=8, max_queue=64)
    try:
        run(scheduler, lm, jobs, clients)
        for i, ((prompt, options), client) in enumerate(zip(jobs, clients)):
            if i in (2, 5):
                assert len(client.errors) == 1 and client.events[-1] == client.errors[0]
                assert [e[0] for e in client.events[:-1]] == ["delta"] * (3 if i == 2 else 1)
                assert "generation failed" in client.errors[0][1]
                assert ("cannot be decoded" if i == 2 else "socket broke") in client.errors[0][1]
            else:
                assert not client.errors and client.texts()[0] == lm.generate(prompt, **options), i
        assert scheduler.stats()["running"] == 0
        # the scheduler keeps serving
        (client,) = run(scheduler, lm, good[:1])
        assert client.texts()[0] == lm.generate(*good[0][:1], **good[0][1])
    finally:
        scheduler.close()


def test_a_failing_prefill_ends_that_request_alone(lm, monkeypatch):
    """A request whose prefill fails (here: any prompt holding the marker) gets an error; the requests running
    when it tried to join finish exactly as lm.generate."""
    from choicelm.generation.step import CausalDecoder

    marker = lm.tokenizer.encode("#")[0]
    real = CausalDecoder.prefill

    def prefill(self, cache, ids_BT, mask_BS=None, pos_BT=None):
        if marker in ids_BT.tolist()[0]:
            raise MemoryError("no room for this prompt")
        return real(self, cache, ids_BT, mask_BS, pos_BT)

    monkeypatch.setattr(CausalDecoder, "prefill", prefill)
    jobs = [(p, dict(max_new_tokens=50, temperature=0)) for p in PROMPTS[:3]]
    scheduler = Scheduler(lm, max_batch=4, max_queue=64)
    try:
        clients = [Client() for _ in jobs]
        for (prompt, options), client in zip(jobs, clients):
            client.open, client.base = 1, 0
            scheduler.submit(Request(lm.tokenizer.encode(prompt), lm.generation_config(**options), client.sink))
        # a long prompt with the marker: joining shifts the running rows right first, then its prefill fails
        (bad,) = run(scheduler, lm, [("#" * 60, dict(max_new_tokens=5, temperature=0))])
        for client in clients:
            assert client.done.wait(60)
        assert [e[0] for e in bad.events] == ["error"] and "MemoryError" in bad.events[0][1]
        assert [c.texts()[0] for c in clients] == [lm.generate(p, **o) for p, o in jobs]
    finally:
        scheduler.close()

"""Load test of `choicelm serve`: serial requests vs 8 and 32 concurrent streaming clients, against the real server
(a `python -m choicelm serve` subprocess on 127.0.0.1) over HTTP with server-sent events.

    taskset -c 1 .venv/bin/python benchmarks/serve_load.py [--layers 6 --width 384 --max-tokens 128 --repeats 3]
    .venv/bin/python benchmarks/serve_load.py --scheduler-only     # the same serial requests without HTTP

The model is a randomly initialised GPT (the weights do not change the cost) with a byte-level BPE tokenizer trained
on a slice of Shakespeare; its EOS row is zeroed and decoding is greedy, so every request generates exactly
--max-tokens tokens and all scenarios do the same work. Per scenario it prints, as the median over --repeats runs:
aggregate tokens/s (all tokens / wall time), p50/p95 time to first token, p50/p95 per-token latency (the gaps
between a request's tokens after the first), and failures (HTTP errors, error events, streams without [DONE]).
Serial = one client sending the same requests one after another (the server then decodes a batch of one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["To be, or not to be", "Once more unto the breach", "Friends, Romans, countrymen",
           "Now is the winter of our discontent", "All the world's a stage", "O Romeo, Romeo",
           "Shall I compare thee", "The quality of mercy"]


def make_checkpoint(root: Path, layers: int, width: int, heads: int, block: int) -> Path:
    from choicelm.core.config import Config
    from choicelm.data.corpora import shakespeare_files
    from choicelm.models import build_model
    from choicelm.text import Tokenizer
    from choicelm.core import checkpoint as ckpt

    files = [p for p in shakespeare_files() if p.name in ("macbeth_gut.txt", "sonnets_gut.txt")]
    tok = Tokenizer.train(files, 1024)
    tok.save(root / "tok")
    cfg = Config.from_dict({"model": dict(vocab_size=tok.vocab_size, block_size=block, n_layer=layers,
                                          n_head=heads, n_embd=width, dropout=0.0)})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.lm_head.weight[tok.eot_id] = 0.0  # EOS logit 0: greedy never picks it, every request runs to max_tokens
    return ckpt.save_checkpoint(root / "run", 1, model, None, {}, yaml.safe_dump(cfg.to_dict()), root / "tok", None)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_request(http, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "run", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens, done = [], 0, False
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
    except Exception as e:  # a failure to count, not to stop the benchmark
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if not done or not times:
        return {"ok": False, "error": "stream ended without [DONE]"}
    gaps = [(times[-1] - times[0]) / (tokens - 1)] if tokens > 1 else []
    return {"ok": True, "tokens": tokens, "ttft": times[0] - t0, "per_token": gaps}


async def scenario(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    import httpx2 as httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client(c: int) -> list[dict]:
            out = []
            for i in range(requests_per_client):
                out.append(await one_request(http, url, PROMPTS[(c + i) % len(PROMPTS)], max_tokens))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    return {"tokens_per_s": sum(r["tokens"] for r in ok) / wall, "wall_s": wall,
            "ttft": [r["ttft"] for r in ok], "per_token": [g for r in ok for g in r["per_token"]],
            "failures": len(results) - len(ok), "errors": sorted({r["error"] for r in results if not r["ok"]}),
            "requests": len(results)}


def scheduler_only(args) -> None:
    """8 requests of --max-tokens greedy tokens, one after another, through the scheduler (no HTTP)."""
    import threading

    import choicelm
    from choicelm.generation.config import GenerationConfig
    from choicelm.serve.scheduler import Request, Scheduler

    with tempfile.TemporaryDirectory() as tmp:
        lm = choicelm.load(make_checkpoint(Path(tmp), args.layers, args.width, args.heads, args.block))
    scheduler = Scheduler(lm, max_batch=args.max_batch)
    prompt = lm.tokenizer.encode(PROMPTS[0])

    def one_request() -> None:
        done = threading.Event()
        cfg = GenerationConfig(max_new_tokens=args.max_tokens, temperature=0.0)
        scheduler.submit(Request(prompt, cfg, lambda event: event[0] in ("finish", "error") and done.set()))
        done.wait()

    for _ in range(3):  # warm-up
        one_request()
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(8):
            one_request()
        rates.append(8 * args.max_tokens / (time.perf_counter() - t0))
    scheduler.close()
    print(f"scheduler only, serial: {statistics.median(rates):.1f} tokens/s (median of {args.repeats} x 8 requests of "
          f"{args.max_tokens} tokens; torch threads {torch.get_num_threads()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--scheduler-only", action="store_true",
                    help="no server: serial requests straight to the continuous-batching scheduler, in this process "
                         "(tells the engine and scheduler apart from the HTTP layer)")
    args = ap.parse_args()
    if args.scheduler_only:
        return scheduler_only(args)

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import free_port

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp), args.layers, args.width, args.heads, args.block)
        server = subprocess.Popen([sys.executable, "-m", "choicelm", "serve", "--checkpoint", str(ckpt), "--port",
                                   str(port), "--max-batch", str(args.max_batch), "--max-queue", "256",
                                   "--device", "cpu"])
        try:
            import httpx2 as httpx

            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            print(f"model: GPT {args.layers}x{args.width}, {args.heads} heads, block {args.block}, BPE vocab 1024; "
                  f"{args.max_tokens} new tokens a request; server --max-batch {args.max_batch}; "
                  f"torch threads {torch.get_num_threads()}; median of {args.repeats} runs")
            asyncio.run(scenario(url, 2, 1, 8))  # warm-up
            plans = [("serial", 1, 8), ("8 clients", 8, 2), ("32 clients", 32, 1)]
            rows = {}
            for name, clients, per_client in plans:
                runs = [asyncio.run(scenario(url, clients, per_client, args.max_tokens)) for _ in range(args.repeats)]
                rows[name] = runs
            base = statistics.median(r["tokens_per_s"] for r in rows["serial"])
            print(f"{'scenario':<12} {'requests':>8} {'tokens/s':>9} {'x serial':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
                  f"{'tok lat p50':>11} {'tok lat p95':>11} {'failures':>8}")
            for name, runs in rows.items():
                tps = statistics.median(r["tokens_per_s"] for r in runs)
                med = lambda key, q: statistics.median(percentile(r[key], q) for r in runs) * 1000  # noqa: E731
                fails = sum(r["failures"] for r in runs)
                print(f"{name:<12} {runs[0]['requests']:>8} {tps:>9.1f} {tps / base:>7.2f}x {med('ttft', .5):>7.1f}ms "
                      f"{med('ttft', .95):>7.1f}ms {med('per_token', .5):>9.2f}ms {med('per_token', .95):>9.2f}ms "
                      f"{fails:>8}")
                for r in runs:
                    for e in r["errors"]:
                        print(f"    error: {e}")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()

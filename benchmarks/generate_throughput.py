"""Decode throughput: choicelm's generation loop against Hugging Face `generate`, same GPT-2 124M weights.

    taskset -c 1 python benchmarks/generate_throughput.py --threads 1
    taskset -c 1 python benchmarks/generate_throughput.py --threads 1 --dtypes bf16 --batches 1 --rounds 5

HF GPT2LMHeadModel is built with random init in-process and its weights are copied into a choicelm GPT
(Conv1D weights transposed), so both decode the same model. For each (dtype, batch): prompt of 64 random
tokens, greedy, 128 new tokens, no EOS. Decode tokens/s = batch x 127 / (time(128 new) - time(1 new)),
i.e. the prefill is taken out the same way for both. The two libraries are timed round by round in the same
process (interleaved), figures are medians of the rounds.

Bandwidth bound: at batch 1 every decoded token reads every weight matrix once (wte serves as the output
projection; wpe is one row), so tokens/s <= copy bandwidth / weight bytes. Copy bandwidth is measured
here as STREAM does (bytes read + bytes written, per second, copying a 512 MB buffer): once before
each round of batch-1 timings, so it sees the same machine conditions, and the median is used.

Time to first token: a 512-token prompt, one new token (prefill + one sample), median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from choicelm.core.config import ModelConfig
from choicelm.generation import GenerationConfig, generate_ids
from choicelm.models.weight_layout import prepare_for_decoding
from choicelm.models import GPT
from choicelm.core.runtime import keep_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_pair(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_head=12, n_embd=768, vocab_size=50257,
                                    n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    model = GPT(ModelConfig(vocab_size=50257, block_size=1024, n_layer=args.layers, n_head=12, n_embd=768,
                            dropout=0.0)).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {k: (v.t().contiguous() if k.endswith(conv1d) else v) for k, v in hf.state_dict().items()
             if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    model.load_state_dict(state)
    return hf, model


class CopyBandwidth:
    """STREAM-style copy bandwidth (bytes read + written per second) of a 512 MB buffer; measure() adds one
    sample (the median of 3 copies), median() is over every sample so far."""

    def __init__(self):
        self.src = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # fault the pages in
        self.samples: list[float] = []

    def measure(self) -> None:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            self.dst.copy_(self.src)
            times.append(time.perf_counter() - t0)
        self.samples.append(2 * self.src.nbytes / statistics.median(times))

    def median(self) -> float:
        return statistics.median(self.samples)


def weight_bytes(model: GPT) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "wpe" not in name)


def run_choicelm(model, ids, new_tokens):
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0)
    t0 = time.perf_counter()
    out = generate_ids(model, ids.tolist(), cfg)
    dt = time.perf_counter() - t0
    assert all(len(c.ids) == new_tokens for c in out)
    return dt, [c.ids for c in out]


def run_hf(hf, ids, new_tokens):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return dt, out[:, ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ttft-prompt", type=int, default=512)
    ap.add_argument("--plain-layout", action="store_true", help="keep nn.Linear's [out, in] weights (for comparison)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # one process, so choicelm and HF run under the same allocator setting
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    bw = CopyBandwidth()
    hf32, cl32 = build_pair(args)
    g = torch.Generator().manual_seed(1)

    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        hf, cl = hf32.to(dtype), cl32.to(dtype)  # the same weights, rounded
        if not args.plain_layout:
            prepare_for_decoding(cl)  # what choicelm.load does
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = torch.randint(0, 50257, (batch, args.prompt), generator=g)
            run_choicelm(cl, ids, 2), run_hf(hf, ids, 2)  # warm-up
            rates = {"choicelm": [], "hf": []}
            same = True
            for _ in range(args.rounds):
                if batch == 1:
                    bw.measure()
                for name, fn, m in (("choicelm", run_choicelm, cl), ("hf", run_hf, hf)):
                    t_full, toks = fn(m, ids, args.new_tokens)
                    t_one, _ = fn(m, ids, 1)
                    rates[name].append(batch * (args.new_tokens - 1) / (t_full - t_one))
                    if name == "choicelm":
                        ours = toks
                    else:
                        same &= toks == ours
            c, h = statistics.median(rates["choicelm"]), statistics.median(rates["hf"])
            line = (f"{dname} batch {batch}: choicelm {c:7.1f} tok/s   HF {h:7.1f} tok/s   ratio {c / h:4.2f}x"
                    f"   same tokens: {same}")
            if batch == 1:
                bound = bw.median() / weight_bytes(cl)
                line += (f"   bandwidth bound {bound:6.1f} tok/s ({bw.median() / 1e9:.1f} GB/s copy): "
                         f"choicelm {c / bound:4.0%}, HF {h / bound:4.0%}")
            print(line, flush=True)
        # time to first token, long prompt
        ids = torch.randint(0, 50257, (1, args.ttft_prompt), generator=g)
        ttft = {"choicelm": [], "hf": []}
        for _ in range(args.rounds):
            ttft["choicelm"].append(run_choicelm(cl, ids, 1)[0])
            ttft["hf"].append(run_hf(hf, ids, 1)[0])
        c, h = statistics.median(ttft["choicelm"]), statistics.median(ttft["hf"])
        print(f"{dname} time to first token, {args.ttft_prompt}-token prompt: choicelm {c * 1e3:6.1f} ms   "
              f"HF {h * 1e3:6.1f} ms   ratio {h / c:4.2f}x faster", flush=True)


if __name__ == "__main__":
    main()

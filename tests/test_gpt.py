"""GPT model: logits against Hugging Face GPT-2 and Llama, KV cache, loss, init, precision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from choicelm.core.config import ModelConfig
from choicelm.core.errors import ChoicelmError
from choicelm.models import GPT, ModelOutput, build_model
from choicelm.models.layers import linear_cross_entropy

transformers = pytest.importorskip("transformers")

GPT2_LAYOUT = dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True)
LLAMA_LAYOUT = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=2, mlp_hidden=128,
                    tie_embeddings=False, norm_eps=1e-5, rope_theta=10000.0)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def shifted_targets(idx_BT: torch.Tensor) -> torch.Tensor:
    """Next-token targets with the last position ignored: what HF computes from labels=idx."""
    targets = torch.full_like(idx_BT, -100)
    targets[:, :-1] = idx_BT[:, 1:]
    return targets


# ----------------------------------------------------------------------------- Hugging Face parity


def gpt2_to_choicelm(hf_state: dict) -> dict:
    """HF GPT-2 state dict -> choicelm: same names; Conv1D weights [in, out] transposed to [out, in]."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    out = {}
    for name, t in hf_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[name] = t.t().contiguous() if name.endswith(conv1d) else t
    return out


def llama_to_choicelm(hf_state: dict, n_layer: int) -> dict:
    out = {"transformer.wte.weight": hf_state["model.embed_tokens.weight"],
           "transformer.ln_f.weight": hf_state["model.norm.weight"]}
    if "lm_head.weight" in hf_state:
        out["lm_head.weight"] = hf_state["lm_head.weight"]
    for i in range(n_layer):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        out[q + "ln_1.weight"] = hf_state[p + "input_layernorm.weight"]
        out[q + "ln_2.weight"] = hf_state[p + "post_attention_layernorm.weight"]
        out[q + "attn.c_attn.weight"] = torch.cat([hf_state[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[q + "attn.c_proj.weight"] = hf_state[p + "self_attn.o_proj.weight"]
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[q + f"mlp.{n}.weight"] = hf_state[p + f"mlp.{n}.weight"]
    return out


def test_gpt2_logits_and_loss_match_hugging_face():
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so their names and shapes are tested too
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model = GPT(tiny(**GPT2_LAYOUT)).eval()
    missing, unexpected = model.load_state_dict(gpt2_to_choicelm(hf.state_dict()), strict=True)
    assert not missing and not unexpected
    idx = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        out = model(idx, shifted_targets(idx))
    assert isinstance(out, ModelOutput) and out.aux_loss is None and out.stats == {}
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_logits_match_hugging_face(tied):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tied, attention_bias=False, mlp_bias=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = GPT(tiny(block_size=64, **{**LLAMA_LAYOUT, "tie_embeddings": tied})).eval()
    state = llama_to_choicelm(hf.state_dict(), 2)
    if tied:
        state.pop("lm_head.weight", None)
        assert model.lm_head.weight is model.transformer.wte.weight
    model.load_state_dict(state, strict=not tied)
    idx = torch.randint(0, 100, (2, 48))
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        out = model(idx, shifted_targets(idx))
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("layout", ["gpt2", "llama", "llama_qk_norm"])
def test_kv_cache_prefill_then_decode_equals_full_forward(layout):
    torch.manual_seed(1)
    kw = {"gpt2": GPT2_LAYOUT, "llama": LLAMA_LAYOUT, "llama_qk_norm": {**LLAMA_LAYOUT, "qk_norm": True}}[layout]
    model = GPT(tiny(**kw)).eval()
    with torch.no_grad():  # non-trivial query/key norm gains
        for name, p in model.named_parameters():
            if "_norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    idx = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_kv_cache(batch_size=3, max_len=24)
        steps = [model(idx[:, :8], kv_cache=cache, start_pos=0).logits]            # prefill
        steps.append(model(idx[:, 8:12], kv_cache=cache, start_pos=8).logits)      # a chunk after a prefix
        for t in range(12, 20):                                                    # one token at a time
            steps.append(model(idx[:, t:t + 1], kv_cache=cache, start_pos=t).logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
        # rewinding: recomputing from an earlier position overwrites the cache and gives the same answer
        again = model(idx[:, 10:20], kv_cache=cache, start_pos=10).logits
        torch.testing.assert_close(again, full[:, 10:20], atol=1e-5, rtol=0)
        # without a cache, start_pos only shifts the positions: the first token sees itself alone
        shifted = model(idx[:, 5:9], start_pos=5).logits
        torch.testing.assert_close(shifted[:, 0], model(idx[:, 5:6], start_pos=5).logits[:, 0], atol=1e-5, rtol=0)


def test_kv_cache_and_block_size_errors():
    model = GPT(tiny(block_size=16)).eval()
    with pytest.raises(ChoicelmError, match=r"sequence length 17 .*block size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_kv_cache(1, 16)
    with pytest.raises(ChoicelmError, match=r"sequence length 18 .*block size 16"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache, start_pos=15)
    with pytest.raises(ChoicelmError, match="2 sequences|holds 1"):
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    small = model.new_kv_cache(1, 4)
    with pytest.raises(ChoicelmError, match="cache length 4"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=small)
    with pytest.raises(ChoicelmError, match="block size 16"):
        model.new_kv_cache(1, 17)


# ----------------------------------------------------------------------------- loss


def test_loss_matches_hand_computed_cross_entropy():
    torch.manual_seed(2)
    model = GPT(tiny(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 11, (2, 5))
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = targets[1, 4] = targets[1, 0] = -100
    with torch.no_grad():
        logits = model(idx).logits
        logp = logits.double() - logits.double().exp().sum(-1, keepdim=True).log()
        nll = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(5) if targets[b, t] != -100]
        total = torch.stack(nll).sum()
        out_sum = model(idx, targets, loss_reduction="sum")
        out_mean = model(idx, targets)
    assert len(nll) == 7
    assert out_mean.loss.dtype == torch.float32 and out_mean.loss.ndim == 0
    torch.testing.assert_close(out_sum.loss.double(), total, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_mean.loss.double(), total / 7, atol=1e-6, rtol=0)
    with pytest.raises(ChoicelmError, match="loss_reduction"):
        model(idx, targets, loss_reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_chunked_loss_equals_plain_loss_and_gradients(reduction, layout):
    torch.manual_seed(3)
    model = GPT(tiny(**(GPT2_LAYOUT if layout == "gpt2" else LLAMA_LAYOUT)))
    idx = torch.randint(0, 100, (3, 17))
    targets = torch.randint(0, 100, (3, 17))
    targets[:, :4] = -100

    def run(return_logits):
        model.zero_grad()
        out = model(idx, targets, loss_reduction=reduction, return_logits=return_logits)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, plain_grads = run(True)
    chunked, chunked_grads = run(False)
    assert chunked.logits is None and plain.logits is not None
    # "sum" scales the loss and every gradient by the number of valid targets (39): scale the tolerance alike
    scale = 1 if reduction == "mean" else int((targets != -100).sum())
    torch.testing.assert_close(chunked.loss, plain.loss, atol=1e-6 * scale, rtol=0)
    for name, g in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, atol=1e-6 * scale, rtol=0, msg=name)


def test_linear_cross_entropy_small_chunks_and_no_grad():
    torch.manual_seed(4)
    h = torch.randn(37, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    t = torch.randint(0, 13, (37,))
    t[::5] = -100
    ref = F.cross_entropy(h @ w.T, t, ignore_index=-100)
    gh, gw = torch.autograd.grad(ref * 3, (h, w))
    loss = linear_cross_entropy(h, w, t, group_rows=8, slice_rows=3)
    ch, cw = torch.autograd.grad(loss * 3, (h, w))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ch, gh, atol=1e-6, rtol=0)
    torch.testing.assert_close(cw, gw, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, "sum", group_rows=7, slice_rows=7),
                                   F.cross_entropy(h @ w.T, t, reduction="sum"), atol=1e-5, rtol=1e-6)
    # the saved gradients are scaled in place, so a second backward through the same graph must refuse
    loss = linear_cross_entropy(h, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(ChoicelmError, match="only once"):
        loss.backward()


def test_linear_cross_entropy_when_target_probability_underflows():
    # logits spread over hundreds of nats: p[target] underflows fp32, the loss must still be exact
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    w = torch.tensor([[200.0, 0.0], [0.0, 0.0], [-50.0, 300.0]], requires_grad=True)
    t = torch.tensor([1, 0, 0])
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    gh, gw = torch.autograd.grad(ref, (h, w))
    loss = linear_cross_entropy(h, w, t, "sum")
    ch, cw = torch.autograd.grad(loss, (h, w))
    assert torch.isfinite(loss) and ref.item() > 400
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close((ch, cw), (gh, gw))


# ----------------------------------------------------------------------------- init, params, training


def test_init_statistics_and_determinism():
    config = tiny(n_layer=4, n_embd=128, vocab_size=512, block_size=64)
    torch.manual_seed(5)
    a = build_model(config)
    torch.manual_seed(5)
    b = build_model(config)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    sd = a.state_dict()
    layers = range(4)
    resid = torch.cat([sd[f"transformer.h.{i}.{n}.c_proj.weight"].flatten() for i in layers for n in ("attn", "mlp")])
    assert resid.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    names = ("attn.c_attn", "mlp.c_fc")
    normal = torch.cat([sd[f"transformer.h.{i}.{n}.weight"].flatten() for i in layers for n in names])
    assert normal.std().item() == pytest.approx(0.02, rel=0.05)
    assert sd["transformer.wte.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert all(sd[n].abs().max() == 0 for n in sd if n.endswith(".bias") and "ln" not in n)
    assert torch.all(sd["transformer.ln_f.weight"] == 1)
    llama = GPT(tiny(n_layer=4, **LLAMA_LAYOUT))
    down = torch.cat([llama.transformer.h[i].mlp.down_proj.weight.flatten() for i in range(4)])
    assert down.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)


def test_param_counts_and_flops():
    m = GPT(tiny(**GPT2_LAYOUT))
    D, V, L, P = 64, 100, 2, 32
    per_layer = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)
    assert m.num_params(exclude_embeddings=False) == V * D + P * D + L * per_layer + 2 * D
    assert m.num_params() == V * D + L * per_layer + 2 * D  # wpe dropped; tied wte is the output projection
    assert m.flops_per_token(32) == 6 * m.num_params() + 12 * L * 4 * 16 * 32
    untied = GPT(tiny(**LLAMA_LAYOUT))
    assert untied.num_params(exclude_embeddings=False) - untied.num_params() == V * D  # wte only
    m.crop_block_size(16)
    assert m.transformer.wpe.weight.shape == (16, D) and m.config.block_size == 16
    with pytest.raises(ChoicelmError):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_build_model_rejects_unknown_kind():
    config = tiny()
    object.__setattr__(config, "kind", "nope")
    with pytest.raises(ChoicelmError, match="nope"):
        build_model(config)


def test_overfits_one_batch():
    torch.manual_seed(6)
    model = GPT(tiny(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 32, (4, 16))
    targets = torch.randint(0, 32, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        loss = model(idx, targets, return_logits=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_bf16_autocast_forward_backward(layout):
    torch.manual_seed(7)
    model = GPT(tiny(**(GPT2_LAYOUT if layout == "gpt2" else LLAMA_LAYOUT)))
    idx = torch.randint(0, 100, (2, 16))
    targets = shifted_targets(idx)
    with torch.no_grad():
        ref = model(idx, targets).loss
    for return_logits in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(idx, targets, return_logits=return_logits)
        assert out.loss.dtype == torch.float32
        assert abs(out.loss.item() - ref.item()) < 0.05
        out.loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
                   for p in model.parameters())
    # decode under autocast; on CPU the cache is fp32 (attention over it runs in fp32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_kv_cache(2, 16)
        assert cache.dtype == torch.float32
        model(idx[:, :8], kv_cache=cache)
        step = model(idx[:, 8:9], kv_cache=cache, start_pos=8).logits
        full = model(idx[:, :9]).logits
    assert (step[:, 0].float() - full[:, 8].float()).abs().max() < 0.1


def test_key_padding_mask_in_attention():
    from choicelm.models.layers import SelfAttention
    torch.manual_seed(8)
    attn = SelfAttention(tiny(), causal=False).eval()
    x = torch.randn(2, 6, 64)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False
    with torch.no_grad():
        y = attn(x, key_padding_mask=keep)
        # row 1 attends only to its first 4 positions: same as running on those 4 alone (bidirectional)
        torch.testing.assert_close(y[1, :4], attn(x[1:, :4])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(y[0], attn(x[:1])[0], atol=1e-5, rtol=0)
        causal = SelfAttention(tiny(), causal=True).eval()
        causal.load_state_dict(attn.state_dict())
        torch.testing.assert_close(causal(x, key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), causal(x),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["causal", "causal_with_cache", "padding_mask", "gqa"])
def test_plain_attention_equals_sdpa(case):
    from choicelm.models.layers import plain_attention
    torch.manual_seed(7)
    B, H, T, S, Q = 2, 4, 5, 5, 8
    K = 2 if case == "gqa" else H
    if case == "causal_with_cache":
        S = 9
    q = torch.randn(B, H, T, Q)
    k, v = torch.randn(B, K, S, Q), torch.randn(B, K, S, Q)
    mask, is_causal = None, case in ("causal", "gqa")
    if case == "causal_with_cache":
        mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    if case == "padding_mask":
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[0, ..., :2] = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=K != H)
    torch.testing.assert_close(plain_attention(q, k, v, mask, is_causal, 0.0), ref, atol=1e-6, rtol=1e-5)
    low = plain_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, is_causal, 0.0)
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------------- query/key norm (model.qk_norm)


def randomize_qk_norms(model: torch.nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.add_(torch.randn_like(p) * scale)


def test_qk_norm_logits_match_qwen3():
    """Qwen3 is the Llama layout plus q_norm/k_norm (RMSNorm over the head size, before rotary positions): the
    same weights must give the same logits."""
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=100, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model = GPT(tiny(block_size=64, qk_norm=True, **LLAMA_LAYOUT)).eval()
    state = llama_to_choicelm(hf.state_dict(), 2)
    for i in range(2):
        for n in ("q_norm", "k_norm"):
            state[f"transformer.h.{i}.attn.{n}.weight"] = hf.state_dict()[f"model.layers.{i}.self_attn.{n}.weight"]
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    idx = torch.randint(0, 100, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, hf(idx).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_qk_norm_attention_equals_hand_computation(pos):
    """q_h <- g_q * q_h / sqrt(mean(q_h^2) + eps) per head (k likewise with g_k), then rotary positions, then
    causal softmax attention; grouped-query heads (2 key/value heads for 4 query heads)."""
    from choicelm.models.layers import SelfAttention

    torch.manual_seed(3)
    config = tiny(qk_norm=True, pos=pos, n_kv_head=2, norm_eps=1e-5, bias=True)
    attn = SelfAttention(config).eval()
    with torch.no_grad():
        attn.q_norm.weight.copy_(1 + 0.5 * torch.randn(16))
        attn.k_norm.weight.copy_(1 + 0.5 * torch.randn(16))
    B, T, H, K, Q = 2, 7, 4, 2, 16
    x = torch.randn(B, T, 64)
    rope = None
    if pos == "rope":  # the tables by hand: angle[t, i] = t / 10000^(2i/Q), the Q/2 angles repeated twice
        angle = torch.arange(T)[:, None].double() / 10000.0 ** (torch.arange(0, Q, 2).double() / Q)
        angle = torch.cat([angle, angle], dim=1)
        rope = (angle.cos().float(), angle.sin().float())
    with torch.no_grad():
        got = attn(x, rope=rope)
        W, b = attn.c_attn.weight.double(), attn.c_attn.bias.double()
        qkv = x.double() @ W.T + b
        q = qkv[..., :H * Q].reshape(B, T, H, Q)
        k = qkv[..., H * Q:(H + K) * Q].reshape(B, T, K, Q)
        v = qkv[..., (H + K) * Q:].reshape(B, T, K, Q)
        q = q / (q.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * attn.q_norm.weight.double()
        k = k / (k.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * attn.k_norm.weight.double()
        if pos == "rope":
            cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
            half = Q // 2

            def rotate(t):
                return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin
            q, k = rotate(q), rotate(k)
        out = torch.empty(B, T, H, Q, dtype=torch.float64)
        for h in range(H):
            kh, vh = k[:, :, h // (H // K)], v[:, :, h // (H // K)]
            scores = q[:, :, h] @ kh.transpose(1, 2) / Q ** 0.5
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            out[:, :, h] = scores.softmax(-1) @ vh
        ref = out.reshape(B, T, H * Q) @ attn.c_proj.weight.double().T + attn.c_proj.bias.double()
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_qk_norm_model_is_causal(mode):
    """Editing the second half of a window leaves the first half's logits unchanged, in training and eval mode."""
    torch.manual_seed(4)
    model = GPT(tiny(qk_norm=True, **LLAMA_LAYOUT))
    randomize_qk_norms(model)
    model.train(mode == "train")
    idx = torch.randint(0, 100, (2, 24))
    edited = idx.clone()
    edited[:, 12:] = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        a, b = model(idx).logits, model(edited).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-2  # the edit does reach the later positions


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_qk_norm_fused_decode_step_and_greedy_tokens(layout):
    """A prepared qk_norm GPT decodes through FusedStep: its logits equal the module forward's at every step, and
    greedy generate gives the module forward's argmax tokens."""
    from choicelm.generation import GenerationConfig, generate_ids
    from choicelm.generation.step import decode_step
    from choicelm.models.gpt_decode import FusedStep
    from choicelm.models.weight_layout import prepare_for_decoding

    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not available in this torch build")
    torch.manual_seed(5)
    model = GPT(tiny(block_size=64, qk_norm=True, **(GPT2_LAYOUT if layout == "gpt2" else LLAMA_LAYOUT))).eval()
    randomize_qk_norms(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # a peaked next-token distribution: argmax never hinges on rounding
    prepare_for_decoding(model)
    assert FusedStep.supports(model) and isinstance(decode_step(model), FusedStep)
    prompt = torch.randint(1, 100, (9,)).tolist()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        cache = model.new_kv_cache(1, 24)
        model(ids[:, :-1], kv_cache=cache)
        step = FusedStep(model)
        for t in range(len(prompt) - 1, 20):
            got = step(ids[:, -1], cache, t)
            ref = model(ids).logits[:, -1]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
            ids = torch.cat([ids, ref.argmax(-1, keepdim=True)], dim=1)
    tokens = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=12, temperature=0))[0].ids
    assert tokens == ids[0, len(prompt):len(prompt) + 12].tolist()


def test_qk_norm_is_refused_by_hugging_face_export_and_other_kinds():
    from choicelm.core.config import ConfigError
    from choicelm.interop.hf import ConversionError, hf_architecture_for

    with pytest.raises(ConversionError, match="model.qk_norm=true has no Hugging Face export") as e:
        hf_architecture_for(tiny(qk_norm=True, **LLAMA_LAYOUT))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="only implemented for model.kind=gpt"):
        ModelConfig(kind="seq2seq", qk_norm=True)

"""The LSTM language model against the LSTM equations written out in numpy, truncated BPTT against one
long sequence, the stream sampler's continuity, and exact resume of a killed LSTM run."""

import numpy as np
import pytest
import torch

from choicelm.core.config import ModelConfig
from choicelm.data.loader import StreamBatchSampler, TokenDataset
from choicelm.core.errors import ChoicelmError
from choicelm.models import LSTMLM, build_model

from conftest import TINY
from test_train import cli_subprocess, losses, weights

LSTM_ARGS = ["--model.kind=lstm", "--model.n_embd=32", "--model.n_layer=2"]


def tiny_lstm(**kw) -> LSTMLM:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**dict(kind="lstm", vocab_size=40, n_layer=2, n_embd=8, block_size=16), **kw}))


def numpy_lstm_logits(model: LSTMLM, ids: np.ndarray) -> np.ndarray:
    """Embedding -> LSTM layers by the textbook equations -> linear head, one sequence, in float64:
    i, f, g, o = sigmoid/sigmoid/tanh/sigmoid(W_ih x + b_ih + W_hh h + b_hh); c = f c + i g; h = o tanh(c)."""
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    xs = sd["embed.weight"][ids]
    D = xs.shape[1]
    for layer in range(model.config.n_layer):
        w_ih, w_hh = sd[f"lstm.weight_ih_l{layer}"], sd[f"lstm.weight_hh_l{layer}"]
        b = sd[f"lstm.bias_ih_l{layer}"] + sd[f"lstm.bias_hh_l{layer}"]
        h, c, out = np.zeros(D), np.zeros(D), []
        for x in xs:
            z = w_ih @ x + w_hh @ h + b
            i, f, g, o = sigmoid(z[:D]), sigmoid(z[D:2 * D]), np.tanh(z[2 * D:3 * D]), sigmoid(z[3 * D:])
            c = f * c + i * g
            h = o * np.tanh(c)
            out.append(h)
        xs = np.stack(out)
    logits = xs @ sd["lm_head.weight"].T
    return logits + sd["lm_head.bias"] if "lm_head.bias" in sd else logits


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_the_lstm_equations(tied):
    model = tiny_lstm(tie_embeddings=tied).eval()
    ids = torch.randint(0, 40, (1, 11), generator=torch.Generator().manual_seed(1))
    ours = model(ids).logits[0].detach().double().numpy()
    np.testing.assert_allclose(ours, numpy_lstm_logits(model, ids[0].numpy()), atol=1e-5)
    assert (model.lm_head.weight is model.embed.weight) == tied


def test_carried_state_equals_one_long_sequence_and_the_chunked_loss():
    model = tiny_lstm(bias=False).eval()
    x = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(2))
    y = torch.roll(x, -1, 1)
    full = model(x, y)
    first = model(x[:, :5], y[:, :5])
    second = model(x[:, 5:], y[:, 5:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full.logits)
    torch.testing.assert_close(model(x, y, return_logits=False).loss, full.loss)
    cache = model.new_kv_cache(3)  # generation's interface: prefill, then one token at a time
    steps = [model(x[:, :5], kv_cache=cache, start_pos=0).logits]
    steps += [model(x[:, t:t + 1], kv_cache=cache, start_pos=t).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full.logits)
    with pytest.raises(ChoicelmError, match="continues only where it stopped"):
        model(x[:, :1], kv_cache=cache, start_pos=3)


def test_lstm_config_errors():
    with pytest.raises(ChoicelmError, match="experts"):
        from choicelm.core.config import MoEConfig
        build_model(ModelConfig(kind="lstm", vocab_size=40, n_embd=8), MoEConfig(experts=4))
    ModelConfig(kind="lstm", n_embd=10, n_head=3)  # attention settings do not apply


def test_stream_sampler_rows_continue_and_split_over_ranks(prepared):
    _, data = prepared
    ds = TokenDataset(data, "train")
    one = StreamBatchSampler(ds, 32, 2, 4, seed=0)
    a, b = one.next_step(), one.next_step()
    for slot in range(2):  # row r of step 2 starts with the token row r of step 1 predicted last
        assert torch.equal(b[slot][0][:, 0], a[slot][1][:, -1])
    two = [StreamBatchSampler(ds, 32, 2, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    x_ranks = torch.cat([s.next_step()[0][0] for s in two])
    assert torch.equal(x_ranks, torch.cat([a[0][0], a[1][0]]))


def test_lstm_run_resumes_bit_identically_after_a_kill(prepared, tmp_path):
    """The carried state is part of the checkpoint: 8 steps straight == 4 + kill at 6 + resume to 8."""
    _, data = prepared
    common = ["--config", TINY, "--data", data, "--train.max_steps=8", "--train.save_every=4",
              "--train.eval_every=4", "--model.dropout=0.1", "--train.global_batch_size=8", *LSTM_ARGS]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cli_subprocess("pretrain", *common, "--out", straight)
    proc = cli_subprocess("pretrain", *common, "--out", killed,
                          env_extra={"CHOICELM_DEBUG_KILL_AFTER_STEP": "6"}, check=False)
    assert proc.returncode == -9
    cli_subprocess("pretrain", *common, "--out", killed, "--resume", "auto")
    assert losses(killed) == losses(straight)
    wa, wb = weights(straight / "step-00000008"), weights(killed / "step-00000008")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [float(v) for v in losses(straight).values()]
    assert rows[-1] < rows[0]  # it learns


def test_lstm_checkpoint_loads_evaluates_and_generates(prepared, tmp_path):
    import choicelm
    from choicelm.evaluation.perplexity import perplexity

    _, data = prepared
    run = tmp_path / "run"
    cli_subprocess("pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=3",
                   "--train.eval_every=0", *LSTM_ARGS)
    lm = choicelm.load(run)
    assert isinstance(lm.model, LSTMLM)
    result = perplexity(lm, data, "val", batch_size=4, max_batches=2)
    assert 1 < result["ppl"] < 600
    a = lm.generate("ROMEO:", max_new_tokens=8, temperature=0)
    assert a == lm.generate("ROMEO:", max_new_tokens=8, temperature=0) and len(a) > 0


def test_left_padded_prefill_equals_each_row_alone():
    model = tiny_lstm().eval()
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12, 13]])
    batch = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    cache = model.new_kv_cache(2)
    out = model(batch, kv_cache=cache, start_pos=0, attention_mask_BS=mask, logits_to_keep=1)
    torch.testing.assert_close(out.logits[0, -1], model(a).logits[0, -1])
    torch.testing.assert_close(out.logits[1, -1], model(b).logits[0, -1])
    nxt = torch.tensor([[3], [4]])  # one decode step continues each row's own state
    step = model(nxt, kv_cache=cache, start_pos=5).logits
    torch.testing.assert_close(step[1, -1], model(torch.tensor([[11, 12, 13, 4]])).logits[0, -1])

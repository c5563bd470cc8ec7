"""The one training loop. Every objective (causal LM, masked LM, truncated BPTT, and the fine-tuning tasks:
classification, seq2seq, SFT) runs here.

    pretrain(cfg, out_dir="runs/x", resume="auto")       # finetune/run.py builds its own RunInputs

One optimizer step: fetch this rank's micro-batches, count valid tokens over the global batch,
forward/backward each micro-batch with its summed loss divided by that count (so accumulation and
ranks weigh every token the same), skip the step if the loss or gradient norm is not finite, clip,
step the optimizer (AdamW, or Muon + AdamW), and every few steps log, evaluate and checkpoint. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from ..core import checkpoint as ckpt
from ..core.config import Config
from ..core.errors import ChoicelmError, StoppedBySignal
from ..core.run_dir import plan_run_dir
from ..core.runtime import autocast, available_memory, keep_freed_memory, pick_device, use_bf16
from ..data.loader import LMBatchSampler, StreamBatchSampler, TokenDataset, eval_batches
from ..models import build_model, registry
from ..objectives import OBJECTIVES, MaskedLM, TruncatedBPTT, summed_loss
from .distributed import DistInfo, all_reduce_sum, barrier, gather_objects, init_distributed, shutdown
from .optim import build_optimizer, lr_at, set_lr
from .run_log import MetricsLog, measure_peak_flops, peak_memory_mb

# Testing hook: SIGKILL this process right after the given step (and its checkpoint) completes,
# so tests can prove that a real, uncatchable kill followed by --resume loses nothing.
KILL_AFTER_STEP_ENV = "CHOICELM_DEBUG_KILL_AFTER_STEP"
# Testing hook: sleep this many seconds in every step, so a test can signal a run in the middle of one.
STEP_SLEEP_ENV = "CHOICELM_DEBUG_STEP_SLEEP"


class NonFiniteLossError(ChoicelmError):
    pass


class ImmediateStop(KeyboardInterrupt):
    """A second SIGINT/SIGTERM while a run was finishing its step: stop at once (exit 128 + signal number)."""

    def __init__(self, signum: int):
        super().__init__(f"a second {signal.Signals(signum).name} stopped the run at once, without saving; "
                         "--resume auto continues from the newest complete checkpoint")
        self.exit_code = 128 + signum


class GracefulStop:
    """While a run trains: the first SIGINT or SIGTERM is noted (the loop finishes the step, saves a checkpoint and
    raises StoppedBySignal); a second one raises ImmediateStop at once. Handlers are installed only in the main
    thread (Python delivers signals there) and restored on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise ImmediateStop(signum)
        self.signum = signum


def pretrain(cfg: Config, out_dir: str | Path, resume: str | None = None, overwrite: bool = False,
             objective: str = "causal_lm") -> Path:
    """Train `cfg.model` on the shards in `cfg.data.path`, writing the run to `out_dir`.
    Returns the path of the final checkpoint. An n-gram model is counted instead (train/counting.py)."""
    if registry.get(cfg.model.kind).counted:
        from .counting import count_ngram

        return count_ngram(cfg, Path(out_dir), resume, overwrite)
    if cfg.train.tune_allocator:
        keep_freed_memory()
    device = pick_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = init_distributed(device.type)
    try:
        return Trainer(cfg, Path(out_dir), dist_info, device, resume, overwrite,
                       pretraining_inputs(cfg, objective)).run()
    finally:
        shutdown(dist_info)


def resolve_vocab_size(cfg: Config, manifest_vocab: int) -> None:
    """vocab_size 0 takes the tokenizer's size rounded up to a multiple of 64 (faster matmuls)."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = -(-manifest_vocab // 64) * 64
    elif cfg.model.vocab_size < manifest_vocab:
        raise ChoicelmError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                            f"{manifest_vocab} tokens; set --model.vocab_size={manifest_vocab} or 0 (automatic)")


@dataclass
class RunInputs:
    """What a run trains on, so pretraining and every fine-tuning task share the Trainer below.

    train, val:        datasets with n_windows(block_size) and batch(indices, block_size) -> tuple of tensors whose
                       last element is the targets (-100 = ignored): token windows (TokenDataset) or examples
    build_model:       called once, after seeding with train.seed: the model to train (fresh, or pretrained + head)
    objective_for:     sampler -> objective (objectives.py): batch -> (summed loss, valid count, output)
    tokenizer_dir:     copied into every checkpoint; tokenizer_sha256 guards a resume against other data
    extra_files:       name -> text, written into every checkpoint (e.g. the label names of a classifier)
    """

    train: object
    val: object | None
    build_model: Callable[[], torch.nn.Module]
    objective_for: Callable[[LMBatchSampler], object]
    tokenizer_dir: Path
    tokenizer_sha256: str
    sampler_cls: type = LMBatchSampler
    extra_files: dict[str, str] = field(default_factory=dict)


def pretraining_inputs(cfg: Config, objective: str = "causal_lm") -> RunInputs:
    """Token windows of `cfg.data.path`: causal LM (truncated BPTT on parallel streams for an LSTM) or masked LM
    for an encoder."""
    if not cfg.data.path:
        raise ChoicelmError("no training data: pass --data DIR (a directory written by `choicelm prepare`)")
    data_dir = Path(cfg.data.path)
    train = TokenDataset(data_dir, "train")
    manifest = train.manifest
    val = TokenDataset(data_dir, "val") if cfg.train.eval_every and "val" in manifest["splits"] else None
    resolve_vocab_size(cfg, manifest["vocab_size"])
    spec = registry.get(cfg.model.kind)

    def objective_for(sampler):
        if objective == "causal_lm" and spec.recurrent:  # parallel text streams, the state carried across steps
            return TruncatedBPTT(sampler.micro_steps)
        if objective == "causal_lm" and spec.encodes:  # an encoder pretrains by masked LM
            return MaskedLM.for_data(data_dir, cfg.train.seed, nsp=cfg.model.nsp)
        return OBJECTIVES[objective]

    return RunInputs(train, val, lambda: build_model(cfg.model, cfg.moe), objective_for,
                     data_dir / manifest["tokenizer"]["dir"], manifest["tokenizer"]["sha256"],
                     StreamBatchSampler if spec.recurrent else LMBatchSampler)


class Trainer:
    def __init__(self, cfg: Config, out_dir: Path, dist_info: DistInfo, device: torch.device,
                 resume: str | None, overwrite: bool, inputs: RunInputs):
        self.cfg, self.out_dir, self.dist, self.device = cfg, out_dir, dist_info, device
        self.inputs = inputs
        t = cfg.train
        self.train_data, self.val_data = inputs.train, inputs.val if t.eval_every else None

        # Every check that can still fail runs before --out is touched: only then is the old run replaced. That
        # includes building the model and restoring the checkpoint (a base or resume checkpoint that does not load).
        self.run_plan = plan_run_dir(out_dir, resume, overwrite, dist_info.is_main)
        try:
            resume_from = self.run_plan.resume_from
            if resume_from is not None:
                self._check_resume_config(resume_from)
            ws = dist_info.world_size
            global_batch = t.global_batch_size or t.micro_batch_size * ws
            self.sampler = inputs.sampler_cls(self.train_data, cfg.model.block_size, t.micro_batch_size,
                                              global_batch, t.seed, dist_info.rank, ws)
            if self.val_data is not None:  # a split too short for one window fails now, not at the first evaluation
                self.val_data.n_windows(cfg.model.block_size)
            check_fits_in_memory(cfg, device, t.micro_batch_size)
            self._build(resume_from)
            self.run_plan.commit(dist_info.is_main)
        except BaseException:
            self.run_plan.release()
            raise
        barrier(dist_info)

        model = compile_for_training(self.model) if t.compile else self.model
        self.train_model = DDP(model) if dist_info.enabled else model

    def _build(self, resume_from: Path | None) -> None:
        """The model, optimizer and objective, seeded with train.seed, and the state of `resume_from` if given."""
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)
        self.model = self.inputs.build_model().to(self.device)
        self.flops_per_token = self.model.flops_per_token(cfg.model.block_size)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device.type)
        self.bf16 = use_bf16(t.precision, self.device)
        self.objective = self.inputs.objective_for(self.sampler)

        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.stop = GracefulStop()
        # steps since the last metrics row (saved with a checkpoint, so a resumed run writes the same rows)
        self.window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0, "data": 0.0}
        self.moe_stats, self.moe_aux = None, 0.0  # MoE routing stats of the last micro-batch, aux loss of the window
        self.moe_topk_eval = cfg.moe.enabled and cfg.moe.router != "token_choice"  # also log teacher-forced top-k loss
        self.nonfinite_total, self.nonfinite_streak = 0, 0
        self.best_val = math.inf
        if resume_from is not None:
            self._restore(resume_from)
        self.resumed_step = self.step if resume_from is not None else None

    # --- resume -------------------------------------------------------------------------------
    def _check_resume_config(self, path: Path) -> None:
        saved = ckpt.read_raw_config(path)
        # Keys a checkpoint predates (sections or fields added since) had their default values then.
        defaults = Config().to_dict()
        saved_model = {**defaults["model"], **saved.get("model", {}),
                       **{f"moe.{k}": v for k, v in {**defaults["moe"], **(saved.get("moe") or {})}.items()}}
        ours = {**self.cfg.to_dict()["model"], **{f"moe.{k}": v for k, v in self.cfg.to_dict()["moe"].items()}}
        diff = [k for k in ours if saved_model.get(k) != ours[k]]
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved_model.get(k)!r} vs now {ours[k]!r}" for k in diff)
            raise ChoicelmError(f"cannot resume from {path}: the model config differs ({detail}); "
                                "resume with the original settings or start a new --out")
        saved_optim = (saved.get("optim") or {}).get("name", "adamw")  # checkpoints before optim.name: AdamW
        if saved_optim != self.cfg.optim.name:
            raise ChoicelmError(f"cannot resume from {path}: it was trained with optim.name={saved_optim} and its "
                                f"optimizer state does not fit optim.name={self.cfg.optim.name}; resume with "
                                f"--optim.name={saved_optim} or start a new --out")
        state = ckpt.load_trainer_state(path)
        if state.get("tokenizer_sha256") != self.inputs.tokenizer_sha256:
            raise ChoicelmError(f"cannot resume from {path}: the data was encoded with a different tokenizer than "
                                "the checkpoint was trained on")

    def _restore(self, path: Path) -> None:
        ckpt.load_weights(self.model, path)
        ckpt.load_optimizer(self.optimizer, path)
        state = ckpt.load_trainer_state(path)
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.nonfinite_total, self.nonfinite_streak = state["nonfinite_total"], state["nonfinite_streak"]
        self.best_val = state["best_val"]
        self.window = state.get("window", self.window)  # checkpoints before the window was saved: an empty one
        self.moe_aux = state.get("moe_aux", 0.0)
        self.sampler.load_state_dict(state["sampler"])
        if hasattr(self.objective, "load_state_dict"):  # a recurrent model's carried state, one per rank
            if state["world_size"] != self.dist.world_size:
                raise ChoicelmError(f"cannot resume {path}: a recurrent model's streams were split over "
                                    f"{state['world_size']} processes; resume with the same number")
            self.objective.load_state_dict(state["objective"][self.dist.rank], self.device)
        ckpt.set_rng_state(state["rng"])

    def _trainer_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                "nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak,
                "best_val": self.best_val, "window": dict(self.window), "moe_aux": self.moe_aux,
                "sampler": self.sampler.state_dict(), "rng": ckpt.rng_state(),
                "tokenizer_sha256": self.inputs.tokenizer_sha256,
                "world_size": self.dist.world_size, "objective": self._objective_states}

    # --- one step ------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step. Returns (mean loss over valid tokens, grad norm, seconds waiting for data)."""
        t0 = time.perf_counter()
        micro_batches = [tuple(t.to(self.device, non_blocking=True) for t in b) for b in self.sampler.next_step()]
        if hasattr(self.objective, "prepare"):  # MLM masking, seeded by (step, micro-batch) for an exact resume
            first = self.dist.rank * len(micro_batches)
            micro_batches = [self.objective.prepare(b, (self.step, first + i)) for i, b in enumerate(micro_batches)]
        data_wait = time.perf_counter() - t0
        local_valid = sum(int((b[-1] != -100).sum()) for b in micro_batches)  # the last tensor holds the targets
        (n_valid,) = all_reduce_sum([local_valid], self.dist, self.device)
        # DDP averages gradients over ranks; multiplying by world_size turns that into a sum.
        scale = self.dist.world_size / max(n_valid, 1)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.train_model.no_sync()
            with sync:
                with autocast(self.device, self.bf16):
                    batch_loss, _, out = self.objective(self.train_model, batch)
                    loss = batch_loss * scale
                    if getattr(out, "aux_loss", None) is not None:
                        loss = loss + out.aux_loss / len(micro_batches)
                        self.moe_aux += float(out.aux_loss.detach()) / len(micro_batches)
                    self.moe_stats = getattr(out, "stats", None) or self.moe_stats  # the last micro-batch's
                loss.backward()
            loss_sum += batch_loss.detach().double()
        (total,) = all_reduce_sum([loss_sum.item()], self.dist, self.device)
        mean_loss = total / max(n_valid, 1)
        grad_norm = math.nan
        if math.isfinite(mean_loss):
            clip = self.cfg.optim.grad_clip or math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if math.isfinite(mean_loss) and math.isfinite(grad_norm):
            set_lr(self.optimizer, lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps))
            self.optimizer.step()
            self.nonfinite_streak = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, grad_norm, data_wait

    def evaluate(self, routing: str | None = None) -> float:
        """Mean loss per valid token over the first eval_batches validation micro-batches (all ranks), with the
        MoE routing rule the model uses in eval mode (the causal one generation uses) unless `routing` says."""
        t = self.cfg.train
        batches = eval_batches(self.val_data, self.cfg.model.block_size, t.micro_batch_size, t.eval_batches,
                               self.dist.rank, self.dist.world_size)
        self.model.eval()
        with self.model.routing_as(routing) if routing else contextlib.nullcontext():
            loss_sum, count = summed_loss(self.objective, self.model, batches, self.device, self.bf16)
        self.model.train()
        loss_sum, count = all_reduce_sum([loss_sum, count], self.dist, self.device)
        return loss_sum / max(count, 1)

    # --- the loop --------------------------------------------------------------------------------
    def _should_stop(self) -> bool:
        t = self.cfg.train
        return (self.step >= t.max_steps or (t.max_tokens and self.tokens >= t.max_tokens)
                or (t.max_time and self.elapsed >= t.max_time))

    def _save(self, val_loss: float | None) -> Path | None:
        self._refuse_nonfinite_weights()  # never a checkpoint of nan weights
        path = None
        has_state = hasattr(self.objective, "state_dict")
        self._objective_states = gather_objects(self.objective.state_dict(), self.dist) if has_state else None
        if self.dist.is_main:
            tokenizer_dir = self.inputs.tokenizer_dir
            path = ckpt.save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self._trainer_state(),
                                        yaml.safe_dump(self.cfg.to_dict(), sort_keys=False),
                                        tokenizer_dir if tokenizer_dir.is_dir() else None, val_loss,
                                        self.inputs.extra_files)
            ckpt.prune_checkpoints(self.out_dir, self.cfg.train.keep_last)
        barrier(self.dist)
        return path or self.out_dir / ckpt.step_dir_name(self.step)

    def run(self) -> Path:
        try:
            with self.stop:
                return self._run()
        finally:
            self.run_plan.release()

    def _stop_requested(self) -> int | None:
        """The signal that asked the run to stop, agreed by every rank (all stop after the same step), or None."""
        if not self.dist.enabled:
            return self.stop.signum
        (asked,) = all_reduce_sum([float(self.stop.signum or 0)], self.dist, self.device)
        return (self.stop.signum or signal.SIGTERM) if asked else None

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def _refuse_nonfinite_weights(self) -> None:
        if not self._weights_finite():
            newest = ckpt.list_checkpoints(self.out_dir)
            kept = f"; the newest checkpoint is {newest[-1].path}" if newest else ""
            raise NonFiniteLossError(
                f"stopped at step {self.step}: the weights are no longer finite (inf or nan), so nothing more is "
                f"saved{kept}; lower optim.lr, keep optim.grad_clip on, or try train.precision=fp32")

    def _run(self) -> Path:
        t, main = self.cfg.train, self.dist.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.out_dir / "config.yaml")
            log = MetricsLog(self.out_dir, self.resumed_step)
        peak = t.peak_flops or (measure_peak_flops(self.device, torch.bfloat16 if self.bf16 else torch.float32)
                                if main else 1.0)  # only rank 0 logs MFU
        kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0"))
        step_sleep = float(os.environ.get(STEP_SLEEP_ENV, "0"))
        bar = _progress(t.max_steps, self.step, main and t.progress)

        window = self.window
        last_saved = last_evaluated = None
        val_loss, save_pending = None, False
        self.model.train()
        while not self._should_stop():
            t0 = time.perf_counter()
            loss, grad_norm, data_wait = self.train_step()
            if step_sleep:
                time.sleep(step_sleep)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.step += 1
            self.tokens += self.sampler.tokens_per_step
            self.elapsed += dt
            window["loss"] += loss
            window["steps"] += 1
            window["tokens"] += self.sampler.tokens_per_step
            window["time"] += dt
            window["data"] += data_wait
            final = self._should_stop()
            if self.nonfinite_streak:  # this step's loss or gradient was inf/nan and the step was skipped
                self._refuse_nonfinite_weights()  # the step before made the weights inf/nan: stop here
                if self.nonfinite_streak >= t.max_nonfinite or final:
                    newest = ckpt.list_checkpoints(self.out_dir)
                    ended = " and the run ended there, so its last weights are not saved" if final else ""
                    raise NonFiniteLossError(
                        f"stopped at step {self.step}: {self.nonfinite_streak} non-finite losses in a row (each step "
                        f"was skipped){ended}{f'; the newest checkpoint is {newest[-1].path}' if newest else ''}; "
                        "lower optim.lr, keep optim.grad_clip on, or try train.precision=fp32")

            val_loss = None
            val_loss_topk = None
            if self.val_data is not None and (self.step % t.eval_every == 0 or final):
                val_loss = self.evaluate()
                if self.moe_topk_eval:  # the gap to the causal rule's val_loss is what causality costs
                    val_loss_topk = self.evaluate("topk")
                last_evaluated = self.step
                self.best_val = min(self.best_val, val_loss)
            if main and (self.step % t.log_every == 0 or val_loss is not None or final):
                lr = lr_at(self.step - 1, self.cfg.optim, t.max_steps)
                tokens_per_s = window["tokens"] / max(window["time"], 1e-9)
                flops_per_s = tokens_per_s * self.flops_per_token
                log.write({
                    "step": self.step, "tokens": self.tokens, "train_loss": window["loss"] / max(window["steps"], 1),
                    "val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss is not None else None,
                    "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s,
                    "mfu": flops_per_s / (peak * self.dist.world_size), "peak_mem_mb": peak_memory_mb(self.device),
                    "data_wait": window["data"] / max(window["time"], 1e-9),
                    "nonfinite_skipped": self.nonfinite_total, "elapsed_s": self.elapsed,
                    **self._moe_metrics(val_loss_topk, window["steps"])})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                window.update({k: 0.0 if k != "steps" else 0 for k in window})
            bar.update(1)
            if (t.save_every and self.step % t.save_every == 0) or final or save_pending:
                save_pending = bool(self.nonfinite_streak)  # a skipped step defers its save to the next good one
                if not save_pending:
                    self._save(val_loss if last_evaluated == self.step else None)
                    last_saved = self.step
            if kill_after and self.step == kill_after:
                if main:
                    log.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            signum = None if final else self._stop_requested()
            if signum is not None:  # SIGINT/SIGTERM: this step is done; save it and stop
                if last_saved != self.step:
                    self._save(val_loss if last_evaluated == self.step else None)
                bar.close()
                if main:
                    log.close()
                raise StoppedBySignal(f"stopped by {signal.Signals(signum).name} after step {self.step}; saved "
                                      f"{self.out_dir / ckpt.step_dir_name(self.step)}", signum)
        bar.close()
        already_saved = ckpt.read_info(self.out_dir / ckpt.step_dir_name(self.step)) is not None
        if last_saved != self.step and not already_saved:  # e.g. resumed a run that had already finished
            self._save(None)
        if main:
            log.close()
            self._write_summary()
        return self.out_dir / ckpt.step_dir_name(self.step)

    def _moe_metrics(self, val_loss_topk: float | None, steps: int) -> dict:
        """moe_* columns: routing stats of the last micro-batch (train mode: the training rule) and the mean aux loss."""
        if not self.cfg.moe.enabled or self.moe_stats is None:
            return {}
        from ..models.moe import summarize_stats

        row = summarize_stats(self.moe_stats)
        row["moe_aux_loss"] = self.moe_aux / max(steps, 1)
        row["moe_val_loss_topk"] = val_loss_topk
        self.moe_aux = 0.0
        return row

    def _write_summary(self) -> None:
        summary = {"step": self.step, "tokens": self.tokens, "elapsed_s": round(self.elapsed, 3),
                   "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
                   "nonfinite_skipped": self.nonfinite_total, "world_size": self.dist.world_size,
                   "precision": "bf16" if self.bf16 else "fp32", "device": str(self.device)}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def estimate_parameters(cfg: Config) -> int:
    """Parameters of cfg's model from its config alone (nothing allocated; an upper bound within a few percent)."""
    m, moe, spec = cfg.model, cfg.moe, registry.get(cfg.model.kind)
    d, v, hidden = m.n_embd, m.vocab_size or 50304, m.hidden_size
    embed = v * d * (1 if m.tie_embeddings else 2)
    if spec.recurrent:
        return embed + m.n_layer * 8 * d * (d + 1)
    mats = 3 if m.mlp == "swiglu" else 2
    attn = 2 * d * d + 2 * d * m.kv_heads * m.head_dim + 4 * d
    mlp = mats * d * hidden + hidden + 2 * d
    blocks = m.n_layer + ((m.n_decoder_layer or m.n_layer) if spec.encoder_decoder else 0)
    total = embed + (m.block_size * d if m.pos == "learned" else 0) + blocks * (attn + mlp)
    if spec.encoder_decoder:
        total += (m.n_decoder_layer or m.n_layer) * attn + (m.src_vocab_size * d)  # cross-attention, source table
    if moe.enabled and spec.moe:
        n_moe = m.n_layer // moe.every
        width = moe.expert_width or hidden
        total += n_moe * (moe.experts * mats * d * width + d * moe.experts - mlp
                          + (mats * d * width if moe.shared_expert else 0))
    return total


def estimate_training_bytes(cfg: Config, micro_batch_size: int) -> int:
    """Memory one training process needs at least: fp32 weights, gradients and two optimizer moments (16 bytes a
    parameter) and the activations a micro-batch keeps for backward (~(12 d + 3 hidden) floats per token and layer:
    attention runs as flash attention, so no T x T scores)."""
    m = cfg.model
    blocks = m.n_layer + ((m.n_decoder_layer or m.n_layer) if registry.get(m.kind).encoder_decoder else 0)
    per_token_layer = 12 * m.n_embd + 3 * m.hidden_size
    activations = micro_batch_size * m.block_size * blocks * per_token_layer * 4
    return 16 * estimate_parameters(cfg) + activations


def check_fits_in_memory(cfg: Config, device: torch.device, micro_batch_size: int) -> None:
    """Refuse, in one line and before anything is allocated, a model that cannot fit in the memory this device has
    free (n_layer=1e9 would otherwise allocate for minutes and then fail)."""
    need = estimate_training_bytes(cfg, micro_batch_size)
    have = available_memory(device)
    if have is not None and need > have:
        params = estimate_parameters(cfg)
        raise ChoicelmError(f"this model needs about {_gib(need)} to train (~{params:,} parameters at 16 bytes each "
                            f"for weights, gradients and AdamW moments, plus activations of micro-batch "
                            f"{micro_batch_size} x block_size {cfg.model.block_size}) but {device.type} has "
                            f"{_gib(have)} available; lower model.n_layer / n_embd / block_size or "
                            "train.micro_batch_size")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def compile_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile each transformer block in place (torchtitan's per-block compile) and return the model.

    Inductor then fuses each block's norms, activations and residual adds, while the embedding lookup and the
    chunked cross-entropy (a custom autograd function, which breaks a whole-model graph) stay eager, and so does
    an MoE layer inside a block (models/moe.py: its routing has data-dependent shapes). Measured on this
    project's CPU (6 x 384 GPT, bf16, interleaved): 1.0-1.06x eager, where compiling the whole model was 0.7x.
    The blocks are the ModuleLists named `h` (GPT-2's name: GPT, BERT, both halves of a Seq2Seq); a model
    without them (an LSTM) is compiled whole.
    """
    block_lists = [m for name, m in model.named_modules()
                   if name.split(".")[-1] == "h" and isinstance(m, torch.nn.ModuleList)]
    if not block_lists:
        return torch.compile(model)
    for blocks in block_lists:
        for block in blocks:
            block.compile()
    return model

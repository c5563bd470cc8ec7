"""Grouped dataclass configs: validated on construction, loaded from YAML, overridden from the CLI.

A run's config has seven sections, each a dataclass below: `model`, `data`, `optim`, `train`, `moe`, `ngram`,
`finetune`.
Every field carries a help string (it becomes `--help`); every section validates itself in
`__post_init__`, so a bad value fails before any work starts, with a message naming the key.

    cfg = load_config("configs/tiny.yaml", ["--train.max_steps=20", "--model.n_layer=2"])
    cfg.model.n_layer  # 2
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ChoicelmError, naming


class ConfigError(ChoicelmError, ValueError):
    """A config value or key is wrong; the message names it and says what is allowed."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


INT_LIMIT = 2**63  # torch and numpy take integers (seeds, sizes) as int64


def _numbers_in_range(section: str, obj: Any) -> None:
    """Every float field is finite (no inf, no nan: nan passes every comparison) and every int fits in int64."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{f.name}={value!r} must be a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT < value < INT_LIMIT:
            raise ConfigError(f"{section}.{f.name}={value} is out of range (at most {INT_LIMIT - 1})")


def _positive(section: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{section}.{name}={value!r} must be {bound}")


@dataclass
class ModelConfig:
    """Model architecture. Defaults reproduce GPT-2 (124M) exactly."""

    kind: str = _f("gpt", "model family: gpt | lstm (n_layer LSTM layers of width n_embd; no attention keys apply) | "
                         "ngram (counted; see the ngram section) | seq2seq (encoder-decoder: n_layer encoder blocks, "
                         "n_decoder_layer decoder blocks) | bert (bidirectional post-norm encoder: masked-LM "
                         "pretraining, classification head)")
    vocab_size: int = _f(50304, "vocabulary size (embedding rows); 0 = the tokenizer's size rounded up to a multiple of 64")
    block_size: int = _f(1024, "context length: number of positions the model can attend over")
    n_layer: int = _f(12, "number of transformer blocks")
    n_head: int = _f(12, "number of attention (query) heads")
    n_kv_head: int = _f(0, "key/value heads for grouped-query attention; 0 = n_head (multi-head attention)")
    n_embd: int = _f(768, "model width (residual stream size)")
    mlp_hidden: int = _f(0, "MLP hidden width; 0 = 4*n_embd for gelu and silu, 8/3*n_embd rounded up to 256 for "
                            "swiglu")
    norm: str = _f("layernorm", "normalisation: layernorm | rmsnorm")
    norm_eps: float = _f(1e-5, "epsilon of the normalisation layers")
    mlp: str = _f("gelu", "MLP type: gelu (GPT-2, tanh approximation) | swiglu (Llama) | "
                           "silu (Marian's swish, not gated)")
    pos: str = _f("learned", "positions: learned (GPT-2 table) | rope (rotary, Llama) | "
                           "sinusoidal (fixed sin/cos table, Marian layout; seq2seq only)")
    rope_theta: float = _f(10000.0, "rotary base frequency (pos=rope only)")
    qk_norm: bool = _f(False, "gpt: normalise each head's queries and keys (RMSNorm over the head size, with a learned "
                              "gain, before rotary positions; OLMo2/Qwen3/Gemma), for training stability")
    bias: bool = _f(True, "biases in linear layers and layernorms (GPT-2: true, Llama: false)")
    tie_embeddings: bool = _f(True, "share the token embedding and output projection weights")
    dropout: float = _f(0.0, "dropout probability on embeddings, attention and residual branches")
    n_decoder_layer: int = _f(0, "seq2seq: decoder blocks (n_layer is the encoder's); 0 = n_layer")
    norm_placement: str = _f("pre", "seq2seq: pre (norm before each sub-layer, final norm; GPT-2) | post (norm after "
                                    "each residual add; original Transformer, Marian/BART)")
    src_vocab_size: int = _f(0, "seq2seq: source vocabulary size for separate source/target vocabularies "
                                "(own source embedding); 0 = one vocabulary and embedding shared by both")
    type_vocab_size: int = _f(2, "bert: token-type (segment) embedding rows")
    n_labels: int = _f(0, "bert, gpt: classes of a sequence-classification head; 0 = a language model (no classifier)")
    nsp: bool = _f(False, "bert: also pretrain with next-sentence prediction (BERT's NSP): each masked-LM window is "
                          "split at a random point into segments A and B (token types 0 and 1), and half the time B is "
                          "replaced by a slice of another window of the batch; adds a pooler and a 2-way head; needs "
                          "type_vocab_size >= 2 and n_labels=0")

    def __post_init__(self) -> None:
        s = "model"
        _numbers_in_range(s, self)
        _choice(s, "kind", self.kind, ("gpt", "lstm", "ngram", "seq2seq", "bert"))
        _choice(s, "norm", self.norm, ("layernorm", "rmsnorm"))
        _choice(s, "mlp", self.mlp, ("gelu", "swiglu", "silu"))
        _choice(s, "pos", self.pos, ("learned", "rope", "sinusoidal"))
        _choice(s, "norm_placement", self.norm_placement, ("pre", "post"))
        _positive(s, self, "n_decoder_layer", "src_vocab_size", allow_zero=True)
        if self.pos == "sinusoidal" and self.kind != "seq2seq":
            raise ConfigError("model.pos=sinusoidal is only implemented for model.kind=seq2seq; use learned or rope")
        if self.qk_norm and self.kind != "gpt":
            raise ConfigError(f"model.qk_norm=true is only implemented for model.kind=gpt (got {self.kind}); "
                              "set model.qk_norm=false")
        if self.norm_placement == "post" and self.kind != "seq2seq":
            raise ConfigError("model.norm_placement=post is only implemented for model.kind=seq2seq; use pre")
        _positive(s, self, "block_size", "n_layer", "n_head", "n_embd", "norm_eps", "rope_theta")
        _positive(s, self, "vocab_size", "n_kv_head", "mlp_hidden", allow_zero=True)
        if self.n_labels == 1 or self.n_labels < 0:
            raise ConfigError(f"model.n_labels={self.n_labels}: use 0 for a language model or >= 2 classes")
        if self.n_labels and self.kind not in ("bert", "gpt"):
            raise ConfigError(f"model.n_labels={self.n_labels}: only bert and gpt models have a classification head")
        if self.nsp and self.kind != "bert":
            raise ConfigError(f"model.nsp=true (next-sentence prediction) is a bert pretraining task; model.kind="
                              f"{self.kind} has none, so set model.nsp=false")
        if self.nsp and self.n_labels:
            raise ConfigError("model.nsp=true is for masked-LM pretraining and a classifier (model.n_labels > 0) has "
                              "no pretraining heads; set model.nsp=false to fine-tune a classifier")
        if self.nsp and self.type_vocab_size < 2:
            raise ConfigError(f"model.nsp=true marks segment B with token type 1, so it needs model.type_vocab_size "
                              f">= 2 (got {self.type_vocab_size})")
        if self.kind in ("lstm", "ngram"):
            if not 0.0 <= self.dropout < 1.0:
                raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
            return  # heads, positions and norms are attention settings
        if self.kind == "bert":
            _positive(s, self, "type_vocab_size")
            if self.pos != "learned" or self.mlp != "gelu":
                raise ConfigError(f"model.kind=bert uses learned positions and the GELU MLP; set model.pos=learned "
                                  f"and model.mlp=gelu (got pos={self.pos}, mlp={self.mlp})")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.kv_heads}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head size; got n_embd/n_head={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_size(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return -(-int(8 * self.n_embd / 3) // 256) * 256
        return 4 * self.n_embd


@dataclass
class MoEConfig:
    """Mixture-of-Experts: which blocks get an MoE layer instead of the MLP, and how tokens are routed."""

    experts: int = _f(0, "experts per MoE layer; 0 = dense model (no MoE)")
    every: int = _f(2, "MoE in every N-th block (blocks N-1, 2N-1, ...; 1 = every block)")
    expert_width: int = _f(0, "hidden width of each expert; 0 = the dense MLP's hidden width")
    router: str = _f("expert_choice_causal", "expert_choice (paper; NOT causal) | expert_choice_causal | token_choice")
    capacity: float = _f(2.0, "expert choice: c, each expert takes ceil(c*n/E) of the n tokens in its group; "
                              "token choice: capacity factor, ceil(c*n*top_k/E) slots per expert (unless dropless)")
    group: str = _f("sequence", "expert choice: the pool each expert picks its top-k from: sequence | batch")
    max_experts_per_token: int = _f(0, "expert choice: keep at most this many (highest-scoring) experts per token; 0 = no cap")
    causal_mode: str = _f("threshold", "expert_choice_causal: the rule used at evaluation and generation: "
                                       "threshold (running top-k cut-off per expert) | predictor (learned classifier)")
    train_causal: bool = _f(False, "expert choice: route with the causal rule during training too (default: true top-k "
                                   "as the teacher while the thresholds/predictor learn it)")
    threshold_momentum: float = _f(0.99, "expert choice: EMA momentum of each expert's top-k cut-off score")
    predictor_loss_weight: float = _f(1.0, "expert_choice_causal: weight of the predictor's BCE loss (it only "
                                           "trains the predictor: its input is detached)")
    top_k: int = _f(2, "token choice: experts per token (1 = Switch, 2 = GShard/Mixtral)")
    renormalize: bool = _f(True, "token choice: rescale the top-k gates to sum to 1 (Mixtral)")
    dropless: bool = _f(False, "token choice: never drop a token (no capacity limit); evaluation is always dropless")
    balance_loss_weight: float = _f(0.01, "token choice: alpha of the Switch load-balancing loss alpha*E*sum f_i P_i")
    z_loss_weight: float = _f(0.001, "router z-loss weight (ST-MoE: mean logsumexp(router logits)^2); 0 = off")
    shared_expert: bool = _f(False, "add an always-on expert of expert_width to every MoE layer")
    allow_noncausal_training: bool = _f(False, "allow router=expert_choice in a decoder, whose top-k lets later "
                                               "tokens decide earlier tokens' routing (it can learn to read the future)")

    def __post_init__(self) -> None:
        s = "moe"
        _numbers_in_range(s, self)
        _choice(s, "router", self.router, ("expert_choice", "expert_choice_causal", "token_choice"))
        _choice(s, "group", self.group, ("sequence", "batch"))
        _choice(s, "causal_mode", self.causal_mode, ("threshold", "predictor"))
        _positive(s, self, "every", "capacity", "top_k")
        _positive(s, self, "experts", "expert_width", "max_experts_per_token", "predictor_loss_weight",
                  "balance_loss_weight", "z_loss_weight", allow_zero=True)
        if self.experts == 1:
            raise ConfigError("moe.experts=1 is not a mixture; use 0 (dense) or at least 2")
        if self.experts and self.top_k > self.experts:
            raise ConfigError(f"moe.top_k={self.top_k} exceeds moe.experts={self.experts}")
        if self.experts and self.max_experts_per_token > self.experts:
            raise ConfigError(f"moe.max_experts_per_token={self.max_experts_per_token} exceeds moe.experts={self.experts}")
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ConfigError(f"moe.threshold_momentum={self.threshold_momentum} must be in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.experts > 0


@dataclass
class NGramConfig:
    """Counted n-gram models (model.kind=ngram): order, smoothing and vocabulary."""

    order: int = _f(3, "n: the model conditions on the n-1 tokens before (1..6)")
    smoothing: str = _f("kneser_ney", "kneser_ney (interpolated modified, Chen & Goodman) | mle | add_k")
    k: float = _f(1.0, "add_k only: the pseudo-count added to every token")
    prune_singletons: bool = _f(False, "drop n-grams seen once at orders >= 3 (backoff weights renormalised)")
    discount_fallback: bool = _f(False, "tiny text: KenLM's discounts 0.5 / 1 / 1.5 where count-of-counts give none")
    tokenizer: str = _f("data", "data: the prepared shards' token ids (documents end at <|endoftext|>) | "
                                "words: whitespace words of the source files, one sentence per line (KenLM style)")
    min_count: int = _f(1, "words only: rarer words become <unk>")
    max_vocab: int = _f(0, "words only: keep the most frequent words; 0 = all")

    def __post_init__(self) -> None:
        s = "ngram"
        _numbers_in_range(s, self)
        _choice(s, "smoothing", self.smoothing, ("kneser_ney", "mle", "add_k"))
        _choice(s, "tokenizer", self.tokenizer, ("data", "words"))
        if not 1 <= self.order <= 6:
            raise ConfigError(f"ngram.order={self.order} must be in 1..6")
        _positive(s, self, "k", "min_count")
        _positive(s, self, "max_vocab", allow_zero=True)


@dataclass
class FinetuneConfig:
    """Task fine-tuning (`choicelm finetune`): the task, its files, LoRA and adversarial training."""

    task: str = _f("", "classify (text -> label) | seq2seq (source -> target) | sft (chat/instruction replies)")
    init: str = _f("", "the checkpoint to start from (--from): a choicelm run or step folder (convert a Hugging "
                       "Face model folder first: choicelm convert from-hf HF_DIR OUT); empty = a fresh model from the "
                       "model section (needs finetune.tokenizer)")
    tokenizer: str = _f("", "tokenizer folder for a fresh model (finetune.init empty)")
    train_file: str = _f("", "training examples (--train): .csv/.jsonl (classify), .tsv/.jsonl (seq2seq), .jsonl (sft)")
    val_file: str = _f("", "held-out examples in the same format (--val): validation loss during training and the "
                           "task metrics at the end")
    text_column: str = _f("text", "classify: the column holding the text")
    label_column: str = _f("label", "classify: the column holding the label")
    source_column: str = _f("source", "seq2seq: the source column (JSONL/CSV)")
    target_column: str = _f("target", "seq2seq: the target column (JSONL/CSV)")
    max_length: int = _f(0, "tokens kept per input (classify text, seq2seq source, sft conversation); 0 = block size")
    max_target_length: int = _f(0, "seq2seq: target tokens kept (and generated at evaluation); 0 = block size - 1")
    epochs: float = _f(0.0, "train for this many passes over the training examples (sets train.max_steps); "
                            "0 = train.max_steps decides")
    chat_template: str = _f("", "sft: a Jinja chat template file; empty = choicelm's User:/Assistant: template with "
                                "the end-of-text token after each reply. Saved with the model for chat and serve")
    lora_r: int = _f(0, "LoRA rank; 0 = full fine-tuning (every weight trains)")
    lora_alpha: float = _f(16.0, "LoRA scale alpha (the update is alpha/r * B A)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch's input")
    lora_targets: str = _f("", "comma-separated Linear module names to adapt; empty = every attention and MLP "
                               "projection")
    adversarial: str = _f("none", "none | fgm | pgd: also train on input embeddings perturbed along the loss gradient")
    adv_epsilon: float = _f(0.1, "adversarial: L2 radius of each sequence's embedding perturbation; a few percent of "
                                 "0.02*sqrt(tokens*width) (0.1 suited the BBC demo, where 1.0 stopped learning)")
    adv_steps: int = _f(3, "pgd: ascent steps")
    adv_step_size: float = _f(0.0, "pgd: size of each ascent step; 0 = the adversarial module's default")

    def __post_init__(self) -> None:
        s = "finetune"
        _numbers_in_range(s, self)
        _choice(s, "task", self.task, ("", "classify", "seq2seq", "sft"))
        _choice(s, "adversarial", self.adversarial, ("none", "fgm", "pgd"))
        _positive(s, self, "max_length", "max_target_length", "epochs", "lora_r", "adv_step_size", allow_zero=True)
        _positive(s, self, "lora_alpha", "adv_epsilon", "adv_steps")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"finetune.lora_dropout={self.lora_dropout} must be in [0, 1)")


@dataclass
class DataConfig:
    """Where the token shards come from (written by `choicelm prepare`)."""

    path: str = _f("", "directory written by `choicelm prepare` (manifest.json + shards); --data sets it")

    def __post_init__(self) -> None:
        pass


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon for the hidden matrices) and the learning-rate schedule."""

    name: str = _f("adamw", "optimizer: adamw (every parameter) | muon (torch.optim.Muon for the 2-D weights of the "
                            "linear layers inside the transformer blocks: attention and dense MLP; AdamW for the rest: "
                            "embeddings, LM head, norms, biases, MoE routers and stacked 3-D experts, LoRA adapters)")
    lr: float = _f(6e-4, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = _f(0.1, "AdamW weight decay, applied to matrices only (not biases, norms)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = no clipping")
    schedule: str = _f("cosine", "learning-rate schedule: cosine | wsd (warmup-stable-decay) | constant")
    warmup_steps: int = _f(100, "linear warmup steps from 0 to the peak")
    decay_fraction: float = _f(0.2, "wsd only: the share of max_steps spent decaying at the end")
    muon_lr: float = _f(0.0, "muon: peak learning rate of the Muon matrices; 0 = optim.lr. Each matrix's step is "
                             "scaled by 0.2*sqrt(max(rows, cols)) (Moonshot's match_rms_adamw: the update has AdamW's "
                             "RMS), so an AdamW learning rate suits Muon too; Keller Jordan's lr 0.02 for a square "
                             "DxD matrix is muon_lr=0.1/sqrt(D). The schedule scales it with optim.lr, keeping "
                             "muon_lr/lr; weight decay: optim.weight_decay x Muon's lr, decoupled as in AdamW")
    muon_momentum: float = _f(0.95, "muon: Nesterov momentum of the Muon matrices")

    @property
    def muon_peak_lr(self) -> float:
        return self.muon_lr or self.lr

    def __post_init__(self) -> None:
        s = "optim"
        _numbers_in_range(s, self)
        _choice(s, "name", self.name, ("adamw", "muon"))
        _choice(s, "schedule", self.schedule, ("cosine", "wsd", "constant"))
        _positive(s, self, "lr", "eps")
        _positive(s, self, "muon_lr", allow_zero=True)
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"optim.muon_momentum={self.muon_momentum} must be in [0, 1)")
        _positive(s, self, "weight_decay", "grad_clip", "warmup_steps", allow_zero=True)
        for name in ("min_lr_ratio", "decay_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("beta1", "beta2"):  # a beta of 1 never forgets: AdamW refuses it
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")


@dataclass
class TrainConfig:
    """The training loop: batch, length, precision, evaluation, logging and checkpoints."""

    seed: int = _f(1337, "seed for model initialisation and data order")
    micro_batch_size: int = _f(8, "sequences per forward/backward on one process")
    global_batch_size: int = _f(0, "sequences per optimizer step over all processes; 0 = micro_batch_size x processes "
                                   "(a larger value uses gradient accumulation; must divide evenly)")
    max_steps: int = _f(1000, "stop after this many optimizer steps; also the length of the lr schedule")
    max_tokens: int = _f(0, "stop once this many training tokens were seen; 0 = no limit")
    max_time: float = _f(0.0, "stop after this many seconds of training; 0 = no limit")
    precision: str = _f("auto", "auto (bf16 autocast where the hardware supports it) | bf16 | fp32")
    compile: bool = _f(False, "torch.compile the model")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    eval_every: int = _f(200, "evaluate on the validation split every N steps (and at the end); 0 = never")
    eval_batches: int = _f(20, "micro-batches of validation windows per evaluation")
    log_every: int = _f(10, "write a metrics row every N steps")
    save_every: int = _f(500, "write a checkpoint every N steps (and at the end); 0 = only at the end")
    keep_last: int = _f(2, "keep the newest K checkpoints (plus the best by validation loss)")
    max_nonfinite: int = _f(5, "stop the run after this many non-finite losses in a row (each skips its step)")
    peak_flops: float = _f(0.0, "peak FLOP/s for MFU; 0 = measure a matmul once on this machine and cache it")
    progress: bool = _f(True, "show a progress bar")
    tune_allocator: bool = _f(True, "keep freed memory in the process (glibc) instead of unmapping the big logits "
                                    "buffers every step: faster, but resident memory can grow above the live size")

    def __post_init__(self) -> None:
        s = "train"
        _numbers_in_range(s, self)
        _choice(s, "precision", self.precision, ("auto", "bf16", "fp32"))
        _positive(s, self, "seed", allow_zero=True)  # numpy's generators take no negative seeds
        _positive(s, self, "micro_batch_size", "max_steps", "keep_last", "max_nonfinite", "log_every", "eval_batches")
        _positive(s, self, "global_batch_size", "max_tokens", "max_time", "eval_every", "save_every",
                  "peak_flops", allow_zero=True)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device={self.device!r} is not allowed; use auto, cpu, cuda or cuda:N")


@dataclass
class Config:
    """A whole run: model, data, optim, train, moe, ngram and finetune sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    ngram: NGramConfig = field(default_factory=NGramConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict | None, source: str = "config") -> "Config":
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            raise ConfigError(_unknown_message(source, sorted(map(str, unknown))[0], SECTIONS, "section"))
        parts = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section '{name}' must be a mapping of keys to values")
            valid = [f.name for f in fields(section_cls)]
            for key in values:
                if key not in valid:
                    raise ConfigError(_unknown_message(source, f"{name}.{key}", [f"{name}.{v}" for v in valid], "key"))
            parts[name] = section_cls(**{k: _coerce(section_cls, k, v, name) for k, v in values.items()})
        return cls(**parts)

    def save(self, path: str | Path) -> None:
        with naming(path):
            Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
                             "moe": MoEConfig, "ngram": NGramConfig, "finetune": FinetuneConfig}


def _unknown_message(source: str, key: str, valid, what: str) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{source}: unknown {what} '{key}'{hint}; valid {what}s: {', '.join(valid)}"


def _coerce(section_cls: type, key: str, value: Any, section: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or fail naming the key."""
    default = next(f for f in fields(section_cls) if f.name == key).default
    target = type(default)
    if isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    try:
        if target is bool:
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if isinstance(value, (bool, list, dict)):  # true is no number, and a list or mapping is no scalar
            raise ValueError
        if target is int:
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError
            return int(value) if isinstance(value, str) and value.strip().lstrip("+-").isdigit() else int(as_float)
        return target(value)
    except OverflowError:  # int(float("1e400")): an infinite count
        raise ConfigError(f"{section}.{key}={value!r} is out of range") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{section}.{key}={value!r} must be of type {target.__name__}") from None


def parse_overrides(args: list[str]) -> dict:
    """`["--train.max_steps=20", "--model.bias", "false"]` -> {"train": {"max_steps": "20"}, "model": {"bias": "false"}}."""
    out: dict[str, dict] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; config overrides look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):  # never take the next flag as the value
                raise ConfigError(f"override --{name} needs a value: --{name}=VALUE")
            value = args[i + 1]
            i += 1
        section, _, key = name.partition(".")
        out.setdefault(section, {})[key] = _parse_value(value)
        i += 1
    return out


def _parse_value(value: str) -> Any:
    """A command-line value read as YAML (20, 1e-3, true, .inf), or the text itself where it is not YAML."""
    if value == "":
        return ""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def merge(base: dict, extra: dict) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(merged.get(section), dict) and isinstance(values, dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/tiny.yaml")
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} at byte offset "
                              f"{e.start}); a config is a YAML file such as configs/tiny.yaml") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} holds a YAML {type(raw).__name__}, not a mapping of sections "
                              f"({', '.join(SECTIONS)}); see configs/tiny.yaml")
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        raw = merge(raw, extra)
    return Config.from_dict(raw, source)


def config_help() -> str:
    """Every key with its default and help text, for `--help`."""
    lines = []
    for name, section_cls in SECTIONS.items():
        lines.append(f"{name}: {section_cls.__doc__}")
        for f in fields(section_cls):
            lines.append(f"  --{name}.{f.name}={f.default!r}  {f.metadata.get('help', '')}")
    return "\n".join(lines)

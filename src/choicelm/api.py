"""`choicelm.load(path)`: a trained model with its tokenizer, ready to score and generate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .config import Config
from .errors import ChoicelmError
from .generation.sampling import generate_ids
from .models import build_model
from .tokenizer import Tokenizer
from .train import checkpoint as ckpt
from .train.runtime import pick_device


@dataclass
class LanguageModel:
    """What `load` returns: `.model` (forward(ids) -> output with .logits, .loss given targets),
    `.tokenizer`, `.config` (the run config), `.checkpoint` (the step directory loaded)."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    config: Config
    checkpoint: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_at_eos: bool = True) -> str:
        """Continue `prompt`; returns only the new text. temperature=0 is greedy decoding."""
        ids = generate_ids(self.model, self.tokenizer.encode(prompt), max_new_tokens, temperature, top_k, top_p,
                           seed, self.tokenizer.eot_id if stop_at_eos else None)
        if stop_at_eos and ids and ids[-1] == self.tokenizer.eot_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids)


def load(path: str | Path, device: str = "auto") -> LanguageModel:
    """Load a run directory (its newest complete checkpoint) or one step-XXXXXXXX directory."""
    step_dir = ckpt.resolve_checkpoint(path)
    config_file = step_dir / "config.yaml"
    if not config_file.is_file():
        raise ChoicelmError(f"{step_dir} has no config.yaml; it is not a choicelm checkpoint")
    cfg = Config.from_dict(yaml.safe_load(config_file.read_text()), str(config_file))
    model = build_model(cfg.model)
    ckpt.load_weights(model, step_dir)
    model.to(pick_device(device)).eval()
    tok_dir = step_dir / "tokenizer"
    if not tok_dir.is_dir():
        raise ChoicelmError(f"{step_dir} has no tokenizer/ folder; the checkpoint was written without its tokenizer")
    return LanguageModel(model, Tokenizer.load(tok_dir), cfg, step_dir)

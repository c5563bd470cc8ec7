"""What every route needs to know about the server: the model, its scheduler, its name and limits."""

import time
from dataclasses import dataclass, field
from pathlib import Path

from .openai import max_chars_per_token
from .scheduler import Scheduler

STATIC = Path(__file__).parent / "static"


@dataclass
class ServeContext:
    lm: object  # a choicelm.api.LanguageModel
    scheduler: Scheduler
    name: str  # the model id clients send
    api_key: str | None
    max_batch: int
    max_body_bytes: int
    body_timeout: float  # seconds for a request body to arrive
    static: Path = STATIC
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.block = self.lm.model.config.block_size
        self.chars_per_token = max_chars_per_token(self.lm.tokenizer)  # for the length check before tokenizing

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "choicelm",
                "max_model_len": self.block}

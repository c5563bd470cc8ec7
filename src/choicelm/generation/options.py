"""GenerationConfig: every decoding option in one validated dataclass (the CLI, the Python API and the
server all build one, so an option means the same everywhere and a bad one fails the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..core.errors import ChoicelmError
from .processors import build_processors
from .stopping import StopStrings


@dataclass
class GenerationConfig:
    """How to continue a prompt.

    max_new_tokens:       tokens to generate at most per sequence (EOS or a stop string may end it sooner).
    temperature:          0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
                          None = 1.0 when sampling; beam search does not sample, so leave it unset there.
    top_k:                sample only from the k most likely tokens (0 or None = off).
    top_p:                nucleus: sample from the smallest set of tokens whose probability reaches p, in (0, 1].
    min_p:                drop tokens less likely than min_p x the most likely token's probability, in [0, 1].
    repetition_penalty:   > 1 discourages tokens already in the prompt or the output (1 or None = off).
    no_repeat_ngram_size: never repeat an n-gram of this size (0 or None = off).
    num_beams:            > 1 = beam search (deterministic; sampling options are an error with it).
    length_penalty:       beam search: a finished beam's score is sum log p / (new tokens ** length_penalty);
                          > 0 favours longer outputs, < 0 shorter.
    early_stopping:       beam search: True stops once num_beams hypotheses are finished; False stops when no
                          running beam can beat them (Hugging Face's heuristic); "never" is the exact test.
    num_return_sequences: outputs per prompt: the best beams, or independent samples (not with greedy).
    seed:                 seeds the sampler: the same seed gives the same text (None = torch's global RNG).
    stop:                 strings that end the output; only the text before the earliest one is returned.
                          They may span token boundaries. (Beam search cuts its finished beams at them.)
    eos_token_id:         token id(s) that end a sequence (not part of the returned text); None = never.

    Beyond the block size: generation never slides the window. If prompt + max_new_tokens exceeds the
    model's block size it stops before starting, with an error saying by how much (the chat verb
    drops the oldest turns instead).
    """

    max_new_tokens: int = 100
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        _int("max_new_tokens", self.max_new_tokens, 0)
        _int("num_beams", self.num_beams, 1)
        _int("num_return_sequences", self.num_return_sequences, 1)
        if self.temperature is not None and not self.temperature >= 0:
            raise ChoicelmError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise ChoicelmError(f"top_k={self.top_k} must be an integer >= 0 (0 or None = off)")
        if self.no_repeat_ngram_size is not None:
            _int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if self.seed is not None:
            _int("seed", self.seed, 0)
        if self.early_stopping not in (True, False, "never"):
            raise ChoicelmError(f"early_stopping={self.early_stopping!r} must be True, False or 'never'")
        self.stop = StopStrings(self.stop).stops
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        # every processor validates its own value (top_p range, min_p range, penalty > 0 ...)
        build_processors(repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
                         temperature=self.temperature or None, top_k=self.top_k, top_p=self.top_p,
                         min_p=self.min_p, sampling=True)
        sampling_options = [name for name in ("top_k", "top_p", "min_p") if getattr(self, name)]
        if self.num_beams > 1:
            if self.temperature or sampling_options:
                given = sampling_options + (["temperature"] if self.temperature else [])
                raise ChoicelmError(f"beam search (num_beams={self.num_beams}) does not sample; drop "
                                    f"{', '.join(given)} or use num_beams=1")
            if self.num_return_sequences > self.num_beams:
                raise ChoicelmError(f"num_return_sequences={self.num_return_sequences} is more than num_beams="
                                    f"{self.num_beams}; beam search returns at most num_beams sequences")
        elif self.temperature == 0:
            if sampling_options:
                raise ChoicelmError(f"temperature=0 is greedy decoding, which ignores {', '.join(sampling_options)}; "
                                    f"drop them or use a temperature > 0")
            if self.num_return_sequences > 1:
                raise ChoicelmError("greedy decoding (temperature=0) gives one sequence; use num_beams > 1 or "
                                    "a temperature > 0 for several")

    @property
    def greedy(self) -> bool:
        return self.num_beams == 1 and self.temperature == 0

    @property
    def sampling(self) -> bool:
        return self.num_beams == 1 and self.temperature != 0

    def processors(self) -> list:
        return build_processors(repetition_penalty=self.repetition_penalty,
                                no_repeat_ngram_size=self.no_repeat_ngram_size,
                                temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                min_p=self.min_p, sampling=self.sampling)

    @classmethod
    def from_options(cls, **options) -> "GenerationConfig":
        """Like GenerationConfig(**options), but an unknown option is a ChoicelmError naming the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ChoicelmError(f"unknown generation option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
        return cls(**options)


def _int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ChoicelmError(f"{name}={value!r} must be an integer >= {low}")

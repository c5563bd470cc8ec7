"""GenerationConfig: every decoding option, declared once and validated in one place.

Each option is declared once in OPTIONS (name, type, default, range, help, and the OpenAI request field that
sets it); from that one declaration come

    GenerationConfig(...)          what lm.generate / lm.stream / the engine take; its checks are the only ones
    add_generation_arguments(p)    the CLI flags of `generate` and `chat` (cli.py)
    request_options(body)          the generation fields of an OpenAI request (serve/app.py), OpenAI's limits

so an option means the same everywhere and a bad value fails the same way: one line, an OptionError (a
ChoicelmError naming the option; the server answers 400 naming the request field). Floats must be finite;
a divisor (temperature, repetition_penalty) must also have a finite float32 reciprocal, so 1e-39 is refused.
This module imports no torch: the CLI builds its flags from it without loading a model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

from ..core.errors import ChoicelmError
from .stopping import StopStrings

FLOAT32_MAX = 3.4028234663852886e38  # logits are float32: a scale must keep them finite


class OptionError(ChoicelmError):
    """A generation option with a bad value. option: its name here; field: its OpenAI request field (or None);
    kind: "type" (not an int / a number ...) or "value" (out of range, or clashing with another option)."""

    def __init__(self, message: str, option: str, kind: str = "value"):
        super().__init__(message)
        self.option, self.kind = option, kind

    @property
    def field(self) -> str | None:
        opt = OPTIONS.get(self.option)
        return opt.api if opt is not None else None


@dataclass(frozen=True)
class Option:
    """One generation option. kind: int, float, bool, "stop", "eos", "early_stopping" (the last three have their
    own rule). Range: low/high, open at an end with low_open/high_open. off: values that mean "not set" (a sampling
    option at its off value does not clash with greedy decoding). divisor: 1/value must be a finite float32 too.
    flag: a CLI flag (--name-with-dashes). api: the OpenAI request field; api_high: OpenAI's tighter upper limit
    (for stop: how many strings)."""

    name: str
    kind: Any
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    off: tuple = (None,)
    divisor: bool = False
    note: str = ""
    flag: bool = True
    api: str | None = None
    api_high: float | None = None

    def is_set(self, value) -> bool:
        return value not in self.off

    def check(self, value, *, api: bool = False):
        """The value, checked and normalized (an int for an int option, a float for a float one); OptionError if
        it is not allowed. api=True applies OpenAI's limits too."""
        if value is None and self.default is None:
            return None
        if self.kind is int:
            return self._int(value, api)
        if self.kind is float:
            return self._float(value, api)
        if self.kind == "stop":
            try:
                stops = StopStrings(value).stops
            except ChoicelmError as e:
                raise OptionError(str(e), self.name) from None
            if api and self.api_high is not None and len(stops) > self.api_high:
                raise OptionError(f"{self.api} takes at most {_num(self.api_high)} strings, got {len(stops)}", self.name)
            return stops
        if self.kind == "eos":
            ids = [value] if not isinstance(value, (list, tuple)) else list(value)
            if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise OptionError(f"{self.name}={value!r} must be a token id or a list of token ids (integers >= 0)",
                                  self.name, "type")
            return [int(i) for i in ids]
        if self.kind == "early_stopping":
            if value is True or value is False or value == "never":
                return value
            raise OptionError(f"{self.name}={value!r} must be True, False or 'never'", self.name)
        raise AssertionError(self.kind)

    # -------------------------------------------------------------------------

    def _name(self, api: bool) -> str:
        return self.api if api and self.api else self.name

    def _range(self, high) -> str:
        low = self.low
        if low is not None and high is not None:
            return f"in {'(' if self.low_open else '['}{_num(low)}, {_num(high)}{')' if self.high_open else ']'}"
        if low is not None:
            return f"{'>' if self.low_open else '>='} {_num(low)}"
        return f"{'<' if self.high_open else '<='} {_num(high)}" if high is not None else "finite"

    def _fail(self, value, what: str, api: bool, kind: str = "value"):
        note = f" ({self.note})" if self.note else ""
        raise OptionError(f"{self._name(api)}={value!r} must be {what}{note}", self.name, kind)

    def _high(self, api: bool):
        return self.api_high if api and self.api_high is not None else self.high

    def _int(self, value, api: bool) -> int:
        high = self._high(api)
        what = "an integer " + self._range(high)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            self._fail(value, what, api, "type")
        value = int(value)
        if (self.low is not None and value < self.low) or (high is not None and value > high):
            self._fail(value, what, api)
        return value

    def _float(self, value, api: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            self._fail(value, "a number", api, "type")
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number):
            self._fail(value, "a finite number", api)
        high = self._high(api)
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            self._fail(value, self._range(high), api)
        if high is not None and (number > high or (self.high_open and number == high)):
            self._fail(value, self._range(high), api)
        if self.divisor and number != 0 and not (1 / FLOAT32_MAX <= abs(number) <= FLOAT32_MAX):
            raise OptionError(f"{self._name(api)}={value!r} is out of range: it divides float32 logits, so it and "
                              f"1/{self._name(api)} must be finite float32 numbers ({1 / FLOAT32_MAX:.3g} to "
                              f"{FLOAT32_MAX:.3g})", self.name)
        return number

    # ------------------------------------------------------------------------- the CLI

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add_argument(self, parser) -> None:
        """This option as an argparse flag (the value is checked later, by GenerationConfig)."""
        what = self.help + (f" [{self._range(self.high)}]" if self.kind in (int, float) and
                            (self.low is not None or self.high is not None) else "")
        if self.kind == "stop":
            parser.add_argument(self.flag_name, action="append", default=None, metavar="TEXT", help=what)
        else:
            parser.add_argument(self.flag_name, type=self.kind, default=self.default, help=what)


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# Every option, in the order of GenerationConfig's fields. The processors (processors.py) run in their own
# documented order.
OPTIONS: dict[str, Option] = {o.name: o for o in [
    Option("max_new_tokens", int, 100, "tokens to generate at most per sequence (EOS or a stop string may end it "
           "sooner)", low=0),
    Option("temperature", float, None, "0 = greedy (argmax); > 0 samples from softmax(logits / temperature); unset "
           "= 1 when sampling (beam search does not sample: leave it unset there)", low=0, divisor=True,
           note="0 = greedy", api="temperature", api_high=2),
    Option("top_k", int, None, "sample only from the k most likely tokens (0 or unset = off)", low=0, off=(None, 0),
           note="0 = off", api="top_k"),
    Option("top_p", float, None, "nucleus: sample from the smallest set of tokens whose probability reaches p "
           "(1 or unset = off)", low=0, high=1, low_open=True, off=(None, 1), note="1 = off", api="top_p"),
    Option("min_p", float, None, "drop tokens less likely than min_p x the most likely token's probability (0 or "
           "unset = off)", low=0, high=1, off=(None, 0), note="0 = off", api="min_p"),
    Option("repetition_penalty", float, None, "> 1 discourages tokens already in the prompt or the output: a "
           "positive logit is divided by it, a negative one multiplied (1 or unset = off)", low=0, low_open=True,
           divisor=True, off=(None, 1), note="1 = off, > 1 discourages repeats", api="repetition_penalty"),
    Option("presence_penalty", float, None, "OpenAI's: subtract this from the logit of every token the output "
           "already holds (> 0 favours new tokens; 0 or unset = off)", low=-2, high=2, off=(None, 0),
           api="presence_penalty"),
    Option("frequency_penalty", float, None, "OpenAI's: subtract this x the number of times a token occurs in the "
           "output from its logit (> 0 discourages repeats; 0 or unset = off)", low=-2, high=2, off=(None, 0),
           api="frequency_penalty"),
    Option("no_repeat_ngram_size", int, None, "never repeat an n-gram of this size from prompt + output (0 or "
           "unset = off)", low=0, off=(None, 0)),
    Option("num_beams", int, 1, "> 1 = beam search (deterministic; sampling options are an error with it)", low=1),
    Option("length_penalty", float, 1.0, "beam search: a finished beam scores sum log p / (new tokens ** "
           "length_penalty); > 0 favours longer outputs, < 0 shorter", low=-10, high=10),
    Option("early_stopping", "early_stopping", False, "beam search: True stops once num_beams hypotheses are "
           "finished; False when no running beam can beat them (Hugging Face's heuristic); 'never' is the exact "
           "test", off=(False,), flag=False),
    Option("num_return_sequences", int, 1, "outputs per prompt: the best beams, or independent samples (choice i "
           "draws with seed + i); not with greedy decoding", low=1, flag=False, api="n"),
    Option("seed", int, None, "seeds the sampler: the same seed gives the same text (unset = torch's global RNG)",
           low=0, high=2**64 - 1, api="seed"),
    Option("stop", "stop", None, "end the output before this text (repeatable); it may span token boundaries and "
           "is not returned", off=(None, ()), api="stop", api_high=4),
    Option("eos_token_id", "eos", None, "token id(s) that end a sequence (not part of the returned text); unset = "
           "never", flag=False),
]}

# `choicelm generate --num-samples`: a CLI flag, not an option of one generation (each sample is a generate call)
NUM_SAMPLES = Option("num_samples", int, 1, "samples to draw, one after the other (seeds seed, seed+1, ...)", low=1)


@dataclass
class GenerationConfig:
    """How to continue a prompt. Every field is declared, with its range and help, in OPTIONS above:

    max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty, presence_penalty,
    frequency_penalty, no_repeat_ngram_size, num_beams, length_penalty, early_stopping, num_return_sequences,
    seed, stop, eos_token_id.

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
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        for name, opt in OPTIONS.items():
            setattr(self, name, opt.check(getattr(self, name)))
        self.stop = self.stop or []
        sampling_options = [name for name in ("top_k", "top_p", "min_p") if OPTIONS[name].is_set(getattr(self, name))]
        if self.num_beams > 1:
            if self.temperature or sampling_options:
                given = sampling_options + (["temperature"] if self.temperature else [])
                raise OptionError(f"beam search (num_beams={self.num_beams}) does not sample; drop "
                                  f"{', '.join(given)} or use num_beams=1", given[0])
            if self.num_return_sequences > self.num_beams:
                raise OptionError(f"num_return_sequences={self.num_return_sequences} is more than num_beams="
                                  f"{self.num_beams}; beam search returns at most num_beams sequences",
                                  "num_return_sequences")
        elif self.temperature == 0:
            if sampling_options:
                raise OptionError(f"temperature=0 is greedy decoding, which ignores {', '.join(sampling_options)}; "
                                  f"drop them or use a temperature > 0", sampling_options[0])
            if self.num_return_sequences > 1:
                raise OptionError("greedy decoding (temperature=0) gives one sequence; ask for one, or use a "
                                  "temperature > 0 (or num_beams > 1) for several", "num_return_sequences")

    @property
    def greedy(self) -> bool:
        return self.num_beams == 1 and self.temperature == 0

    @property
    def sampling(self) -> bool:
        return self.num_beams == 1 and self.temperature != 0

    @classmethod
    def from_options(cls, **options) -> "GenerationConfig":
        """Like GenerationConfig(**options), but an unknown option is a ChoicelmError naming the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ChoicelmError(f"unknown generation option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
        return cls(**options)


# ----------------------------------------------------------------------------- the CLI and the server


def add_generation_arguments(parser) -> None:
    """The CLI flags of every option that has one (--max-new-tokens, --temperature, ...)."""
    for opt in OPTIONS.values():
        if opt.flag:
            opt.add_argument(parser)


def generation_arguments(args) -> dict:
    """The options given by add_generation_arguments' flags, for GenerationConfig / lm.generate."""
    options = {opt.name: getattr(args, opt.name) for opt in OPTIONS.values() if opt.flag}
    options["stop"] = options["stop"] or []
    return options


def request_options(body: dict) -> dict:
    """The generation options an OpenAI request body sets (fields named as OpenAI names them, absent or null =
    not set), each checked with OpenAI's limits: {option name: value}. OptionError.field names the bad field."""
    return {opt.name: opt.check(body[opt.api], api=True) for opt in OPTIONS.values()
            if opt.api is not None and body.get(opt.api) is not None}


def request_fields() -> set[str]:
    """The OpenAI request fields that set generation options."""
    return {opt.api for opt in OPTIONS.values() if opt.api is not None}

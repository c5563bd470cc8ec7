"""OpenAI's request bodies, checked: the JSON itself, then every field, by hand, so that each refusal names its
field in OpenAI's error shape. A field we do not implement is refused with a 400 unless it is absent, null, or
set to its "off" value (best_of 1, suffix "", ...): nothing is silently ignored, and temperature=0 is greedy.

The request fields are all declared here (COMMON ... OFF_VALUES, Options); `Options.generation_config` is where a
request becomes generation options.
"""

import json
import re

from ..generation.config import GenerationConfig, OptionError, request_fields, request_options
from .errors import APIError

# fields both endpoints take: the generation options' (declared in generation/config.py) and these
COMMON = ("model", "max_tokens", "stream", "stream_options", "user", *sorted(request_fields()))
COMPLETION_FIELDS = set(COMMON) | {"prompt", "echo", "logprobs", "best_of", "suffix"}
CHAT_FIELDS = set(COMMON) | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}
# fields we accept only at their "off" value
OFF_VALUES = {"best_of": (None, 1), "suffix": (None, ""),
              "response_format": (None, {"type": "text"})}

MAX_DEPTH = 32  # an OpenAI body nests 4 deep (messages[i].content[j].text); anything far deeper is an attack
_SURROGATE = re.compile("[\ud800-\udfff]")


# ----------------------------------------------------------------------------- the body


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object whose text is valid Unicode, or a 400 that says what is wrong."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"the request body nests too deeply; at most {MAX_DEPTH} levels are accepted", None,
                       "invalid_json") from None
    except ValueError as e:  # bad JSON, bad UTF-8, or an integer of more than 4,300 digits
        raise APIError(400, f"the request body is not valid JSON ({str(e)[:200]}); send a JSON object", None,
                       "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    _check_tree(body)
    return body


def _check_tree(body: dict) -> None:
    """No nesting beyond MAX_DEPTH and no lone surrogate (a \\ud800 escape: not Unicode, and nothing downstream
    can encode it) in any key or string. Iterative: a deep body cannot exhaust the stack here."""
    stack = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"the request body nests too deeply at {path}; at most {MAX_DEPTH} levels are "
                                "accepted", path.split("[")[0].split(".")[0] or None, "invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if _SURROGATE.search(key):
                    _surrogate(path or None, key)
                stack.append((item, where, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str) and _SURROGATE.search(value):
            _surrogate(path, value)


def _surrogate(path: str | None, text: str):
    found = _SURROGATE.search(text)
    shown = f"\\u{ord(found.group()):04x}"
    where = f"{path}" if path else "a field name"
    raise APIError(400, f"{where} contains a lone surrogate ({shown} at character {found.start()}), which is not "
                        "valid Unicode; send UTF-8 text", path, "invalid_value")


def _show(value) -> str:
    """A value for an error message, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------- fields


def _integer(body: dict, name: str, low: int, high: int | None, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, got {_show(value)}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        limit = f"at least {low}" if high is None else f"between {low} and {high}"
        raise APIError(400, f"{name}={_show(value)} is out of range; it must be {limit}", name, "invalid_value")
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {_show(value)}", name, "invalid_type")
    return value


def refuse_unsupported(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name not in allowed:
            if value is None:
                continue
            raise APIError(400, f"{name[:100]} is not supported by this server (choicelm); remove it from the request",
                           name, "unsupported_parameter")
        if name in OFF_VALUES and value not in OFF_VALUES[name]:
            raise APIError(400, f"{name}={_show(value)} is not supported by this server (choicelm); leave it "
                                f"unset (only {json.dumps(OFF_VALUES[name][1])} is accepted)", name,
                           "unsupported_parameter")


class Options:
    """The generation part of a request, checked by the generation config (the one validator; OpenAI's limits):
    becomes a GenerationConfig per prompt."""

    def __init__(self, body: dict, max_batch: int):
        try:
            self.options = request_options(body)
            GenerationConfig(**self.options)  # options that clash (greedy with top_p, or with n > 1)
        except OptionError as e:
            raise APIError(400, str(e), e.field, "invalid_type" if e.kind == "type" else "invalid_value") from None
        self.n = self.options.get("num_return_sequences", 1)
        if self.n > max_batch:
            raise APIError(400, f"n={self.n} is out of range; it must be between 1 and {max_batch} (the server's "
                                "--max-batch)", "n", "invalid_value")
        self.stop = self.options.get("stop", [])
        self.stream = _bool(body, "stream")
        so = body.get("stream_options")
        if so is not None and (not isinstance(so, dict) or set(so) - {"include_usage"}):
            raise APIError(400, "stream_options supports only {\"include_usage\": true|false}", "stream_options",
                           "unsupported_parameter")
        if so is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options", "invalid_value")
        self.include_usage = _bool(so or {}, "include_usage")

    def generation_config(self, lm, max_tokens: int, stop: list[str]):
        return lm.generation_config(**{**self.options, "max_new_tokens": max_tokens, "stop": stop})


def check_model(model_id, name: str) -> None:
    if model_id is None:
        raise APIError(400, "model is required; this server serves " + repr(name), "model",
                       "missing_required_parameter")
    if not isinstance(model_id, str):
        raise APIError(400, "model must be a string", "model", "invalid_type")
    if model_id != name:
        raise APIError(404, f"the model {model_id[:100]!r} does not exist; this server serves {name!r}", "model",
                       "model_not_found")


def completion_logprobs(body: dict, stream: bool, echo: bool) -> int | None:
    logprobs = _integer(body, "logprobs", 0, 5, None)
    if logprobs is not None and (stream or echo):
        raise APIError(400, f"logprobs with {'stream' if stream else 'echo'}=true is not supported by this "
                            "server (choicelm); drop one of them", "logprobs", "unsupported_parameter")
    return logprobs


def chat_logprobs(body: dict, stream: bool) -> int | None:
    want_logprobs = _bool(body, "logprobs")
    top_logprobs = _integer(body, "top_logprobs", 0, 20, None)
    if top_logprobs is not None and not want_logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
    if want_logprobs and stream:
        raise APIError(400, "logprobs with stream=true is not supported by this server (choicelm); drop one of "
                            "them", "logprobs", "unsupported_parameter")
    return (top_logprobs or 0) if want_logprobs else None


def echo(body: dict) -> bool:
    return _bool(body, "echo")


# ----------------------------------------------------------------------------- prompts and messages


def prompt_items(body: dict, vocab_size: int, block: int) -> list[str | list[int]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of such lists; token ids are checked
    here, strings are tokenized later (off the event loop, after `check_length`)."""
    prompt = body.get("prompt")
    bad = APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                        "token ids", "prompt", "invalid_type")
    if prompt is None:
        raise APIError(400, "prompt is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bad
    for item in items:
        if isinstance(item, str):
            continue
        if not isinstance(item, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            raise bad
        if len(item) > block:  # cheap, before checking each id
            raise too_long("prompt", f"{len(item):,} tokens", block)
        if any(not 0 <= t < vocab_size for t in item):
            raise APIError(400, f"prompt token ids must be in 0..{vocab_size - 1}", "prompt", "invalid_value")
    return items


def too_long(param: str, size: str, block: int) -> APIError:
    return APIError(400, f"This model's maximum context length is {block} tokens. However, the {param} alone is "
                         f"{size}, which cannot fit. Please shorten the {param}.", param, "context_length_exceeded")


def check_length(chars: int, param: str, block: int, chars_per_token: int | None) -> None:
    """Refuse text that cannot fit the context, before tokenizing it: no token spells more than chars_per_token
    characters, so a text longer than block x chars_per_token characters has more than `block` tokens. (None: the
    tokenizer normalizes text, so no such bound holds; the body limit is then the only cap.)"""
    if chars_per_token is not None and chars > block * chars_per_token:
        raise too_long(param, f"{chars:,} characters (at least {-(-chars // chars_per_token):,} tokens)", block)


def prompt_ids(tokenizer, items: list[str | list[int]]) -> list[list[int]]:
    """Token ids of each prompt; an empty prompt starts a new document, as GPT-2 does. (Slow for long text: run it
    off the event loop.)"""
    return [(tokenizer.encode(item) if isinstance(item, str) else list(item)) or [tokenizer.eot_id] for item in items]


def max_chars_per_token(tokenizer) -> int | None:
    """A bound on the characters one token spells (its UTF-8 bytes, special tokens as their text): text of C
    characters has at least C / this many tokens. None when the tokenizer has a normalizer (which may shrink text,
    e.g. by dropping accents) or cannot say, so no such bound holds."""
    if getattr(getattr(tokenizer, "hf", None), "normalizer", None) is not None:
        return None
    lengths = getattr(tokenizer, "token_byte_lengths", None)
    return max(int(lengths().max()), 1) if lengths is not None else None


def chat_messages(messages) -> list[dict]:
    """OpenAI messages checked and reduced to {role, content} text messages for the model's chat template
    (text/chat_template.py): system (and developer) messages joined into one, first."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages", "invalid_type")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role and a content", f"messages[{i}]",
                           "invalid_type")
        extra = sorted(k for k, v in m.items() if k not in ("role", "content", "name") and v is not None)
        if extra:
            raise APIError(400, f"messages[{i}].{extra[0][:100]} is not supported by this server (choicelm)",
                           f"messages[{i}].{extra[0]}", "unsupported_parameter")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content parts must all be {{\"type\": \"text\", \"text\": ...}}; "
                                    "this model reads text only", f"messages[{i}].content", "unsupported_parameter")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_type")
        role = m["role"]
        if role in ("system", "developer"):
            system.append(content)
        elif role in ("user", "assistant"):
            turns.append({"role": role, "content": content})
        else:
            raise APIError(400, f"messages[{i}].role={role[:100]!r} is not supported; use system, user or assistant",
                           f"messages[{i}].role", "invalid_value")
    if messages[-1].get("role") != "user":
        raise APIError(400, "the last message must come from the user", "messages", "invalid_value")
    return ([{"role": "system", "content": "\n".join(system)}] if system else []) + turns


def max_tokens_for(body: dict, prompt_len: int, block: int, default: int | None, names: tuple[str, ...]) -> int:
    given = [(n, _integer(body, n, 1, None, None)) for n in names]
    given = [(n, v) for n, v in given if v is not None]
    param, value = given[0] if given else (names[0], default if default is not None else block - prompt_len)
    if prompt_len + value > block:
        raise APIError(400, f"This model's maximum context length is {block} tokens. However, you requested "
                            f"{prompt_len + value} tokens ({prompt_len} in the prompt, {value} for the "
                            f"completion). Please reduce the prompt or {param}.", param,
                       "context_length_exceeded")
    if value < 1:
        raise APIError(400, f"the prompt ({prompt_len} tokens) fills the model's context of {block} tokens; "
                            "shorten it", "messages" if "max_completion_tokens" in names else "prompt",
                       "context_length_exceeded")
    return value

"""Chat templates: messages rendered to a prompt as transformers renders them, and to token ids in which only the
template writes special tokens.

A chat template is a Jinja string over `messages` ([{"role": "system" | "user" | "assistant",
"content": ...}]), `add_generation_prompt`, `bos_token` and `eos_token`: the format Hugging Face
uses, rendered the way transformers' `apply_chat_template` renders it, so an exported model keeps
its template. A model carries its own in its tokenizer folder (`tokenizer_config.json`,
"chat_template"): `choicelm finetune --task sft` saves the one it trained with. A model without one
(pretrained only) is prompted with PLAIN_TEMPLATE, text any model of dialogue-like prose can follow:

    {system}\\n\\n                       (only when a system message is given)
    User: {message}\\n
    Assistant: {reply}\\n
    User: {message}\\n
    Assistant:

SFT_TEMPLATE is the same layout with the end-of-text token after each reply, so a fine-tuned model
learns to stop. A reply is generated after the final "Assistant:" and ends at EOS, max_new_tokens or
the stop string "\\nUser:" (the model starting the user's next line); whitespace is stripped.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ..core.errors import ChoicelmError

TURN_STOP = "\nUser:"

_TURNS = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + END + '\\n' }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role'] + '; use system, user or assistant') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
PLAIN_TEMPLATE = _TURNS.replace(" + END", "")
SFT_TEMPLATE = _TURNS.replace("END", "eos_token")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChoicelmError(f"chat template: {message}")

    # transformers' settings, so both render a template to the same text
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChoicelmError(f"the chat template is not valid Jinja ({e}); fix it or use the default") from None


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
                bos_token: str = "", eos_token: str = "") -> str:
    """The text of `messages` under `template` (what transformers' apply_chat_template(tokenize=False) gives)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChoicelmError(f"messages[{i}] must be a {{'role': str, 'content': str}} mapping; got {m!r:.80}")
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=bos_token, eos_token=eos_token)


def template_of(tokenizer) -> str:
    """The model's own chat template, or PLAIN_TEMPLATE for a model trained without one."""
    return getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt that asks the model for the next assistant reply after `messages`."""
    special = tokenizer.special_tokens
    return render_chat(template_of(tokenizer), messages, add_generation_prompt=True,
                       bos_token=special.get("bos", ""), eos_token=special["eos"])


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of chat_prompt(tokenizer, messages), where only the template writes special tokens: the text of a
    special token typed in a message (`<|endoftext|>`) is encoded as plain text, so a user cannot end a turn or
    inject one. Each special token in the messages is masked while the template renders, the rendered text is cut
    at the special tokens the template wrote (as the tokenizer itself cuts text at them), and the pieces between
    are encoded with special tokens as text."""
    specials = tokenizer.special_token_ids()
    if not specials:
        return tokenizer.encode(chat_prompt(tokenizer, messages))
    names = sorted(specials, key=len, reverse=True)
    find = re.compile("|".join(re.escape(s) for s in names))
    texts = [m["content"] for m in messages if isinstance(m.get("content"), str)] + [template_of(tokenizer)]
    mark = next(chr(c) for c in range(0xE000, 0xF900) if not any(chr(c) in t for t in texts))  # private use
    masked = [{**m, "content": find.sub(lambda s: f"{mark}{names.index(s.group())}{mark}", m["content"])}
              if isinstance(m.get("content"), str) else m for m in messages]
    unmask = re.compile(f"{mark}(\\d+){mark}")
    ids: list[int] = []
    pos = 0
    rendered = chat_prompt(tokenizer, masked)
    for special in find.finditer(rendered):
        ids += _text_ids(tokenizer, unmask, names, rendered[pos:special.start()])
        ids.append(specials[special.group()])
        pos = special.end()
    return ids + _text_ids(tokenizer, unmask, names, rendered[pos:])


def _text_ids(tokenizer, unmask, names: list[str], text: str) -> list[int]:
    text = unmask.sub(lambda m: names[int(m.group(1))], text)
    return tokenizer.encode(text, allow_special=False) if text else []


def history_messages(history: list[tuple[str, str]], message: str, system: str | None = None) -> list[dict]:
    """(user, assistant) turns and a new user message as a messages list."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, reply in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": message}]


def format_chat(history: list[tuple[str, str]], message: str, system: str | None = None,
                template: str = PLAIN_TEMPLATE) -> str:
    """The prompt for `message` after the (user, assistant) turns in `history`, under `template`."""
    return render_chat(template, history_messages(history, message, system), add_generation_prompt=True)

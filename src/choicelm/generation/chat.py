"""A terminal-chat session over a plain language model: history, a simple chat template, and a
history that is cropped (oldest turns first) to fit the block size.

The template (plain text, so any model trained on dialogue-like text can follow it):

    {system}\\n\\n                       (only when a system prompt is given)
    User: {message}\\n
    Assistant: {reply}\\n
    User: {message}\\n
    Assistant:

The reply is generated after the final "Assistant:" and ends at EOS, max_new_tokens or the stop
string "\\nUser:" (the model starting the user's next line); surrounding whitespace is stripped.
"""

from __future__ import annotations

from typing import Iterator

from ..errors import ChoicelmError

USER, ASSISTANT, TURN_STOP = "User:", "Assistant:", "\nUser:"


def format_chat(history: list[tuple[str, str]], message: str, system: str | None = None) -> str:
    """The prompt for `message` after the (user, assistant) turns in `history`."""
    parts = [f"{system}\n\n"] if system else []
    for user, reply in history:
        parts.append(f"{USER} {user}\n{ASSISTANT} {reply}\n")
    parts.append(f"{USER} {message}\n{ASSISTANT}")
    return "".join(parts)


class ChatSession:
    """lm: a choicelm.api.LanguageModel. reply(message) streams the answer and records the turn."""

    def __init__(self, lm, system: str | None = None, **options):
        self.lm, self.system, self.options = lm, system, dict(options)
        self.options.setdefault("max_new_tokens", 100)
        self.options["stop"] = list(self.options.get("stop") or []) + [TURN_STOP]
        self.history: list[tuple[str, str]] = []

    def reset(self) -> None:
        self.history.clear()

    def prompt_for(self, message: str) -> str:
        """The templated prompt, dropping the oldest turns until prompt + max_new_tokens fits the block size."""
        room = self.lm.model.config.block_size - self.options["max_new_tokens"]
        history = list(self.history)
        while True:
            prompt = format_chat(history, message, self.system)
            if len(self.lm.tokenizer.encode(prompt)) <= room:
                return prompt
            if not history:
                raise ChoicelmError(f"the message is too long for the model's block size "
                                    f"({self.lm.model.config.block_size} tokens, {self.options['max_new_tokens']} "
                                    f"kept for the reply); shorten it or lower --max-new-tokens")
            history.pop(0)

    def reply(self, message: str) -> Iterator[str]:
        """Yield the reply's text deltas; the whole (stripped) reply joins the history at the end."""
        pieces: list[str] = []
        for delta in self.lm.stream(self.prompt_for(message), **self.options):
            if not pieces:
                delta = delta.lstrip()  # the template leaves the space after "Assistant:" to the model
            if delta:
                pieces.append(delta)
                yield delta
        self.history.append((message, "".join(pieces).strip()))

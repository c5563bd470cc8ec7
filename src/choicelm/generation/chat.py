"""A terminal-chat session: history, the model's chat template (text/chat_template.py), and a history cropped
(oldest turns first) to fit the block size."""

from __future__ import annotations

from typing import Iterator

from ..core.errors import ChoicelmError
from ..text.chat_template import TURN_STOP, chat_prompt, chat_prompt_ids, history_messages


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
        return chat_prompt(self.lm.tokenizer, self._messages_for(message))

    def prompt_ids_for(self, message: str) -> list[int]:
        """prompt_for's token ids, special tokens written only by the template (typed ones stay text)."""
        return chat_prompt_ids(self.lm.tokenizer, self._messages_for(message))

    def _messages_for(self, message: str) -> list[dict]:
        room = self.lm.model.config.block_size - self.options["max_new_tokens"]
        history = list(self.history)
        while True:
            messages = history_messages(history, message, self.system)
            if len(chat_prompt_ids(self.lm.tokenizer, messages)) <= room:
                return messages
            if not history:
                raise ChoicelmError(f"the message is too long for the model's block size "
                                    f"({self.lm.model.config.block_size} tokens, {self.options['max_new_tokens']} "
                                    f"kept for the reply); shorten it or lower --max-new-tokens")
            history.pop(0)

    def reply(self, message: str) -> Iterator[str]:
        """Yield the reply's text deltas; the whole (stripped) reply joins the history at the end."""
        pieces: list[str] = []
        for delta in self.lm.stream(self.prompt_ids_for(message), **self.options):
            if not pieces:
                delta = delta.lstrip()  # the template leaves the space after "Assistant:" to the model
            if delta:
                pieces.append(delta)
                yield delta
        self.history.append((message, "".join(pieces).strip()))

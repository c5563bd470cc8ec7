"""Stop conditions on the text: stop strings that may span token boundaries.

EOS and max_new_tokens are plain token checks in the decoding loop (generate.py); stop strings need
the text, because a stop string like "\\n\\n" or "END" is often split across two or more tokens, and
one token may hold a stop string in its middle. So each row's decoded text is searched, and only
the text before the earliest stop string is kept (the stop string itself is dropped, like the
OpenAI API and Hugging Face's `stop_strings` + post-processing do).
"""

from __future__ import annotations

from ..core.errors import ChoicelmError


class StopStrings:
    """Finds the earliest of several stop strings in a growing text."""

    def __init__(self, stops):
        if isinstance(stops, str):
            stops = [stops]
        if stops is not None and not isinstance(stops, (list, tuple)):
            raise ChoicelmError(f"stop={stops!r} is not allowed; give a string or a list of non-empty strings")
        stops = list(stops or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ChoicelmError(f"stop string {s!r} is not allowed; give non-empty strings")
        self.stops = stops
        self.max_len = max((len(s) for s in stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, start: int = 0) -> int:
        """Index in `text` where the earliest stop string begins, searching matches that end after
        `start` (the text before `start` was already searched); -1 if there is none."""
        lo = max(0, start - self.max_len + 1)
        hits = [i for i in (text.find(s, lo) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` could still become the start of a stop string:
        a stream must not emit them yet, in case the next tokens complete the stop string."""
        for n in range(min(len(text), self.max_len - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

"""Text of a sequence while it is generated: stop strings matched incrementally, and the
streamed text deltas. Pure but for the tokenizer's `decode` passed in.

Decoding the whole completion at every step to look for stop strings cost O(length) per
token per sequence on the engine thread (20,000 stop strings x n = 8 took 13.9 s for 64
tokens). A stop string ending at the newest token lies within the last few tokens' text, so
only a window of tokens as long (in characters) as the longest stop string is decoded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
_SLACK = 4  # tokens beyond the window: a token may decode to nothing on its own (a partial UTF-8 byte)


def stop_window(stops: Sequence[str]) -> int:
    """Tokens to decode to see any stop string ending at the newest token (a token is >= 1 char)."""
    return max((len(s) for s in stops), default=0) + _SLACK


def find_stop(decode: Decode, ids: Sequence[int], stops: Sequence[str], window: int) -> tuple[str, int] | None:
    """(stop string, where the full text is cut) if a stop string ends in the newest token's text.

    The window's text finds it; the cut is taken on the full text, decoded once, on a hit.
    Stop strings seen earlier would already have ended the sequence, so the first occurrence
    in the full text is the one that just completed.

    >>> dec = lambda ids: "".join(chr(96 + i) for i in ids)  # 1 -> 'a', 2 -> 'b', ...
    >>> find_stop(dec, [1, 2, 3, 4], ["cd"], 6)
    ('cd', 2)
    >>> find_stop(dec, [1, 2, 3], ["cd"], 6) is None
    True
    """
    tail = decode(ids[-window:])
    hits = [s for s in stops if s in tail]
    if not hits:
        return None
    text = decode(ids)
    found = [(text.find(s), s) for s in hits if text.find(s) >= 0]
    if not found:  # the window decoded differently at its left edge than the full text: no stop
        return None
    cut, stop = min(found)
    return stop, cut


class Detokenizer:
    """Streamed text: each `push(token)` returns the new characters that are final.

    Decodes only from the last emitted boundary (vLLM/TGI's prefix/read offsets), and holds
    back a trailing U+FFFD (half of a multi-byte character) and, with stop strings, the last
    `holdback` characters, which may yet turn out to begin a stop string that is cut.
    """

    def __init__(self, decode: Decode, holdback: int = 0):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already counted in `text`
        self.read = 0
        self.text = ""  # all final text so far
        self.sent = 0  # characters of `text` already returned
        self.holdback = holdback

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        now = self.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(len(self.text) - self.holdback)

    def finish(self, final_text: str, token: int | None = None) -> str:
        """The rest of `final_text` (the engine's text, stop string cut) not yet returned; `token`
        is the last one, if not pushed (pushing it could release text the stop cut off)."""
        if token is not None:
            self.ids.append(token)
        self.text = final_text
        return self._release(len(final_text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent : upto]
        self.sent = upto
        return out

"""Tokenization for the services: a tokenizer per thread, content as text, huge texts cut first.

Three rules, each from an adversarial probe of the services:

* **No shared tokenizer, no global lock.** A fast tokenizer must not have a setting changed
  while another thread encodes with it (`split_special_tokens` flips one per call), and one
  lock made a small request wait 21 s behind a 15 MB one. Each thread gets its own copy.
* **Content is text.** In structured input (chat messages, /v1/score items) a user's or a
  policy's ``"<|im_end|>"`` must not become the real end-of-turn token: a policy could learn
  to forge turns. Input comes as pieces ``(text, is_content)``; only the template's pieces
  yield special tokens. When no content holds a special-token string (the normal case) the
  joined text is tokenized in one call, exactly as in training.
* **Cut before tokenizing.** Only the last (or first) `need` tokens of a text survive
  truncation, and a token spans at most `max_chars_per_token` characters in vocabularies
  that keep every character, so a window of that many characters per needed token (plus a
  margin for the token cut in half at the edge) is tokenized instead of the whole text. The
  window is verified to give enough tokens and doubled if not (tokenizers that drop
  whitespace or map long words to one [UNK]), so the result equals tokenizing everything.
"""

from __future__ import annotations

import copy
import re
import threading
from typing import Literal, Sequence

Piece = tuple[str, bool]  # (text, is_content): content is the user's text, the rest is template
Keep = Literal["start", "end"]

MARGIN_TOKENS = 16  # tokens at the cut edge that may differ from a full tokenization: dropped
MAX_CHARS_PER_TOKEN_CAP = 256  # a vocabulary's odd very long entry must not widen every window


def cut_pieces(pieces: Sequence[Piece], chars: int, keep: Keep) -> list[Piece]:
    """The first (keep='start') or last (keep='end') `chars` characters of the joined pieces,
    each kept character still in its own piece (pure).

    >>> cut_pieces([("ab", False), ("cdef", True)], 3, "end")
    [('def', True)]
    >>> cut_pieces([("ab", False), ("cdef", True)], 3, "start")
    [('ab', False), ('c', True)]
    """
    out: list[Piece] = []
    left = chars
    ordered = pieces if keep == "start" else reversed(pieces)
    for text, is_content in ordered:
        if left <= 0:
            break
        part = text[:left] if keep == "start" else text[max(len(text) - left, 0) :]
        if part:
            out.append((part, is_content))
        left -= len(part)
    return out if keep == "start" else out[::-1]


def window_chars(need_tokens: int, max_chars_per_token: int, margin: int = MARGIN_TOKENS) -> int:
    """Characters that hold at least `need_tokens + margin` tokens when no character is dropped."""
    return (need_tokens + margin) * max_chars_per_token


class ThreadTokenizer:
    """One tokenizer, used from many threads: every thread encodes with its own copy."""

    def __init__(self, tokenizer):
        self.prototype = tokenizer
        self._local = threading.local()
        self._copy_lock = threading.Lock()
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False):
                specials.add(str(added))
        self.specials = frozenset(s for s in specials if s)
        self._special_re = (
            re.compile("|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True)))
            if self.specials else None
        )
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_chars_per_token = max(1, min(longest, MAX_CHARS_PER_TOKEN_CAP))

    def tokenizer(self):
        tok = getattr(self._local, "tok", None)
        if tok is None:
            with self._copy_lock:  # copying reads the prototype; one copy at a time
                tok = copy.deepcopy(self.prototype)
            self._local.tok = tok
        return tok

    def has_special(self, text: str) -> bool:
        return self._special_re is not None and self._special_re.search(text) is not None

    # ------------------------------------------------------------------ encoding

    def ids(self, texts: list[str], *, split_special: bool = False) -> list[list[int]]:
        """Plain batch encoding, no BOS/EOS added; specials parsed unless `split_special`."""
        if not texts:
            return []
        enc = self.tokenizer()(texts, add_special_tokens=False, split_special_tokens=split_special)
        return enc["input_ids"]

    def encode_pieces(self, pieces: Sequence[Piece]) -> list[int]:
        """Template pieces may hold special tokens; content pieces are tokenized as text."""
        if not any(is_content and self.has_special(text) for text, is_content in pieces):
            return self.ids(["".join(text for text, _ in pieces)])[0]
        # Runs of text between the template's own markers, each tokenized with specials
        # split, so the markers written by a user stay plain text.
        tok = self.tokenizer()
        out: list[int] = []
        run: list[str] = []

        def flush() -> None:
            if run:
                out.extend(self.ids(["".join(run)], split_special=True)[0])
                run.clear()

        for text, is_content in pieces:
            if is_content or self._special_re is None:
                run.append(text)
                continue
            at = 0
            for m in self._special_re.finditer(text):
                run.append(text[at : m.start()])
                flush()
                out.append(tok.convert_tokens_to_ids(m.group(0)))
                at = m.end()
            run.append(text[at:])
        flush()
        return out

    def encode_kept(self, items: Sequence[Sequence[Piece]], keep: Keep, need: int) -> list[list[int]]:
        """Token ids of each item, of which at least the `need` tokens at its `keep` end equal a
        full tokenization's (so truncation to `need` from that end gives the same ids).

        Short, benign items are encoded in one batch call; long or forged ones one by one.
        """
        out: list[list[int] | None] = [None] * len(items)
        window = window_chars(need, self.max_chars_per_token)
        batch: list[int] = []
        for i, pieces in enumerate(items):
            total = sum(len(t) for t, _ in pieces)
            if total <= window and not any(c and self.has_special(t) for t, c in pieces):
                batch.append(i)
            else:
                out[i] = self._encode_cut(pieces, keep, need, window, total)
        for i, ids in zip(batch, self.ids(["".join(t for t, _ in items[i]) for i in batch])):
            out[i] = ids
        return out  # type: ignore[return-value]

    def _encode_cut(self, pieces: Sequence[Piece], keep: Keep, need: int, window: int, total: int) -> list[int]:
        while window < total:
            ids = self.encode_pieces(cut_pieces(pieces, window, keep))
            if len(ids) >= need + MARGIN_TOKENS:
                # The edge tokens may be a cut token's halves: drop them, keep the rest.
                return ids[MARGIN_TOKENS:] if keep == "end" else ids[:-MARGIN_TOKENS]
            window *= 2  # fewer tokens than characters allowed for: widen and verify again
        return self.encode_pieces(pieces)

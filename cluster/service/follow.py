"""``tilerun result ID --follow``: a task's text as it is generated, from the store's snapshots.

The engine writes the tokens a running task has generated so far (its current attempt) to the
store twice a second (``TaskStore.partial``); the final output replaces them when it ends. A
``Follower`` turns that series of snapshots into new pieces of text:

* it decodes the whole token list each time and emits what lies past the text already emitted,
  holding back a trailing U+FFFD (a character whose bytes are split across tokens) until the
  task ends;
* when a worker or the engine dies the task runs again from its prompt (a new attempt) and its
  snapshot starts empty. While the new attempt's tokens repeat the ones already shown (greedy
  decoding, or a seeded sampler, gives the same tokens) nothing is emitted twice; if they
  differ, the follower says the output starts again and emits the new attempt's text whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Piece:
    """What to show: ``text`` (new text, maybe empty: tokens held back or without text),
    ``token_ids`` (the new tokens; the pieces' lists concatenate to the output's), and
    ``restarted`` (an attempt whose output differs from what was shown begins: what was shown
    so far is void and this piece starts the new output)."""

    text: str
    token_ids: list[int]
    attempt: int
    restarted: bool = False


class Follower:
    """Feeds snapshots ``(attempt, tokens)`` in; gives the pieces to print."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.shown: list[int] = []  # tokens whose text has been emitted (some held back maybe)
        self.text = ""  # the text emitted so far
        self.attempt = 0

    def feed(self, attempt: int, tokens: list[int], final: bool = False) -> Piece | None:
        """The next piece, or None when there is nothing new; ``final``: the task's last
        tokens (nothing is held back)."""
        n = min(len(tokens), len(self.shown))
        restarted = tokens[:n] != self.shown[:n]
        if restarted:  # a new attempt took another path: start over
            self.shown, self.text = [], ""
        self.attempt = max(self.attempt, attempt)
        if len(tokens) <= len(self.shown) and not final and not restarted:
            return None  # a new attempt catching up with what was shown, or nothing new
        full = self.decode(tokens)
        safe = full if final else full.removesuffix(REPLACEMENT)
        # what is past the text shown (a decoder that rewrote earlier text, which byte-level
        # ones do not, would show its new ending only: printed text cannot be taken back)
        piece = safe[len(self.text) :]
        new_ids = tokens[len(self.shown) :]
        self.shown, self.text = list(tokens), safe
        if not piece and not new_ids and not restarted:
            return None  # tokens' pieces concatenate to the output, even where text is empty
        return Piece(piece, new_ids, self.attempt, restarted)


__all__ = ["Follower", "Piece"]

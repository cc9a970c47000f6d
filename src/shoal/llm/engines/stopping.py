"""Stop strings: finding one in generated text, and holding back what could be the start of one."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["find_stop", "stop_holdback"]


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest occurrence of any stop string in `text[start:]`, or -1."""
    best = -1
    for stop in stops:
        i = text.find(stop, start)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (not yet safe to
    stream: if the stop completes, they must never have been sent)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold

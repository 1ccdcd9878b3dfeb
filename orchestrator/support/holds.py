"""Counts of what each key holds open (streams, requests), within a bound.

A key that holds nothing is forgotten, so the map grows only with what is open: keys
are callers, and a caller that opened once and left costs nothing afterwards.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


class Holds(Counter[K]):
    @contextlib.contextmanager
    def hold(self, key: K, most: int, refuse: Callable[[K], Exception]) -> Iterator[None]:
        """Count one more of `key`'s while the context is open; `refuse(key)` is raised
        instead when `key` already holds `most`."""
        if self[key] >= most:
            raise refuse(key)
        self[key] += 1
        try:
            yield
        finally:
            self[key] -= 1
            if not self[key]:
                del self[key]

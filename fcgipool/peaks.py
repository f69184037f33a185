"""High-water marks: the highest value seen, since start and lately.

A gauge read at scrape time (every 15 s, say) misses a burst that filled the queue for a
second; a peak kept where the value changes does not. ``see`` is two comparisons, no
clock; the supervisor's tick rolls the windows.
"""

from __future__ import annotations

WINDOW = 30.0  # seconds; "lately" is the current window and the one before: 30-60 s


class Peak:
    __slots__ = ("before", "ever", "now")

    def __init__(self) -> None:
        self.ever = 0  # since the pool started
        self.now = 0  # in the current window
        self.before = 0  # in the window before it

    def see(self, value: int) -> None:
        if value > self.now:
            self.now = value
            if value > self.ever:
                self.ever = value

    def roll(self, current: int) -> None:
        """A new window begins, holding ``current`` (what the value is now)."""
        self.before, self.now = self.now, current

    @property
    def lately(self) -> int:
        """The highest within the last WINDOW to 2 * WINDOW seconds."""
        return max(self.now, self.before)

    def view(self) -> dict[str, int]:
        return {"since_start": self.ever, "last_minute": self.lately}

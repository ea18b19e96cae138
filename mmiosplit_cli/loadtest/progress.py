"""Progress callbacks of a load test, in a module of their own so the command line can subclass them
without importing gRPC before it has parsed its options."""

from __future__ import annotations


class Reporter:
    """Progress callbacks; the command line draws a rich progress bar, tests and scripts pass this no-op.

    ``polls`` says whether the measured phase should poll the vcpu service for progress (GetStats
    counters_only, once a second): cheap, but not free (about 2% on p50 at 4 polls a second on a 2-CPU
    VM), so only a visible progress bar asks for it.
    """

    polls = False

    def phase(self, text: str) -> None:
        """A new phase starts (services, a floor, warm-up, the measured run)."""

    def progress(self, done: float, total: float, detail: str = "") -> None:
        """How far the current phase is (exits or seconds)."""

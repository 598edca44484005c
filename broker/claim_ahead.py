"""Claiming ahead for short jobs only: as fast as a prefetch while jobs are short, none held while long.

With CLAIM_AHEAD_JOBS=0 a worker never holds a job it cannot start, so an idle worker elsewhere takes the next
long job. Taken literally that halves short jobs' throughput: each thread that finishes waits a claim's round
trip for its next job. So while the jobs this process ran lately were short, it also claims up to one job per
thread that runs a short job (or none): those wait in the consumer, not in Dramatiq's work queue, and each is
handed over the moment a thread frees. One that has not started within HAND_BACK_AFTER_S (the
threads turned out busy with long jobs) goes back to the queue, and the doorbell it rings brings it to an idle
worker elsewhere. A long job is held unstarted for at most that long.
"""

from __future__ import annotations

import threading

#: Seconds a job may run and still count as short: while the jobs' average run is shorter, claim ahead.
SHORT_JOB_S = 0.02
#: Seconds a job claimed ahead may wait for a thread before it goes back to the queue.
HAND_BACK_AFTER_S = 0.05
#: Weight of the newest run in the average run time (an exponentially weighted moving average).
NEWEST_RUN_WEIGHT = 0.2


class ShortJobs:
    """The average run time of this process's recent jobs; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._average_s: float | None = None  # None: no job ran yet, so nothing says jobs are short

    def ran(self, seconds: float) -> None:
        """A job's run took `seconds`."""
        with self._lock:
            if self._average_s is None:
                self._average_s = seconds
            else:
                self._average_s += NEWEST_RUN_WEIGHT * (seconds - self._average_s)

    def are_short(self) -> bool:
        with self._lock:
            return self._average_s is not None and self._average_s < SHORT_JOB_S

    def room(self, threads: int, running_long: int) -> int:
        """Jobs to claim beyond the free threads: while jobs are short, one per thread on a short one."""
        if not self.are_short():
            return 0
        return max(threads - running_long, 0)

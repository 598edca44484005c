"""`dramatiq tasks bench.chaos_actors`: the chaos benchmark's job, declared on the service's own broker.

Each execution appends lines to the file named by CHAOS_EXECUTIONS_FILE: `start` when it begins, `finish` when
it ran to the end, `interrupted` when the broker stopped it. Lines are single `os.write`s to a file opened
with O_APPEND, so they survive a SIGKILL of the process and never interleave. The job works in short slices
and, like any job with side effects should, checks `should_stop()` before it records its result: a worker
that may have lost the job (frozen past its lease, cut off from the database) never reports it done.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import dramatiq
from dramatiq.middleware import CurrentMessage

from broker.interrupts import JobInterrupted, should_stop

#: The environment variable naming the executions file (benchmark code may read the environment).
EXECUTIONS_FILE_ENV = "CHAOS_EXECUTIONS_FILE"
#: The queue and actor the benchmark enqueues.
CHAOS_QUEUE = "chaos"
CHAOS_ACTOR = "chaos_job"
#: Seconds of one slice of work.
SLICE_S = 0.02

_fd: int | None = None


def _record(event: str, job_id: str, execution: str) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ[EXECUTIONS_FILE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    line = {"event": event, "job": job_id, "execution": execution, "pid": os.getpid(), "t": time.time()}
    os.write(_fd, (json.dumps(line) + "\n").encode())


@dramatiq.actor(actor_name=CHAOS_ACTOR, queue_name=CHAOS_QUEUE, max_retries=3)
def chaos_job(duration_ms: int) -> None:
    message = CurrentMessage.get_current_message()
    assert message is not None
    job_id, execution = str(message.message_id), uuid.uuid4().hex
    _record("start", job_id, execution)
    try:
        deadline = time.monotonic() + duration_ms / 1000
        while (remaining := deadline - time.monotonic()) > 0:
            if should_stop():
                _record("interrupted", job_id, execution)
                return
            time.sleep(min(SLICE_S, remaining))
        if should_stop():
            _record("interrupted", job_id, execution)
            return
        _record("finish", job_id, execution)
    except JobInterrupted:
        _record("interrupted", job_id, execution)
        raise

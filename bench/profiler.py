"""Optional py-spy profiles of the worker process, and a summary of where its threads spend their time.

`throughput.py --profile DIR` records one py-spy profile per round (wall clock, idle threads included, so
waiting on a round trip shows). `python -m bench.profiler DIR/supabase-r1.txt` prints the summary.
py-spy is not a project dependency: `.venv/bin/pip install py-spy` first.
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.targets import BenchError

#: Samples per second; py-spy reads the target's memory without pausing it (--nonblocking).
SAMPLE_RATE_HZ = 250
#: Seconds py-spy may take to write its file once the worker has exited.
WRITE_TIMEOUT_S = 30.0
#: Where a worker thread or the consumer thread is, judged by a frame on its stack, first match wins.
ACTIVITIES: dict[str, list[tuple[str, str]]] = {
    "WorkerThread.run": [
        ("JobConsumer.ack", "ack: queued for the ack flusher"),
        ("_RabbitmqConsumer.ack", "ack (RabbitMQ, queued for the I/O thread)"),
        ("Queue.get", "waiting for a message: work queue empty"),
        ("process_message", "running middleware and the actor"),
    ],
    "ConsumerThread.run": [
        ("PostgresTransport.claim", "claim_jobs round trip"),
        ("JobConsumer._wait", "waiting for capacity or a wake-up"),
        ("handle_message", "handing messages to the work queue"),
    ],
}


class PySpy:
    """Starts `py-spy record` on a worker when the harness says it started; waits for its file after."""

    def __init__(self, out_dir: Path) -> None:
        found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if found is None:
            raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.executable = found
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[subprocess.Popen[bytes]] = []

    def recorder(self, name: str) -> Callable[[int], None]:
        """The `on_started(pid)` callback for run_worker, writing DIR/<name>.txt."""
        output = self.out_dir / f"{name}.txt"

        def start(pid: int) -> None:
            command = [
                self.executable,
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "--idle",
                "--nonblocking",
            ]
            command += ["--rate", str(SAMPLE_RATE_HZ), "--format", "raw", "--output", str(output)]
            self._procs.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )

        return start

    def finish(self) -> None:
        """py-spy stops when its target exits: wait for it to write, kill it if it hangs."""
        for proc in self._procs:
            try:
                proc.wait(timeout=WRITE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self._procs.clear()


def summarise(path: Path, top: int = 15) -> str:
    """Per thread kind, the share of wall-clock samples in each activity; then the top leaf frames."""
    activity: collections.Counter[tuple[str, str]] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if frames:
            leaves[_short(frames[-1])] += n
        for kind, rules in ACTIVITIES.items():
            if kind in stack:
                kinds[kind] += n
                label = next((label for marker, label in rules if marker in stack), "other")
                activity[(kind, label)] += n
                break
    lines = [f"{path.name}: {total} samples"]
    for (kind, label), n in sorted(activity.items(), key=lambda item: (item[0][0], -item[1])):
        lines.append(f"  {kind:20s} {100 * n / kinds[kind]:5.1f}%  {label}")
    lines.append("  top leaf frames (all threads, idle included):")
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in leaves.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    match = re.match(r"(?P<fn>.*) \((?P<file>.*?):\d+\)$", frame)
    if match is None:
        return frame
    file = re.sub(r".*/(site-packages|python3\.\d+)/", "", match["file"])
    return f"{match['fn']} ({file})"


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(summarise(Path(argument)))

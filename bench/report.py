"""The benchmark's results: per-round figures, medians per broker, the ratio to RabbitMQ, as Markdown."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

#: The broker every other is compared with: the issue's reference.
REFERENCE = "rabbitmq"
OURS = "supabase"


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """One broker's run in one round."""

    broker: str
    label: str
    round_no: int
    jobs: int
    jobs_per_s: float
    first_to_last_s: float
    startup_s: float
    extra: dict[str, Any]


def summarise(
    results: list[RoundResult], *, args: dict[str, Any], environment: dict[str, Any]
) -> dict[str, Any]:
    """Everything --json prints: the settings, the machine, each round, and per broker its medians."""
    brokers: dict[str, dict[str, Any]] = {}
    for result in results:
        entry = brokers.setdefault(result.broker, {"label": result.label, "rounds": []})
        entry["rounds"].append(dataclasses.asdict(result))
    for entry in brokers.values():
        rounds = entry["rounds"]
        entry["median_jobs_per_s"] = statistics.median(r["jobs_per_s"] for r in rounds)
        entry["median_startup_s"] = statistics.median(r["startup_s"] for r in rounds)
        trips = [r["extra"]["round_trips_per_job"] for r in rounds if "round_trips_per_job" in r["extra"]]
        if trips:
            entry["median_round_trips_per_job"] = statistics.median(trips)
    reference = brokers.get(REFERENCE, {}).get("median_jobs_per_s")
    for entry in brokers.values():
        entry["ratio_to_rabbitmq"] = entry["median_jobs_per_s"] / reference if reference else None
    return {
        "settings": {k: args[k] for k in ("jobs", "rounds", "threads", "brokers")},
        "environment": environment,
        "brokers": brokers,
    }


def render_markdown(summary: dict[str, Any]) -> str:
    """The table for the README and the issue: the run's conditions above, our round trips below."""
    settings, env, brokers = summary["settings"], summary["environment"], summary["brokers"]
    lines = [
        f"{settings['jobs']:,} no-op jobs per round, one `dramatiq` process with {settings['threads']} "
        f"threads, {settings['rounds']} interleaved round(s) per broker.",
        f"{env['date']}; {env['cpus']} CPUs ({env['cpu_model']}); Python {env['python']}, "
        f"Dramatiq {env['dramatiq']}; load average before/after: "
        f"{env['load_average_before'][0]:.2f}/{env['load_average_after'][0]:.2f}.",
        "",
        "| Broker | jobs/s per round | median jobs/s | median start-up (s) | ratio to RabbitMQ |",
        "|---|---:|---:|---:|---:|",
    ]
    for entry in brokers.values():
        per_round = " / ".join(f"{r['jobs_per_s']:,.0f}" for r in entry["rounds"])
        ratio = entry["ratio_to_rabbitmq"]
        lines.append(
            f"| {entry['label']} | {per_round} | {entry['median_jobs_per_s']:,.0f} "
            f"| {entry['median_startup_s']:.2f} | {'n/a' if ratio is None else f'{ratio:.2f}'} |"
        )
    ours = brokers.get(OURS)
    if ours is not None and "median_round_trips_per_job" in ours:
        last = ours["rounds"][-1]["extra"]
        calls = ", ".join(f"{name} {n:,}" for name, n in sorted(last["function_calls"].items()))
        per_claim = last.get("jobs_per_claim")
        lines += [
            "",
            f"SupabaseBroker SQL round trips per job (median): {ours['median_round_trips_per_job']:.3f}; "
            f"last round's calls: {calls}" + (f"; {per_claim:.1f} jobs per claim." if per_claim else "."),
        ]
    return "\n".join(lines)

"""The fair-share benchmark's arithmetic and report, without a database."""

from __future__ import annotations

from bench.fairness import max_overlap, render


def test_max_overlap_counts_holds_at_the_same_time() -> None:
    assert max_overlap([]) == 0
    assert max_overlap([(0.0, 1.0), (0.5, 1.5), (1.2, 2.0)]) == 2
    assert max_overlap([(0.0, 1.0), (1.0, 2.0)]) == 1  # one ends as the next starts


def test_the_report_gives_the_three_figures() -> None:
    wait = {
        "aging_step_ms": 200,
        "bound_s": 2.0,
        "free_jobs": 10,
        "free_started": 9,
        "free_max_wait_s": 2.5,
        "free_median_wait_s": 2.0,
        "free_never_started_waited_s": 0.3,
        "pro_max_wait_s": 2.4,
        "pro_backlog_min": 900,
    }
    report = {
        "throughput": {
            "on": [80.0, 90.0],
            "off": [100.0, 100.0],
            "on_jobs_per_claim": [12.0],
            "off_jobs_per_claim": [16.0],
        },
        "free_wait": wait,
        "free_wait_no_aging": wait | {"free_started": 0, "free_max_wait_s": None},
        "overshoot": {
            "jobs_run": 1000,
            "overshoot": 0,
            "overshoot_sampled": 0,
            "users_reaching_their_cap": "3 of 3",
        },
    }

    text = render(report)

    assert "| ratio on/off (medians) | 0.85 |" in text
    assert "2.50 s" in text and "| 0 (sampled: 0;" in text

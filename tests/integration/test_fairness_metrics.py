"""Fair share in /metrics and the monitor line (issue 11), over both transports."""

from __future__ import annotations

import uuid
from pathlib import Path

from falcon import testing
from prometheus_client.parser import text_string_to_metric_families

from broker.transport import Transport
from health.app import create_app
from health.monitor import QueueMonitor
from health.readiness import ReadinessProbe
from health.stats_cache import StatsCache
from tests.support.brokers import Db

#: Milliseconds the probes may take here.
PROBE_MS = 5_000


def test_metrics_and_the_monitor_show_caps_running_jobs_and_jobs_waiting_for_a_cap(
    db: Db, transport: Transport, tmp_path: Path
) -> None:
    # Given a Free user with one job running and two waiting for the cap, and a Pro user with one running
    free_user, pro_user = uuid.uuid4(), uuid.uuid4()
    db.execute(
        "insert into public.coding_jobs (user_id, prompt, priority) values (%s, 'f', 0), (%s, 'f', 0),"
        " (%s, 'f', 0), (%s, 'p', 10)",
        (free_user, free_user, free_user, pro_user),
    )
    db.execute("select public.register_worker('w', 'heartbeat', 60000)")
    db.execute("select * from public.claim_jobs('w', 'default', 10, 60000, gen_random_uuid())")
    cache = StatsCache(transport, 0, wait_ms=PROBE_MS)

    # When /metrics is scraped and the monitor logs its line
    app = create_app(
        run_dir=tmp_path, heartbeat_stale_ms=60_000, probe=ReadinessProbe(transport, PROBE_MS), cache=cache
    )
    text = testing.TestClient(app).simulate_get("/metrics").text
    samples = {
        (sample.name, sample.labels.get("plan")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("queue_plan_")
    }
    summary = QueueMonitor(cache, interval_ms=30_000).log_once()

    # Then both show each plan's cap, its running jobs and users, and the jobs waiting for a cap
    assert samples[("queue_plan_max_running", "free")] == 1
    assert samples[("queue_plan_max_running", "pro")] == 5
    assert samples[("queue_plan_running_jobs", "free")] == 1
    assert samples[("queue_plan_running_users", "pro")] == 1
    assert samples[("queue_plan_users_at_cap", "free")] == 1
    assert samples[("queue_plan_capped_pending_jobs", "free")] == 2
    assert samples[("queue_plan_oldest_pending_age_seconds", "free")] >= 0
    assert samples[("queue_plan_oldest_pending_age_seconds", "pro")] == 0
    assert summary is not None and summary.capped_waiting == 2
    assert set(summary.oldest_pending_by_plan_s) == {"free"}

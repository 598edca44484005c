"""The CLI's fair share commands (`plans`, `plans set`, `plans delete`, `fairness`) over both transports, and
the operator calls under them."""

from __future__ import annotations

import pytest

from broker.errors import QueueError
from broker.transport import Transport
from ops.cli import main
from tests.integration.test_operator_cli import cli, cli_json
from tests.support.brokers import Db, insert_job, user_at_the_free_cap


def plan_rows(db: Db) -> list[tuple[object, ...]]:
    rows = db.execute("select plan, priority, max_priority, max_running from public.get_plan_limits()")
    return [tuple(row.values()) for row in rows]


def test_plans_show_each_tier_its_cap_and_the_users_at_it(db: Db, transport: Transport) -> None:
    # Given a Free user at the cap (one job running, two waiting for it) and a Pro job waiting for a worker
    user_at_the_free_cap(db)
    insert_job(db, prompt="pro job", priority=10)

    # When the operator asks for the plans
    shown = cli_json(transport, "plans")
    code, table = cli(transport, "plans")

    # Then each plan shows its tier, cap and how its users stand, with the fairness setting and its bound
    plans = {plan["plan"]: plan for plan in shown["plans"]}
    assert list(plans) == ["free", "starter", "pro"]
    free, pro = plans["free"], plans["pro"]
    assert (free["priority"], free["max_priority"], free["max_running"]) == (0, 4, 1)
    assert (free["running_jobs"], free["running_users"], free["users_at_cap"]) == (1, 1, 1)
    assert free["capped_pending_jobs"] == 2 and free["oldest_pending_wait_s"] >= 0
    assert (pro["running_jobs"], pro["capped_pending_jobs"]) == (0, 0)
    assert pro["oldest_pending_wait_s"] is not None and plans["starter"]["oldest_pending_wait_s"] is None
    assert shown["fairness"]["enabled"] is True
    assert (shown["fairness"]["aging_step_ms"], shown["fairness"]["top_tier_after_ms"]) == (30_000, 300_000)
    assert code == 0
    [free_line] = [line for line in table.splitlines() if line.startswith("free")]
    assert free_line.split()[:7] == ["free", "0-4", "1", "1", "1", "1", "2"]
    assert "a pending job reaches the top tier after 10 \u00d7 aging step (5m00s)" in table


def test_plans_set_and_delete_change_the_caps(db: Db, transport: Transport) -> None:
    # A new plan, then a plan without a cap
    code, text = cli(transport, "plans", "set", "team", "--priority", "7", "--max-running", "3")
    assert code == 0 and "Plan 'team': priorities 7-9, at most 3 running job(s) per user" in text
    assert cli_json(transport, "plans", "set", "pro", "--priority", "10", "--no-cap")["replaced"] == []
    assert plan_rows(db) == [
        ("free", 0, 4, 1),
        ("starter", 5, 6, 2),
        ("team", 7, 9, 3),
        ("pro", 10, 10, None),
    ]

    # A plan set on another plan's priority replaces it, and says so
    code, text = cli(transport, "plans", "set", "enterprise", "--priority", "10", "--max-running", "20")
    assert code == 0 and "it replaces plan 'pro'" in text
    assert plan_rows(db)[-1] == ("enterprise", 10, 10, 20)

    # Deleting a plan hands its priorities to the plan below; a plan that is not there is refused
    assert cli_json(transport, "plans", "delete", "team") == {"plan": "team", "deleted": True}
    assert plan_rows(db)[:2] == [("free", 0, 4, 1), ("starter", 5, 9, 2)]
    code, text = cli(transport, "plans", "delete", "team")
    assert code == 1 and "no plan 'team'" in text

    # The queue itself refuses what the CLI would not send
    with pytest.raises(QueueError, match="priority is 0 to 10"):
        transport.set_plan_limit("gold", 11, 5)


def test_fairness_turns_off_and_on_and_sets_the_aging_step(db: Db, transport: Transport) -> None:
    code, text = cli(transport, "fairness", "off", "--aging-step-ms", "60000")
    assert code == 0 and "Fair share: off" in text
    assert db.execute("select enabled, aging_step_ms from public.queue_fairness").fetchone() == {
        "enabled": False,
        "aging_step_ms": 60_000,
    }

    # `on` keeps the step; a step alone keeps the switch; no argument only shows
    assert cli_json(transport, "fairness", "on")["aging_step_ms"] == 60_000
    assert cli_json(transport, "fairness", "--aging-step-ms", "1500")["enabled"] is True
    shown = cli_json(transport, "fairness")
    assert (shown["enabled"], shown["aging_step_ms"], shown["top_tier_after_ms"]) == (True, 1500, 15_000)
    code, text = cli(transport, "fairness")
    assert code == 0 and "aging step 1,500 ms: a pending job reaches the top tier after 10 \u00d7" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["plans", "set", "gold", "--priority", "11", "--max-running", "1"],
        ["plans", "set", "gold", "--priority", "high", "--max-running", "1"],
        ["plans", "set", "gold", "--priority", "3", "--max-running", "-1"],
        ["plans", "set", "gold", "--priority", "3", "--max-running", "1", "--no-cap"],
        ["plans", "set", "gold", "--priority", "3"],
        ["plans", "set", "", "--priority", "3", "--no-cap"],
        ["plans", "delete"],
        ["plans", "rename", "gold"],
        ["fairness", "maybe"],
        ["fairness", "on", "--aging-step-ms", "0"],
    ],
)
def test_fair_share_usage_mistakes_exit_2_before_any_setting_is_read(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err

"""The CLI's fair share commands: `plans` (show, `set`, `delete`) and `fairness` (show, on, off, aging step).

    supabase-queue-worker plans                                 each plan's tier, cap and how its users stand
    supabase-queue-worker plans set PLAN --priority N (--max-running M | --no-cap)
    supabase-queue-worker plans delete PLAN
    supabase-queue-worker fairness [on|off] [--aging-step-ms N]

Through the queue's functions (get_plan_limits, get_fairness_stats, get_fairness, set_plan_limit,
delete_plan_limit, set_fairness) in broker.operations, like every other command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from broker.operator_records import TOP_PRIORITY, FairnessSettings, PlanLimit, PlanShare
from broker.transport import Transport
from ops.arguments import whole
from ops.render import as_json, duration, print_json, print_table
from service.exit_codes import EXIT_REFUSED
from service.settings import Settings

#: Builds one command's parser (ops.cli's `command`): a name and its help, `--json` included.
CommandFactory = Callable[[str, str], argparse.ArgumentParser]


def _plan_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a plan name is needed")
    return text


def add_commands(command: CommandFactory) -> None:
    """Add `plans` and `fairness` to the CLI's parser (their handlers: plans_command, fairness_command)."""
    plans = command("plans", "fair share: each plan's tier, cap and users at it; `set` or `delete` a plan")
    changes = plans.add_subparsers(dest="plans_command", metavar="set|delete")
    # `--json` after the sub-command too; SUPPRESS keeps `plans --json set ...` from being reset to False.
    set_plan = changes.add_parser(
        "set",
        help="add a plan or change its tier and cap",
        description="Add a plan or change its tier and cap.",
    )
    set_plan.add_argument("plan", metavar="PLAN", type=_plan_name)
    set_plan.add_argument(
        "--priority",
        type=whole(0, TOP_PRIORITY),
        required=True,
        help=f"the lowest priority of the plan's tier (0 to {TOP_PRIORITY}); a plan that has it is replaced",
    )
    cap = set_plan.add_mutually_exclusive_group(required=True)
    cap.add_argument("--max-running", type=whole(0), help="running jobs allowed per user")
    cap.add_argument("--no-cap", action="store_true", help="no cap on the plan's users")
    set_plan.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    delete_plan = changes.add_parser(
        "delete",
        help="forget a plan (its priorities fall under the next lower plan)",
        description="Forget a plan: its priorities fall under the next lower plan, or no cap.",
    )
    delete_plan.add_argument("plan", metavar="PLAN", type=_plan_name)
    delete_plan.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")

    fairness = command("fairness", "show fair share, or turn it on or off and set its aging step")
    fairness.add_argument("state", nargs="?", choices=("on", "off"), help="off: strict priority and no caps")
    fairness.add_argument(
        "--aging-step-ms",
        type=whole(1),
        help="milliseconds of waiting that raise a pending job one priority step",
    )


def plans_command(args: argparse.Namespace, transport: Transport, settings: Settings, out: TextIO) -> int:
    if args.plans_command == "set":
        return _set_plan(args, transport, out)
    if args.plans_command == "delete":
        return _delete_plan(args, transport, out)
    now = datetime.now(UTC)
    shares = transport.plans()
    fairness = transport.fairness_settings()
    if args.json:
        rows: list[dict[str, Any]] = [
            {**as_json(share), "oldest_pending_wait_s": _wait_s(share, now)} for share in shares
        ]
        print_json(out, {"fairness": fairness, "plans": rows})
        return 0
    print_table(
        out,
        ["PLAN", "PRIORITIES", "CAP", "RUNNING", "USERS", "AT CAP", "CAPPED PENDING", "OLDEST WAIT"],
        [
            [
                share.plan,
                _tier(share.priority, share.max_priority),
                _cap(share.max_running),
                share.running_jobs,
                share.running_users,
                share.users_at_cap,
                share.capped_pending_jobs,
                None if share.oldest_pending_at is None else duration(_wait_s(share, now) or 0.0),
            ]
            for share in shares
        ],
    )
    out.write("\n" + fairness_line(fairness) + "\n")
    return 0


def _set_plan(args: argparse.Namespace, transport: Transport, out: TextIO) -> int:
    before = transport.plan_limits()
    max_running = None if args.no_cap else args.max_running
    limits = transport.set_plan_limit(args.plan, args.priority, max_running)
    replaced = [p.plan for p in before if p.priority == args.priority and p.plan != args.plan]
    if args.json:
        print_json(out, {"plans": limits, "replaced": replaced})
        return 0
    plan = next((p for p in limits if p.plan == args.plan), None)
    if plan is None:  # changed again at once by someone else
        out.write(f"Set plan {args.plan!r}, which another change has replaced since.\n")
    else:
        out.write(
            f"Plan {plan.plan!r}: {_priorities(plan.priority, plan.max_priority)}, "
            f"{_cap_sentence(plan.max_running)}"
            + (f"; it replaces plan {replaced[0]!r}" if replaced else "")
            + ". Running jobs are never stopped: the cap holds from the next claim.\n\n"
        )
    _print_limits(out, limits)
    return 0


def _delete_plan(args: argparse.Namespace, transport: Transport, out: TextIO) -> int:
    deleted = transport.delete_plan_limit(args.plan)
    if args.json:
        print_json(out, {"plan": args.plan, "deleted": deleted})
    elif deleted:
        out.write(f"Deleted plan {args.plan!r}; its priorities fall under the next lower plan.\n\n")
        _print_limits(out, transport.plan_limits())
    else:
        out.write(f"no plan {args.plan!r}\n")
    return 0 if deleted else EXIT_REFUSED


def fairness_command(args: argparse.Namespace, transport: Transport, settings: Settings, out: TextIO) -> int:
    if args.state is None and args.aging_step_ms is None:
        fairness = transport.fairness_settings()
    else:
        enabled = None if args.state is None else args.state == "on"
        fairness = transport.set_fairness(enabled, args.aging_step_ms)
    if args.json:
        print_json(out, fairness)
    else:
        out.write(fairness_line(fairness) + "\n")
    return 0


def fairness_line(fairness: FairnessSettings) -> str:
    """The fair share setting in a sentence, with the bound aging gives."""
    if not fairness.enabled:
        return (
            "Fair share: off (claims take the highest priority, then the oldest; no caps). "
            f"Aging step when on: {_ms(fairness.aging_step_ms)}."
        )
    return (
        f"Fair share: on; aging step {_ms(fairness.aging_step_ms)}: a pending job reaches the top tier after "
        f"{TOP_PRIORITY} \u00d7 aging step ({_ms(fairness.top_tier_after_ms)})."
    )


def _print_limits(out: TextIO, limits: list[PlanLimit]) -> None:
    print_table(
        out,
        ["PLAN", "PRIORITIES", "CAP"],
        [[p.plan, _tier(p.priority, p.max_priority), _cap(p.max_running)] for p in limits],
    )


def _wait_s(share: PlanShare, now: datetime) -> float | None:
    if share.oldest_pending_at is None:
        return None
    return max((now - share.oldest_pending_at).total_seconds(), 0.0)


def _tier(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def _priorities(low: int, high: int) -> str:
    return f"priority {low}" if low == high else f"priorities {low}-{high}"


def _cap(max_running: int | None) -> str:
    return "no cap" if max_running is None else str(max_running)


def _cap_sentence(max_running: int | None) -> str:
    return "no cap" if max_running is None else f"at most {max_running} running job(s) per user"


def _ms(milliseconds: int) -> str:
    return f"{milliseconds:,} ms" if milliseconds % 1000 else duration(milliseconds // 1000)

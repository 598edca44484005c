"""How the operator CLI prints: aligned text tables for people, `--json` for scripts (one JSON document)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from service.logs import redact

#: Characters of a prompt or an error shown in a table cell.
CELL_CHARS = 60


def as_json(value: Any) -> Any:
    """Records, lists and dicts as plain JSON values; times as ISO 8601; text redacted as in the tables."""
    if isinstance(value, str):
        return redact(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: as_json(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(key): as_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [as_json(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def print_json(out: TextIO, value: Any) -> None:
    out.write(json.dumps(as_json(value), indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def cell(value: Any, chars: int = CELL_CHARS) -> str:
    """One table cell: a time as its age, text on one line, redacted and cut."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return ago(value)
    text = " ".join(redact(str(value)).split())
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


def ago(moment: datetime, now: datetime | None = None) -> str:
    """A time as how long ago (or, for a future time, how soon) it is."""
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    text = duration(abs(seconds))
    return f"{text} ago" if seconds >= 0 else f"in {text}"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def print_table(out: TextIO, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Columns aligned to their widest cell; numbers right-aligned."""
    shown = [[cell(value) for value in row] for row in rows]
    if not shown:
        out.write("(none)\n")
        return
    widths = [max(len(headers[i]), *(len(row[i]) for row in shown)) for i in range(len(headers))]
    numeric = [
        all(row[i].replace(",", "").isdigit() or row[i] == "-" for row in shown) for i in range(len(headers))
    ]
    out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip() + "\n")
    for row in shown:
        parts = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(row, widths, numeric, strict=True)
        ]
        out.write("  ".join(parts).rstrip() + "\n")

"""Charts as inline SVG, drawn on the server: no chart library, no script, nothing fetched from elsewhere."""

from __future__ import annotations

from html import escape

from health.dashboard.board import Chart

WIDTH, HEIGHT = 560, 180
#: Room for the axis labels, in SVG units.
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 22, 22
#: Each status's colour (the stylesheet's legend uses the same classes).
STATUS_CLASSES = {
    "pending": "s-pending",
    "processing": "s-processing",
    "completed": "s-completed",
    "failed": "s-failed",
    "cancelled": "s-cancelled",
}


def _scale(chart: Chart, stacked: bool) -> float:
    if stacked:
        totals = [sum(series[i] or 0 for series in chart.series.values()) for i in range(len(chart.minutes))]
        top = max(totals, default=0)
    else:
        top = max((value or 0 for series in chart.series.values() for value in series), default=0)
    return float(top) if top > 0 else 1.0


def _frame(title: str, top: float, chart: Chart, body: str) -> str:
    plot_h = HEIGHT - TOP - BOTTOM
    first = chart.minutes[0].strftime("%H:%M") if chart.minutes else ""
    last = chart.minutes[-1].strftime("%H:%M") if chart.minutes else ""
    legend = " ".join(
        f'<tspan class="{STATUS_CLASSES.get(status, "")}">\u25a0 {escape(status)}</tspan>'
        for status in chart.series
    )
    return (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>"
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}"/>'
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>'
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{_number(top)}</text>'
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end">0</text>'
        f'<text class="tick" x="{LEFT}" y="{HEIGHT - 6}">{first} UTC</text>'
        f'<text class="tick" x="{WIDTH - RIGHT}" y="{HEIGHT - 6}" text-anchor="end">{last}</text>'
        f'<text class="legend" x="{WIDTH - RIGHT}" y="{TOP - 8}" text-anchor="end">{legend}</text>'
        f"{body}</svg>"
    )


def line_chart(title: str, chart: Chart) -> str:
    """One polyline per status (gaps where nothing is known yet)."""
    top = _scale(chart, stacked=False)
    count = max(len(chart.minutes) - 1, 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    lines = []
    for status, series in chart.series.items():
        points = " ".join(
            f"{LEFT + plot_w * i / count:.1f},{TOP + plot_h * (1 - value / top):.1f}"
            for i, value in enumerate(series)
            if value is not None
        )
        if points:
            lines.append(f'<polyline class="line {STATUS_CLASSES.get(status, "")}" points="{points}"/>')
    return _frame(title, top, chart, "".join(lines))


def bar_chart(title: str, chart: Chart) -> str:
    """Stacked bars per minute, one colour per status."""
    top = _scale(chart, stacked=True)
    slots = max(len(chart.minutes), 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    width = plot_w / slots
    bars = []
    for i in range(len(chart.minutes)):
        base = 0.0
        for status, series in chart.series.items():
            value = series[i] or 0
            if value <= 0:
                continue
            height = plot_h * value / top
            y = TOP + plot_h * (1 - base / top) - height
            bars.append(
                f'<rect class="bar {STATUS_CLASSES.get(status, "")}" x="{LEFT + i * width + 0.5:.1f}" '
                f'y="{y:.1f}" width="{max(width - 1, 0.5):.1f}" height="{height:.1f}">'
                f"<title>{chart.minutes[i]:%H:%M} {escape(status)}: {_number(value)}</title></rect>"
            )
            base += value
    return _frame(title, top, chart, "".join(bars))


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"

#!/usr/bin/env python3
"""Turns criterion's output (target/criterion) into BENCHMARKS.md tables and the
event-processing chart (docs/event-processing.png).

    cargo bench --all-features --bench backends
    python3 ci/bench-report.py > /tmp/tables.md    # the chart needs matplotlib (pip install
                                                   # matplotlib); without it, tables only
"""
import json
import pathlib
import re
import sys
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRITERION = ROOT / "target" / "criterion"
CHART = ROOT / "docs" / "event-processing.png"


def load():
    """{group: {(function, value): (median_ns, mad_ns)}}"""
    results = defaultdict(dict)
    for bench in CRITERION.glob("**/new/benchmark.json"):
        meta = json.loads(bench.read_text())
        est = json.loads((bench.parent / "estimates.json").read_text())
        key = (meta["function_id"], meta.get("value_str") or "")
        results[meta["group_id"]][key] = (
            est["median"]["point_estimate"],
            est["median_abs_dev"]["point_estimate"],
        )
    return results


def fmt(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.2f} {unit}"
    return f"{ns:.0f} ns"


def table(group, rows):
    """Markdown: one row per parameter, one column per function, `median ± MAD`."""
    functions = sorted({f for f, _ in rows}, key=lambda f: (f.startswith("raw"), f))
    values = sorted({v for _, v in rows}, key=natural)
    out = [f"### {group}", "", "| | " + " | ".join(functions) + " |",
           "|---|" + "---|" * len(functions)]
    for v in values:
        cells = []
        for f in functions:
            if (f, v) in rows:
                median, mad = rows[(f, v)]
                cells.append(f"{fmt(median)} ± {fmt(mad)}")
            else:
                cells.append("—")
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def natural(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def ratios(rows):
    """forkloop backend / its raw baseline, per parameter (event processing)."""
    pairs = {"epoll": "raw-epoll", "poll": "raw-poll", "select": "raw-select",
             "mio": "raw-mio", "polling": "raw-polling"}
    out = ["| backend / raw | " + " | ".join(sorted({v for _, v in rows}, key=natural)) + " |"]
    values = sorted({v for _, v in rows}, key=natural)
    out.append("|---|" + "---|" * len(values))
    for backend, raw in pairs.items():
        cells = []
        for v in values:
            if (backend, v) in rows and (raw, v) in rows:
                cells.append(f"{rows[(backend, v)][0] / rows[(raw, v)][0]:.2f}×")
            else:
                cells.append("—")
        if any(c != "—" for c in cells):
            out.append(f"| {backend} / {raw} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def paired(rows, pairs):
    """`forkloop / baseline` medians for (forkloop function, baseline function) pairs of
    one group, one column per parameter."""
    values = sorted({v for _, v in rows}, key=natural)
    out = ["| forkloop / baseline | " + " | ".join(values) + " |",
           "|---|" + "---|" * len(values)]
    for ours, base in pairs:
        cells = []
        for v in values:
            if (ours, v) in rows and (base, v) in rows:
                cells.append(f"{rows[(ours, v)][0] / rows[(base, v)][0]:.2f}×")
            else:
                cells.append("—")
        if any(c != "—" for c in cells):
            out.append(f"| {ours} / {base} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# Issue #11's ratios: the group, its title, and the (forkloop, baseline) pairs.
BACKENDS = ("epoll", "mio", "poll", "polling", "select", "kqueue")
ISSUE_11 = (
    ("event-processing+timeouts", "restarting a per-fd timeout on each event",
     [("epoll+restart", "raw-epoll+heap"), ("epoll", "raw-epoll+heap")]),
    ("timers", "one-shot timers, arm plus fire",
     [(b, "raw-mio-heap") for b in BACKENDS]),
    ("interest", "one change to an IO watch",
     [(b, "raw-epoll") for b in ("epoll", "mio", "polling")]),
)


def chart(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, active in zip(axes, ("1", "100")):
        series = defaultdict(list)
        for (function, value), (median, _) in rows.items():
            n, a = re.match(r"N=(\d+)/A=(\d+)", value).groups()
            if a == active:
                series[function].append((int(n), median / 1000))
        for function, points in sorted(series.items()):
            points.sort()
            style = "--" if function.startswith("raw") else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=function)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (watched sockets)")
        ax.set_ylabel("µs per iteration")
        ax.set_title(f"event processing, A={active} active")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    CHART.parent.mkdir(exist_ok=True)
    fig.savefig(CHART, dpi=110)


def main():
    results = load()
    if not results:
        sys.exit("no criterion results under target/criterion: run cargo bench first")
    for group in sorted(results):
        print(table(group, results[group]))
    if "event-processing" in results:
        print("### event processing: forkloop / raw baseline (median)\n")
        print(ratios(results["event-processing"]))
        try:
            chart(results["event-processing"])
            print(f"chart written to {CHART.relative_to(ROOT)}", file=sys.stderr)
        except ImportError:
            print("no matplotlib: chart not redrawn", file=sys.stderr)
    for group, title, pairs in ISSUE_11:
        if group in results:
            print(f"### {group}: {title}, forkloop / baseline (median)\n")
            print(paired(results[group], pairs))


if __name__ == "__main__":
    main()

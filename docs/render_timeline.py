#!/usr/bin/env python3
"""Render one rank of a Chrome trace (unshard-plan --timeline, or the runtime's --trace) as a PNG.

Top: the compute and communication lanes (gathers, compute, frees). Bottom: the memory curve, the
trace's "memory" counters stacked by category (unshard-plan writes them; a runtime trace has none,
and then only the lanes are drawn). Tooling for docs/, not a test dependency: needs matplotlib
(pip install matplotlib).

  python3 docs/render_timeline.py TRACE.json OUT.png [--rank R] [--budget-gib G] [--title TEXT]
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GIB = 2.0**30
COLORS = {"compute": "#4c72b0", "gather": "#dd8452", "host_to_device": "#937860"}
MEMORY_ORDER = ["kv_cache", "shards", "resident", "activations", "workspace", "gathered"]
MEMORY_COLORS = {"kv_cache": "#8172b3", "shards": "#55a868", "resident": "#64b5cd", "activations": "#ccb974",
                 "workspace": "#da8bc3", "gathered": "#dd8452"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--budget-gib", type=float, default=None, help="draw the usable memory as a line")
    ap.add_argument("--capacity-gib", type=float, default=None, help="draw the card's memory as a line")
    ap.add_argument("--title", default=None)
    a = ap.parse_args()

    doc = json.load(open(a.trace))
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    mine = [e for e in events if e.get("pid") == a.rank]
    spans = [e for e in mine if e.get("ph") == "X"]
    frees = [e for e in mine if e.get("ph") == "i"]
    counters = sorted((e for e in mine if e.get("ph") == "C" and e.get("name") == "memory"), key=lambda e: e["ts"])
    if not spans:
        raise SystemExit(f"{a.trace}: no spans for rank {a.rank}")
    t0 = min(e["ts"] for e in spans)
    t_end = max(e["ts"] + e["dur"] for e in spans)
    scale, unit = (1e-6, "s") if t_end - t0 > 2e6 else (1e-3, "ms")

    rows = 2 if counters else 1
    fig, axes = plt.subplots(rows, 1, figsize=(13, 3.2 + 2.8 * (rows - 1)), sharex=True,
                             gridspec_kw={"height_ratios": [1, 2.2][:rows]})
    axes = axes if rows > 1 else [axes]
    lanes = axes[0]
    for e in spans:
        kind = e["name"].split(" ")[0]
        lane = 1 if e.get("tid", 0) == 0 else 0
        lanes.broken_barh([((e["ts"] - t0) * scale, max(e["dur"] * scale, 1e-9))], (lane - 0.4, 0.8),
                          facecolors=COLORS.get(kind, "#999999"), edgecolor="white", linewidth=0.3)
    for e in frees:
        lanes.plot([(e["ts"] - t0) * scale] * 2, [0.6, 1.4], color="#c44e52", linewidth=0.6)
    lanes.set_yticks([0, 1], ["communication", "compute"])
    lanes.set_ylim(-0.6, 1.6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in ("compute", "gather")]
    labels = ["compute", "gather"]
    if frees:
        handles.append(plt.Line2D([0], [0], color="#c44e52"))
        labels.append("free")
    lanes.legend(handles, labels, loc="upper right", fontsize=8, ncol=3)

    if counters:
        mem = axes[1]
        keys = [k for k in MEMORY_ORDER if k in counters[0]["args"]]
        keys += [k for k in counters[0]["args"] if k not in keys]
        # Counters hold their value until the next sample: draw them as steps to the trace's end.
        xs, ys = [], {k: [] for k in keys}
        for i, c in enumerate(counters):
            nxt = counters[i + 1]["ts"] if i + 1 < len(counters) else t_end
            for t in (c["ts"], nxt):
                xs.append((t - t0) * scale)
                for k in keys:
                    ys[k].append(c["args"].get(k, 0) / GIB)
        mem.stackplot(xs, [ys[k] for k in keys], labels=keys, colors=[MEMORY_COLORS.get(k, "#999999") for k in keys],
                      linewidth=0)
        peak = max(sum(c["args"].values()) for c in counters) / GIB
        if a.budget_gib:
            mem.axhline(a.budget_gib, color="black", linestyle="--", linewidth=1)
            mem.text(xs[0], a.budget_gib, f" usable {a.budget_gib:.2f} GiB", va="bottom", fontsize=8)
        if a.capacity_gib:
            mem.axhline(a.capacity_gib, color="grey", linestyle=":", linewidth=1)
        mem.axhline(peak, color="#c44e52", linewidth=0.8)
        mem.text(xs[-1], peak, f"peak {peak:.2f} GiB ", ha="right", va="bottom", fontsize=8, color="#c44e52")
        top = max(peak, a.budget_gib or 0, a.capacity_gib or 0)
        mem.set_ylim(0, top * 1.12)
        mem.set_ylabel("GiB per rank")
        mem.legend(loc="lower right", fontsize=8, ncol=len(keys))
    axes[-1].set_xlabel(f"time ({unit})")
    title = a.title or (doc.get("otherData", {}).get("title") if isinstance(doc, dict) else None) or a.trace
    axes[0].set_title(f"{title} (rank {a.rank})", fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Peak against forward time for benchmarks/results/chunked.csv (tooling only; needs matplotlib)."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/chunked.csv"
dst = sys.argv[2] if len(sys.argv) > 2 else "benchmarks/results/chunked.png"
rows = list(csv.DictReader(open(src)))
models = sorted({r["model"] for r in rows})
fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5))
for ax, model in zip(axes if len(models) > 1 else [axes], models):
    for lat, marker in (("0", "o"), ("50", "s")):
        sel = [r for r in rows if r["model"] == model and r["link_latency_us"].startswith(lat)]
        xs = [float(r["median_forward_s"]) * 1e3 for r in sel]
        ys = [int(r["planned_peak_bytes"]) / 2**20 for r in sel]
        ax.scatter(xs, ys, marker=marker, label=f"link latency {lat} us")
        for r, x, y in zip(sel, xs, ys):
            ax.annotate(r["policy"].replace("+prefetch:", " pf"), (x, y), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("forward time, median (ms, log)")
    ax.set_ylabel("per-rank planned peak (MiB)")
    ax.set_title(f"{model}, world size {sel[0]['world_size']}")
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(dst, dpi=120)
print("wrote", dst)

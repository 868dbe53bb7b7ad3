"""The long-context curve: benchmarks/results.json's long-context section drawn as benchmarks/long_context.png,
and as a table (printed; with --readme also put into README.md's "Long prompts" section).

    python -m benchmarks.plot_long_context [--results FILE] [--output PNG] [--readme]

Left: prefill and decode tokens/s against the context, each relative to its 512-token figure, with the issue's
targets at 32K (prefill >= 0.5x, decode >= 0.7x). Right: peak RSS against its bound (weights + KV cache + 1.5 GB).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from benchmarks.__main__ import RESULTS, ROOT, update_readme

OUTPUT = os.path.join(ROOT, "benchmarks", "long_context.png")
TABLE_BEGIN, TABLE_END = "<!-- long-context:begin -->", "<!-- long-context:end -->"
SERIES = (  # (label, what the figure's name starts with, marker)
    ("prefill, whole prompt", "prefill tokens/s, whole prompt", "o-"),
    ("prefill, last chunk", "prefill tokens/s, last chunk", "s--"),
    ("decode", "decode tokens/s", "^-"),
)


def _context(row: dict) -> int:
    return int(re.search(r"\((\d+) tokens", row["figure"]).group(1))


def curves(rows: list[dict]) -> dict:
    """label -> sorted [(context, ratio to 512 tokens)]; a length measured both ways keeps the real prefill's."""
    out: dict[str, dict[int, float]] = {label: {} for label, _, _ in SERIES}
    out["peak RSS / bound"] = {}
    for row in rows:
        for label, prefix, _ in SERIES:
            if row["figure"].startswith(prefix):
                out[label].setdefault(_context(row), row["ratio"])
        if row["figure"].startswith("peak RSS"):
            out["peak RSS / bound"].setdefault(_context(row), row["ratio"])
    return {label: sorted(points.items()) for label, points in out.items()}


def load_rows(results: str) -> tuple[dict, list[dict]]:
    import json

    with open(results, encoding="utf-8") as f:
        report = json.load(f)
    rows = report.get("sections", {}).get("long-context")
    if not rows:
        raise ValueError(f"{results} has no long-context section: run python -m benchmarks run --only long-context")
    return report, rows


def table(rows: list[dict]) -> str:
    """One line per context reached: tokens/s and peak RSS, each with its ratio to its peer."""
    lines = [
        "| context | how | prefill, whole prompt | prefill, last chunk | decode | peak RSS (bound) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    cells: dict[tuple, dict] = {}
    for row in rows:
        how = "stored K/V + last chunk" if "after stored" in row["figure"] else "real prefill"
        cell = cells.setdefault((_context(row), how), {})
        for label, prefix, _ in SERIES:
            if row["figure"].startswith(prefix):
                cell[label] = f"{row['ours']:.3g} tok/s ({row['ratio']:.2f}x)"
        if row["figure"].startswith("peak RSS"):
            cell["rss"] = f"{row['ours']:.2f} GB ({row['peer']:.2f})"
    for (context, how), cell in cells.items():
        lines.append(
            f"| {context} | {how} | {cell.get('prefill, whole prompt', '—')} | "
            f"{cell.get('prefill, last chunk', '—')} | {cell.get('decode', '—')} | {cell.get('rss', '—')} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, rows: list[dict], output: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(rows)
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, _, style in SERIES:
        if data[label]:
            x, y = zip(*data[label], strict=True)
            speed.plot(x, y, style, label=label)
    speed.axhline(0.5, color="gray", lw=0.8, ls=":")
    speed.axhline(0.7, color="gray", lw=0.8, ls=":")
    speed.text(600, 0.52, "prefill target at 32K (0.5x)", fontsize=7, color="gray")
    speed.text(600, 0.72, "decode target at 32K (0.7x)", fontsize=7, color="gray")
    speed.set(
        xscale="log",
        xlabel="context (tokens)",
        ylabel="tokens/s relative to 512 tokens",
        title="Speed against the context",
        ylim=(0, None),
    )
    speed.legend(fontsize=8)
    x, y = zip(*data["peak RSS / bound"], strict=True)
    memory.plot(x, y, "o-", color="tab:red")
    memory.axhline(1.0, color="gray", lw=0.8, ls=":")
    memory.set(
        xscale="log",
        xlabel="context (tokens)",
        ylabel="peak RSS / (weights + KV cache + 1.5 GB)",
        title="Peak memory against its bound",
        ylim=(0, 1.1),
    )
    model = "tiny model (QUICK run)" if report.get("quick") else "GLM-4-9B's width, 2 layers"
    date = report.get("section_dates", {}).get("long-context", report["date"])[:10]
    fig.suptitle(
        f"Long prompts: {model}, bf16 weights and KV cache, {rows[0]['details']['kernel']} kernels (measured {date})",
        fontsize=9,
    )
    fig.tight_layout()
    # written beside the target, then renamed over it: a reader sees the old plot or the whole new one
    temporary = f"{output}.{os.getpid()}.tmp"
    try:
        fig.savefig(temporary, format="png", dpi=110)
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plot_long_context", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--results", default=RESULTS, help="the benchmark results (default: %(default)s)")
    parser.add_argument("--output", default=OUTPUT, help="the PNG to write (default: %(default)s)")
    parser.add_argument(
        "--readme", action="store_true", help="also put the table into README.md's Long prompts section"
    )
    args = parser.parse_args(argv)
    try:
        report, rows = load_rows(args.results)
        text = table(rows)
        print(text + plot(report, rows, args.output))
        if args.readme:
            update_readme(text, TABLE_BEGIN, TABLE_END)
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m benchmarks run [--quick] [--only SECTION ...] [--readme]`

Runs the benchmark sections (model, converter, tokenizer, lowbit, serving; full-depth, lowbit-full-depth,
long-context and tensor-parallel only when named with --only), writes benchmarks/results.json and prints one
markdown table; with --readme it also replaces the table in README.md's "Performance" section. Each figure is
measured side
by side with its peer in the same run and reported with the ratio ours / peer. Not a test: nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results.json")
README = os.path.join(ROOT, "README.md")
SECTIONS = ("model", "converter", "tokenizer", "lowbit", "serving")  # the default run
# run only when asked (--only full-depth): GLM-4-9B's 40 layers in bf16 need ~40 GB of disk (long-context: ~10
# minutes of prefill up to 32K tokens; lowbit-full-depth:
# ~55 GB, with llama.cpp's files) and most of the RAM of a 24 GB machine, and take a while
ALL_SECTIONS = (*SECTIONS, "full-depth", "lowbit-full-depth", "long-context", "tensor-parallel")
# section -> (module, its run's keywords); the others are the module of their own name
VARIANTS = {"lowbit-full-depth": ("lowbit", {"layers": 40})}
# sections measured against this machine's bounds, and those that leave notes (a skipped peer, the CPU flags)
USE_MACHINE = ("model", "full-depth", "long-context")
WRITE_NOTES = ("lowbit", "lowbit-full-depth")
FORMATS = ("bf16", "int8", "int4")  # the lowbit sections' weight formats (--formats)
TABLE_BEGIN, TABLE_END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def run_sections(sections, quick: bool, formats=None) -> dict:
    """`formats`: the weight formats the lowbit sections measure (None: all); a section run with some of them
    is marked partial, so that merge_previous keeps the other formats' rows."""
    from benchmarks import machine

    measured = machine.measure(quick)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": measured,
        "sections": {},
        "section_dates": {},
        "notes": {},
        "partial": [],
    }
    for name in sections:
        report["section_dates"][name] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        started = time.perf_counter()
        print(f"benchmark {name}{' (quick)' if quick else ''} ...", file=sys.stderr, flush=True)
        module_name, keywords = VARIANTS.get(name, (name.replace("-", "_"), {}))
        module = __import__(f"benchmarks.{module_name}", fromlist=["run"])
        if name in USE_MACHINE:
            keywords = {**keywords, "machine": measured}
        if name in WRITE_NOTES:
            keywords = {**keywords, "notes": report["notes"].setdefault(name, [])}
        if module_name == "lowbit" and formats:
            keywords = {**keywords, "formats": formats}
            if set(formats) != set(FORMATS):
                report["partial"].append(name)
        report["sections"][name] = module.run(quick=quick, **keywords)
        for row in report["sections"][name]:  # a partial rerun's rows sit beside older ones: each says when
            row["date"] = report["section_dates"][name]
        print(f"benchmark {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return report


def merge_previous(report: dict, path: str) -> dict:
    """A run of some sections keeps the other sections of the previous results (of the same kind, full or
    quick), so the table stays whole; each section keeps the date it was measured."""
    if not os.path.exists(path):
        return report
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    if previous.get("quick") != report["quick"]:
        return report
    sections = {**previous.get("sections", {}), **report["sections"]}
    for name in report["partial"]:  # the rows of the formats not run this time stay
        figures = {row["figure"] for row in report["sections"][name]}
        since = previous.get("section_dates", {}).get(name, previous.get("date"))  # rows from before rows had dates
        kept = [
            {**row, "date": row.get("date", since)}
            for row in previous.get("sections", {}).get(name, [])
            if row["figure"] not in figures
        ]
        sections[name] = kept + report["sections"][name]
    dates = {**previous.get("section_dates", {}), **report["section_dates"]}
    # a section's notes go with its figures: a section run again replaces them
    notes = {
        **{name: lines for name, lines in previous.get("notes", {}).items() if name not in report["sections"]},
        **report["notes"],
    }
    return {
        **report,
        "sections": {name: sections[name] for name in ALL_SECTIONS if name in sections},
        "section_dates": {name: dates[name] for name in ALL_SECTIONS if name in dates},
        "notes": {name: notes[name] for name in ALL_SECTIONS if name in notes},
    }


def check(report: dict):
    """Every figure is there and finite (what CI checks of a quick run)."""
    for name, rows in report["sections"].items():
        if not rows:
            raise ValueError(f"section {name} produced no figures")
        for row in rows:
            for key in ("ours", "peer", "ratio"):
                if not (isinstance(row.get(key), (int, float)) and math.isfinite(row[key])):
                    raise ValueError(f"{name}: figure {row.get('figure')!r} has {key}={row.get(key)!r}")


def markdown(report: dict) -> str:
    m = report["machine"]
    method = m.get("read_bandwidth_method", "torch's sum")  # results from before the C probe do not say
    lines = [
        f"Measured {report['date'][:10]} on {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM "
        f"(read bandwidth {m['read_bandwidth_gbps']:.1f} GB/s by {method}, "
        f"fp32 matmul {m['fp32_matmul_gflops']:.0f} GFLOP/s by torch)"
        f"{' — QUICK run, tiny sizes' if report['quick'] else ''}."
    ]
    dates = {date[:10] for date in report.get("section_dates", {}).values()}
    if len(dates) > 1:
        lines[0] += (
            " Sections measured on: "
            + ", ".join(f"{name} {date[:10]}" for name, date in report["section_dates"].items())
            + "."
        )
    lines += ["", "| section | figure | ours | peer | ours / peer |", "|---|---|---:|---:|---:|"]
    for name, rows in report["sections"].items():
        section_date = report.get("section_dates", {}).get(name)
        for row in rows:
            # a row kept from an earlier partial run (--formats) says when it was measured
            when = (
                f" (measured {row['date'][:16].replace('T', ' ')})"
                if row.get("date", section_date) != section_date
                else ""
            )
            lines.append(
                f"| {name} | {row['figure']}{when} | {row['ours']:.3g} {row['unit']} | "
                f"{row['peer']:.3g} ({row['peer_name']}) | {row['ratio']:.2f}x |"
            )
    notes = [f"- {name}: {note}" for name, section_notes in report.get("notes", {}).items() for note in section_notes]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def update_readme(table: str, begin: str = TABLE_BEGIN, end: str = TABLE_END):
    """Replace what README.md holds between the markers `begin` and `end` with `table`."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"README.md has no {begin} ... {end} block to replace")
    from paddle_glm4.checkpoint import write_text_atomic

    write_text_atomic(README, pattern.sub(lambda _: f"{begin}\n{table}{end}", text))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("command", choices=["run"], help="run the benchmarks")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, for CI: checks that every figure is "
        "produced and finite (a few minutes); the real figures need the full run",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=ALL_SECTIONS,
        metavar="SECTION",
        help=f"run only these sections (of {', '.join(ALL_SECTIONS)}; full-depth, "
        "lowbit-full-depth, long-context and tensor-parallel run only when named here); the other sections' "
        "figures are kept from the previous results",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=FORMATS,
        metavar="FORMAT",
        help="the weight formats the lowbit sections measure (of bf16, int8, int4; default all); "
        "with --only, the previous results' rows of the other formats are kept",
    )
    parser.add_argument("--readme", action="store_true", help="also put the table into README.md's Performance section")
    parser.add_argument("--output", default=RESULTS, help="where to write the JSON results (default: %(default)s)")
    args = parser.parse_args(argv)
    report = run_sections(args.only or SECTIONS, args.quick, args.formats)
    check(report)
    if args.only:
        report = merge_previous(report, args.output)
    from paddle_glm4.checkpoint import write_text_atomic

    write_text_atomic(args.output, json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    print(table)
    if args.readme:
        update_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

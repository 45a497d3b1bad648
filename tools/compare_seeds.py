#!/usr/bin/env python3
"""Paired comparison of transfer-benchmark settings, seed by seed, from their record files.

Each ``--set LABEL=FILE[,FILE...]:METHOD`` names a setting: the records of ``METHOD`` in the JSON
files ``tools/bench_transfer.py`` writes (``--json``; ``benchmarks/*.json``). For each prune ratio
the table lists every setting's top-1 per seed, and each setting after the first minus the first,
paired by seed (seeds both have): mean ± standard error and how many seeds it is ahead. Settings
that ran on other machines or code still pair by seed; say so where you cite the figures.

    python tools/compare_seeds.py --ratio 0.7 \\
        --set p3b=benchmarks/transfer.json,benchmarks/transfer-0.7-seeds3-9.json:p3b \\
        --set uniform=benchmarks/transfer.json,benchmarks/transfer-0.7-seeds3-9.json:uniform
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path


def load(spec: str) -> tuple[str, dict[float, dict[int, float]]]:
    """``LABEL=FILE[,FILE...]:METHOD`` → (label, ratio → seed → top-1 %)."""
    label, sep, rest = spec.partition("=")
    files, sep2, method = rest.rpartition(":")
    if not sep or not sep2 or not label or not files or not method:
        raise SystemExit(f"error: --set {spec!r} must be LABEL=FILE[,FILE...]:METHOD")
    out: dict[float, dict[int, float]] = {}
    for name in files.split(","):
        path = Path(name)
        try:
            records = json.loads(path.read_text(encoding="utf-8"))["records"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SystemExit(f"error: {path} is not a bench_transfer record file ({exc})") from exc
        for r in records:
            if r.get("method") == method:
                seeds = out.setdefault(float(r["prune_ratio"]), {})
                if int(r["seed"]) in seeds:
                    raise SystemExit(f"error: {label}: seed {r['seed']} at {r['prune_ratio']} appears twice")
                seeds[int(r["seed"])] = 100.0 * float(r["top1"])
    return label, out


def table(sets: list[tuple[str, dict[float, dict[int, float]]]], ratio: float) -> str:
    base_label, base = sets[0][0], sets[0][1].get(ratio, {})
    seeds = sorted(set().union(*(s.get(ratio, {}) for _, s in sets)))
    lines = [f"prune ratio {ratio}, top-1 % per seed ({', '.join(map(str, seeds))}):"]
    for label, by_ratio in sets:
        got = by_ratio.get(ratio, {})
        cells = " / ".join(f"{got[s]:.1f}" if s in got else "-" for s in seeds)
        mean = statistics.fmean(got.values()) if got else float("nan")
        lines.append(f"- {label}: {cells} (mean {mean:.2f}, {len(got)} seeds)")
    for label, by_ratio in sets[1:]:
        got = by_ratio.get(ratio, {})
        diffs = [got[s] - base[s] for s in seeds if s in got and s in base]
        if len(diffs) < 2:
            lines.append(f"- {label} − {base_label}: fewer than 2 paired seeds")
            continue
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        ahead = sum(d > 0 for d in diffs)
        lines.append(
            f"- {label} − {base_label}, paired: {statistics.fmean(diffs):+.2f} ± {se:.2f} (s.e.), "
            f"ahead on {ahead} of {len(diffs)} seeds"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--set", dest="sets", action="append", required=True,
                   help="LABEL=FILE[,FILE...]:METHOD (repeat; the first is the reference)")  # fmt: skip
    p.add_argument("--ratio", type=float, nargs="+", required=True, help="prune ratios to compare")
    args = p.parse_args(argv)
    sets = [load(spec) for spec in args.sets]
    print("\n\n".join(table(sets, r) for r in args.ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())

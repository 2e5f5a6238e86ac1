"""Where the main job's wall time goes: a markdown table per run, from its results.json (``timings``,
``train.block_seconds``) or, for runs of code older than those fields, from the progress bars in its
console log (tqdm's elapsed time of each bar).

    python scripts/main_job_breakdown.py outputs/quantize/<run>/results.json
    python scripts/main_job_breakdown.py old_run.log --label "before (5d30a91)"
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def from_results(path: Path) -> dict[str, float]:
    r = json.loads(path.read_text())
    t = dict(r.get("timings", {}))
    rows = {"calibration trajectories": t.get("calibration_data", 0.0),
            "student build (scaling + table init)": t.get("method_other", 0.0)}
    rows.update({f"distill block {k}": v for k, v in r.get("train", {}).get("block_seconds", {}).items()})
    rows["distill other (set-up, checkpoints)"] = t.get("distill", 0.0) - sum(
        r.get("train", {}).get("block_seconds", {}).values())
    rows.update({f"sampling {k.removeprefix('sampling_')}": v for k, v in t.items() if k.startswith("sampling_")})
    rows["metrics and grids"] = t.get("evaluation", 0.0) - sum(v for k, v in t.items() if k.startswith("sampling_"))
    rows["start-up (imports, model load)"] = r["wall_seconds"] - sum(rows.values())
    return rows


def _seconds(stamp: str) -> float:
    parts = [float(p) for p in stamp.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def from_log(path: Path, wall: float | None) -> dict[str, float]:
    """The last elapsed time of every tqdm bar ("<desc>: ...| n/N [mm:ss<...")."""
    last: dict[str, float] = {}
    for chunk in re.split(r"[\r\n]", path.read_text(errors="replace")):
        m = re.match(r"\s*(.+?):\s+\d+%\|.*?\|\s*\d+/\d+ \[([\d:]+)<", chunk)
        if m:
            last[m.group(1)] = _seconds(m.group(2))
    rows = {("distill " + k if k.startswith("block") else k): v for k, v in last.items()}
    if wall is not None:
        rows["everything else (start-up, metrics, student build)"] = wall - sum(rows.values())
    return rows


def table(label: str, rows: dict[str, float]) -> str:
    total = sum(rows.values())
    lines = [f"| {label} | seconds | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in rows.items()]
    lines.append(f"| **total** | **{total:.1f}** | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a run's results.json, or a console log of an older run")
    ap.add_argument("--label", default=None)
    ap.add_argument("--wall", type=float, default=None, help="total wall seconds (for a log)")
    a = ap.parse_args()
    rows = from_results(a.source) if a.source.suffix == ".json" else from_log(a.source, a.wall)
    print(table(a.label or str(a.source), rows))


if __name__ == "__main__":
    main()

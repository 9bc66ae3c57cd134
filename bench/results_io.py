"""Write a benchmark's results as JSON + markdown, with the command, machine, date and git revision inside."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from services.common.rotation import rotated

__all__ = ["RESULTS", "chart", "markdown_table", "provenance", "rotated", "spread", "spread_text", "write"]

G = TypeVar("G")

RESULTS = Path(__file__).resolve().parent / "results"


def _command() -> str:
    script = Path(sys.argv[0])
    head = f"python -m bench.{script.stem}" if script.parent == Path(__file__).parent else f"python {script}"
    return " ".join([head, *sys.argv[1:]])


def provenance() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()
        except OSError:
            return ""

    import torch

    return {
        "command": _command(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # "+dirty": code differs from the commit (results written by this or an earlier run do not count)
        "git_revision": git("rev-parse", "--short", "HEAD")
        + ("+dirty" if git("status", "--porcelain", "--", ":/", ":!/bench/results") else ""),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of a cell's repetitions."""
    v = sorted(values)
    mid = len(v) // 2
    return {"min": v[0], "median": v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2, "max": v[-1]}


def spread_text(values: Sequence[float], fmt: str = ".2f") -> str:
    s = spread(values)
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}, {s['max']:{fmt}}]"


def write(name: str, payload: dict, columns: list[str], title: str, notes: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {**payload, **provenance()}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = [f"# {title}", "", markdown_table(payload["rows"], columns), ""]
    if notes:
        md += [notes, ""]
    md += [f"`{payload['command']}` at {payload['git_revision']}, {payload['date']}, "
           f"{payload['machine']['cores']} cores, torch {payload['machine']['torch']}", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))
    return RESULTS / f"{name}.json"


def chart(name: str, groups: Sequence[G], draw: Callable[[Any, G], None]) -> None:
    """One panel per group, side by side, saved as `results/<name>.png`; `draw(ax, group)` fills a panel.
    Without matplotlib (it is a dev extra) the chart is skipped with a line, the JSON and markdown stay."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart")
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        draw(ax, group)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)

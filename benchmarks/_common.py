"""Helpers shared by the benchmark scripts: memory high-water marks, competing jobs, markdown tables."""

from __future__ import annotations

import subprocess


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (``VmRSS``, ``VmHWM``...), -1 where absent."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def competing(name: str = "her2st_cv") -> list[str]:
    """Command lines of another running benchmark (by default the long her2st one)."""
    try:
        res = subprocess.run(["pgrep", "-af", name], capture_output=True, text=True, check=False)
    except OSError:
        return []
    return [line for line in res.stdout.splitlines() if "pgrep" not in line]


def markdown_table(header: list[str], rows: list[list], *, fmt=str) -> str:
    """A markdown table; ``fmt`` turns each cell into text."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(text: str, out: str) -> None:
    """Print a benchmark's markdown report and write it to ``out`` (folders created)."""
    from pathlib import Path

    print(text)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")

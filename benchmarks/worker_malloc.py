"""One hespotex training in a Dask worker: dask's default worker environment vs hespotex's clusters, side by side.

dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes glibc's mmap threshold at
128 KiB: every tensor of a training step is then a fresh ``mmap`` whose pages fault in one by one.
``hespotex._cluster.local_cluster`` starts workers without it (what ``hx.tl.predict_slides``,
``benchmarks/her2st_cv.py`` and ``benchmarks/shift.py`` use). Each arm is a one-worker LocalCluster (one torch
thread) training the same model: her2st fold C2 (trained on C3-C6, the 785-gene panel, ``hx.tl.train`` defaults
with ``ensemble=False``, seed 0); the arms alternate, ``--repeats`` times each. The autoencoder is pre-trained
once beforehand (disk cache), so the arms time the joint stage with its validation, as the ensemble's
later members do. The worker's own ``getrusage`` gives user / system seconds and minor page faults.

    python benchmarks/worker_malloc.py [--repeats 3] [--out benchmarks/results/worker_malloc.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import markdown_table, write_report  # noqa: E402


def train_once(data: str | None) -> dict[str, float]:
    """Train the fold's model in this process; wall, user, system seconds and minor faults of the call."""
    import resource

    import torch

    import hespotex as hx

    hx.settings.progress = False
    hx.settings.num_threads = 1
    torch.set_num_threads(1)
    sections = hx.datasets.her2st(data)
    panel = hx.datasets.her2st_genes(data)
    train = {n: s for n, s in sections.items() if n != "C2"}
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    hx.tl.train(train, genes=panel, ensemble=False, seed=0)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall": wall, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
        "minflt": (r1.ru_minflt - r0.ru_minflt) / 1e6, "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
    }  # fmt: skip


def run_arm(arm: str, data: str | None) -> dict[str, float]:
    from distributed import Client, LocalCluster

    from hespotex._cluster import local_cluster

    cluster = (
        local_cluster(1)
        if arm == "hespotex"
        else LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    )
    with cluster, Client(cluster) as client:
        return client.submit(train_once, data, pure=False).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/worker_malloc.md")
    args = parser.parse_args()
    load = tuple(round(v, 1) for v in os.getloadavg())
    warm = train_once(args.data)  # embeddings and the autoencoder into the disk cache
    arms = {"dask default": [], "hespotex": []}
    for _ in range(args.repeats):
        for arm, runs in arms.items():
            runs.append(run_arm(arm, args.data))
            print(arm, runs[-1], flush=True)
    rows, walls = [], {}
    for arm, runs in arms.items():
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("wall", "user", "sys", "minflt")}
        walls[arm] = mean["wall"]
        rows.append([
            arm, runs[0]["trim"] or "unset", len(runs), f"{mean['wall']:.1f}",
            " / ".join(f"{r['wall']:.1f}" for r in runs), f"{mean['user']:.1f}", f"{mean['sys']:.1f}",
            f"{mean['minflt']:.2f}",
        ])  # fmt: skip
    ratio = walls["dask default"] / walls["hespotex"]
    header = [
        "worker environment", "MALLOC_TRIM_THRESHOLD_", "runs", "wall s (mean)", "wall s (each)", "user s", "system s",
        "minor faults (millions)",
    ]  # fmt: skip
    text = (
        "# One training in a Dask worker: dask's default environment vs hespotex's clusters\n\n"
        f"Command: `python benchmarks/worker_malloc.py --repeats {args.repeats}`  \n"
        f"2-core machine, one worker of one torch thread at a time, the arms alternating; load average at start "
        f"{load}. Warm-up training in the main process first: {warm['wall']:.1f} s (autoencoder pre-trained and "
        "cached, so the arms time the joint stage).\n\n"
        + markdown_table(header, rows)
        + f"\n\n**dask's default worker environment takes {ratio:.2f} times as long** as hespotex's (mean wall).\n"
    )
    write_report(text, args.out)


if __name__ == "__main__":
    main()

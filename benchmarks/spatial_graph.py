"""Build time and peak memory of ``hx.pp.spatial_graph`` (scipy KD-tree kNN) at 10k, 100k and 1M spots.

Spots sit on a hexagonal grid (100 µm pitch, Visium-like) jittered by up to ±15 µm, in a sample table
at 0.5 µm/px (``obsm["spatial"]`` in pixels, ``uns["hespotex_sample"]``); k = 6, symmetric.

Three arms, interleaved per size in one fresh subprocess (A B C, B C A, C A B, ..., medians):

- **spatial_graph**: ``hx.pp.spatial_graph(table, n_neighbors=k, overwrite=True)`` (coordinates to µm,
  graph, writes ``obsp``);
- **knn_graph**: ``hespotex.pp._graph.knn_graph(coords_um, k)`` (the graph alone);
- **sklearn**: ``NearestNeighbors(n_neighbors=k, n_jobs=-1).fit(coords).kneighbors_graph(mode="distance")``,
  then symmetrised the same way (edge kept if either end lists it), giving the same pair of matrices
  (checked equal to ``knn_graph``'s); its kneighbors_graph time alone is reported too.

Peak memory: each (size, arm) runs once more in its own fresh subprocess: RSS before the arm (after
imports and the table), the process's peak RSS (``resource.getrusage(...).ru_maxrss``, whole process),
and the peak during the arm alone (VmHWM after resetting it through ``/proc/self/clear_refs`` just
before the arm) minus the RSS before it. Goal: 1M spots in under 30 s and 2 GB.

    python benchmarks/spatial_graph.py [--sizes 10000 100000 1000000] [--k 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
from _common import competing, markdown_table, reset_peak_rss, status_kb, write_report

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("spatial_graph", "knn_graph", "sklearn")
MPP = 0.5
PITCH_UM = 100.0
MB = 1024.0  # kB per MB


def hex_coords_um(n: int, seed: int = 0) -> np.ndarray:
    """``n`` jittered hexagonal-grid spot centres in µm (x, y), roughly square."""
    rng = np.random.default_rng(seed)
    cols = int(np.ceil(np.sqrt(n * 2 / np.sqrt(3))))
    rows = int(np.ceil(n / cols))
    r, c = np.divmod(np.arange(rows * cols)[:n], cols)
    x = (c + 0.5 * (r % 2)) * PITCH_UM
    y = r * PITCH_UM * np.sqrt(3) / 2
    xy = np.c_[x, y] + rng.uniform(-0.15, 0.15, (n, 2)) * PITCH_UM
    return xy - xy.min(axis=0) + PITCH_UM


def make_table(n: int):
    import pandas as pd
    from anndata import AnnData

    adata = AnnData(obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)))
    adata.obsm["spatial"] = hex_coords_um(n) / MPP
    adata.uns["hespotex_sample"] = {
        "sample_id": "bench",
        "shapes_key": "bench_spots",
        "coordinate_system": "bench",
        "microns_per_pixel": MPP,
        "spot_diameter_um": 55.0,
        "table_key": "table",
    }
    return adata


def arm_fn(arm: str, adata, k: int):
    """A zero-argument function running ``arm``; it returns ``(connectivities, distances, extra timings)``."""
    from hespotex._sample import spot_centres_um

    coords = spot_centres_um(adata)
    if arm == "spatial_graph":
        import hespotex as hx

        def run():
            hx.pp.spatial_graph(adata, n_neighbors=k, overwrite=True)
            return adata.obsp["spatial_connectivities"], adata.obsp["spatial_distances"], {}

    elif arm == "knn_graph":
        from hespotex.pp._graph import knn_graph

        def run():
            return (*knn_graph(coords, k), {})

    else:
        from sklearn.neighbors import NearestNeighbors

        def run():
            t = time.perf_counter()
            d = NearestNeighbors(n_neighbors=k, n_jobs=-1).fit(coords).kneighbors_graph(mode="distance")
            t_knn = time.perf_counter() - t
            conn = d.copy()
            conn.data[:] = 1.0
            conn = conn.astype(np.float32).maximum(conn.T.astype(np.float32)).tocsr()
            dist = d.maximum(d.T).tocsr().astype(np.float32)
            conn.sort_indices()
            dist.sort_indices()
            return conn, dist, {"kneighbors_graph": t_knn}

    return run


# --------------------------------------------------------------------------------------------------
# children (fresh subprocesses)


def child_memory(spec: dict) -> dict:
    adata = make_table(spec["n"])
    run = arm_fn(spec["arm"], adata, spec["k"])
    before = status_kb("VmRSS")
    reset = reset_peak_rss()
    t = time.perf_counter()
    run()
    wall = time.perf_counter() - t
    return {
        "before_kb": before,
        "arm_peak_kb": status_kb("VmHWM"),
        "process_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "reset": reset,
        "wall": wall,
    }


def child_timing(spec: dict) -> dict:
    import scipy.sparse as sp

    adata = make_table(spec["n"])
    runs = {arm: arm_fn(arm, adata, spec["k"]) for arm in ARMS}
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    extra: list[float] = []
    outputs = {}
    for rep in range(spec["repeats"]):  # A B C, B C A, C A B, ...: interleaved, each arm in every position
        for arm in ARMS[rep % len(ARMS) :] + ARMS[: rep % len(ARMS)]:
            t = time.perf_counter()
            conn, dist, more = runs[arm]()
            times[arm].append(time.perf_counter() - t)
            if "kneighbors_graph" in more:
                extra.append(more["kneighbors_graph"])
            outputs[arm] = (conn, dist)
            del conn, dist
    ref_c, ref_d = outputs["knn_graph"]
    same = {}
    for arm in ("spatial_graph", "sklearn"):
        c, d = outputs[arm]
        same_c = c.shape == ref_c.shape and (sp.csr_matrix(c) != ref_c).nnz == 0
        diff = abs(sp.csr_matrix(d, dtype=np.float64) - ref_d.astype(np.float64))
        same[arm] = {"connectivities": bool(same_c), "max_distance_diff_um": float(diff.max()) if diff.nnz else 0.0}
    deg = np.diff(ref_c.indptr)
    return {
        "times": times,
        "kneighbors_graph": extra,
        "same": same,
        "edges": int(ref_c.nnz),
        "mean_degree": float(deg.mean()),
    }


def run_child(kind: str, spec: dict) -> dict:
    cmd = [sys.executable, "-W", "ignore", __file__, f"--{kind}", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if res.returncode != 0:
        msg = f"{kind} child {spec} failed:\n{res.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "spatial_graph.md"))
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timing-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(child_memory(json.loads(args.memory_child))))
        return
    if args.timing_child:
        print(json.dumps(child_timing(json.loads(args.timing_child))))
        return

    import scipy
    import sklearn

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/spatial_graph.py", *sys.argv[1:]])
    load_start, competing_start = os.getloadavg(), competing()
    t_all = time.perf_counter()
    timing, memory = {}, {}
    for n in args.sizes:
        # small sizes take milliseconds: repeat them more (x10 at 10k, x3 at 100k) for stable medians
        spec = {"n": n, "k": args.k, "repeats": args.repeats * max(1, round((1_000_000 / n) ** 0.5))}
        timing[n] = run_child("timing-child", spec)
        print(f"{n}: {timing[n]}", file=sys.stderr)
        for arm in ARMS:
            memory[(n, arm)] = run_child("memory-child", {**spec, "arm": arm})
            print(f"{n} {arm}: {memory[(n, arm)]}", file=sys.stderr)
    wall = time.perf_counter() - t_all
    load_end, competing_end = os.getloadavg(), competing()

    rows = []
    for n, t in timing.items():
        med = {arm: median(t["times"][arm]) for arm in ARMS}
        reps = len(t["times"]["knn_graph"])
        ratio_sk = [t["times"]["sklearn"][i] / t["times"]["knn_graph"][i] for i in range(reps)]
        ratio_kng = [t["kneighbors_graph"][i] / t["times"]["knn_graph"][i] for i in range(reps)]
        ratio_sg = [t["times"]["spatial_graph"][i] / t["times"]["knn_graph"][i] for i in range(reps)]
        mem = memory[(n, "spatial_graph")]
        rows.append(
            [f"{n:,}", f"{t['edges']:,} ({t['mean_degree']:.2f})", f"**{med['spatial_graph']:.2f}**",
             f"{med['knn_graph']:.2f}", f"{med['sklearn']:.2f} ({median(t['kneighbors_graph']):.2f})",
             f"{median(ratio_sk):.2f} ({min(ratio_sk):.2f}-{max(ratio_sk):.2f})",
             f"{median(ratio_kng):.2f} ({min(ratio_kng):.2f}-{max(ratio_kng):.2f})",
             f"{median(ratio_sg):.2f}",
             f"**{mem['process_peak_kb'] / MB:.0f}** (+{(mem['arm_peak_kb'] - mem['before_kb']) / MB:.0f})",
             ("yes" if all(s["connectivities"] for s in t["same"].values()) else "NO")
             + f" (max dist diff {max(s['max_distance_diff_um'] for s in t['same'].values()):.1e} µm)"]
        )  # fmt: skip
    header = ["spots", "edges (mean degree)", "spatial_graph s", "knn_graph s",
              "sklearn s, all (kneighbors_graph only)", "sklearn all / knn_graph",
              "sklearn kneighbors_graph only / knn_graph",
              "spatial_graph / knn_graph", "spatial_graph peak RSS MB (+ over baseline)", "same graph"]  # fmt: skip
    main_table = markdown_table(header, rows)

    mem_rows = [
        [f"{n:,}", arm, f"{m['before_kb'] / MB:.0f}", f"{m['process_peak_kb'] / MB:.0f}",
         f"{m['arm_peak_kb'] / MB:.0f}",
         f"{(m['arm_peak_kb'] - m['before_kb']) / MB:.0f}", f"{m['wall']:.2f}"]
        for (n, arm), m in memory.items()
    ]  # fmt: skip
    mem_table = markdown_table(
        ["spots", "arm", "baseline RSS before arm (MB)", "process peak RSS, ru_maxrss (MB)", "peak during arm (MB)",
         "increase over baseline (MB)", "wall s (single run)"],
        mem_rows,
    )  # fmt: skip

    n_max = max(timing)
    t_max = median(timing[n_max]["times"]["spatial_graph"])
    m_max = memory[(n_max, "spatial_graph")]["process_peak_kb"] / MB
    busy = competing_start or competing_end
    notes = [
        f"- Command: `{command}` (wall {wall:.0f} s)",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores; numpy {np.__version__}, scipy {scipy.__version__}, "
        f"scikit-learn {sklearn.__version__}, Python {platform.python_version()}; cKDTree.query(workers=-1) and "
        "NearestNeighbors(n_jobs=-1) both use every core.",
        f"- os.getloadavg() at start: {', '.join(f'{v:.2f}' for v in load_start)}; at end: "
        f"{', '.join(f'{v:.2f}' for v in load_end)}",
        f"- Load above the {os.cpu_count()} cores means other jobs shared the machine: absolute times are inflated."
        if max(load_start[0], load_end[0]) > (os.cpu_count() or 1)
        else "- The machine was otherwise quiet (1-min load below the core count).",
        "- Another long benchmark (benchmarks/her2st_cv.py) WAS running during this run "
        f"(pgrep -f her2st_cv at start: {len(competing_start)} process(es), at end: {len(competing_end)}), besides "
        "other jobs: absolute times are inflated; ratios come from interleaved repeats (A B C, B C A, C A B, ..., "
        "medians of per-repeat ratios)."
        if busy
        else "- No her2st_cv benchmark was running (pgrep -f her2st_cv found nothing at start or end).",
        f"- Coordinates: hexagonal grid, {PITCH_UM:.0f} µm pitch, jitter ±15 µm, table at {MPP} µm/px; k = {args.k}, "
        f"symmetric; interleaved repeats per size in one fresh subprocess per size: "
        + ", ".join(f"{len(t['times']['knn_graph'])} at {n:,}" for n, t in timing.items())
        + ".",
        "- sklearn arm: fit + kneighbors_graph(mode='distance') (self excluded), then symmetrised (maximum with the "
        "transpose) and cast to float32 so its output equals knn_graph's; 'same graph' compares connectivities "
        "of all arms with knn_graph's (edge sets identical).",
        "- Memory: one fresh subprocess per (size, arm). Baseline = RSS after imports and building the table; "
        "'process peak' = resource.getrusage ru_maxrss of that subprocess (imports and table included); "
        "'peak during arm' = VmHWM after resetting it through /proc/self/clear_refs right before the arm.",
        f"- Goal (1M spots under 30 s and 2 GB): spatial_graph {t_max:.1f} s, process peak {m_max:.0f} MB at "
        f"{n_max:,} spots: "
        + (("met" if (t_max < 30 and m_max < 2048) else "NOT met") if n_max >= 1_000_000 else "1M not measured")
        + ".",
    ]
    text = "\n\n".join(
        [
            "# hx.pp.spatial_graph: build time and peak memory",
            main_table,
            "Ratios > 1: knn_graph (scipy cKDTree) is faster than sklearn. Times are medians in seconds.",
            "## Peak memory per arm (fresh subprocess each)",
            mem_table,
            "## Notes",
            "\n".join(notes),
        ]
    )
    write_report(text, args.out)


if __name__ == "__main__":
    main()

"""Throughput and peak memory of ``hx.pp.embed`` against the raw encoder forward on the same patches.

Two arms, run side by side in one process (interleaved A B A B ..., medians of the repeats):

- **pipeline**: ``hx.pp.embed(sdata, encoder=enc, cache=False)``: plan the crops, fingerprint the image
  (cache key), read the crops from the dask-backed image element, resize (antialiased bilinear),
  normalise, forward, in batches, with the next batch read in a background thread;
- **raw**: ``encoder.model(x)`` under ``torch.inference_mode()`` on pre-made normalised tensors of the
  very same patches, in the same batches (their outputs are checked equal to the pipeline's).

ratio = pipeline throughput / raw forward throughput (goal >= 0.9), from wall time and, less sensitive
to other processes on the machine, from this process's CPU time. Encoders: ``resnet18`` (random init)
and ``efficientnet_lite0.imagenet``. Data: her2st section C2 (187 spots, 200 µm patches = 290 px crops
resized to 224) and a synthetic Visium-like slide at 0.5 µm/px (110 µm patches = 220 px crops).

Peak memory per arm: before every timed arm the process's RSS high-water mark is reset to its current
RSS (``/proc/self/clear_refs``, Linux >= 4.0); after it ``/proc/self/status`` VmHWM is the peak during
the arm (the figure ``resource.getrusage(...).ru_maxrss`` reports for the live threads). The table
gives that peak and its increase over the RSS at the arm's start (max over repeats).

A stage profile (serial, no prefetch thread) says where the pipeline spends time beyond the forward.

OpenMP wait policy: torch's CPU kernels run on libgomp, whose idle threads spin-wait between parallel
regions unless the process manages more OpenMP threads than there are cores. On a machine shared with
other jobs the spinning steals time slices, and the pipeline's loader thread (a second OpenMP team,
hence "throttled" spinning) made the raw arm look 10-30 % *slower* than the whole pipeline. Both arms
are therefore run under ``OMP_WAIT_POLICY=PASSIVE`` by default (``--omp-wait-policy default`` leaves
the environment as it is).

    python benchmarks/embed_throughput.py [--repeats 3] [--synthetic-spots 128] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from statistics import median

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from _common import competing, markdown_table, reset_peak_rss, status_kb, write_report

ENCODERS = ("resnet18", "efficientnet_lite0.imagenet")
DATASETS = ("her2st C2", "synthetic")
ROOT = Path(__file__).resolve().parents[1]
MB = 1024.0  # kB per MB


# --------------------------------------------------------------------------------------------------
# machine, load and memory helpers


def _machine() -> str:
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op threads, "
        f"Python {platform.python_version()}"
    )


def measured(fn, *args):
    """Run ``fn(*args)``; return its result, wall s, process CPU s (all threads), peak RSS kB and its increase."""
    start = status_kb("VmRSS")
    reset_peak_rss()
    w0, c0 = time.perf_counter(), time.process_time()
    res = fn(*args)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = status_kb("VmHWM")
    return res, {"wall": wall, "cpu": cpu, "peak_kb": peak, "inc_kb": peak - start}


# --------------------------------------------------------------------------------------------------
# data, arms


def load_dataset(name: str, *, synthetic_spots: int, data: str | None):
    import hespotex as hx

    if name == "her2st C2":
        return hx.datasets.her2st(data, sections=["C2"])["C2"]
    return hx.datasets.synthetic(n_spots=synthetic_spots, microns_per_pixel=0.5, seed=0)


def premade_batches(sdata, enc, batch_size: int):
    """The normalised input tensors the pipeline feeds the encoder, batch by batch, and their spot indices."""
    from hespotex.pp._patches import plan_patches, resize_batch

    plan = plan_patches(sdata, out_px=enc.input_size)
    idx = list(plan.batches(batch_size))
    return idx, [enc.normalize(resize_batch(plan.read(i), enc.input_size)) for i in idx], plan


def clear_embedding(sdata) -> None:
    """Drop the previous repeat's embeddings: ``embed`` returns at once when the table already holds them."""
    table = sdata.tables["table"]
    table.obsm.pop("X_bench", None)
    table.uns.get("hespotex_embed", {}).pop("X_bench", None)


def run_pipeline(sdata, enc, batch_size: int) -> None:
    import hespotex as hx

    hx.pp.embed(sdata, encoder=enc, cache=False, batch_size=batch_size, key_added="X_bench", overwrite=True)


def run_raw(model, xs) -> list:
    import torch

    with torch.inference_mode():
        return [model(x) for x in xs]


# --------------------------------------------------------------------------------------------------
# stage profile


def profile_stages(sdata, enc, batch_size: int) -> dict[str, float]:
    """Serial timing of every pipeline stage except the forward (no prefetch thread), seconds per pass."""
    from hespotex.pp._embed import cache_key
    from hespotex.pp._patches import plan_patches, resize_batch

    out: dict[str, float] = {}
    t = time.perf_counter()
    plan = plan_patches(sdata, out_px=enc.input_size)
    out["plan_patches"] = time.perf_counter() - t
    t = time.perf_counter()
    cache_key(plan, enc)
    out["cache key (image fingerprint)"] = time.perf_counter() - t
    read = resize = norm = 0.0
    for idx in plan.batches(batch_size):
        t0 = time.perf_counter()
        crops = plan.read(idx)
        t1 = time.perf_counter()
        x = resize_batch(crops, enc.input_size)
        t2 = time.perf_counter()
        enc.normalize(x)
        t3 = time.perf_counter()
        read, resize, norm = read + t1 - t0, resize + t2 - t1, norm + t3 - t2
    out["read crops (dask)"] = read
    out["resize (float32, antialias)"] = resize
    out["normalise"] = norm
    return out


def candidate_resize(sdata, enc, batch_size: int) -> float:
    """Seconds per pass of a candidate resize: antialiased bilinear on uint8 channels-last, then to float."""
    import torch
    import torch.nn.functional as F

    from hespotex.pp._patches import plan_patches

    plan = plan_patches(sdata, out_px=enc.input_size)
    total = 0.0
    for idx in plan.batches(batch_size):
        crops = plan.read(idx)
        t = time.perf_counter()
        x = torch.from_numpy(crops).contiguous(memory_format=torch.channels_last)
        if x.shape[-1] != enc.input_size:
            size = (enc.input_size, enc.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x.float().div_(255.0).contiguous()
        total += time.perf_counter() - t
    return total


# --------------------------------------------------------------------------------------------------
# main


def bench_pair(sdata, ename: str, *, repeats: int, batch_size: int) -> dict:
    """Interleaved repeats of the pipeline and raw arms for one data set and encoder."""
    import torch

    from hespotex.pp import load_encoder
    from hespotex.pp._encode import inference_model

    enc = load_encoder(ename)
    idx, xs, plan = premade_batches(sdata, enc, batch_size)
    net, _ = inference_model(enc.model)  # the network as the pipeline runs it (BatchNorm folded, channels-last)
    with torch.inference_mode():  # warm-up: first-call allocations of the model
        net(xs[0][:8])
    pipe, raw, raw_out = [], [], None
    for _ in range(repeats):  # A B A B ...
        clear_embedding(sdata)
        _, m = measured(run_pipeline, sdata, enc, batch_size)
        pipe.append(m)
        out, m = measured(run_raw, net, xs)
        raw.append(m)
        raw_out = raw_out or out
    table = sdata.tables["table"]
    ref = np.empty_like(table.obsm["X_bench"])
    for i, o in zip(idx, raw_out, strict=True):
        ref[i] = o.numpy()
    return {
        "n": table.n_obs,
        "geometry": f"{plan.patch_um:.0f} µm = {plan.size} px -> {enc.input_size}",
        "pipe": pipe,
        "raw": raw,
        "ratio_wall": [r["wall"] / p["wall"] for p, r in zip(pipe, raw, strict=True)],
        "ratio_cpu": [r["cpu"] / p["cpu"] for p, r in zip(pipe, raw, strict=True)],
        "max_diff": float(np.abs(ref - table.obsm["X_bench"]).max()),
        "premade_mb": sum(x.numel() * x.element_size() for x in xs) / 2**20,
        "n_batches": len(idx),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each arm")
    parser.add_argument("--synthetic-spots", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", default=None, help="her2st folder (default: HESPOTEX_DATA or ../shared/data)")
    parser.add_argument(
        "--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
        help="OMP_WAIT_POLICY for torch's libgomp in both arms ('default': leave the environment alone)",
    )  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "embed_throughput.md"))
    args = parser.parse_args()
    if args.omp_wait_policy != "default":  # read by libgomp when torch loads: set before importing it
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy

    import logging

    import hespotex as hx
    from hespotex.pp import load_encoder

    hx.settings.progress = False
    logging.getLogger("hespotex").setLevel(logging.WARNING)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/embed_throughput.py", *sys.argv[1:]])
    load_start, competing_start = os.getloadavg(), competing()
    can_reset = reset_peak_rss()
    t_all = time.perf_counter()

    results, profiles = {}, {}
    for dname in DATASETS:
        sdata = load_dataset(dname, synthetic_spots=args.synthetic_spots, data=args.data)
        for ename in ENCODERS:
            r = bench_pair(sdata, ename, repeats=args.repeats, batch_size=args.batch_size)
            results[(dname, ename)] = r
            print(
                f"{dname} / {ename}: pipeline {[round(m['wall'], 2) for m in r['pipe']]} s, raw "
                f"{[round(m['wall'], 2) for m in r['raw']]} s, ratio {median(r['ratio_wall']):.3f}",
                file=sys.stderr,
            )
        enc = load_encoder("resnet18")  # the stages before the forward do not depend on the encoder
        profiles[dname] = profile_stages(sdata, enc, args.batch_size)
        profiles[dname]["candidate"] = candidate_resize(sdata, enc, args.batch_size)
        del sdata
    wall = time.perf_counter() - t_all
    load_end, competing_end = os.getloadavg(), competing()

    rows = []
    for (dname, ename), r in results.items():
        n = r["n"]
        tp, tr = median(m["wall"] for m in r["pipe"]), median(m["wall"] for m in r["raw"])
        rw, rc = r["ratio_wall"], r["ratio_cpu"]
        peak_p, peak_r = max(r["pipe"], key=lambda m: m["inc_kb"]), max(r["raw"], key=lambda m: m["inc_kb"])
        rows.append(
            [dname, ename, n, r["geometry"], f"{n / tp:.1f}", f"{n / tr:.1f}",
             f"**{median(rw):.2f}** ({min(rw):.2f}-{max(rw):.2f})", f"{median(rc):.2f} ({min(rc):.2f}-{max(rc):.2f})",
             f"{tp:.1f} / {tr:.1f}",
             f"{peak_p['peak_kb'] / MB:.0f} (+{peak_p['inc_kb'] / MB:.0f})",
             f"{peak_r['peak_kb'] / MB:.0f} (+{peak_r['inc_kb'] / MB:.0f})"]
        )  # fmt: skip
    header = ["data", "encoder", "spots", "patch", "pipeline patches/s", "raw forward patches/s",
              "ratio, wall (min-max)", "ratio, CPU time (min-max)", "median wall s pipeline / raw",
              "peak RSS MB pipeline (+arm)", "peak RSS MB raw (+arm)"]  # fmt: skip
    main_table = markdown_table(header, rows)

    prof_rows = []
    for dname, stages in profiles.items():
        stages = dict(stages)
        candidate = stages.pop("candidate")
        n = next(r["n"] for (d, _), r in results.items() if d == dname)
        fwd = {e: median(m["wall"] for m in r["raw"]) for (d, e), r in results.items() if d == dname}
        prep = sum(stages.values())
        for stage, sec in stages.items():
            prof_rows.append([dname, stage, f"{sec:.3f}", *(f"{100 * sec / f:.1f}%" for f in fwd.values())])
        prof_rows.append(
            [dname, f"**all but forward** ({n / prep:.0f} patches/s alone)", f"{prep:.3f}",
             *(f"{100 * prep / f:.1f}%" for f in fwd.values())]
        )  # fmt: skip
        prof_rows.append(
            [dname, "expected ratio with no overlap at all: forward / (forward + all but forward)", "",
             *(f"{f / (f + prep):.2f}" for f in fwd.values())]
        )  # fmt: skip
        for (d, e), r in results.items():
            if d == dname:
                gap = median(m["wall"] for m in r["pipe"]) - median(m["wall"] for m in r["raw"])
                prof_rows.append([dname, f"measured: median pipeline - median raw, {e}", f"{gap:.3f}", "", ""])
        prof_rows.append(
            [dname, "candidate: resize on uint8 channels-last, then float", f"{candidate:.3f}",
             *(f"{100 * candidate / f:.1f}%" for f in fwd.values())]
        )  # fmt: skip
    prof_table = markdown_table(
        ["data", "stage (serial, one pass)", "s", *(f"% of {e} forward" for e in ENCODERS)], prof_rows
    )

    busy = competing_start or competing_end
    r0 = next(iter(results.values()))
    notes = [
        f"- Command: `{command}` (wall {wall:.0f} s)",
        f"- Machine: {_machine()}; no GPU (device CPU); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} "
        "(see the module docstring: with libgomp's default spinning on a shared machine the raw arm is the slower one)",
        f"- os.getloadavg() at start: {', '.join(f'{v:.2f}' for v in load_start)}; "
        f"at end: {', '.join(f'{v:.2f}' for v in load_end)}",
        f"- Load above the {os.cpu_count()} cores means other jobs shared the machine: absolute times are inflated "
        "and noisy."
        if max(load_start[0], load_end[0]) > (os.cpu_count() or 1)
        else "- The machine was otherwise quiet (1-min load below the core count).",
        "- Another long benchmark (benchmarks/her2st_cv.py) WAS running during this run "
        f"(pgrep -f her2st_cv at start: {len(competing_start)} process(es), at end: {len(competing_end)}), besides "
        "other jobs on the machine: absolute times are inflated and noisy; the ratios (interleaved A B A B, "
        "median of the per-repeat ratios) much less so, the CPU-time ratio least."
        if busy
        else "- No her2st_cv benchmark was running (pgrep -f her2st_cv found nothing at start or end).",
        f"- {args.repeats} interleaved repeats per arm, batch size {args.batch_size}, cache=False. The pipeline arm "
        "times the whole `hx.pp.embed` call (plan, cache key, crops, resize, normalise, forward, copy to obsm); "
        "the raw arm only `encoder.model(x)` over pre-made normalised batches (the same batches, same order).",
        "- Check: pipeline and raw outputs agree, max |diff| "
        + ", ".join(f"{r['max_diff']:.1e} ({d} / {e})" for (d, e), r in results.items()),
        "- Peak memory: VmHWM of this process (what resource.getrusage ru_maxrss reports), reset to the current RSS "
        "through /proc/self/clear_refs before each arm "
        f"({'works here' if can_reset else 'NOT permitted here: peaks are process-wide'}); "
        "shown: peak during the arm, and (+) its increase over the RSS at the arm's start, max over repeats. "
        "The absolute peak includes the loaded sample (the her2st JPEG and its pyramid) and, in both arms, the "
        f"pre-made tensors of the raw arm ({r0['premade_mb']:.0f} MB for {r0['n']} patches), which exist "
        "before either arm starts and so are not in the (+) figure.",
    ]
    text = "\n\n".join(
        [
            "# hx.pp.embed throughput vs raw encoder forward",
            main_table,
            "ratio = pipeline patches/s / raw forward patches/s (goal >= 0.9).",
            "## Where the pipeline spends time beyond the forward (serial stage profile)",
            prof_table,
            "## Notes",
            "\n".join(notes),
        ]
    )
    write_report(text, args.out)


if __name__ == "__main__":
    main()

"""Throughput and peak memory of ``hx.pp.embed`` against the raw encoder forward on the same patches.

Two arms, run side by side (interleaved A B A B ..., medians of the repeats):

- **pipeline**: ``hx.pp.embed(sdata, encoder=enc, cache=False)``: plan the crops, fingerprint the image
  (cache key), read the crops from the dask-backed image element, resize (antialiased bilinear),
  normalise, forward, in batches, with the next batch read in a background thread;
- **raw**: ``encoder.model(x)`` under ``torch.inference_mode()`` on pre-made normalised tensors of the
  very same patches, in the same batches.

ratio = pipeline throughput / raw forward throughput (goal >= 0.9). Encoders: ``resnet18`` (random
init) and ``efficientnet_lite0.imagenet``. Data: her2st section C2 (187 spots, 200 µm patches = 290 px
crops resized to 224) and a synthetic Visium-like slide at 0.5 µm/px (110 µm patches = 220 px crops).
Peak memory: each (data, encoder, arm) runs once more in a fresh subprocess; the process's RSS
high-water mark (``/proc/self/status`` VmHWM, the figure ``resource.getrusage`` reports as
``ru_maxrss``) is reset with ``/proc/self/clear_refs`` once the data and the encoder are loaded, so the
peak is that of the arm alone. A stage profile (serial, no prefetch thread) says where the pipeline
spends its time beyond the forward pass.

    python benchmarks/embed_throughput.py [--repeats 3] [--synthetic-spots 192] [--batch-size 64]
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

ENCODERS = ("resnet18", "efficientnet_lite0.imagenet")
DATASETS = ("her2st C2", "synthetic")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# machine, load and memory helpers


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _competing() -> list[str]:
    """Command lines of a running her2st_cv benchmark (another long benchmark on this machine)."""
    res = subprocess.run(["pgrep", "-af", "her2st_cv"], capture_output=True, text=True, check=False)
    return [line for line in res.stdout.splitlines() if "pgrep" not in line]


def _machine() -> str:
    import torch

    return (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op threads, Python {platform.python_version()}"
    )


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


def run_pipeline(sdata, enc, batch_size: int) -> float:
    import hespotex as hx

    t = time.perf_counter()
    hx.pp.embed(sdata, encoder=enc, cache=False, batch_size=batch_size, key_added="X_bench", overwrite=True)
    return time.perf_counter() - t


def run_raw(model, xs) -> tuple[float, list]:
    import torch

    with torch.inference_mode():
        t = time.perf_counter()
        out = [model(x) for x in xs]
        return time.perf_counter() - t, out


# --------------------------------------------------------------------------------------------------
# child: one arm in a fresh process, for its peak memory


def child(spec: dict) -> None:
    import logging

    import hespotex as hx
    from hespotex.pp import load_encoder

    hx.settings.progress = False
    logging.getLogger("hespotex").setLevel(logging.WARNING)
    sdata = load_dataset(spec["dataset"], synthetic_spots=spec["synthetic_spots"], data=spec["data"])
    enc = load_encoder(spec["encoder"])
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = _status_kb("VmRSS")
    reset = _reset_peak_rss()
    t = time.perf_counter()
    if spec["arm"] == "pipeline":
        run_pipeline(sdata, enc, spec["batch_size"])
    else:  # the raw arm holds every normalised patch, as it must to time the forward alone
        _, xs, _ = premade_batches(sdata, enc, spec["batch_size"])
        run_raw(enc.model, xs)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"load_peak_kb": load_peak, "start_kb": start, "peak_kb": peak, "reset": reset, "wall_s": wall}))


def measure_memory(spec: dict) -> dict:
    cmd = [sys.executable, "-W", "ignore", __file__, "--child", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if res.returncode != 0:
        msg = f"memory child {spec} failed:\n{res.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads(res.stdout.strip().splitlines()[-1])


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


# --------------------------------------------------------------------------------------------------
# main


def fmt_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each arm")
    parser.add_argument("--synthetic-spots", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", default=None, help="her2st folder (default: HESPOTEX_DATA or ../shared/data)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "embed_throughput.md"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    import logging

    import torch

    import hespotex as hx
    from hespotex.pp import load_encoder

    hx.settings.progress = False
    logging.getLogger("hespotex").setLevel(logging.WARNING)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/embed_throughput.py", *sys.argv[1:]])
    load_start = os.getloadavg()
    competing_start = _competing()
    t_all = time.perf_counter()

    results, profiles, checks = [], {}, {}
    for dname in DATASETS:
        sdata = load_dataset(dname, synthetic_spots=args.synthetic_spots, data=args.data)
        n = sdata.tables["table"].n_obs
        for ename in ENCODERS:
            enc = load_encoder(ename)
            idx, xs, plan = premade_batches(sdata, enc, args.batch_size)
            geometry = f"{plan.patch_um:.0f} µm = {plan.size} px (level {plan.level.level}) -> {enc.input_size}"
            with torch.inference_mode():  # warm-up: first-call allocations of the model
                enc.model(xs[0][:8])
            t_pipe, t_raw, raw_out = [], [], None
            for _ in range(args.repeats):  # A B A B ...
                t_pipe.append(run_pipeline(sdata, enc, args.batch_size))
                t, out = run_raw(enc.model, xs)
                t_raw.append(t)
                raw_out = raw_out or out
            ref = np.empty_like(sdata.tables["table"].obsm["X_bench"])
            for i, o in zip(idx, raw_out, strict=True):
                ref[i] = o.numpy()
            checks[(dname, ename)] = float(np.abs(ref - sdata.tables["table"].obsm["X_bench"]).max())
            ratios = [r / p for p, r in zip(t_pipe, t_raw, strict=True)]
            results.append(
                {
                    "dataset": dname,
                    "encoder": ename,
                    "n": n,
                    "geometry": geometry,
                    "t_pipe": t_pipe,
                    "t_raw": t_raw,
                    "ratio": median(ratios),
                    "ratio_range": (min(ratios), max(ratios)),
                }
            )
            print(f"{dname} / {ename}: pipeline {t_pipe} s, raw {t_raw} s, ratio {median(ratios):.3f}", file=sys.stderr)
        profiles[dname] = profile_stages(sdata, enc, args.batch_size)
        del sdata, xs

    memory = {}
    if not args.no_memory:
        for dname in DATASETS:
            for ename in ENCODERS:
                for arm in ("pipeline", "raw"):
                    spec = {"dataset": dname, "encoder": ename, "arm": arm, "batch_size": args.batch_size,
                            "synthetic_spots": args.synthetic_spots, "data": args.data}  # fmt: skip
                    memory[(dname, ename, arm)] = measure_memory(spec)
                    print(f"memory {dname} / {ename} / {arm}: {memory[(dname, ename, arm)]}", file=sys.stderr)
    wall = time.perf_counter() - t_all
    load_end = os.getloadavg()
    competing_end = _competing()

    mb = 1024.0
    rows = []
    for r in results:
        n = r["n"]
        tp, tr = median(r["t_pipe"]), median(r["t_raw"])
        row = [r["dataset"], r["encoder"], n, r["geometry"], f"{n / tp:.1f}", f"{n / tr:.1f}",
               f"**{r['ratio']:.2f}** ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})",
               f"{tp:.1f} / {tr:.1f}"]  # fmt: skip
        mem_p, mem_r = (
            memory.get((r["dataset"], r["encoder"], "pipeline")),
            memory.get((r["dataset"], r["encoder"], "raw")),
        )
        row += [f"{mem_p['peak_kb'] / mb:.0f} (+{(mem_p['peak_kb'] - mem_p['start_kb']) / mb:.0f})" if mem_p else "-",
                f"{mem_r['peak_kb'] / mb:.0f} (+{(mem_r['peak_kb'] - mem_r['start_kb']) / mb:.0f})" if mem_r else "-"]  # fmt: skip
        rows.append(row)
    header = ["data", "encoder", "spots", "patch", "pipeline patches/s", "raw forward patches/s",
              "ratio (min-max)", "median s pipeline / raw", "peak RSS MB pipeline (+arm)", "peak RSS MB raw (+arm)"]  # fmt: skip
    main_table = fmt_table(header, rows)

    prof_rows = []
    for dname, stages in profiles.items():
        fwd = {r["encoder"]: median(r["t_raw"]) for r in results if r["dataset"] == dname}
        prep = sum(stages.values())
        for stage, sec in stages.items():
            prof_rows.append([dname, stage, f"{sec:.3f}", *(f"{100 * sec / f:.1f}%" for f in fwd.values())])
        prof_rows.append(
            [dname, "**all but forward**", f"{prep:.3f}", *(f"{100 * prep / f:.1f}%" for f in fwd.values())]
        )
        for r in results:
            if r["dataset"] == dname:
                gap = median(r["t_pipe"]) - median(r["t_raw"])
                prof_rows.append([dname, f"measured pipeline - raw, {r['encoder']}", f"{gap:.3f}", "", ""])
    prof_table = fmt_table(
        ["data", "stage (serial, one pass)", "s", *(f"% of {e} forward" for e in ENCODERS)], prof_rows
    )

    mem_rows = [[d, e, a, f"{m['load_peak_kb'] / mb:.0f}", f"{m['start_kb'] / mb:.0f}", f"{m['peak_kb'] / mb:.0f}",
                 f"{(m['peak_kb'] - m['start_kb']) / mb:.0f}", f"{m['wall_s']:.1f}", "yes" if m["reset"] else "no"]
                for (d, e, a), m in memory.items()]  # fmt: skip
    mem_table = fmt_table(["data", "encoder", "arm", "process peak before arm (MB)", "RSS at arm start (MB)",
                           "arm peak RSS (MB)", "arm increase (MB)", "arm wall s", "peak reset"], mem_rows)  # fmt: skip

    busy = competing_start or competing_end
    notes = [
        f"- Command: `{command}` (wall {wall:.0f} s)",
        f"- Machine: {_machine()}",
        f"- os.getloadavg() at start: {', '.join(f'{v:.2f}' for v in load_start)}; at end: {', '.join(f'{v:.2f}' for v in load_end)}",
        "- Another long benchmark (benchmarks/her2st_cv.py) WAS running during this run "
        f"(pgrep at start: {len(competing_start)} process(es), at end: {len(competing_end)}); absolute times are "
        "inflated and noisy, ratios (interleaved A B A B, median of per-repeat ratios) much less so."
        if busy
        else "- No her2st_cv benchmark was running (pgrep -f her2st_cv found nothing at start or end).",
        f"- {args.repeats} interleaved repeats per arm, batch size {args.batch_size}, cache=False, device CPU. "
        "The pipeline arm times the whole `hx.pp.embed` call (plan, cache key, crops, resize, normalise, "
        "forward, copy to obsm); the raw arm times only `encoder.model(x)` over pre-made normalised batches.",
        "- Check: pipeline and raw outputs agree to max |diff| "
        + ", ".join(f"{v:.1e} ({d} / {e})" for (d, e), v in checks.items()),
        "- Peak memory: VmHWM of a fresh subprocess per arm (= resource.getrusage ru_maxrss), reset with "
        "/proc/self/clear_refs after loading the data and the encoder, so 'arm peak' is the peak during the arm; "
        "'+arm' is that peak minus the RSS at the arm's start. The raw arm holds all normalised patches "
        "(spots x 3 x 224 x 224 float32) by design; the pipeline holds about two batches.",
    ]
    text = "\n\n".join(
        [
            "# hx.pp.embed throughput vs raw encoder forward",
            main_table,
            "ratio = pipeline patches/s / raw forward patches/s (goal >= 0.9).",
            "## Where the pipeline spends time beyond the forward (serial stage profile)",
            prof_table,
            "## Peak memory per arm (fresh subprocess each)",
            mem_table if mem_rows else "(skipped: --no-memory)",
            "## Notes",
            "\n".join(notes),
        ]
    )
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()

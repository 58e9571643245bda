"""Whole-slide prediction end to end: time, peak memory and throughput at 10k, 50k and 100k tissue tiles.

For each target tile count a synthetic pyramidal OME-TIFF is written (``hx.datasets.synthetic_wsi``,
JPEG tiles, one seed, its side chosen from a small calibration slide so that the tissue holds about
that many pseudo-spots), then the command line runs on it in subprocesses, as a user would:

1. ``hespotex tile --model M --out S.tiles.zarr S.ome.tif``: tissue detection and pseudo-spots;
2. ``hespotex predict --model M --out P S.tiles.zarr``: streaming embedding + graph + prediction,
   written incrementally to ``P/S.tiles.zarr``.

Each subprocess is timed (wall) and its peak resident memory read from ``os.wait4`` (the child's own
``ru_maxrss``, so every step is measured apart). ``predict`` also records its in-process work time in
the slide's completion marker (``seconds``: without interpreter start-up and imports), and logs the
time of its embedding phase (reading, cutting, resizing, normalising every tile and the encoder's
forward pass: the part that grows with the tiles) and of that phase's first batch. The per-slide fixed
cost is reported apart, in columns that add up to the wall time with the steady embedding:
``wall - work`` (interpreter start-up and ``import hespotex``), ``work - embedding`` (the lazy imports
of torch, timm, spatialdata..., opening the slide, loading the model, the graph and the gene heads,
writing the table) and the embedding's first batch (first read, the encoder's first forward).

The bare encoder forward is measured side by side in this process, on the same tiles of the same
slide: the first ``--raw-tiles`` tiles are cut, resized and normalised beforehand (``plan_patches``
as ``hx.pp.embed`` does), then only ``encoder.model(x)`` is timed, in batches of ``--batch-size``,
once before and once after the pipeline (the mean rate of the two is used). ratio = pipeline tiles/s
/ bare forward tiles/s: over the steady embedding (after its first batch; the goal >= 0.9, fixed cost
apart), over the whole embedding phase and over the whole command; the forward of a CNN costs the same
on any tile, so a subset of tiles measures its rate.

The model is small and quick to train: the "hespotex" preset with small layers, trained on two
synthetic sections at the slides' resolution (Visium geometry: 55 µm spots, 100 µm apart, 110 µm
patches), encoder EfficientNet-Lite0 (ImageNet weights) at 64 px input. The default resolution is
2 µm/px, so that a 100k-tile slide (about 870 mm² of tissue) stays near 0.7 gigapixels: written in
a few minutes and a few hundred MB on this 2-core machine (at 0.5 µm/px it would be 16 times that).
Both arms use the same torch threads; ``OMP_WAIT_POLICY=PASSIVE`` for both (see embed_throughput.py).

    python benchmarks/wsi.py [--tiles 10000 50000 100000] [--mpp 2.0] [--raw-tiles 4096] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by libgomp when torch loads: before importing it

from _common import competing, markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]
ENCODER, INPUT_SIZE = "efficientnet_lite0.imagenet", 64
N_BLOBS, SEED = 8, 7
CALIBRATION_SIDE = 6144


def log(text: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def run_measured(args: list[str], *, env: dict[str, str], log_file: Path) -> dict:
    """Run a command; return its wall seconds, peak RSS (MB, from os.wait4) and exit code."""
    t0 = time.perf_counter()
    with log_file.open("w") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        msg = f"{shlex.join(args)} exited with {proc.returncode}; see {log_file}:\n{log_file.read_text()[-3000:]}"
        raise RuntimeError(msg)
    return {"wall": wall, "peak_mb": usage.ru_maxrss / 1024.0, "cpu": usage.ru_utime + usage.ru_stime}


# --------------------------------------------------------------------------------------------------
# model, slides


def train_model(folder: Path, mpp: float) -> Path:
    """A small HESpotEx trained on two synthetic sections at ``mpp`` (reused when already there)."""
    import hespotex as hx
    from hespotex.models import ModelConfig

    if (folder / "setup.json").is_file():
        return folder
    small = {
        "ae_epochs": 60,
        "ae_hidden_dim": 128,
        "latent_dim": 32,
        "projection_hidden_dim": 128,
        "head_hidden_dim": 128,
    }
    config = ModelConfig.preset("hespotex", epochs=40, patience=None, **small)
    sections = []
    for seed in (1, 2):
        sdata = hx.datasets.synthetic(
            n_spots=300, n_genes=100, seed=seed, microns_per_pixel=mpp, sample_id=f"train{seed}"
        )
        hx.pp.embed(sdata, encoder=ENCODER, input_size=INPUT_SIZE)
        sections.append(sdata)
    model = hx.tl.train(sections, n_top_genes=50, config=config, validation=None, seed=0)
    return model.save(folder, overwrite=True)


def write_slide(path: Path, side: int, mpp: float) -> dict:
    import hespotex as hx

    t0 = time.perf_counter()
    if not path.is_file():
        hx.datasets.synthetic_wsi(
            path, width=side, height=side, microns_per_pixel=mpp, tile=512, seed=SEED, n_blobs=N_BLOBS
        )
    return {"write_s": time.perf_counter() - t0, "side": side, "file_mb": path.stat().st_size / 2**20}


def tissue_tiles_per_px(model_dir: Path, workdir: Path, mpp: float, env: dict[str, str]) -> float:
    """Pseudo-spots per full-resolution pixel that ``hespotex tile`` lays on a calibration slide.

    The tissue layout of ``synthetic_wsi`` scales with the slide (same seed, same aspect), so the
    tiles per pixel of a small slide predict those of a large one.
    """
    import spatialdata

    slide = workdir / f"calibration_{CALIBRATION_SIDE}.ome.tif"
    write_slide(slide, CALIBRATION_SIDE, mpp)
    tiles = workdir / "calibration.tiles.zarr"
    shutil.rmtree(tiles, ignore_errors=True)
    run_measured(
        [sys.executable, "-m", "hespotex.cli", "--no-progress", "tile", "--model", str(model_dir), "--out", str(tiles),
         str(slide)],
        env=env, log_file=workdir / "calibration.log",
    )  # fmt: skip
    return spatialdata.read_zarr(tiles).tables["table"].n_obs / CALIBRATION_SIDE**2


def embedding_seconds(log_file: Path) -> tuple[int, float, int, float] | None:
    """Patches and seconds of the embedding phase, and the patches and seconds of its first batch (the
    start-up: first read, the encoder's first forward), from the predict subprocess's log."""
    match = re.search(
        r"Embedded (\d+) patches in ([0-9.]+) s .*?first batch of (\d+) after ([0-9.]+) s", log_file.read_text()
    )
    return (int(match[1]), float(match[2]), int(match[3]), float(match[4])) if match else None


LAZY_IMPORTS = "torch, timm, torch_geometric, spatialdata, dask.array, anndata, zarr"


def import_seconds(env: dict[str, str]) -> float:
    """Wall seconds of importing the libraries ``predict`` imports lazily (after ``import hespotex``), in a
    fresh interpreter: paid once per process, inside the first slide's 'work - embedding'."""
    code = f"import time, hespotex; t = time.perf_counter(); import {LAZY_IMPORTS}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# the bare forward


def premade_inputs(tiles_zarr: Path, model_dir: Path, n: int, batch_size: int | None):
    """Normalised encoder inputs of the first ``n`` tiles of the slide, in batches, in the memory layout and
    batch size predict uses (channels-last for timm CNNs, :func:`encoder_batch_size`), so the bare arm is
    the encoder at its best, never a slower reference than what predict runs."""
    import hespotex as hx
    from hespotex.pp import load_encoder
    from hespotex.pp._embed import memory_format
    from hespotex.pp._patches import plan_patches, resize_batch
    from hespotex.tl.prediction._cohort import open_slide
    from hespotex.tl.prediction._stream_stages import encoder_batch_size

    model = hx.tl.HESpotEx.load(model_dir)
    emb = model.embedding
    enc = load_encoder(emb["encoder"], input_size=emb.get("input_size") or INPUT_SIZE)
    sdata = open_slide(tiles_zarr)
    plan = plan_patches(sdata, patch_um=emb["patch_um"], out_px=enc.input_size)
    idx = plan.order[: min(n, len(plan.order))]
    batch_size = batch_size or encoder_batch_size(enc)
    fmt = memory_format(enc.model)
    enc.model.to(memory_format=fmt)
    xs = [
        enc.normalize(resize_batch(plan.read(idx[i : i + batch_size]), enc.input_size)).contiguous(memory_format=fmt)
        for i in range(0, len(idx), batch_size)
    ]
    layout = "channels-last" if str(fmt) == "torch.channels_last" else "contiguous"
    geometry = f"{plan.patch_um:.0f} µm = {plan.size} px -> {enc.input_size} px; batch {batch_size}, {layout}"
    return enc, xs, len(idx), geometry


def bare_forward(enc, xs) -> tuple[float, float]:
    """Wall and CPU seconds of the encoder's forward, as the embedding runs it, over the batches (inference mode,
    after a warm-up batch)."""
    import torch

    from hespotex.pp._encode import inference_model

    net, _ = inference_model(enc.model)  # as the prediction runs it (BatchNorm folded, channels-last)
    with torch.inference_mode():
        net(xs[0])
        t0, c0 = time.perf_counter(), time.process_time()
        for x in xs:
            net(x)
        return time.perf_counter() - t0, time.process_time() - c0


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tiles", nargs="+", type=int, default=[10_000, 50_000, 100_000], help="target tissue tiles per slide"
    )
    parser.add_argument("--mpp", type=float, default=2.0, help="microns per pixel of the synthetic slides")
    parser.add_argument("--raw-tiles", type=int, default=4096, help="tiles of each slide for the bare forward arm")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="batch size of the bare forward arm (default: predict's own)"
    )
    parser.add_argument(
        "--workdir", default="/tmp/hespotex-wsi-bench", help="slides, model and outputs (kept for reruns)"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "wsi.md"))
    parser.add_argument("--prepare-only", action="store_true", help="train the model and write the slides, then stop")
    args = parser.parse_args()

    import logging

    import torch

    import hespotex as hx

    hx.settings.progress = False
    logging.getLogger("hespotex").setLevel(logging.WARNING)
    command = "python " + shlex.join(["benchmarks/wsi.py", *sys.argv[1:]])
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "HESPOTEX_CACHE": str(workdir / "cache"), "PYTHONPATH": str(ROOT)}
    load_start, competing_start, t_all = os.getloadavg(), competing(), time.perf_counter()

    log("training the model")
    t0 = time.perf_counter()
    model_dir = train_model(workdir / f"model_{args.mpp:g}", args.mpp)
    train_s = time.perf_counter() - t0
    per_px = tissue_tiles_per_px(model_dir, workdir, args.mpp, env)
    log(f"calibration: {per_px * 1e6:.0f} tiles per megapixel")
    sides = {target: max(512, round((target / per_px) ** 0.5 / 512) * 512) for target in args.tiles}
    slides = {target: workdir / f"slide_{target // 1000}k_{side}.ome.tif" for target, side in sides.items()}
    made = {}
    for target, slide in slides.items():
        log(f"writing {slide.name}")
        made[target] = write_slide(slide, sides[target], args.mpp)
    if args.prepare_only:
        return

    imports_s = import_seconds(env)
    log(f"lazy imports of predict: {imports_s:.1f} s")
    rows, details = [], []
    for target in args.tiles:
        side, slide, made_t = sides[target], slides[target], made[target]
        name = f"slide_{target // 1000}k"
        tiles = workdir / f"{name}.tiles.zarr"
        preds = workdir / f"predictions_{name}"
        for p in (tiles, preds):
            shutil.rmtree(p, ignore_errors=True)
        log(f"{name}: hespotex tile")
        tile = run_measured(
            [sys.executable, "-m", "hespotex.cli", "--no-progress", "tile", "--model", str(model_dir), "--out",
             str(tiles), str(slide)],
            env=env, log_file=workdir / f"{name}.tile.log",
        )  # fmt: skip
        enc, xs, n_raw, geometry = premade_inputs(tiles, model_dir, args.raw_tiles, args.batch_size)
        log(f"{name}: bare forward ({n_raw} tiles), before")
        raw_before = bare_forward(enc, xs)
        log(f"{name}: hespotex predict")
        load_before = os.getloadavg()[0]
        pred = run_measured(
            [sys.executable, "-m", "hespotex.cli", "--no-progress", "predict", "--model", str(model_dir), "--out",
             str(preds), str(tiles)],
            env=env, log_file=workdir / f"{name}.predict.log",
        )  # fmt: skip
        log(f"{name}: bare forward, after")
        raw_after = bare_forward(enc, xs)
        del xs
        marker = json.loads((preds / f"{name}.tiles.done.json").read_text())
        n = int(marker["n_tiles"])
        n_emb, emb_s, n_first, first_s = embedding_seconds(workdir / f"{name}.predict.log") or (n, *[float("nan")] * 3)
        steady_rate = (n_emb - n_first) / (emb_s - first_s)  # the embedding's throughput after its first batch
        raw_rate = n_raw / ((raw_before[0] + raw_after[0]) / 2)
        raw_cpu_rate = n_raw / ((raw_before[1] + raw_after[1]) / 2)
        cpu_ratio = (n / pred["cpu"]) / raw_cpu_rate
        work_rate, wall_rate, emb_rate = n / marker["seconds"], n / pred["wall"], n_emb / emb_s
        fixed_work, startup = marker["seconds"] - emb_s, pred["wall"] - marker["seconds"]
        row = {
            "target": target, "tiles": n,
            "slide": f"{side} x {side} px ({side * side / 1e9:.2f} Gpx, {made_t['file_mb']:.0f} MB)",
            "tile_s": tile["wall"], "tile_mb": tile["peak_mb"], "predict_wall": pred["wall"],
            "predict_work": marker["seconds"],
            "predict_mb": pred["peak_mb"], "work_rate": work_rate, "wall_rate": wall_rate, "raw_rate": raw_rate,
            "raw_s": (raw_before[0], raw_after[0]), "n_raw": n_raw, "geometry": geometry, "write_s": made_t["write_s"],
            "emb_s": emb_s, "emb_rate": emb_rate, "load": (load_before, os.getloadavg()[0]),
            "first_s": first_s, "n_first": n_first, "steady_rate": steady_rate,
        }  # fmt: skip
        details.append(row)
        log(
            f"{name}: {n} tiles, tile {tile['wall']:.0f} s, predict {pred['wall']:.0f} s "
            f"({marker['seconds']:.0f} s work, "
            f"{emb_s:.0f} s embedding, first batch {first_s:.2f} s) / {pred['peak_mb']:.0f} MB, embedding "
            f"{emb_rate:.0f} tiles/s (steady {steady_rate:.0f}) vs bare {raw_rate:.0f}"
        )
        fixed = startup + fixed_work + first_s  # wall = fixed + steady embedding seconds
        rows.append(
            [f"{target:,}", f"{n:,}", row["slide"], f"{tile['wall']:.0f}",
             f"{pred['wall']:.1f} ({marker['seconds']:.1f})", f"{startup:.1f}", f"{fixed_work:.1f}", f"{first_s:.2f}",
             f"{fixed:.1f}", f"{emb_s - first_s:.1f}", f"{emb_s:.1f}",
             f"**{pred['peak_mb']:.0f}**", f"{raw_rate:.0f}", f"{steady_rate:.0f}", f"**{steady_rate / raw_rate:.2f}**",
             f"{emb_rate:.0f}", f"{emb_rate / raw_rate:.2f}",
             f"{work_rate / raw_rate:.2f} ({wall_rate / raw_rate:.2f})", f"{cpu_ratio:.2f}",
             f"{row['load'][0]:.1f} / {row['load'][1]:.1f}"]
        )  # fmt: skip
    wall = time.perf_counter() - t_all
    load_end, competing_end = os.getloadavg(), competing()

    header = ["target tiles", "tiles", "slide (full resolution)", "tile s", "predict s wall (work)",
              "fixed s: start-up (wall - work)", "fixed s: work - embedding", "fixed s: embedding first batch",
              "fixed s total", "steady embedding s", "embedding s (first batch + steady)", "predict peak RSS MB",
              "bare forward tiles/s", "steady embedding tiles/s", "ratio steady embedding", "embedding tiles/s",
              "ratio embedding", "ratio whole work (wall)", "ratio CPU time", "load avg before / after"]  # fmt: skip
    d0 = details[0] if details else {}
    notes = [
        f"- Command: `{command}` (whole run {wall / 60:.1f} min wall, of which training the model "
        f"{train_s:.0f} s{' (reused from the work folder)' if train_s < 1 else ''})",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads in both arms, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
        f"Python {platform.python_version()}. Load average at start {', '.join(f'{v:.1f}' for v in load_start)}, "
        f"at end {', '.join(f'{v:.1f}' for v in load_end)}"
        + (
            " (above the core count: other jobs shared the machine; absolute times are inflated and noisy)."
            if max(load_start[0], load_end[0]) > (os.cpu_count() or 1)
            else "."
        ),
        "- Another benchmark (her2st_cv) was running at the same time."
        if (competing_start or competing_end)
        else "- No her2st_cv benchmark ran at the same time.",
        f"- Slides: `hx.datasets.synthetic_wsi` at {args.mpp:g} µm/px, seed {SEED}, {N_BLOBS} tissue pieces, "
        "JPEG tiles of 512 px, "
        f"pyramid down to one tile; side chosen from the tissue fraction of a {CALIBRATION_SIDE} px calibration slide "
        f"({per_px * 1e6:.0f} expected tiles per megapixel). Written once and kept in the work folder (writing "
        "time not in the table: "
        + ", ".join(f"{r['write_s']:.0f} s" if r["write_s"] >= 1 else "reused" for r in details)
        + ").",
        '- Model: "hespotex" preset with small layers (latent 32, hidden 128), 50 genes, trained on two '
        "synthetic sections "
        f"at {args.mpp:g} µm/px (55 µm spots 100 µm apart; so 100 µm hexagonal pseudo-spots); encoder {ENCODER} "
        f"at {INPUT_SIZE} px input, patches {d0.get('geometry', '?')}.",
        "- tile / predict: `python -m hespotex.cli tile|predict` in a subprocess each; wall includes interpreter "
        "start-up and imports; peak RSS is the subprocess's own ru_maxrss (os.wait4). predict 'work' is the in-process "
        "time recorded in the completion marker (reading the tile store, embedding, graph, prediction, writing). "
        "'embedding s' is the embedding phase as predict logs it (every tile read, cut, resized, normalised and "
        "through the encoder), split into its first batch (the loader's first read and the encoder's first forward, "
        "which sets up its kernels: a start-up paid once per slide) and the steady rest. The fixed per-slide cost is "
        "'start-up' (interpreter and `import hespotex`) + 'work - embedding' (imports of torch, timm, "
        "torch_geometric, spatialdata..., opening the slide and the model, image fingerprint, graph, gene heads, "
        "writing the table) + the embedding's first batch; 'fixed s total' + 'steady embedding s' = predict wall. "
        f"Of 'work - embedding', importing {LAZY_IMPORTS} after `import hespotex` takes {imports_s:.1f} s in a fresh "
        "interpreter (measured apart, once per run): paid once per process, not again for the next slides of a "
        "cohort run in the same worker.",
        f"- Bare forward: `encoder.model(x)` on pre-made inputs of the first {args.raw_tiles} tiles (spatial "
        "order) of the "
        "same slide, with the batch size and memory layout predict uses (see the model line), in this process, "
        "once before and once after the predict subprocess "
        "(seconds: " + "; ".join(f"{r['raw_s'][0]:.1f} / {r['raw_s'][1]:.1f}" for r in details) + "; the bare "
        "forward is timed after a warm-up batch, so it holds no start-up either). ratio steady embedding = "
        "(tiles - first batch) / steady embedding seconds / bare forward tiles/s: the throughput ratio the goal "
        "names, the fixed per-slide cost apart; ratio embedding = tiles / embedding seconds (first batch included) / "
        "bare forward tiles/s; ratio whole work = predict "
        "tiles/s over its work time / bare forward tiles/s; (wall) with the subprocess's wall. 'ratio CPU "
        "time': predict tiles per CPU second of the whole "
        "subprocess (os.wait4 user+system, start-up and imports included) / bare forward tiles per CPU second of this "
        "process; less sensitive than wall time to other jobs on the machine.",
        "- Goals (issues #5, #12): peak resident memory under 4 GB at 100k tiles; predict >= 0.9 x the bare encoder "
        "forward, with the fixed per-slide cost reported apart. 'load avg': 1-minute load average of the machine "
        f"({os.cpu_count()} cores, shared with other jobs) before and after each predict.",
    ]
    text = "\n\n".join(
        [
            "# Whole-slide prediction end to end (hespotex tile + hespotex predict)",
            markdown_table(header, rows),
            "## Notes",
            "\n".join(notes),
        ]
    )
    write_report(text, args.out)


if __name__ == "__main__":
    main()

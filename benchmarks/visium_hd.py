"""Visium HD at 8 µm bins: read, spatial graph, and streamed prediction (embed + graph + expression) at scale.

For each size a synthetic Visium HD output folder is written once (kept in the work folder): a
pyramidal OME-TIFF H&E slide from ``hx.datasets.synthetic_wsi`` at 0.5 µm/px (JPEG tiles), a square
of ``n`` 8 µm bins over it (16 x 16 px each) with Poisson counts of 50 genes, and the files
Space Ranger writes (``hx.datasets.write_visium_hd``: 10x HDF5 matrices, ``tissue_positions.parquet``,
scale factors, hires/lowres PNGs; 8 and 16 µm bins). Then, each in a fresh subprocess whose own peak
RSS (``os.wait4`` ru_maxrss) is reported:

- **read**: ``hx.io.read_visium_hd(folder, bin_size=8)`` (spatialdata-io reads the matrix and positions and
  builds the squares; the TIFF is opened lazily);
- **graph**: read, then ``hx.pp.spatial_graph(sdata, n_neighbors=8)`` (scipy KD-tree, O(N·k)); the time
  of the graph alone is reported;
- **predict**: read, then ``hx.tl.predict(sdata, model, out=zarr, chunk_size=10_000)``: patches cut
  from the slide's pyramid, embedded chunk by chunk, the graph decoder run block by block, predictions
  written to zarr. The model (small "hespotex" preset, 8-neighbour decoder graph, efficientnet_lite0
  at 32 px input = 16 µm patches at their native 0.5 µm/px) is trained once on a 2,000-bin
  ``hx.datasets.synthetic_visium_hd`` section at the same resolution and kept in the work folder. The
  model is loaded before ``predict`` is timed (a fixed cost, in the notes); after it, the same process
  runs the bare encoder forward on the slide's first patches (read and normalised beforehand, in the
  prediction's batch size and memory layout), in wall and process-CPU seconds: the ceiling of the
  embedding stage, side by side.

    python benchmarks/visium_hd.py [--sizes 100000 600000] [--work /tmp/hespotex-bench-hd] [--skip-predict-above N]
        [--arms read graph predict] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import competing, markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]
MPP = 0.5
BIN_UM = 8
N_GENES = 50
INPUT_SIZE = 32
CHUNK = 10_000


def slide_folder(work: Path, n: int) -> tuple[Path, dict]:
    """Write (once) the Visium HD folder of about ``n`` 8 µm bins; returns it and what was written."""
    import hespotex as hx

    folder = work / f"hd_{n}" / "outs"
    meta_file = work / f"hd_{n}" / "meta.json"
    if meta_file.exists():
        return folder, json.loads(meta_file.read_text())
    side_bins = int(np.ceil(np.sqrt(n)))
    margin_px = 64
    side_px = side_bins * BIN_UM / MPP + 2 * margin_px
    side_px = int(np.ceil(side_px / 512) * 512)
    t = time.perf_counter()
    tif = work / f"hd_{n}" / "slide.ome.tif"
    tif.parent.mkdir(parents=True, exist_ok=True)
    hx.datasets.synthetic_wsi(
        tif, width=side_px, height=side_px, microns_per_pixel=MPP, seed=7, n_blobs=6, overwrite=True
    )
    t_tif = time.perf_counter() - t
    r, c = np.divmod(np.arange(side_bins * side_bins)[:n], side_bins)
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.3, size=(n, N_GENES)).astype(np.float32)
    import scipy.sparse as sp

    slide = hx.io.read_wsi(tif, microns_per_pixel=MPP)
    from spatialdata import get_pyramid_levels

    level0 = get_pyramid_levels(next(iter(slide.images.values())), n=0).transpose("y", "x", "c").data
    t = time.perf_counter()
    hx.datasets.write_visium_hd(
        folder,
        sp.csr_matrix(counts),
        r,
        c,
        genes=[f"gene_{g:04d}" for g in range(N_GENES)],
        image=level0,
        microns_per_pixel=MPP,
        origin_px=(margin_px, margin_px),
        fullres_image=tif,
        overwrite=True,
    )
    meta = {
        "n_bins": int(n),
        "side_px": side_px,
        "tif_mb": tif.stat().st_size / 1e6,
        "write_tif_s": t_tif,
        "write_folder_s": time.perf_counter() - t,
    }
    meta_file.write_text(json.dumps(meta))
    return folder, meta


def train_model(work: Path) -> Path:
    """A small model trained on a 2,000-bin synthetic Visium HD section at 0.5 µm/px (once, kept)."""
    model_dir = work / "model"
    done = work / "model.done"
    if done.exists():
        return model_dir
    import hespotex as hx
    from hespotex.models import ModelConfig

    fixture = work / "fixture" / "outs"
    hx.datasets.synthetic_visium_hd(fixture, 2000, N_GENES, seed=1, microns_per_pixel=MPP, depth=400.0, overwrite=True)
    sdata = hx.io.read_visium_hd(fixture, bin_size=8)
    hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=INPUT_SIZE, patch_um=2 * BIN_UM)
    small = {"ae_epochs": 20, "ae_hidden_dim": 64, "latent_dim": 16, "projection_hidden_dim": 64, "head_hidden_dim": 64}
    config = ModelConfig.preset("hespotex", epochs=40, lr=3e-3, patience=None, decoder_neighbors=8, **small)
    model = hx.tl.train(
        sdata, genes=list(sdata.tables["table"].var_names), config=config, validation=None, seed=0, device="cpu"
    )
    model.save(model_dir)
    done.write_text("ok")
    return model_dir


# --------------------------------------------------------------------------------------------------
# children (fresh subprocesses)


def bare_forward(sdata, model, n_patches: int) -> dict:
    """The encoder alone on the first ``n_patches`` patches of the slide (reading order), read and
    normalised beforehand and kept in memory, in the batches and memory layout the streamed
    prediction uses: the ceiling of its embedding stage in the same process and load."""
    import torch

    from hespotex.pp._encode import inference_model
    from hespotex.pp._encoders import load_encoder
    from hespotex.pp._patches import plan_patches, resize_batch
    from hespotex.tl.prediction._stream_stages import encoder_batch_size

    params = model.embedding
    enc = load_encoder(params["encoder"], seed=int(params.get("seed", 0)), input_size=params.get("input_size"))
    plan = plan_patches(sdata, patch_um=params.get("patch_um"), out_px=enc.input_size)
    batch = encoder_batch_size(enc)
    net, fmt = inference_model(enc.model)  # as the streamed prediction runs it (BatchNorm folded, channels-last)
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.std).view(1, 3, 1, 1)
    batches = [
        resize_batch(plan.read(idx), enc.input_size).sub_(mean).div_(std).contiguous(memory_format=fmt)
        for idx in list(plan.batches(batch))[: max(1, n_patches // batch)]
    ]
    with torch.inference_mode():
        net(batches[0])  # first call: kernel set-up, as the prediction's first batch
        t, c = time.perf_counter(), time.process_time()
        for x in batches:
            net(x)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
    n = sum(len(x) for x in batches)
    return {
        "bare_n": n, "bare_s": seconds, "bare_rate": n / seconds, "bare_cpu_s": cpu, "batch": batch, "layout": str(fmt)
    }  # fmt: skip


def child(spec: dict) -> dict:
    import logging

    import torch

    import hespotex as hx

    hx.settings.progress = False
    if spec.get("threads"):
        hx.settings.num_threads = int(spec["threads"])
        torch.set_num_threads(int(spec["threads"]))
    out: dict = {"threads": torch.get_num_threads(), "load_start": os.getloadavg()}
    t = time.perf_counter()
    sdata = hx.io.read_visium_hd(spec["folder"], bin_size=8)
    out["read_s"] = time.perf_counter() - t
    out["n_bins"] = int(sdata.tables["table"].n_obs)
    if spec["arm"] == "graph":
        t = time.perf_counter()
        hx.pp.spatial_graph(sdata, n_neighbors=8)
        out["graph_s"] = time.perf_counter() - t
        out["edges"] = int(sdata.tables["table"].obsp["spatial_connectivities"].nnz)
    elif spec["arm"] == "predict":
        embedded: list = []
        cpu: dict = {}

        class Rate(logging.Handler):
            """The embedding stage's own count and seconds ("Embedded %d patches in %.2f s"), and the process
            CPU seconds between its first ("Embedding: ...") and last log lines."""

            def emit(self, record: logging.LogRecord) -> None:
                if str(record.msg).startswith("Embedding: "):
                    cpu["start"] = time.process_time()
                if str(record.msg).startswith("Embedded ") and record.args:
                    cpu["end"] = time.process_time()
                    embedded.append((int(record.args[0]), float(record.args[1])))

        logging.getLogger("hespotex").addHandler(Rate())
        logging.getLogger("hespotex").setLevel(logging.INFO)
        t = time.perf_counter()
        model = hx.tl.load_model(spec["model"])
        out["model_load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        table = hx.tl.predict(sdata, model, out=spec["out"], chunk_size=CHUNK, device="cpu", overwrite=True)
        out["predict_s"] = time.perf_counter() - t
        out["embed_n"], out["embed_s"] = embedded[-1] if embedded else (0, float("nan"))
        out["embed_cpu_s"] = cpu.get("end", np.nan) - cpu.get("start", np.nan)
        layer = table.layers["hespotex"]
        out["layer_shape"] = [int(s) for s in layer.shape]
        out["finite"] = bool(np.isfinite(np.asarray(layer[: min(5000, layer.shape[0])])).all())
        out["load_mid"] = os.getloadavg()
        out.update(bare_forward(sdata, model, int(spec.get("bare", 10_240))))
    out["load_end"] = os.getloadavg()
    return out


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    stdout = proc.stdout.read()
    if status != 0:
        msg = f"child failed ({status}): {stdout[-2000:]}"
        raise RuntimeError(msg)
    res = json.loads(stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    res["peak_mb"] = usage.ru_maxrss / 1024.0
    res["cpu_s"] = usage.ru_utime + usage.ru_stime
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 600_000])
    parser.add_argument("--work", default="/tmp/hespotex-bench-hd")
    parser.add_argument("--skip-predict-above", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "visium_hd.md"))
    parser.add_argument("--child", default=None)
    parser.add_argument("--arms", nargs="+", default=["read", "graph", "predict"], choices=["read", "graph", "predict"])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in the predict child (hx.settings.num_threads)"
    )
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return
    t_all = time.perf_counter()
    load0 = os.getloadavg()
    others = competing()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_model = 0.0
    model_dir = None
    rows, notes = [], []
    for n in args.sizes:
        folder, meta = slide_folder(work, n)
        read = run_child({"arm": "read", "folder": str(folder)}) if "read" in args.arms else None
        graph = run_child({"arm": "graph", "folder": str(folder)}) if "graph" in args.arms else None
        pred = None
        if "predict" in args.arms and (args.skip_predict_above is None or n <= args.skip_predict_above):
            if model_dir is None:
                t = time.perf_counter()
                model_dir = train_model(work)
                t_model = time.perf_counter() - t
            pred = run_child(
                {
                    "arm": "predict",
                    "folder": str(folder),
                    "model": str(model_dir),
                    "out": str(work / f"hd_{n}" / "predicted.zarr"),  # (pred.zarr: an older store without a marker)
                    "threads": args.threads,
                }
            )
        rows.append(table_row(read, graph, pred, meta))
        notes.append(
            f"- {n:,} bins: folder written in {meta['write_tif_s']:.0f} s (slide) + "
            f"{meta['write_folder_s']:.0f} s (Space Ranger files), or reused; child walls:"
            + ("" if read is None else f" read {read['wall_s']:.0f} s;")
            + ("" if graph is None else f" graph {graph['wall_s']:.0f} s;")
            + (
                ""
                if pred is None
                else f" predict {pred['wall_s']:.0f} s (CPU {pred['cpu_s']:.0f} s; fixed costs in it: read "
                f"{pred['read_s']:.0f} s, model load {pred['model_load_s']:.0f} s; embedding stage "
                f"{pred['embed_s']:.0f} s of the {pred['predict_s']:.0f} s predict; bare forward on "
                f"{pred['bare_n']:,} patches in batches of {pred['batch']}, {pred['layout']})"
            )
        )
        report(rows, notes, args, t_all, t_model, load0, others)  # after every size: partial runs leave a table


def table_row(read: dict | None, graph: dict | None, pred: dict | None, meta: dict) -> list[str]:
    n_bins = next(r["n_bins"] for r in (read, graph, pred) if r is not None)
    na = "not run"
    cpu_ratio = np.nan if pred is None else pred["embed_n"] / pred["embed_cpu_s"] * pred["bare_cpu_s"] / pred["bare_n"]

    def load(p: dict) -> str:
        return f"{p['load_start'][0]:.1f} / {p['load_mid'][0]:.1f}"

    return [
        f"{n_bins:,}",
        f"{meta['side_px']} x {meta['side_px']} px ({meta['side_px'] ** 2 / 1e9:.2f} Gpx, {meta['tif_mb']:.0f} MB)",
        na if read is None else f"{read['read_s']:.1f}",
        na if read is None else f"**{read['peak_mb']:.0f}**",
        na if graph is None else f"{graph['graph_s']:.2f} ({graph['edges'] / n_bins:.2f})",
        na if graph is None else f"{graph['graph_s'] / n_bins * 1e6:.1f}",
        na if graph is None else f"{graph['peak_mb']:.0f}",
        na if pred is None else f"{pred['predict_s']:.0f}",
        na if pred is None else f"{n_bins / pred['predict_s']:.0f}",
        na if pred is None else f"{pred['embed_n'] / pred['embed_s']:.0f}",
        na if pred is None else f"{pred['bare_rate']:.0f}",
        na if pred is None else f"**{pred['embed_n'] / pred['embed_s'] / pred['bare_rate']:.2f}**",
        na if pred is None else f"{pred['embed_n'] / pred['embed_cpu_s']:.0f}",
        na if pred is None else f"{pred['bare_n'] / pred['bare_cpu_s']:.0f}",
        na if pred is None else f"**{cpu_ratio:.2f}**",
        na if pred is None else f"**{pred['peak_mb']:.0f}**",
        na if pred is None else f"{pred['threads']}",
        na if pred is None else load(pred),
        na
        if pred is None
        else f"{pred['layer_shape'][0]:,} x {pred['layer_shape'][1]} ({'finite' if pred['finite'] else 'NaN!'})",
    ]


def report(rows: list, notes: list, args: argparse.Namespace, t_all: float, t_model: float, load0, others) -> None:
    header = [
        "8 µm bins", "slide (full resolution)", "read s", "read peak RSS MB", "8-NN graph s (mean degree)",
        "graph µs per bin", "graph peak RSS MB", "streamed predict s (read, model load excluded)", "predict bins/s",
        "embedding stage patches/s", "bare encoder forward patches/s", "embedding / bare (wall)",
        "embedding stage patches per CPU s", "bare forward patches per CPU s", "embedding / bare (CPU)",
        "predict peak RSS MB (read included)", "torch threads", "load avg 1 min (start / end of predict)",
        "predicted layer",
    ]  # fmt: skip
    load1 = os.getloadavg()
    text = "\n".join(
        [
            "# Visium HD at 8 µm bins: read, graph, streamed prediction",
            "",
            markdown_table(header, rows),
            "",
            "## Notes",
            "",
            f"- Command: `{shlex.join(['python', 'benchmarks/visium_hd.py', *sys.argv[1:]])}` "
            f"(whole run {(time.perf_counter() - t_all) / 60:.1f} min wall, of which training the model "
            f"{t_model:.0f} s)",
            f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; Python {platform.python_version()}. "
            f"Load average at start {load0[0]:.1f}, {load0[1]:.1f}, {load0[2]:.1f}; at end {load1[0]:.1f}, "
            f"{load1[1]:.1f}, {load1[2]:.1f}"
            " (above the core count: other jobs shared the machine and inflate the times, not the memory).",
            f"- Other benchmark running at the same time: {others or 'none'}.",
            "- Each column is a fresh subprocess; peak RSS is its own ru_maxrss (os.wait4), interpreter and "
            "imports included. "
            "'predict' includes reading the folder (its peak covers both).",
            "- Predict: the model is loaded first (its time is a fixed cost, in the notes), then `hx.tl.predict(..., "
            "out=zarr)` is timed whole (embedding, graph blocks, expression, table). 'embedding stage patches/s' is "
            "the stage's own count and seconds (its log line); 'bare encoder forward' runs the same encoder, in the "
            "same process after the prediction, on the slide's first patches (reading order) read, resized and "
            "normalised beforehand and kept in memory, in the prediction's batch size and memory layout: the "
            "ceiling of the embedding stage under the same load. On this shared machine the load moves between the "
            "two (minutes apart), so the wall ratio is noisy; the CPU ratio (process CPU seconds of the embedding "
            "stage, its loader thread and zarr writes included, against those of the bare forward) is the steadier "
            "measure of the pipeline's overhead over the encoder. "
            f"Torch threads: {args.threads or 'torch default'}"
            " (the machine is shared; with 2 threads on 2 oversubscribed cores every layer of a 32 px forward "
            "waits for both threads, which measured 5-10x slower than 1 thread here).",
            f"- Slides: `hx.datasets.synthetic_wsi` at {MPP} µm/px (JPEG tiles, pyramid), a square grid of 8 "
            "µm bins over it "
            f"(tissue and glass alike), Poisson(0.3) counts of {N_GENES} genes; written by "
            "`hx.datasets.write_visium_hd` "
            "(the full-resolution TIFF linked as microscope_image/).",
            f"- Model: small 'hespotex' preset (latent 16), decoder graph 8-NN, {N_GENES} genes, trained on a "
            "2,000-bin "
            "`hx.datasets.synthetic_visium_hd` section; encoder efficientnet_lite0.imagenet, 16 µm patches at "
            f"{INPUT_SIZE} px "
            f"(their native 0.5 µm/px); streaming chunk {CHUNK:,} bins.",
            *notes,
        ]
    )
    write_report(text, args.out)


if __name__ == "__main__":
    main()

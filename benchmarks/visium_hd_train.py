"""Peak memory of ``hx.tl.train`` on one Visium HD section of ``n`` 8 µm bins (the folders of
``benchmarks/visium_hd.py``, built by that script), phase by phase: read, embeddings, training; embeddings
in memory (``obsm`` a numpy array) and on disk (``lazy``: ``obsm`` a ``dask.array.from_zarr`` of a zarr store,
read block by block, see ``hx.tl.train(..., lazy=...)``), side by side. The ``embed`` arm makes the lazy embeddings
with hespotex itself: ``hx.pp.embed(..., out=store)`` (EfficientNet-Lite0 at 32 px over 16 µm patches, as
``benchmarks/visium_hd.py``) writes them chunk by chunk into a zarr store and ``obsm`` becomes a dask array over it,
then training streams them (its embed phase is timed and its peak measured like the others).

The embeddings are random ``n x 1280`` float32 (what ``hx.pp.embed`` with EfficientNet-Lite0 writes:
their values do not change the memory of training, and embedding 600k bins again would take ~20 min of
a shared 2-core machine). For the lazy arm they are written once, 8,192 rows at a time, to a zarr store
in the work folder (zarr's default compression). Small "hespotex" preset, 2 epochs after 2
autoencoder epochs, no validation, one torch thread. Each arm runs in a fresh subprocess; after each
phase it reports the RSS and the phase's own peak (VmHWM, reset before the phase through
``/proc/self/clear_refs``), and the process peak (the largest phase peak, interpreter and imports included).

    python benchmarks/visium_hd_train.py [--sizes 100000 600000] [--arms memory lazy] [--memory-max 100000]
        [--work /tmp/hespotex-bench-hd] [--store /tmp/hespotex-bench-hd-train]
    python benchmarks/visium_hd_train.py --sizes 10000 --arms embed lazy \
        --out benchmarks/results/visium_hd_embed_train.md
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

import numpy as np
from _common import competing, markdown_table, reset_peak_rss, status_kb, write_report

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 1280
ROWS = 8192


def rss_mb() -> float:
    return status_kb("VmRSS") / 1024


def hwm_mb() -> float:
    return status_kb("VmHWM") / 1024


def embedding_store(store: Path, n: int) -> tuple[Path, float]:
    """Write (once) ``n x WIDTH`` random float32 rows to a zarr array, ``ROWS`` at a time; its path and seconds."""
    import zarr

    path = store / f"emb_{n}.zarr"
    done = store / f"emb_{n}.done"
    if done.exists():
        return path, float(done.read_text())
    t = time.perf_counter()
    arr = zarr.create_array(path, shape=(n, WIDTH), chunks=(ROWS, WIDTH), dtype="float32", overwrite=True)
    rng = np.random.default_rng(0)
    for start in range(0, n, ROWS):
        arr[start : start + ROWS] = rng.standard_normal((min(ROWS, n - start), WIDTH), dtype=np.float32)
    seconds = time.perf_counter() - t
    done.write_text(f"{seconds:.1f}")
    return path, seconds


def child(arm: str, n: int, work: Path, store: Path) -> dict:
    import torch

    import hespotex as hx
    from hespotex.models import ModelConfig

    hx.settings.progress = False
    hx.settings.num_threads = 1
    torch.set_num_threads(1)
    out: dict = {"arm": arm, "n": n, "rss_imports": rss_mb()}
    reset_peak_rss()
    t = time.perf_counter()
    sdata = hx.io.read_visium_hd(work / f"hd_{n}" / "outs", bin_size=8)
    table = sdata.tables["table"]
    out.update(n_obs=table.n_obs, read_s=time.perf_counter() - t, rss_read=rss_mb(), peak_read=hwm_mb())
    reset_peak_rss()
    if arm == "embed":  # hespotex's own embeddings, streamed into a zarr store (a fresh one each run)
        t = time.perf_counter()
        hx.pp.embed(
            sdata, encoder="efficientnet_lite0.imagenet", input_size=32, patch_um=16.0,
            out=store / f"embedded_{n}.zarr", overwrite=True,
        )  # fmt: skip
        out["embed_s"] = time.perf_counter() - t
        emb_width = table.obsm["X_hespotex_image"].shape[1]
    elif arm == "memory":
        emb = np.random.default_rng(0).standard_normal((table.n_obs, WIDTH), dtype=np.float32)
        table.obsm["X_hespotex_image"] = emb
        del emb
    else:
        import dask.array as da

        path = store / f"emb_{n}.zarr"
        table.obsm["X_hespotex_image"] = da.from_zarr(str(path))
    width = emb_width if arm == "embed" else WIDTH
    out.update(rss_emb=rss_mb(), peak_emb=hwm_mb(), emb_mb=table.n_obs * width * 4 / 2**20)
    small = {"ae_epochs": 2, "ae_hidden_dim": 64, "latent_dim": 16, "projection_hidden_dim": 64, "head_hidden_dim": 64}
    config = ModelConfig.preset("hespotex", epochs=2, lr=3e-3, patience=None, decoder_neighbors=8, **small)
    reset_peak_rss()
    t = time.perf_counter()
    model = hx.tl.train(
        sdata, genes=list(table.var_names), config=config, validation=None, seed=0, device="cpu",
        lazy=arm != "memory",
    )  # fmt: skip
    out.update(train_s=time.perf_counter() - t, rss_train=rss_mb(), peak_train=hwm_mb())
    out["final_loss"] = model.history_[-1]["total"]
    # clear_refs also lowers ru_maxrss on Linux: the process peak is the largest of the phases' own peaks
    phases = [out[k] for k in out if k.startswith("peak_")]
    out["peak"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, *phases)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 600_000])
    parser.add_argument("--arms", nargs="+", default=["memory", "lazy"], choices=["memory", "lazy", "embed"])
    parser.add_argument("--memory-max", type=int, default=100_000, help="in-memory arm only up to this size")
    parser.add_argument("--work", default="/tmp/hespotex-bench-hd")
    parser.add_argument("--store", default="/tmp/hespotex-bench-hd-train")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "visium_hd_train.md"))
    parser.add_argument("--child", nargs=2, metavar=("ARM", "N"))
    args = parser.parse_args()
    work, store = Path(args.work), Path(args.store)
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), work, store)), flush=True)
        return
    store.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/visium_hd_train.py " + shlex.join(sys.argv[1:])
    load0, others = os.getloadavg(), competing("visium_hd.py")
    start = time.perf_counter()
    results, notes = [], []
    for n in args.sizes:
        if not (work / f"hd_{n}" / "outs").is_dir():
            msg = f"No Visium HD folder for {n} bins under {work}: run `python benchmarks/visium_hd.py --sizes {n}`."
            raise FileNotFoundError(msg)
        for arm in args.arms:
            if arm == "memory" and n > args.memory_max:
                results.append({"arm": arm, "n": n})
                continue
            if arm == "lazy":
                _, seconds = embedding_store(store, n)
                notes.append(f"{n:,} bins: embedding store written in {seconds:.0f} s (or reused)")
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(
                [sys.executable, __file__, "--child", arm, str(n), "--work", str(work), "--store", str(store)],
                capture_output=True, text=True, env=env, check=False,
            )  # fmt: skip
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                msg = f"The {arm} arm at {n} bins failed (exit {proc.returncode})."
                raise RuntimeError(msg)
            res = json.loads(line.removeprefix("RESULT "))
            print(res, flush=True)
            results.append(res)
    header = [
        "8 µm bins", "embeddings", "read s", "RSS after read MB", "read peak MB", "embeddings MB (N x 1280 float32)",
        "RSS with embeddings MB", "train s", "train peak MB (phase)", "RSS after train MB", "process peak RSS MB",
        "final loss",
    ]  # fmt: skip
    rows = []
    for r in results:
        what = {"memory": "in memory (numpy obsm)", "lazy": "on disk (zarr, lazy=True)"}.get(r["arm"], "")
        if r["arm"] == "embed":
            what = f"hx.pp.embed(out=zarr) {r.get('embed_s', 0):.0f} s, peak {r.get('peak_emb', 0):.0f} MB; lazy=True"
        if "peak" not in r:
            rows.append([f"{r['n']:,}", what] + ["not run"] * (len(header) - 2))
            continue
        rows.append([
            f"{r['n_obs']:,}", what, f"{r['read_s']:.0f}", f"{r['rss_read']:.0f}", f"{r['peak_read']:.0f}",
            f"{r['emb_mb']:.0f}", f"{r['rss_emb']:.0f}", f"{r['train_s']:.0f}", f"{r['peak_train']:.0f}",
            f"{r['rss_train']:.0f}", f"**{r['peak']:.0f}**", f"{r['final_loss']:.4f}",
        ])  # fmt: skip
    load1 = os.getloadavg()
    text = "\n".join(
        [
            "# Training at Visium HD 8 µm bins: embeddings in memory and on disk (`hx.tl.train(..., lazy=True)`)",
            "",
            markdown_table(header, rows),
            "",
            "## Notes",
            "",
            f"- Command: `{command}` (whole run {(time.perf_counter() - start) / 60:.1f} min wall)",
            f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; Python {platform.python_version()}. "
            f"Load average at start {load0[0]:.1f}, at end {load1[0]:.1f} (other jobs shared the machine: they "
            "inflate the times, not the memory).",
            f"- Other benchmark running at the same time: {others or 'none'}.",
            "- Each row is a fresh subprocess. 'read peak' / 'train peak' are the phase's own high-water marks "
            "(VmHWM reset before the phase); 'process peak RSS' is the largest of them and ru_maxrss (interpreter "
            "and imports included; resetting VmHWM lowers ru_maxrss too, so the phases' peaks are what counts).",
            "- Training: small 'hespotex' preset (latent 16), 2 autoencoder + 2 joint epochs, decoder graph 8-NN, "
            "autoencoder graph 8-NN, 50 genes, `max_nodes=20_000`, no validation, seed 0, one torch thread. The final "
            "loss of the two arms at the same size is the same model up to float32 rounding of the statistics.",
            "- Embeddings: random N x 1280 float32 (seed 0): in memory, generated in the child; on disk, a zarr array "
            f"of {ROWS:,}-row chunks (zarr's default codec) in the store folder, opened with `dask.array.from_zarr` "
            "into `obsm`.",
            f"- In-memory arm run up to {args.memory_max:,} bins only: it holds the N x 1280 embeddings and about 3.1 "
            "times them in copies (statistics concatenation, standardised copy, per-block copies; "
            "`results/visium_hd.md`), ~13 GB at 600,000 bins, more than this shared machine can give.",
            *[f"- {x}" for x in dict.fromkeys(notes)],
        ]
    )
    write_report(text, args.out)


if __name__ == "__main__":
    main()

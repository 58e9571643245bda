"""Whole-slide readers side by side: tifffile (hespotex's own) against wsidata over OpenSlide and over tiffslide.

Each reader opens each slide through ``hx.io.read_wsi(path, reader=...)`` (the same lazy SpatialData
image, so every later step is the same code), in a fresh subprocess per run, and goes through what
``hespotex tile`` and ``predict`` ask of it:

1. ``import``: importing the reader's own libraries (tifffile; wsidata + openslide / tiffslide), after
   what every path needs (dask, zarr, xarray, spatialdata, geopandas, scikit-image, scipy);
2. ``open``: ``read_wsi`` (metadata, tile offsets, the lazy levels);
3. ``tissue``: ``hx.pp.detect_tissue`` (reads one coarse level);
4. ``patches``: every tissue tile's 110 µm patch (55 µm spots 100 µm apart, ``hx.pp.tile``), read
   in batches of 64 in reading order as ``hx.pp.embed`` does (``plan_patches`` + ``PatchPlan.read``);
5. ``full``: the whole full-resolution level decoded into memory (decode throughput).

Peak resident memory (``VmHWM`` of the child) is read before and after step 5, less the resident
memory after the imports. "levels" counts the pyramid levels the reader finds in the file. Pixel
agreement with tifffile: mean and max absolute difference over eight 512 px windows of level 0 and
over the whole coarsest stored level. Slides: the two real SVS files of ../shared/data/wsi
(tcga-cr-7395: JPEG 2000 tiles, read at an assumed 0.5 µm/px; cmu-1-small-region: JPEG tiles,
one level) and a synthetic pyramidal OME-TIFF (``hx.datasets.synthetic_wsi``, JPEG tiles of 512 px,
pyramid in SubIFDs). Median over ``--repeats`` runs; the readers take turns within each repeat.

    python benchmarks/wsi_readers.py [--repeats 3] [--synthetic-side 8192] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import markdown_table, status_kb, write_report

ROOT = Path(__file__).resolve().parents[1]
READERS = ("tifffile", "openslide", "tiffslide")
LIBS = {"tifffile": ("tifffile",), "openslide": ("wsidata", "openslide"), "tiffslide": ("wsidata", "tiffslide")}
PATCH_UM, SPOT_UM, SPACING_UM, BATCH = 110.0, 55.0, 100.0, 64


def log(text: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def child(path: str, reader: str, mpp: float | None) -> dict:
    """One run in this (fresh) process; returns the measurements."""
    import importlib

    import numpy as np

    import hespotex as hx
    from hespotex.pp._patches import plan_patches

    hx.settings.progress = False
    for common in ("dask.array", "zarr", "xarray", "spatialdata", "geopandas", "skimage.filters", "scipy.ndimage"):
        importlib.import_module(common)  # what every reader path needs anyway: not counted as the reader's import
    out: dict = {}
    t = time.perf_counter()
    for lib in LIBS[reader]:
        importlib.import_module(lib)
    out["import_s"] = time.perf_counter() - t
    base_kb = status_kb("VmRSS")
    t = time.perf_counter()
    sdata = hx.io.read_wsi(path, reader=reader, microns_per_pixel=mpp)
    out["open_s"] = time.perf_counter() - t
    slide = sdata.attrs["hespotex_slide"]
    out["levels"] = slide["stored_levels"]
    t = time.perf_counter()
    hx.pp.detect_tissue(sdata)
    out["tissue_s"] = time.perf_counter() - t
    table = hx.pp.tile(sdata, spot_diameter_um=SPOT_UM, spacing_um=SPACING_UM)
    plan = plan_patches(sdata, patch_um=PATCH_UM, out_px=224)
    t = time.perf_counter()
    checksum = 0
    for idx in plan.batches(BATCH):
        checksum += int(plan.read(idx)[:, :, ::7, ::7].sum())
    out["patches_s"] = time.perf_counter() - t
    out["n_tiles"] = int(table.n_obs)
    out["patch_level"] = int(plan.level.level)
    out["patch_checksum"] = checksum
    out["peak_pipeline_mb"] = (status_kb("VmHWM") - base_kb) / 1024
    (key,) = sdata.images
    t = time.perf_counter()
    level0 = np.asarray(sdata.images[key]["scale0"]["image"].data)
    out["full_s"] = time.perf_counter() - t
    out["mpx"] = level0.shape[1] * level0.shape[2] / 1e6
    out["peak_full_mb"] = (status_kb("VmHWM") - base_kb) / 1024
    return out


def agreement(path: Path, mpp: float | None, reader: str) -> tuple[float, int]:
    """Mean and max |reader - tifffile| over eight level-0 windows and the coarsest stored level."""
    import numpy as np

    import hespotex as hx

    ours = hx.io.read_wsi(path, microns_per_pixel=mpp)
    theirs = hx.io.read_wsi(path, microns_per_pixel=mpp, reader=reader)
    a_img, b_img = (s.images[next(iter(s.images))] for s in (ours, theirs))
    h, w = ours.attrs["hespotex_slide"]["level_shapes"][0]
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(8):
        y, x = int(rng.integers(0, max(h - 512, 1))), int(rng.integers(0, max(w - 512, 1)))
        a = np.asarray(a_img["scale0"]["image"].data[:, y : y + 512, x : x + 512]).astype(np.int16)
        b = np.asarray(b_img["scale0"]["image"].data[:, y : y + 512, x : x + 512]).astype(np.int16)
        diffs.append(np.abs(a - b).ravel())
    if ours.attrs["hespotex_slide"]["stored_pyramid"] and theirs.attrs["hespotex_slide"]["stored_pyramid"]:
        last = f"scale{len(ours.attrs['hespotex_slide']['level_shapes']) - 1}"
        if last in b_img:
            a = np.asarray(a_img[last]["image"].data).astype(np.int16)
            b = np.asarray(b_img[last]["image"].data).astype(np.int16)
            if a.shape == b.shape:
                diffs.append(np.abs(a - b).ravel())
    d = np.concatenate(diffs)
    return float(d.mean()), int(d.max())


def run_child(path: Path, reader: str, mpp: float | None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), reader, "" if mpp is None else str(mpp)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TQDM_DISABLE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"{reader} on {path.name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic-side", type=int, default=8192, help="side of the synthetic OME-TIFF (0: none)")
    parser.add_argument("--data", default=os.environ.get("HESPOTEX_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "hespotex-wsi-readers"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "wsi_readers.md"))
    args = parser.parse_args()
    if args.child:
        path, reader, mpp = args.child
        print(json.dumps(child(path, reader, float(mpp) if mpp else None)))
        return

    import hespotex as hx

    started, load0 = time.time(), os.getloadavg()
    wsi = Path(args.data) / "wsi"
    if not (wsi / "tcga-cr-7395.svs").is_file():
        sys.exit(f"The real slides are not in {wsi}: pass --data or set HESPOTEX_DATA.")
    slides = [(wsi / "tcga-cr-7395.svs", 0.5, "real Aperio SVS, JPEG 2000 tiles, 2 levels, no µm/px (0.5 given)")]
    slides.append(
        (wsi / "cmu-1-small-region.svs", None, "real Aperio SVS, JPEG tiles, 1 level + label/macro/thumbnail")
    )
    if args.synthetic_side:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        side = args.synthetic_side
        syn = work / f"synthetic_{side}.ome.tif"
        if not syn.exists():
            log(f"writing {syn.name}")
            hx.datasets.synthetic_wsi(syn, width=side, height=side, tile=512, n_blobs=8, seed=7, microns_per_pixel=0.5)
        slides.append((syn, None, f"synthetic pyramidal OME-TIFF (SubIFDs), JPEG tiles of 512 px, {side} px a side"))

    results: dict = {}
    for rep in range(args.repeats):
        for path, mpp, _ in slides:
            for reader in READERS:
                log(f"repeat {rep + 1}: {reader} on {path.name}")
                results.setdefault((path.name, reader), []).append(run_child(path, reader, mpp))
    agree = {}
    for path, mpp, _ in slides:
        for reader in READERS[1:]:
            agree[(path.name, reader)] = agreement(path, mpp, reader)

    header = [
        "slide", "reader", "levels found", "import s", "open s", "tissue s", "tiles", "patches s (tiles/s)",
        "full level 0 s (Mpx/s)", "peak MB: pipeline / + full level", "vs tifffile |Δ| mean (max)",
    ]  # fmt: skip
    rows = []
    for path, _, _ in slides:
        for reader in READERS:
            runs = results[(path.name, reader)]

            def med(key, runs=runs):
                return statistics.median(r[key] for r in runs)

            r0 = runs[0]
            d = agree.get((path.name, reader))
            rows.append([
                path.name, reader, r0["levels"], f"{med('import_s'):.2f}", f"{med('open_s'):.3f}",
                f"{med('tissue_s'):.2f}",
                r0["n_tiles"], f"{med('patches_s'):.2f} ({r0['n_tiles'] / med('patches_s'):.0f})",
                f"{med('full_s'):.2f} ({r0['mpx'] / med('full_s'):.1f})",
                f"{med('peak_pipeline_mb'):.0f} / {med('peak_full_mb'):.0f}",
                "(reference)" if d is None else f"{d[0]:.3f} ({d[1]})",
            ])  # fmt: skip
    import numpy
    import openslide
    import tifffile
    import tiffslide
    import wsidata

    command = "python benchmarks/wsi_readers.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = "\n".join([
        "# Whole-slide readers: tifffile (hespotex) vs wsidata over OpenSlide / tiffslide",
        "",
        markdown_table(header, rows),
        "",
        "## Notes",
        "",
        f"- Command: `{command.strip()}` (whole run {(time.time() - started) / 60:.1f} min wall).",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average at start "
        f"{', '.join(f'{x:.1f}' for x in load0)}, at end {', '.join(f'{x:.1f}' for x in os.getloadavg())}); Python "
        f"{platform.python_version()}, numpy {numpy.__version__}, tifffile {tifffile.__version__}, wsidata "
        f"{wsidata.__version__}, openslide-python {openslide.__version__} (OpenSlide {openslide.__library_version__}), "
        f"tiffslide {tiffslide.__version__}.",
        f"- Median of {args.repeats} runs, each in a fresh subprocess; the readers take turns within a repeat.",
        "- Every reader goes through `hx.io.read_wsi(path, reader=...)`: tifffile over its zarr store (chunks = the "
        "file's tiles); openslide / tiffslide through `wsidata.reader.to_datatree` (chunks = whole tiles near 512 px).",
        f"- tissue: `hx.pp.detect_tissue`; patches: {PATCH_UM:g} µm patches of {SPOT_UM:g} µm pseudo-spots "
        f"{SPACING_UM:g} µm apart (`hx.pp.tile`), read in batches of {BATCH} (`plan_patches(out_px=224)` + `read`), "
        "no resizing or encoder; full: the whole level 0 as one numpy array.",
        "- Peak MB: VmHWM of the child less its resident memory after the imports; 'pipeline' up to the patches, "
        "'+ full level' after decoding level 0 whole (height x width x 3 bytes, plus the reader's own buffers).",
        "- levels found: pyramid levels the reader sees in the file (cmu-1-small-region has one: hespotex then "
        "averages coarser ones lazily, for every reader alike).",
        "- vs tifffile: mean (max) absolute difference of pixel values over eight 512 px windows of level 0 and the "
        "whole coarsest stored level.",
    ])  # fmt: skip
    for path, _, what in slides:
        text += f"\n- `{path.name}`: {what}."
    write_report(text, args.out)


if __name__ == "__main__":
    main()

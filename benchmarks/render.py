"""Time to first render of ``hx.pl.spatial`` and ``hx.pl.explorer`` at 1k, 10k and 100k spots, served by Panel and
measured in Chromium.

Data: a synthetic sample per size built through ``hespotex.io.build_sample``: spots on a hexagonal grid
(100 µm pitch, 55 µm spots), a 3000 x 3000 px RGB image covering them (so the µm per pixel grows with the
slide; the view reads it at display size either way), Poisson counts of 20 genes, and the prediction
layers made directly (no model): ``layers["hespotex"]`` = a smooth spatial pattern per gene plus noise,
``layers["measured"]`` = the same pattern with other noise, ``obsp["hespotex_attention"]`` = random
weights on the 6 nearest neighbours and the spot itself (rows sum to 1), ``uns["hespotex"]["params"]``
as ``hx.tl.predict`` writes it. Above 20,000 spots the views rasterise with datashader (the default).

Serving: for each (size, view) a fresh Python subprocess builds the sample and starts ``pn.serve`` on
127.0.0.1 (port 5150 + k) with one route that builds the view anew for every page load (so the time
includes building it: ``hx.pl.spatial(sdata, genes[:5])`` (gene selector + predicted and measured
panels) or ``hx.pl.explorer(sdata).__panel__()``).

Measure: Debian's Chromium (headless, Playwright), a new browser context (empty cache) per load, viewport
1400 x 900. **Time to first render** = ``performance.now()`` (milliseconds since the navigation's time
origin, i.e. navigation start) at the first animation frame in which both spatial plots (predicted,
measured) exist, Bokeh reports them finished drawing (``PlotView.has_finished()``: every renderer
painted) and they hold the spots: a ``Scatter`` glyph with all n spots, or (rasterised) an ``Image``
glyph with at least one non-empty pixel. Polled with ``requestAnimationFrame``. The first load after
the server starts is reported apart ("first load": it also pays one-off costs such as numba compiling
datashader's kernels and Bokeh's first document); the next ``--repeats`` loads give the median (min-max).
Goal: under 3 s at 100k spots.

    python benchmarks/render.py [--sizes 1000 10000 100000] [--repeats 5]
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
from statistics import median

import numpy as np
from _common import competing, markdown_table

ROOT = Path(__file__).resolve().parents[1]
VIEWS = ("spatial", "explorer")
PITCH_UM = 100.0
IMAGE_PX = 3000
N_GENES = 20
BASE_PORT = 5150  # this benchmark's ports: 5150-5169
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

# performance.now() once both spatial plots are drawn with their spots, else null
READY_JS = """(n) => {
  if (!window.Bokeh || !Bokeh.index) return null;
  const plots = [...Bokeh.index.query(v => v.model && v.model.renderers !== undefined && v.frame !== undefined
      && v.model.title && / — (predicted|measured)$/.test(v.model.title.text))];
  if (plots.length < 2) return null;
  const drawn = plots.every(v => v.has_finished() && v.model.renderers.some(r => {
    if (!r.glyph) return false;
    if (r.glyph.type === "Scatter") return r.data_source.get_length() === n;
    if (r.glyph.type === "Image") {
      const img = r.data_source.data.image && r.data_source.data.image[0];
      if (!img) return false;
      for (let i = 0; i < img.length; i++) { if (!Number.isNaN(img[i])) return true; }
    }
    return false;
  }));
  return drawn ? performance.now() : null;
}"""


def hex_coords_um(n: int) -> np.ndarray:
    cols = int(np.ceil(np.sqrt(n * 2 / np.sqrt(3))))
    rows = int(np.ceil(n / cols))
    r, c = np.divmod(np.arange(rows * cols)[:n], cols)
    x = (c + 0.5 * (r % 2)) * PITCH_UM
    y = r * PITCH_UM * np.sqrt(3) / 2
    return np.c_[x, y] + PITCH_UM


def make_sample(n: int, seed: int = 0):
    """A sample of ``n`` spots with predictions, measurements and attention (see the module docstring)."""
    import pandas as pd
    import scipy.sparse as sp
    from scipy.ndimage import zoom
    from scipy.spatial import cKDTree

    from hespotex.io import build_sample

    rng = np.random.default_rng(seed)
    xy_um = hex_coords_um(n)
    mpp = float(xy_um.max() + PITCH_UM) / IMAGE_PX
    xy = xy_um / mpp
    coarse = rng.random((IMAGE_PX // 50, IMAGE_PX // 50, 3))
    smooth = zoom(coarse, (50, 50, 1), order=1)
    image = (np.array([235, 170, 205]) * (0.6 + 0.4 * smooth)).astype(np.uint8)
    counts = rng.poisson(3.0, (n, N_GENES))
    sdata = build_sample(
        image,
        xy,
        counts,
        obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(N_GENES)]),
        sample_id=f"bench{n}",
        microns_per_pixel=mpp,
        spot_diameter_um=55.0,
    )
    table = sdata.tables["table"]
    u = xy_um / xy_um.max()
    phase = rng.uniform(0, 2 * np.pi, (2, N_GENES))
    pattern = 2 + np.sin(3 * u[:, :1] * np.pi + phase[0]) + np.cos(2 * u[:, 1:] * np.pi + phase[1])
    table.layers["hespotex"] = (pattern + rng.normal(0, 0.2, pattern.shape)).astype(np.float32)
    table.layers["measured"] = (pattern + rng.normal(0, 0.6, pattern.shape)).astype(np.float32)
    _, idx = cKDTree(xy).query(xy, k=7)
    w = rng.random(idx.shape)
    w /= w.sum(axis=1, keepdims=True)
    table.obsp["hespotex_attention"] = sp.csr_matrix(
        (w.ravel(), (np.repeat(np.arange(n), 7), idx.ravel())), shape=(n, n)
    )
    table.uns["hespotex"] = {
        "params": {"layer": "hespotex", "target_sum": 1e4, "attention_key": "hespotex_attention", "model_id": "bench"}
    }
    return sdata


def run_one(n: int, view: str, repeats: int, port: int) -> dict:
    """In this process: serve ``view`` of an ``n``-spot sample and time page loads in Chromium."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import panel as pn
    from playwright.sync_api import sync_playwright

    import hespotex as hx

    t0 = time.perf_counter()
    sdata = make_sample(n)
    genes = list(sdata.tables["table"].var_names[:5])
    build_s = time.perf_counter() - t0
    server_s: list[float] = []

    def app():
        t = time.perf_counter()
        obj = hx.pl.spatial(sdata, genes) if view == "spatial" else hx.pl.explorer(sdata).__panel__()
        server_s.append(time.perf_counter() - t)
        return obj

    thread = pn.serve(
        {"/": app}, port=port, address="127.0.0.1", websocket_origin=[f"127.0.0.1:{port}"], show=False, threaded=True
    )
    times, rasterized = [], n > 20_000
    try:
        time.sleep(1.0)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            for _ in range(repeats + 1):
                context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
                page = context.new_page()
                page.goto(f"http://127.0.0.1:{port}/", wait_until="commit")
                handle = page.wait_for_function(READY_JS, arg=n, polling="raf", timeout=120_000)
                times.append(float(handle.json_value()) / 1000.0)
                context.close()
            browser.close()
    finally:
        thread.stop()
    return {
        "n": n,
        "view": view,
        "rasterized": rasterized,
        "first_s": times[0],
        "times_s": times[1:],
        "server_first_s": server_s[0],
        "server_s": server_s[1:],
        "build_sample_s": build_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", nargs=3, metavar=("N", "VIEW", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        n, view, port = int(args.one[0]), args.one[1], int(args.one[2])
        sys.stdout.write(json.dumps(run_one(n, view, args.repeats, port)) + "\n")
        return

    start, load0, other0 = time.time(), os.getloadavg(), competing()
    results = []
    for k, (n, view) in enumerate((n, v) for n in args.sizes for v in VIEWS):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--one",
            str(n),
            view,
            str(BASE_PORT + k),
            "--repeats",
            str(args.repeats),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = results[-1]
        sys.stderr.write(f"{n:>7} {view:<9} first {r['first_s']:.2f} s, median {median(r['times_s']):.2f} s\n")
    wall, load1, other1 = time.time() - start, os.getloadavg(), competing()

    header = [
        "spots",
        "view",
        "mode",
        "time to first render s, median (min-max)",
        "first load after server start s",
        "server-side build s, median",
        "goal (< 3 s at 100k)",
    ]
    rows = []
    for r in results:
        t = r["times_s"]
        goal = ("met" if median(t) < 3.0 else "missed") if r["n"] >= 100_000 else ""
        rows.append(
            [
                f"{r['n']:,}",
                f"hx.pl.{r['view']}",
                "datashader" if r["rasterized"] else "glyphs",
                f"**{median(t):.2f}** ({min(t):.2f}-{max(t):.2f})",
                f"{r['first_s']:.2f}",
                f"{median(r['server_s']):.2f}",
                goal,
            ]
        )
    import bokeh
    import datashader
    import holoviews
    import panel

    chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    notes = [
        f"- Command: `{shlex.join(['python', 'benchmarks/render.py', *sys.argv[1:]])}` (wall {wall:.0f} s)",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores, no GPU; {chromium} headless (`--disable-gpu`), "
        f"Playwright; panel {panel.__version__}, holoviews {holoviews.__version__}, bokeh {bokeh.__version__}, "
        f"datashader {datashader.__version__}, Python {platform.python_version()}.",
        f"- os.getloadavg() at start: {', '.join(f'{v:.2f}' for v in load0)}; at end: "
        f"{', '.join(f'{v:.2f}' for v in load1)}"
        + (
            " (above the core count: other jobs shared the machine, absolute times are inflated)."
            if max(load0[0], load1[0]) > (os.cpu_count() or 1)
            else "."
        ),
        f"- Other long benchmark running: {'yes' if other0 or other1 else 'no'}.",
        f"- Repeats: {args.repeats} page loads per (size, view) after the first, each in a new browser context; "
        "one fresh server process per (size, view).",
        "- Time to first render: `performance.now()` (ms from navigation start) at the first animation frame "
        "in which both "
        "spatial plots (predicted, measured) are finished drawing (Bokeh `PlotView.has_finished()`) and hold the spots "
        "(Scatter with every spot, or a rasterised Image with a non-empty pixel). It includes the server "
        "building the view "
        "for that session (column 'server-side build').",
        "- 'first load after server start' pays one-off costs (numba compiling datashader's kernels at 100k, "
        "first Bokeh "
        "document, imports on first use); a long-running server or notebook kernel pays them once.",
        f"- Data: hexagonal grid (100 µm pitch, 55 µm spots), {IMAGE_PX} x {IMAGE_PX} px image, {N_GENES} "
        "genes; explorer "
        "shows all 20 genes in its selector, hx.pl.spatial 5. Rasterised above 20,000 spots (datashader mean "
        "per pixel, "
        "`first` selector for the hover, dynspread).",
    ]
    text = "# Time to first render of hx.pl.spatial and hx.pl.explorer (Panel server, Chromium)\n\n"
    text += markdown_table(header, rows) + "\n\n## Notes\n\n" + "\n".join(notes) + "\n"
    out = ROOT / "benchmarks" / "results" / "render.md"
    out.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()

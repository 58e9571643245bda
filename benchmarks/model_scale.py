"""Scale benchmark of HESpotEx: large synthetic slides, 5,457-gene models, parameter counts.

Three parts, every configuration in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own:

1. *Large slides.* Synthetic arrays (no images): random 1280-d float32 embeddings, spots on a hexagonal
   lattice 100 µm apart, expression from a rank-16 linear model of the embeddings plus noise. The
   ``"hespotex"`` preset trains ``--epochs`` autoencoder epochs and joint epochs on spatial blocks of at most
   ``max_nodes`` spots (``HESpotEx.fit(..., max_nodes=...)``); the saved model is then loaded in a new
   process and predicts a new slide of the same size block by block (``predict_graph``, halo of
   ``n_hops`` rings around each block).
2. *Parameters.* ``HESpotExNet(5457, 1280, preset)`` for both presets, by part, against the authors'
   jumping-knowledge head ``nn.LSTM(64, 5457, num_layers=2)`` (counted, not trained).
3. *her2st-sized.* 4 training sections of ~180 spots and one predicted section, 5,457 genes, both presets.

Times are wall-clock seconds of each epoch (the first includes warm-up). "setup" is the
standardisation of embeddings, network initialisation, the k-NN graphs, the cutting into blocks and the
frozen autoencoder's latent targets; "AE epoch" one epoch of autoencoder pre-training; "joint epoch"
one epoch of the image stream against those targets. Pass ``--threads 1`` on a machine whose cores
other jobs share: oversubscribed multi-threaded OpenMP ops stall.

    python benchmarks/model_scale.py [--threads 1] [--epochs 2] [--max-nodes 20000] [--predict-max-nodes 50000]
        [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import competing, markdown_table

EMB_DIM = 1280
RANK = 16
SPACING_UM = 100.0


# ---------------------------------------------------------------------------------------------- worker side
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _synthetic(n_spots: int, n_genes: int | None, *, seed: int, name: str):
    """One synthetic slide as a GraphData (expression only when ``n_genes`` is given)."""
    import numpy as np

    from hespotex.tl.model._data import GraphData

    rng = np.random.default_rng(seed)
    cols = int(np.ceil(np.sqrt(n_spots)))
    i = np.arange(n_spots)
    row, col = i // cols, i % cols
    coords = np.column_stack([col * SPACING_UM + (row % 2) * SPACING_UM / 2, row * SPACING_UM * np.sqrt(3) / 2])
    emb = rng.standard_normal((n_spots, EMB_DIM), dtype=np.float32)
    expr = None
    if n_genes is not None:
        model_rng = np.random.default_rng(12345)  # the same "biology" on every slide
        a = model_rng.standard_normal((EMB_DIM, RANK), dtype=np.float32) / np.sqrt(EMB_DIM)
        b = model_rng.standard_normal((RANK, n_genes), dtype=np.float32) / np.sqrt(RANK)
        expr = np.empty((n_spots, n_genes), dtype=np.float32)
        for start in range(0, n_spots, 1_000):  # small chunks: the generator's temporaries stay negligible
            stop = min(start + 1_000, n_spots)
            chunk = (emb[start:stop] @ a) @ b + 1.0
            chunk += 0.5 * rng.standard_normal(chunk.shape, dtype=np.float32)
            expr[start:stop] = np.maximum(chunk, 0.0)
    return GraphData(name, emb, coords.astype(np.float64), expr)


def _train(job: dict) -> dict:
    import torch

    import hespotex as hx
    from hespotex.models import ModelConfig
    from hespotex.tl.model._model import HESpotEx
    from hespotex.tl.training import _training

    hx.settings.progress = False
    t0 = time.perf_counter()
    samples = [_synthetic(n, job["genes"], seed=100 + i, name=f"train_{i}") for i, n in enumerate(job["sections"])]
    out = {"data_s": time.perf_counter() - t0, "rss_data_mb": _peak_rss_mb(), "torch_threads": torch.get_num_threads()}
    timings: dict[str, float] = {}
    # epoch boundaries: fit_net and pretrain_autoencoder call group_blocks once at the start of every epoch
    starts: dict[str, list[float]] = {"ae": [], "joint": []}
    stage = ["joint"]

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            if name == "ae":
                stage[0] = "ae"
            result = fn(*args, **kwargs)
            timings[name] = time.perf_counter() - t
            timings[f"{name}_end"] = time.perf_counter()
            if name == "ae":
                stage[0] = "joint"
            if name == "setup":
                timings["n_blocks"] = len(result)
                timings["rss_setup_mb"] = _peak_rss_mb()
            return result

        return wrapper

    def marked(fn):
        def wrapper(*args, **kwargs):
            starts[stage[0]].append(time.perf_counter())
            return fn(*args, **kwargs)

        return wrapper

    # time the stages of fit_net (it looks these names up in its module at call time)
    _training.make_blocks = timed("setup", _training.make_blocks)
    _training.pretrain_autoencoder = timed("ae", _training.pretrain_autoencoder)
    _training.fit_net = timed("fit_net", _training.fit_net)
    _training.group_blocks = marked(_training.group_blocks)
    config = ModelConfig.preset(job["preset"], epochs=job["epochs"], ae_epochs=job["ae_epochs"])
    model = HESpotEx([f"g{i}" for i in range(job["genes"])], embedding={"encoder": "synthetic"}, config=config)
    t0 = time.perf_counter()
    model.fit(samples, device=job["device"], max_nodes=job["max_nodes"])
    fit_s = time.perf_counter() - t0
    ae_marks = [*starts["ae"], timings["ae_end"]] if starts["ae"] else []
    joint_marks = [*starts["joint"], timings["fit_net_end"]]
    out.update(
        fit_s=fit_s,
        prepare_s=fit_s - timings["fit_net"],  # embedding standardisation + network initialisation
        setup_s=timings["setup"],
        # between pre-training and the first joint epoch: the frozen autoencoder's latent targets, the optimiser
        targets_s=(starts["joint"][0] - timings["ae_end"]) if starts["ae"] else 0.0,
        ae_epochs_s=[b - a for a, b in itertools.pairwise(ae_marks)],
        joint_epochs_s=[b - a for a, b in itertools.pairwise(joint_marks)],
        n_blocks=timings["n_blocks"],
        rss_setup_mb=timings["rss_setup_mb"],
        rss_fit_mb=_peak_rss_mb(),
        parameters=model.n_parameters,
    )
    if job.get("save"):
        model.save(job["save"])
    return out


def _predict(job: dict) -> dict:
    import torch

    import hespotex as hx
    from hespotex.tl.model._model import HESpotEx

    hx.settings.progress = False
    t0 = time.perf_counter()
    slide = _synthetic(job["spots"], None, seed=999, name="new_slide")
    out = {"data_s": time.perf_counter() - t0, "rss_data_mb": _peak_rss_mb(), "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    model = HESpotEx.load(job["model"])
    out["load_s"] = time.perf_counter() - t0
    out["rss_load_mb"] = _peak_rss_mb()
    t0 = time.perf_counter()
    result = model.predict_graph(slide, device=job["device"], max_nodes=job["max_nodes"])
    out["predict_s"] = time.perf_counter() - t0
    out["rss_predict_mb"] = _peak_rss_mb()
    out["output_mb"] = result["expression"].nbytes / 2**20
    out["finite"] = bool(__import__("numpy").isfinite(result["expression"]).all())
    return out


def _params(job: dict) -> dict:
    import torch

    from hespotex.models import HESpotExNet, parameter_count

    out = {}
    for preset in ("paper", "hespotex"):
        net = HESpotExNet(job["genes"], EMB_DIM, preset)
        parts = {
            "autoencoder": net.autoencoder,
            "projection": net.projection,
            "direct_head": net.direct_head,
            "decoder (layers + JK)": torch.nn.ModuleList([net.decoder.convs, net.decoder.jk]),
            "decoder gene head": net.decoder.gene_head,
        }
        out[preset] = {"total": parameter_count(net), **{k: parameter_count(m) for k, m in parts.items()}}
    lstm = torch.nn.LSTM(64, job["genes"], num_layers=2)
    out["authors_lstm"] = sum(p.numel() for p in lstm.parameters())
    return out


def _baseline(job: dict) -> dict:
    import torch

    out = {"torch_mb": _peak_rss_mb(), "torch_threads": torch.get_num_threads()}
    import torch_geometric  # noqa: F401  (imported by the graph decoder)

    from hespotex.tl.model._model import HESpotEx  # noqa: F401

    out["imports_mb"] = _peak_rss_mb()
    return out


def worker(job: dict) -> dict:
    kind = job["kind"]
    result = {"train": _train, "predict": _predict, "params": _params, "baseline": _baseline}[kind](job)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


# ---------------------------------------------------------------------------------------------- driver side
def run_job(job: dict, timeout: float, threads: int | None = None) -> dict:
    """Run ``job`` in a fresh interpreter (``threads`` intra-op threads) with an empty cache folder of its own (so an
    autoencoder another cell pre-trained on the same data is pre-trained again, and timed); returns its result dict
    (or an error record)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="hespotex_scale_cache_") as cache:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(job)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**env, "HESPOTEX_CACHE": cache},
                check=False,
            )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}", "wall_s": wall}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    return result


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    return markdown_table(header, rows, fmt=_fmt)


def _secs(t: float) -> str:
    return f"{t:.1f}" if t >= 10 else f"{t:.2f}"


def _gb(mb: float) -> str:
    return f"{mb / 1024:.2f}"


def _other_load() -> str:
    procs = competing()
    return f"yes ({len(procs)} process(es): her2st_cv)" if procs else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke test of the script)")
    parser.add_argument("--genes", type=int, default=1000, help="genes of the large-slide runs")
    parser.add_argument("--max-nodes", type=int, default=20_000, help="max spots per training batch")
    parser.add_argument(
        "--max-nodes-5457",
        type=int,
        nargs="+",
        default=[5_000, 20_000],
        help="max spots per training batch of the 5,457-gene large runs (one run each)",
    )
    parser.add_argument("--predict-max-nodes", type=int, default=50_000, help="max core spots per prediction block")
    parser.add_argument("--no-5457-large", action="store_true", help="skip the 10k-spot 5,457-gene run")
    parser.add_argument("--epochs", type=int, default=2, help="AE epochs and joint epochs of every training run")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch/OpenMP threads per configuration (default: torch's own choice, one per core)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    t_start = time.perf_counter()
    load_start, other_start = os.getloadavg(), _other_load()
    tmp = Path(tempfile.mkdtemp(prefix="hespotex_scale_"))
    sizes = [2_000, 5_000] if args.quick else [10_000, 100_000]
    her2st_genes = 500 if args.quick else 5457
    dev = args.device
    results: dict[str, dict] = {}
    try:
        base = run_job({"kind": "baseline"}, args.timeout, args.threads)
        # 1. large slides
        large = [(n, args.genes, args.max_nodes) for n in sizes]
        if not args.no_5457_large:
            large += [(sizes[0], her2st_genes, m) for m in args.max_nodes_5457]
        for n, genes, max_nodes in large:
            key = f"{n}x{genes}x{max_nodes}"
            common = {"sections": [n], "genes": genes, "preset": "hespotex", "device": dev, "max_nodes": max_nodes}
            path = str(tmp / f"model_{key}")
            both = run_job(
                {"kind": "train", "epochs": args.epochs, "ae_epochs": args.epochs, "save": path, **common},
                args.timeout,
                args.threads,
            )
            pred = (
                run_job(
                    {"kind": "predict", "spots": n, "model": path, "device": dev, "max_nodes": args.predict_max_nodes},
                    args.timeout,
                    args.threads,
                )
                if "error" not in both
                else {"error": "no model"}
            )
            results[key] = {"train": both, "predict": pred, "max_nodes": max_nodes}
            print(f"{key}: {json.dumps(results[key])}", file=sys.stderr)
        # 2. parameters
        params = run_job({"kind": "params", "genes": 5457}, args.timeout, args.threads)
        # 3. her2st-sized
        her2st = {}
        for preset in ("paper", "hespotex"):
            path = str(tmp / f"her2st_{preset}")
            common = {"sections": [180, 175, 185, 180], "genes": her2st_genes, "preset": preset, "device": dev}
            both = run_job(
                {
                    "kind": "train",
                    "epochs": args.epochs,
                    "ae_epochs": args.epochs,
                    "max_nodes": 20_000,
                    "save": path,
                    **common,
                },
                args.timeout,
                args.threads,
            )
            pred = (
                run_job(
                    {"kind": "predict", "spots": 180, "model": path, "device": dev, "max_nodes": 50_000},
                    args.timeout,
                    args.threads,
                )
                if "error" not in both
                else {"error": "no model"}
            )
            her2st[preset] = {"train": both, "predict": pred, "max_nodes": 20_000}
            print(f"her2st {preset}: {json.dumps(her2st[preset])}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t_start
    load_end, other_end = os.getloadavg(), _other_load()

    def train_row(label, r):
        b, p = r["train"], r["predict"]
        err = next((x["error"] for x in (b, p) if "error" in x), None)
        if err:
            return [*label, err, "", "", "", "", "", "", "", "", ""]
        return [
            *label,
            b["parameters"],
            f"{b['n_blocks']} / {r['max_nodes']:,}",
            b["prepare_s"] + b["setup_s"] + b["targets_s"],
            " / ".join(_secs(t) for t in b["ae_epochs_s"]),
            " / ".join(_secs(t) for t in b["joint_epochs_s"]),
            _gb(b["peak_rss_mb"]),
            _gb(b["rss_data_mb"]),
            p["predict_s"],
            _gb(p["peak_rss_mb"]),
            _gb(p["rss_data_mb"]),
        ]

    header = [
        "spots",
        "genes",
        "params",
        "blocks / max_nodes",
        "setup s",
        "AE epochs s",
        "joint epochs s",
        "train peak RSS GB",
        "(data alone GB)",
        "predict s",
        "predict peak RSS GB",
        "(slide alone GB)",
    ]
    large_rows = []
    for key, r in results.items():
        n, g, _ = (int(x) for x in key.split("x"))
        large_rows.append(train_row([n, g], r))
    her2st_rows = [train_row([preset, "4 x ~180 / 180", her2st_genes], r) for preset, r in her2st.items()]
    her2st_header = ["preset", "train / predict spots", "genes", *header[2:]]

    if "error" in params:
        param_text = f"parameter count failed: {params['error']}"
    else:
        parts = [k for k in params["hespotex"] if k != "total"]
        rows = [[p, *[params[p][k] for k in parts], params[p]["total"]] for p in ("paper", "hespotex")]
        rows.append(
            ["authors' code: 2-layer nn.LSTM(64, 5457) JK head alone", *[""] * len(parts), params["authors_lstm"]]
        )
        param_text = _table(["model (5,457 genes, 1280-d embeddings)", *parts, "total"], rows)

    threads = next((r["train"].get("torch_threads") for r in results.values() if "torch_threads" in r["train"]), "?")
    cmd = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    pinned = (
        f"Threads pinned with `--threads {args.threads}` (OMP/MKL/torch), as other jobs shared the cores.  "
        if args.threads
        else ""
    )
    lines = [
        "# HESpotEx at scale: large slides, 5,457 genes, parameter counts",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, torch threads {threads}, "
        f"device {dev}; whole run {wall / 60:.1f} min wall.  ",
        f"Load average (1/5/15 min) at start {', '.join(f'{x:.2f}' for x in load_start)}, at end "
        f"{', '.join(f'{x:.2f}' for x in load_end)}; another benchmark running at start: {other_start}, "
        f"at end: {other_end}. Times are wall-clock under that load.  ",
        pinned + "Each cell is one fresh subprocess (peak RSS = its `ru_maxrss`); train and predict run in separate "
        "processes, predict loads the saved model. Every process pays for its imports first: "
        f"{_gb(base.get('torch_mb', float('nan')))} GB for `import torch` (this wheel), "
        f"{_gb(base.get('imports_mb', float('nan')))} GB with torch_geometric and hespotex.",
        "",
        "## 1. Large synthetic slides (`hespotex` preset)",
        "",
        f"Synthetic arrays: 1280-d float32 embeddings, hexagonal lattice 100 µm apart, expression = rank-{RANK} "
        f"linear model of the embeddings + noise. {args.genes:,} genes (reduced from 5,457) unless stated. "
        "Training batches: at most `max_nodes` spots (compact spatial blocks; *blocks* = how many); prediction blocks: "
        f"`max_nodes={args.predict_max_nodes:,}` core spots plus a halo of `n_hops` rings. "
        f"`fit` with `ae_epochs={args.epochs}`, `epochs={args.epochs}`, no validation; every epoch is timed inside "
        "the same `fit` call (AE = autoencoder pre-training; joint = the image stream trained against the frozen "
        "autoencoder's latent; first / second ..., the first includes warm-up). *Setup*: embedding "
        "standardisation, network initialisation, k-NN graphs, cutting into blocks, and the frozen autoencoder's "
        "latent targets (one forward pass). *Data alone*: peak RSS once the synthetic arrays exist (before the model). "
        "*Slide alone*: the same for the predicted slide (embeddings only).",
        "",
        _table(header, large_rows),
        "",
        "## 2. Parameters at 5,457 genes",
        "",
        param_text,
        "",
        "## 3. her2st-sized problem (4 training sections of ~180 spots, 1 predicted section)",
        "",
        _table(her2st_header, her2st_rows),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model_scale.md").write_text(text)


if __name__ == "__main__":
    main()

"""BatchNorm folded into the encoder's convolutions (``hespotex.pp._fold_batchnorm``): speed and features, side by side.

Two arms in one process, interleaved (A B A B ..., medians of the repeats), on the same inputs:

- **as loaded**: the frozen timm encoder in channels-last layout, as ``hx.pp.embed`` ran it before;
- **folded**: the same encoder with every BatchNorm folded into the convolution before it (what it runs now).

Measured (1) the encoder forward alone on batches of 64 normalised 224 px patches cut from her2st section C2
(patches/s), for EfficientNet-Lite0 (ImageNet weights, the default) and ResNet-18 (random init), and (2) the whole
``hx.pp.embed`` of section C2 at the library defaults (``cache=False``: the spot patch and a context patch twice as
wide, 4 stain-augmented views each: 10 encoder passes per spot), folding switched off for the first arm. Features:
the largest absolute difference between the arms and the smallest per-feature Pearson across spots.

    python benchmarks/encoder_fold.py [--repeats 3] [--embed-repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from statistics import median

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from _common import markdown_table, write_report


def min_feature_pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(0), b - b.mean(0)
    keep = (a.std(0) > 0) & (b.std(0) > 0)
    r = (a[:, keep] * b[:, keep]).sum(0) / np.sqrt((a[:, keep] ** 2).sum(0) * (b[:, keep] ** 2).sum(0))
    return float(r.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--embed-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/encoder_fold.md")
    args = parser.parse_args()
    import torch

    import hespotex as hx
    import hespotex.pp._encode as encode_module
    from hespotex._sample import get_table
    from hespotex.pp._encode import memory_format
    from hespotex.pp._encoders import load_encoder
    from hespotex.pp._fold_batchnorm import fold_batchnorm
    from hespotex.pp._patches import plan_patches, resize_batch

    torch.set_num_threads(args.threads)
    hx.settings.progress = False
    load = tuple(round(v, 1) for v in os.getloadavg())
    sdata = hx.datasets.her2st(args.data, sections=["C2"])["C2"]
    rows = []
    for name in ("efficientnet_lite0.imagenet", "resnet18"):
        enc = load_encoder(name)
        fmt = memory_format(enc.model)
        plain = enc.model.eval().to(memory_format=fmt)
        folded = fold_batchnorm(plain).to(memory_format=fmt)
        plan = plan_patches(sdata, patch_um=100.0, out_px=enc.input_size)
        mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
        std = torch.tensor(enc.std).view(1, 3, 1, 1)
        x = resize_batch(plan.read(np.arange(len(plan.order))), enc.input_size).sub_(mean).div_(std)
        batches = [x[i : i + 64].contiguous(memory_format=fmt) for i in range(0, len(x), 64)]
        times: dict[str, list[float]] = {"as loaded": [], "folded": []}
        feats = {}
        with torch.inference_mode():
            for model in (plain, folded):  # warm-up (kernel set-up)
                model(batches[0])
            for _ in range(args.repeats):
                for arm, model in (("as loaded", plain), ("folded", folded)):
                    t = time.perf_counter()
                    feats[arm] = np.concatenate([model(b).numpy() for b in batches])
                    times[arm].append(time.perf_counter() - t)
        a, b = feats["as loaded"], feats["folded"]
        t_a, t_b = median(times["as loaded"]), median(times["folded"])
        rows.append(
            [
                name, "encoder forward", len(x), f"{len(x) / t_a:.1f}", f"{len(x) / t_b:.1f}", f"**{t_a / t_b:.2f}**",
                f"{np.abs(a - b).max():.1e}", f"{min_feature_pearson(a, b):.6f}",
            ]
        )  # fmt: skip
        print(rows[-1], flush=True)

    # the whole embedding at the library defaults, folding off / on
    times = {"as loaded": [], "folded": []}
    feats = {}
    for _ in range(args.embed_repeats):
        for arm in ("as loaded", "folded"):
            encode_module.fold_batchnorm = (lambda m: m) if arm == "as loaded" else fold_batchnorm
            fresh = hx.datasets.her2st(args.data, sections=["C2"])["C2"]  # nothing embedded yet
            t = time.perf_counter()
            hx.pp.embed(fresh, key_added="X_bench", stain_augment=4, context_um="auto", cache=False)
            times[arm].append(time.perf_counter() - t)
            table = get_table(fresh)
            views = table.obsm["X_bench_stain_views"].reshape(table.n_obs, -1)
            feats[arm] = np.concatenate([table.obsm["X_bench"], views], axis=1)
    encode_module.fold_batchnorm = fold_batchnorm
    a, b = feats["as loaded"], feats["folded"]
    n = a.shape[0]
    rows.append(
        [
            "efficientnet_lite0.imagenet", "hx.pp.embed (2 scales x (1 + 4 views))", n,
            f"{10 * n / median(times['as loaded']):.1f}", f"{10 * n / median(times['folded']):.1f}",
            f"**{median(times['as loaded']) / median(times['folded']):.2f}**", f"{np.abs(a - b).max():.1e}",
            f"{min_feature_pearson(a, b):.6f}",
        ]
    )  # fmt: skip
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    text = "\n".join(
        [
            "# BatchNorm folded into the encoder's convolutions",
            "",
            f"Command: `{cmd}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args.threads}, torch "
            f"{torch.__version__}; load average at start {load}. Arms interleaved in one process; medians of "
            f"{args.repeats} (forward) / {args.embed_repeats} (embed) repeats.",
            "",
            markdown_table(
                [
                    "encoder",
                    "what",
                    "spots",
                    "as loaded patches/s",
                    "folded patches/s",
                    "speed-up",
                    "max abs feature difference",
                    "min per-feature Pearson",
                ],
                rows,
            ),
            "",
            "Patches/s of `hx.pp.embed` count its 10 encoder passes per spot (the two scales, each clean and in 4 "
            "stain-augmented views); its time also holds reading, resizing and the stain jitter, which folding does "
            "not change.",
        ]
    )
    write_report(text, args.out)


if __name__ == "__main__":
    main()

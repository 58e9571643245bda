"""Peak memory of ``hx.tl.train`` on one Visium HD section of ``n`` 8 µm bins (the folders of
``benchmarks/visium_hd.py``), phase by phase: read, embeddings in ``obsm``, training.

The embeddings are random ``n x 1280`` float32 put in ``obsm`` (what ``hx.pp.embed`` with
EfficientNet-Lite0 writes: their values do not change the memory of training, and embedding 100k
bins again would take ~5 min of a shared 2-core machine). Small "hespotex" preset, 2 epochs after 2
autoencoder epochs, one torch thread. Prints the RSS after each phase and the peak (ru_maxrss).

    python benchmarks/visium_hd_train.py [--n 100000] [--work /tmp/hespotex-bench-hd]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--work", default="/tmp/hespotex-bench-hd")
    args = parser.parse_args()
    import torch

    import hespotex as hx
    from hespotex.models import ModelConfig

    hx.settings.progress = False
    hx.settings.num_threads = 1
    torch.set_num_threads(1)
    t = time.perf_counter()
    sdata = hx.io.read_visium_hd(f"{args.work}/hd_{args.n}/outs", bin_size=8)
    table = sdata.tables["table"]
    print(f"read {table.n_obs:,} bins in {time.perf_counter() - t:.0f} s; RSS {rss_mb():.0f} MB")
    emb = np.random.default_rng(0).standard_normal((table.n_obs, 1280), dtype=np.float32)
    table.obsm["X_hespotex_image"] = emb
    print(f"embeddings in obsm: {emb.nbytes / 2**20:.0f} MB; RSS {rss_mb():.0f} MB")
    small = {"ae_epochs": 2, "ae_hidden_dim": 64, "latent_dim": 16, "projection_hidden_dim": 64, "head_hidden_dim": 64}
    config = ModelConfig.preset("hespotex", epochs=2, lr=3e-3, patience=None, decoder_neighbors=8, **small)
    t = time.perf_counter()
    hx.tl.train(sdata, genes=list(table.var_names), config=config, validation=None, seed=0, device="cpu")
    print(f"trained in {time.perf_counter() - t:.0f} s; RSS {rss_mb():.0f} MB")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

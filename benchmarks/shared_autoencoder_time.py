"""Training time of ensembles by how many autoencoders they pre-train, side by side (shift benchmark fold).

One held-out her2st section, one seed that no earlier run used, each arm in the same process one after the other with
a fresh, empty hespotex cache per arm (no autoencoder found cached: every arm pre-trains what it needs), 1 torch thread.
The arms are ``benchmarks/shift.py``'s tasks, all with 1,024-wide gene heads: 4 members, one per held-out section,
each on an autoencoder of its own training sections (``--grid smooth``, config ``head1024``); two members per held-out
section, the second on the first's autoencoder (``--grid rounds2_shared``, config ``head1024``: the default in
session 15); the same 8 members all on one autoencoder pre-trained on every training section (config ``aeall``,
``ModelConfig.ae_samples="all"``: the default since session 16). Needs the two-scale work folder (``shift.py embed``,
``embed --stain-views --patch 100 200``, ``shift_context.py prepare --context 200``).

    python benchmarks/shared_autoencoder_time.py [--work /tmp/hespotex_shift/context200] [--fold C2] [--seed 7]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import shift  # noqa: E402

_EIGHT = shift.GRIDS["rounds2_shared"][0]
ARMS = {
    "4 members on 4 autoencoders": {**shift.GRIDS["smooth"][0], "config": "head1024"},
    "8 members on 4 autoencoders (the default in session 15)": {**_EIGHT, "config": "head1024"},
    "8 members on 1 autoencoder of every section (the default)": {**_EIGHT, "config": "aeall"},
}


def main() -> None:
    import hespotex as hx
    from hespotex.tl.training import _training

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/hespotex_shift/context200")
    parser.add_argument("--fold", default="C2")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="benchmarks/results/shared_autoencoder_time.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"  # the work folder's embeddings, rows of their own (nothing reused)
        work.mkdir()
        (work / "emb").symlink_to(Path(args.work).resolve() / "emb")
        for label, setting in ARMS.items():
            hx.settings.cachedir = Path(tmp) / f"cache-{len(rows)}"  # empty: every autoencoder pre-trained here
            _training._AE_CACHE.clear()  # nor kept in memory from the arm before
            t0 = time.perf_counter()
            shift.run_task(fold=args.fold, seed=args.seed, what="hespotex", data=args.data, work=str(work), **setting)
            rows.append({"arm": label, "seconds": time.perf_counter() - t0})
            shutil.rmtree(hx.settings.cachedir, ignore_errors=True)
    table = pd.DataFrame(rows)
    table["vs 4 members"] = table["seconds"] / table["seconds"].iloc[0]
    table["vs the session-15 default"] = table["seconds"] / table["seconds"].iloc[1]
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    text = "\n".join(
        [
            "# Training time of ensembles by how many autoencoders they pre-train",
            "",
            f"Command: `{cmd}` (fold {args.fold}, seed {args.seed}; each arm one `shift.run_task`, training and "
            "scoring the held-out section, with an empty cache on disk and in memory; one process, 1 torch thread, "
            "one arm after the other on a 2-core machine).",
            "",
            table.round(2).to_markdown(index=False),
            "",
        ]
    )
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

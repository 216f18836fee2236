"""Wall time of the held-out cell-type workflow on the Kang subset against its 10-minute budget.

Runs ``pertbench celltype-transfer KANG --cell-type all`` (default models scgen and scpram,
default epochs, the no_change and perturbation_mean baselines, figures included) into a
fresh temporary folder and prints the per-(model, cell type) training times, the headline
metrics and the total wall time as a ratio of the 600-second budget (target: < 1.0 on 2 CPU
cores).

Usage::

    python benchmarks/celltype_transfer_kang.py [--data PATH] [--keep DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

BUDGET_SECONDS = 600.0
DEFAULT_DATA = (
    Path(__file__).resolve().parents[1].parent / "shared/data/kang2018_pbmc_ifnb_subset.h5ad"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--keep", type=Path, default=None, help="write the run here (kept)")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    if not args.data.is_file():
        print(f"Kang subset not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    import pandas as pd
    import torch

    from pertbench.cli.main import main as cli

    out = args.keep or Path(tempfile.mkdtemp(prefix="kang_transfer_"))
    argv = ["celltype-transfer", str(args.data), "--cell-type", "all", "--out", str(out)]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    if args.keep is not None:
        argv.append("--no-resume")
    start = time.perf_counter()
    code = cli(argv)
    wall = time.perf_counter() - start
    if code != 0:
        return code
    table = pd.read_csv(out / "metrics.csv")
    cols = [
        "model",
        "cell_type",
        "epochs",
        "train_seconds",
        "r2",
        "pearson_delta",
        "edistance",
        "jaccard_top100",
    ]
    with pd.option_context("display.width", 160, "display.max_rows", 100):
        print(table[cols].round(3).to_string(index=False))
    train = table.groupby("model")["train_seconds"].sum()
    print(f"torch threads: {torch.get_num_threads()}")
    print("training seconds per model: " + ", ".join(f"{m} {s:.1f}" for m, s in train.items()))
    print(
        f"total wall time: {wall:.1f} s; budget {BUDGET_SECONDS:.0f} s; ratio {wall / BUDGET_SECONDS:.2f} (target < 1)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

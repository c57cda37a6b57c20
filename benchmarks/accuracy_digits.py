"""A second dataset for the recipe comparison: the bundled scikit-learn digits.

`benchmarks/accuracy.py` chose the default recipe on Fashion-MNIST; this checks it on data that
played no part in that choice: `examples/data/digits` (1,797 8x8 grey digits, upscaled to 64
px), split by `finetune` itself (70% training, 30% test, no validation, the seed's split), with
the same recipes and a 12-epoch budget.

Usage:
    .venv/bin/python benchmarks/accuracy_digits.py [--seed 0] [--recipes default,keras_guide,...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--recipes", default="default,keras_guide,seed_docs")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from accuracy import run_one

    from finetune.config import Config, DataConfig
    from finetune.train import prepare_data

    split = Config(
        data=DataConfig(image_size=64, val_fraction=0.0, test_fraction=0.3), seed=args.seed
    )
    data = prepare_data(REPO / "examples" / "data" / "digits", split, progress=False)
    test = (data.images["test"], data.labels["test"])
    print(f"{len(data.labels['train'])} training, {len(test[1])} test images", flush=True)
    for name in args.recipes.split(","):
        result = run_one(
            name, "digits", args.seed, data.images["train"], data.labels["train"], test, 64,
            epochs=args.epochs,
        )  # fmt: skip
        print(f"{name}: {100 * result['accuracy']:.1f}% in {result['train_seconds']:.0f} s")


if __name__ == "__main__":
    main()

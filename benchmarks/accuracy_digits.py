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
import dataclasses
import os
import sys
import time
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

    from accuracy import recipe_config
    from sklearn.metrics import accuracy_score

    from finetune.config import Config, DataConfig
    from finetune.train import fit_run, prepare_data

    split = Config(
        data=DataConfig(image_size=64, val_fraction=0.0, test_fraction=0.3), seed=args.seed
    )
    data = prepare_data(REPO / "examples" / "data" / "digits", split, progress=False)
    test_x, test_y = data.images["test"], data.labels["test"]
    train_only = dataclasses.replace(
        data,
        images={**data.images, "test": test_x[:0]},
        labels={**data.labels, "test": test_y[:0]},
    )
    print(f"{len(data.labels['train'])} training, {len(test_y)} test images", flush=True)
    for name in args.recipes.split(","):
        config = recipe_config(name, args.epochs, args.seed, 64, data.labels["train"])
        start = time.perf_counter()
        run = fit_run(train_only, config, None, progress=False)
        seconds = time.perf_counter() - start
        predicted = run.predict_proba(test_x, progress=False).argmax(axis=1)
        print(
            f"{name}: {100 * accuracy_score(test_y, predicted):.1f}% in {seconds:.0f} s", flush=True
        )


if __name__ == "__main__":
    main()

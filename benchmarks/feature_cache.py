"""Speed of the frozen-phase fast path: the head phase with and without cached features.

Trains the same head phase (EfficientNet-Lite0 frozen, new head, no augmentation) on the same
images twice per round, once through the frozen backbone (`feature_cache = false`) and once on
features computed once (`feature_cache = true`), alternating the order between rounds, and
prints the median wall time of each and their ratio. The times are whole `fit_run` calls, so
both include building the model (a few seconds). The images are the bundled
Fashion-MNIST sample (2,500 images, 10 classes) at --image-size.

With `--augmented`: the head phase augmented (`--head-augment`), where nothing can be cached,
through the frozen backbone in Keras against the backbone's features streamed from ONNX Runtime
as the augmentation makes each batch (`FINETUNE_RUNTIME=keras` / `onnxruntime`; the conversion
is kept in the user cache after the first round, as for a user's second run).

Usage:
    .venv/bin/python benchmarks/feature_cache.py [--image-size 64] [--epochs 5] [--rounds 3]
        [--augmented]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--augmented",
        action="store_true",
        help="instead: the head phase augmented (--head-augment), through the frozen backbone "
        "in Keras (FINETUNE_RUNTIME=keras) against its features streamed from ONNX Runtime "
        "(FINETUNE_RUNTIME=onnxruntime)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.augmented:
        augmented(args)
        return

    from finetune.config import Config, DataConfig, RecipeConfig
    from finetune.train import fit_run, prepare_data

    base = Config(
        data=DataConfig(image_size=args.image_size, val_fraction=0.1, test_fraction=0.0),
        recipe=RecipeConfig(head_epochs=args.epochs, finetune_epochs=0, early_stopping_patience=0),
    )
    data = prepare_data(REPO / "examples" / "data" / "fashion_mnist", base, progress=False)
    print(f"{len(data.labels['train'])} training images at {args.image_size} px, "
          f"{args.epochs} head epochs", flush=True)  # fmt: skip
    times: dict[bool, list[float]] = {True: [], False: []}
    accuracy: dict[bool, float] = {}
    for round_ in range(args.rounds):
        for cached in (True, False) if round_ % 2 == 0 else (False, True):
            config = dataclasses.replace(
                base, recipe=dataclasses.replace(base.recipe, feature_cache=cached)
            )
            start = time.perf_counter()
            run = fit_run(data, config, None, progress=False)
            times[cached].append(time.perf_counter() - start)
            accuracy[cached] = run.history[-1]["val_accuracy"]
            print(f"  round {round_ + 1}, cached={cached}: {times[cached][-1]:.1f} s", flush=True)
    slow, fast = statistics.median(times[False]), statistics.median(times[True])
    print(f"median through the frozen backbone: {slow:.1f} s")
    print(f"median on cached features:          {fast:.1f} s")
    print(f"speed-up: {slow / fast:.1f}x (same head: validation accuracy "
          f"{accuracy[False]:.4f} vs {accuracy[True]:.4f})")  # fmt: skip
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_cache.json").write_text(
        json.dumps({"args": vars(args), "seconds": {str(k): v for k, v in times.items()}})
    )


def augmented(args: argparse.Namespace) -> None:
    from finetune.config import Config, DataConfig, RecipeConfig
    from finetune.train import fit_run, prepare_data

    config = Config(
        data=DataConfig(image_size=args.image_size, val_fraction=0.1, test_fraction=0.0),
        recipe=RecipeConfig(
            head_epochs=args.epochs, finetune_epochs=0, early_stopping_patience=0,
            head_augment=True,
        ),
    )  # fmt: skip
    data = prepare_data(REPO / "examples" / "data" / "fashion_mnist", config, progress=False)
    print(f"{len(data.labels['train'])} training images at {args.image_size} px, "
          f"{args.epochs} augmented head epochs", flush=True)  # fmt: skip
    times: dict[str, list[float]] = {"keras": [], "onnxruntime": []}
    accuracy: dict[str, float] = {}
    for round_ in range(args.rounds):
        order = ("onnxruntime", "keras") if round_ % 2 == 0 else ("keras", "onnxruntime")
        for runtime in order:
            os.environ["FINETUNE_RUNTIME"] = runtime
            start = time.perf_counter()
            run = fit_run(data, config, None, progress=False)
            times[runtime].append(time.perf_counter() - start)
            accuracy[runtime] = run.history[-1]["val_accuracy"]
            streamed = run.history[-1].get("features_streamed", False)
            print(f"  round {round_ + 1}, {runtime} (streamed={streamed}): "
                  f"{times[runtime][-1]:.1f} s", flush=True)  # fmt: skip
    slow, fast = statistics.median(times["keras"]), statistics.median(times["onnxruntime"])
    print(f"median through the frozen backbone in Keras: {slow:.1f} s")
    print(f"median on features streamed from ONNX Runtime: {fast:.1f} s")
    print(f"speed-up: {slow / fast:.2f}x (validation accuracy {accuracy['keras']:.4f} vs "
          f"{accuracy['onnxruntime']:.4f})")  # fmt: skip
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_stream.json").write_text(json.dumps({"args": vars(args), "seconds": times}))


if __name__ == "__main__":
    main()

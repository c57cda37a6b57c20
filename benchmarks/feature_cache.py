"""Speed of the frozen-phase fast path: the head phase with and without cached features.

Trains the same head phase (EfficientNet-Lite0 frozen, new head, no augmentation) on the same
images twice per round, once through the frozen backbone (`feature_cache = false`) and once on
features computed once (`feature_cache = true`), alternating the order between rounds, and
prints the median wall time of each and their ratio. The times are whole `fit_run` calls, so
both include building the model (a few seconds). The cache is filled by the runtime "auto"
picks (bfloat16 OpenVINO for these 2,500 training and validation images on a CPU with it;
`FINETUNE_RUNTIME=keras` for the fill in Keras). The images are the bundled
Fashion-MNIST sample (2,500 images, 10 classes) at --image-size.

With `--fill`: the default head phase on cached features, the cache filled in Keras
(`FINETUNE_RUNTIME=keras`) against each of `--runtimes`, converting in every round (a cache
folder of its own: what a first run pays). `--images N` takes N of the bundled images (the
same number from each class), for where converting starts to pay.

With `--augmented`: the head phase augmented (`--head-augment`), where nothing can be cached,
through the frozen backbone in Keras against the backbone's features streamed from each of
`--runtimes` as the augmentation makes each batch (`FINETUNE_RUNTIME=keras` / `openvino-bf16`
...; the conversion is kept in the user cache after the first round, as for a user's second
run, unless `--cold`: then every round converts, in a cache folder of its own). With
`--unfreeze-groups N` as well: instead of the head phase, an augmented phase 2 with the top N
layer groups training (and no phase 1), the groups below the cut streamed.

Usage:
    .venv/bin/python benchmarks/feature_cache.py [--image-size 64] [--epochs 5] [--rounds 3]
        [--augmented [--runtimes openvino,openvino-bf16] [--cold] [--unfreeze-groups 3]]
        [--fill [--runtimes openvino-bf16]] [--images 500]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_rounds(data, rounds: int, variants: dict) -> tuple[dict, dict]:
    """Times whole `fit_run` calls of each variant (name -> a function that sets it up and
    returns the config), taking turns and reversing the order every other round."""
    from finetune.train import fit_run

    times: dict[str, list[float]] = {name: [] for name in variants}
    accuracy: dict[str, float] = {}
    for round_ in range(rounds):
        names = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in names:
            config = variants[name]()
            start = time.perf_counter()
            run = fit_run(data, config, None, progress=False)
            times[name].append(time.perf_counter() - start)
            accuracy[name] = run.history[-1]["val_accuracy"]
            keys = ("features_cached", "features_streamed", "features_runtime")
            how = {k: run.history[-1].get(k) for k in keys}
            print(f"  round {round_ + 1}, {name} {how}: {times[name][-1]:.1f} s", flush=True)
    return times, accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--augmented",
        action="store_true",
        help="instead: the head phase augmented (--head-augment), through the frozen backbone "
        "in Keras (FINETUNE_RUNTIME=keras) against its features streamed "
        "(FINETUNE_RUNTIME=<each of --runtimes>)",
    )
    parser.add_argument(
        "--fill",
        action="store_true",
        help="instead: the cached head phase, its cache filled in Keras against each of "
        "--runtimes, converting every round",
    )
    parser.add_argument("--images", type=int, default=0,
                        help="use N of the bundled images: N / 10 from each of its 10 classes "
                        "(250 at most); 0: all")  # fmt: skip
    parser.add_argument("--runtimes", default="openvino,openvino-bf16",
                        help="with --augmented or --fill: the runtimes against Keras")  # fmt: skip
    parser.add_argument(
        "--cold",
        action="store_true",
        help="with --augmented: every round converts (a new cache folder)",
    )
    parser.add_argument(
        "--unfreeze-groups",
        type=int,
        default=0,
        help="with --augmented: an augmented phase 2 training the top N groups instead",
    )
    args = parser.parse_args(argv)
    if args.unfreeze_groups and not args.augmented:
        parser.error("--unfreeze-groups goes with --augmented")
    if args.fill and args.augmented:
        parser.error("--fill and --augmented are two different measurements")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from finetune.config import Config, DataConfig, RecipeConfig
    from finetune.train import prepare_data

    base = Config(
        data=DataConfig(image_size=args.image_size, val_fraction=0.1, test_fraction=0.0),
        recipe=RecipeConfig(
            head_epochs=args.epochs, finetune_epochs=0, early_stopping_patience=0,
            head_augment=args.augmented,
        ) if not args.unfreeze_groups else RecipeConfig(
            head_epochs=0, finetune_epochs=args.epochs, early_stopping_patience=0,
            unfreeze_groups=args.unfreeze_groups,
        ),
    )  # fmt: skip
    folder = REPO / "examples" / "data" / "fashion_mnist"
    if args.images:  # the first N / 10 files of each class, linked into a folder of their own
        subset = tempfile.TemporaryDirectory(prefix="finetune-bench-images-")
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            (Path(subset.name) / class_dir.name).mkdir()
            for file in sorted(class_dir.iterdir())[: max(1, args.images // 10)]:
                (Path(subset.name) / class_dir.name / file.name).symlink_to(file)
        folder = Path(subset.name)
    data = prepare_data(folder, base, progress=False)
    what = "augmented head epochs" if args.augmented else "head epochs"
    if args.unfreeze_groups:
        what = f"augmented epochs of the top {args.unfreeze_groups} groups"
    print(f"{len(data.labels['train'])} training images at {args.image_size} px, "
          f"{args.epochs} {what}", flush=True)  # fmt: skip

    def with_cache(cached: bool):
        return lambda: dataclasses.replace(
            base, recipe=dataclasses.replace(base.recipe, feature_cache=cached)
        )

    def in_runtime(runtime: str, cold: bool = False):
        def setup():
            os.environ["FINETUNE_RUNTIME"] = runtime
            if cold:  # an empty conversion cache, the weights linked in
                folder = Path(tempfile.mkdtemp(dir=scratch.name))
                (folder / "weights").symlink_to(weights, target_is_directory=True)
                os.environ["FINETUNE_CACHE_DIR"] = str(folder)
            return base

        return setup

    cold = args.cold or args.fill  # --fill: every round converts
    if args.augmented or args.fill:
        if cold:
            from finetune.cache import cache_dir

            weights = cache_dir("weights")  # the converted backbone weights, shared
            scratch = tempfile.TemporaryDirectory(prefix="finetune-bench-")
        frozen = "groups" if args.unfreeze_groups else "backbone"
        slow_name = f"Keras, through the frozen {frozen}"
        runtimes = [r for r in args.runtimes.split(",") if r]
        fast_names = [f"{r}, streamed" for r in runtimes]
        out_file = "feature_stream_partial.json" if args.unfreeze_groups else "feature_stream.json"
        if args.fill:
            slow_name, fast_names = "cache filled in Keras", [f"filled in {r}" for r in runtimes]
            out_file = "feature_fill.json"
        variants = {name: in_runtime(r, cold) for name, r in zip(fast_names, runtimes, strict=True)}
        variants[slow_name] = in_runtime("keras")
    else:
        slow_name, fast_names = "through the frozen backbone", ["on cached features"]
        variants = {fast_names[0]: with_cache(True), slow_name: with_cache(False)}
        out_file = "feature_cache.json"
    times, accuracy = timed_rounds(data, args.rounds, variants)
    slow = statistics.median(times[slow_name])
    print(f"median {slow_name}: {slow:.1f} s (validation accuracy {accuracy[slow_name]:.4f})")
    for fast_name in fast_names:
        fast = statistics.median(times[fast_name])
        print(f"median {fast_name}: {fast:.1f} s, speed-up {slow / fast:.2f}x (validation "
              f"accuracy {accuracy[fast_name]:.4f})")  # fmt: skip
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / out_file).write_text(json.dumps({"args": vars(args), "seconds": times}))


if __name__ == "__main__":
    main()

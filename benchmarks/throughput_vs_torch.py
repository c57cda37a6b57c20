"""EfficientNet-Lite0 on a CPU: finetune's training and inference steps against a PyTorch loop.

The first measurement of issue 7 ("Fast on a CPU: beat the fastest PyTorch loop on the same
network"). Every configuration runs in a child process of its own, one after the other, per
image size; each child times every mode on one fixed random batch of 32 (images as float32
pixels in [0, 255], 10 classes): the first call apart, warm-up calls, then the median of the
timed steps.

finetune (TensorFlow backend, no XLA, as `finetune train` runs it): `build_classifier` (random
weights) with the default head (average pooling, dropout 0.2, Dense), `seed_everything(0)` (op
determinism on, as `finetune train`), trainability set by `unfreeze_top_groups` /
`freeze_backbone`, the recipe's optimizer (`make_optimizer`: Adam on the cosine schedule, with
the discriminative per-group learning rates of phase 2) compiled by `two_phase.compile_phase`;
timed with `train_on_batch` / `predict_on_batch` on the model `fit_phases` trains
(`fold_batchnorm(model, snapshot=True)`: frozen BatchNorm folded into the convolutions, the
frozen pairs' weights compiled in) and the one `Run` predicts with from 256 images on
(`fold_batchnorm(model, frozen_only=False, snapshot=True)`; `infer`'s `live` row: the view
that reads its weights on every call, for fewer images). `finetune-unfolded` is the same
without the folding (finetune before it, to measure the lever side by side; in `full_bn` also
without the fused BatchNorm kernels, so the same as `keras_batchnorm` below); `finetune-bf16`
is `finetune` under Keras' `mixed_bfloat16` policy (speed only).

PyTorch reference (`torch_lite0.EfficientNetLite0`, a plain nn.Module with the same
architecture and parameter count): Adam(1e-3), cross-entropy, `loss.item()` every step, in
eager NCHW (`torch-nchw`), eager channels_last (`torch-cl`), `torch.compile` of the model
(`torch-compile`, NCHW, default inductor) and eager channels_last under
`torch.autocast("cpu", torch.bfloat16)` (`torch-bf16`).

Modes: `full` (every layer trains, BatchNorm frozen in inference mode: finetune's default; in
PyTorch the BatchNorm modules in eval() with requires_grad False), `full_bn` (BatchNorm trains
too: `--train-batchnorm`; PyTorch's plain `model.train()`; for `finetune` the BatchNorm layers run
on TensorFlow's fused kernels, as `fit_phases` trains them, and `keras_batchnorm` times Keras'
own BatchNorm instead, as before the seventh slice in RESULTS.md, with the eighth slice's
depthwise filter gradient), `partial` (the top
`--partial-groups` layer groups and the head train, BatchNorm frozen; for `finetune`, also
`cached`: the top's step on the frozen groups' output computed once, with `cache_fill`, what
an unaugmented partial phase runs (and `cache_fill_bf16`, the fill in bfloat16 OpenVINO:
measured, not used, "auto" fills the top groups' input in float32), `streamed`: the
frozen groups in ONNX Runtime then the top's step, measured and not used: RESULTS.md, fifth
slice, and `streamed_bf16`: the frozen groups in bfloat16 OpenVINO then the top's step, what an
augmented partial phase runs where "auto" streams: `two_phase.PhaseData.stream_images`;
and `frozen_bf16`: the step through the network with the frozen groups in bfloat16 in Keras,
`fold_batchnorm(..., bfloat16=True)`, what it ran before the twentieth slice where nothing
streams under "auto" on a CPU with bfloat16; and `train_bf16`, in `full` and `full_bn` too:
the layers that train in bfloat16 as well, mixed precision, `train_in_bfloat16=True`, what
`fit_phases` runs there now), `head` (frozen backbone,
the step through it; for `finetune`, also `streamed` and `streamed_bf16`: the frozen backbone
in OpenVINO, float32 or bfloat16, then the head's step on its output, one after the other, what
`--head-augment` runs from `finetune.inference.AUTO_MIN_IMAGES` image-epochs on, or from
`AUTO_BF16_MIN_IMAGES` on a CPU with bfloat16; and `frozen_bf16`, as for `partial`),
`head_cached` (finetune only: the head's step on cached pooled features, plus `cache_fill`,
the feature extraction that fills the cache once, and `cache_fill_keras_bf16`, the same in
bfloat16 in Keras: "auto" below `AUTO_BF16_MIN_IMAGES` images on a CPU with bfloat16) and
`infer` (for `finetune`,
also the model converted by `finetune.inference.OpenVinoForward` and run by OpenVINO in
float32 (what the cache fill, and `predict` and `evaluate` on a CPU without bfloat16, run from
`AUTO_MIN_IMAGES` images on) and in bfloat16 (what `predict` and `evaluate` run at any count on
a CPU with it; the Keras rows are what they run on other CPUs below `AUTO_MIN_IMAGES`), and by
`OnnxForward` in ONNX Runtime, its threads spinning between calls as `predict` runs it).

Usage: .venv/bin/python benchmarks/throughput_vs_torch.py [--help]; prints markdown tables and
writes benchmarks/out/throughput_vs_torch-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH, NUM_CLASSES, BACKBONE = 32, 10, "efficientnet_lite0"
CONFIGS = ("finetune", "torch-nchw", "torch-cl", "torch-compile", "finetune-unfolded",
           "finetune-bf16", "torch-bf16")  # fmt: skip
TORCH_FP32 = ("torch-nchw", "torch-cl", "torch-compile")
BF16 = ("finetune-bf16", "torch-bf16")
MODES = ("full", "full_bn", "partial", "head", "head_cached", "infer")
TRAIN_MODES = ("full", "full_bn", "partial", "head", "head_cached")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
              "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS", "KMP_AFFINITY")  # fmt: skip


def peak_rss_mb() -> float:
    """This process' peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_calls(call, warmup: int, steps: int) -> dict:
    """Times the first call apart, runs the other warm-up calls, then `steps` timed calls."""
    times = []
    for _ in range(max(1, warmup) + steps):
        start = time.perf_counter()
        call()  # returns host values (NumPy, loss.item()), so the step has finished
        times.append(time.perf_counter() - start)
    first, timed = times[0], times[max(1, warmup) :]
    median = statistics.median(timed)
    return {"first_call_s": first, "median_step_s": median, "images_per_s": BATCH / median,
            "steps": steps, "step_times_s": timed}  # fmt: skip


# --- finetune (TensorFlow) -------------------------------------------------------------------


def finetune_child(args: argparse.Namespace, bf16: bool, fold: bool = True) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from finetune.backbones.registry import get_backbone
    from finetune.config import RecipeConfig
    from finetune.fold import fold_batchnorm
    from finetune.model import build_classifier, freeze_backbone, unfreeze_top_groups
    from finetune.recipes.discriminative import group_lr_multipliers
    from finetune.recipes.feature_cache import cut_layer, split_at_cut, split_at_pool
    from finetune.recipes.optimizers import make_optimizer
    from finetune.recipes.schedules import phase_learning_rate
    from finetune.recipes.two_phase import _finite_check, compile_phase
    from finetune.train import seed_everything

    sys.path.insert(0, str(HERE))
    from trained_like import set_trained_like_batchnorm

    seed_everything(0)  # as `finetune train`: seeded, op determinism on
    if bf16:
        keras.config.set_dtype_policy("mixed_bfloat16")
    spec, recipe = get_backbone(BACKBONE), RecipeConfig()
    rng = np.random.default_rng(0)
    size = args.size
    x = rng.integers(0, 256, (BATCH, size, size, 3)).astype("float32")
    y = np.eye(NUM_CLASSES, dtype="float32")[rng.integers(0, NUM_CLASSES, BATCH)]
    model = build_classifier(spec, NUM_CLASSES, image_size=size, weights=None)
    set_trained_like_batchnorm(model)  # not the initial zeros and ones: see trained_like.py
    out = {"threads": {"tf_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                       "tf_inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
                       "note": "0 = TensorFlow's default (all cores)"},
           "dtype_policy": keras.config.dtype_policy().name, "jit_compile": None,
           "rss_after_build_mb": peak_rss_mb(), "modes": {}}  # fmt: skip

    def compile_for(fit_model, lowest_lr_groups=None):
        # The phase's schedule over a 100-step epoch, 5 epochs (only its shape matters here).
        lr = phase_learning_rate(recipe, recipe.finetune_lr, 100, 5)
        factors = None
        if lowest_lr_groups:
            factors = group_lr_multipliers(model, spec, lowest_lr_groups, recipe.discriminative_lr)
        compile_phase(fit_model, recipe, make_optimizer(recipe, lr, lr_multipliers=factors))

    def folded(m, frozen_only=True, snapshot=True):  # as fit_phases trains and Run predicts
        return fold_batchnorm(m, frozen_only=frozen_only, snapshot=snapshot) if fold else m

    def finite_check_ms(fit_model) -> float:  # StopOnNonFinite runs it after every batch
        check = _finite_check(fit_model.trainable_variables)
        bool(check())
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            bool(check())
            runs.append(time.perf_counter() - start)
        return 1000 * statistics.median(runs)

    for mode in args.modes:
        if mode in ("full", "full_bn", "partial"):
            count = -1 if mode != "partial" else args.partial_groups
            groups = unfreeze_top_groups(model, spec, count, train_batchnorm=mode == "full_bn")
            fit_model = folded(model)
            compile_for(fit_model, groups)
            row = time_calls(lambda m=fit_model: m.train_on_batch(x, y), args.warmup, args.steps)
            row["unfrozen_groups"] = groups
            if mode == "partial" and fold and not bf16:
                # Through the network with the frozen groups in bfloat16 in Keras: what
                # `fit_phases` trains under "auto" on a CPU with bfloat16 where nothing streams.
                low = fold_batchnorm(model, snapshot=True, bfloat16=True)
                compile_for(low, groups)
                row["frozen_bf16"] = time_calls(
                    lambda m=low: m.train_on_batch(x, y), args.warmup, args.steps
                )
            if fold and not bf16:
                # The layers that train in bfloat16 too (mixed precision), the frozen ones
                # below compiled in bfloat16: what `fit_phases` trains through the network
                # under "auto" on a CPU with bfloat16 (twentieth slice; with BatchNorm
                # training, `full_bn`, since the twenty-second).
                mixed = fold_batchnorm(model, snapshot=True, bfloat16=True, train_in_bfloat16=True)
                compile_for(mixed, groups)
                row["train_bf16"] = time_calls(
                    lambda m=mixed: m.train_on_batch(x, y), args.warmup, args.steps
                )
            # What the fused kernels replace (Keras' own BatchNorm; the depthwise convolutions'
            # swapped filter gradient stays, as in the row above).
            if mode == "full_bn" and fold and not bf16:
                plain = fold_batchnorm(model, fuse_training_batchnorm=False)
                compile_for(plain, groups)
                row["keras_batchnorm"] = time_calls(
                    lambda m=plain: m.train_on_batch(x, y), args.warmup, args.steps
                )
            cut = cut_layer(model, spec, groups, size * size * 3) if mode == "partial" else None
            if cut is not None and fold and not bf16:  # as `fit_phases` trains the top groups
                from finetune.inference import OnnxForward, OpenVinoForward

                lower, top = split_at_cut(model, cut)
                top = folded(top)
                compile_for(top, groups)
                below = folded(lower, frozen_only=False)
                row["cut_layer"] = cut
                # Unaugmented: the frozen groups' output computed once, the top trains on it.
                row["cache_fill"] = time_calls(
                    lambda f=below: f.predict_on_batch(x), args.warmup, args.steps
                )
                # The fill in bfloat16 (measured, not used: "auto" fills it in float32).
                fill = OpenVinoForward(lower, bfloat16=True)
                row["cache_fill_bf16"] = time_calls(lambda f=fill: f(x), args.warmup, args.steps)
                row["cache_fill_bf16"]["runtime"] = fill.runtime
                acts = np.asarray(below.predict_on_batch(x), "float32").reshape(len(x), -1)
                row["cached"] = time_calls(
                    lambda t=top, a=acts: t.train_on_batch(a, y), args.warmup, args.steps
                )
                # Augmented, ONNX Runtime chosen: the frozen groups in ONNX Runtime, then the
                # top's step (one after the other here; in training the pipeline overlaps them).
                # And the frozen groups in bfloat16 OpenVINO (where "auto" streams them).
                for key, below_cut in (("streamed", OnnxForward(lower)), ("streamed_bf16", fill)):

                    def streamed_step(t=top, f=below_cut):
                        return t.train_on_batch(f(x).reshape(len(x), -1), y)

                    row[key] = time_calls(streamed_step, args.warmup, args.steps)
                    row[key]["runtime"] = below_cut.runtime
        elif mode == "head":
            freeze_backbone(model)
            fit_model = folded(model)
            compile_for(fit_model)
            row = time_calls(lambda m=fit_model: m.train_on_batch(x, y), args.warmup, args.steps)
            if fold and not bf16:
                # The frozen backbone in bfloat16 in Keras (as `partial`).
                low = fold_batchnorm(model, snapshot=True, bfloat16=True)
                compile_for(low)
                row["frozen_bf16"] = time_calls(
                    lambda m=low: m.train_on_batch(x, y), args.warmup, args.steps
                )
                # `--head-augment` where "auto" streams.
                from finetune.inference import OpenVinoForward

                extractor, head = split_at_pool(model)
                compile_for(head)
                # bfloat16 (from AUTO_BF16_MIN_IMAGES on a CPU with it), then the same
                # conversion compiled in float32 (from AUTO_MIN_IMAGES without bfloat16).
                converted = OpenVinoForward(extractor, bfloat16=True)

                def streamed_step(h=head, f=converted):
                    return h.train_on_batch(f(x).reshape(len(x), -1), y)

                for key in ("streamed_bf16", "streamed"):
                    if key == "streamed":
                        converted.use_float32()
                    # One after the other here; in training the pipeline overlaps them.
                    row[key] = time_calls(streamed_step, args.warmup, args.steps)
                    row[key]["runtime"] = converted.runtime
        elif mode == "head_cached":
            freeze_backbone(model)
            extractor, head = split_at_pool(model)
            extractor = folded(extractor, frozen_only=False)
            fill = time_calls(lambda e=extractor: e.predict_on_batch(x), args.warmup, args.steps)
            features = np.asarray(extractor.predict_on_batch(x), dtype="float32")
            compile_for(head)
            # The head's steps take milliseconds: time 10x as many of them.
            row = time_calls(
                lambda h=head, f=features: h.train_on_batch(f, y), args.warmup, 10 * args.steps
            )
            row["cache_fill"] = fill
            if fold and not bf16:  # the fill in Keras in bfloat16 ("auto" below 2,000 images)
                low = fold_batchnorm(split_at_pool(model)[0], frozen_only=False, snapshot=True,
                                     bfloat16=True)  # fmt: skip
                row["cache_fill_keras_bf16"] = time_calls(
                    lambda e=low: e.predict_on_batch(x), args.warmup, args.steps
                )
            row["finite_check_ms"] = finite_check_ms(head)
        else:  # infer
            fast = folded(model, frozen_only=False)
            row = time_calls(lambda m=fast: m.predict_on_batch(x), args.warmup, args.steps)
            if fold:  # `predict` below 256 images (CPUs without bfloat16): live weights
                live = folded(model, frozen_only=False, snapshot=False)
                row["live"] = time_calls(lambda m=live: m.predict_on_batch(x), args.warmup,
                                         args.steps)  # fmt: skip
            if fold and not bf16:  # what predict/evaluate run from AUTO_MIN_IMAGES images on
                from finetune.inference import OnnxForward, OpenVinoForward

                start = time.perf_counter()
                onnx = OnnxForward(model, spin=True)  # as `predict` and `evaluate` run it
                row["onnx_conversion_s"] = time.perf_counter() - start
                row["onnxruntime"] = time_calls(lambda f=onnx: f(x), args.warmup, args.steps)
                for key, bf in (("openvino", False), ("openvino_bf16", True)):
                    start = time.perf_counter()
                    ov = OpenVinoForward(model, bfloat16=bf)
                    row[f"{key}_conversion_s"] = time.perf_counter() - start
                    row[key] = time_calls(lambda f=ov: f(x), args.warmup, args.steps)
                    row[key]["runtime"] = ov.runtime
        if mode in ("full", "full_bn", "partial", "head"):
            row["trainable_weights"] = int(sum(np.prod(w.shape) for w in model.trainable_weights))
            row["finite_check_ms"] = finite_check_ms(model)
        row["peak_rss_mb"] = peak_rss_mb()
        out["jit_compile"] = bool(model.jit_compile)
        out["modes"][mode] = row
        print(f"  {mode}: {row['images_per_s']:.1f} img/s", file=sys.stderr, flush=True)
    return out


# --- PyTorch reference -----------------------------------------------------------------------


def torch_child(args: argparse.Namespace, config: str) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE))
    from torch_lite0 import EfficientNetLite0

    torch.manual_seed(0)
    channels_last = config in ("torch-cl", "torch-bf16")
    compiled = config == "torch-compile"
    bf16 = config == "torch-bf16"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    size = args.size
    x = torch.randint(0, 256, (BATCH, 3, size, size)).float().contiguous(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (BATCH,))
    model = EfficientNetLite0(NUM_CLASSES).to(memory_format=fmt)
    out = {"threads": {"torch_intra_op": torch.get_num_threads(),
                       "torch_interop": torch.get_num_interop_threads()},
           "channels_last": channels_last, "compiled": compiled, "autocast_bf16": bf16,
           "rss_after_build_mb": peak_rss_mb(), "modes": {}}  # fmt: skip

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def set_mode(mode: str) -> None:
        """Trainability as a PyTorch user would set it for each mode."""
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        groups = model.layer_groups()
        frozen = {"partial": groups[: -args.partial_groups], "head": groups}.get(mode, [])
        for _, group in frozen:
            group.eval()
            for p in group.parameters():
                p.requires_grad_(False)
        if mode != "full_bn":  # BatchNorm frozen (finetune's default): eval(), no gradients
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)

    for mode in args.modes:
        if mode == "head_cached":
            continue
        if compiled:
            torch._dynamo.reset()
        net = torch.compile(model) if compiled else model
        warmup = args.warmup + (1 if compiled else 0)  # compiling can take two calls
        if mode == "infer":
            model.eval()

            def step(net=net):
                with torch.inference_mode(), autocast():
                    return net(x).float().numpy()

        else:
            set_mode(mode)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.Adam(params, lr=1e-3)

            def step(net=net, opt=opt):
                opt.zero_grad(set_to_none=True)
                with autocast():
                    loss = F.cross_entropy(net(x), y)
                loss.backward()
                opt.step()
                return loss.item()

        start = time.perf_counter()
        row = time_calls(step, warmup, args.steps)
        row["mode_wall_s"] = time.perf_counter() - start
        if mode != "infer":
            row["trainable_weights"] = sum(p.numel() for p in params)
        row["peak_rss_mb"] = peak_rss_mb()
        out["modes"][mode] = row
        print(f"  {mode}: {row['images_per_s']:.1f} img/s", file=sys.stderr, flush=True)
    return out


# --- orchestration ---------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    if args.child.startswith("finetune"):
        out = finetune_child(
            args, bf16=args.child == "finetune-bf16", fold=args.child != "finetune-unfolded"
        )
    else:
        out = torch_child(args, args.child)
    print("RESULT " + json.dumps(out))


def run_child(config: str, size: int, steps: int, args: argparse.Namespace) -> dict:
    modes = [m for m in args.modes if m in MODES]
    cmd = [sys.executable, __file__, "--child", config, "--size", str(size), "--steps",
           str(steps), "--warmup", str(args.warmup), "--partial-groups",
           str(args.partial_groups), "--modes", ",".join(modes)]  # fmt: skip
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    print(f"--- {config} {size}px", file=sys.stderr, flush=True)
    result: dict = {"config": config, "size": size, "load_before": os.getloadavg()}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True,
                              timeout=args.timeout)  # fmt: skip
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            result["status"] = f"failed (exit {proc.returncode})"
        else:
            result.update(json.loads(lines[-1][len("RESULT ") :]), status="ok")
    except subprocess.TimeoutExpired:
        result["status"] = f"timed out after {args.timeout} s"
    result["wall_s"] = time.perf_counter() - start
    result["load_after"] = os.getloadavg()
    return result


def speed(run: dict | None, mode: str) -> float | None:
    if not run or run.get("status") != "ok" or mode not in run["modes"]:
        return None
    return run["modes"][mode]["images_per_s"]


def amortised_cached(run: dict, epochs: int) -> float | None:
    """Image-epochs/s of `epochs` head epochs on cached features, the cache filled once."""
    row = run.get("modes", {}).get("head_cached") if run.get("status") == "ok" else None
    if not row:
        return None
    return epochs / (1 / row["cache_fill"]["images_per_s"] + epochs / row["images_per_s"])


def summarise(report: dict) -> dict:
    """Per (size, mode): finetune, each PyTorch configuration, the best one and the ratios."""
    runs = {(r["config"], r["size"]): r for r in report["runs"]}
    cells = []
    for size in report["sizes"]:
        for mode in [m for m in MODES if m in report["modes"]]:
            cell = {"size": size, "mode": mode}
            for config in CONFIGS:
                cell[config] = speed(runs.get((config, size)), mode)
            if mode == "head_cached":
                cell["mode"] = "head_cached"
                for config in ("finetune", "finetune-unfolded", "finetune-bf16"):
                    run = runs.get((config, size))
                    if run and run.get("status") == "ok" and "head_cached" in run["modes"]:
                        cell[f"{config}_cache_fill"] = run["modes"]["head_cached"]["cache_fill"][
                            "images_per_s"
                        ]
                        cell[f"{config}_amortised_5"] = amortised_cached(run, 5)
                        low = run["modes"]["head_cached"].get("cache_fill_keras_bf16")
                        if low:
                            cell[f"{config}_cache_fill_keras_bf16"] = low["images_per_s"]
                # compared against PyTorch's step through the frozen backbone
                for config in CONFIGS[1:]:
                    if config.startswith("torch"):
                        cell[config] = speed(runs.get((config, size)), "head")
            fp32 = {c: cell[c] for c in TORCH_FP32 if cell[c]}
            if fp32:
                best = max(fp32, key=fp32.get)
                cell["best_torch"], cell["best_torch_config"] = fp32[best], best
                if cell["finetune"]:
                    cell["ratio"] = cell["finetune"] / fp32[best]
                if cell.get("finetune_amortised_5"):
                    cell["ratio_amortised_5"] = cell["finetune_amortised_5"] / fp32[best]
                low = cell.get("finetune_cache_fill_keras_bf16")
                if low and cell["finetune"]:  # 5 epochs and the fill in bfloat16 Keras
                    cell["finetune_amortised_5_keras_bf16"] = 5 / (1 / low + 5 / cell["finetune"])
                    cell["ratio_amortised_5_keras_bf16"] = (
                        cell["finetune_amortised_5_keras_bf16"] / fp32[best]
                    )
                if cell["finetune-bf16"]:
                    cell["ratio_bf16"] = cell["finetune-bf16"] / fp32[best]
            run = runs.get(("finetune", size))
            if mode == "infer" and run and run.get("status") == "ok":
                live = run["modes"].get("infer", {}).get("live")
                if live and fp32:
                    cell["finetune_live"] = live["images_per_s"]
                    cell["ratio_live"] = live["images_per_s"] / cell["best_torch"]
                onnx = run["modes"].get("infer", {}).get("onnxruntime")
                if onnx and fp32:
                    cell["finetune_onnx"] = onnx["images_per_s"]
                    cell["ratio_onnx"] = onnx["images_per_s"] / cell["best_torch"]
                for key in ("openvino", "openvino_bf16"):
                    ov = run["modes"].get("infer", {}).get(key)
                    if ov and fp32:
                        cell[f"finetune_{key}"] = ov["images_per_s"]
                        cell[f"ratio_{key}"] = ov["images_per_s"] / cell["best_torch"]
                        cell[f"{key}_runtime"] = ov.get("runtime", key)
            if mode == "full_bn" and run and run.get("status") == "ok":
                plain = run["modes"].get(mode, {}).get("keras_batchnorm")
                if plain and fp32:
                    cell["finetune_keras_bn"] = plain["images_per_s"]
                    cell["ratio_keras_bn"] = plain["images_per_s"] / cell["best_torch"]
            if mode in ("full", "full_bn", "partial") and run and run.get("status") == "ok":
                mixed = run["modes"].get(mode, {}).get("train_bf16")
                if mixed and fp32:
                    cell["finetune_train_bf16"] = mixed["images_per_s"]
                    cell["ratio_train_bf16"] = mixed["images_per_s"] / cell["best_torch"]
                    cell["train_bf16_over_fp32"] = mixed["images_per_s"] / cell["finetune"]
            if mode in ("head", "partial") and run and run.get("status") == "ok":
                low = run["modes"].get(mode, {}).get("frozen_bf16")
                if low and fp32:
                    cell["finetune_frozen_bf16"] = low["images_per_s"]
                    cell["ratio_frozen_bf16"] = low["images_per_s"] / cell["best_torch"]
                for key in ("streamed", "streamed_bf16"):
                    streamed = run["modes"].get(mode, {}).get(key)
                    if streamed and fp32:
                        cell[f"finetune_{key}"] = streamed["images_per_s"]
                        cell[f"{key}_runtime"] = streamed.get("runtime", "onnxruntime")
                        cell[f"ratio_{key}"] = streamed["images_per_s"] / cell["best_torch"]
                cached = run["modes"].get(mode, {}).get("cached")
                if mode == "partial" and cached and fp32:
                    fill = run["modes"][mode]["cache_fill"]["images_per_s"]
                    cell["finetune_cached"] = cached["images_per_s"]
                    cell["finetune_cached_5"] = 5 / (1 / fill + 5 / cached["images_per_s"])
                    cell["ratio_cached_5"] = cell["finetune_cached_5"] / cell["best_torch"]
                    fill_bf16 = run["modes"][mode].get("cache_fill_bf16")
                    if fill_bf16:
                        per_image = 1 / fill_bf16["images_per_s"] + 5 / cached["images_per_s"]
                        cell["finetune_cached_5_bf16"] = 5 / per_image
                        cell["cache_fill_bf16_runtime"] = fill_bf16.get("runtime")
                        cell["ratio_cached_5_bf16"] = 5 / per_image / cell["best_torch"]
            if cell["finetune"] and cell["finetune-unfolded"]:
                cell["fold_gain"] = cell["finetune"] / cell["finetune-unfolded"]
            if cell["finetune"] and cell["finetune-bf16"]:
                cell["bf16_over_fp32"] = cell["finetune-bf16"] / cell["finetune"]
            if cell["torch-cl"] and cell["torch-bf16"]:
                cell["torch_bf16_over_cl"] = cell["torch-bf16"] / cell["torch-cl"]
            cells.append(cell)
    return {"cells": cells}


def fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    short = {"torch-nchw": "nchw", "torch-cl": "cl", "torch-compile": "compile"}
    lines = ["| px | mode | finetune | finetune unfolded | fold gain | torch NCHW "
             "| torch channels_last | torch.compile | best torch | finetune / best |",
             "|---" * 10 + "|"]  # fmt: skip
    for c in report["summary"]["cells"]:
        mode = c["mode"]
        ratio = fmt(c.get("ratio"), 2)
        if mode == "head_cached":
            mode = "head, cached features (vs torch head)"
            if c.get("finetune_amortised_5"):
                ratio += f" (5 epochs + fill: {fmt(c.get('ratio_amortised_5'), 2)})"
        best = f"{fmt(c.get('best_torch'))} ({short.get(c.get('best_torch_config'), '')})"
        lines.append(f"| {c['size']} | {mode} | {fmt(c['finetune'])} "
                     f"| {fmt(c['finetune-unfolded'])} | {fmt(c.get('fold_gain'), 2)} "
                     f"| {fmt(c['torch-nchw'])} "
                     f"| {fmt(c['torch-cl'])} | {fmt(c['torch-compile'])} | {best} "
                     f"| {ratio} |")  # fmt: skip
        if c.get("finetune_amortised_5_keras_bf16"):
            lines.append(f"| {c['size']} | head, cached features, 5 epochs + the fill in "
                         f"bfloat16 in Keras (auto on a CPU with bfloat16 below 2,000 images; "
                         f"fill {fmt(c['finetune_cache_fill_keras_bf16'])} img/s) "
                         f"| ({fmt(c['finetune_amortised_5_keras_bf16'])}) | | | | | | {best} "
                         f"| {fmt(c.get('ratio_amortised_5_keras_bf16'), 2)} |")  # fmt: skip
        if c.get("finetune_frozen_bf16"):
            what = "head through the backbone" if c["mode"] == "head" else "partial, augmented"
            lines.append(f"| {c['size']} | {what}, the frozen layers in bfloat16 in Keras (auto "
                         f"on a CPU with bfloat16, where nothing streams) "
                         f"| {fmt(c['finetune_frozen_bf16'])} | | | | | | {best} "
                         f"| {fmt(c.get('ratio_frozen_bf16'), 2)} |")  # fmt: skip
        if c.get("finetune_train_bf16"):
            lines.append(f"| {c['size']} | {c['mode']}, trained in bfloat16 (mixed precision; "
                         f"auto on a CPU with bfloat16, where nothing streams; "
                         f"{fmt(c.get('train_bf16_over_fp32'), 2)}x the float32 step) "
                         f"| {fmt(c['finetune_train_bf16'])} | | | | | | {best} "
                         f"| {fmt(c.get('ratio_train_bf16'), 2)} |")  # fmt: skip
        if c.get("finetune_keras_bn"):
            lines.append(f"| {c['size']} | full_bn, Keras' own BatchNorm (not the fused "
                         f"kernels) | {fmt(c['finetune_keras_bn'])} | | | | | "
                         f"| {best} | {fmt(c.get('ratio_keras_bn'), 2)} |")  # fmt: skip
        if c.get("finetune_cached"):
            lines.append(f"| {c['size']} | partial, unaugmented: step on cached activations "
                         f"(5 epochs + fill) | {fmt(c['finetune_cached'])} "
                         f"({fmt(c['finetune_cached_5'])}) | | | | | | {best} "
                         f"| {fmt(c.get('ratio_cached_5'), 2)} |")  # fmt: skip
        if c.get("finetune_cached_5_bf16"):
            lines.append(f"| {c['size']} | partial, unaugmented, the fill in "
                         f"{c['cache_fill_bf16_runtime']} (5 epochs + fill; measured, not used) "
                         f"| ({fmt(c['finetune_cached_5_bf16'])}) | | | | | | {best} "
                         f"| {fmt(c.get('ratio_cached_5_bf16'), 2)} |")  # fmt: skip
        for key in ("streamed", "streamed_bf16"):
            if not c.get(f"finetune_{key}"):
                continue
            what = (
                f"head, streamed: {c[f'{key}_runtime']} features + head step (--head-augment, "
                "where auto converts)" if c["mode"] == "head"
                else f"partial, augmented: {c[f'{key}_runtime']} below the cut + top step ("
                + ("where auto streams)" if key == "streamed_bf16" else "measured, not used)")
            )  # fmt: skip
            lines.append(f"| {c['size']} | {what} "
                         f"| {fmt(c[f'finetune_{key}'])} | | | | | | {best} "
                         f"| {fmt(c.get(f'ratio_{key}'), 2)} |")  # fmt: skip
        if c.get("finetune_live"):
            lines.append(f"| {c['size']} | infer, Keras reading the weights on every call "
                         f"(predict/evaluate below 256 images, CPUs without bfloat16) | "
                         f"{fmt(c['finetune_live'])} "
                         f"| | | | | | {best} | {fmt(c.get('ratio_live'), 2)} |")  # fmt: skip
        if c.get("finetune_onnx"):
            lines.append(f"| {c['size']} | infer, ONNX Runtime (--runtime onnxruntime) "
                         f"| {fmt(c['finetune_onnx'])} | | | | | | {best} "
                         f"| {fmt(c.get('ratio_onnx'), 2)} |")  # fmt: skip
        for key in ("openvino", "openvino_bf16"):
            if c.get(f"finetune_{key}"):
                lines.append(f"| {c['size']} | infer, {c[f'{key}_runtime']} (--runtime "
                             f"{c[f'{key}_runtime']}) | {fmt(c[f'finetune_{key}'])} "
                             f"| | | | | | {best} | {fmt(c.get(f'ratio_{key}'), 2)} |")  # fmt: skip
    lines += ["", "| px | mode | finetune fp32 | finetune bf16 | bf16 / fp32 | bf16 / best torch "
              "fp32 | torch cl fp32 | torch cl bf16 autocast | torch bf16 / fp32 |",
              "|---" * 9 + "|"]  # fmt: skip
    for c in report["summary"]["cells"]:
        if c["finetune-bf16"] is None and c["torch-bf16"] is None:
            continue
        cells = [
            c["size"],
            c["mode"],
            fmt(c["finetune"]),
            fmt(c["finetune-bf16"]),
            fmt(c.get("bf16_over_fp32"), 2),
            fmt(c.get("ratio_bf16"), 2),
            fmt(c["torch-cl"]),
            fmt(c["torch-bf16"]),
            fmt(c.get("torch_bf16_over_cl"), 2),
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "| config | px | peak RSS after build MB | peak RSS after full steps MB "
              "| threads | wall s | load before / after |", "|---" * 7 + "|"]  # fmt: skip
    for r in report["runs"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['config']} | {r['size']} | {r['status']} | | | "
                         f"{r['wall_s']:.0f} | |")  # fmt: skip
            continue
        full = r["modes"].get("full", {}).get("peak_rss_mb")
        threads = ", ".join(f"{k}={v}" for k, v in r["threads"].items() if k != "note")
        load = f"{r['load_before'][0]:.2f} / {r['load_after'][0]:.2f}"
        lines.append(f"| {r['config']} | {r['size']} | {r['rss_after_build_mb']:.0f} "
                     f"| {fmt(full, 0)} | {threads} | {r['wall_s']:.0f} | {load} |")  # fmt: skip
    return "\n".join(lines)


def uptime() -> str:
    return subprocess.run(["uptime"], stdout=subprocess.PIPE, text=True).stdout.strip()


def cpu_model() -> str:
    """The CPU's model name (the machine this workplace lends may change between sessions)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_flags() -> list[str]:
    """The CPU features that matter for bfloat16 here (AVX-512, its BF16 part, AMX)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return sorted(f for f in flags if f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))


def parse_steps(text: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(s) for s in text.split(",") if s]  # noqa: E731
    names = lambda text: [s for s in text.split(",") if s]  # noqa: E731
    parser.add_argument("--sizes", type=ints, default=[64, 128, 224], help="input sizes, px")
    parser.add_argument("--bf16-sizes", type=ints, default=[128, 224],
                        help="sizes at which the bf16 configurations run")  # fmt: skip
    parser.add_argument(
        "--compile-sizes",
        type=ints,
        default=[64, 128, 224],
        help="sizes at which torch-compile runs (compiling takes a minute or more per mode)",
    )
    parser.add_argument("--configs", type=names, default=list(CONFIGS),
                        help=f"any of {','.join(CONFIGS)}")  # fmt: skip
    parser.add_argument("--modes", type=names, default=list(MODES), help=",".join(MODES))
    parser.add_argument(
        "--steps",
        default="64=10,128=8,224=5",
        help="timed steps per size (SIZE=N,...; other sizes take the last)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed calls, the first included (+1 for torch.compile)",
    )
    parser.add_argument(
        "--partial-groups",
        type=int,
        default=3,
        help="layer groups trained in the partial mode, from the top",
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds per child process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.steps = int(args.steps)
        return child(args)
    steps = parse_steps(args.steps)
    start = time.perf_counter()
    report = {"command": " ".join([".venv/bin/python", *sys.argv]),
              "date": datetime.now().astimezone().isoformat(timespec="seconds"),
              "batch": BATCH, "backbone": BACKBONE, "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(),
              "sizes": args.sizes, "modes": args.modes, "steps": steps, "warmup": args.warmup,
              "partial_groups": args.partial_groups,
              "thread_env": {k: os.environ.get(k) for k in THREAD_ENV},
              "load_start": os.getloadavg(), "uptime_start": uptime(), "cpu_flags": cpu_flags(),
              "cpu_model": cpu_model(),
              "versions": {p: importlib.metadata.version(p)
                           for p in ("keras", "tensorflow-cpu", "torch", "numpy")},
              "runs": []}  # fmt: skip
    for size in args.sizes:
        n = steps.get(size, list(steps.values())[-1])
        for config in args.configs:
            if config in BF16 and size not in args.bf16_sizes:
                continue
            if config == "torch-compile" and size not in args.compile_sizes:
                continue
            report["runs"].append(run_child(config, size, n, args))
    report["load_end"], report["uptime_end"] = os.getloadavg(), uptime()
    report["summary"] = summarise(report)
    report["total_s"] = time.perf_counter() - start
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"throughput_vs_torch-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"{report['cpu_model']} ({', '.join(report['cpu_flags'])})\n")
    print(markdown(report))
    print(f"\ntotal {report['total_s']:.0f} s; load average {report['load_start']} -> "
          f"{report['load_end']}; JSON: {path}")  # fmt: skip


if __name__ == "__main__":
    main()

"""The `finetune` command line: each subcommand parses options and calls one library function.

Errors a user can cause (`FinetuneError`) are printed as one line and exit with status 2; nothing
else is caught.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from finetune.errors import FinetuneError

app = typer.Typer(
    name="finetune",
    help="Fine-tune pretrained Keras networks on your own image folders.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _start(ctx: typer.Context) -> None:
    # Started by the `finetune` command, `import finetune` defers TensorFlow (see
    # src/_finetune_cli.py); every command but `predict` (which may need none of it: a run's
    # kept conversion) and `runs` (JSON files only) loads it here, before any of finetune's
    # modules imports Keras: quietly, and with every custom layer registered for loading
    # models. Not for a command's --help.
    if ctx.invoked_subcommand not in ("predict", "runs") and "--help" not in sys.argv[1:]:
        import finetune

        finetune._load_api()


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@app.command()
def backbones() -> None:
    """List the registered backbones and whether their ImageNet weights are on this machine."""
    from finetune.backbones import list_backbones

    table = Table(title="Backbones")
    for col in ("name", "family", "input", "groups", "ImageNet weights"):
        table.add_column(col, no_wrap=col == "name")
    missing = []
    for spec in list_backbones():
        status = spec.weights.status()
        table.add_row(
            spec.name,
            spec.family,
            f"{spec.input_size}px",
            str(len(spec.layer_groups)),
            "[green]available[/]" if status.available else "[red]missing[/]",
        )
        if not status.available:
            missing.append((spec.name, status.how_to_get))
    console.print(table)
    for name, how in missing:
        console.print(f"[bold]{name}[/]: {how}", soft_wrap=True)


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    table = Table(title=title)
    for col in ("class", "precision", "recall", "f1", "support", "ROC-AUC"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for name, m in metrics["per_class"].items():
        auc = m.get("roc_auc")
        table.add_row(
            name,
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
            f"{m['f1']:.3f}",
            str(m["support"]),
            "-" if auc is None else f"{auc:.3f}",
        )
    from finetune.evaluate import averaged_over_note

    over = averaged_over_note(metrics)
    for average in ("macro", "weighted"):
        if f"{average}_precision" in metrics:
            table.add_row(
                f"[italic]{average} average{over if average == 'macro' else ''}[/]",
                f"{metrics[f'{average}_precision']:.3f}",
                f"{metrics[f'{average}_recall']:.3f}",
                f"{metrics[f'{average}_f1']:.3f}",
                str(metrics["num_images"]),
                f"{metrics['roc_auc_ovr']:.3f}"
                if average == "macro" and metrics.get("roc_auc_ovr") is not None
                else "",
            )
    console.print(table)
    extra = ""
    if metrics.get("tta", 1) > 1:
        extra += f"  ({metrics['tta']} test-time augmentation views)"
    if "top_k_accuracy" in metrics:
        extra += f"  top-{metrics['top_k']} {_percent(metrics['top_k_accuracy'])}"
    if "ece" in metrics:
        extra += f"  calibration error (ECE) {metrics['ece']:.3f}"
    console.print(
        f"accuracy [bold]{_percent(metrics['accuracy'])}[/]  macro F1 {metrics['macro_f1']:.3f}"
        f"{over}{extra}  on {metrics['num_images']} images ({metrics.get('data', '')})"
    )
    cal = metrics.get("calibration")
    if cal:
        console.print(
            f"calibrated with temperature {cal['temperature']:.3f} (fitted on the "
            f"{cal['fitted_on']}): ECE {cal['ece_before']:.3f} before, "
            f"{cal['ece_after']:.3f} after, on the {cal['measured_on']}"
        )
    if metrics.get("bad_files"):
        console.print(
            f"[yellow]{len(metrics['bad_files'])} image(s) could not be read and are not "
            "counted[/] (bad_files in the metrics)."
        )


@app.command()
def train(
    data_dir: Annotated[Path, typer.Argument(help="Class folders, or train/ (+ val/, test/).")],
    out: Annotated[Path, typer.Option(help="Run directory to write.")] = Path("runs/latest"),
    config: Annotated[Path | None, typer.Option(help="TOML config file.")] = None,
    backbone: Annotated[
        str | None, typer.Option(help="Backbone name (finetune backbones).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="'imagenet', 'none', or a local weights file.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of split, shuffling, init.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels.")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    head_epochs: Annotated[
        int | None, typer.Option(help="Phase 1 epochs (frozen backbone).")
    ] = None,
    head_lr: Annotated[float | None, typer.Option(help="Phase 1 learning rate.")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="Phase 2 epochs.")] = None,
    finetune_lr: Annotated[float | None, typer.Option(help="Phase 2 learning rate.")] = None,
    unfreeze_groups: Annotated[
        int | None, typer.Option(help="Layer groups unfrozen in phase 2 (-1: all).")
    ] = None,
    unfreeze: Annotated[
        str | None, typer.Option(help="at_once|gradual|plateau: how phase 2 unfreezes its groups.")
    ] = None,
    gradual_epochs: Annotated[
        int | None, typer.Option(help="Epochs per group when unfreezing gradually.")
    ] = None,
    discriminative_lr: Annotated[
        float | None,
        typer.Option(help="Phase 2 LR factor of the lowest unfrozen group (geometric to 1)."),
    ] = None,
    schedule: Annotated[
        str | None, typer.Option(help="constant|cosine|one_cycle|plateau, per phase.")
    ] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Warm-up of 'cosine'.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd|rmsprop|adagrad|adam|adamw")] = None,
    dropout: Annotated[float | None, typer.Option()] = None,
    label_smoothing: Annotated[float | None, typer.Option()] = None,
    class_weight: Annotated[
        str | None, typer.Option(help="none|balanced (weights from the training split).")
    ] = None,
    val_fraction: Annotated[float | None, typer.Option()] = None,
    test_fraction: Annotated[float | None, typer.Option()] = None,
    augment: Annotated[
        str | None,
        typer.Option(help="Augmentation preset: light (default), strong, none, seed000, seed001."),
    ] = None,
    no_augment: Annotated[
        bool, typer.Option("--no-augment", help="Same as --augment none.")
    ] = False,
    mixup: Annotated[float | None, typer.Option(help="MixUp alpha (0: off; 0.2-0.4).")] = None,
    cutmix: Annotated[float | None, typer.Option(help="CutMix alpha (0: off; 1.0).")] = None,
    train_batchnorm: Annotated[
        bool | None,
        typer.Option(
            "--train-batchnorm/--frozen-batchnorm",
            help="Let unfrozen BatchNorm layers train (default: inference mode).",
        ),
    ] = None,
    head_augment: Annotated[
        bool | None,
        typer.Option(
            "--head-augment/--no-head-augment",
            help="Augment phase 1 too (through the frozen backbone, or streamed from OpenVINO "
            "from 2,000 image-epochs; default: cached features).",
        ),
    ] = None,
    recipe: Annotated[
        str,
        typer.Option(
            help="default: the config's recipe; auto: chosen from the data and backbone "
            "(written to recipe_auto.json). Options given here are kept."
        ),
    ] = "default",
    lr: Annotated[
        str | None, typer.Option("--lr", help="'auto': pick the learning rates by a range test.")
    ] = None,
    calibrate: Annotated[
        bool | None,
        typer.Option(
            "--calibrate/--no-calibrate",
            help="Fit a temperature on the val split so probabilities are calibrated.",
        ),
    ] = None,
    average_last_epochs: Annotated[
        int | None,
        typer.Option(help="End with the mean of the weights of the last N epochs (0: off)."),
    ] = None,
    tensorboard: Annotated[
        bool, typer.Option(help="Write TensorBoard logs per phase to OUT/tensorboard.")
    ] = False,
    check_data: Annotated[
        bool | None,
        typer.Option(
            "--check-data/--no-check-data",
            help="Run the dataset check (finetune inspect) first; on by default.",
        ),
    ] = None,
    compare_scratch: Annotated[
        bool, typer.Option(help="Also train the same network from scratch and compare.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished run in --out.")] = False,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--no-resume",
            help="Go on with the unfinished run in --out from its last checkpoint (default: "
            "when there is one); --no-resume starts it again.",
        ),
    ] = None,
) -> None:
    """Fine-tune a pretrained backbone on DATA_DIR and write a run directory."""
    import finetune

    options = {
        k: v
        for k, v in dict(
            backbone=backbone,
            weights=weights,
            seed=seed,
            image_size=image_size,
            batch_size=batch_size,
            head_epochs=head_epochs,
            head_lr=head_lr,
            finetune_epochs=finetune_epochs,
            finetune_lr=finetune_lr,
            unfreeze_groups=unfreeze_groups,
            unfreeze=unfreeze,
            gradual_epochs=gradual_epochs,
            discriminative_lr=discriminative_lr,
            schedule=schedule,
            warmup_epochs=warmup_epochs,
            optimizer=optimizer,
            dropout=dropout,
            label_smoothing=label_smoothing,
            class_weight=class_weight,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            augment="none" if no_augment else augment,
            mixup=mixup,
            cutmix=cutmix,
            train_batchnorm=train_batchnorm,
            head_augment=head_augment,
            calibrate=calibrate,
            check_data=check_data,
            average_last_epochs=average_last_epochs,
        ).items()
        if v is not None
    }
    if compare_scratch:
        if resume:
            raise FinetuneError("--resume and --compare-scratch cannot be combined yet.")
        if lr is not None:
            raise FinetuneError("--lr auto and --compare-scratch cannot be combined yet.")
        run, scratch = finetune.train_with_scratch_baseline(
            data_dir,
            out=out,
            config=config,
            overwrite=overwrite,
            recipe=recipe,
            tensorboard=tensorboard,
            command=sys.argv,
            **options,
        )
    else:
        run, scratch = (
            finetune.train(
                data_dir,
                out=out,
                config=config,
                overwrite=overwrite,
                lr=lr,
                recipe=recipe,
                tensorboard=tensorboard,
                command=sys.argv,
                resume=resume,
                **options,
            ),
            None,
        )
    if run.metrics:
        _print_metrics(f"Test metrics of {out}", run.metrics)
    if scratch is not None and scratch.metrics and run.metrics:
        table = Table(title=f"{run.config.model.backbone} on {data_dir}: same data, same epochs")
        table.add_column("model")
        table.add_column("test accuracy", justify="right")
        table.add_column("macro F1", justify="right")
        table.add_row(
            "fine-tuned from ImageNet weights",
            _percent(run.metrics["accuracy"]),
            f"{run.metrics['macro_f1']:.3f}",
        )
        table.add_row(
            "trained from scratch",
            _percent(scratch.metrics["accuracy"]),
            f"{scratch.metrics['macro_f1']:.3f}",
        )
        console.print(table)
    console.print(
        f"Run written to [bold]{out}[/] (model.keras, metrics.json, ...). "
        f"Open [bold]{out / 'report.html'}[/] to see what the model learned."
    )


@app.command("lr-find")
def lr_find(
    data_dir: Annotated[Path, typer.Argument(help="Class folders, or train/ (+ val/, test/).")],
    out: Annotated[Path, typer.Option(help="Folder for lr_find.png and lr_find.json.")] = Path(
        "runs/lr_find"
    ),
    config: Annotated[Path | None, typer.Option(help="TOML config file.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone name.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels.")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    steps: Annotated[int, typer.Option(help="Batches of the learning-rate ramp.")] = 100,
) -> None:
    """Run the learning-rate range test for phase 1 and suggest a learning rate."""
    import finetune

    options = {
        k: v
        for k, v in dict(backbone=backbone, image_size=image_size, batch_size=batch_size).items()
        if v is not None
    }
    result = finetune.lr_find(data_dir, out=out, config=config, num_steps=steps, **options)
    console.print(
        f"Suggested learning rate: [bold]{result.suggestion:.2g}[/] "
        f"(curve: {out / 'lr_find.png'}); use it with --head-lr, or train --lr auto."
    )


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    data_dir: Annotated[
        Path | None, typer.Argument(help="Labelled folder; default: the run's test split.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    tta: Annotated[int, typer.Option(help="Test-time augmentation copies per image.")] = 1,
    runtime: Annotated[
        str | None,
        typer.Option(
            help="auto|keras|openvino|openvino-bf16|onnxruntime: what runs the model (auto: "
            "OpenVINO in bfloat16 on a CPU with it, converted once per model; else Keras, and "
            "OpenVINO in float32 from 15,000 images; default: $FINETUNE_RUNTIME or auto)."
        ),
    ] = None,
) -> None:
    """Evaluate a run's model; on its own test split, update metrics.json and report.html."""
    import finetune
    from finetune.atomic import write_json
    from finetune.inference import requested_runtime

    requested_runtime(runtime)  # an unknown name (or FINETUNE_RUNTIME) fails before any work
    # Keras' progress bar writes to stdout: keep it out of JSON output.
    run = finetune.Run.load(run_dir)
    metrics, predictions = finetune.evaluate_with_predictions(
        run, data_dir, progress=not as_json, tta=tta, runtime=runtime
    )
    if data_dir is None:
        write_json(run_dir / "metrics.json", metrics)
        predictions.write_csv(run_dir / "predictions.csv")
        run.metrics = metrics
        finetune.write_report(run)
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_metrics(f"Evaluation of {run_dir}", metrics)


@app.command()
def predict(
    model: Annotated[
        str,
        typer.Argument(
            help="A run directory, an exported model (.tflite, .onnx, .keras, SavedModel "
            "folder), or a backbone name (ImageNet)."
        ),
    ],
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    top_k: Annotated[int, typer.Option(help="Classes per image.")] = 5,
    fmt: Annotated[str, typer.Option("--format", help="table|json|csv")] = "table",
    tta: Annotated[int, typer.Option(help="Test-time augmentation copies (runs only).")] = 1,
    runtime: Annotated[
        str | None,
        typer.Option(
            help="auto|keras|openvino|openvino-bf16|onnxruntime: what runs a run's model "
            "(auto: OpenVINO in bfloat16 on a CPU with it, converted once per model; else "
            "Keras, and OpenVINO in float32 from 15,000 images; default: $FINETUNE_RUNTIME "
            "or auto)."
        ),
    ] = None,
) -> None:
    """Predict the top-k classes of images with a run's model, an export, or an ImageNet head."""
    from finetune.data.decode import shown_path
    from finetune.predict import predict as predict_images

    if fmt not in ("table", "json", "csv"):
        raise FinetuneError(f"--format {fmt!r} is not one of: table, json, csv.")
    from finetune.inference import requested_runtime

    requested_runtime(runtime)  # an unknown name (or FINETUNE_RUNTIME) fails before any work
    results = predict_images(model, inputs, top_k=top_k, tta=tta, runtime=runtime)
    if fmt == "json":
        print(json.dumps([r.to_dict() for r in results], indent=2))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["path", "rank", "label", "probability", "error"])
        for r in results:
            shown = shown_path(r.path)  # a non-UTF-8 file name cannot be printed as is
            if r.error:
                writer.writerow([shown, "", "", "", r.error])
            for rank, (label, p) in enumerate(r.top, 1):
                writer.writerow([shown, rank, label, f"{p:.6f}", ""])
        print(buf.getvalue(), end="")
    else:
        table = Table()
        for col in ("image", "rank", "label", "probability"):
            table.add_column(col)
        for r in results:
            if r.error:
                table.add_row(str(shown_path(r.path)), "-", f"[red]{r.error}[/]", "")
            for rank, (label, p) in enumerate(r.top, 1):
                shown = str(shown_path(r.path)) if rank == 1 else ""
                table.add_row(shown, str(rank), label, f"{p:.3f}")
        console.print(table)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    fmt: Annotated[str, typer.Option("--format", help="keras|saved_model|litert|onnx")],
    quantize: Annotated[
        str,
        typer.Option(help="none|float16|dynamic|int8 (all but none: --format litert only)."),
    ] = "none",
    out: Annotated[
        Path | None,
        typer.Option(help="Artifact path; default RUN_DIR/export/model[_QUANTIZE].EXT."),
    ] = None,
    calibration_images: Annotated[
        int | None,
        typer.Option(help="Training images that calibrate int8 (default 200)."),
    ] = None,
    int8_io: Annotated[
        bool, typer.Option("--int8-io", help="int8 input and output tensors (with int8).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing artifact.")] = False,
    latency_runs: Annotated[
        int, typer.Option(help="Timed single-image calls per model in the parity check.")
    ] = 50,
) -> None:
    """Export a run's model and check it against the Keras model on the run's test split."""
    import finetune

    result = finetune.export_run(
        run_dir,
        fmt,
        quantize=quantize,
        out=out,
        calibration_images=calibration_images,
        int8_io=int8_io,
        overwrite=overwrite,
        latency_runs=latency_runs,
    )
    p = result.parity
    name = fmt + ("" if quantize == "none" else f" {quantize}") + (" int8 I/O" if int8_io else "")
    table = Table(title=f"Parity of {result.path} on the {p.data} ({p.num_images} images)")
    table.add_column("")
    table.add_column("Keras (model.keras)", justify="right")
    table.add_column(f"{name} ({p.runtime})", justify="right")
    table.add_row("top-1 accuracy", _percent(p.keras_accuracy), _percent(p.export_accuracy))
    table.add_row(
        "file size",
        f"{_megabytes(p.keras_size_bytes)} (weights {_megabytes(p.keras_weights_bytes)})",
        _megabytes(p.export_size_bytes),
    )
    table.add_row(
        f"latency, 1 image (median of {p.latency_runs})",
        f"{p.keras_latency_ms:.2f} ms",
        f"{p.export_latency_ms:.2f} ms",
    )
    console.print(table)
    bound = (
        f" (at least {_percent(p.min_agreement)} required: passed)"
        if p.min_agreement is not None
        else ""
    )
    console.print(
        f"top-1 agreement with Keras [bold]{_percent(p.agreement)}[/]{bound}; accuracy change "
        f"{100 * p.accuracy_change:+.1f} points; largest logit difference "
        f"{p.max_abs_logit_diff:.3g}"
    )
    console.print(
        f"Written: [bold]{result.path}[/] with its labels in {result.labels_path}; "
        f"figures in {run_dir / 'export.json'}."
    )


@app.command()
def prune(
    run_dir: Annotated[Path, typer.Argument(help="A finished run (left unchanged).")],
    out: Annotated[Path, typer.Option(help="The pruned run's directory.")],
    sparsity: Annotated[float, typer.Option(help="Share of zeros in each pruned layer.")] = 0.5,
    epochs: Annotated[int | None, typer.Option(help="Epochs of the pruning phase (2).")] = None,
    lr: Annotated[float | None, typer.Option(help="Its peak learning rate (1e-4).")] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="Layer name or pattern to leave dense (repeat the option)."),
    ] = None,
    min_weights: Annotated[
        int | None, typer.Option(help="Leave layers with fewer weights dense (1024).")
    ] = None,
    depthwise: Annotated[
        bool | None,
        typer.Option("--depthwise/--no-depthwise", help="Prune DepthwiseConv2D kernels too (no)."),
    ] = None,
    train_batchnorm: Annotated[
        bool | None,
        typer.Option(
            "--train-batchnorm/--frozen-batchnorm", help="Train BatchNorm while pruning (no)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished run in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Prune a run: zero the smallest weights while fine-tuning briefly; write a new run."""
    import finetune

    options = {
        "epochs": epochs,
        "learning_rate": lr,
        "exclude": exclude,
        "min_weights": min_weights,
        "depthwise": depthwise,
        "train_batchnorm": train_batchnorm,
    }
    run = finetune.prune(
        run_dir,
        out=out,
        sparsity=sparsity,
        overwrite=overwrite,
        progress=not quiet,
        **{k: v for k, v in options.items() if v is not None},
    )
    record = run.info["pruning"]
    table = Table(title=f"Pruning of {run_dir} to {sparsity:.0%} zeros per layer")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row(
        f"accuracy ({run.metrics.get('data', 'test split')})",
        _percent(record.get("accuracy_before")),
        _percent(run.metrics.get("accuracy")),
    )
    table.add_row(
        "weights, gzip",
        _megabytes(record["gzip_bytes_before"]),
        _megabytes(record["gzip_bytes_after"]),
    )
    table.add_row(
        f"zeros in the {len(record['layers'])} pruned layers",
        "-",
        _percent(record["overall_sparsity_of_pruned_layers"]),
    )
    console.print(table)
    if record["skipped"]:
        console.print(f"Left dense: {', '.join(sorted(record['skipped']))}", soft_wrap=True)
    console.print(
        f"Written: [bold]{out}[/] (per-layer sparsity in {out / 'run.json'}); "
        f"`finetune export {out} --format litert --quantize int8` ships it."
    )


@app.command()
def ensemble(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run directories.")],
    out: Annotated[Path, typer.Option(help="The ensemble's run directory.")],
    method: Annotated[
        str, typer.Option(help="mean|weighted (fitted on the shared val split)|vote")
    ] = "mean",
    overwrite: Annotated[
        bool, typer.Option(help="Replace the records in a non-empty --out.")
    ] = False,
) -> None:
    """Combine fine-tuned runs (same classes) into one model, written as a run directory."""
    import finetune

    run = finetune.ensemble(run_dirs, method=method, out=out, overwrite=overwrite)
    record = run.info["ensemble"]
    split = run.metrics.get("data", "test split").split()[0]
    table = Table(title=f"Ensemble ({method}) of {len(run_dirs)} runs")
    for col in ("member", "backbone", "weight", f"{split} accuracy"):
        table.add_column(col, justify="left" if col in ("member", "backbone") else "right")
    for path, m in zip(run_dirs, record["members"], strict=True):
        table.add_row(
            str(path),
            str(m["backbone"]),
            f"{m['weight']:.3f}",
            _percent(m.get(split, {}).get("accuracy")),
        )
    table.add_row("[bold]ensemble[/]", "", "", _percent(run.metrics.get("accuracy")))
    console.print(table)
    if run.metrics:
        _print_metrics(f"Test metrics of {out}", run.metrics)
    console.print(f"Written: [bold]{out}[/] (one model.keras; members and weights in run.json).")


@app.command()
def inspect(
    data_dir: Annotated[Path, typer.Argument(help="Class folders, or train/ (+ val/, test/).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
    near_distance: Annotated[
        int | None,
        typer.Option(help="Largest perceptual-hash distance (bits of 256) of near duplicates."),
    ] = None,
) -> None:
    """Check a data folder: counts, sizes, broken files, duplicates, leakage. Exit 1 on problems."""
    from finetune.data.inspect import inspect_folder

    options = {} if near_distance is None else {"near_duplicate_distance": near_distance}
    report = inspect_folder(data_dir, progress=not as_json, **options)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console.print(report.format_text(), markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
) -> None:
    """Build report.html in a run directory again (metrics, curves, errors, Grad-CAM)."""
    import finetune

    path = finetune.write_report(run_dir)
    console.print(f"Report written to [bold]{path}[/]")


@app.command()
def runs(
    folder: Annotated[Path, typer.Argument(help="Folder of run directories.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False,
) -> None:
    """List past runs with their backbone, recipe, data fingerprint and key metrics."""
    from finetune.runs import list_runs

    found = list_runs(folder)
    if as_json:
        print(json.dumps([r.to_dict() for r in found], indent=2))
        return
    if not found:
        console.print(f"No runs under {folder}.")
        return
    table = Table(title=f"Runs under {folder}")
    for col in ("run", "created", "backbone", "recipe", "phases", "data", "accuracy", "macro F1"):
        table.add_column(col, justify="right" if col in ("accuracy", "macro F1") else "left")
    table.add_column("ECE", justify="right")
    table.add_column("TTA", justify="right")
    for r in found:
        name = os.path.relpath(r.path, folder) if r.path != str(folder) else r.path
        table.add_row(
            name + ("" if r.finished else " [red](unfinished)[/]"),
            r.created.replace("T", " ").removesuffix("+00:00"),
            r.backbone,
            r.recipe,
            r.phases,
            r.data_fingerprint[:8],
            _percent(r.accuracy),
            "-" if r.macro_f1 is None else f"{r.macro_f1:.3f}",
            "-" if r.ece is None else f"{r.ece:.3f}",
            str(r.tta),
        )
    console.print(table)


def main() -> None:
    """Entry point of the `finetune` script."""
    try:
        app()
    except FinetuneError as err:
        err_console.print(f"[red]error:[/] {err}")
        raise SystemExit(2) from None

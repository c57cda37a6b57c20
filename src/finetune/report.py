"""`report.html`: one self-contained page that shows what a run learned and where it fails.

The page is built from the run directory's records (`run.json`, `config.toml`, `history.json`,
`metrics.json`, `predictions.csv`, `split.json`, `bad_files.json`, and `inspect.json` or
`recipe_auto.json` when present) plus the model itself, for the Grad-CAM heat maps. Every figure
and thumbnail is embedded as a PNG data URI and the style sheet is inline, so the file opens
offline in any browser, can be mailed or archived, and runs no script. `train` writes it at the
end of every run; `finetune report RUN_DIR` (`write_report`) builds it again, e.g. after
`finetune evaluate`.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune import plots
from finetune.atomic import write_text_atomic
from finetune.errors import FinetuneError
from finetune.run import Run, phase_spans

REPORT_FILE = "report.html"
#: Thumbnails of the most confidently wrong test images.
TOP_LOSSES = 12
#: Grad-CAM examples of each kind (correct, wrong).
GRADCAM_EXAMPLES = 4
THUMBNAIL_SIZE = 128

NO_PREDICTIONS = (
    '<p class="note">This run has no predictions.csv (no test or val split, or a run made '
    "before it was written): run <code>finetune evaluate RUN_DIR</code> to add it.</p>"
)

#: Section ids, in page order (the browser test checks each one rendered).
SECTIONS = (
    "summary",
    "data",
    "config",
    "curves",
    "confusion",
    "top-losses",
    "gradcam",
    "calibration",
    "environment",
)

STYLE = """
:root { --ink: #1d2433; --muted: #5b6475; --line: #e3e6ec; --accent: #0072B2;
        --bad: #c0392b; --good: #1e8449; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: var(--ink); color: white; padding: 20px 32px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; }
header p { margin: 4px 0 0; color: #c9cfdb; }
nav { position: sticky; top: 0; background: white; border-bottom: 1px solid var(--line);
      padding: 8px 32px; z-index: 1; font-size: 14px; }
nav a { color: var(--accent); margin-right: 16px; text-decoration: none; }
main { max-width: 1100px; margin: 0 auto; padding: 8px 32px 48px; }
section { background: white; border: 1px solid var(--line); border-radius: 8px;
          padding: 16px 24px; margin: 20px 0; }
h2 { font-size: 18px; margin: 0 0 8px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
p.note { color: var(--muted); margin: 4px 0 12px; font-size: 14px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { flex: 1 1 150px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .value { font-size: 24px; font-weight: 600; }
.card .label { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; font-size: 14px; margin: 6px 0 10px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #fafbfc; font-weight: 600; }
img.figure { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 140px; font-size: 12px; text-align: center; }
figure img { width: 128px; height: 128px; image-rendering: pixelated;
             border: 1px solid var(--line); border-radius: 4px; }
figure.wide { width: 276px; }
figure.wide img { width: 128px; }
.bad { color: var(--bad); } .good { color: var(--good); }
pre { background: #fafbfc; border: 1px solid var(--line); padding: 10px; font-size: 13px;
      overflow: auto; max-height: 420px; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _img(png: bytes, alt: str, cls: str = "figure") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_esc(title)}</h2>{body}</section>'


def _read_json(path: Path, default: Any = None) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FinetuneError(f"{path} is damaged ({err}); the report cannot use it.") from None


def _summary(run: Run) -> str:
    m = run.metrics
    cards = [
        (_pct(m.get("accuracy")), "accuracy"),
        ("-" if "macro_f1" not in m else f"{m['macro_f1']:.3f}", "macro F1"),
        ("-" if m.get("roc_auc_ovr") is None else f"{m['roc_auc_ovr']:.3f}", "ROC-AUC (OvR)"),
        ("-" if "ece" not in m else f"{m['ece']:.3f}", "calibration error (ECE)"),
        (str(m.get("num_images", "-")), f"images evaluated ({m.get('data', '-')})"),
    ]
    if "top_k_accuracy" in m:
        cards.insert(1, (_pct(m["top_k_accuracy"]), f"top-{m['top_k']} accuracy"))
    html_cards = "".join(
        f'<div class="card"><div class="value">{_esc(v)}</div>'
        f'<div class="label">{_esc(k)}</div></div>'
        for v, k in cards
    )
    if not m:
        return _section(
            "summary",
            "Summary",
            '<p class="note">This run has no test or validation split, '
            "so there are no metrics. Evaluate it with <code>finetune evaluate RUN DATA</code>."
            "</p>",
        )
    worst = sorted(m["per_class"].items(), key=lambda kv: kv[1]["f1"])[:3]
    weak = ", ".join(f"{name} (F1 {v['f1']:.2f})" for name, v in worst)
    note = f'<p class="note">Weakest classes: {_esc(weak)}.</p>' if len(m["per_class"]) > 3 else ""
    return _section("summary", "Summary", f'<div class="cards">{html_cards}</div>{note}')


def _data(run: Run, path: Path) -> str:
    from finetune.data.split import read_split

    parts = []
    split_file = path / "split.json"
    if split_file.is_file():
        recorded = read_split(split_file)
        splits = [s for s in ("train", "val", "test") if recorded.counts.get(s)]
        rows = []
        for name in recorded.class_names:
            rows.append([name, *[recorded.counts[s].get(name, 0) for s in splits]])
        rows.append(["all", *[sum(recorded.counts[s].values()) for s in splits]])
        parts.append(_table(["class", *splits], rows))
        parts.append(f'<p class="note">Data folder: {_esc(recorded.root)}</p>')
    check = _read_json(path / "inspect.json")
    if check and check.get("verdict"):
        parts.append(f"<h3>Dataset check</h3><p>{_esc(check['verdict'])}</p>")
        problems = check.get("problems") or []
        if problems:
            parts.append("<ul>" + "".join(f"<li>{_esc(p)}</li>" for p in problems) + "</ul>")
        groups = (check.get("exact_duplicates") or []) + (check.get("near_duplicates") or [])
        order = {"across_classes": 0, "across_splits": 1, "within_class": 2}
        groups.sort(key=lambda g: order.get(g.get("kind"), 3))
        if groups:
            rows = [
                [
                    g["kind"].replace("_", " "),
                    g["match"],
                    "; ".join(f"{f['path']} ({f['split']}, {f['class']})" for f in g["files"]),
                ]
                for g in groups[:50]
            ]
            parts.append(f"<h4>Duplicate groups ({len(groups)})</h4>")
            parts.append(_table(["where", "match", "files (split, class)"], rows))
    left_out = _read_json(path / "bad_files.json", {})
    rows = [(f["path"], f["reason"]) for f in left_out.get("bad_files", [])]
    rows += [(f["path"], f["reason"]) for f in left_out.get("ignored", [])]
    if rows:
        parts.append(f"<h3>Files left out ({len(rows)})</h3>")
        parts.append(_table(["file", "reason"], rows[:200]))
        if len(rows) > 200:
            parts.append(f'<p class="note">... and {len(rows) - 200} more (bad_files.json).</p>')
    else:
        parts.append('<p class="note">No file was left out.</p>')
    return _section("data", "Data", "".join(parts))


def _features_cell(record: dict) -> str:
    """How an epoch's frozen part ran (from its history record): its output computed once and
    cached, streamed from a converted model batch by batch, or neither."""
    where = f"{record.get('features_layer') or 'pool'}, {record.get('features_runtime', 'keras')}"
    if record.get("features_cached"):
        return f"cached ({where})"
    if record.get("features_streamed"):
        return f"streamed ({where})"
    from finetune.fold import describe_bfloat16

    how = describe_bfloat16(
        bool(record.get("frozen_bfloat16")), bool(record.get("trained_bfloat16"))
    )
    return f"no: through the network ({how})" if how else "no: through the network"


def _phase_features_cell(records: list[dict]) -> str:
    """`_features_cell` of a phase's records: one cell when every epoch ran the same way, else
    each way with its epochs (a phase resumed in a process that ran it otherwise)."""
    ways: dict[str, list[int]] = {}
    for record in records:
        ways.setdefault(_features_cell(record), []).append(int(record.get("epoch", 0)))
    if len(ways) == 1:
        return next(iter(ways))

    def epochs(numbers: list[int]) -> str:
        first, last = numbers[0], numbers[-1]
        return f"epoch {first}" if first == last else f"epochs {first}-{last}"

    return "; ".join(f"{way} ({epochs(numbers)})" for way, numbers in ways.items())


def _config(run: Run, path: Path) -> str:
    from finetune.config import dump_config

    parts = []
    h = run.history
    rows = [
        [
            name,
            end - start,
            _lr(h[start].get("learning_rate")),
            _lr(h[end - 1].get("learning_rate")),
            _phase_features_cell(h[start:end]),
        ]
        for name, start, end in phase_spans(h)
    ]
    if rows:
        parts.append("<h3>Phases as run</h3>")
        parts.append(
            _table(
                [
                    "phase",
                    "epochs",
                    "learning rate (first epoch)",
                    "(last epoch)",
                    "what trained on the frozen part's output (of layer, computed by)",
                ],
                rows,
            )
        )
    auto = _read_json(path / "recipe_auto.json")
    if auto:
        parts.append("<h3>Automatic recipe: choices and reasons</h3>")
        parts.append(
            _table(
                ["option", "value", "reason"],
                [[d["option"], d["value"], d["reason"]] for d in auto],
            )
        )
    if run.temperature != 1.0:
        parts.append(f"<p>Probabilities calibrated with temperature {run.temperature:.3f}.</p>")
    parts.append(_ensemble_members(run))
    parts.append("<h3>Resolved configuration (config.toml)</h3>")
    parts.append(f"<pre>{_esc(dump_config(run.config))}</pre>")
    return _section("config", "Configuration and recipe", "".join(parts))


def _ensemble_members(run: Run) -> str:
    """The members of an ensemble (`finetune.ensemble`) and their weights; "" for other runs."""
    record = run.info.get("ensemble")
    if not record:
        return ""
    split = "test" if any("test" in m for m in record["members"]) else "val"
    rows = [
        [
            m["path"],
            m.get("backbone", "-"),
            m.get("image_size", "-"),
            f"{m.get('temperature', 1.0):.3f}",
            f"{m.get('weight', 0.0):.3f}",
            _pct(m.get(split, {}).get("accuracy")),
        ]
        for m in record["members"]
    ]
    header = ["member", "backbone", "image size", "temperature", "weight", f"{split} accuracy"]
    fit = record.get("weight_fit")
    note = (
        f"<p>Method <b>{_esc(record['method'])}</b>: the model outputs the "
        f"{_esc(record['output'])}.</p>"
    )
    if fit:
        note += (
            f'<p class="note">Weights fitted on the {_esc(fit["fitted_on"])}: NLL {fit["nll"]:.4f} '
            f"(equal weights {fit['nll_mean']:.4f}, best single member "
            f"{min(fit['nll_members']):.4f}).</p>"
        )
    return "<h3>Ensemble members</h3>" + note + _table(header, rows)


def _lr(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _curves(run: Run) -> str:
    if not run.history:
        return _section("curves", "Training curves", '<p class="note">No epochs recorded.</p>')
    note = (
        '<p class="note">Dashed lines mark where a phase of the recipe begins. Training loss '
        "and accuracy are measured on augmented images while the weights change, so they can "
        "sit below the validation figures.</p>"
    )
    png = plots.training_curves(run.history)
    return _section("curves", "Training curves", note + _img(png, "training curves"))


def _confusion(run: Run) -> str:
    from finetune.evaluate import averaged_over_note

    m = run.metrics
    if not m:
        return _section("confusion", "Confusion matrix and classes", "<p>No metrics.</p>")
    rows = [
        [
            name,
            f"{v['precision']:.3f}",
            f"{v['recall']:.3f}",
            f"{v['f1']:.3f}",
            v["support"],
            "-" if v.get("roc_auc") is None else f"{v['roc_auc']:.3f}",
        ]
        for name, v in m["per_class"].items()
    ]
    png = plots.confusion_matrix_figure(m["confusion_matrix"], m["class_names"])
    body = (
        _img(png, "confusion matrix")
        + _table(["class", "precision", "recall", "F1", "support", "ROC-AUC"], rows)
        + f'<p class="note">Macro F1 {m["macro_f1"]:.3f}{averaged_over_note(m)}, weighted F1 '
        f"{m['weighted_f1']:.3f}, log loss {m['loss']:.3f}.</p>"
    )
    return _section("confusion", "Confusion matrix and classes", body)


def _load_thumbs(paths: Sequence[str], size: int) -> list[np.ndarray | None]:
    from finetune.data.decode import load_image
    from finetune.errors import ImageDecodeError

    out: list[np.ndarray | None] = []
    for p in paths:
        try:
            out.append(load_image(p, size))
        except (ImageDecodeError, OSError):
            out.append(None)
    return out


def _top_losses(predictions) -> str:
    title = "Most confidently wrong images"
    if predictions is None:
        return _section("top-losses", title, NO_PREDICTIONS)
    wrong = np.flatnonzero(predictions.y_pred != predictions.y_true)
    if not len(wrong):
        return _section("top-losses", title, "<p>Every evaluated image was classified right.</p>")
    order = wrong[np.argsort(-predictions.losses[wrong])][:TOP_LOSSES]
    thumbs = _load_thumbs([predictions.paths[i] for i in order], THUMBNAIL_SIZE)
    names = predictions.class_names
    items = []
    for i, thumb in zip(order, thumbs, strict=True):
        caption = (
            f"true <b>{_esc(names[predictions.y_true[i]])}</b><br>"
            f'<span class="bad">predicted {_esc(names[predictions.y_pred[i]])} '
            f"({predictions.probabilities[i].max():.0%})</span><br>"
            f"<small>{_esc(Path(predictions.paths[i]).name)}</small>"
        )
        picture = (
            _img(plots.image_png(thumb), predictions.paths[i], "thumb")
            if thumb is not None
            else "<p>(file no longer readable)</p>"
        )
        items.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
    note = (
        f'<p class="note">The {len(order)} mistakes with the highest loss, of {len(wrong)} '
        "mistakes in all: look for wrong labels, ambiguous images and classes that need more "
        "examples.</p>"
    )
    return _section("top-losses", title, note + f'<div class="grid">{"".join(items)}</div>')


def _gradcam(run: Run, predictions) -> str:
    from finetune.gradcam import POOL_LAYER, grad_cam, overlay

    title = "Where the model looks (Grad-CAM)"
    if predictions is None or not len(predictions.y_true):
        return _section("gradcam", title, NO_PREDICTIONS)
    if POOL_LAYER not in [layer.name for layer in run.model.layers]:
        return _section(
            "gradcam",
            title,
            '<p class="note">Grad-CAM reads one network\'s last feature map, and this model '
            "combines several (an ensemble): see each member's own report.</p>",
        )
    right = np.flatnonzero(predictions.y_pred == predictions.y_true)
    wrong = np.flatnonzero(predictions.y_pred != predictions.y_true)
    confidence = predictions.probabilities.max(axis=1)
    chosen = list(right[np.argsort(-confidence[right])][:GRADCAM_EXAMPLES])
    chosen += list(wrong[np.argsort(-confidence[wrong])][:GRADCAM_EXAMPLES])
    pairs = [
        (i, img)
        for i, img in zip(
            chosen,
            _load_thumbs([predictions.paths[i] for i in chosen], run.image_size),
            strict=True,
        )
        if img is not None
    ]
    if not pairs:
        return _section("gradcam", title, '<p class="note">The images are no longer readable.</p>')
    images = np.stack([img for _, img in pairs])
    maps = grad_cam(run.model, images)
    names = predictions.class_names
    items = []
    for (i, img), heat in zip(pairs, maps, strict=True):
        ok = predictions.y_pred[i] == predictions.y_true[i]
        verdict = '<span class="good">right</span>' if ok else '<span class="bad">wrong</span>'
        caption = (
            f"{verdict}: true <b>{_esc(names[predictions.y_true[i]])}</b>, predicted "
            f"{_esc(names[predictions.y_pred[i]])} ({confidence[i]:.0%})"
        )
        items.append(
            '<figure class="wide">'
            + _img(plots.image_png(img, THUMBNAIL_SIZE), "image", "thumb")
            + _img(plots.image_png(overlay(img, heat), THUMBNAIL_SIZE), "Grad-CAM", "thumb")
            + f"<figcaption>{caption}</figcaption></figure>"
        )
    grid = "x".join(str(d) for d in run.model.get_layer("pool").input.shape[1:3])
    note = (
        '<p class="note">Left: the image; right: how much each region raised the score of the '
        "predicted class (colour scale of 'jet': dark blue none, green half, dark red most), "
        "from the last feature map of the fine-tuned model. The most "
        f"confident right and wrong predictions are shown. At {run.image_size} px that map is "
        f"{grid} cells, so the heat map cannot be finer than that.</p>"
    )
    return _section("gradcam", title, note + f'<div class="grid">{"".join(items)}</div>')


def _calibration(run: Run) -> str:
    m = run.metrics
    title = "Calibration"
    if "reliability" not in m:
        return _section(
            "calibration",
            title,
            '<p class="note">metrics.json has no calibration figures (no test or val split, '
            "or a run made before they were computed): run <code>finetune evaluate RUN_DIR</code> "
            "to add them.</p>",
        )
    cal = m.get("calibration")
    before = cal.get("reliability_before") if cal else None
    png = plots.reliability_diagram(m["reliability"], m["ece"], before)
    if cal:
        text = (
            f"<p>Temperature {cal['temperature']:.3f} fitted on the {_esc(cal['fitted_on'])}; "
            f"expected calibration error on the {_esc(cal['measured_on'])}: "
            f"{cal['ece_before']:.3f} before, <b>{cal['ece_after']:.3f}</b> after.</p>"
        )
        if cal.get("note"):
            text += f'<p class="note">{_esc(cal["note"])}.</p>'
    else:
        text = (
            f"<p>Expected calibration error {m['ece']:.3f}: when the model says p, it is right "
            "about p of the time if the bars follow the diagonal. Bars below the diagonal mean "
            "over-confidence; train with <code>--calibrate</code> to correct it.</p>"
        )
    return _section("calibration", title, text + _img(png, "reliability diagram"))


def _environment(run: Run) -> str:
    info = run.info
    rows = [
        ["run directory", run.path],
        ["created", info.get("created", "-")],
        ["backbone", info.get("backbone", run.config.model.backbone)],
        ["image size", run.image_size],
        ["seed", info.get("seed", run.config.seed)],
        ["data fingerprint", info.get("data_fingerprint", "-")],
        ["Keras backend", info.get("keras_backend", "-")],
        ["finetune", info.get("finetune_version", "-")],
    ]
    rows += [[k, v] for k, v in info.get("environment", {}).items()]
    return _section("environment", "Environment", _table(["", "value"], rows))


def report_html(run: Run) -> str:
    """The report page of a saved run as one HTML string (see the module docstring)."""
    from finetune.evaluate import Predictions

    if run.path is None:
        raise FinetuneError("the report is built from a run directory: train with out=... first.")
    path = run.path
    predictions = None
    if (path / "predictions.csv").is_file():
        predictions = Predictions.read_csv(path / "predictions.csv")
    name = path.resolve().name
    subtitle = (
        f"{run.info.get('backbone', run.config.model.backbone)} fine-tuned on "
        f"{len(run.class_names)} classes · {run.info.get('created', '')}"
    )
    sections = [
        _summary(run),
        _data(run, path),
        _config(run, path),
        _curves(run),
        _confusion(run),
        _top_losses(predictions),
        _gradcam(run, predictions),
        _calibration(run),
        _environment(run),
    ]
    nav = "".join(f'<a href="#{s}">{s.replace("-", " ").capitalize()}</a>' for s in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>finetune report: {_esc(name)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>finetune report: {_esc(name)}</h1><p>{_esc(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(sections)}</main></body></html>\n"
    )


def write_report(run: Run | str | Path) -> Path:
    """Writes (or rewrites) `report.html` in a run directory and returns its path.

    Args:
        run: a saved `Run`, or the path of a run directory.

    Returns:
        The path of `report.html`.

    Raises:
        FinetuneError: the folder is not a run directory, or one of its records is damaged.

    Example:
        >>> finetune.write_report("runs/photos")
    """
    run = run if isinstance(run, Run) else Run.load(run)
    page = report_html(run)
    assert run.path is not None
    target = run.path / REPORT_FILE
    write_text_atomic(target, page)
    return target


def write_report_or_warn(run: Run, what: str = "run") -> None:
    """`write_report` for a run that is otherwise complete: a failure only prints a warning.

    The page can always be built again with `finetune report`, so a plotting or rendering error
    must not make a finished run (or ensemble, `what`) look failed.
    """
    try:
        write_report(run)
    except Exception as err:  # noqa: BLE001  (the run is complete; the page can be rebuilt)
        print(
            f"warning: {run.path / 'report.html'} could not be built ({type(err).__name__}: "
            f"{err}); the {what} itself is complete. Try again with `finetune report {run.path}`.",
            file=sys.stderr,
            flush=True,
        )

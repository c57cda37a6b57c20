"""The report's figures, drawn with matplotlib (Agg, no screen) and returned as PNG bytes.

Each function takes plain data (history records, a confusion matrix, reliability bins) so it can
be tested and reused without a run directory.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from finetune.run import phase_spans  # noqa: E402

# One palette for every figure; colour-blind safe (Okabe-Ito).
TRAIN_COLOR = "#0072B2"
VAL_COLOR = "#D55E00"
PHASE_COLOR = "#999999"


def _plain(text: object) -> str:
    """Text shown as typed: matplotlib would read `$...$` in a class name as math."""
    return str(text).replace("$", r"\$")


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def image_png(pixels: np.ndarray, size: int | None = None) -> bytes:
    """A uint8 RGB array as PNG bytes, optionally scaled (nearest, so pixels stay visible)."""
    img = Image.fromarray(np.asarray(pixels, np.uint8))
    if size is not None and max(img.size) != size:
        scale = size / max(img.size)
        new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(new, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BOX)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def training_curves(history: Sequence[dict[str, Any]]) -> bytes:
    """Loss and accuracy per epoch, train and validation, with the phase boundaries marked."""
    epochs = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, title in zip(axes, ("loss", "accuracy"), ("Loss", "Accuracy"), strict=True):
        for prefix, color, label in (("", TRAIN_COLOR, "train"), ("val_", VAL_COLOR, "val")):
            values = [r.get(prefix + metric) for r in history]
            if any(v is not None for v in values):
                y = [np.nan if v is None else v for v in values]
                ax.plot(epochs, y, "o-", color=color, label=label, markersize=4)
        for name, start, end in phase_spans(list(history)):
            ax.axvspan(start + 0.5, end + 0.5, color=PHASE_COLOR, alpha=0.08 * (1 + start % 2))
            if end < len(history):
                ax.axvline(end + 0.5, color=PHASE_COLOR, linestyle="--", linewidth=1)
            ax.text(
                (start + end + 1) / 2,
                1.01,
                _plain(name or ""),
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="#555555",
            )
        ax.set_xlabel("epoch")
        ax.set_title(title, pad=16)
        ax.grid(alpha=0.3)
        if metric == "accuracy":
            ax.set_ylim(0, 1.02)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def confusion_matrix_figure(matrix: Sequence[Sequence[float]], class_names: list[str]) -> bytes:
    """The row-normalised confusion matrix as a heat map, each cell labelled with its share."""
    m = np.asarray(matrix, np.float64)
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    n = len(class_names)
    side = min(12.0, 2.5 + 0.55 * n)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    names = [_plain(c) for c in class_names]
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    color = "white" if share[i, j] > 0.5 else "black"
                    text = f"{share[i, j]:.0%}\n({int(m[i, j])})"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_title("Confusion matrix (share of each true class; counts in brackets)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def reliability_diagram(
    bins: Sequence[dict[str, float]], ece: float, before: Sequence[dict[str, float]] | None = None
) -> bytes:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "--", color=PHASE_COLOR, label="perfectly calibrated")
    if before:
        ax.plot(
            [b["confidence"] for b in before],
            [b["accuracy"] for b in before],
            "s:",
            color=VAL_COLOR,
            label="before calibration",
            markersize=4,
        )
    width = [b["upper"] - b["lower"] for b in bins]
    ax.bar(
        [b["lower"] for b in bins],
        [b["accuracy"] for b in bins],
        width=width,
        align="edge",
        color=TRAIN_COLOR,
        alpha=0.75,
        edgecolor="white",
        label="accuracy in bin",
    )
    ax.plot(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        "o",
        color="black",
        markersize=3,
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {ece:.3f})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)

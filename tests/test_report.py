"""A real run's records, report page, TensorBoard logs and run listing.

One small run is trained once for the module (EfficientNet-Lite0 at 32 px on four Fashion-MNIST
classes, with `calibrate` and `tensorboard`); every test reads what it wrote. The report page is
opened in Debian's headless Chromium (installed by `make test`): each section must render, every
image must load and the console must stay free of errors.
"""

from __future__ import annotations

import html
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import finetune
from finetune.cli import app
from finetune.errors import DataError, FinetuneError
from finetune.evaluate import Predictions, classification_metrics
from finetune.report import SECTIONS
from finetune.run import softmax
from tests.helpers import FASHION, image_subset

SIZE = 32
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


# A class name that HTML and matplotlib would both misread if it were not escaped.
ODD_CLASS = "b<q>g & $x$"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    data = image_subset(FASHION, tmp_path_factory.mktemp("data"), classes=4, per_class=40)
    (data / "bag").rename(data / ODD_CLASS)
    out = tmp_path_factory.mktemp("runs") / "first"
    finetune.train(
        data,
        out=out,
        image_size=SIZE,
        head_epochs=2,
        finetune_epochs=1,
        calibrate=True,
        tensorboard=True,
        progress=False,
    )
    return out


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: list[str] = []
        self.tags: set[str] = set()
        self.images: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("src", "href"):
            value = a.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)


@pytest.mark.slow
def test_run_directory_holds_every_record(run_dir):
    for name in (
        "model.keras",
        "metrics.json",
        "predictions.csv",
        "history.json",
        "run.json",
        "report.html",
        "inspect.json",
    ):
        assert (run_dir / name).is_file(), name
    check = json.loads((run_dir / "inspect.json").read_text())
    assert check["verdict"].startswith("OK")
    assert "Dataset check" in (run_dir / "report.html").read_text(encoding="utf-8")
    info = json.loads((run_dir / "run.json").read_text())
    assert len(info["data_fingerprint"]) == 16
    assert {"python", "keras", "numpy"} <= set(info["environment"])


@pytest.mark.slow
def test_predictions_file_reproduces_the_metrics(run_dir):
    predictions = Predictions.read_csv(run_dir / "predictions.csv")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(predictions.paths) == metrics["num_images"]
    again = classification_metrics(
        predictions.y_true, predictions.probabilities, predictions.class_names
    )
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    assert again["confusion_matrix"] == metrics["confusion_matrix"]
    assert again["ece"] == pytest.approx(metrics["ece"], abs=1e-5)  # 6 significant digits


@pytest.mark.slow
def test_calibration_is_stored_and_applied(run_dir):
    run = finetune.Run.load(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    assert run.temperature == pytest.approx(info["calibration"]["temperature"])
    assert run.temperature != 1.0
    images = np.stack([np.asarray(finetune.data.decode.load_image(p, SIZE)) for p in _paths(run)])
    logits = run.predict_logits(images)
    assert np.allclose(run.predict_proba(images), softmax(logits / run.temperature), atol=1e-6)
    cal = run.metrics["calibration"]
    assert {"ece_before", "ece_after", "fitted_on", "measured_on"} <= set(cal)
    assert cal["ece_after"] == pytest.approx(run.metrics["ece"])


def _paths(run):
    return [p for p, _ in run.split_samples("test")][:6]


@pytest.mark.slow
def test_report_has_every_section_and_is_self_contained(run_dir):
    page = _Page()
    page.feed((run_dir / "report.html").read_text(encoding="utf-8"))
    assert [s for s in SECTIONS if s not in page.ids] == []
    assert page.external == []  # nothing fetched from outside the file
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert "q" not in page.tags  # the class name's "<q>" stayed text
    assert html.escape(ODD_CLASS) in (run_dir / "report.html").read_text(encoding="utf-8")
    # curves, confusion matrix, reliability diagram, plus thumbnails and Grad-CAM pairs
    assert len(page.images) >= 3 + 2


@pytest.mark.slow
def test_report_command_rebuilds_the_page(run_dir):
    (run_dir / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.html").is_file()


@pytest.mark.slow
def test_evaluate_updates_metrics_predictions_and_report(run_dir):
    before = (run_dir / "report.html").stat().st_mtime_ns
    trained = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "predictions.csv").unlink()
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "predictions.csv").is_file()
    assert (run_dir / "report.html").stat().st_mtime_ns > before
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(trained["accuracy"])
    assert metrics["roc_auc_ovr"] == pytest.approx(trained["roc_auc_ovr"], abs=1e-6)
    # The calibration figures are measured again, on the same images as the new metrics.
    cal = metrics["calibration"]
    assert cal["ece_after"] == pytest.approx(metrics["ece"])
    assert cal["ece_before"] == pytest.approx(trained["calibration"]["ece_before"], abs=1e-6)


@pytest.mark.slow
def test_predict_returns_the_calibrated_probabilities(run_dir):
    rows = Predictions.read_csv(run_dir / "predictions.csv")
    (result,) = finetune.predict(run_dir, [rows.paths[0]], top_k=1)
    assert result.top[0][1] == pytest.approx(rows.probabilities[0].max(), abs=1e-5)
    run = finetune.Run.load(run_dir)
    image = finetune.data.decode.load_image(rows.paths[0], SIZE)[None]
    raw = run.predict_proba(image, temperature=1.0)[0].max()
    assert raw != pytest.approx(result.top[0][1], abs=1e-4)  # the temperature did something


@pytest.mark.slow
def test_predict_reads_images_above_its_limit_from_disk(run_dir, monkeypatch):
    import importlib

    rows = Predictions.read_csv(run_dir / "predictions.csv")
    paths = rows.paths[:3]
    want = finetune.predict(run_dir, paths, top_k=2)
    predict_module = importlib.import_module("finetune.predict")
    monkeypatch.setitem(predict_module._PREDICT_LIMIT, "max_memory_gb", 1e-6)
    decode = importlib.import_module("finetune.data.decode")
    into, decode_images = [], decode.decode_images

    def seen(*args, **kwargs):  # the real decoding, noting where it decodes into
        into.append(type(kwargs.get("out")))
        return decode_images(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_images", seen)
    got = finetune.predict(run_dir, paths, top_k=2)
    assert into == [np.memmap]
    for g, w in zip(got, want, strict=True):
        assert [name for name, _ in g.top] == [name for name, _ in w.top]
        assert [p for _, p in g.top] == pytest.approx([p for _, p in w.top], abs=1e-5)


@pytest.mark.slow
def test_evaluate_refuses_the_training_folder_and_unreadable_data(run_dir, tmp_path):
    info = json.loads((run_dir / "run.json").read_text())
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), info["data_dir"]])
    assert isinstance(result.exception, DataError)
    assert "trained on" in str(result.exception)

    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("tensorboard", "checkpoints"))
    split = json.loads((moved / "split.json").read_text())
    split["root"] = str(tmp_path / "gone")
    (moved / "split.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match="none of the .* images"):
        finetune.evaluate(moved, progress=False)


@pytest.mark.slow
def test_evaluate_reads_images_above_the_runs_memory_limit_from_disk(run_dir, tmp_path, capfd):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("tensorboard", "checkpoints"))
    config = (copy / "config.toml").read_text()
    assert "max_memory_gb = 8.0" in config
    (copy / "config.toml").write_text(config.replace("max_memory_gb = 8.0", "max_memory_gb = 1e-5"))
    trained = json.loads((run_dir / "metrics.json").read_text())
    capfd.readouterr()
    metrics = finetune.evaluate(copy, progress=True)
    assert "memory-mapped file" in capfd.readouterr().err
    assert metrics["accuracy"] == pytest.approx(trained["accuracy"])
    assert metrics["roc_auc_ovr"] == pytest.approx(trained["roc_auc_ovr"], abs=1e-6)


@pytest.mark.slow
def test_evaluate_on_a_folder_of_one_of_its_classes(run_dir, tmp_path):
    # New photos of one class the model knows: its accuracy, and macro averages over that
    # class alone (the others have no images, so no recall to average). The run's own record
    # stays as it is: another folder does not replace it.
    class_dir = sorted(p for p in FASHION.iterdir() if p.is_dir())[2]  # not renamed
    folder = tmp_path / "one" / class_dir.name
    folder.mkdir(parents=True)
    for f in sorted(class_dir.glob("*.png"))[40:60]:  # not among the 40 trained on
        shutil.copy(f, folder / f.name)
    record = (run_dir / "metrics.json").read_text()
    metrics = finetune.evaluate(run_dir, tmp_path / "one", progress=False)
    assert metrics["num_images"] == 20 and metrics["averaged_over"] == [class_dir.name]
    own = metrics["per_class"][class_dir.name]
    assert own["support"] == 20 and own["recall"] == pytest.approx(metrics["accuracy"])
    assert metrics["macro_recall"] == pytest.approx(own["recall"])
    assert metrics["macro_f1"] == pytest.approx(own["f1"])
    assert (run_dir / "metrics.json").read_text() == record


@pytest.mark.slow
def test_overwrite_removes_the_old_runs_records_and_nothing_else(run_dir, tmp_path):
    from finetune.train import _prepare_run_dir

    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / "recipe_auto.json").write_text("[]")
    (old / "my_notes.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="--overwrite"):
        _prepare_run_dir(old, overwrite=False)
    _prepare_run_dir(old, overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == ["my_notes.txt"]


@pytest.mark.slow
def test_tensorboard_logs_every_phase(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = json.loads((run_dir / "history.json").read_text())
    phases = sorted({r["phase"] for r in history})
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir()) == phases
    for phase in phases:
        events = EventAccumulator(str(run_dir / "tensorboard" / phase / "train")).Reload()
        losses = [e.tensor_proto for e in events.Tensors("epoch_loss")]
        epochs = [r for r in history if r["phase"] == phase]
        assert len(losses) == len(epochs)
        recorded = [r["loss"] for r in epochs]
        assert [float(np.asarray(_tensor(v))) for v in losses] == pytest.approx(recorded, rel=1e-5)


def _tensor(proto):
    import tensorflow as tf

    return tf.make_ndarray(proto)


@pytest.mark.slow
def test_runs_lists_runs_side_by_side(run_dir, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(run_dir, root / "a", ignore=shutil.ignore_patterns("*.keras", "tensorboard"))
    (root / "b").mkdir()
    (root / "b" / "run.json").write_text(json.dumps({"backbone": "resnet50", "created": "2020"}))
    (root / "not_a_run").mkdir()
    found = finetune.list_runs(root)
    assert [Path(r.path).name for r in found] == ["a", "b"]
    a = found[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert a.accuracy == metrics["accuracy"] and a.recipe == "default+calibrated"
    assert not a.finished  # model.keras was not copied
    assert a.phases.startswith("head 2")
    result = CliRunner().invoke(app, ["runs", str(root), "--json"])
    assert result.exit_code == 0, result.output
    assert [Path(r["path"]).name for r in json.loads(result.output)] == ["a", "b"]
    result = CliRunner().invoke(app, ["runs", str(tmp_path / "missing")])
    assert isinstance(result.exception, FinetuneError)


def _chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, (
        f"{', '.join(missing)} missing: `make test` installs Debian's chromium and "
        "chromium-driver (apt-get install chromium chromium-driver)."
    )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.mark.slow
def test_report_renders_in_a_real_browser(run_dir, tmp_path):
    driver = _chrome()
    try:
        driver.get((run_dir / "report.html").resolve().as_uri())
        heights = driver.execute_script(
            "return arguments[0].map(id => {"
            "  const e = document.getElementById(id);"
            "  return e ? e.getBoundingClientRect().height : 0; });",
            list(SECTIONS),
        )
        assert all(h > 40 for h in heights), dict(zip(SECTIONS, heights, strict=True))
        broken = driver.execute_script(
            "return Array.from(document.images)"
            "  .filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);"
        )
        assert broken == []
        assert driver.execute_script("return document.images.length") >= 5
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1280, height)
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 50_000  # a page of figures, not a blank one
    finally:
        driver.quit()


def test_a_page_that_cannot_be_built_only_warns(tmp_path, monkeypatch, capsys):
    from finetune.report import write_report_or_warn

    def broken(run):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("finetune.report.write_report", broken)
    run = finetune.Run(
        model=None, config=finetune.Config(), class_names=["a"], image_size=32, path=tmp_path
    )
    write_report_or_warn(run, "ensemble")  # no exception: the run itself is complete
    err = capsys.readouterr().err
    assert f"{tmp_path / 'report.html'} could not be built (RuntimeError: no fonts)" in err
    assert "the ensemble itself is complete" in err and f"finetune report {tmp_path}" in err


def test_the_phases_table_says_how_each_frozen_part_ran(tmp_path):
    from finetune.report import _config

    history = [
        {"phase": "head", "epoch": 1, "learning_rate": 1e-3, "features_cached": True,
         "features_layer": "pool", "features_runtime": "openvino-bf16"},
        {"phase": "finetune", "epoch": 2, "learning_rate": 1e-4, "features_cached": False,
         "features_streamed": True, "features_layer": "block5c_add",
         "features_runtime": "openvino-bf16"},
        {"phase": "polish", "epoch": 3, "learning_rate": 1e-5, "features_cached": False},
        {"phase": "last", "epoch": 4, "learning_rate": 1e-5, "features_cached": False,
         "frozen_bfloat16": True},
        {"phase": "mixed", "epoch": 5, "learning_rate": 1e-5, "features_cached": False,
         "frozen_bfloat16": True, "trained_bfloat16": True},
        {"phase": "whole", "epoch": 6, "learning_rate": 1e-5, "features_cached": False,
         "trained_bfloat16": True},
    ]  # fmt: skip
    run = finetune.Run(
        model=None, config=finetune.Config(), class_names=["a"], image_size=32, path=tmp_path,
        history=history,
    )  # fmt: skip
    page = _config(run, tmp_path)
    assert "cached (pool, openvino-bf16)" in page
    assert "streamed (block5c_add, openvino-bf16)" in page
    assert "no: through the network</td>" in page
    assert "no: through the network (its frozen layers in bfloat16)" in page
    assert "(frozen layers in bfloat16, trained ones in mixed precision)" in page
    assert "no: through the network (in bfloat16: mixed precision)" in page

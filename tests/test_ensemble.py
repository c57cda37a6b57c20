"""Ensembles of real (small) runs: what the combined model outputs, how weights are fitted, and
that the ensemble's folder is a run directory like any other (load, evaluate, report, predict,
export)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import finetune
from finetune.cli import app
from finetune.data.decode import decode_images
from finetune.ensemble import (
    VOTE_MIX,
    CombineMembers,
    _ensemble_splits,
    _member_logits,
    combined_probabilities,
    fit_weights,
    nll,
)
from finetune.errors import DataError, FinetuneError
from finetune.kept import LINKED_RUNTIMES, file_sha256, kept_forward
from finetune.run import softmax
from finetune.untrusted import load_keras_model
from tests.helpers import FASHION, image_subset

# Planted in the first member's run.json as if it had been calibrated: the ensemble must apply it.
TEMPERATURE = 2.0


# --- the combining layer, on handcrafted logits --------------------------------------------------


def combine(method, logits, **kwargs) -> np.ndarray:
    layer = CombineMembers(method, **kwargs)
    return keras.ops.convert_to_numpy(layer([np.asarray(z, "float32") for z in logits]))


def test_mean_outputs_the_log_of_the_mean_probability():
    rng = np.random.default_rng(0)
    logits = [rng.normal(scale=5, size=(4, 5)) for _ in range(3)]
    out = combine("mean", logits, temperatures=[1.0, 2.0, 0.5])
    expected = np.mean([softmax(z / t) for z, t in zip(logits, [1, 2, 0.5], strict=True)], axis=0)
    np.testing.assert_allclose(np.exp(out), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(softmax(out), expected, rtol=1e-5, atol=1e-7)


def test_weighted_skips_members_of_weight_zero_and_stays_finite():
    logits = [np.array([[100.0, -100.0, 0.0]]), np.array([[-100.0, 100.0, 0.0]])]
    out = combine("weighted", logits, weights=[1.0, 0.0])
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(softmax(out), softmax(logits[0]), atol=1e-7)


def test_vote_on_a_handcrafted_case():
    # Three members, three classes, three images:
    # image 0: votes 0, 0, 1       -> class 0 wins 2 to 1 although member 2 is surest of class 1
    # image 1: votes 0, 1, 2 (tie) -> the mean probability decides: class 2
    # image 2: member 0 ties between classes 1 and 2 (half a vote each); votes 1.5 for 1
    member_0 = [[2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    member_1 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 4.0, 0.0]]
    member_2 = [[0.0, 50.0, 0.0], [0.0, 0.0, 9.0], [0.0, 0.0, 2.0]]
    logits = [np.array(m) for m in (member_0, member_1, member_2)]
    q = softmax(combine("vote", logits))
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-6)
    assert list(q.argmax(axis=1)) == [0, 2, 1]
    votes = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1.5 / 3, 1.5 / 3]])
    mean_p = np.mean([softmax(z) for z in logits], axis=0)
    np.testing.assert_allclose(q, (1 - VOTE_MIX) * votes + VOTE_MIX * mean_p, atol=1e-6)
    assert np.abs(q - votes).max() <= VOTE_MIX  # close to the vote shares
    np.testing.assert_allclose(
        q, combined_probabilities(np.stack([softmax(z) for z in logits]), "vote"), atol=1e-6
    )


def test_members_of_other_sizes_see_the_image_resized(tmp_path):
    def member(size, seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((size, size, 3))
        x = keras.layers.Conv2D(4, 3, strides=2)(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(3)(x))

    small, large = member(16, 0), member(24, 1)
    inputs, logits = _member_logits([small, large], 24)
    model = keras.Model(inputs, CombineMembers("mean")(logits))
    x = np.random.default_rng(0).uniform(0, 255, (2, 24, 24, 3)).astype("float32")
    resized = keras.layers.Resizing(16, 16, interpolation="bilinear")(x)
    expected = (
        softmax(small.predict(resized, verbose=0)) + softmax(large.predict(x, verbose=0))
    ) / 2
    np.testing.assert_allclose(softmax(model.predict(x, verbose=0)), expected, atol=1e-6)
    # Resizing and CombineMembers pass finetune's checks and Keras' safe mode.
    model.save(tmp_path / "resized.keras")
    loaded = load_keras_model(tmp_path / "resized.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=0)


# --- fitting the weights --------------------------------------------------------------------------


def test_fitted_weights_reach_the_minimum_of_the_objective():
    # Two members, each right with confidence on its own half of the images: the best mixture
    # is inside the simplex, found here by a fine grid.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    sure, unsure = np.full((200, 3), 0.05), np.full((200, 3), 1 / 3)
    sure[np.arange(200), labels] = 0.9
    a = np.where((np.arange(200) < 120)[:, None], sure, unsure)
    b = np.where((np.arange(200) >= 120)[:, None], sure, unsure)
    weights, record = fit_weights(np.stack([a, b]), labels)
    grid = np.linspace(0, 1, 10001)
    best = min(nll(g * a + (1 - g) * b, labels) for g in grid)
    assert weights.sum() == pytest.approx(1.0) and np.all(weights > 0.1)
    assert record["nll"] <= best + 1e-9
    assert record["nll"] < record["nll_mean"] and record["nll"] < min(record["nll_members"])
    assert record["chosen"] == "SLSQP" and record["converged"]
    # Three members: no random point of the simplex does better.
    c = np.full((200, 3), 1 / 3)
    weights, record = fit_weights(np.stack([a, b, c]), labels)
    for w in rng.dirichlet(np.ones(3), 500):
        assert record["nll"] <= nll(np.tensordot(w, np.stack([a, b, c]), axes=1), labels) + 1e-9
    assert weights[2] == 0.0


# --- real runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three runs that differ in their seed, on one folder with train/ val/ test/ (one split)."""
    data = image_subset(
        FASHION, tmp_path_factory.mktemp("fashion"), classes=3, per_class=30, layout="split"
    )
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for seed in (0, 1, 2):
        out = root / f"seed{seed}"
        finetune.train(
            data,
            out=out,
            image_size=32,
            head_epochs=3,
            finetune_epochs=0,
            seed=seed,
            check_data=False,
            progress=False,
        )
        paths.append(out)
    info = json.loads((paths[0] / "run.json").read_text())
    info["calibration"] = {"temperature": TEMPERATURE}
    (paths[0] / "run.json").write_text(json.dumps(info))
    return paths


@pytest.fixture(scope="module")
def member_runs(members):
    return [finetune.Run.load(p) for p in members]


@pytest.fixture(scope="module")
def held_out(member_runs):
    """{split: (images, labels, member probabilities (M, N, C))} for the shared val and test."""
    found = {}
    for split in ("val", "test"):
        samples = member_runs[0].split_samples(split)
        images, ok, _ = decode_images([p for p, _ in samples], 32, progress=False)
        assert len(ok) == len(samples) == 18
        labels = np.array([label for _, label in samples])
        found[split] = (
            images,
            labels,
            np.stack([r.predict_proba(images, runtime="keras") for r in member_runs]),
        )
    return found


_ensembles: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def built(members, tmp_path_factory):
    """Each method's ensemble, built once per module: method -> (run, folder, printed).

    "mean" is built with the command line (run: the folder loaded back, in Keras' safe mode
    after finetune's own checks; printed: the command's output), the others with the API
    (run: the returned `Run`; printed: None)."""
    root = tmp_path_factory.mktemp("ensembles")

    def get(method):
        if method not in _ensembles:
            out = root / method
            if method == "mean":
                args = ["ensemble", *map(str, members), "--out", str(out)]
                result = CliRunner().invoke(app, args, catch_exceptions=False)
                assert result.exit_code == 0, result.output
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    loaded = finetune.Run.load(out)
                # The members' optimizers stay out of the ensemble's file (Keras would warn).
                assert not [w for w in caught if "optimizer" in str(w.message)]
                _ensembles[method] = (loaded, out, result.stdout)
            else:
                run = finetune.ensemble(members, method=method, out=out, progress=False)
                _ensembles[method] = (run, out, None)
        return _ensembles[method]

    return get


@pytest.fixture(scope="module")
def loaded_mean(built):
    """The mean ensemble, read back from its folder."""
    return built("mean")[0]


@pytest.mark.slow
def test_mean_ensemble_outputs_the_mean_of_member_probabilities(
    member_runs, built, loaded_mean, held_out
):
    printed = built("mean")[2]
    assert "ensemble" in printed and "accuracy" in printed  # the command's table and metrics
    assert loaded_mean.temperature == 1.0
    assert member_runs[0].temperature == TEMPERATURE
    images, _, member_p = held_out["test"]
    expected = member_p.mean(axis=0)
    probabilities = loaded_mean.predict_proba(images, runtime="keras")
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-6)
    # "Logits-like": the output is the log of those probabilities.
    np.testing.assert_allclose(
        np.exp(loaded_mean.predict_logits(images, runtime="keras")), expected, atol=1e-6
    )


@pytest.mark.slow
def test_weighted_weights_are_on_the_simplex_and_fit_the_val_split(built, held_out):
    run, _, _ = built("weighted")
    weights = np.array(run.info["ensemble"]["weights"])
    assert np.all(weights >= 0) and weights.sum() == pytest.approx(1.0, abs=1e-9)
    images, labels, member_p = held_out["val"]
    fitted = nll(np.tensordot(weights, member_p, axes=1), labels)
    assert fitted <= min(nll(p, labels) for p in member_p) + 1e-9
    assert fitted <= nll(member_p.mean(axis=0), labels) + 1e-9
    assert run.info["ensemble"]["weight_fit"]["nll"] == pytest.approx(fitted, abs=1e-5)
    # The model computes the same mixture.
    assert nll(run.predict_proba(images, runtime="keras"), labels) == pytest.approx(
        fitted, abs=1e-5
    )


@pytest.mark.slow
def test_vote_ensemble_follows_the_members_votes(members, built, held_out):
    run, out, _ = built("vote")
    assert run.info["ensemble"]["method"] == "vote"
    images, _, member_p = held_out["test"]
    q = run.predict_proba(images, runtime="keras")  # votes flip on near ties in bfloat16
    np.testing.assert_allclose(q, combined_probabilities(member_p, "vote"), atol=1e-5)
    votes = member_p.argmax(axis=2)
    for i, predicted in enumerate(q.argmax(axis=1)):
        counts = np.bincount(votes[:, i], minlength=3)
        leaders = np.flatnonzero(counts == counts.max())
        assert predicted == leaders[np.argmax(member_p[:, i, leaders].mean(axis=0))]
    # Run again, the command refuses the folder it wrote (now not empty).
    args = ["ensemble", *map(str, members), "--method", "vote", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, FinetuneError) and "not empty" in str(result.exception)


def test_refuses_runs_with_other_class_names(members, tmp_path):
    names = json.loads((members[0] / "run.json").read_text())["class_names"]
    for changed, how in [(names[::-1], "another order"), ([*names[:2], "dress"], "dress")]:
        fake = tmp_path / f"fake_{len(how)}"
        fake.mkdir()
        (fake / "run.json").write_text(json.dumps({"class_names": changed, "image_size": 32}))
        with pytest.raises(FinetuneError) as caught:
            finetune.ensemble([members[0], fake], out=tmp_path / "out", progress=False)
        message = str(caught.value)
        assert "\n" not in message
        assert str(members[0]) in message and str(fake) in message and how in message
    assert not (tmp_path / "out").exists()


def test_refuses_bad_requests(members, tmp_path):
    with pytest.raises(finetune.ConfigError, match="mean, weighted, vote"):
        finetune.ensemble(members, method="median", progress=False)
    with pytest.raises(FinetuneError, match="two runs or more"):
        finetune.ensemble(members[:1], progress=False)
    with pytest.raises(FinetuneError, match="given twice"):
        finetune.ensemble([members[0], members[0]], progress=False)
    with pytest.raises(FinetuneError, match="is one of the members"):
        finetune.ensemble(members, out=members[1], overwrite=True, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="not empty"):
        finetune.ensemble(members, out=tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_members_on_other_splits(members, tmp_path):
    """Weighted needs the shared val split; mean keeps the images in the same split for all."""
    other = tmp_path / "other"
    other.mkdir()
    for name in ("run.json", "split.json"):
        shutil.copy(members[1] / name, other / name)
    split = json.loads((other / "split.json").read_text())
    split["splits"]["test"].append(split["splits"]["val"].pop(0))  # one val image moved
    (other / "split.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match="not trained on the same split") as caught:
        finetune.ensemble([members[0], other], method="weighted", progress=False)
    assert "val: 18 and 17 images, 1 not in both" in str(caught.value)
    _, splits, shared = _ensemble_splits([members[0], other], "mean", progress=False)
    assert not shared
    assert [len(splits[s]) for s in ("train", "val", "test")] == [54, 17, 18]


@pytest.mark.slow
def test_the_ensemble_folder_is_a_run_directory(members, built, loaded_mean, held_out):
    _, out, _ = built("mean")
    for name in (
        "model.keras",
        "run.json",
        "config.toml",
        "split.json",
        "history.json",
        "metrics.json",
        "predictions.csv",
        "report.html",
    ):
        assert (out / name).is_file(), name
    record = json.loads((out / "run.json").read_text())["ensemble"]
    assert record["method"] == "mean" and record["same_split"]
    assert [m["path"] for m in record["members"]] == [str(p.resolve()) for p in members]
    assert [m["temperature"] for m in record["members"]] == [TEMPERATURE, 1.0, 1.0]
    assert all("accuracy" in m["test"] for m in record["members"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == "test split" and metrics["num_images"] == 18
    assert finetune.evaluate(loaded_mean, progress=False)["accuracy"] == metrics["accuracy"]
    page = (out / "report.html").read_text()
    assert "Ensemble members" in page and "combines several" in page
    assert any(r.path == str(out) for r in finetune.list_runs(out.parent))

    result = CliRunner().invoke(app, ["evaluate", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == metrics["accuracy"]
    image = loaded_mean.split_samples("test")[0][0]
    expected = held_out["test"][2][:, 0].mean(axis=0)  # the first test image
    # A fresh process: importing finetune must be enough to register the combining layer, and
    # the `finetune` script (which defers TensorFlow) registers it before loading the model.
    script = str(Path(sys.executable).with_name("finetune"))
    for command in ([sys.executable, "-m", "finetune"], [script]):
        proc = subprocess.run(
            [*command, "predict", str(out), str(image), "--format", "json", "--runtime", "keras"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        top = json.loads(proc.stdout)[0]["predictions"]
        assert top[0]["probability"] == pytest.approx(expected.max(), abs=1e-5)
    if metrics["runtime"] in LINKED_RUNTIMES:  # evaluated in OpenVINO: linked when written
        assert kept_forward(file_sha256(out / "model.keras"), metrics["runtime"]) is not None


@pytest.mark.slow
def test_litert_export_of_an_ensemble_agrees_with_keras(built, loaded_mean, held_out):
    _, out, _ = built("mean")
    report = finetune.export_run(loaded_mean, "litert", latency_runs=2)
    assert report.path == out / "export" / "model.tflite"
    assert report.parity.passed and report.parity.agreement == 1.0
    assert report.parity.max_abs_logit_diff < 1e-4
    images = held_out["test"][0]
    exported = finetune.load_exported(report.path)
    np.testing.assert_allclose(
        exported.predict_proba(images),
        loaded_mean.predict_proba(images, runtime="keras"),
        atol=1e-5,
    )


@pytest.mark.slow
def test_an_ensemble_is_not_pruned_directly(built, tmp_path):
    _, folder, _ = built("mean")
    with pytest.raises(FinetuneError, match="is an ensemble: prune its members"):
        finetune.prune(folder, out=tmp_path / "pruned", progress=False)
    assert not (tmp_path / "pruned").exists()


@pytest.mark.slow
def test_held_out_images_above_the_limit_go_to_disk_once_each(members, built, tmp_path, capsys):
    """The first member's `data.max_memory_gb` (the ensemble's config) limits the decoded val
    and test splits as it limits `finetune evaluate`: above it they go to a memory-mapped file
    in the ensemble's folder, each split decoded once, with the same results."""
    low = tmp_path / "low"
    shutil.copytree(members[0], low)
    config = (low / "config.toml").read_text()
    assert "max_memory_gb = 8.0" in config
    (low / "config.toml").write_text(config.replace("max_memory_gb = 8.0", "max_memory_gb = 1e-6"))
    out = tmp_path / "ensemble"
    run = finetune.ensemble([low, *members[1:]], method="weighted", out=out, progress=True)
    printed = capsys.readouterr().err
    for split in ("val", "test"):  # 18 images of 32 x 32 x 3 bytes: 54 KiB, above 1 KiB
        spilled = f"the members' {split} split: the decoded images take"
        assert printed.count(spilled) == 1, printed
    assert f"memory-mapped file in {out}" in printed
    assert printed.count("the decoded images take") == 2  # evaluating decoded none again
    expected, _, _ = built("weighted")
    record, before = run.info["ensemble"], expected.info["ensemble"]
    np.testing.assert_allclose(record["weights"], before["weights"], atol=1e-9)
    for member, then in zip(record["members"], before["members"], strict=True):
        assert member["test"] == pytest.approx(then["test"], abs=1e-6)
    assert run.metrics["accuracy"] == expected.metrics["accuracy"]
    assert run.metrics["num_images"] == 18
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in built("weighted")[1].iterdir()
    )  # nothing left behind by the spill


@pytest.mark.slow
def test_without_a_test_split_the_val_split_is_decoded_once(members, tmp_path, capsys):
    """Weighted, with no test split: the val split fits the weights and is evaluated, from
    one decoding (above the limit, one file)."""
    copies = []
    for i in (0, 1):
        copy = tmp_path / f"member{i}"
        shutil.copytree(members[i], copy)
        split = json.loads((copy / "split.json").read_text())
        split["splits"].pop("test")
        split["counts"].pop("test")
        (copy / "split.json").write_text(json.dumps(split))
        copies.append(copy)
    config = (copies[0] / "config.toml").read_text()
    (copies[0] / "config.toml").write_text(
        config.replace("max_memory_gb = 8.0", "max_memory_gb = 1e-6")
    )
    run = finetune.ensemble(copies, method="weighted", out=tmp_path / "ensemble", progress=True)
    printed = capsys.readouterr().err
    assert printed.count("the decoded images take") == 1, printed
    assert "the members' val split: the decoded images take" in printed
    assert run.metrics["data"] == "val split" and run.metrics["num_images"] == 18
    assert all("accuracy" in m["val"] for m in run.info["ensemble"]["members"])

"""Model and weights files from elsewhere are refused before anything in them can run.

Every hostile file here carries a canary: a Lambda, a module or a pickle that would create a marker
file if it ever ran, or an HDF5 link that would read another file. Each test checks the refusal
names the file and that the marker never appears, at every place finetune opens such a file:
`Run.load`, `load_exported`/`finetune predict` on a `.keras` export, and `--weights PATH`.
"""

from __future__ import annotations

import importlib
import json
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from PIL import Image

import finetune
from finetune.backbones import get_backbone, list_backbones, load_backbone
from finetune.backbones.keras_applications import keras_models_dir
from finetune.errors import FinetuneError, WeightsError
from finetune.export.convert import LABELS_FORMAT
from finetune.export.runtime import load_exported
from finetune.model import build_classifier
from finetune.recipes.discriminative import with_lr_multipliers
from finetune.run import Run
from finetune.untrusted import _config_problem, check_h5_file, load_keras_model
from tests.backbones.test_keras_applications import write_legacy_h5_weights

SIZE = 32
CLASSES = ["a", "b", "c"]


# --- fixtures: a real finetune model, and ways to turn it hostile ------------------------------


@pytest.fixture(scope="module")
def good_keras(tmp_path_factory) -> Path:
    """A small classifier built and compiled the way finetune trains one, saved as .keras."""
    model = build_classifier(get_backbone("mobilenet_v3_small"), 3, image_size=SIZE, weights=None)
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, 10)
    model.compile(
        optimizer=with_lr_multipliers(keras.optimizers.Adam(schedule), {}),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.optimizer.build(model.trainable_variables)  # saved with its state, as after training
    path = tmp_path_factory.mktemp("good") / "model.keras"
    model.save(path)
    return path


def rewrite_keras(source: Path, dest: Path, config=None, extra: dict[str, bytes] | None = None):
    """Copies a .keras archive, replacing its config.json and adding members."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "config.json" and config is not None:
                data = json.dumps(config).encode()
            out.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            out.writestr(name, data)
    return dest


def keras_config(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


def find_layers(config: dict, class_name: str) -> list[dict]:
    found, pending = [], [config]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if item.get("class_name") == class_name and "config" in item:
                found.append(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return found


def lambda_model(marker: Path, path: Path) -> Path:
    """A model whose Lambda creates `marker` whenever it is called (and on loading it runs)."""
    inputs = keras.Input((SIZE, SIZE, 3))
    payload = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")  # noqa: S307
    x = keras.layers.Lambda(payload)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    marker.unlink()  # building the model called it once
    model.save(path)
    return path


def run_dir_with(model_file: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, folder / "model.keras")
    (folder / "run.json").write_text(json.dumps({"class_names": CLASSES, "image_size": SIZE}))
    (folder / "config.toml").write_text("")
    return folder


def export_with(model_file: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"exported{model_file.suffix}"
    shutil.copy(model_file, target)
    labels = {"format": LABELS_FORMAT, "class_names": CLASSES, "image_size": SIZE}
    Path(f"{target}.labels.json").write_text(json.dumps(labels))
    return target


def image(folder: Path) -> Path:
    path = folder / "photo.png"
    Image.new("RGB", (SIZE, SIZE), (10, 200, 30)).save(path)
    return path


def every_entry_point(model_file: Path, tmp_path: Path) -> list[tuple[str, Path, object]]:
    """(name, file the message must name, call) for each way finetune opens a model file."""
    run_dir = run_dir_with(model_file, tmp_path / "run")
    exported = export_with(model_file, tmp_path / "export")
    photo = image(tmp_path)
    return [
        ("load_keras_model", model_file, lambda: load_keras_model(model_file)),
        ("Run.load", run_dir / "model.keras", lambda: Run.load(run_dir)),
        ("load_exported", exported, lambda: load_exported(exported)),
        ("predict", exported, lambda: finetune.predict(str(exported), [photo])),
        ("predict run", run_dir / "model.keras", lambda: finetune.predict(run_dir, [photo])),
    ]


def assert_refused_everywhere(model_file, tmp_path, marker, *words):
    for name, named, call in every_entry_point(model_file, tmp_path):
        with pytest.raises(FinetuneError) as caught:
            call()
        message = str(caught.value)
        assert str(named) in message, (name, message)
        for word in words:
            assert word in message, (name, message)
        assert not marker.exists(), f"{name} ran the payload"


# --- good models still load --------------------------------------------------------------------


def test_a_finetune_model_loads_through_the_checks(good_keras, tmp_path):
    model = load_keras_model(good_keras)
    assert model.get_layer("normalize") is not None
    run = Run.load(run_dir_with(good_keras, tmp_path / "run"))
    assert run.class_names == CLASSES
    for ours, theirs in zip(run.model.weights, model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    exported = load_exported(export_with(good_keras, tmp_path / "export"))
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    assert np.isfinite(exported.predict_logits(x)).all()


@pytest.mark.parametrize("name", [s.name for s in list_backbones()])
def test_no_backbone_trips_the_config_check(name):
    # Every registered network must pass, or finetune would refuse its own runs.
    model = get_backbone(name).build(SIZE, False)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(model)))
    assert _config_problem(config) is None


# --- .keras: code and references to anything outside Keras --------------------------------------


def test_lambda_canary_is_live_and_refused_everywhere(tmp_path):
    marker = tmp_path / "lambda_ran"
    hostile = lambda_model(marker, tmp_path / "lambda.keras")
    # The canary works: without safe mode, loading runs it.
    keras.saving.load_model(hostile, safe_mode=False)
    assert marker.exists()
    marker.unlink()

    assert_refused_everywhere(hostile, tmp_path, marker, "Lambda", "refused")


def _canary_module(tmp_path: Path, marker: Path, monkeypatch) -> str:
    """A module whose import (or function) creates `marker`, importable by name."""
    (tmp_path / "canary_payload.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef act(x):\n    return x\nclass Evil:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "canary_payload"


REFERENCES = {
    "function in another module": ("canary_payload", "function", "act"),
    "class in another module": ("canary_payload", "Evil", None),
    "keras.utils.get_file": ("keras.utils", "function", "get_file"),
    "enable_unsafe_deserialization": ("keras.config", "function", "enable_unsafe_deserialization"),
    "keras.models.load_model": ("keras.models", "function", "load_model"),
    "keras.src.saving function": ("keras.src.saving.saving_api", "function", "load_model"),
    "os.system": ("os", "function", "system"),
    "builtins class": ("builtins", "eval", None),
}


@pytest.mark.parametrize("reference", list(REFERENCES))
def test_references_outside_keras_are_refused_without_importing(
    reference, good_keras, tmp_path, monkeypatch
):
    marker = tmp_path / "module_imported"
    (tmp_path / "mod").mkdir()
    _canary_module(tmp_path / "mod", marker, monkeypatch)
    module, class_name, target = REFERENCES[reference]
    config = keras_config(good_keras)
    (dense,) = find_layers(config, "Dense")
    if class_name == "function":
        dense["config"]["activation"] = {
            "module": module,
            "class_name": "function",
            "config": target,
            "registered_name": target,
        }
        shown = f"{module}.{target}"
    else:
        dense.update(module=module, class_name=class_name, registered_name=None)
        shown = f"{module}.{class_name}"
    hostile = rewrite_keras(good_keras, tmp_path / "ref.keras", config)

    assert_refused_everywhere(hostile, tmp_path, marker, shown, "refused")
    assert "canary_payload" not in sys.modules
    if module == "canary_payload":  # the canary works: importing the module creates the marker
        importlib.import_module(module)
        assert marker.exists()
        del sys.modules[module]


@pytest.mark.parametrize("class_name", ["TFSMLayer", "StringLookup"])
def test_layers_that_read_other_files_are_refused(class_name, good_keras, tmp_path):
    config = keras_config(good_keras)
    (dense,) = find_layers(config, "Dense")
    dense.update(class_name=class_name)
    hostile = rewrite_keras(good_keras, tmp_path / "reads.keras", config)
    with pytest.raises(FinetuneError, match="refused") as caught:
        load_keras_model(hostile)
    assert str(hostile) in str(caught.value)


def test_archive_members_outside_the_archive_are_refused(good_keras, tmp_path):
    hostile = rewrite_keras(good_keras, tmp_path / "slip.keras", extra={"../../evil.txt": b"x"})
    with pytest.raises(FinetuneError, match="leaves the archive") as caught:
        load_keras_model(hostile)
    assert str(hostile) in str(caught.value)
    assert not (tmp_path.parent / "evil.txt").exists()


# Keras stores the weights (read into memory for the check); another writer may deflate them
# (streamed: never inflated into memory).
@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"]
)
def test_weights_inside_a_keras_file_are_checked_too(good_keras, tmp_path, compression):
    target = tmp_path / "elsewhere.h5"
    with h5py.File(target, "w") as f:
        f.create_dataset("x", data=np.ones(3))
    weights = tmp_path / "model.weights.h5"
    with zipfile.ZipFile(good_keras) as archive:
        weights.write_bytes(archive.read("model.weights.h5"))
    with h5py.File(weights, "a") as f:
        f["elsewhere"] = h5py.ExternalLink(str(target), "/")
    hostile = tmp_path / "linked.keras"
    with zipfile.ZipFile(good_keras) as src, zipfile.ZipFile(hostile, "w") as out:
        for name in src.namelist():
            if name != "model.weights.h5":
                out.writestr(name, src.read(name))
        out.write(weights, "model.weights.h5", compress_type=compression)
    with zipfile.ZipFile(hostile) as archive:
        assert archive.getinfo("model.weights.h5").compress_type == compression

    with pytest.raises(FinetuneError, match="external link") as caught:
        load_keras_model(hostile)
    assert str(hostile) in str(caught.value)


def test_a_weights_member_shorter_than_its_header_says_is_named_damaged(good_keras, tmp_path):
    # The weights are read whole for the check: a member cut short must not end in EOFError.
    import struct

    short = tmp_path / "short.keras"
    with zipfile.ZipFile(good_keras) as src, zipfile.ZipFile(short, "w") as out:
        for name in [n for n in src.namelist() if n != "model.weights.h5"]:
            out.writestr(name, src.read(name))
        out.writestr("model.weights.h5", src.read("model.weights.h5"))  # last, stored
    data = bytearray(short.read_bytes())
    entry = data.rindex(b"PK\x01\x02")  # the central directory's entry of the last member
    size = struct.unpack_from("<I", data, entry + 20)[0]
    struct.pack_into("<II", data, entry + 20, size + (1 << 20), size + (1 << 20))
    short.write_bytes(bytes(data))

    with pytest.raises(FinetuneError, match="is damaged") as caught:
        load_keras_model(short)
    assert str(short) in str(caught.value)


# --- legacy HDF5 whole models ---------------------------------------------------------------------


@pytest.fixture
def h5_lambda_model(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "h5_lambda_ran"
    model = keras.saving.load_model(
        lambda_model(marker, tmp_path / "lam.keras"), safe_mode=False
    )  # rebuilds it (and runs the payload once); the .h5 copy carries the same Lambda
    marker.unlink()
    path = tmp_path / "whole_model.h5"
    model.save(path)
    with h5py.File(path) as f:
        assert "Lambda" in str(f.attrs["model_config"])
    return path, marker


def test_a_legacy_h5_model_is_refused_as_a_model(h5_lambda_model, tmp_path):
    path, marker = h5_lambda_model
    photo = image(tmp_path)
    # As a run's model.keras (renamed), as an export, and through predict.
    run_dir = run_dir_with(path, tmp_path / "run")
    with pytest.raises(FinetuneError, match="not a .keras model") as caught:
        Run.load(run_dir)
    assert str(run_dir / "model.keras") in str(caught.value)
    for call in (lambda: load_exported(path), lambda: finetune.predict(str(path), [photo])):
        with pytest.raises(FinetuneError) as caught:
            call()
        assert str(path) in str(caught.value)
    assert not marker.exists()


def test_a_legacy_h5_model_is_refused_as_weights(h5_lambda_model):
    path, marker = h5_lambda_model
    with pytest.raises(WeightsError, match="whole Keras model") as caught:
        load_backbone("mobilenet_v3_small", image_size=SIZE, weights=str(path))
    assert str(path) in str(caught.value)
    assert not marker.exists()


# --- HDF5 weights files (Keras Applications, --weights PATH) -------------------------------------


@pytest.fixture(scope="module")
def app_model():
    return get_backbone("mobilenet_v3_small").build(SIZE, False)


@pytest.fixture
def opened_by_keras(monkeypatch):
    """Records every call of keras.Model.load_weights (the checks must come first)."""
    calls: list[str] = []
    original = keras.Model.load_weights

    def spy(self, filepath, *args, **kwargs):
        calls.append(str(filepath))
        return original(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "load_weights", spy)
    return calls


def weights_file(model, path: Path) -> Path:
    write_legacy_h5_weights(model, path)
    return path


def test_plain_weights_pass_the_check(app_model, tmp_path, opened_by_keras):
    path = weights_file(app_model, tmp_path / "ok.h5")
    check_h5_file(path)
    get_backbone("mobilenet_v3_small").weights.load_file(app_model, str(path))
    assert opened_by_keras == [str(path)]


def test_external_link_is_refused_before_keras(app_model, tmp_path, opened_by_keras):
    elsewhere = weights_file(app_model, tmp_path / "elsewhere.h5")
    path = weights_file(app_model, tmp_path / "linked.h5")
    layer = next(layer.name for layer in app_model.layers if layer.weights)
    with h5py.File(path, "a") as f:
        del f[layer]
        f[layer] = h5py.ExternalLink(str(elsewhere), f"/{layer}")
    with h5py.File(path) as f:  # the canary is live: h5py follows the link into the other file
        assert f[layer].file.filename == str(elsewhere)

    with pytest.raises(WeightsError, match="external link") as caught:
        load_backbone("mobilenet_v3_small", image_size=SIZE, weights=str(path))
    assert str(path) in str(caught.value) and layer in str(caught.value)
    assert opened_by_keras == []


def test_external_dataset_is_refused_before_keras(app_model, tmp_path, opened_by_keras):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"password=hunter2")
    path = weights_file(app_model, tmp_path / "leaky.h5")
    with h5py.File(path, "a") as f:
        f.create_dataset("leak", shape=(16,), dtype="u1", external=[(str(secret), 0, 16)])
    with h5py.File(path) as f:  # the canary is live: reading the dataset reads the other file
        assert bytes(f["leak"][()]) == secret.read_bytes()

    with pytest.raises(WeightsError, match="stored in other files") as caught:
        get_backbone("mobilenet_v3_small").weights.load_file(app_model, str(path))
    assert str(path) in str(caught.value) and str(secret) in str(caught.value)
    assert opened_by_keras == []


def test_soft_and_virtual_and_bomb_datasets_are_refused(app_model, tmp_path, opened_by_keras):
    soft = weights_file(app_model, tmp_path / "soft.h5")
    with h5py.File(soft, "a") as f:
        f["alias"] = h5py.SoftLink("/nowhere")
    virtual = weights_file(app_model, tmp_path / "virtual.h5")
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as f:
        f.create_dataset("data", data=np.arange(4.0))
    with h5py.File(virtual, "a") as f:
        layout = h5py.VirtualLayout(shape=(4,), dtype="f8")
        layout[:] = h5py.VirtualSource(str(source), "data", shape=(4,))
        f.create_virtual_dataset("v", layout)
    bomb = weights_file(app_model, tmp_path / "bomb.h5")
    with h5py.File(bomb, "a") as f:
        f.create_dataset("big", shape=(1 << 20, 1 << 12), dtype="f4", chunks=(1024, 1024))
    assert bomb.stat().st_size < 10_000_000  # 16 GiB declared, almost nothing stored

    spec = get_backbone("mobilenet_v3_small")
    for path, words in ((soft, "soft link"), (virtual, "virtual"), (bomb, "stores almost")):
        with pytest.raises(WeightsError, match=words) as caught:
            spec.weights.load_file(app_model, str(path))
        assert str(path) in str(caught.value)
    assert opened_by_keras == []


def test_the_keras_cache_file_is_checked_too(app_model, tmp_path, monkeypatch, opened_by_keras):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    spec = get_backbone("mobilenet_v3_small")
    cached = keras_models_dir() / spec.weights.notop_file
    cached.parent.mkdir(parents=True)
    weights_file(app_model, cached)
    with h5py.File(cached, "a") as f:
        f["x"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/")
    with pytest.raises(WeightsError, match="external link") as caught:
        load_backbone("mobilenet_v3_small", image_size=SIZE)
    assert str(cached) in str(caught.value)
    assert opened_by_keras == []


def test_not_hdf5_is_refused_with_the_file_name(app_model, tmp_path):
    path = tmp_path / "fake.h5"
    path.write_bytes(b"\x89HDF\r\n" + b"\x00" * 100)
    with pytest.raises(WeightsError, match="cannot be read as an HDF5") as caught:
        get_backbone("mobilenet_v3_small").weights.load_file(app_model, str(path))
    assert str(path) in str(caught.value)


# --- PyTorch and NumPy weights for EfficientNet-Lite (--weights PATH) ---------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_pickled_code_in_a_pth_is_refused_at_the_weights_option(tmp_path):
    marker = tmp_path / "pth_ran"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"_conv_stem.weight": _Payload(marker)}, protocol=2))
    with pytest.raises(WeightsError, match=r"`(__builtin__|builtins)\.exec`") as caught:
        load_backbone("efficientnet_lite0", image_size=SIZE, weights=str(path))
    assert str(path) in str(caught.value)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the canary is live
    assert marker.exists()


def test_pickled_object_arrays_in_an_npz_are_refused(tmp_path):
    marker = tmp_path / "npz_ran"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(marker)
    path = tmp_path / "evil.npz"
    np.savez(path, **{"stem_conv/0": payload})
    with pytest.raises(WeightsError) as caught:
        load_backbone("efficientnet_lite0", image_size=SIZE, weights=str(path))
    assert str(path) in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".keras", ".safetensors", ".h5"])
def test_other_formats_given_to_efficientnet_lite_are_refused(suffix, good_keras, tmp_path):
    # EfficientNet-Lite reads .pth and .npz only (finetune reads no safetensors anywhere): any
    # other file is read as a .pth by the tensor-only reader and refused, never opened by Keras.
    path = tmp_path / f"weights{suffix}"
    if suffix == ".keras":
        shutil.copy(good_keras, path)
    elif suffix == ".h5":
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=np.ones(2))
    else:
        header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
        path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\x00" * 4)
    with pytest.raises(WeightsError) as caught:
        load_backbone("efficientnet_lite0", image_size=SIZE, weights=str(path))
    assert str(path) in str(caught.value)


# --- the command line -----------------------------------------------------------------------------


def test_cli_predict_on_a_hostile_export_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    from finetune.cli import main

    marker = tmp_path / "cli_ran"
    exported = export_with(lambda_model(marker, tmp_path / "lam.keras"), tmp_path / "export")
    monkeypatch.setattr(sys, "argv", ["finetune", "predict", str(exported), str(image(tmp_path))])
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert str(exported) in err and "Lambda" in err
    assert not marker.exists()

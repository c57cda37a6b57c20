"""Text files a user writes or edits: UTF-8 (with or without a BOM) is read, anything else refused.

finetune reads these text files from users: the TOML config (`--config`), and JSON records a user
may edit or carry around: an export's `<file>.labels.json`, a run's `run.json`/`history.json`/
`metrics.json` and `split.json`. Class names come from folder names, not from a labels file. Each
file is UTF-8 (TOML requires it; JSON between systems must be); a UTF-8 byte order mark, which
Windows editors add, is accepted; UTF-16, UTF-32 and cp1252/Latin-1 bytes are refused with a
message naming the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.config import load_config
from finetune.data.scan import Sample
from finetune.data.split import read_split, write_split
from finetune.errors import ConfigError, DataError, FinetuneError
from finetune.export.convert import LABELS_FORMAT
from finetune.export.runtime import read_labels
from finetune.run import Run
from finetune.untrusted import read_json, read_text

TOML = 'seed = 7\n[model]\nbackbone = "vgg16"\n# caf\u00e9 au lait\n'
BOM = b"\xef\xbb\xbf"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- the reader ---------------------------------------------------------------------------------


def test_utf8_with_and_without_bom_reads_the_same(tmp_path):
    plain = write(tmp_path / "a.txt", TOML.encode())
    bom = write(tmp_path / "b.txt", BOM + TOML.encode())
    assert read_text(plain) == read_text(bom) == TOML


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_with_bom_are_refused(tmp_path, encoding):
    data = TOML.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    path = write(tmp_path / "wide.toml", data)
    with pytest.raises(ConfigError) as caught:
        read_text(path, "TOML", ConfigError)
    message = str(caught.value)
    assert str(path) in message and encoding[:6].upper() in message and "UTF-8" in message


def test_utf16_without_bom_is_refused_with_the_line(tmp_path):
    path = write(tmp_path / "nobom.toml", TOML.encode("utf-16-le"))
    with pytest.raises(FinetuneError, match="line 1: holds NUL bytes") as caught:
        read_text(path)
    assert str(path) in str(caught.value)


def test_cp1252_is_refused_with_line_and_column(tmp_path):
    path = write(tmp_path / "latin.toml", TOML.encode("cp1252"))
    with pytest.raises(FinetuneError) as caught:
        read_text(path)
    message = str(caught.value)
    assert f"{path}, line 4, column 6: byte 0xe9 is not UTF-8" in message
    assert "save it again as UTF-8" in message


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(FinetuneError, match="cannot read") as caught:
        read_text(tmp_path / "absent.txt")
    assert "absent.txt" in str(caught.value)


def test_json_syntax_errors_name_line_and_column(tmp_path):
    path = write(tmp_path / "x.json", b'{\n  "a": 1,\n  "b": }\n')
    with pytest.raises(FinetuneError, match=r"line 3, column 8") as caught:
        read_json(path)
    assert str(path) in str(caught.value)
    assert read_json(write(tmp_path / "ok.json", BOM + b'{"caf\xc3\xa9": 1}')) == {"caf\u00e9": 1}


# --- where finetune reads them --------------------------------------------------------------------


def test_toml_config_with_bom_is_read(tmp_path):
    config = load_config(write(tmp_path / "bom.toml", BOM + TOML.encode()))
    assert config.seed == 7 and config.model.backbone == "vgg16"


@pytest.mark.parametrize(
    ("encoding", "words"),
    [("cp1252", "line 4, column 6: byte 0xe9"), ("utf-16", "UTF-16"), ("utf-16-le", "line 1")],
)
def test_toml_config_in_another_encoding_is_refused(tmp_path, encoding, words):
    path = write(tmp_path / "config.toml", TOML.encode(encoding))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value) and words in str(caught.value)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.toml", b'seed = 1\n[model\nbackbone = "x"\n')
    with pytest.raises(ConfigError, match="line 2") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def labels_file(artifact: Path, encoding: str, bom: bytes = b"") -> Path:
    record = {"format": LABELS_FORMAT, "class_names": ["caf\u00e9", "th\u00e9"], "image_size": 32}
    text = json.dumps(record, ensure_ascii=False, indent=1)
    return write(Path(f"{artifact}.labels.json"), bom + text.encode(encoding))


def test_labels_file_with_bom_is_read(tmp_path):
    artifact = tmp_path / "model.tflite"
    labels_file(artifact, "utf-8", BOM)
    assert read_labels(artifact)["class_names"] == ["caf\u00e9", "th\u00e9"]


@pytest.mark.parametrize(("encoding", "words"), [("cp1252", "line 4"), ("utf-16", "UTF-16")])
def test_labels_file_in_another_encoding_is_refused(tmp_path, encoding, words):
    artifact = tmp_path / "model.tflite"
    path = labels_file(artifact, encoding)
    with pytest.raises(FinetuneError) as caught:
        read_labels(artifact)
    assert str(path) in str(caught.value) and words in str(caught.value)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"class_names": "cat"}, "'class_names'"),
        ({"class_names": []}, "'class_names'"),
        ({"image_size": "32"}, "'image_size'"),
        ({"temperature": 0}, "'temperature'"),
        ({"temperature": float("nan")}, "'temperature'"),
    ],
)
def test_labels_file_with_bad_values_is_refused(tmp_path, change, words):
    artifact = tmp_path / "model.onnx"
    record = {"format": LABELS_FORMAT, "class_names": ["a"], "image_size": 32, **change}
    path = write(Path(f"{artifact}.labels.json"), json.dumps(record).encode())
    with pytest.raises(FinetuneError, match=words) as caught:
        read_labels(artifact)
    assert str(path) in str(caught.value)


def test_split_file_with_bom_is_read_and_cp1252_refused(tmp_path):
    root = tmp_path / "data"
    samples = {"train": [Sample(root / "caf\u00e9" / "a.png", 0)]}
    path = write_split(tmp_path / "split.json", samples, root, ["caf\u00e9"], 0, {"train": 1.0})
    text = path.read_text(encoding="utf-8")
    write(path, BOM + text.encode())
    assert read_split(path).class_names == ["caf\u00e9"]
    write(path, text.encode("cp1252"))
    with pytest.raises(DataError, match="line [0-9]+, column [0-9]+: byte 0xe9") as caught:
        read_split(path)
    assert str(path) in str(caught.value)


def test_run_json_in_cp1252_is_refused_before_the_model_is_opened(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"never opened")
    record = '{"class_names": ["caf\u00e9"], "image_size": 32}'
    path = write(tmp_path / "run.json", record.encode("cp1252"))
    with pytest.raises(FinetuneError, match="line 1, column 22: byte 0xe9") as caught:
        Run.load(tmp_path)
    assert str(path) in str(caught.value)

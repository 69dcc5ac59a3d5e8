"""Image sources on real files: a class-per-folder PNG tree written from PneumoniaMNIST, and DICOM
files written with pydicom (whose identifying tags must never be read unless declared)."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from insitu.data import imaging
from insitu.data.features import encoding, federated_data, site_data
from insitu.data.medmnist import _to_tensor, load_npz
from insitu.data.sources import RecordSchema, SourceKind, open_source, read_dataset, read_records
from insitu.errors import ConfigError, DataError

CLASSES = ["normal", "pneumonia"]
IMAGE_SCHEMA = RecordSchema.from_dict({
    "pixels": {"height": 28, "width": 28, "channels": 1},
    "columns": {"label": {"role": "label", "type": "string", "levels": CLASSES, "file": "folder"}},
})


@pytest.fixture(scope="module")
def pneumonia(pneumonia_npz):
    arrays = load_npz(pneumonia_npz)
    labels = arrays["train_labels"].reshape(-1)
    pick = np.sort(np.concatenate([np.flatnonzero(labels == 0)[:18], np.flatnonzero(labels == 1)[:18]]))
    return arrays["train_images"][pick], labels[pick]


def test_image_folder_reads_pneumoniamnist_like_the_npz_loader(tmp_path, pneumonia):
    images, labels = pneumonia
    imaging.write_image_folder(images, labels, CLASSES, tmp_path / "xray")
    src = open_source(tmp_path / "xray")
    assert src.kind is SourceKind.IMAGE_FOLDER
    rec = read_dataset(src, IMAGE_SCHEMA)
    assert rec.pixels.shape == (36, 1, 28, 28) and rec.pixels.dtype == np.float32
    # rows are in path order: normal/ first, then pneumonia/, each by file name (= original order)
    order = np.concatenate([np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)])
    assert rec.frame["label"].tolist() == [CLASSES[int(v)] for v in labels[order]]
    # the same numbers the MedMNIST loader gives the model, bit for bit
    np.testing.assert_array_equal(rec.pixels, _to_tensor(images[order]).numpy())
    sd = site_data(rec, IMAGE_SCHEMA, "h1", test_fraction=0.25, seed=0)
    assert sd.X_train.shape[1:] == (1, 28, 28) and sd.n_train + sd.n_test == 36
    assert np.bincount(sd.y_test.numpy().astype(int)).tolist() == [4, 4]  # stratified
    fd = federated_data([sd], IMAGE_SCHEMA, "xray")
    assert fd.input_shape == (1, 28, 28) and fd.num_classes == 2 and fd.schema == ("image",)


def test_image_of_wrong_size_or_class_is_refused_by_row_never_file_name(tmp_path, pneumonia):
    from PIL import Image

    images, labels = pneumonia
    imaging.write_image_folder(images[:6], labels[:6], CLASSES, tmp_path / "xray")
    (tmp_path / "xray" / "normal").mkdir(exist_ok=True)
    row = int(np.sum(labels[:6] == 0)) + 1  # the last file of normal/, which comes before pneumonia/
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "xray" / "normal" / "zz_smith_john.png")
    with pytest.raises(DataError) as exc:
        read_dataset(tmp_path / "xray", IMAGE_SCHEMA)
    msg = str(exc.value)
    assert f"row {row} is 32×32 pixels; the schema declares 28×28" in msg and "smith" not in msg
    (tmp_path / "xray" / "normal" / "zz_smith_john.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"row {row} .* is not a readable image"):
        read_dataset(tmp_path / "xray", IMAGE_SCHEMA)
    (tmp_path / "xray" / "normal" / "zz_smith_john.png").unlink()
    (tmp_path / "xray" / "covid").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "xray" / "covid" / "a.png")
    with pytest.raises(DataError, match="column 'label' has 1 value.* outside its declared levels"):
        read_dataset(tmp_path / "xray", IMAGE_SCHEMA)


def _dicom(path, pixels, *, bits=8, view="PA", signed=False, photometric="MONOCHROME2"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-4411"
    ds.PatientBirthDate = "19610203"
    ds.PatientAge = "062Y"
    ds.InstitutionName = "St Elsewhere"
    ds.Modality, ds.ViewPosition = "CR", view
    ds.StudyDate = "20230405"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    ds.PixelData = pixels.astype({8: np.uint8, 12: np.int16 if signed else np.uint16}[bits]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


DICOM_SCHEMA = RecordSchema.from_dict({
    "pixels": {"height": 28, "width": 28},
    "columns": {
        "label": {"role": "label", "type": "string", "levels": CLASSES, "file": "folder"},
        "view": {"role": "feature", "type": "string", "levels": ["AP", "PA"], "dicom": "ViewPosition"},
        "modality": {"role": "sensitive", "type": "string", "dicom": "Modality"},
    },
})


@pytest.fixture
def study(tmp_path, pneumonia):
    images, labels = pneumonia
    for i in range(8):
        # class folder / patient folder / file, as PACS exports nest them: the class is the first level
        _dicom(tmp_path / "study" / CLASSES[int(labels[i * 4])] / f"pt{i:02d}" / "IM0001", images[i * 4],
               view="AP" if i % 2 else "PA")
    return tmp_path / "study", images[::4][:8], labels[::4][:8]


def test_dicom_pixels_and_declared_tags_only(study, monkeypatch):
    root, images, labels = study
    seen = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    src = open_source(root)
    assert src.kind is SourceKind.DICOM
    rec = read_dataset(src, DICOM_SCHEMA)
    order = np.argsort([f"{CLASSES[int(v)]}/pt{i:02d}" for i, v in enumerate(labels)], kind="stable")
    assert rec.frame["label"].tolist() == [CLASSES[int(v)] for v in labels[order]]
    np.testing.assert_array_equal(rec.pixels, _to_tensor(images[order]).numpy())
    assert rec.frame["view"].tolist() == ["AP" if i % 2 else "PA" for i in order]
    assert set(rec.frame["modality"]) == {"CR"}
    # the attack: look at everything pydicom handed back; no identifying tag was ever parsed
    assert len(seen) == 8
    for ds in seen:
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientAge", "InstitutionName", "StudyDate"):
            assert kw not in ds, kw
        assert "ViewPosition" in ds and "PixelData" in ds


def test_identifying_tag_must_be_declared_an_identifier_then_it_is_read(study):
    root, _, _ = study
    for kw in ("PatientName", "PatientAge", "InstitutionName", "StudyDate"):
        with pytest.raises(ConfigError, match=f"column 'x' dicom = '{kw}' identifies a patient"):
            RecordSchema.from_dict({"pixels": {"height": 28, "width": 28}, "columns": {
                "x": {"role": "feature", "type": "string", "dicom": kw}}})
    schema = RecordSchema.from_dict({"pixels": {"height": 28, "width": 28}, "columns": {
        "label": {"role": "label", "type": "string", "levels": CLASSES, "file": "folder"},
        "mrn": {"role": "direct_identifier", "type": "string", "dicom": "PatientID"},
        "age": {"role": "quasi_identifier", "type": "integer", "dicom": "PatientAge"},
        "study": {"role": "quasi_identifier", "type": "date", "dicom": "StudyDate"}}})
    frame = read_records(root, schema)
    assert set(frame["mrn"]) == {"MRN-4411"} and set(frame["age"]) == {62}
    assert set(frame["study"].dt.strftime("%Y-%m-%d")) == {"2023-04-05"}


@pytest.mark.parametrize("binding, problem", [
    ("NotAKeyword", "is not a DICOM keyword"),
    ("PixelSpacing", "holds 2 values; a column holds one"),
    ("PixelData", "pixel data and its layout come from [pixels]"),
])
def test_bad_dicom_declarations(binding, problem):
    with pytest.raises(ConfigError) as exc:
        RecordSchema.from_dict({"pixels": {"height": 28, "width": 28}, "columns": {
            "x": {"role": "feature", "type": "float", "dicom": binding}}})
    assert problem in str(exc.value)


def test_sixteen_bit_and_monochrome1_and_size_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4096, (28, 28))
    _dicom(tmp_path / "s" / "normal" / "a.dcm", img, bits=12)
    _dicom(tmp_path / "s" / "pneumonia" / "b.dcm", img, bits=12, photometric="MONOCHROME1")
    rec = read_dataset(tmp_path / "s", DICOM_SCHEMA)
    np.testing.assert_allclose(rec.pixels[0, 0], (img / 4095 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_allclose(rec.pixels[1, 0], -rec.pixels[0, 0], atol=1e-6)  # inverted
    _dicom(tmp_path / "s" / "normal" / "c.dcm", rng.integers(0, 255, (32, 28)))
    with pytest.raises(DataError, match="row 2 is 32×28 with 1 channel"):
        read_dataset(tmp_path / "s", DICOM_SCHEMA)


def test_image_schemas_need_pixels_and_bindings(tmp_path, pneumonia):
    images, labels = pneumonia
    imaging.write_image_folder(images[:4], labels[:4], CLASSES, tmp_path / "x")
    no_pixels = RecordSchema.from_dict({"columns": {"label": {"role": "label", "type": "string", "file": "folder"}}})
    with pytest.raises(ConfigError, match=r"needs a \[pixels\] table"):
        read_dataset(tmp_path / "x", no_pixels)
    with pytest.raises(ConfigError, match=r"\[pixels\] channels must be 1 \(grayscale\) or 3"):
        RecordSchema.from_dict({"pixels": {"height": 28, "width": 28, "channels": 2}, "columns": {"a": {"role": "feature", "type": "float"}}})
    with pytest.raises(ConfigError, match="file = 'folder' is text"):
        RecordSchema.from_dict({"columns": {"a": {"role": "label", "type": "integer", "file": "folder"}}})
    assert encoding(IMAGE_SCHEMA).input_shape == (1, 28, 28)
    assert torch.is_tensor(site_data(read_dataset(tmp_path / "x", IMAGE_SCHEMA), IMAGE_SCHEMA, "s", test_fraction=0.5).X_test)

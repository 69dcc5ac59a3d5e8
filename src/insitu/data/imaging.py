"""Image sources: a folder of images with one sub-folder per class, and DICOM files.

The schema declares the pixels every image must have and where each column comes from::

    [pixels]
    height = 28
    width = 28
    channels = 1                 # 1 = grayscale, 3 = RGB

    [columns.label]
    role = "label"
    type = "string"
    levels = ["normal", "pneumonia"]   # class index = position here, the same at every site
    file = "folder"              # the name of the folder holding the file

    [columns.view]               # DICOM only: one tag, by its keyword
    role = "feature"
    type = "string"
    dicom = "ViewPosition"

An image of another size or channel count is refused, never resized.  Pixels are scaled to [-1, 1]
the way the MedMNIST loader scales them, so a model sees the same numbers from either.

DICOM files are read with ``pydicom`` asking for the pixel data, the tags needed to decode it and the
tags the schema names, nothing else: an undeclared tag is never parsed.  A tag that identifies a
patient (the Patient module, group 0010, and the other attributes that DICOM PS3.15's Basic
Confidentiality Profile removes or replaces) may be declared only as a ``direct_identifier`` or
``quasi_identifier`` column, so that the de-identification policy replaces or generalizes it.

Rows are the files in path order; errors name the row number and the column or tag, never a file
name (it may hold a patient's name) nor a value.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from insitu.data.sources import ColumnType, PixelSpec, RecordSchema, Records, Role, SourceKind
from insitu.errors import ConfigError, DataError, parse_choice

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Attributes outside group 0010 that DICOM PS3.15 Annex E's basic profile removes, replaces or
# cleans because they identify a patient, a clinician, an institution or a moment of care.
IDENTIFYING_KEYWORDS = frozenset({
    "AccessionNumber", "AcquisitionDate", "AcquisitionDateTime", "AcquisitionTime", "AdmissionID",
    "AdmittingDiagnosesDescription", "ContentDate", "ContentTime", "DeviceSerialNumber",
    "FrameOfReferenceUID", "InstitutionAddress", "InstitutionName", "InstitutionalDepartmentName",
    "NameOfPhysiciansReadingStudy", "OperatorsName", "PerformedProcedureStepStartDate",
    "PerformingPhysicianName", "PhysiciansOfRecord", "ReferringPhysicianAddress", "ReferringPhysicianName",
    "ReferringPhysicianTelephoneNumbers", "RequestingPhysician", "SeriesDate", "SeriesInstanceUID",
    "SeriesTime", "SOPInstanceUID", "StationName", "StudyDate", "StudyID", "StudyInstanceUID", "StudyTime",
    "ResponsiblePerson", "ResponsibleOrganization", "RequestAttributesSequence", "ScheduledProcedureStepID",
})

# What decoding the pixel data needs (never identifying).
_PIXEL_KEYWORDS = ("PixelData", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                   "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames")


class FileField(StrEnum):
    FOLDER = "folder"  # the first-level folder under the source's root that holds the file (a class)
    NAME = "name"  # the file's own name


def _file_field(root: Path, path: Path, fld: FileField) -> str | None:
    if fld is FileField.NAME:
        return path.name
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None  # a file at the root has no class folder


@dataclass(frozen=True)
class FileBinding:
    """A column read from where the file sits (``file = "folder"`` or ``file = "name"``)."""

    field: FileField


@dataclass(frozen=True)
class DicomBinding:
    """A column read from one DICOM tag, named by its keyword (``dicom = "ViewPosition"``)."""

    keyword: str
    vr: str


def is_identifying(keyword: str) -> bool:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return keyword in IDENTIFYING_KEYWORDS or (tag is not None and (tag >> 16) == 0x0010)


def parse_binding(key: str, value: Any, *, column: str, role: Role, ctype: ColumnType, origin: str) -> Any:
    """Parse a column's ``file`` or ``dicom`` declaration."""
    what = f"{origin}: column {column!r} {key}"
    if key == "file":
        fld = parse_choice(FileField, value, what)
        if ctype is not ColumnType.STRING:
            raise ConfigError(f"{what} = {fld.value!r} is text: declare the column type = \"string\"")
        return FileBinding(fld)
    from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(value) if isinstance(value, str) else None
    if tag is None:
        raise ConfigError(f"{what} = {value!r} is not a DICOM keyword (e.g. \"ViewPosition\", \"PatientAge\")")
    if value in _PIXEL_KEYWORDS:
        raise ConfigError(f"{what} = {value!r}: pixel data and its layout come from [pixels], not a column")
    if dictionary_VM(tag) != "1":
        raise ConfigError(f"{what} = {value!r} holds {dictionary_VM(tag)} values; a column holds one")
    vr = dictionary_VR(tag)
    if vr == "SQ":
        raise ConfigError(f"{what} = {value!r} is a sequence; name a tag that holds one value")
    if is_identifying(value) and role not in (Role.DIRECT_IDENTIFIER, Role.QUASI_IDENTIFIER):
        raise ConfigError(f"{what} = {value!r} identifies a patient, clinician or visit: declare the column "
                          "role = \"direct_identifier\" or \"quasi_identifier\" so that de-identification "
                          "replaces or generalizes it, or do not read it")
    return DicomBinding(value, vr)


def _bindings(schema: RecordSchema, allowed: tuple[type, ...], what: str) -> list[tuple[str, Any]]:
    if schema.pixels is None:
        raise ConfigError(f"an {what} source needs a [pixels] table in the schema (height, width, channels)")
    out, missing = [], []
    for c in schema.columns:
        (out if isinstance(c.binding, allowed) else missing).append((c.name, c.binding))
    if missing:
        kinds = " or ".join("file = ..." if a is FileBinding else "dicom = ..." for a in allowed)
        raise ConfigError(f"an {what} source reads columns from {kinds}; {[n for n, _ in missing]} have neither")
    return out


def scale_pixels(img: np.ndarray, maximum: float) -> np.ndarray:
    """Pixels in ``[0, maximum]`` to ``[-1, 1]`` (MedMNIST's ``(x/255 - 0.5)/0.5``), float32."""
    return ((img.astype(np.float32) / np.float32(maximum)) - np.float32(0.5)) / np.float32(0.5)


# -- image folders ----------------------------------------------------------------------------------
def _files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if suffixes is None or name.lower().endswith(suffixes):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


@dataclass(frozen=True)
class ImageFolderSource:
    """A folder with one sub-folder per class, each holding image files (PNG, JPEG, BMP, TIFF).

    Read with Pillow, converted to grayscale (``channels = 1``) or RGB (``channels = 3``).
    """

    location: str
    kind: ClassVar[SourceKind] = SourceKind.IMAGE_FOLDER

    @property
    def display(self) -> str:
        return self.location

    def fetch(self, schema: RecordSchema) -> Records:
        from PIL import Image, UnidentifiedImageError

        cols = _bindings(schema, (FileBinding,), "image-folder")
        spec: PixelSpec = schema.pixels  # type: ignore[assignment]
        root = Path(self.location)
        files = [p for p in _files(root, IMAGE_SUFFIXES) if p.parent != root]
        if not files:
            raise DataError(f"{root} holds no images in class sub-folders ({', '.join(IMAGE_SUFFIXES)})")
        pixels = np.empty((len(files), *spec.shape), dtype=np.float32)
        rows = []
        for i, path in enumerate(files):
            try:
                with Image.open(path) as im:
                    im = im.convert("L" if spec.channels == 1 else "RGB")
                    arr = np.asarray(im)
            except (UnidentifiedImageError, OSError):
                raise DataError(f"{root}: row {i + 1} (file {i + 1} in path order) is not a readable image") from None
            if arr.shape[:2] != (spec.height, spec.width):
                raise DataError(f"{root}: row {i + 1} is {arr.shape[0]}×{arr.shape[1]} pixels; the schema "
                                f"declares {spec.height}×{spec.width} (resize the images before, the same at every site)")
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            pixels[i] = scale_pixels(arr, 255.0)
            rows.append({name: _file_field(root, path, b.field) for name, b in cols})
        return Records(pd.DataFrame(rows, columns=[n for n, _ in cols], dtype=object), pixels)


def write_image_folder(images: np.ndarray, labels: np.ndarray, classes: list[str], folder: str | Path) -> list[Path]:
    """Write ``uint8`` images (N, H, W) or (N, H, W, 3) as PNGs under ``folder/<class>/``."""
    from PIL import Image

    folder = Path(folder)
    out = []
    for i, (img, lab) in enumerate(zip(images, np.asarray(labels).reshape(-1))):
        d = folder / classes[int(lab)]
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"img{i:05d}.png"
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(path)
        out.append(path)
    return out


# -- DICOM ------------------------------------------------------------------------------------------
def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def looks_like_dicom(root: Path, probe: int = 20) -> bool:
    """True when the first files under ``root`` (path order) are DICOM."""
    for i, path in enumerate(_iter_files(root)):
        if i >= probe:
            break
        if _is_dicom(path):
            return True
    return False


def _iter_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _tag_value(elem: Any, vr: str) -> Any:
    """One DICOM element as a value the schema's types parse: DA → ISO date, AS → years."""
    if elem is None or elem.value is None or elem.value == "":
        return None
    v = elem.value
    if vr == "DA":
        s = str(v)
        return f"{s[:4]}-{s[4:6]}-{s[6:8]}" if len(s) == 8 and s.isdigit() else s
    if vr == "AS":
        s = str(v)
        if len(s) == 4 and s[:3].isdigit() and s[3] in "DWMY":
            return int(s[:3]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[s[3]]
        return s
    if vr in ("DS", "IS"):
        return float(v) if vr == "DS" else int(v)
    if vr == "PN":
        return str(v)
    return v


@dataclass(frozen=True)
class DicomSource:
    """A folder tree of DICOM files, one image per file (single frame), in path order."""

    location: str
    kind: ClassVar[SourceKind] = SourceKind.DICOM

    @property
    def display(self) -> str:
        return self.location

    def fetch(self, schema: RecordSchema) -> Records:
        import pydicom
        from pydicom.errors import InvalidDicomError

        cols = _bindings(schema, (FileBinding, DicomBinding), "DICOM")
        spec: PixelSpec = schema.pixels  # type: ignore[assignment]
        root = Path(self.location)
        files = [p for p in _iter_files(root) if _is_dicom(p)]
        if not files:
            raise DataError(f"{root} holds no DICOM files (*.dcm or the DICM preamble)")
        wanted = [*_PIXEL_KEYWORDS, *(b.keyword for _, b in cols if isinstance(b, DicomBinding))]
        pixels = np.empty((len(files), *spec.shape), dtype=np.float32)
        rows = []
        for i, path in enumerate(files):
            row_name = f"{root}: row {i + 1}"
            try:
                ds = pydicom.dcmread(path, specific_tags=wanted)
            except (InvalidDicomError, OSError, EOFError, ValueError):
                raise DataError(f"{row_name} is not a readable DICOM file") from None
            pixels[i] = self._pixels(ds, spec, row_name)
            row = {}
            for name, b in cols:
                if isinstance(b, FileBinding):
                    row[name] = _file_field(root, path, b.field)
                else:
                    row[name] = _tag_value(ds.data_element(b.keyword) if b.keyword in ds else None, b.vr)
            rows.append(row)
        return Records(pd.DataFrame(rows, columns=[n for n, _ in cols], dtype=object), pixels)

    @staticmethod
    def _pixels(ds: Any, spec: PixelSpec, row_name: str) -> np.ndarray:
        if "PixelData" not in ds:
            raise DataError(f"{row_name} has no pixel data")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise DataError(f"{row_name} has several frames; a schema reads one image per file")
        try:
            arr = ds.pixel_array
        except Exception as exc:  # pydicom raises many kinds for undecodable pixel data
            raise DataError(f"{row_name}: its pixel data cannot be decoded ({type(exc).__name__}); "
                            "an encapsulated transfer syntax may need a decoder plug-in") from None
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if samples != spec.channels or arr.shape[:2] != (spec.height, spec.width):
            raise DataError(f"{row_name} is {arr.shape[0]}×{arr.shape[1]} with {samples} channel(s); the schema "
                            f"declares {spec.height}×{spec.width} with {spec.channels}")
        bits = int(ds.get("BitsStored", 8) or 8)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        arr = arr.astype(np.float64)
        if signed:
            arr = arr + 2 ** (bits - 1)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":  # high values are dark
            arr = (2**bits - 1) - arr
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return scale_pixels(arr, 2**bits - 1)


__all__ = ["DicomBinding", "DicomSource", "FileBinding", "FileField", "IDENTIFYING_KEYWORDS", "ImageFolderSource",
           "is_identifying", "looks_like_dicom", "parse_binding", "scale_pixels", "write_image_folder"]

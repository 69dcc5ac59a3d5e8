"""PhysioNet/CinC Challenge 2012 ICU records (in-hospital mortality), read raw and federated.

Input: a folder holding ``set-a.tar.gz`` (or an extracted ``set-a/`` folder of ``<RecordID>.txt``
files) and ``Outcomes-a.txt``, likewise for sets b and c, exactly as PhysioNet ships them.  The
archives are streamed with :mod:`tarfile`; nothing is unpacked to disk.  Parsing all 12,000
records takes about 4-5 s on one core, so nothing is cached.

Quirks of the files, handled here:

* ``-1`` means missing, for descriptors and time series alike: such a line is dropped.
* Descriptor-only records (e.g. set A 140501) are kept: every time series is unobserved.
* Two ``Weight`` lines at 00:00 (set B 149509, set C 162538) are both weight observations at
  hour 0; binning averages them.  Other descriptors must appear at most once (``ICUType``
  exactly once), or a :class:`DataError` names the record.
* Rows with an empty ``Parameter`` (2,403 in set C) carry no variable name; they are dropped and
  counted (``FederatedData.info["dropped_empty_parameter"]``), as the widely used loaders do.
* Physiologically impossible values become missing (not clipped to a bound): see
  :data:`RANGES`.  ``FederatedData.info["cleaned"]`` counts them per variable.

Representation (what a model receives).  A record is a float32 tensor ``[T, 3V]``: ``T`` time
bins (default 48 bins of one hour) and, for each of the ``V`` = 44 :data:`FEATURES`, three
blocks of ``V`` columns:

* ``x[:, :V]``   value, normalised with the public constants :data:`REFERENCE`
  (``(f(v) − mean) / std``, ``f = log1p`` for the skewed :data:`LOG_VARIABLES`), mean of the
  observations in the bin, and **0 where unobserved** (= the public mean, GRU-D's x̃);
* ``x[:, V:2V]`` observation mask (1 observed in this bin, 0 not);
* ``x[:, 2V:]``  hours since the variable was last observed (Che et al. 2018's δ: 0 in the first
  bin, then the bin width plus the previous δ where the previous bin was unobserved).

The 37 time series are followed by 7 static descriptors (age, gender, height and the ICU type
one-hot), which are known for the whole stay: value in every bin, mask 1, δ 0 (mask 0 where the
descriptor is missing, e.g. height in 48 % of records).

Normalisation uses fixed constants written in this module, computed once from set A (a public
training set, by :func:`reference_statistics`; a test recomputes them), never from a site's
records at run time, so no statistic of a site leaves it.

Sites: ``natural`` (default) is one site per ICU type (coronary care, cardiac-surgery recovery,
medical, surgical); ``iid`` and ``dirichlet:ALPHA`` spread the pooled training records over N
sites.  Default split: train on sets A and B, test on set C; each site's validation split
(``val_fraction`` of its training records, stratified by label, seeded) is carved from training.
"""
from __future__ import annotations

import enum
import io
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from insitu.data.dataset import FederatedData, SiteData
from insitu.data.partition import Partition, PartitionKind, split_indices
from insitu.data.origins import PHYSIONET2012_ORIGIN
from insitu.errors import ConfigError, DataError, parse_choice

HEADER = "Time,Parameter,Value"
OUTCOMES_HEADER = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"

#: The 37 time series of the challenge, in its documentation's order.
TIME_SERIES: tuple[str, ...] = (
    "Albumin", "ALP", "ALT", "AST", "Bilirubin", "BUN", "Cholesterol", "Creatinine", "DiasABP", "FiO2",
    "GCS", "Glucose", "HCO3", "HCT", "HR", "K", "Lactate", "Mg", "MAP", "MechVent", "Na", "NIDiasABP",
    "NIMAP", "NISysABP", "PaCO2", "PaO2", "pH", "Platelets", "RespRate", "SaO2", "SysABP", "Temp",
    "TroponinI", "TroponinT", "Urine", "WBC", "Weight",
)
DESCRIPTORS = ("RecordID", "Age", "Gender", "Height", "ICUType", "Weight")


class ICUType(enum.IntEnum):
    """The ``ICUType`` descriptor: the natural sites."""

    CCU = 1   # coronary care unit
    CSRU = 2  # cardiac surgery recovery unit
    MICU = 3  # medical ICU
    SICU = 4  # surgical ICU

    @property
    def site(self) -> str:
        return self.name.lower()


STATIC: tuple[str, ...] = ("Age", "Gender", "Height", *(f"ICU={t.name}" for t in ICUType))
FEATURES: tuple[str, ...] = TIME_SERIES + STATIC
V = len(FEATURES)

#: Plausible range for an adult ICU patient, in the files' units; a value outside becomes missing.
#: Chosen here from the "valid" columns of the MIMIC-III benchmark's outlier table (Harutyunyan et
#: al. 2019, github.com/YerevaNN/mimic3-benchmarks, resources/variable_ranges.csv) and the cleaning
#: rules A. Johnson published for these very files (github.com/alistairewj/challenge2012,
#: prepare-data.ipynb: pressures and rates < 1, HR > 299, DiasABP > 200, pH outside 6.5-8.0,
#: weight outside 35-299 kg are errors), widened where the challenge data hold real extremes
#: (weights of 31.7-34.6 kg recur through whole stays; 300 kg is recorded 28 times in set A;
#: ALT to 16,920 IU/L in shock liver; platelets to 2,292/nL).  Johnson rescales some unit slips
#: (pH 735, temperature in °F); we do not guess units and drop them instead.
RANGES: dict[str, tuple[float, float]] = {
    "Albumin": (0.6, 6.0), "ALP": (1, 5000), "ALT": (1, 20000), "AST": (1, 40000), "Bilirubin": (0, 90),
    "BUN": (0, 300), "Cholesterol": (20, 660), "Creatinine": (0.1, 40), "DiasABP": (1, 200), "FiO2": (0.21, 1.0),
    "GCS": (3, 15), "Glucose": (10, 2000), "HCO3": (1, 60), "HCT": (5, 75), "HR": (1, 299), "K": (1, 12),
    "Lactate": (0.1, 33), "Mg": (0.3, 20), "MAP": (1, 300), "MechVent": (0, 1), "Na": (90, 200),
    "NIDiasABP": (1, 200), "NIMAP": (1, 300), "NISysABP": (1, 300), "PaCO2": (10, 200), "PaO2": (20, 770),
    "pH": (6.5, 8.0), "Platelets": (1, 2500), "RespRate": (1, 80), "SaO2": (20, 100), "SysABP": (1, 300),
    "Temp": (25, 45), "TroponinI": (0.01, 600), "TroponinT": (0.01, 30), "Urine": (0, 5000), "WBC": (0.1, 1000),
    "Weight": (20, 300), "Age": (15, 120), "Gender": (0, 1), "Height": (100, 250),
}
#: Right-skewed variables, modelled as log1p(value).
LOG_VARIABLES = frozenset({"ALP", "ALT", "AST", "Bilirubin", "BUN", "Creatinine", "Glucose", "Lactate",
                           "TroponinI", "TroponinT", "Urine", "WBC"})

#: Public normalisation constants: (mean, std) of f(value) over all in-range observations of set A
#: (static descriptors: over its 4,000 records), f = log1p for LOG_VARIABLES.  Produced by
#: ``reference_statistics(read_set(DIR, "a"))``; tests/data/test_physionet.py recomputes them.
#: MechVent is recorded only as 1 (on the ventilator): it keeps (0, 1), so unobserved reads "off".
REFERENCE: dict[str, tuple[float, float]] = {
    "Albumin": (2.92233, 0.651408), "ALP": (4.51143, 0.630692), "ALT": (4.23346, 1.60338),
    "AST": (4.58515, 1.5388), "Bilirubin": (0.919554, 0.772729), "BUN": (3.09685, 0.687739),
    "Cholesterol": (156.517, 45.9949), "Creatinine": (0.805878, 0.415736), "DiasABP": (59.5603, 12.6476),
    "FiO2": (0.545201, 0.189846), "GCS": (11.3987, 3.97338), "Glucose": (4.88586, 0.361945),
    "HCO3": (23.1157, 4.71017), "HCT": (30.679, 5.01322), "HR": (87.5207, 18.3901),
    "K": (4.13353, 0.679309), "Lactate": (1.22909, 0.484829), "Mg": (2.02791, 0.422124),
    "MAP": (79.7599, 16.8886), "MechVent": (0, 1), "Na": (139.076, 5.19109),
    "NIDiasABP": (58.0118, 15.4286), "NIMAP": (76.8161, 15.5521), "NISysABP": (118.804, 22.738),
    "PaCO2": (40.4765, 9.12242), "PaO2": (150.428, 89.2923), "pH": (7.37461, 0.0773756),
    "Platelets": (190.816, 106.392), "RespRate": (19.7407, 5.48907), "SaO2": (96.6371, 3.40009),
    "SysABP": (119.259, 23.7039), "Temp": (37.0664, 0.876348), "TroponinI": (1.54631, 1.01295),
    "TroponinT": (0.489947, 0.636558), "Urine": (4.24177, 1.13859), "WBC": (2.49707, 0.497723),
    "Weight": (83.7526, 24.4803), "Age": (64.2475, 17.5588), "Gender": (0.561921, 0.496151),
    "Height": (169.678, 10.8623), "ICU=CCU": (0.14425, 0.351343), "ICU=CSRU": (0.2185, 0.413228),
    "ICU=MICU": (0.37025, 0.482872), "ICU=SICU": (0.267, 0.442392),
}


@dataclass(frozen=True)
class RawRecord:
    """One record file, parsed: descriptors and the time-stamped observations (raw units)."""

    record_id: int
    icu_type: ICUType
    static: np.ndarray  # (len(STATIC),) raw Age, Gender, Height, ICU one-hot; NaN where missing
    minutes: np.ndarray  # (n,) int32, minutes since ICU admission
    variable: np.ndarray  # (n,) int16 index into TIME_SERIES
    value: np.ndarray  # (n,) float64, raw units, already without -1 and out-of-range values


@dataclass(frozen=True)
class RawSet:
    """One challenge set (a, b or c): its records sorted by RecordID and their outcomes."""

    name: str
    records: tuple[RawRecord, ...]
    label: np.ndarray  # (N,) int64 in-hospital death
    saps: np.ndarray  # (N,) SAPS-I score from the outcomes file, NaN where -1
    sofa: np.ndarray  # (N,) SOFA score, NaN where -1
    dropped_empty_parameter: int = 0
    cleaned: dict[str, int] = field(default_factory=dict)

    @property
    def icu_type(self) -> np.ndarray:
        return np.array([int(r.icu_type) for r in self.records], dtype=np.int64)

    @property
    def record_ids(self) -> np.ndarray:
        return np.array([r.record_id for r in self.records], dtype=np.int64)


# -- parsing ----------------------------------------------------------------------------------------
_TS_INDEX = {name: i for i, name in enumerate(TIME_SERIES)}
_FILE_NAME = re.compile(r"^(\d+)\.txt$")
_TIMES: dict[str, int] = {}


def _minutes(text: str, where: str) -> int:
    m = _TIMES.get(text)
    if m is None:
        hh, sep, mm = text.partition(":")
        if not (sep and hh.isdigit() and mm.isdigit() and len(mm) == 2 and int(mm) < 60):
            raise DataError(f"{where}: time {text!r} is not HH:MM")
        m = _TIMES[text] = int(hh) * 60 + int(mm)
    return m


def _lines_checked(lines: list[str], source: str) -> tuple[dict[str, float], list[int], list[int], list[float], int]:
    """Line by line, with an error naming the line: the reference parser, and the fallback that
    finds the offending line when :func:`_lines_fast` refuses a file."""
    desc: dict[str, float] = {}
    minutes: list[int] = []
    variables: list[int] = []
    values: list[float] = []
    empty = 0
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != 3:
            raise DataError(f"{source} line {n}: {line!r} does not have the three fields Time,Parameter,Value")
        t, name, raw = parts
        where = f"{source} line {n}"
        if not name:
            empty += 1
            continue
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{where}: value {raw!r} of {name!r} is not a number") from None
        minute = _minutes(t, where)
        if name in DESCRIPTORS and name != "Weight":
            if minute != 0:
                raise DataError(f"{where}: descriptor {name} at {t}; descriptors belong at 00:00")
            if name in desc and desc[name] != value:
                raise DataError(f"{where}: second {name} line ({raw}) disagrees with the first ({desc[name]:g})")
            desc[name] = value
            continue
        idx = _TS_INDEX.get(name)
        if idx is None:
            raise DataError(f"{where}: unknown parameter {name!r}; the challenge defines {list(DESCRIPTORS)} and {list(TIME_SERIES)}")
        if value == -1:
            continue  # missing
        minutes.append(minute)
        variables.append(idx)
        values.append(value)
    return desc, minutes, variables, values, empty


_EMPTY = -100
_CODES = {**_TS_INDEX, **{name: -1 - k for k, name in enumerate(DESCRIPTORS) if name != "Weight"}, "": _EMPTY}
_TIMES.update({f"{h:02d}:{m:02d}": h * 60 + m for h in range(100) for m in range(60)})


def _lines_fast(body: str):
    """The same result as :func:`_lines_checked` from whole-file string and numpy operations
    (3x faster), or None for any file that is not plainly well formed."""
    n_lines = body.count("\n") + 1
    if body.count(",") != 2 * n_lines:
        return None
    parts = body.replace("\n", ",").split(",")
    codes = [_CODES.get(p, -999) for p in parts[1::3]]
    minutes = [_TIMES.get(t, -1) for t in parts[0::3]]
    if -999 in codes or -1 in minutes:
        return None
    try:
        values = np.array(parts[2::3], dtype=np.float64)
    except ValueError:
        return None
    code = np.array(codes, dtype=np.int64)
    minute = np.array(minutes, dtype=np.int64)
    is_desc = (code < 0) & (code != _EMPTY)
    if np.any(minute[is_desc] != 0):
        return None
    desc: dict[str, float] = {}
    for c, v in zip(code[is_desc].tolist(), values[is_desc].tolist()):
        name = DESCRIPTORS[-1 - c]
        if desc.setdefault(name, v) != v:
            return None
    ts = (code >= 0) & (values != -1)
    return desc, minute[ts], code[ts], values[ts], int(np.sum(code == _EMPTY))


def parse_record(text: str, source: str) -> tuple[RawRecord, int, dict[str, int]]:
    """Parse one record file; returns (record, empty-Parameter rows dropped, out-of-range values per variable)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    header, _, body = text.partition("\n")
    if header.strip() != HEADER:
        raise DataError(f"{source}: first line is {header[:60]!r}, expected {HEADER!r}")
    body = body.rstrip("\n")
    fast = _lines_fast(body) if body else None
    if fast is None:
        fast = _lines_checked(text.split("\n"), source)
    desc, minutes, variables, values, empty = fast
    if "RecordID" not in desc:
        raise DataError(f"{source}: no RecordID line at 00:00")
    rid = int(desc["RecordID"])
    if "ICUType" not in desc:
        raise DataError(f"{source}: record {rid} has no ICUType line at 00:00")
    code = desc["ICUType"]
    icu = parse_choice(ICUType, int(code) if code.is_integer() else code, f"{source}: record {rid} ICUType", DataError,
                       choices="1 (CCU), 2 (CSRU), 3 (MICU), 4 (SICU)")
    cleaned: dict[str, int] = {}
    static = np.full(len(STATIC), np.nan)
    for j, name in enumerate(("Age", "Gender", "Height")):
        v = desc.get(name, -1.0)
        if v == -1:
            continue
        lo, hi = RANGES[name]
        if lo <= v <= hi:
            static[j] = v
        else:
            cleaned[name] = cleaned.get(name, 0) + 1
    static[3:] = [1.0 if t is icu else 0.0 for t in ICUType]
    val = np.asarray(values, dtype=np.float64)
    var = np.asarray(variables, dtype=np.int64).astype(np.int16)
    keep = np.ones(len(val), dtype=bool)
    if len(val):
        lo = _LO[var]
        hi = _HI[var]
        keep = (val >= lo) & (val <= hi)
        if not keep.all():
            for i in np.unique(var[~keep]):
                cleaned[TIME_SERIES[i]] = cleaned.get(TIME_SERIES[i], 0) + int(np.sum(var[~keep] == i))
    rec = RawRecord(rid, icu, static, np.asarray(minutes, dtype=np.int32)[keep], var[keep], val[keep])
    return rec, empty, cleaned


_LO = np.array([RANGES[n][0] for n in TIME_SERIES])
_HI = np.array([RANGES[n][1] for n in TIME_SERIES])


def _set_files(root: Path, name: str) -> Iterator[tuple[str, str]]:
    """(source label, text) of every record file of set ``name``, from the archive or the folder."""
    archive, folder = root / f"set-{name}.tar.gz", root / f"set-{name}"
    if archive.is_file():
        try:
            with tarfile.open(archive, mode="r|gz") as tf:  # streaming: one pass, no index, no extraction
                for member in tf:
                    if member.isdir():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    if not member.isfile() or not _FILE_NAME.match(base):
                        raise DataError(f"{archive}: member {member.name!r} is not a record file <RecordID>.txt")
                    fh = tf.extractfile(member)
                    yield f"{archive.name}:{member.name}", fh.read().decode("utf-8")
        except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{archive} cannot be read as a gzip tar archive of record files: {exc}") from None
        return
    if folder.is_dir():
        files = sorted(folder.iterdir())
        for p in files:
            if not p.is_file() or not _FILE_NAME.match(p.name):
                raise DataError(f"{folder}: {p.name!r} is not a record file <RecordID>.txt")
            try:
                yield str(p), p.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{p} is not UTF-8 text: {exc}") from None
        return
    have = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise DataError(f"set {name!r}: neither {archive.name} nor a folder {folder.name}/ in {str(root)!r} (it holds {have[:12]}); "
                    "pass --data DIR with the PhysioNet 2012 files set-a.tar.gz, Outcomes-a.txt, ...")


def read_outcomes(path: Path) -> dict[int, tuple[int, float, float]]:
    """RecordID → (in-hospital death, SAPS-I, SOFA) from an ``Outcomes-X.txt`` file."""
    if not path.is_file():
        raise DataError(f"outcomes file {str(path)!r} does not exist; it ships beside the set's archive")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != OUTCOMES_HEADER:
        raise DataError(f"{path}: first line is {lines[0][:80] if lines else ''!r}, expected {OUTCOMES_HEADER!r}")
    out: dict[int, tuple[int, float, float]] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        try:
            rid, saps, sofa, _, _, death = (float(p) for p in parts)
        except ValueError:
            raise DataError(f"{path} line {n}: {line!r} is not six numbers") from None
        if death not in (0, 1):
            raise DataError(f"{path} line {n}: In-hospital_death is {death:g}; expected 0 or 1")
        if int(rid) in out:
            raise DataError(f"{path} line {n}: RecordID {int(rid)} appears twice")
        out[int(rid)] = (int(death), np.nan if saps < 0 else saps, np.nan if sofa < 0 else sofa)
    return out


def read_set(root: str | Path, name: str, max_records: int | None = None) -> RawSet:
    """Parse set ``name`` (``a``, ``b`` or ``c``) under ``root``; ``max_records`` reads only the first files."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"PhysioNet 2012 folder {str(root)!r} does not exist; pass --data DIR holding set-a.tar.gz, Outcomes-a.txt, ... ({PHYSIONET2012_ORIGIN})")
    outcomes = read_outcomes(root / f"Outcomes-{name}.txt")
    records: list[RawRecord] = []
    empty = 0
    cleaned: dict[str, int] = {}
    seen: set[int] = set()
    for source, text in _set_files(root, name):
        rec, e, c = parse_record(text, source)
        stem = int(_FILE_NAME.match(source.rsplit("/", 1)[-1].rsplit(":", 1)[-1]).group(1))
        if rec.record_id != stem:
            raise DataError(f"{source}: RecordID line says {rec.record_id}, the file name says {stem}")
        if rec.record_id in seen:
            raise DataError(f"{source}: record {rec.record_id} appears twice in set {name!r}")
        seen.add(rec.record_id)
        if rec.record_id not in outcomes:
            raise DataError(f"{source}: record {rec.record_id} has no row in Outcomes-{name}.txt")
        records.append(rec)
        empty += e
        for k, v in c.items():
            cleaned[k] = cleaned.get(k, 0) + v
        if max_records is not None and len(records) >= max_records:
            break
    if not records:
        raise DataError(f"set {name!r} under {str(root)!r} holds no record files")
    records.sort(key=lambda r: r.record_id)
    lab = np.array([outcomes[r.record_id][0] for r in records], dtype=np.int64)
    saps = np.array([outcomes[r.record_id][1] for r in records], dtype=np.float64)
    sofa = np.array([outcomes[r.record_id][2] for r in records], dtype=np.float64)
    return RawSet(name, tuple(records), lab, saps, sofa, empty, dict(sorted(cleaned.items())))


# -- features ---------------------------------------------------------------------------------------
def _transform(values: np.ndarray, variable: np.ndarray) -> np.ndarray:
    out = values.astype(np.float64, copy=True)
    log = _IS_LOG[variable]
    out[log] = np.log1p(out[log])
    return out


_IS_LOG = np.array([n in LOG_VARIABLES for n in TIME_SERIES])


def reference_statistics(raw: RawSet) -> dict[str, tuple[float, float]]:
    """(mean, std) of every feature's transformed in-range observations in ``raw``: how
    :data:`REFERENCE` was made, from set A.  Never called on a site's data at run time."""
    var = np.concatenate([r.variable for r in raw.records])
    val = _transform(np.concatenate([r.value for r in raw.records]), var)
    stats: dict[str, tuple[float, float]] = {}
    for i, name in enumerate(TIME_SERIES):
        x = val[var == i]
        stats[name] = (0.0, 1.0) if name == "MechVent" else (float(x.mean()), float(x.std()))
    static = np.stack([r.static for r in raw.records])
    for j, name in enumerate(STATIC):
        x = static[:, j]
        x = x[~np.isnan(x)]
        stats[name] = (float(x.mean()), float(x.std()))
    return stats


def featurize(raw: RawSet, bins: int = 48, hours: float = 48.0) -> np.ndarray:
    """The ``[N, T, 3V]`` float32 array of :mod:`this module's <insitu.data.physionet>` docstring."""
    if bins < 1:
        raise ConfigError(f"--bins must be at least 1, got {bins}")
    if not (0 < hours <= 48):
        raise ConfigError(f"the observation window must be in (0, 48] hours, got {hours}")
    if not REFERENCE:
        raise ConfigError("physionet.REFERENCE is empty: the public normalisation constants are missing")
    N, T, width = len(raw.records), bins, hours * 60.0 / bins
    mean = np.array([REFERENCE[n][0] for n in FEATURES])
    std = np.array([REFERENCE[n][1] for n in FEATURES])
    counts = np.array([len(r.value) for r in raw.records])
    rec = np.repeat(np.arange(N), counts)
    var = np.concatenate([r.variable for r in raw.records]).astype(np.int64)
    minute = np.concatenate([r.minutes for r in raw.records]).astype(np.float64)
    z = (_transform(np.concatenate([r.value for r in raw.records]), var) - mean[var]) / std[var]
    inside = minute <= hours * 60.0
    b = np.minimum((minute / width).astype(np.int64), T - 1)
    flat = ((rec * T + b) * V + var)[inside]
    total = np.bincount(flat, weights=z[inside], minlength=N * T * V).reshape(N, T, V)
    n_obs = np.bincount(flat, minlength=N * T * V).reshape(N, T, V)
    mask = n_obs > 0
    value = np.where(mask, total / np.maximum(n_obs, 1), 0.0)
    static = np.stack([r.static for r in raw.records])  # N, S
    s0 = len(TIME_SERIES)
    known = ~np.isnan(static)
    value[:, :, s0:] = np.where(known, (np.nan_to_num(static) - mean[s0:]) / std[s0:], 0.0)[:, None, :]
    mask[:, :, s0:] = known[:, None, :]
    delta = np.zeros((N, T, V))
    hours_per_bin = width / 60.0
    for t in range(1, T):
        delta[:, t] = hours_per_bin + np.where(mask[:, t - 1], 0.0, delta[:, t - 1])
    delta[:, :, s0:] = np.where(known[:, None, :], 0.0, delta[:, :, s0:])
    return np.concatenate([value, mask, delta], axis=2).astype(np.float32)


def schema() -> tuple[str, ...]:
    """Column names of the last axis of a record tensor."""
    return tuple(f"{kind}:{n}" for kind in ("value", "mask", "delta") for n in FEATURES)


#: parameters one observation of a served series may name: the descriptors (but RecordID, which a
#: prediction does not need) and the 37 time series
SERIES_PARAMETERS: tuple[str, ...] = tuple(dict.fromkeys((*(d for d in DESCRIPTORS if d != "RecordID"), *TIME_SERIES)))


def featurize_series(rows: Sequence[tuple[str, str, float]], bins: int = 48, source: str = "series") -> tuple[np.ndarray, dict[str, int]]:
    """One patient's observations ``(time "HH:MM", parameter, value)``, the rows of a record file
    without its ``RecordID`` line, as the ``[bins, 3V]`` tensor :func:`featurize` makes of a record,
    through the same parser (quirks, -1 for missing, out-of-range values dropped) and binning.

    Returns the tensor and the out-of-range values dropped per parameter.  A :class:`DataError`
    names the row as ``line N`` with N = row index + 3 (after the header and the record id)."""
    lines = [HEADER, "00:00,RecordID,0"] + [f"{t},{p},{float(v)!r}" for t, p, v in rows]
    rec, _, cleaned = parse_record("\n".join(lines) + "\n", source)
    raw = RawSet(source, (rec,), np.zeros(1, np.int64), np.full(1, np.nan), np.full(1, np.nan))
    return featurize(raw, bins)[0], cleaned


def series_rows(text: str) -> list[tuple[str, str, float]]:
    """The rows of a record file (``Time,Parameter,Value``) as observations for
    :func:`featurize_series` or the gateway's ``/predict``: the RecordID line and empty-parameter rows left out."""
    out: list[tuple[str, str, float]] = []
    header, _, body = text.replace("\r\n", "\n").partition("\n")
    if header.strip() != HEADER:
        raise DataError(f"first line is {header[:60]!r}, expected {HEADER!r}")
    for n, line in enumerate(body.splitlines(), start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != 3:
            raise DataError(f"line {n}: {line[:60]!r} does not have the three fields Time,Parameter,Value")
        if parts[1] in ("RecordID", ""):
            continue
        try:
            out.append((parts[0], parts[1], float(parts[2])))
        except ValueError:
            raise DataError(f"line {n}: value of {parts[1]!r} is not a number") from None
    return out


# -- sites ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cohort:
    """Featurised records of one or more sets, in set then RecordID order."""

    X: np.ndarray  # N, T, 3V float32
    label: np.ndarray
    icu_type: np.ndarray
    record_ids: np.ndarray
    saps: np.ndarray
    sets: tuple[str, ...]
    dropped_empty_parameter: int
    cleaned: dict[str, int]


def load_cohort(root: str | Path, sets: Sequence[str], bins: int = 48, hours: float = 48.0, max_records: int | None = None) -> Cohort:
    raws = [read_set(root, s, max_records) for s in sets]
    cleaned: dict[str, int] = {}
    for r in raws:
        for k, v in r.cleaned.items():
            cleaned[k] = cleaned.get(k, 0) + v
    return Cohort(
        X=np.concatenate([featurize(r, bins, hours) for r in raws]),
        label=np.concatenate([r.label for r in raws]),
        icu_type=np.concatenate([r.icu_type for r in raws]),
        record_ids=np.concatenate([r.record_ids for r in raws]),
        saps=np.concatenate([r.saps for r in raws]),
        sets=tuple(sets),
        dropped_empty_parameter=sum(r.dropped_empty_parameter for r in raws),
        cleaned=dict(sorted(cleaned.items())),
    )


def _stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, validation positions): ``fraction`` of each class, at least one where a class has two."""
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        if fraction > 0 and k == 0 and len(idx) >= 2:
            k = 1
        val.append(idx[:k])
    v = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=int)
    return np.setdiff1d(np.arange(len(labels)), v), v


def _follow(train_labels: list[np.ndarray], labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Split held-out records so each site's share of each class follows its training share."""
    n_sites = len(train_labels)
    parts: list[list[int]] = [[] for _ in range(n_sites)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        share = np.array([np.sum(t == c) for t in train_labels], dtype=float)
        share = share / share.sum() if share.sum() > 0 else np.full(n_sites, 1 / n_sites)
        cuts = np.round(np.cumsum(share) * len(idx)).astype(int)[:-1]
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=int)) for p in parts]


def federate(train: Cohort, test: Cohort, partition: Partition, n_sites: int, seed: int = 0, val_fraction: float = 0.2,
             name: str = "physionet2012") -> FederatedData:
    """Sites from featurised cohorts: ICU types (natural) or an iid / Dirichlet split of the records."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"validation fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    if partition.kind is PartitionKind.NATURAL:
        if n_sites != len(ICUType):
            raise ConfigError(f"the natural PhysioNet partition has {len(ICUType)} sites (ICU types); --sites {n_sites} needs --partition iid or dirichlet:ALPHA")
        names = [t.site for t in ICUType]
        tr_parts = [np.flatnonzero(train.icu_type == int(t)) for t in ICUType]
        te_parts = [np.flatnonzero(test.icu_type == int(t)) for t in ICUType]
    else:
        names = [f"hospital-{i + 1}" for i in range(n_sites)]
        tr_parts = split_indices(train.label, n_sites, partition, rng, min_per_site=10)
        te_parts = _follow([train.label[p] for p in tr_parts], test.label, rng)
    sites = []
    for k, (site, ptr, pte) in enumerate(zip(names, tr_parts, te_parts)):
        if len(ptr) == 0:
            raise DataError(f"site {site} has no training records in sets {list(train.sets)}")
        # an ICU type's validation split depends on its own records and the seed only, so that a
        # deployed site holding those records draws the same split (load_site)
        own = holdout_rng(seed, int(list(ICUType)[k])) if partition.kind is PartitionKind.NATURAL else rng
        fit, val = _stratified_holdout(train.label[ptr], val_fraction, own)
        itr, iva = ptr[fit], ptr[val]
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        sites.append(SiteData(
            site,
            t(train.X[itr]), t(train.label[itr].astype(np.float32)),
            t(test.X[pte]), t(test.label[pte].astype(np.float32)),
            t(train.X[iva]), t(train.label[iva].astype(np.float32)),
        ))
    T = train.X.shape[1]
    info = {
        "partition": str(partition), "train_sets": list(train.sets), "test_sets": list(test.sets),
        "train": int(len(train.label)), "test": int(len(test.label)), "bins": int(T), "val_fraction": val_fraction,
        "dropped_empty_parameter": train.dropped_empty_parameter + test.dropped_empty_parameter,
        "cleaned": {k: train.cleaned.get(k, 0) + test.cleaned.get(k, 0) for k in sorted(set(train.cleaned) | set(test.cleaned))},
    }
    return FederatedData(name, tuple(sites), (T, 3 * V), 2, schema(), info)


def holdout_rng(seed: int, icu_type: int) -> np.random.Generator:
    """The random stream of one ICU type's validation split (the same in simulation and at a deployed site)."""
    return np.random.default_rng([int(seed), int(icu_type)])


def task_shape(bins: int = 48) -> tuple[tuple[int, int], int, tuple[str, ...]]:
    """(input shape, outputs, schema) of the mortality task: what a deployed job's plan declares."""
    if bins < 1:
        raise ConfigError(f"bins must be at least 1, got {bins}")
    return (bins, 3 * V), 1, schema()


def only_icu(raw: RawSet, icu_type: ICUType | None) -> RawSet:
    """The records of one ICU type (all of them for None), outcomes kept aligned."""
    if icu_type is None:
        return raw
    keep = np.flatnonzero(raw.icu_type == int(icu_type))
    return RawSet(raw.name, tuple(raw.records[i] for i in keep), raw.label[keep], raw.saps[keep], raw.sofa[keep],
                  raw.dropped_empty_parameter, raw.cleaned)


#: keys of a deployed site's ``[data]`` table when ``source = "physionet2012"``
SITE_KEYS = ("path", "icu_type", "train_sets", "test_sets", "val_fraction", "split_seed", "bins")


def _sets(value: object, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, str) and re.fullmatch(r"[a-z0-9]{1,16}", v) for v in value)):
        raise ConfigError(f"[data] {key} must be a list of set names such as [\"a\", \"b\"] (the X of set-X/ and "
                          f"Outcomes-X.txt), got {value!r}")
    return tuple(value)


def load_site(root: str | Path, name: str = "site", *, icu_type: ICUType | int | str | None = None,
              train_sets: Sequence[str] = ("a", "b"), test_sets: Sequence[str] = ("c",), val_fraction: float = 0.2,
              seed: int = 0, bins: int = 48) -> SiteData:
    """One hospital's records in the challenge's own format, as a deployed site holds them.

    ``root`` holds, for every set named in ``train_sets`` and ``test_sets``, a folder ``set-X/`` of
    ``<RecordID>.txt`` files (or the archive ``set-X.tar.gz``) and ``Outcomes-X.txt``: the layout
    PhysioNet ships, restricted to this hospital's stays (a hospital's own export), or the shipped
    archives themselves with ``icu_type`` naming the unit whose records are this site's.  The
    validation split is drawn as :func:`federate` draws it for that ICU type, so a deployed ICU
    holds exactly the records ``insitu simulate --dataset physionet2012`` gives its site.
    """
    if isinstance(icu_type, str) and not isinstance(icu_type, ICUType):
        named = {t.site: t for t in ICUType}
        if icu_type.lower() not in named:
            raise ConfigError(f"[data] icu_type: unknown value {icu_type[:40]!r}; choose one of {list(named)} (or 1-4)")
        icu = named[icu_type.lower()]
    else:
        icu = None if icu_type is None else parse_choice(ICUType, icu_type, "[data] icu_type", ConfigError,
                                                         choices="1 (CCU), 2 (CSRU), 3 (MICU), 4 (SICU)")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"[data] val_fraction must be in [0, 1), got {val_fraction}")
    overlap = set(train_sets) & set(test_sets)
    if overlap:
        raise ConfigError(f"[data] sets {sorted(overlap)} are both training and test sets")
    train = [only_icu(read_set(root, s), icu) for s in train_sets]
    test = [only_icu(read_set(root, s), icu) for s in test_sets]
    types = sorted({int(t) for r in train for t in r.icu_type})
    if not types:
        raise DataError(f"{root}: no training records{f' of ICU type {icu.name}' if icu else ''} in sets {list(train_sets)}")
    train = [r for r in train if r.records]  # a set may hold none of this ICU type's stays
    test = [r for r in test if r.records]
    X = np.concatenate([featurize(r, bins) for r in train])
    y = np.concatenate([r.label for r in train])
    # one ICU type: its own stream (as in simulation); a mixed hospital: stream 0
    fit, val = _stratified_holdout(y, val_fraction, holdout_rng(seed, types[0] if len(types) == 1 else 0))
    Xte = np.concatenate([featurize(r, bins) for r in test]) if test else np.zeros((0, bins, 3 * V), np.float32)
    yte = np.concatenate([r.label for r in test]) if test else np.zeros(0, np.int64)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return SiteData(name, t(X[fit]), t(y[fit].astype(np.float32)), t(Xte), t(yte.astype(np.float32)),
                    t(X[val]), t(y[val].astype(np.float32)))


def site_from_config(data: Mapping[str, object], name: str = "site") -> SiteData:
    """A deployed site's ``[data]`` table (``source = "physionet2012"``) → its records (:func:`load_site`)."""
    unknown = sorted(set(data) - set(SITE_KEYS))
    if unknown:
        raise ConfigError(f"[data] source = \"physionet2012\" has unknown key(s) {unknown}; known: {list(SITE_KEYS)}")
    if "path" not in data:
        raise ConfigError("[data] source = \"physionet2012\" needs path = DIR (set-a/ or set-a.tar.gz with Outcomes-a.txt, ...)")
    ints = {}
    for key, default in (("split_seed", 0), ("bins", 48)):
        v = data.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"[data] {key} must be a non-negative integer, got {v!r}")
        ints[key] = v
    vf = data.get("val_fraction", 0.2)
    if isinstance(vf, bool) or not isinstance(vf, (int, float)):
        raise ConfigError(f"[data] val_fraction must be a number in [0, 1), got {vf!r}")
    return load_site(str(data["path"]), name, icu_type=data.get("icu_type"),  # type: ignore[arg-type]
                     train_sets=_sets(data.get("train_sets", ["a", "b"]), "train_sets"),
                     test_sets=_sets(data.get("test_sets", ["c"]), "test_sets"),
                     val_fraction=float(vf), seed=ints["split_seed"], bins=ints["bins"])


def load_physionet(root: str | Path, partition: Partition | str = "natural", n_sites: int = 4, seed: int = 0, *,
                   bins: int = 48, hours: float = 48.0, val_fraction: float = 0.2,
                   train_sets: Sequence[str] = ("a", "b"), test_sets: Sequence[str] = ("c",),
                   max_records: int | None = None) -> FederatedData:
    """The challenge's records as federated sites (see the module docstring).

    ``max_records`` reads only the first files of each set (small, fast configurations for tests).
    """
    part = partition if isinstance(partition, Partition) else Partition.parse(partition)
    overlap = set(train_sets) & set(test_sets)
    if overlap:
        raise ConfigError(f"sets {sorted(overlap)} are both training and test sets")
    train = load_cohort(root, train_sets, bins, hours, max_records)
    test = load_cohort(root, test_sets, bins, hours, max_records)
    return federate(train, test, part, n_sites, seed, val_fraction)


__all__ = [
    "Cohort", "FEATURES", "ICUType", "SERIES_PARAMETERS", "SITE_KEYS", "featurize_series", "holdout_rng", "series_rows", "load_site", "only_icu", "site_from_config", "task_shape", "LOG_VARIABLES", "RANGES", "REFERENCE", "RawRecord", "RawSet", "STATIC",
    "TIME_SERIES", "featurize", "federate", "load_cohort", "load_physionet", "parse_record", "read_outcomes",
    "read_set", "reference_statistics", "schema",
]

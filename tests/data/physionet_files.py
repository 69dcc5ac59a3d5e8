"""Small PhysioNet-2012-format files written by tests (the raw Time,Parameter,Value format)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np


def record_text(rid: int, icu: int, rows: list[str], *, age: str = "70", height: str = "-1", weight: str = "80") -> str:
    head = ["Time,Parameter,Value", f"00:00,RecordID,{rid}", f"00:00,Age,{age}", "00:00,Gender,1",
            f"00:00,Height,{height}", f"00:00,ICUType,{icu}", f"00:00,Weight,{weight}"]
    return "\n".join(head + rows) + "\n"


QUIRKY = {
    # two observations of HR in hour 0 (averaged), one in hour 2, HR 0 (impossible: dropped),
    # pH 735 (a unit slip: dropped), GCS at exactly 48:00 (the last bin), -1 (missing) for HR
    1001: record_text(1001, 3, ["00:10,HR,80", "00:50,HR,100", "02:05,HR,90", "03:00,HR,0", "04:00,pH,735",
                            "05:00,HR,-1", "48:00,GCS,9", "07:00,,3.1"], height="170"),
    1002: record_text(1002, 1, [], weight="-1"),  # descriptor-only record
    1003: record_text(1003, 2, ["00:00,Weight,81", "01:00,HR,70"], weight="79"),  # two Weight lines at 00:00
}
OUTCOMES = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n1001,14,5,9,-1,0\n1002,-1,2,5,-1,1\n1003,9,-1,7,30,0\n"


def write_set(root: Path, name: str, records: dict[int, str], *, archive: bool, outcomes: str = OUTCOMES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"Outcomes-{name}.txt").write_text(outcomes)
    if archive:
        with tarfile.open(root / f"set-{name}.tar.gz", "w:gz") as tf:
            for rid, text in records.items():
                blob = text.encode()
                info = tarfile.TarInfo(f"set-{name}/{rid}.txt")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    else:
        (root / f"set-{name}").mkdir()
        for rid, text in records.items():
            (root / f"set-{name}" / f"{rid}.txt").write_text(text)
    return root


def write_cohort(root: Path, sets: tuple[str, ...] = ("a", "b", "c"), per_set: int = 200, seed: int = 0) -> Path:
    """``per_set`` synthetic records per set, ICU types in turn, about 20 % deaths; dying patients
    have a higher heart rate and lower GCS, so a model can learn something."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(sets):
        recs, outs = {}, ["RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"]
        for i in range(per_set):
            rid = 200000 + 10000 * k + i
            died = int(rng.random() < 0.2)
            rows = []
            for h in range(0, 48, 3):
                rows.append(f"{h:02d}:{rng.integers(0, 60):02d},HR,{rng.normal(85 + 25 * died, 10):.0f}")
                if h % 12 == 0:
                    rows.append(f"{h:02d}:30,GCS,{int(np.clip(rng.normal(13 - 5 * died, 2), 3, 15))}")
            recs[rid] = record_text(rid, 1 + i % 4, rows, age=str(int(rng.integers(20, 90))))
            outs.append(f"{rid},{int(rng.integers(5, 25))},3,5,-1,{died}")
        write_set(root, name, recs, archive=True, outcomes="\n".join(outs) + "\n")
    return root

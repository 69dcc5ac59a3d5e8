"""docs/tutorials/fhir.md runs end to end: its TOML block becomes schema.toml and its Python blocks
run in order in one namespace, in a scratch folder (FHIR NDJSON → source → SiteData → FedAvg)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "tutorials" / "fhir.md"


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)\n(.*?)^```$", text, re.S | re.M)]


@pytest.mark.slow
def test_fhir_tutorial_runs_end_to_end(tmp_path, monkeypatch, capsys):
    blocks = _blocks(DOC.read_text())
    kinds = [k for k, _ in blocks]
    assert kinds.count("toml") == 1 and kinds.count("python") >= 5, kinds
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "tutorial"}
    for i, (kind, code) in enumerate(blocks):
        if kind == "toml":
            (tmp_path / "schema.toml").write_text(code)
        elif kind == "python":
            exec(compile(code, f"{DOC.name}[block {i}]", "exec"), ns)
    out = capsys.readouterr().out
    assert "federated" in out and "local-only" in out
    # what the tutorial claims holds: the federated model is good, and the hospitals differ
    assert ns["fed_acc"] > 0.6
    assert len({s.n_train for s in ns["data"].sites}) >= 1 and len(ns["data"].sites) == 3
    assert ns["server"].display.startswith("https://fhir.hospital-a.example")

"""docs/tutorials/own-model.md says what holds: its specification is valid and has the size it
states, the vocabulary table lists every layer and key, the error it quotes is the one a site gives,
its job.toml gives a plan carrying the layers, the sites it shows accept or refuse as it says, and its
simulate command runs."""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from insitu.coordinator.jobs import JobSpec, inline_model_spec
from insitu.errors import ConfigError, PolicyViolation
from insitu.learn.spec import _KEYS, LayerType, ModelSpec, build_from_spec
from insitu.site.policy import check_model_size
from insitu.site.review import plan_row

DOC = Path(__file__).resolve().parents[2] / "docs" / "tutorials" / "own-model.md"


def _blocks(kind: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"^```{kind}\n(.*?)^```$", DOC.read_text(), re.S | re.M)]


@pytest.fixture
def job(tmp_path):
    (tmp_path / "my_model.json").write_text(_blocks("json")[0])
    (tmp_path / "job.toml").write_text(_blocks("toml")[0])
    return JobSpec.from_dict(inline_model_spec(tomllib.loads((tmp_path / "job.toml").read_text()), tmp_path))


def _stated_count() -> int:
    return int(re.search(r"this model has \*\*([\d,]+) parameters\*\*", DOC.read_text()).group(1).replace(",", ""))


def test_the_specification_and_its_stated_size(job):
    spec = ModelSpec.parse(_blocks("json")[0])
    assert spec.count_params((1, 28, 28), 1) == _stated_count() == job.plan.task.param_count()
    assert job.plan.task.model_spec == spec and job.plan.task.model == "spec"
    assert plan_row(job.plan.to_meta())["model"] == f"spec, {_stated_count():,} parameters"
    assert f"`spec, {_stated_count():,} parameters`" in DOC.read_text()


def test_the_vocabulary_table_lists_every_layer_and_key():
    text = DOC.read_text()
    rows = {cell: line for line in text.splitlines() if line.startswith("| `") for cell in re.findall(r"`(\w+)`", line.split("|")[1])}
    assert set(rows) == {t.value for t in LayerType}
    for t, keys in _KEYS.items():
        assert all(f"`{k}`" in rows[t.value] for k in keys), t


def test_the_quoted_error_is_the_one_a_site_gives():
    layers = json.loads(_blocks("json")[0])["layers"]
    without_flatten = {"layers": [layer for layer in layers if layer["type"] != "flatten"]}
    with pytest.raises(ConfigError) as exc:
        build_from_spec(without_flatten, (1, 28, 28), 1)
    quoted = re.search(r"`(model spec layer 9 \(linear\).*?)`", DOC.read_text(), re.S).group(1)
    assert " ".join(quoted.split()) == str(exc.value)


def test_the_sites_shown_accept_and_refuse_as_stated(job):
    site = tomllib.loads(_blocks("toml")[1])
    assert site["data"]["source"] == "records" and site["policy"]["max_params"] == 200_000
    assert check_model_size(job.plan, site["policy"]["max_params"]) == _stated_count()
    with pytest.raises(PolicyViolation) as exc:
        check_model_size(job.plan, 100_000)
    quoted = re.search(r"`(its model specification has .*?)`", DOC.read_text(), re.S).group(1)
    assert " ".join(quoted.split()) in str(exc.value)
    # the hash covers the layers: one size changed, another plan
    other = json.loads(_blocks("json")[0])
    other["layers"][-3]["out_features"] = 65
    assert JobSpec.from_dict({**tomllib.loads(_blocks("toml")[0]), "model_spec": other}).plan.content_hash() != job.plan.content_hash()


@pytest.mark.slow
def test_the_simulate_command_runs(tmp_path, pneumonia_npz, monkeypatch):
    from insitu.cli import main

    (tmp_path / "my_model.json").write_text(_blocks("json")[0])
    monkeypatch.chdir(tmp_path)
    line = next(line for line in _blocks("bash")[0].splitlines() if line.startswith("insitu simulate"))
    args = shlex.split(line)[1:]
    args[args.index("--data") + 1] = str(pneumonia_npz)
    args[args.index("--rounds") + 1] = "1"
    try:
        main([*args, "--local-steps", "2", "--batch-size", "16", "--no-baselines", "--out", "run"])
    except SystemExit as exc:
        assert not exc.code
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["plan"]["task"]["model_spec"] == ModelSpec.parse(_blocks("json")[0]).to_meta()
    assert summary["final"]["rounds_completed"] == 1

"""The public Python API: ``insitu.__all__`` is what the package exports, every public class and
function in it is documented, ``import insitu`` stays light, and one's own data runs through
``simulate`` and ``build_federation`` exactly as the README shows."""
from __future__ import annotations

import inspect
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import insitu
from insitu.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "guide" / "python.md"
HEART_SITES = ("cleveland", "hungary", "switzerland", "va-long-beach")


def test_all_is_exactly_what_the_package_exports():
    assert dir(insitu) == sorted(insitu.__all__) and len(insitu.__all__) == len(set(insitu.__all__))
    star: dict = {}
    exec("from insitu import *", star)
    assert set(star) - {"__builtins__"} == set(insitu.__all__)
    for name in insitu.__all__:
        assert getattr(insitu, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Site'"):
        insitu.Site  # noqa: B018  (the engine's Site is built by build_site, not exported)


def test_names_are_the_library_objects():
    from insitu.apps.simulate import simulate
    from insitu.builder import build_federation
    from insitu.plan import Plan

    assert insitu.simulate is simulate and insitu.build_federation is build_federation and insitu.Plan is Plan
    assert insitu.errors.InsituError.__module__ == "insitu.errors"


def _own_doc(obj) -> str:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    return inspect.cleandoc(doc or "")


@pytest.mark.parametrize("name", [n for n in insitu.__all__ if n not in ("__version__", "errors")])
def test_every_public_class_and_function_has_a_real_docstring(name):
    obj = getattr(insitu, name)
    doc = _own_doc(obj)
    # a dataclass without a docstring gets its signature, "Plan(task: ..., ...)": that is not documentation
    assert doc and not doc.startswith(f"{obj.__name__}("), f"{name} has no docstring of its own"
    assert len(doc.split()) >= 8, f"{name}'s docstring says too little: {doc!r}"


def test_import_insitu_does_not_import_torch():
    code = "import sys, insitu; insitu.__all__; dir(insitu); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False", out.stderr


# -- one's own data ------------------------------------------------------------------------------
def test_own_data_runs_the_same_engine_as_the_built_in_heart_data():
    """The heart data passed as one's own FederatedData gives the built-in run's per-site
    accuracies exactly (same plan, initial model and site secrets): data= only swaps the loader."""
    from insitu.data.heart import load_heart

    secrets = {n: bytes([i + 1]) * 32 for i, n in enumerate(HEART_SITES)}
    # normalize site: load_heart() hands over site-scaled records (the built-in default scales with DP moments)
    opts = dict(rounds=2, local_steps=3, strategy="fedprox", mu=0.1, normalize="site", write=False, baselines=False, site_secrets=secrets)
    built_in = insitu.simulate(**opts)
    own = insitu.simulate(data=load_heart(), **opts)
    assert own["final"]["site_accuracy"] == built_in["final"]["site_accuracy"]
    assert own["plan_hash"] == built_in["plan_hash"]
    assert own["config"]["dataset"] == "heart" and own["config"]["sites"] == 4


def _site(name: str, n: int = 20, d: int = 3, **changes) -> "insitu.SiteData":
    g = torch.Generator().manual_seed(len(name))
    X = torch.randn(n, d, generator=g)
    y = (X[:, 0] > 0).float()
    return replace(insitu.SiteData(name, X[:15], y[:15], X[15:], y[15:]), **changes)


def _fd(*sites, **kw) -> "insitu.FederatedData":
    return insitu.FederatedData("toy", tuple(sites), kw.pop("input_shape", (3,)), kw.pop("num_classes", 2), ("a", "b", "c"))


@pytest.mark.parametrize("data, error, needle", [
    (_fd(), DataError, "has no sites"),
    (_fd(_site("a"), _site("a")), DataError, "names a site twice"),
    (_fd(_site("a"), input_shape=(4,)), DataError, "site 'a': X_train has records of shape (3,), the data declares (4,)"),
    (_fd(_site("a", X_test=torch.zeros(5, 3, dtype=torch.float64))), DataError, "X_test must be float32"),
    (_fd(_site("a", y_train=torch.full((15,), 2.0))), DataError, "y_train must hold class indices 0..1"),
    (_fd(_site("a", y_train=torch.zeros(14))), DataError, "one label per record (15)"),
    (_fd(_site("a", X_train=torch.full((15, 3), float("nan")))), DataError, "NaN"),
    (_fd(_site("a"), num_classes=1), DataError, "num_classes must be an integer >= 2"),
    ({"a": 1}, ConfigError, "data must be a path (str) or an insitu.FederatedData, got dict"),
])
def test_bad_own_data_is_refused_naming_the_site_and_the_problem(data, error, needle):
    with pytest.raises(error) as exc:
        insitu.simulate(data=data, rounds=1, write=False, baselines=False)
    assert needle in str(exc.value)


def test_options_that_own_data_replaces_are_refused():
    with pytest.raises(ConfigError, match="sites, partition cannot be combined with your own FederatedData"):
        insitu.simulate(data=_fd(_site("a"), _site("b")), sites=2, partition="iid", rounds=1, write=False)


# -- the README's example ------------------------------------------------------------------------
def _readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", API_PAGE.read_text(), re.S | re.M)


@pytest.mark.slow
def test_readme_python_api_example_runs(capsys):
    blocks = _readme_python_blocks()
    assert len(blocks) == 2
    ns: dict = {"__name__": "readme"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/guide/python.md[block {i}]", "exec"), ns)
    out = capsys.readouterr().out
    assert "federated" in out and "local-only" in out
    summary, scores = ns["summary"], ns["scores"]
    # what the example shows holds: the federation learns the task at every hospital, under secure aggregation
    assert summary["plan"]["protection"]["kind"] == "secagg" and summary["plan"]["strategy"]["mu"] == 0.01
    assert summary["final"]["mean_site_accuracy"] > 0.75
    assert set(scores) == {"north", "south", "east"} and np.mean([s["accuracy"] for s in scores.values()]) > 0.75

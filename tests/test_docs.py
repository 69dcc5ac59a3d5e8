"""The documentation site: it builds with broken links and anchors as errors, and the commands it shows exist."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _command_paths() -> set[tuple[str, ...]]:
    from insitu.cli import app

    paths: set[tuple[str, ...]] = set()

    def walk(cmd, path):
        paths.add(tuple(path))
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_every_insitu_command_shown_in_the_docs_exists():
    known = _command_paths()
    groups = {p[0] for p in known if len(p) == 2}
    shown = []
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        code = re.findall(r"```.*?```", text, flags=re.S) + re.findall(r"`[^`\n]+`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in "\n".join(code).splitlines():
            for m in re.finditer(r"(?:^|[`$(]|\s)insitu ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", line):
                words = (m.group(1),) + ((m.group(2),) if m.group(1) in groups and m.group(2) else ())
                shown.append((page.name, words))
    assert len(shown) > 20
    missing = [(page, " ".join(w)) for page, w in shown if w not in known]
    assert not missing, f"the docs show commands that do not exist: {missing}"


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    try:
        import mkdocs  # noqa: F401
        import material  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but mkdocs / mkdocs-material are not installed (requirements.lock pins them)")
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install -e .[docs])")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "insitu job model" in cli and "insitu site console" in cli  # generated from the code
    conf = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text()
    assert "approval_timeout" in conf and "[dashboard]" in conf

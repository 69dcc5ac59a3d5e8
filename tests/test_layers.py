"""Each package imports downward only: a walk over every import in src/insitu (lazy ones included).

    0  errors, strictjson                                  (leaves)
    1  data, learn, privacy, deid, audit                   (records, models, accounting)
    2  federation                                          (the round engine)
    3  secure, compress, net                               (protections and codecs that plug into it; the channel)
    4  plan, builder                                       (the one plan, the one builder)
    5  site, coordinator, gateway, attacks, report, apps,  (applications)
       the CLIs, cross-device mode and model export
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "insitu"

LAYERS: list[tuple[str, int]] = [
    # most specific first
    ("insitu.compress.crossdevice", 5), ("insitu.compress.export", 5), ("insitu.compress.model", 5),
    ("insitu.privacy.cli", 5), ("insitu.compress.cli", 5), ("insitu.audit.cli", 5), ("insitu.deid.cli", 5),
    ("insitu.net.cli", 5), ("insitu.net.sandbox", 5), ("insitu.net.proc", 5),
    ("insitu.errors", 0), ("insitu.strictjson", 0), ("insitu.clitools", 0),
    ("insitu.data", 1), ("insitu.learn", 1), ("insitu.privacy", 1), ("insitu.deid", 1), ("insitu.audit", 1),
    ("insitu.federation", 2),
    ("insitu.secure", 3), ("insitu.compress", 3), ("insitu.net", 3),
    ("insitu.plan", 4), ("insitu.builder", 4),
    ("insitu.site", 5), ("insitu.coordinator", 5), ("insitu.gateway", 5), ("insitu.attacks", 5), ("insitu.report", 5),
    ("insitu.apps", 5), ("insitu.cli", 5), ("insitu.cli_simulate", 5), ("insitu.kit", 5), ("insitu.__main__", 5),
    ("insitu", 5),  # the package's own namespace re-exports the public API lazily
]


def layer(module: str) -> int:
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    raise AssertionError(f"{module} has no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, name: str) -> set[str]:
    out: set[str] = set()
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("insitu"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("insitu"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names if (SRC.parent / f"{mod}.{a.name}".replace(".", "/")).exists())
    return out


def test_every_import_goes_downward():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        name = module_name(path)
        mine = layer(name)
        for target in imports(path, name):
            if target == "insitu" or name == "insitu":
                continue
            if layer(target) > mine:
                upward.append(f"{name} (layer {mine}) imports {target} (layer {layer(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_engine_imports_no_application():
    apps = ("insitu.report", "insitu.attacks", "insitu.apps", "insitu.compress", "insitu.secure", "insitu.gateway",
            "insitu.coordinator", "insitu.site", "insitu.deid", "insitu.plan", "insitu.builder", "insitu.cli")
    bad = [(module_name(p), t) for p in sorted((SRC / "federation").rglob("*.py")) for t in imports(p, module_name(p))
           if t.startswith(apps)]
    assert not bad, bad

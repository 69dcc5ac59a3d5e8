"""mkdocs hooks: the reference pages are generated from the code, so they cannot drift from it.

* ``<!-- insitu:cli -->`` becomes every ``insitu`` command with its help and options, read from
  the typer application;
* ``<!-- insitu:config NAME -->`` becomes the commented template ``insitu kit`` writes for NAME
  (coordinator, site, operator, job, gateway).
"""
from __future__ import annotations

import re


def _cli_reference() -> str:
    import typer

    from insitu.cli import app

    root = typer.main.get_command(app)
    out: list[str] = []

    def walk(cmd, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None) or {}
        if path:
            out.append(f"{'#' * min(2 + len(path) - 1, 4)} `insitu {' '.join(path)}`\n")
            doc = (cmd.help or "").strip()
            if doc:
                out.append(doc.replace("\n\n", "\n\n") + "\n")
            rows = []
            for p in cmd.params:
                if getattr(p, "hidden", False):
                    continue
                if p.param_type_name == "argument":
                    rows.append((p.name.upper(), "argument", getattr(p, "help", "") or ""))
                else:
                    names = ", ".join(f"`{o}`" for o in (*p.opts, *p.secondary_opts))
                    default = "" if p.required or p.is_flag or p.default in (None, (), []) else f" (default: `{p.default}`)"
                    rows.append((names, "required" if p.required else "option", (p.help or "") + default))
            if rows:
                out.append("| name | kind | what |\n| --- | --- | --- |")
                for name, kind, what in rows:
                    out.append(f"| {name} | {kind} | {what.replace('|', '/')} |")
                out.append("")
        for name in sorted(subs):
            walk(subs[name], [*path, name])

    walk(root, [])
    return "\n".join(out)


def _config(name: str) -> str:
    from insitu import kit

    text = {
        "coordinator": kit.COORDINATOR_TOML.format(port=8443, listen="0.0.0.0", host="coord.example.org", dashboard_port=8445),
        "operator": kit.OPERATOR_TOML.format(coordinator="coord.example.org:8443", name="ops"),
        "site": kit.SITE_TOML.format(coordinator="coord.example.org:8443", name="cleveland", data=kit.HEART_DATA.format(name="cleveland")),
        "job": kit.JOB_TOML.format(sites='"cleveland", "hungary"', min_sites=2),
        "gateway": kit.GATEWAY_TOML.format(host="127.0.0.1", port=8444, name="gateway"),
    }[name]
    return f"```toml\n{text}```\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs hook signature)
    if "<!-- insitu:cli -->" in markdown:
        markdown = markdown.replace("<!-- insitu:cli -->", _cli_reference())
    return re.sub(r"<!-- insitu:config (\w+) -->", lambda m: _config(m.group(1)), markdown)

"""Taking a trained model out of the coordinator: ``insitu job model NAME --out DIR``.

The coordinator keeps every model version in its SQLite store.  :func:`model_reply` answers
the operator request ``model`` with the newest version's parameters (as a tensor on the
operator channel) and a summary in the format ``insitu simulate`` writes, and
:func:`write_run_dir` lays the answer out as a run directory::

    DIR/model.npz      params: the flat float32 parameter vector
    DIR/task.json      the model and data part of the plan (what export and the gateway rebuild)
    DIR/plan.json      the whole plan (its content hash is what the sites approved)
    DIR/summary.json   config, sites, final accuracy, rounds, ε per site (DP jobs), provenance
    DIR/rounds.jsonl   one line per round attempt, as the coordinator recorded it

so that ``insitu export DIR`` and ``insitu gateway serve`` (``[model] run_dir = DIR``) take it
unchanged.  The writer checks the plan against the job's hash, the task against the plan and the
parameters against the coordinator's SHA-256 before anything is renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from insitu.errors import ConfigError, ProtocolError

#: the summary's ``source`` for a model taken from a deployment (simulate writes no source).
SOURCE = "coordinator"


def params_digest(params: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(params, dtype=np.float32).tobytes()).hexdigest()


def model_summary(job: Mapping[str, Any], spec: Mapping[str, Any], rounds: list[Mapping[str, Any]], version: int, model_round: int,
                  params: np.ndarray, site_info: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``summary.json`` of a deployed job's newest model, from what the coordinator recorded.

    ``job`` is the job row (``JobRow.public()``), ``spec`` its stored job description, ``rounds``
    the store's round records and ``site_info`` what each connected site said in its hello."""
    from insitu.coordinator.jobs import DEPLOYMENT_FIELDS, JobSpec

    plan = JobSpec.from_dict(spec).plan
    applied = [r for r in rounds if r["status"] == "applied"]
    joined: dict[str, int] = {}
    for r in applied:
        for s in r["participants"]:
            joined[s] = joined.get(s, 0) + 1
    sites = {s: {"rounds_joined": n, **{k: v for k, v in (site_info.get(s) or {}).items() if k in ("n_train", "n_test")}}
             for s, n in sorted(joined.items())}
    if job.get("status") == "done" and job.get("final") and version == job["final"].get("selected_version", job.get("rounds_applied")):
        ev = dict(job["final"])
    else:  # a running (or stopped) job: the evaluation of the newest applied round, if it was scored
        ev = next((dict(r["evaluation"]) for r in reversed(applied) if r.get("evaluation")), {})
    final: dict[str, Any] = {
        "mean_site_accuracy": ev.get("mean_site_accuracy"),
        "pooled_accuracy": ev.get("pooled_accuracy"),
        "site_accuracy": ev.get("site_accuracy", {}),
        "rounds_completed": version,
        "rounds_aborted": sum(1 for r in rounds if r["status"] in ("aborted", "interrupted")),
        "selected_round": model_round,
    }
    if isinstance(ev.get("clinical"), dict):  # the decision threshold chosen on the sites' validation splits
        final["clinical"] = ev["clinical"]
    eps: dict[str, float] = {}
    for r in applied:
        for s, e in (r.get("epsilon") or {}).items():
            eps[s] = max(eps.get(s, 0.0), float(e))
    if eps:  # each site's own ε (its own accountant, its own ledger); the card shows the largest
        deltas = [float(i["delta"]) for s, i in site_info.items() if s in eps and isinstance(i.get("delta"), (int, float))]
        final.update({"epsilon": max(eps.values()), "delta": max(deltas) if deltas else None, "epsilon_per_site": eps})
    # the job's plan options, named as `insitu simulate` names them: `insitu export` rebuilds the
    # embedded heart data (or takes --data) for its accuracy check from these
    config: dict[str, Any] = {"dataset": "heart", "strategy": plan.strategy.name.value,
                              **{k: v for k, v in spec.items() if k not in DEPLOYMENT_FIELDS and k != "task"}}
    return {
        "source": SOURCE,
        "job": job["id"],
        "job_status": job.get("status"),
        "submitted_by": job.get("submitted_by"),
        "model_version": version,
        "config": config,
        "plan": plan.to_meta(),
        "plan_hash": job["task_hash"],  # the job store keeps the approved plan's hash in this column
        "task": plan.task.to_meta(),
        "params_sha256": params_digest(params),
        "sites": sites,
        "final": final,
    }


def model_reply(store: Any, job_id: str, site_info: Mapping[str, Mapping[str, Any]]) -> Any:
    """The operator request ``model``: the newest model of ``job_id`` and its summary."""
    from insitu.net.server import OperatorReply

    row = store.job(job_id)
    latest = store.latest_model(row.id)
    if latest is None:
        raise ConfigError(f"job {row.id!r} has no model yet ({row.status.value}, no round applied); try again after its first round")
    chosen = (row.final or {}).get("selected_version")
    if isinstance(chosen, int) and chosen != latest[0]:  # the plan selected a round on the sites' validation splits
        latest = store.model(row.id, chosen)
    version, model_round, params, _ = latest
    rounds = store.rounds(row.id)
    summary = model_summary(row.public(), row.spec, rounds, version, model_round, params, site_info)
    return OperatorReply({"summary": summary, "rounds": rounds}, {"params": np.asarray(params, dtype=np.float32)})


def write_run_dir(out: str | Path, result: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Path:
    """Write the answer of :func:`model_reply` as a run directory (atomically: ``DIR.partial``, then renamed).

    Refuses an existing ``out``, a task that does not hash to the job's task hash and parameters
    whose SHA-256 differs from the coordinator's."""
    from insitu.plan import Plan

    from insitu.clitools import check_new_dir

    out = check_new_dir(out)
    try:
        summary = dict(result["summary"])
        params = np.asarray(tensors["params"], dtype=np.float32)
        plan = Plan.from_meta(dict(summary["plan"]))
    except (KeyError, TypeError, ConfigError) as exc:
        raise ProtocolError(f"the coordinator's model answer lacks or garbles {exc}") from None
    task = plan.task
    if plan.content_hash() != summary.get("plan_hash"):
        raise ProtocolError(f"the model's plan hashes to {plan.content_hash()[:12]}, not the job's {str(summary.get('plan_hash'))[:12]}")
    if summary.get("task") != task.to_meta():
        raise ProtocolError("the model's task is not its plan's task; nothing written")
    if params.ndim != 1 or params_digest(params) != summary.get("params_sha256"):
        raise ProtocolError("the model parameters received do not match the coordinator's SHA-256; nothing written")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        np.savez(tmp / "model.npz", params=params)
        (tmp / "task.json").write_text(json.dumps(task.to_meta(), indent=2))
        (tmp / "plan.json").write_text(json.dumps(plan.to_meta(), indent=2))
        summary["run_dir"] = str(out)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        with (tmp / "rounds.jsonl").open("w") as fh:
            for r in result.get("rounds", []):
                fh.write(json.dumps(r) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["model_reply", "model_summary", "write_run_dir", "params_digest"]

"""``insitu coordinator serve``: the TLS port, the job queue and the round loop, with SQLite state.

The round loop is the same :class:`~insitu.federation.coordinator.Coordinator`
that ``insitu simulate`` drives; here its transport is the network and every
round is reserved, then applied (or aborted) in the job store.  Killed and
restarted, the service reloads the newest model version and the strategy's
state, marks the interrupted round, and goes on with a fresh round number.

``coordinator.toml`` (paths relative to the file)::

    [coordinator]
    host = "127.0.0.1"
    port = 8443                  # 0: any free port, written to port_file
    port_file = "coordinator.port"
    cert = "pki/coordinator/coordinator.pem"
    key = "pki/coordinator/coordinator.key"
    ca = "pki/ca/ca.pem"
    crl = "pki/ca/crl.pem"        # the CA's published revocation list
    db = "coordinator.db"
    heartbeat = 2.0
    dead_after = 10.0
"""
from __future__ import annotations

import enum
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from insitu.builder import build_coordinator, build_protocol, initial_params
from insitu.coordinator.jobs import JobSpec
from insitu.coordinator.store import JobRow, JobStatus, JobStore, RoundStatus
from insitu.errors import AuthError, ConfigError, InsituError, RoundAborted
from insitu.federation.coordinator import Coordinator
from insitu.federation.protocol import AggregateResult, AggregationProtocol, RoundPlan
from insitu.net.pki import Credentials, Identity, Role
from insitu.net.server import CoordinatorServer, NetConfig

log = logging.getLogger("insitu.coordinator")
#: the longest a finished job waits for a site that took part to reconnect before its final evaluation
FINAL_WAIT = 15.0
#: a job during whose setup the coordinator stopped this many times in a row is marked failed, so a
#: job that kills the process (out of memory, a crash in a library) is not retried in a crash loop
MAX_SETUP_CRASHES = 2


@dataclass(frozen=True)
class CoordinatorConfig:
    cert: Path
    key: Path
    ca: Path
    crl: Path
    db: Path
    host: str = "127.0.0.1"
    port: int = 8443
    port_file: Path | None = None
    heartbeat: float = 2.0
    dead_after: float = 10.0

    @classmethod
    def load(cls, path: str | Path) -> "CoordinatorConfig":
        from insitu.tomltable import read_table

        raw = read_table(path, "coordinator", cls, required=("cert", "key", "ca", "crl", "db"),
                         paths=("cert", "key", "ca", "crl", "db", "port_file"))
        return cls(**raw)

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.cert, self.key, self.ca)


class RecordingProtocol:
    """Wraps the job's aggregation protocol to keep the last round's result, so that an aborted
    round's per-site reasons (a site's refusal, a time-out) reach the job store and the operator."""

    def __init__(self, inner: AggregationProtocol):
        self.inner = inner
        self.name = inner.name
        self.last: tuple[int, AggregateResult] | None = None

    def collect(self, plan: RoundPlan, transport) -> AggregateResult:
        self.last = None
        result = self.inner.collect(plan, transport)
        self.last = (plan.round, result)
        return result

    def site_protection(self, site_id: str):
        return self.inner.site_protection(site_id)

    def dropped(self, round_: int) -> dict[str, str]:
        return dict(self.last[1].dropped) if self.last and self.last[0] == round_ else {}

    def culprits(self, round_: int) -> tuple[str, ...]:
        """Sites whose update round ``round_`` refused (insitu.federation.robust)."""
        return tuple(self.last[1].culprits) if self.last and self.last[0] == round_ else ()


class OperatorOp(str, enum.Enum):
    SUBMIT = "submit"
    CANCEL = "cancel"
    STATUS = "status"
    LIST = "list"
    SITES = "sites"
    MODEL = "model"  # the newest model and its summary (insitu.coordinator.publish)
    LOGS = "logs"  # what the coordinator logged about a job (insitu.coordinator.monitor)
    LOGIN = "login"  # a one-time dashboard login link (insitu.coordinator.dashboard)


def mean_accuracy(evals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """FLamby's metric: accuracy averaged over the sites' test sets (plus pooled accuracy)."""
    accs = [float(e["accuracy"]) for e in evals.values() if e.get("n", 0) > 0]
    n = sum(int(e.get("n", 0)) for e in evals.values())
    correct = sum(int(e.get("correct", 0)) for e in evals.values())
    return {
        "mean_site_accuracy": float(np.mean(accs)) if accs else None,
        "pooled_accuracy": correct / n if n else None,
        "site_accuracy": {k: float(v["accuracy"]) for k, v in evals.items() if v.get("n", 0) > 0},
    }


class CoordinatorService:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.store = JobStore(config.db)
        n = self.store.recover()
        if n:
            log.warning("marked %d round(s) interrupted by the last shutdown; they were not applied", n)
        for job_id, why in self.store.recover_setups(MAX_SETUP_CRASHES).items():
            log.error("job %s marked failed: %s", job_id, why)
        self.server = CoordinatorServer(
            config.credentials, config.crl, self.operator,
            NetConfig(host=config.host, port=config.port, heartbeat=config.heartbeat, dead_after=config.dead_after),
        )
        self._stop = threading.Event()
        self.approvals: dict[str, dict[str, Any]] = {}  # job → sites it waits for (status "waiting")
        self._waits: dict[str, Any] = {}  # job → its ApprovalWait (insitu.coordinator.onboarding)
        self.excluded: dict[str, dict[str, str]] = {}  # job → sites left out of its rounds, and why
        self._ops: dict[OperatorOp, Callable[[Mapping[str, Any], Identity], dict[str, Any]]] = {
            OperatorOp.SUBMIT: self._submit,
            OperatorOp.CANCEL: self._cancel,
            OperatorOp.STATUS: self._status,
            OperatorOp.LIST: self._list,
            OperatorOp.SITES: self._sites,
            OperatorOp.MODEL: self._model,
            OperatorOp.LOGS: self._logs,
            OperatorOp.LOGIN: _no_dashboard,
        }
        from insitu.coordinator import monitor

        self._log_handler = monitor.install(self.store)

    @property
    def port(self) -> int:
        return self.server.port

    # -- operator requests ---------------------------------------------------------------------
    def operator(self, op: str, args: Mapping[str, Any], who: Identity) -> dict[str, Any]:
        if who.role is not Role.OPERATOR:
            raise AuthError(f"certificate {who.name} has role {who.role.value}; only an operator certificate may run jobs")
        try:
            handler = self._ops[OperatorOp(op)]
        except ValueError:
            raise ConfigError(f"unknown operator request {op!r}; known: {[o.value for o in OperatorOp]}") from None
        log.info("operator %s: %s %s", who.name, op, args.get("job", ""))
        return handler(args, who)

    def _submit(self, args: Mapping[str, Any], who: Identity) -> dict[str, Any]:
        spec = JobSpec.from_dict(args.get("job", {}))
        row = self.store.add_job(spec.name, spec.to_dict(), spec.plan.content_hash(), spec.rounds, who.name)
        log.info("job %s: submitted by %s (plan %s, %d rounds)", row.id, who.name, row.task_hash[:12], spec.rounds)
        return row.public()

    def _cancel(self, args, who):
        return self.store.cancel(str(args.get("job", ""))).public()

    def _status(self, args, who):
        row = self.store.job(str(args.get("job", "")))
        from insitu.coordinator.monitor import progress, site_rows, traffic

        rounds = self.store.rounds(row.id)
        return {**row.public(), "rounds": rounds, **({"approval": self.approvals[row.id]} if row.id in self.approvals else {}),
                **({"excluded": self.excluded[row.id]} if self.excluded.get(row.id) else {}),
                "progress": progress(row.public(), rounds), "traffic": traffic(row.spec, rounds), "sites": site_rows(self.server.transport.site_status(), rounds)}

    def _list(self, args, who):
        return {"jobs": [j.public() for j in self.store.jobs()]}

    def _sites(self, args, who):
        from insitu.coordinator.monitor import site_rows

        return {"sites": self.server.transport.sites(), "detail": site_rows(self.server.transport.site_status())}

    def _logs(self, args, who):
        row = self.store.job(str(args.get("job", "")))
        events = self.store.events(row.id)
        for r in self.store.rounds(row.id):  # why each site dropped out, beside the coordinator's own lines
            for site, why in (r.get("dropped") or {}).items():
                events.append({"seq": None, "at": r.get("ended") or r["started"], "level": "warning",
                               "message": f"job {row.id} round {r['round']}: {site} dropped: {why}"})
        events.sort(key=lambda e: (e["at"], e["seq"] or 0))
        return {"id": row.id, "status": row.status.value, "events": events}

    def _model(self, args, who):
        from insitu.coordinator.publish import model_reply

        return model_reply(self.store, str(args.get("job", "")), {c.ident.name: c.info for c in self.server.transport.connections()})

    # -- running -------------------------------------------------------------------------------
    def start(self) -> "CoordinatorService":
        self.server.start()
        # load the secure-aggregation / HE code while idle, not inside the first secure round
        threading.Thread(target=_preload, daemon=True, name="preload").start()
        if self.config.port_file is not None:
            tmp = self.config.port_file.with_suffix(".tmp")
            tmp.write_text(str(self.port))
            tmp.replace(self.config.port_file)
        log.info("coordinator listening on %s:%d (TLS 1.3, mutual auth)", self.config.host, self.port)
        return self

    def stop(self) -> None:
        logging.getLogger("insitu.coordinator").removeHandler(self._log_handler)
        self._stop.set()
        self.server.stop()

    def run_jobs(self) -> None:
        """Run active jobs one at a time until stopped: a running (or resumed) job first, then the
        oldest job whose sites approved its plan.  A job still waiting for approvals does not hold
        up a later one whose sites approved (see ``_next_ready``)."""
        while not self._stop.is_set():
            try:
                job = self._next_ready()
            except Exception:  # noqa: BLE001 - a bug in scheduling must not end the coordinator
                log.exception("scheduling jobs: internal error")
                job = None
            if job is None:
                self._stop.wait(0.2)
                continue
            self._waits.pop(job.id, None)
            self.approvals.pop(job.id, None)
            try:
                self.run_job(job)
            except InsituError as exc:
                log.error("job %s failed: %s", job.id, exc)
                self.store.set_status(job.id, JobStatus.FAILED, error=str(exc))
            except Exception as exc:  # a bug, never a peer's message, must not end the coordinator
                log.exception("job %s failed with an internal error", job.id)
                self.store.set_status(job.id, JobStatus.FAILED, error=f"internal error: {type(exc).__name__}: {exc}")

    def _next_ready(self) -> JobRow | None:
        """The job to run now: the oldest active job that is running or resuming (rounds applied),
        has no approval wait, or whose sites approved; every other waiting job is asked again when
        its poll is due.  A job whose wait timed out fails, naming the sites it waited for."""
        active = self.store.active_jobs()
        for stale in set(self._waits) - {j.id for j in active}:  # cancelled or failed meanwhile
            self._waits.pop(stale, None)
            self.approvals.pop(stale, None)
        for job in active:
            if job.status is JobStatus.RUNNING or job.rounds_applied > 0:
                return job
            if job.id not in self._waits:  # parsed once, when the job first comes up; its wait holds the plan after
                try:
                    spec = JobSpec.from_dict(job.spec)
                except InsituError as exc:
                    self.store.set_status(job.id, JobStatus.FAILED, error=str(exc))
                    continue
                if spec.approval_timeout <= 0:
                    return job
                self._start_wait(job, spec)
            if self._poll_approvals(job):
                return job
        return None

    def _start_wait(self, job: JobRow, spec: JobSpec) -> None:
        """``job`` waits for its sites' approvals (insitu.coordinator.onboarding): status ``waiting``."""
        from insitu.coordinator.onboarding import ApprovalWait

        self._waits[job.id] = ApprovalWait(job.id, spec.plan, sites=spec.sites, min_sites=spec.min_sites, timeout=spec.approval_timeout)
        self.store.set_status(job.id, JobStatus.WAITING)

    def _poll_approvals(self, job: JobRow) -> bool:
        """One poll of ``job``'s approval wait, when due; True when it may start."""
        wait = self._waits[job.id]
        if not wait.due():
            return False
        before = self.approvals.get(job.id, {})
        try:
            ready = wait.poll(self.server.transport)
        except RoundAborted as exc:
            self._waits.pop(job.id, None)
            self.approvals.pop(job.id, None)
            log.error("job %s failed: %s", job.id, exc)
            self.store.set_status(job.id, JobStatus.FAILED, error=str(exc))
            return False
        check = wait.check
        self.approvals[job.id] = {**check.public(), "since": wait.since, "timeout": wait.timeout}
        holding = {**check.waiting, **check.unreachable}
        if holding != {**before.get("waiting", {}), **before.get("unreachable", {})} and holding and not ready:
            log.info("job %s: waiting for approval of plan %s by %s", job.id, wait.plan.content_hash()[:12],
                     "; ".join(f"{s} ({why})" for s, why in sorted(holding.items())))
        if ready:
            log.info("job %s: plan approved by %s", job.id, ", ".join(check.approved))
        return ready

    def run_job(self, job: JobRow) -> None:
        self.store.begin_setup(job.id)  # a coordinator that dies before end_setup counts a setup crash
        try:
            spec = JobSpec.from_dict(job.spec)
            plan = spec.plan
            log.info("job %s: starting (%s, %s, dp %s, %d rounds, min %d sites)", job.id, plan.strategy.name.value,
                     plan.protection.kind.value, plan.dp.level.value, spec.rounds, spec.min_sites)
            coord, protocol, version = job_coordinator(spec, job.id, self.server.transport, self.store.latest_model(job.id))
        finally:
            self.store.end_setup(job.id)
        if version:
            log.info("job %s: resuming from model version %d", job.id, version)
        strategy = coord.strategy
        self.store.set_status(job.id, JobStatus.RUNNING)
        aborted = sum(1 for r in self.store.rounds(job.id) if r["status"] in (RoundStatus.ABORTED.value, RoundStatus.INTERRUPTED.value))
        max_aborted = spec.max_aborted if spec.max_aborted is not None else spec.rounds
        self._exclude(job.id, spec, coord)
        from insitu.federation.evaluation import criterion_of

        criterion = criterion_of(plan.select)
        while version < spec.rounds:
            if self._stop.is_set() or self.store.job(job.id).status is JobStatus.CANCELLED:
                log.info("job %s: stopping at model version %d", job.id, version)
                return
            wanted = set(spec.sites) - coord.excluded if spec.sites else None
            self.server.transport.wait_for(wanted, spec.min_sites, spec.wait_for_sites)
            r = self.store.begin_round(job.id)
            try:
                rec = coord.run_round(r)
            except Exception as exc:  # noqa: BLE001 - whatever a site sent ends this round, never the job or the process
                if not isinstance(exc, RoundAborted):
                    if isinstance(exc, InsituError):
                        log.warning("job %s round %d: %s", job.id, r, exc)
                    else:
                        log.exception("job %s round %d: internal error", job.id, r)
                    exc = RoundAborted(f"round {r} aborted: {_one_line(exc)}; the global model is unchanged")
                aborted += 1
                culprits = tuple(sorted(set(exc.culprits) | set(protocol.culprits(r))))  # incl. updates refused before the abort
                self.store.abort_round(job.id, r, str(exc), protocol.dropped(r), culprits)
                log.warning("job %s round %d aborted (%d so far): %s", job.id, r, aborted, exc)
                if aborted > max_aborted:
                    raise RoundAborted(f"job {job.id}: {aborted} rounds aborted (limit {max_aborted}); last: {exc}") from None
                if culprits:
                    self._exclude(job.id, spec, coord)
                continue
            last = version + 1 == spec.rounds
            evaluation = None
            if criterion is not None:  # selecting on validation: every round scored there, the test splits read once at the end
                evaluation = self._evaluate(coord, r, criterion)
            elif spec.eval_every and ((version + 1) % spec.eval_every == 0 or last):
                evaluation = self._evaluate(coord, r)
            version = self.store.apply_round(
                job.id, r, expected_version=version, params=coord.params, state=strategy.state(),
                participants=rec.participants, dropped=rec.dropped, evaluation=evaluation, seconds=rec.seconds,
                metrics=with_traffic(rec, coord.eval_bytes_down, coord.eval_bytes_up) if evaluation is not None else with_traffic(rec),
                culprits=protocol.culprits(r),
            )
            acc = (evaluation or {}).get("mean_site_accuracy")
            log.info("job %s round %d applied as version %d: %d sites, %d dropped, %.3f s%s", job.id, r, version,
                     len(rec.participants), len(rec.dropped), rec.seconds, f", mean accuracy {acc:.4f}" if acc is not None else "")
            if protocol.culprits(r):  # a refused update counts toward exclude_after like an aborted round
                self._exclude(job.id, spec, coord)
        self._await_returning_sites(job.id, coord, spec)
        selection = self._select(job.id, coord, criterion) if criterion is not None else {}
        final = self._evaluate(coord, self.store.job(job.id).next_round)
        final["evaluation_bytes_down"] = dict(coord.eval_bytes_down)  # the final evaluation's request to each site
        final["evaluation_bytes_up"] = dict(coord.eval_bytes_up)  # and each site's answer
        if spec.config.get("dataset") == "physionet2012":  # the served model's threshold, as simulate chooses it
            final.update(self._clinical_threshold(coord, self.store.job(job.id).next_round))
        final.update({"rounds_applied": version, "rounds_aborted": aborted, **selection,
                      "params_sha256": hashlib.sha256(np.asarray(coord.params, np.float32).tobytes()).hexdigest()})
        self.store.set_status(job.id, JobStatus.DONE, final=final)
        log.info("job %s done: %s", job.id, final)

    def _await_returning_sites(self, job_id: str, coord: Coordinator, spec: JobSpec) -> None:
        """Before the final evaluation: a site that took part in the job and is not connected right now (a
        channel lost and being re-dialled) gets up to the smaller of the round timeout and
        :data:`FINAL_WAIT` seconds to come back, so a transient reconnect does not leave it out of the
        figures the job publishes.  A site that stays away is left out, as before, and named in the log."""
        transport = self.server.transport
        wait_for = getattr(transport, "wait_for", None)
        if wait_for is None:  # a transport without connections (tests in process): every site is always there
            return
        took = {s for r in self.store.rounds(job_id) for s in r.get("participants") or ()} - set(coord.excluded)
        missing = sorted(took - set(transport.sites()))
        if not missing:
            return
        wait = min(spec.round_timeout, FINAL_WAIT)
        log.info("job %s: waiting up to %.0f s for %s to reconnect before the final evaluation", job_id, wait, ", ".join(missing))
        back = set(wait_for(took, len(took), wait))
        if not set(missing) <= back:
            log.info("job %s: final evaluation without %s (not connected)", job_id, ", ".join(sorted(set(missing) - back)))

    def _exclude(self, job_id: str, spec: JobSpec, coord: Coordinator) -> None:
        """Leave out of the job's later rounds every site named as the cause of ``exclude_after``
        aborted rounds (a site whose malformed or inconsistent messages keep aborting secure or
        homomorphic rounds would otherwise stop the job); fails the job when too few remain."""
        if not spec.exclude_after:
            return
        blame = {s: rs for s, rs in self.store.blame(job_id).items() if len(rs) >= spec.exclude_after}
        new = sorted(set(blame) - coord.excluded)
        if not new:
            return
        coord.excluded = frozenset(coord.excluded | set(new))
        applied = {r["round"] for r in self.store.rounds(job_id) if r["status"] == RoundStatus.APPLIED.value}
        self.excluded[job_id] = {s: f"named as the cause of {_blamed(rs, applied)} (exclude_after = {spec.exclude_after})"
                                 for s, rs in blame.items()}
        for s in new:
            log.warning("job %s: site %s excluded from later rounds: %s", job_id, s, self.excluded[job_id][s])
        if spec.sites and len(set(spec.sites) - coord.excluded) < spec.min_sites:
            raise RoundAborted(f"job {job_id}: {', '.join(sorted(coord.excluded))} excluded after causing aborted rounds or refused updates; "
                               f"{len(set(spec.sites) - coord.excluded)} of the job's sites remain, min_sites is {spec.min_sites}")

    def _select(self, job_id: str, coord: Coordinator, criterion: Any) -> dict[str, Any]:
        """The plan selects on validation: make the best-scoring applied version the job's final model
        (from the store, so a restarted coordinator chooses among every version); ties go to the earlier."""
        best: tuple[float, int] | None = None
        for r in self.store.rounds(job_id):
            ev = r.get("evaluation") or {}
            if r["status"] == "applied" and ev.get("split") == "val" and isinstance(ev.get("score"), (int, float)):
                if best is None or ev["score"] > best[0]:
                    best = (float(ev["score"]), r["round"])
        if best is None:
            return {"selection": {"split": "val", "criterion": criterion.value, "value": None}}
        version = {rnd: v for v, rnd in self.store.model_rounds(job_id)}[best[1]]
        _, _, params, _ = self.store.model(job_id, version)
        coord.params = np.asarray(params, np.float32)
        log.info("job %s: model version %d (round %d) chosen on the sites' validation splits (%s %.4f)", job_id, version,
                 best[1], criterion.value, best[0])
        return {"selected_version": version, "selected_round": best[1],
                "selection": {"split": "val", "criterion": criterion.value, "value": best[0]}}

    def _clinical_threshold(self, coord: Coordinator, round_: int) -> dict[str, Any]:
        """``{"clinical": ...}``: the decision threshold of the final model from the sites' answers on their
        validation splits (insitu.learn.clinical.threshold_from_answers), what the gateway serves it at."""
        from insitu.learn.clinical import threshold_from_answers

        try:
            clinical = threshold_from_answers(coord.evaluate(round_, split="val", threshold=True))
        except Exception as exc:  # noqa: BLE001 - no threshold is reported, the job is not failed: the model is served at 0.5
            log.warning("job %s: no decision threshold: %s", coord.job, _one_line(exc))
            return {}
        return {"clinical": clinical} if clinical is not None else {}

    def _evaluate(self, coord: Coordinator, round_: int, criterion: Any = None) -> dict[str, Any]:
        """The sites' answers about the current model: on their test splits, or (``criterion``) on their
        validation splits with the score model selection ranks by."""
        split = "val" if criterion is not None else "test"
        try:
            evals = coord.evaluate(round_, split=split)
            value = None
            if criterion is not None:
                from insitu.federation.evaluation import score

                value = score(evals, criterion)
        except Exception as exc:  # noqa: BLE001 - a failed evaluation is reported, it does not end the job
            if not isinstance(exc, InsituError):
                log.exception("evaluation of round %d: internal error", round_)
            return {"error": _one_line(exc)}
        out = {**mean_accuracy(evals), "sites": {k: dict(v) for k, v in evals.items()}}
        if criterion is not None:
            out.update({"split": "val", "score": value})
        if coord.eval_dropped:
            out["dropped"] = dict(coord.eval_dropped)
        return out


def _blamed(rounds: list[int], applied: set[int]) -> str:
    """'aborted rounds 2, 3' / 'refused updates in rounds 4, 5' / both: the rounds a site was blamed for."""
    aborted = [r for r in rounds if r not in applied]
    refused = [r for r in rounds if r in applied]
    parts = ([f"aborted rounds {', '.join(map(str, aborted))}"] if aborted else []) + \
            ([f"refused updates in rounds {', '.join(map(str, refused))}"] if refused else [])
    return " and ".join(parts)


def with_traffic(rec: Any, evaluation: Mapping[str, int] | None = None, evaluation_up: Mapping[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """A round's per-site metrics with the bytes the coordinator counted each way (what ``job status`` shows
    as bytes up and down per site per round); a site sent the model but dropped has its bytes down only.
    When the round was evaluated, bytes down include its evaluation request (``evaluation``: the
    coordinator's ``eval_bytes_down``) and bytes up each site's answer (``evaluation_up``: its
    ``eval_bytes_up``), as ``insitu simulate`` counts them (federation.coordinator.round_bytes_down/_up)."""
    from insitu.federation.coordinator import round_bytes_down, round_bytes_up

    down, up = round_bytes_down(rec, evaluation), round_bytes_up(rec, evaluation_up)
    out = {s: dict(m) for s, m in rec.train.items()}
    for s in set(up) | set(down):
        out.setdefault(s, {}).update({"bytes_up": int(up.get(s, 0)), "bytes_down": int(down.get(s, 0))})
    return out


def _one_line(exc: BaseException, limit: int = 500) -> str:
    text = " ".join(f"{exc}".split()) if isinstance(exc, InsituError) else f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def job_coordinator(spec: JobSpec, job_id: str, transport: Any, latest: Any = None, *,
                    coordinator_secret: bytes | None = None) -> tuple[Any, "RecordingProtocol", int]:
    """The deployed job's coordinator over ``transport``, resumed from ``latest`` (version, round,
    params, strategy state) if given: the builder's coordinator, as ``insitu simulate`` makes it.

    ``coordinator_secret`` seeds central DP noise (tests comparing with a simulation); the OS otherwise."""
    plan = spec.plan
    state: dict[str, np.ndarray] = {}
    if latest is None:
        version, params = 0, initial_params(plan, spec.seed)
    else:
        version, _, params, state = latest
    rng = None
    if coordinator_secret is not None:
        from insitu.builder import derive_seed

        rng = np.random.default_rng(derive_seed(coordinator_secret, "central-dp"))
    protocol = RecordingProtocol(build_protocol(plan, rng=rng))
    coord = build_coordinator(plan, job_id, transport, params=params, timeout=spec.round_timeout,
                              sites=spec.sites, protocol=protocol, strategy_state=state)
    return coord, protocol, version


def _no_dashboard(args, who):
    raise ConfigError("this coordinator serves no dashboard; add a [dashboard] table to coordinator.toml (see insitu.coordinator.dashboard)")


def _preload() -> None:
    import importlib

    importlib.import_module("insitu.secure")


def serve(config_path: str | Path) -> None:
    """Run the coordinator until interrupted (SIGINT/SIGTERM)."""
    import signal

    svc = CoordinatorService(CoordinatorConfig.load(config_path)).start()
    from insitu.coordinator import dashboard

    web = dashboard.start(svc, config_path)  # None without a [dashboard] table
    def _term(signum, frame) -> None:
        # a round in flight is left 'started' and marked interrupted (never applied) at the next start
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _term)
    try:
        svc.run_jobs()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        if web is not None:
            web[1].stop()
        svc.stop()
        svc.store.close()  # every applied round is already committed


__all__ = ["CoordinatorConfig", "CoordinatorService", "OperatorOp", "serve", "mean_accuracy", "job_coordinator"]

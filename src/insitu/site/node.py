"""``insitu site serve``: the hospital node.  Holds the data, enforces the admin's rules, dials out.

For each job the node builds the round engine's :class:`~insitu.federation.site.Site`
(the very class simulation uses) when the job's first request arrives, with
guards that refuse, *before any training*:

* a task whose content hash the admin has not approved (or outside the
  approval's hyper-parameter ranges, or outside this site's own limits);
* a round whose update would not be masked among ``min_secagg_group`` sites;
* with a privacy budget (``[policy] epsilon_budget``, ``delta``): a task that is not record-level
  DP, and a round that the site's own accountant says would take it past the budget; the site
  computes ε itself from the task's noise multiplier and its own sampling rate, charges
  ``state/privacy_ledger.sqlite`` before training (one immutable row per round) and trains with
  DP-SGD; without a budget, a DP task (nothing could cap it);
* a task whose data schema is not this site's;
* a model larger than ``[policy] max_params`` (counted from the plan's shapes, before anything is built).

A refusal is logged to ``state/refusals.jsonl``, the task is kept in
``state/pending.json`` for the admin to review, and the ERROR reply carries
the reason back to the coordinator, where the operator sees it in
``insitu job status``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from insitu.data.dataset import SiteData
from insitu.errors import BudgetExceeded, ConfigError, DataError, PolicyViolation, ProtocolError, TaskNotApproved
from insitu.federation.messages import Message, MessageKind
from insitu.builder import build_site, protection_half
from insitu.federation.instructions import RoundInstructions
from insitu.federation.planref import PLAN_REF_KEY, parse_plan_ref, unknown_plan
from insitu.federation.site import Site
from insitu.net.client import DialConfig, SiteClient
from insitu.net.pki import Credentials
from insitu.plan import Plan, Protection
from insitu.site.policy import Approvals, DataSource, SitePolicy, check_group, check_model_size, check_ranges

log = logging.getLogger("insitu.site")
MAX_JOBS = 8  # Site objects kept (one per recent job)
#: evaluations a node answers in jobs it has not trained in: this many for each job it trained in, and to start
UNTRAINED_EVALUATIONS = 2


def protocol_of(msg: Message) -> Protection | None:
    """The protection a message that opens a job (before its first TRAIN) belongs to, or None.

    Secure aggregation's key agreement and homomorphic key dealing reach a site before the plan
    does; the message kind says which protection it belongs to (its scheme checked against the
    closed :class:`~insitu.plan.Protection` list), so nothing on the wire picks code."""
    if msg.kind in (MessageKind.SECAGG_ADVERTISE, MessageKind.SECAGG_REVEAL, MessageKind.SECAGG_SHARE, MessageKind.SECAGG_CHECK, MessageKind.SECAGG_UNMASK):
        return Protection.SECAGG
    if msg.kind in (MessageKind.HE_KEYS, MessageKind.HE_DECRYPT):
        scheme = msg.meta.get("scheme")
        if scheme not in (Protection.PAILLIER.value, Protection.CKKS.value):
            raise ProtocolError(f"{msg.kind.value} names scheme {scheme!r}, not one of ['paillier', 'ckks']")
        return Protection(scheme)
    return None


def load_records(policy: SitePolicy, name: str = "site") -> tuple[SiteData, tuple[str, ...]]:
    """``[data] source = "records"``: this site's records read through ``insitu.data.sources`` and its
    schema, de-identified by its policy first when ``deid`` is set, then split and encoded.

    ``uri`` (a CSV/SQLite path, a PostgreSQL URL, a FHIR export folder or server, an image or DICOM
    folder), ``schema`` (the schema TOML every site of the consortium shares), optional ``table``,
    ``deid`` (a de-identification policy TOML) with ``deid_secret`` (the site secret file of
    ``insitu deid keygen``), ``test_fraction`` (default 0.3), ``split_seed`` (default 0)."""
    from insitu.data.features import encoding, site_data
    from insitu.data.sources import RecordSchema, read_dataset

    d = policy.data
    for k in ("uri", "schema"):
        if k not in d:
            raise ConfigError(f"[data] source = \"records\" needs {k} = ...")
    schema = RecordSchema.from_toml(d["schema"])
    records = read_dataset(str(d["uri"]), schema, table=d.get("table"))
    if d.get("deid"):
        if records.pixels is not None:
            raise ConfigError("[data] deid applies to tabular records; de-identify image metadata at the source (DICOM: declare no identifying tags)")
        from insitu.deid.engine import deidentify
        from insitu.deid.policy import DeidPolicy
        from insitu.deid.pseudonym import load_site_secret

        if "deid_secret" not in d:
            raise ConfigError("[data] deid needs deid_secret = PATH (the site secret of `insitu deid keygen`)")
        result = deidentify(records.frame, schema, DeidPolicy.from_toml(d["deid"]), load_site_secret(Path(d["deid_secret"])), encrypt=False)
        log.info("site %s: de-identified %d records before training (%d suppressed, k=%d)", name,
                 result.report.rows_in, result.report.suppressed, result.report.k)
        # a release is shuffled by a fresh key each time; training wants the same split on every start,
        # so put the rows back in source order (this frame never leaves the site)
        order = np.argsort(np.asarray(result.source_rows))
        records = type(records)(result.frame.iloc[order].reset_index(drop=True), None)
    data = site_data(records, schema, name, test_fraction=float(d.get("test_fraction", 0.3)), seed=int(d.get("split_seed", 0)))
    return data, tuple(encoding(schema).features)


def load_site_data(policy: SitePolicy) -> SiteData:
    """This site's records for ``[data] source = "heart"`` or ``"csv"`` (``"records"``: :func:`load_records`)."""
    if policy.source is DataSource.HEART:
        from insitu.data.heart import SITE_NAMES, load_heart

        name = str(policy.data.get("hospital", ""))
        if name not in SITE_NAMES:
            raise ConfigError(f"[data] hospital must be one of {list(SITE_NAMES)}, got {name!r}")
        fed = load_heart(policy.data.get("csv"))
        return fed.sites[SITE_NAMES.index(name)]
    label = str(policy.data.get("label", "label"))
    frames = {}
    for part in ("train", "test"):
        if part not in policy.data:
            raise ConfigError(f"[data] source = \"csv\" needs {part} = PATH")
        try:
            frames[part] = pd.read_csv(policy.data[part])
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {policy.data[part]}: {exc}") from None
        if label not in frames[part]:
            raise DataError(f"{policy.data[part]} has no label column {label!r}")
    feats = [c for c in frames["train"].columns if c != label]
    if [c for c in frames["test"].columns if c != label] != feats:
        raise DataError("train and test CSV files have different columns")

    def xy(df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(df[feats].to_numpy(float), dtype=torch.float32), torch.tensor(df[label].to_numpy(float), dtype=torch.float32)

    (xtr, ytr), (xte, yte) = xy(frames["train"]), xy(frames["test"])
    return SiteData("csv", xtr, ytr, xte, yte)


def site_records(policy: SitePolicy, name: str = "site") -> tuple[SiteData, tuple[str, ...] | None]:
    """This site's training data and its schema (None: a schema-less CSV), whatever ``[data] source`` says."""
    if policy.source is DataSource.RECORDS:
        return load_records(policy, name)
    if policy.source is DataSource.PHYSIONET2012:
        from insitu.data.physionet import schema, site_from_config

        return site_from_config(policy.data, name), schema()
    data = load_site_data(policy)
    if policy.source is DataSource.HEART:
        from insitu.data.heart import FEATURES

        return data, tuple(FEATURES)
    return data, None


class SiteNode:
    """Answers the coordinator's requests for every job, one Site per job."""

    def __init__(self, policy: SitePolicy, site_id: str, data: SiteData, *, schema: tuple[str, ...] | None = None):
        self.policy = policy
        self.site_id = site_id
        self.data = data
        self.schema = schema
        self.approvals = Approvals(policy.state, policy.approved)
        self.ledger: Any = None  # the site's own privacy ledger (SQLite in its state directory), with a budget
        if policy.epsilon_budget is not None:
            from insitu.privacy import Budget, PrivacyLedger

            self.ledger = PrivacyLedger(Path(policy.state) / "privacy_ledger.sqlite")
            self.ledger.set_budget(site_id, Budget(policy.epsilon_budget, policy.delta))
        self._sites: OrderedDict[str, Site] = OrderedDict()
        self._plans: dict[str, Plan] = {}
        if policy.insecure_fixed_secret is not None:
            log.warning("site %s: insecure_fixed_secret is set: sampling and DP noise are replayable by whoever reads "
                        "site.toml; use it for tests only", site_id)
        self._early: dict[str, Any] = {}  # job → protocol site half created by a phase before TRAIN
        self._trained_jobs: set[str] = set()  # jobs in which this node answered a TRAIN
        self._untrained_answers = 0  # evaluations answered by a job's Site that had trained nothing
        self._lock = threading.Lock()
        self._attestation: Any = None

    @property
    def attestation(self) -> Any:
        """Signs this site's secure-aggregation keys with its TLS certificate and checks its peers'
        against the consortium CA, so the coordinator cannot substitute keys (insitu.secure.attest)."""
        if self._attestation is None:
            from insitu.secure.attest import Attestation

            self._attestation = Attestation.load(self.policy.cert, self.policy.key, self.policy.ca)
        return self._attestation

    def secret_for(self, job: str) -> bytes:
        """This site's secret for ``job``: fresh OS randomness, kept only in memory (never derived from
        anything the coordinator sends or knows), unless the admin set insecure_fixed_secret for a test."""
        if self.policy.insecure_fixed_secret is not None:
            return self.policy.insecure_fixed_secret
        from insitu.builder import new_secret

        return new_secret()

    # -- the checks before a plan may run, and before every round --------------------------------
    def guard(self, plan: Plan, ins: RoundInstructions) -> None:
        self.check_task(plan)
        check_group(plan.protection.kind.value, ins.group, self.policy.min_secagg_group)

    def check_dp(self, plan: Plan) -> None:
        """The site's DP rule: with a budget only DP plans run (charged to its own ledger before
        training); without one, no DP plan runs (nothing could cap it)."""
        h = plan.content_hash()[:12]
        if self.ledger is not None and not plan.dp.on:
            raise BudgetExceeded(
                f"plan {h} declares no differential privacy; this site has a privacy budget of "
                f"ε={self.policy.epsilon_budget:g} and runs only DP plans (dp = \"record\" or \"site\", epsilon or noise_multiplier)")
        if self.ledger is None and plan.dp.on:
            raise PolicyViolation(
                f"plan {h} asks for {plan.dp.level.value}-level DP but this site has no privacy budget to account it "
                "against: set [policy] epsilon_budget (and delta) in site.toml")

    def check_task(self, plan: Plan) -> None:
        self.approvals.check(plan)
        check_ranges(plan, self.policy.ranges)
        check_model_size(plan, self.policy.max_params)  # a rule no approval lifts: the largest model this site builds
        task = plan.task
        if self.schema is not None and tuple(task.schema) != tuple(self.schema):
            raise TaskNotApproved(f"task schema {list(task.schema)} is not this site's data schema {list(self.schema)}")
        if tuple(task.input_shape) != tuple(self.data.X_train.shape[1:]):
            raise TaskNotApproved(f"task input shape {task.input_shape} does not match this site's records {tuple(self.data.X_train.shape[1:])}")
        self.check_dp(plan)

    # -- dispatch ------------------------------------------------------------------------------
    def handle(self, msg: Message) -> Message:
        if msg.kind is MessageKind.TASK_CHECK:  # onboarding: approved here?  (insitu.site.onboarding)
            from insitu.site.onboarding import answer_task_check

            return answer_task_check(self, msg)
        early = self._early_phase(msg)
        if early is not None:
            return early
        if msg.kind is MessageKind.PERSONALIZE:  # simulation only: no approved plan covers it yet (insitu.federation.personalize)
            raise ProtocolError("this site does not fine-tune models for a coordinator: personalisation is not offered by deployed sites")
        try:
            site = self._site_for(msg)
            untrained = site.last_round < 0
            if msg.kind is MessageKind.EVALUATE:
                self.check_task(self._plans[msg.job])  # scoring a model on local test data is also an approved use only
            reply = site.handle(msg)
        except PolicyViolation as exc:
            self._refused(msg, exc)
            raise
        with self._lock:
            if msg.kind is MessageKind.TRAIN:
                self._trained_jobs.add(msg.job)
            elif msg.kind is MessageKind.EVALUATE and untrained:
                self._untrained_answers += 1
        if msg.kind is MessageKind.TRAIN:  # the site's own log of the rounds it trained (insitu.site.journal)
            from insitu.site.journal import record_round

            record_round(self.policy.state, self.site_id, msg, reply, site.plan_hash, self._plans[msg.job].protection.kind.value)
        return reply

    def _early_phase(self, msg: Message) -> Message | None:
        """Protocol phases that come before the job's first TRAIN (secure aggregation's key
        agreement, homomorphic key dealing) are answered by the protocol's site half, kept until the Site is built."""
        if msg.kind in (MessageKind.TRAIN, MessageKind.EVALUATE):
            return None
        with self._lock:
            if msg.job in self._sites:
                return None
            proto = protocol_of(msg)
            if proto is None:
                return None
            prot = self._early.get(msg.job)
            if prot is None:
                prot = protection_half(proto, self.site_id, attestation=self.attestation, min_group=self.policy.min_secagg_group)
                self._early[msg.job] = prot
                while len(self._early) > MAX_JOBS:
                    self._early.pop(next(iter(self._early)))
        handler = prot.handlers().get(msg.kind)
        if handler is None:
            raise ProtocolError(f"{msg.kind.value} for job {msg.job!r} before key agreement")
        from insitu.federation.egress import Egress

        return Egress(prot.egress()).check(handler(msg))  # the border holds before the plan arrives too

    def _site_for(self, msg: Message) -> Site:
        with self._lock:
            site = self._sites.get(msg.job)
            if msg.kind in (MessageKind.TRAIN, MessageKind.EVALUATE) and PLAN_REF_KEY in msg.meta and "plan" not in msg.meta:
                if site is None:  # the plan by hash only: resolved against the job's Site, which checks it (Site._check_plan)
                    raise unknown_plan(self.site_id, parse_plan_ref(msg.meta[PLAN_REF_KEY]), msg.job, "this site holds no plan of that job")
            elif msg.kind in (MessageKind.TRAIN, MessageKind.EVALUATE):
                try:
                    plan = Plan.from_meta(msg.require("plan", dict))
                except ConfigError as exc:
                    raise ProtocolError(f"{msg.kind.value} for job {msg.job!r}: {exc}") from None
                if site is None or site.plan_hash != plan.content_hash():
                    if msg.kind is MessageKind.EVALUATE:  # a new job name is no fresh evaluation allowance
                        self._untrained_allowance(msg, plan)
                    self._plans[msg.job] = plan
                    site = self._build(msg.job, plan)
            if site is None:
                raise ProtocolError(f"{msg.kind.value} for job {msg.job!r} before any train or evaluate request")
            if msg.kind is MessageKind.EVALUATE and site.last_round < 0:
                self._untrained_allowance(msg, None)
            self._sites.move_to_end(msg.job)
            return site

    def _untrained_allowance(self, msg: Message, plan: Plan | None) -> None:
        """Refuses an EVALUATE in a job whose Site has answered no TRAIN once the node's allowance for such
        answers is spent: :data:`UNTRAINED_EVALUATIONS` for each job it trained in, and as many to start.

        A Site scores at most two models it was never sent for training, per job; a coordinator free to
        name new jobs (or to push a job out of the node's memory and reopen it) got two more with each
        name, at no cost.  The allowance is the node's, earned by training (a round charged to the ledger
        under DP, a completed masked round under secure aggregation), so no job name mints answers; an
        honest site that missed a job's first rounds still scores its models.  Checked before anything is built."""
        if plan is not None:
            try:
                self.check_task(plan)  # an unapproved plan is refused as such, and kept for review
            except PolicyViolation as exc:
                self._refused_plan(msg.job, plan, exc)
                raise
        allowed = UNTRAINED_EVALUATIONS * (1 + len(self._trained_jobs))
        if self._untrained_answers >= allowed:
            raise ProtocolError(
                f"site {self.site_id} refuses to evaluate for job {msg.job!r}: it has answered no train request of that job (with this "
                f"plan, since it started), and it already scored {self._untrained_answers} model(s) in jobs it had not trained in "
                f"(allowance {allowed}: {UNTRAINED_EVALUATIONS} for each of the {len(self._trained_jobs)} job(s) it trained in, and "
                f"{UNTRAINED_EVALUATIONS} to start); a deployed site scores models of the jobs it trains in")

    def _build(self, job: str, plan: Plan) -> Site:
        try:
            self.check_task(plan)  # before anything is built or charged
        except PolicyViolation as exc:
            self._refused_plan(job, plan, exc)
            raise
        early = self._early.pop(job, None)
        if early is not None and plan.protection.kind is Protection.PLAIN:
            raise ProtocolError(f"job {job!r} ran a key agreement but its plan {plan.content_hash()[:12]} is not protected")
        site = build_site(plan, self.site_id, self.data, secret=self.secret_for(job), ledger=self.ledger,
                          guards=[lambda _site, _msg, ins: self.guard(plan, ins)],
                          attestation=self.attestation if plan.protection.secure else None,
                          min_group=self.policy.min_secagg_group, protection=early, job=job)
        self._sites[job] = site
        while len(self._sites) > MAX_JOBS:
            old, _ = self._sites.popitem(last=False)
            self._plans.pop(old, None)
        return site

    def _refused_plan(self, job: str, plan: Plan, exc: Exception) -> None:
        if isinstance(exc, TaskNotApproved):
            self.approvals.remember_refused(plan, str(exc), job=job)

    def _refused(self, msg: Message, exc: Exception) -> None:
        log.warning("refused %s for job %s round %d: %s", msg.kind.value, msg.job, msg.round, exc)
        entry: dict[str, Any] = {"at": time.time(), "job": msg.job, "round": msg.round, "kind": msg.kind.value,
                                 "error": type(exc).__name__, "reason": str(exc)}
        try:
            held = self._plans.get(msg.job)
            if "plan" not in msg.meta and held is not None and msg.meta.get(PLAN_REF_KEY) == held.content_hash():
                plan = held  # named by its hash: the plan this site holds for the job
            else:
                plan = Plan.from_meta(msg.meta.get("plan"))
            entry["plan_hash"] = plan.content_hash()
            if isinstance(exc, TaskNotApproved):
                self.approvals.remember_refused(plan, str(exc), job=msg.job)
        except ConfigError:
            pass
        with (self.policy.state / "refusals.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")


def site_identity(cert: Path) -> str:
    """The site's name as the coordinator will see it: the CN of its own certificate."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    c = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    return str(c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def build_node(config: str | Path) -> tuple[SiteNode, SiteClient]:
    policy = SitePolicy.load(config)
    policy.state.mkdir(parents=True, exist_ok=True)
    name = site_identity(policy.cert)
    data, schema = site_records(policy, name)
    node = SiteNode(policy, name, data, schema=schema)
    client = SiteClient(
        Credentials(policy.cert, policy.key, policy.ca),
        DialConfig(policy.coordinator[0], policy.coordinator[1], heartbeat=policy.heartbeat, dead_after=policy.dead_after,
                   backoff_max=policy.backoff_max),
        node.handle, hello={"n_train": data.n_train, "n_test": data.n_test, **_budget_hello(policy)},
    )
    return node, client


def _budget_hello(policy: SitePolicy) -> dict[str, float]:
    """The privacy limit this site declares to the coordinator, so that operators see each site's ε against it."""
    return {"epsilon_budget": policy.epsilon_budget, "delta": policy.delta} if policy.epsilon_budget is not None else {}


def serve(config: str | Path, *, console_port: int | None = None) -> None:
    """Run the site until interrupted; reconnects to the coordinator on its own.  With
    ``console_port`` the data officer's console (insitu.site.console) is served by this same
    process on 127.0.0.1 (0: any free port); its login link is written to ``state/console.url``."""
    import signal

    node, client = build_node(config)
    log.info("site %s: %d train / %d test records; dialling %s:%d", node.site_id, node.data.n_train, node.data.n_test, *node.policy.coordinator)
    console = None
    if console_port is not None:
        from insitu.site.console import start_console

        app, console, _ = start_console(config, port=console_port)
        log.info("site %s: console on http://127.0.0.1:%d (this machine only); a one-time login link is in %s",
                 node.site_id, console.port, node.policy.state / "console.url")
    signal.signal(signal.SIGTERM, _exit_on_signal)
    # load the secure-aggregation code while idle, not during the first secure round (~2 s)
    threading.Thread(target=_preload, daemon=True, name="preload").start()
    from insitu.learn.train import torch_threads

    try:
        with torch_threads(node.policy.threads):  # one training worker, one thread unless the admin says otherwise
            client.run_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        client.stop()
        if console is not None:
            console.stop()


def _preload() -> None:
    import importlib

    importlib.import_module("insitu.secure")


def _exit_on_signal(signum, frame) -> None:
    """SIGTERM interrupts the blocking read at once (closing the socket from a handler does not)."""
    raise SystemExit(0)


__all__ = ["SiteNode", "build_node", "serve", "load_site_data"]

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
* a task whose data schema is not this site's.

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

import pandas as pd
import torch

from insitu.data.dataset import SiteData
from insitu.errors import BudgetExceeded, ConfigError, DataError, PolicyViolation, ProtocolError, TaskNotApproved
from insitu.federation.messages import Message, MessageKind
from insitu.federation.pipeline import SitePipeline
from insitu.federation.site import Site
from insitu.federation.task import TaskSpec
from insitu.net.client import DialConfig, SiteClient
from insitu.net.pki import Credentials
from insitu.net.protocols import ProtocolName, protocol_of, site_protection
from insitu.site.policy import Approvals, DataSource, SitePolicy, check_group, check_ranges

log = logging.getLogger("insitu.site")
MAX_JOBS = 8  # Site objects kept (one per recent job)


def load_site_data(policy: SitePolicy) -> tuple[SiteData, int]:
    """This site's records and its seed stream (the index simulation would give it, plus one)."""
    if policy.source is DataSource.HEART:
        from insitu.data.heart import SITE_NAMES, load_heart

        name = str(policy.data.get("hospital", ""))
        if name not in SITE_NAMES:
            raise ConfigError(f"[data] hospital must be one of {list(SITE_NAMES)}, got {name!r}")
        fed = load_heart(policy.data.get("csv"))
        i = SITE_NAMES.index(name)
        return fed.sites[i], int(policy.data.get("seed_stream", i + 1))
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
    return SiteData("csv", xtr, ytr, xte, yte), int(policy.data.get("seed_stream", 1))


class SiteNode:
    """Answers the coordinator's requests for every job, one Site per job."""

    def __init__(self, policy: SitePolicy, site_id: str, data: SiteData, stream: int, *, schema: tuple[str, ...] | None = None):
        self.policy = policy
        self.site_id = site_id
        self.data = data
        self.stream = stream
        self.schema = schema
        self.approvals = Approvals(policy.state, policy.approved)
        self.ledger: Any = None  # the site's own privacy ledger (SQLite in its state directory), with a budget
        if policy.epsilon_budget is not None:
            from insitu.privacy import Budget, PrivacyLedger

            self.ledger = PrivacyLedger(Path(policy.state) / "privacy_ledger.sqlite")
            self.ledger.set_budget(site_id, Budget(policy.epsilon_budget, policy.delta))
        self._sites: OrderedDict[str, Site] = OrderedDict()
        self._early: dict[str, Any] = {}  # job → protocol site half created by a phase before TRAIN
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

    def _protection(self, protocol: str) -> Any:
        """This site's half of ``protocol``; secure aggregation signs and checks keys (see attestation)."""
        signed = protocol != ProtocolName.PLAIN.value  # secure aggregation and homomorphic key dealing
        return site_protection(protocol, self.site_id, min_group=self.policy.min_secagg_group, attestation=self.attestation if signed else None)

    # -- the guard the round engine calls before training ------------------------------------
    def guard(self, site: Site, msg: Message, task: TaskSpec) -> None:
        self.check_task(task)
        check_group(str(msg.meta.get("protocol", "plain")), int(msg.meta.get("group", 1)), self.policy.min_secagg_group)
        self.check_dp(task)

    def check_dp(self, task: TaskSpec) -> Any:
        """The site's DP rule: with a budget only record-level DP tasks run (charged to its own
        ledger before training); without one, no DP task runs (nothing could cap it)."""
        from insitu.federation.dp import TaskDP

        try:
            dp = TaskDP.of(task)
        except ConfigError as exc:
            raise PolicyViolation(f"task {task.content_hash()[:12]} refused: {exc}") from None
        if self.ledger is not None and dp is None:
            raise BudgetExceeded(
                f"task {task.content_hash()[:12]} declares no differential privacy; this site has a privacy budget of "
                f"ε={self.policy.epsilon_budget:g} and runs only record-level DP tasks (dp = \"record\", noise_multiplier, clip)")
        if self.ledger is None and dp is not None:
            raise PolicyViolation(
                f"task {task.content_hash()[:12]} asks for record-level DP but this site has no privacy budget to account it "
                "against: set [policy] epsilon_budget (and delta) in site.toml")
        return dp

    def check_task(self, task: TaskSpec) -> None:
        self.approvals.check(task)
        check_ranges(task, self.policy.ranges)
        if self.schema is not None and tuple(task.schema) != tuple(self.schema):
            raise TaskNotApproved(f"task schema {list(task.schema)} is not this site's data schema {list(self.schema)}")
        if tuple(task.input_shape) != tuple(self.data.X_train.shape[1:]):
            raise TaskNotApproved(f"task input shape {task.input_shape} does not match this site's records {tuple(self.data.X_train.shape[1:])}")

    # -- dispatch ------------------------------------------------------------------------------
    def handle(self, msg: Message) -> Message:
        early = self._early_phase(msg)
        if early is not None:
            return early
        try:
            site = self._site_for(msg)
            if msg.kind is MessageKind.EVALUATE:
                self.check_task(site.task)  # scoring a model on local test data is also an approved use only
            reply = site.handle(msg)
        except PolicyViolation as exc:
            self._refused(msg, exc)
            raise
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
                prot = self._protection(proto.value)
                self._early[msg.job] = prot
                while len(self._early) > MAX_JOBS:
                    self._early.pop(next(iter(self._early)))
        handler = prot.handlers().get(msg.kind)
        if handler is None:
            raise ProtocolError(f"{msg.kind.value} for job {msg.job!r} before key agreement")
        return handler(msg)

    def _site_for(self, msg: Message) -> Site:
        with self._lock:
            site = self._sites.get(msg.job)
            if msg.kind in (MessageKind.TRAIN, MessageKind.EVALUATE):
                task = TaskSpec.from_meta(msg.require("task", dict))
                seed = msg.meta.get("seed")
                if isinstance(seed, bool) or (seed is not None and not isinstance(seed, int)):
                    raise ProtocolError(f"seed {seed!r} is not an integer")
                protocol = str(msg.meta.get("protocol", "plain"))
                rebuild = (
                    site is None or site.task.content_hash() != task.content_hash()
                    or (msg.kind is MessageKind.TRAIN and site.last_round < 0 and seed is not None and site.seed != self._seed(seed))
                    or getattr(site, "protocol_name", "plain") != protocol and msg.kind is MessageKind.TRAIN
                )
                if rebuild:
                    if site is not None and getattr(site, "protocol_name", "plain") == protocol:
                        self._early.setdefault(msg.job, site.pipeline.protection)  # keep key-agreement state
                    site = self._build(msg.job, task, self._seed(seed or 0), protocol)
            if site is None:
                raise ProtocolError(f"{msg.kind.value} for job {msg.job!r} before any train or evaluate request")
            self._sites.move_to_end(msg.job)
            return site

    def _seed(self, job_seed: int) -> int:
        return job_seed * 1000 + self.stream  # as simulation seeds its i-th site: seed·1000 + i + 1

    def _build(self, job: str, task: TaskSpec, seed: int, protocol: str) -> Site:
        prot = self._early.pop(job, None) or self._protection(protocol)
        site = Site(self.site_id, self.data, task, pipeline=SitePipeline(protection=prot),
                    guards=[self.guard], seed=seed)
        site.protocol_name = protocol  # type: ignore[attr-defined]
        if self.ledger is not None:
            from insitu.federation.dp import TaskDP

            try:
                dp = TaskDP.of(task)
            except ConfigError:
                dp = None  # self.guard refuses the task before any training
            if dp is not None:
                dp.install(site, self.ledger)  # after self.guard: approval is checked before anything is charged
        self._sites[job] = site
        while len(self._sites) > MAX_JOBS:
            self._sites.popitem(last=False)
        return site

    def _refused(self, msg: Message, exc: Exception) -> None:
        log.warning("refused %s for job %s round %d: %s", msg.kind.value, msg.job, msg.round, exc)
        entry: dict[str, Any] = {"at": time.time(), "job": msg.job, "round": msg.round, "kind": msg.kind.value,
                                 "error": type(exc).__name__, "reason": str(exc)}
        try:
            task = TaskSpec.from_meta(msg.meta.get("task"))
            entry["task_hash"] = task.content_hash()
            if isinstance(exc, TaskNotApproved):
                self.approvals.remember_refused(task, str(exc))
        except ProtocolError:
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
    data, stream = load_site_data(policy)
    policy.state.mkdir(parents=True, exist_ok=True)
    schema = None
    if policy.source is DataSource.HEART:
        from insitu.data.heart import FEATURES

        schema = tuple(FEATURES)
    name = site_identity(policy.cert)
    node = SiteNode(policy, name, data, stream, schema=schema)
    client = SiteClient(
        Credentials(policy.cert, policy.key, policy.ca),
        DialConfig(policy.coordinator[0], policy.coordinator[1], heartbeat=policy.heartbeat, dead_after=policy.dead_after,
                   backoff_max=policy.backoff_max),
        node.handle, hello={"n_train": data.n_train, "n_test": data.n_test},
    )
    return node, client


def serve(config: str | Path) -> None:
    """Run the site until interrupted; reconnects to the coordinator on its own."""
    import signal

    node, client = build_node(config)
    log.info("site %s: %d train / %d test records; dialling %s:%d", node.site_id, node.data.n_train, node.data.n_test, *node.policy.coordinator)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    # load the secure-aggregation code while idle, not during the first secure round (~2 s)
    threading.Thread(target=_preload, daemon=True, name="preload").start()
    try:
        client.run_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        client.stop()


def _preload() -> None:
    import importlib

    importlib.import_module("insitu.secure")


def _exit_on_signal(signum, frame) -> None:
    """SIGTERM interrupts the blocking read at once (closing the socket from a handler does not)."""
    raise SystemExit(0)


__all__ = ["SiteNode", "build_node", "serve", "load_site_data"]

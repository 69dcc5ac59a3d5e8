"""The site half of the round engine: a handler from request message to reply message.

The same :class:`Site` answers in-process (simulation) and behind an mTLS
channel (deployment).  It holds the site's data and never sends a record; only
the pipeline's output leaves it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from insitu.data.dataset import SiteData
from insitu.errors import ProtocolError
from insitu.federation.messages import Message, MessageKind
from insitu.federation.pipeline import SitePipeline
from insitu.federation.egress import Egress
from insitu.federation.instructions import EvalInstructions, RoundInstructions, Split
from insitu.federation.planref import PLAN_KEY, PLAN_REF_KEY, parse_plan_ref, unknown_plan
from insitu.federation.task import TaskSpec, canonical_hash
from insitu.learn.models import get_flat, num_params, set_flat
from insitu.learn.train import TrainConfig, evaluate, train_local

#: called with (site, request, instructions) before any training; raises to refuse the round.
Guard = Callable[["Site", Message, RoundInstructions], None]
#: trains the model in place; returns metrics.  DP-SGD when the plan asks for record-level DP.
Trainer = Callable[["Site", torch.nn.Module, TrainConfig, Message], dict[str, Any]]

#: keys a TRAIN / EVALUATE request may carry besides those the site's protection declares
#: (exactly one of "plan" and "plan_hash": insitu.federation.planref)
TRAIN_KEYS = frozenset({PLAN_KEY, PLAN_REF_KEY, "instructions"})
EVALUATE_KEYS = frozenset({PLAN_KEY, PLAN_REF_KEY, "instructions"})


def default_trainer(site: "Site", model: torch.nn.Module, cfg: TrainConfig, request: Message) -> dict[str, Any]:
    correction = site.scaffold_correction(request, model)
    return train_local(model, site.data.X_train, site.data.y_train, cfg, site.generator, num_outputs=site.task.num_outputs, correction=correction)


@dataclass
class Site:
    """One hospital in a job: parses each request strictly, trains, and sends only the pipeline's output.

    Made by :func:`insitu.builder.build_site` from a plan; nothing is swapped after construction.
    ``plan_hash`` is the approved plan's hash: a request naming any other plan is refused.
    ``sampling_seed`` seeds minibatch sampling and comes from the site's secret, never from the
    coordinator."""

    site_id: str
    data: SiteData
    task: TaskSpec
    plan_hash: str
    train_config: TrainConfig
    scaffold: bool = False
    weighting: str = "samples"
    pipeline: SitePipeline = field(default_factory=SitePipeline)
    guards: tuple[Guard, ...] = ()
    trainer: Trainer = default_trainer
    sampling_seed: int = 0
    budget: Any = None  # the DP budget guard, when the plan asks for DP (its charges feed reports)
    egress: Egress | None = None  # what this site may send; None: nothing is checked (engine unit tests only)
    #: models a site scores without having received them for training (the final model, a round it missed)
    max_unverified_evaluations: int = 2
    #: the site half of downlink compression (insitu.compress.downlink): rebuilds the model from a delta
    #: against the one it holds, and vouches for the global model an int8 delta approximated.  None: dense only
    downlink: Any = None
    handlers: dict[MessageKind, Callable[[Message], Message]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model = self.task.build_model(seed=0)  # built here, from the plan's specification
        self.size = num_params(self.model)
        self.generator = torch.Generator().manual_seed(self.sampling_seed)
        self.control: np.ndarray | None = None  # Scaffold's cᵢ, kept between rounds
        self.last_round = -1
        self.guards = tuple(self.guards)
        self.handlers.update(self.pipeline.protection.handlers())
        self._request_keys = frozenset(getattr(self.pipeline.protection, "request_keys", ()))
        self._eval_keys = EVALUATE_KEYS
        if self.downlink is not None:
            self._request_keys |= self.downlink.request_keys
            self._eval_keys |= self.downlink.request_keys
        self._plan_jobs: set[str] = set()  # jobs in which a request carried this site's whole plan (then its hash may)
        self._received: set[str] = set()  # hashes of the global models this site was sent for training
        self._unverified: list[str] = []  # models scored before (or without) being sent for training
        self._threshold_answered = False  # the Score 1 threshold (one validation record's risk) is answered once

    # -- dispatch ---------------------------------------------------------------------------
    def handle(self, msg: Message) -> Message:
        if msg.kind is MessageKind.TRAIN:
            reply = self._train(msg)
        elif msg.kind is MessageKind.EVALUATE:
            reply = self._evaluate(msg)
        elif msg.kind is MessageKind.PERSONALIZE:
            from insitu.federation.personalize import site_personalize

            reply = site_personalize(self, msg)  # fine-tunes a copy here; only its test scores leave
        else:
            handler = self.handlers.get(msg.kind)
            if handler is None:
                raise ProtocolError(f"site {self.site_id} does not answer {msg.kind.value} messages")
            reply = handler(msg)
        return self.egress.check(reply) if self.egress is not None else reply

    def _check_plan(self, msg: Message, allowed: frozenset[str]) -> None:
        unknown = sorted(set(msg.meta) - allowed)
        if unknown:
            raise ProtocolError(f"{msg.kind.value} request carries undeclared field(s) {unknown}; site {self.site_id} accepts {sorted(allowed)}")
        if (PLAN_KEY in msg.meta) == (PLAN_REF_KEY in msg.meta):
            raise ProtocolError(f"{msg.kind.value} request must carry exactly one of 'plan' (the whole plan) and 'plan_hash' "
                                f"(a plan this site already checked in this job); it carries {'both' if PLAN_KEY in msg.meta else 'neither'}")
        if PLAN_KEY in msg.meta:
            h = canonical_hash(msg.require(PLAN_KEY, dict))
            if h != self.plan_hash:
                raise ProtocolError(f"plan {h[:12]} is not the plan this site runs ({self.plan_hash[:12]})")
            self._plan_jobs.add(msg.job)
            return
        h = parse_plan_ref(msg.meta[PLAN_REF_KEY])
        if h != self.plan_hash:
            raise unknown_plan(self.site_id, h, msg.job, f"it runs plan {self.plan_hash}")
        if msg.job not in self._plan_jobs:
            raise unknown_plan(self.site_id, h, msg.job, "no request of this job carried that plan whole to it yet")

    def _train(self, msg: Message) -> Message:
        self._check_plan(msg, TRAIN_KEYS | self._request_keys)
        ins = RoundInstructions.from_meta(msg.require("instructions", dict))
        if msg.round <= self.last_round:
            raise ProtocolError(f"round {msg.round} replayed: site {self.site_id} already trained round {self.last_round}")
        # a delta against a model this site does not hold is refused here, before any guard charges a budget
        received = self.downlink.receive(msg, self.size) if self.downlink is not None else None
        for guard in self.guards:
            guard(self, msg, ins)  # refusals happen here, before any training
        params = received if received is not None else msg.tensor("params", shape=(self.size,), dtype="float32")
        if not np.all(np.isfinite(params)):
            raise ProtocolError("global parameters hold NaN or infinite values")
        set_flat(self.model, params)
        cfg = self.train_config
        if ins.lr_scale != 1.0:
            cfg = dataclasses.replace(cfg, lr=cfg.lr * ins.lr_scale)
        info: dict[str, Any] = dict(self.trainer(self, self.model, cfg, msg))
        delta = get_flat(self.model).astype(np.float64) - params.astype(np.float64)
        update = delta
        if self.scaffold:
            update = np.concatenate([delta, self._scaffold_update(msg, delta, cfg)])
        weight = float(self.data.n_train) if self.weighting == "samples" else 1.0
        try:
            meta, tensors = self.pipeline.run(msg, ins, update, weight, info)
        except Exception:
            # trained, not sent: the round is spent, so no other model is tried on it (whether an update fits
            # the encoding the coordinator announced is one bit about it: tests/attacks)
            self.last_round = max(self.last_round, msg.round)
            raise
        # only a TRAIN answered makes its model one this site may score again: a refused or failed TRAIN
        # (a guard, a missing key agreement) would otherwise vouch for any model at no cost (tests/attacks)
        self._received.add(_model_hash(params))
        if self.downlink is not None:
            self.downlink.accept()
        self.last_round = msg.round
        if self.egress is not None:
            meta["metrics"] = self.egress.allowed_metrics(info)
        else:
            meta["metrics"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
        return Message(MessageKind.TRAIN_REPLY, msg.round, msg.job, meta, tensors)

    def _evaluate(self, msg: Message) -> Message:
        self._check_plan(msg, self._eval_keys)
        ins = EvalInstructions.from_meta(msg.require("instructions", dict))
        if ins.threshold and self._threshold_answered:  # one record's exact risk score: once per job (tests/attacks)
            raise ProtocolError(f"site {self.site_id} already answered its Score 1 threshold for job {msg.job!r}; it answers it once per job")
        # a lossless delta against the model this site holds rebuilds exactly the model asked about
        params = self.downlink.rebuild(msg, self.size) if self.downlink is not None else msg.tensor("params", shape=(self.size,), dtype="float32")
        if not np.all(np.isfinite(params)):
            raise ProtocolError("parameters to evaluate hold NaN or infinite values")
        self._verify_for_evaluation(_model_hash(params), msg, params)
        if self.downlink is not None:
            self.downlink.hold(params)  # the next delta is taken against it (the coordinator keeps the same copy)
        set_flat(self.model, params)
        if ins.split is Split.TEST:
            X, y = self.data.X_test, self.data.y_test
        elif self.data.X_val is not None:
            X, y = self.data.X_val, self.data.y_val
        else:
            raise ProtocolError(f"site {self.site_id} has no {ins.split.value!r} split to evaluate on")
        if len(y) == 0:
            raise ProtocolError(f"site {self.site_id} has no records in its {ins.split.value!r} split to score")
        res = evaluate(self.model, X, y, num_outputs=self.task.num_outputs, by_class=True)
        if ins.threshold and self.task.num_outputs == 1:  # asked for: the site's own Score 1 threshold (insitu.learn.clinical)
            from insitu.learn.clinical import risk_scores, site_threshold

            res["threshold"] = site_threshold(y.numpy().astype(int), risk_scores(self.model, X))
            self._threshold_answered = True
        return Message(MessageKind.EVALUATE_REPLY, msg.round, msg.job, res)

    def _verify_for_evaluation(self, h: str, msg: Message, params: np.ndarray) -> None:
        """Evaluation is a release: a site scores only global models of this job — one it was sent for
        training, or one of at most ``max_unverified_evaluations`` others (the final model; the model
        of a round it missed).  Arbitrary parameters, the evaluation oracle, are refused."""
        vouched = self.downlink.vouched if self.downlink is not None else ()
        if h in self._received or h in vouched or h in self._unverified:
            return  # the same question twice gets the same answer: nothing new leaves
        if self.downlink is not None and self.downlink.vouch(h, params):
            return  # the global model an int8 delta this site trained from approximated
        pending = [x for x in self._unverified if x not in self._received and x not in vouched]
        if len(pending) >= self.max_unverified_evaluations:
            raise ProtocolError(
                f"site {self.site_id} refuses to evaluate model {h[:12]}: it was never sent to this site for training, and "
                f"{len(pending)} such model(s) were already scored for job {msg.job!r} (limit {self.max_unverified_evaluations}); "
                "a site scores only global models of its job")
        self._unverified.append(h)
        if self.downlink is not None:
            self.downlink.remember(h, params)  # the next int8 delta may turn out to approximate it

    # -- Scaffold (Karimireddy et al. 2020, option II) ------------------------------------------
    def scaffold_correction(self, msg: Message, model: torch.nn.Module) -> list[torch.Tensor] | None:
        if not self.scaffold:
            return None
        c = msg.tensor("control", shape=(self.size,), dtype="float32").astype(np.float64)
        ci = self.control if self.control is not None else np.zeros(self.size)
        corr = torch.from_numpy((c - ci).astype(np.float32))
        out, i = [], 0
        for p in model.parameters():
            out.append(corr[i : i + p.numel()].view_as(p))
            i += p.numel()
        return out

    def _scaffold_update(self, msg: Message, delta: np.ndarray, cfg: TrainConfig) -> np.ndarray:
        c = msg.tensor("control").astype(np.float64)
        ci = self.control if self.control is not None else np.zeros(self.size)
        ci_new = ci - c - delta / (cfg.steps * cfg.lr)
        dc = ci_new - ci
        self.control = ci_new
        return dc


def _model_hash(params: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(params, dtype="<f4").tobytes()).hexdigest()

"""The site half of the round engine: a handler from request message to reply message.

The same :class:`Site` answers in-process (simulation) and behind an mTLS
channel (deployment).  It holds the site's data and never sends a record; only
the pipeline's output leaves it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from insitu.data.dataset import SiteData
from insitu.errors import ProtocolError
from insitu.federation.messages import Message, MessageKind
from insitu.federation.pipeline import SitePipeline
from insitu.federation.task import TaskSpec
from insitu.learn.models import build_model, get_flat, num_params, set_flat
from insitu.learn.train import TrainConfig, evaluate, train_local

#: called with (site, request, task) before any training; raises to refuse the round.
Guard = Callable[["Site", Message, TaskSpec], None]
#: trains the model in place; returns metrics.  Replaced by DP-SGD when record-level DP is on.
Trainer = Callable[["Site", torch.nn.Module, TrainConfig, Message], dict[str, Any]]


def default_trainer(site: "Site", model: torch.nn.Module, cfg: TrainConfig, request: Message) -> dict[str, Any]:
    correction = site.scaffold_correction(request, model)
    return train_local(model, site.data.X_train, site.data.y_train, cfg, site.generator, num_outputs=site.task.num_outputs, correction=correction)


@dataclass
class Site:
    site_id: str
    data: SiteData
    task: TaskSpec
    pipeline: SitePipeline = field(default_factory=SitePipeline)
    guards: list[Guard] = field(default_factory=list)
    trainer: Trainer = default_trainer
    seed: int = 0
    handlers: dict[MessageKind, Callable[[Message], Message]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model = build_model(self.task.model, self.task.input_shape, self.task.num_outputs, seed=self.seed)
        self.size = num_params(self.model)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.control: np.ndarray | None = None  # Scaffold's cᵢ, kept between rounds
        self.last_round = -1
        self.handlers.update(self.pipeline.protection.handlers())

    # -- dispatch ---------------------------------------------------------------------------
    def handle(self, msg: Message) -> Message:
        if msg.kind is MessageKind.TRAIN:
            return self._train(msg)
        if msg.kind is MessageKind.EVALUATE:
            return self._evaluate(msg)
        handler = self.handlers.get(msg.kind)
        if handler is None:
            raise ProtocolError(f"site {self.site_id} does not answer {msg.kind.value} messages")
        return handler(msg)

    def _task_of(self, msg: Message) -> TaskSpec:
        task = TaskSpec.from_meta(msg.require("task", dict))
        if task.content_hash() != self.task.content_hash():
            raise ProtocolError(f"task {task.content_hash()[:12]} is not the task this site runs ({self.task.content_hash()[:12]})")
        return task

    def _train(self, msg: Message) -> Message:
        task = self._task_of(msg)
        if msg.round <= self.last_round:
            raise ProtocolError(f"round {msg.round} replayed: site {self.site_id} already trained round {self.last_round}")
        for guard in self.guards:
            guard(self, msg, task)  # refusals happen here, before any training
        params = msg.tensor("params", shape=(self.size,), dtype="float32")
        if not np.all(np.isfinite(params)):
            raise ProtocolError("global parameters hold NaN or infinite values")
        set_flat(self.model, params)
        cfg = task.train_config()
        scale = msg.meta.get("lr_scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0.0 < scale <= 1.0:
            raise ProtocolError(f"lr_scale {scale!r} must be in (0, 1]: a coordinator may lower, never raise, the approved learning rate")
        if scale != 1.0:
            cfg = dataclasses.replace(cfg, lr=cfg.lr * float(scale))
        info: dict[str, Any] = dict(self.trainer(self, self.model, cfg, msg))
        delta = get_flat(self.model).astype(np.float64) - params.astype(np.float64)
        update = delta
        if msg.meta.get("scaffold"):
            update = np.concatenate([delta, self._scaffold_update(msg, delta, cfg)])
        weight = float(self.data.n_train) if msg.meta.get("weighting", "samples") == "samples" else 1.0
        meta, tensors = self.pipeline.run(msg, update, weight, info)
        self.last_round = msg.round
        meta["metrics"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
        return Message(MessageKind.TRAIN_REPLY, msg.round, msg.job, meta, tensors)

    def _evaluate(self, msg: Message) -> Message:
        self._task_of(msg)
        params = msg.tensor("params", shape=(self.size,), dtype="float32")
        set_flat(self.model, params)
        split = msg.meta.get("split", "test")
        if split == "test":
            X, y = self.data.X_test, self.data.y_test
        elif split == "val" and self.data.X_val is not None:
            X, y = self.data.X_val, self.data.y_val
        else:
            raise ProtocolError(f"site {self.site_id} has no {split!r} split to evaluate on")
        res = evaluate(self.model, X, y, num_outputs=self.task.num_outputs)
        return Message(MessageKind.EVALUATE_REPLY, msg.round, msg.job, res)

    # -- Scaffold (Karimireddy et al. 2020, option II) ------------------------------------------
    def scaffold_correction(self, msg: Message, model: torch.nn.Module) -> list[torch.Tensor] | None:
        if not msg.meta.get("scaffold"):
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

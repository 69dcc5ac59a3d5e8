"""Personalisation as a site operation: the coordinator asks, the site fine-tunes and answers scores.

After federation the coordinator sends each site a PERSONALIZE request carrying the final global
model and the number of steps.  The site (:func:`site_personalize`, called from
:meth:`insitu.federation.site.Site.handle`) checks the request like an evaluation — the approved
plan, and a model of this job, never arbitrary parameters (the evaluation oracle) — fine-tunes a
copy of it on its own training split with :func:`insitu.learn.personalize.fine_tune`, choosing the
checkpoint on its own validation split (or, the request's ``mode = "ensemble"``, trains a model of
its own and mixes it with the global model: :func:`insitu.learn.personalize.own_model_mixture`; ``"complement"``:
the same, the own model's checkpoint chosen by the mixture's validation score), and answers only the personalised model's metrics on its
own test split: the fields of :data:`insitu.federation.egress.PERSONALIZE_REPLY`.  The
personalised parameters are never put in any message; the model is each hospital's own (a
deployment keeps it at the site; the simulation drops it after scoring).

For a binary (clinical) task the metrics are those of :mod:`insitu.learn.clinical`: AUROC, AUPRC,
Score 1 and accuracy at the Score 1 threshold chosen on the site's own validation split (0.5 if it
holds no positive record), and accuracy at 0.5.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from insitu.errors import ConfigError, ProtocolError, parse_choice
from insitu.federation.messages import Message, MessageKind

if TYPE_CHECKING:
    from insitu.federation.coordinator import Coordinator
    from insitu.federation.site import Site

#: keys a PERSONALIZE request may carry ("mode": insitu.learn.personalize.PersonalMode, default finetune)
PERSONALIZE_KEYS = frozenset({"plan", "steps", "lr", "mode"})
#: every key of a PERSONALIZE_REPLY (binary tasks add CLINICAL_KEYS)
BASE_KEYS = ("n", "accuracy", "best_step", "steps", "val_metric", "val_start", "val_best")
CLINICAL_KEYS = ("auroc", "auprc", "score1", "sensitivity", "ppv", "threshold", "threshold_source", "accuracy_at_0.5", "positives")


def site_personalize(site: "Site", msg: Message) -> Message:
    """The site half: fine-tune the sent global model on this site's records; reply its test metrics only."""
    from insitu.learn.clinical import risk_scores
    from insitu.learn import metrics as M
    from insitu.learn.personalize import PersonalMode, check_steps, fine_tune, own_model_mixture
    from insitu.learn.train import evaluate

    site._check_plan(msg, PERSONALIZE_KEYS)
    if site.budget is not None:  # a DP plan: fine-tuning is not private, its scores would release what DP protects
        raise ProtocolError(f"site {site.site_id} runs a differentially private plan and does not personalise (the fine-tuning is not private)")
    try:
        steps = check_steps(msg.meta.get("steps"), "personalize request steps")
    except ConfigError as exc:
        raise ProtocolError(str(exc)) from None
    if steps == 0:
        raise ProtocolError("personalize request asks for 0 steps")
    mode = parse_choice(PersonalMode, msg.meta.get("mode", PersonalMode.FINETUNE.value), "personalize request mode", ProtocolError)
    lr = msg.meta.get("lr", site.train_config.lr)  # default: the rate this site trains with every round
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 1:
        raise ProtocolError(f"personalize request lr must be a number in (0, 1], got {lr!r}")
    params = msg.tensor("params", shape=(site.size,), dtype="float32")
    if not np.all(np.isfinite(params)):
        raise ProtocolError("parameters to personalise hold NaN or infinite values")
    from insitu.federation.site import _model_hash

    site._verify_for_evaluation(_model_hash(params), msg, params)  # only a global model of this job
    from insitu.learn.models import set_flat

    set_flat(site.model, params)
    d = site.data
    if d.X_val is None or d.X_val.shape[0] == 0:
        raise ProtocolError(f"site {site.site_id} has no validation split to choose its fine-tuning checkpoint on")
    cfg = dataclasses.replace(site.train_config, prox_mu=0.0, lr=float(lr))
    every = max(1, min(site.train_config.steps, steps))  # one round's worth of local steps between checks
    if mode in (PersonalMode.ENSEMBLE, PersonalMode.COMPLEMENT):  # a model of the site's own, from a fresh initialisation its secret seeds
        fresh = site.task.build_model(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=site.generator)))
        model, ft = own_model_mixture(site.model, fresh, d.X_train, d.y_train, d.X_val, d.y_val, cfg, site.generator,
                                      num_outputs=site.task.num_outputs, steps=steps, every=every,
                                      stop_on_mixture=mode is PersonalMode.COMPLEMENT)
    else:
        model, ft = fine_tune(site.model, d.X_train, d.y_train, d.X_val, d.y_val, cfg, site.generator,
                              num_outputs=site.task.num_outputs, steps=steps, every=every)
    meta: dict[str, Any] = {"best_step": ft.best_step, "steps": ft.steps_run, "val_metric": ft.metric,
                            "val_start": ft.val_start, "val_best": ft.val_best}
    if site.task.num_outputs == 1:
        yv, sv = d.y_val.numpy().astype(int), risk_scores(model, d.X_val)
        yt, st = d.y_test.numpy().astype(int), risk_scores(model, d.X_test)
        own = M.best_threshold(yv, sv) if yv.any() else None
        m = M.clinical_metrics(yt, st, own if own is not None else 0.5).as_dict()
        meta.update(m)
        meta["threshold_source"] = "site validation" if own is not None else "0.5 (no positive validation record)"
        meta["accuracy_at_0.5"] = M.accuracy(yt, st, 0.5)
    else:
        ev = evaluate(model, d.X_test, d.y_test, num_outputs=site.task.num_outputs)
        meta.update({"n": ev["n"], "accuracy": ev["accuracy"]})
    meta = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in meta.items()}
    return Message(MessageKind.PERSONALIZE_REPLY, msg.round, msg.job, meta)


def personalize_sites(coord: "Coordinator", round_: int, steps: int, lr: float | None = None,
                      mode: str = "finetune") -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The coordinator half: ask every site to personalise the coordinator's current global model
    (``lr``: the fine-tuning learning rate; None: each site's training rate; ``mode``: a
    :class:`~insitu.learn.personalize.PersonalMode` value).

    Returns (site → its reply's metrics, site → why it gave none)."""
    from insitu.federation.transport import check_reply

    meta: dict[str, Any] = {"plan": coord._plan_meta, "steps": int(steps), **({"lr": float(lr)} if lr is not None else {}),
                            **({"mode": str(mode)} if str(mode) != "finetune" else {})}
    req = Message(MessageKind.PERSONALIZE, round_, coord.job, meta,
                  {"params": np.asarray(coord.params, dtype=np.float32)})
    ex = coord.transport.exchange({s: req for s in coord._sites()}, coord.timeout)
    out: dict[str, dict[str, Any]] = {}
    dropped = dict(ex.dropped)
    allowed = set(BASE_KEYS) | set(CLINICAL_KEYS)
    for sid, rep in ex.replies.items():
        try:
            check_reply(rep, MessageKind.PERSONALIZE_REPLY, round_, coord.job)
            extra = sorted(set(rep.meta) - allowed)
            if extra:
                raise ProtocolError(f"personalize reply carries unknown field(s) {extra}")
            out[sid] = dict(rep.meta)
        except ProtocolError as exc:
            dropped[sid] = f"bad personalize reply: {exc}"
    return out, dropped


def summarize(replies: dict[str, dict[str, Any]], steps: int) -> dict[str, Any]:
    """The summary.json section "federated + local fine-tuning": per site, and the mean over sites."""
    acc = [r["accuracy"] for r in replies.values() if not math.isnan(r.get("accuracy", math.nan))]
    res: dict[str, Any] = {"steps": steps, "sites": replies,
                           "site_accuracy": {k: r["accuracy"] for k, r in replies.items()},
                           "mean_site_accuracy": float(np.mean(acc)) if acc else math.nan}
    aurocs = [r["auroc"] for r in replies.values() if "auroc" in r and not math.isnan(r["auroc"])]
    if aurocs:
        res["mean_site_auroc"] = float(np.mean(aurocs))
    return res


__all__ = ["PERSONALIZE_KEYS", "personalize_sites", "site_personalize", "summarize"]

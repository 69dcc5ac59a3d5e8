"""ICU mortality (PhysioNet/CinC 2012): pooled, local-only and federated GRU-D over seeds, beside
the published figures and the SAPS-I severity score.

    .venv/bin/python bench/ehr.py                          # seeds 0-4, 2 worker processes
    .venv/bin/python bench/ehr.py --seeds 0 --workers 1    # one seed
    .venv/bin/python bench/ehr.py --seeds 0,1 --no-dp --strategies fedavg,fedadam
    .venv/bin/python bench/ehr.py --no-dp --strategies fedavg,fedavg/select=best-val,fedprox/mu=0.01   # variants
    .venv/bin/python bench/ehr.py --seeds 0,1,2 --no-dp --strategies fedavg --personalize 300   # + local fine-tuning
    .venv/bin/python bench/ehr.py --no-dp --strategies fedavg --personalize 600 --personalize-lr 0.001 \
        --personalize-mode ensemble   # + each site's own model, mixed with the global one (mean risk)
    .venv/bin/python bench/ehr.py --no-dp --strategies fedavg --personalize 600 --personalize-lr 0.001 \
        --personalize-mode complement   # the same mixture, the own model stopped on the mixture's validation AUROC

Train on sets A and B (each ICU type is one site), test on set C; every threshold and every
early-stopping point is chosen on the validation splits carved from A and B, never on C.

* pooled: one GRU-D on every site's training records (what you would get if records could
  leave the hospitals); Adam, checkpoint with the best pooled validation AUROC.
* local-only: each ICU type trains alone, checkpoint with the best AUROC on its own validation split.
* federated: ``insitu simulate --dataset physionet2012`` with its default recipe and each strategy
  (the final round's model: no early stopping).
* federated + local fine-tuning (``--personalize STEPS`` or a variant ``fedavg/personalize=300``):
  the same run, then each site fine-tunes the final global model on its own training split, the
  checkpoint (global model included) chosen on its own validation split (insitu.learn.personalize).
* federated + own model (``--personalize-mode ensemble``): each site also trains a model of its own
  from scratch (early-stopped on its own validation split, the local-only recipe with
  ``--personalize-lr 0.001``) and predicts with the mean risk of it and the global model
  (insitu.learn.personalize.own_model_mixture).
* federated + own model stopped for the mix (``--personalize-mode complement``): the same mixture, the
  own model's checkpoint chosen by the mixture's AUROC on the site's validation split.
* DP: the same, with record-level DP-SGD at ε = 1 (δ = 1e-5) for every site.
* SAPS-I: the severity score in Outcomes-c.txt used as a risk score (no training); its Score 1
  threshold is chosen on sets A and B.

Published (BENCHMARKS.md): GRU-D AUROC about 0.84 on set A (Che et al. 2018), about 0.86 on all
12,000 stays (Horn et al. 2020); the challenge's best Score 1 0.5353.  Those papers used other
splits (cross-validation), so the ratio is a comparison of levels, not a replication.
Each worker process runs one torch thread.  Results go to --out (JSON lines) as each seed ends.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "physionet2012"
PUBLISHED = {"GRU-D, Che et al. 2018 (set A)": ("auroc", 0.84), "GRU-D, Horn et al. 2020 (all stays)": ("auroc", 0.86),
             "challenge 2012, best Score 1": ("score1", 0.5353)}
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
FT = " +ft"  # key suffix of a strategy's personalised (federated + local fine-tuning) results


def train_early_stopped(model, X, y, Xv, yv, *, lr: float, batch: int, max_steps: int, every: int, seed: int):
    """Adam minibatch steps; keep the parameters with the best validation AUROC (checked every ``every`` steps)."""
    import torch

    from insitu.learn.clinical import risk_scores
    from insitu.learn.metrics import auroc
    from insitu.learn.models import get_flat, set_flat
    from insitu.learn.train import TrainConfig, loss_fn, make_optimizer

    opt = make_optimizer(model, TrainConfig(lr=lr, steps=1, batch_size=batch, optimizer="adam"))
    crit = loss_fn(1)
    gen = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    yv = yv.numpy().astype(int)
    best = (-1.0, 0, get_flat(model))
    for step in range(1, max_steps + 1):
        model.train()
        idx = torch.randint(0, n, (min(batch, n),), generator=gen)
        opt.zero_grad()
        crit(model(X[idx]), y[idx]).backward()
        opt.step()
        if step % every == 0:
            a = auroc(yv, risk_scores(model, Xv))
            if a > best[0]:
                best = (a, step, get_flat(model))
    set_flat(model, best[2])
    return best[1], best[0]


def saps_baseline(root: Path) -> dict[str, Any]:
    """SAPS-I from the outcomes files as a risk score: AUROC/AUPRC on set C, Score 1 at a threshold from A+B."""
    from insitu.data.physionet import ICUType, read_outcomes, read_set
    from insitu.learn import metrics as M

    def scores(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = read_outcomes(root / f"Outcomes-{name}.txt")
        icu = {r.record_id: int(r.icu_type) for r in read_set(root, name).records}
        rows = np.array([(v[0], v[1], icu[k]) for k, v in out.items()])
        keep = ~np.isnan(rows[:, 1])
        return rows[keep, 0].astype(int), rows[keep, 1], rows[keep, 2].astype(int)

    ya, sa, _ = (np.concatenate(p) for p in zip(scores("a"), scores("b")))
    thr = M.best_threshold(ya, sa)
    yc, sc, icu = scores("c")
    res = {"pooled": M.clinical_metrics(yc, sc, thr).as_dict(), "sites": {}}
    for t in ICUType:
        m = icu == int(t)
        res["sites"][t.site] = M.clinical_metrics(yc[m], sc[m], thr).as_dict()
    return res


def one_seed(seed: int, root: str, strategies: tuple[str, ...], dp: bool, pooled_steps: int, local_steps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from insitu.data.physionet import load_physionet
    from insitu.apps.simulate import simulate
    from insitu.learn.clinical import clinical_evaluation
    from insitu.learn.models import build_model

    t0 = time.perf_counter()
    out: dict[str, Any] = {"seed": seed, "seconds": {}}
    data = load_physionet(root, seed=seed)
    X, y = data.pooled_train()
    Xv = torch.cat([s.X_val for s in data.sites])
    yv = torch.cat([s.y_val for s in data.sites])
    model = build_model("grud", data.input_shape, 1, seed=seed)
    step, val = train_early_stopped(model, X, y, Xv, yv, lr=1e-3, batch=64, max_steps=pooled_steps, every=100, seed=seed)
    out["pooled"] = {**clinical_evaluation(model, data), "early_stop_step": step, "val_auroc": val}
    out["seconds"]["pooled"] = time.perf_counter() - t0
    t = time.perf_counter()
    local: dict[str, Any] = {"sites": {}}
    for i, site in enumerate(data.sites):
        model = build_model("grud", data.input_shape, 1, seed=seed)
        step, val = train_early_stopped(model, site.X_train, site.y_train, site.X_val, site.y_val, lr=1e-3, batch=64,
                                        max_steps=local_steps, every=50, seed=seed * 10 + i)
        ev = clinical_evaluation(model, data)  # the site's own model on its own test split
        local["sites"][site.name] = {**ev["sites"][site.name], "early_stop_step": step, "val_auroc": val}
    out["local"] = local
    out["seconds"]["local"] = time.perf_counter() - t
    for strat in strategies:
        t = time.perf_counter()
        name, options = variant(strat)
        s = simulate(dataset="physionet2012", data=root, strategy=name, seed=seed, baselines=False, write=False, **options)
        out[strat] = s["final"]["clinical"]
        if "personalized" in s["final"]:  # the sites' own fine-tuned models: per-site test metrics only
            out[strat + FT] = s["final"]["personalized"]
        out["seconds"][strat] = time.perf_counter() - t
    if dp:
        t = time.perf_counter()
        s = simulate(dataset="physionet2012", data=root, strategy="fedavg", seed=seed, baselines=False, write=False,
                     dp="record", epsilon=1.0)
        out["dp_eps1_fedavg"] = {**s["final"]["clinical"], "epsilon": s["final"].get("epsilon")}
        out["seconds"]["dp"] = time.perf_counter() - t
    out["seconds"]["total"] = time.perf_counter() - t0
    return out


def variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``fedprox/mu=0.01/select=best-val``: a strategy and simulate options (numbers parsed)."""
    name, *opts = spec.split("/")
    options: dict[str, Any] = {}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep:
            raise SystemExit(f"variant {spec!r}: {o!r} is not key=value")
        for conv in (int, float):
            try:
                options[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            options[k] = v
    return name, options


def _ms(vals: list[float]) -> str:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return "–"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def _personal(section: dict[str, Any]) -> str:
    """How a strategy's personal models were made (summary.json final.personalized.mode)."""
    return {"ensemble": "own model (mean risk)", "complement": "own model stopped for the mix"}.get(section.get("mode"), "local fine-tuning")


def report(results: list[dict[str, Any]], saps: dict[str, Any], strategies: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=140)
    seeds = [r["seed"] for r in results]
    methods = ["pooled", *strategies] + (["dp_eps1_fedavg"] if "dp_eps1_fedavg" in results[0] else [])
    n = results[0]["pooled"]["pooled"]["n"]
    t = Table(title=f"PhysioNet 2012, in-hospital mortality, test set C ({n:,} stays), GRU-D, seeds {seeds}: mean ± sd", title_justify="left")
    for col in ("method", "AUROC", "AUPRC", "Score 1", "mean site AUROC", "AUROC / Horn 0.86", "Score 1 / 0.5353"):
        t.add_column(col, justify="left" if col == "method" else "right")
    t.add_row("SAPS-I score (Outcomes-c, no training)", f"{saps['pooled']['auroc']:.3f}", f"{saps['pooled']['auprc']:.3f}",
              f"{saps['pooled']['score1']:.3f}", f"{np.mean([m['auroc'] for m in saps['sites'].values()]):.3f}",
              f"{saps['pooled']['auroc'] / 0.86:.3f}", f"{saps['pooled']['score1'] / 0.5353:.3f}")
    for m in methods:
        au = [r[m]["pooled"]["auroc"] for r in results]
        s1 = [r[m]["pooled"]["score1"] for r in results]
        t.add_row(m, _ms(au), _ms([r[m]["pooled"]["auprc"] for r in results]), _ms(s1), _ms([r[m]["mean_site_auroc"] for r in results]),
                  f"{statistics.mean(au) / 0.86:.3f}", f"{statistics.mean(s1) / 0.5353:.3f}")
    local_mean = [float(np.mean([v["auroc"] for v in r["local"]["sites"].values()])) for r in results]
    t.add_row("local-only (each ICU type alone)", "–", "–", "–", _ms(local_mean), "", "")
    personal = [k + FT for k in strategies if all(k + FT in r for r in results)]
    for k in personal:  # each site's own model: no pooled figure (the scores of the test records never leave a site)
        t.add_row(f"{k[:-len(FT)]} + {_personal(results[0][k])} (each site its own model)", "–", "–", "–",
                  _ms([r[k]["mean_site_auroc"] for r in results]), "", "")
    t.add_section()
    for name, (metric, v) in PUBLISHED.items():
        t.add_row(f"published: {name}", f"{v:.3f}" if metric == "auroc" else "", "", f"{v:.4f}" if metric == "score1" else "", "", "", "")
    con.print(t)

    best = max(strategies, key=lambda k: statistics.mean(r[k]["pooled"]["auroc"] for r in results))
    s = Table(title="AUROC per ICU type on its test split in set C: each site alone, every federated strategy, the pooled model",
              title_justify="left")
    columns = [c for k in strategies for c in (k, *([k + FT] if k + FT in personal else []))]
    for col in ("site", "SAPS-I", "local-only", *(c.replace(FT, " + " + _personal(results[0][c])) if c.endswith(FT) else c for c in columns), "pooled"):
        s.add_column(col, justify="left" if col == "site" else "right")
    sites = list(results[0]["local"]["sites"])
    below = {k: [] for k in columns}
    for site in sites:
        lo = statistics.mean(r["local"]["sites"][site]["auroc"] for r in results)
        cells = []
        for k in columns:
            fe = [r[k]["sites"][site]["auroc"] for r in results]
            if statistics.mean(fe) < lo:
                below[k].append(site)
            cells.append(_ms(fe) + ("" if statistics.mean(fe) >= lo else " <"))
        s.add_row(site, f"{saps['sites'][site]['auroc']:.3f}", _ms([r["local"]["sites"][site]["auroc"] for r in results]), *cells,
                  _ms([r["pooled"]["sites"][site]["auroc"] for r in results]))
    con.print(s)
    print("'<': the federated model's mean AUROC on that site is below the site's own model's")
    for k in columns:
        steps = f" ({results[0][k]['steps']} steps)" if k.endswith(FT) else ""
        print(f"{k.replace(FT, ' + ' + _personal(results[0][k])) if k.endswith(FT) else k}{steps}: every site at least its local-only AUROC: {'yes' if not below[k] else 'NO, below at ' + ', '.join(below[k])}")
    pooled = statistics.mean(r["pooled"]["pooled"]["auroc"] for r in results)
    fed = statistics.mean(r[best]["pooled"]["auroc"] for r in results)
    print(f"pooled GRU-D AUROC {pooled:.3f} (target ≥ 0.85: {'met' if pooled >= 0.85 else 'NOT met'}); "
          f"best federated {best} {fed:.3f}, gap {pooled - fed:+.3f} (target ≤ 0.01: {'met' if pooled - fed <= 0.01 else 'NOT met'})")
    if "dp_eps1_fedavg" in results[0]:
        dp = statistics.mean(r["dp_eps1_fedavg"]["pooled"]["auroc"] for r in results)
        fa = statistics.mean(r["fedavg"]["pooled"]["auroc"] for r in results) if "fedavg" in strategies else float("nan")
        print(f"record-level DP-SGD at ε = 1 (fedavg): AUROC {dp:.3f}, costs {fa - dp:+.3f} against fedavg without DP ({fa:.3f})")
    secs = [r["seconds"] for r in results]
    print("seconds per seed: " + ", ".join(f"{k} {statistics.mean(s[k] for s in secs):.0f}" for k in secs[0]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    ap.add_argument("--data", default=str(DATA), help="folder with set-a.tar.gz, Outcomes-a.txt, ...")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help="comma-separated; a variant adds simulate options: fedprox/mu=0.01/select=best-val")
    ap.add_argument("--personalize", type=int, default=0, metavar="STEPS",
                    help="every strategy also reports federated + local fine-tuning: each site fine-tunes the final model "
                         "for up to STEPS steps, checkpoint on its own validation split (a variant's personalize= wins)")
    ap.add_argument("--personalize-lr", type=float, default=None, metavar="LR",
                    help="with --personalize: the learning rate of the sites' personal training (default: the task's)")
    ap.add_argument("--personalize-mode", choices=("finetune", "ensemble", "complement"), default="finetune",
                    help="with --personalize: fine-tune the final model, or mix it with a model each site trains alone (mean risk; "
                         "complement: that model's checkpoint chosen by the mixture's validation AUROC)")
    ap.add_argument("--no-dp", action="store_true", help="skip the ε = 1 run")
    ap.add_argument("--workers", type=int, default=2, help="seeds run in parallel processes (one torch thread each)")
    ap.add_argument("--pooled-steps", type=int, default=1500, help="most Adam steps for pooled (early-stopped on validation)")
    ap.add_argument("--local-steps", type=int, default=600, help="most Adam steps for each local-only model (early-stopped on its validation split)")
    ap.add_argument("--out", default="ehr_results.jsonl", help="JSON lines, one per seed, appended as seeds finish")
    ap.add_argument("--report-only", action="store_true", help="print the tables from --out without training")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    strategies = tuple(s for s in args.strategies.split(",") if s)
    if args.personalize < 0:
        raise SystemExit(f"--personalize takes a number of fine-tuning steps ≥ 0 (0: off), got {args.personalize}")
    if (args.personalize_lr is not None or args.personalize_mode != "finetune") and not args.personalize:
        raise SystemExit("--personalize-lr / --personalize-mode need --personalize STEPS")
    if args.personalize:
        extra = (f"/personalize_lr={args.personalize_lr}" if args.personalize_lr is not None else "") + \
                (f"/personalize_mode={args.personalize_mode}" if args.personalize_mode != "finetune" else "")
        strategies = tuple(s if "personalize=" in s else f"{s}/personalize={args.personalize}{extra}" for s in strategies)
    saps = saps_baseline(Path(args.data))
    out = Path(args.out)
    if not args.report_only:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            futures = [pool.submit(one_seed, s, args.data, strategies, not args.no_dp, args.pooled_steps, args.local_steps) for s in seeds]
            for f in futures:
                res = f.result()
                with out.open("a") as fh:
                    fh.write(json.dumps(res) + "\n")
                print(f"seed {res['seed']} done ({res['seconds']['total']:.0f} s)", flush=True)
        print(f"wall {time.perf_counter() - t0:.0f} s")
    results = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    results = [r for r in results if r["seed"] in seeds]
    if not results:
        print(f"no results for seeds {seeds} in {out}")
        return 1
    report(results, saps, strategies)
    return 0


if __name__ == "__main__":
    sys.exit(main())

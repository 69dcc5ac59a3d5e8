"""``insitu simulate``: one machine, every hospital in-process, the real round engine.

The sites and coordinator are the same classes a deployment runs; only the
transport differs (:class:`InProcessTransport` encodes every message exactly as
the wire would).  A run writes, atomically, a directory with ``summary.json``,
``rounds.jsonl``, ``accuracy.png``, the final model (``model.npz`` and
``task.json``), and compares the federated model with local-only and pooled
training on the same splits.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import uuid
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from insitu.data.dataset import FederatedData
from insitu.data.partition import Partition, PartitionKind
from insitu.clitools import check_new_dir
from insitu.errors import ConfigError, DataError, RoundAborted, parse_choice
from insitu.federation.coordinator import Coordinator, RoundRecord, round_bytes_down, round_bytes_up
from insitu.federation.robust import DEFAULT_MAX_RECORDS, DEFAULT_NORM_FACTOR
from insitu.federation.strategies import StrategyName
from insitu.federation.task import TaskSpec
from insitu.federation.transport import InProcessTransport
from insitu.learn.train import parse_class_weights, parse_jitter
from insitu.plan import DEFAULT_MU, DPSpec, Plan, Protection, ProtectionSpec, Selection, StrategySpec


log = logging.getLogger("insitu.simulate")


class DatasetName(str, enum.Enum):
    HEART = "heart"
    PNEUMONIAMNIST = "pneumoniamnist"
    MEDMNIST = "medmnist"  # any MedMNIST-format .npz
    PHYSIONET2012 = "physionet2012"  # ICU mortality, --data DIR with set-a.tar.gz ... (insitu.data.physionet)


class Recipe(str, enum.Enum):
    """Where the defaults of the strategy and the preprocessing come from (options given by name win).

    ``flamby`` (the default, and what a deployed job resolves to): FLamby's Fed-Heart-Disease
    recipe (FedAvg, each site z-scored with its own statistics), what bench/heart_flamby.py compares
    against the published figures.  ``consortium`` (``make demo``): the recipe in which the
    federated model is worth having (heart: FedYogi with consortium z-scoring from the sites' DP
    moments releases; chosen by the sweep in the README); simulation only, because deployed sites
    do not release moments yet, so the same options never resolve to two different plans.
    """

    FLAMBY = "flamby"
    CONSORTIUM = "consortium"


@dataclass(frozen=True)
class Defaults:
    model: str
    rounds: int
    local_steps: int
    lr: float
    batch_size: int
    optimizer: str
    partition: str
    sites: int
    lr_schedule: str = "constant"
    select: str = "last"
    augment: int = 0
    strategy: str = "fedavg"
    normalize: str = "site"
    class_weights: str | None = None
    augment_jitter: str | None = None


DEFAULTS: dict[DatasetName, Defaults] = {
    DatasetName.HEART: Defaults("logreg", 30, 50, 0.01, 4, "sgd", "natural", 4),
    # chosen on the union of the sites' validation splits only (README, Imaging; bench/imaging.py)
    DatasetName.PNEUMONIAMNIST: Defaults("cnn", 60, 20, 0.05, 64, "sgd", "dirichlet:0.5", 4, "constant", "best-val-balanced", 2,
                                         strategy="fedyogi", class_weights="balanced"),  # each site weighs by its own label mix
    DatasetName.MEDMNIST: Defaults("cnn", 40, 20, 0.001, 64, "adam", "iid", 4, "constant", "last", 2),
    DatasetName.PHYSIONET2012: Defaults("grud", 20, 25, 0.002, 64, "adam", "natural", 4),  # chosen on validation AUROC (README, EHR)
}

@dataclass(frozen=True)
class SimulationConfig:
    """Every option of ``insitu simulate``, by the same names (a deployed ``job.toml`` uses them too).

    Fields left ``None`` take the dataset's defaults (:data:`DEFAULTS`) in :meth:`resolved`, which
    also checks every value; :meth:`plan_for` turns the result into the :class:`~insitu.plan.Plan`
    every site runs.  ``dataset`` names a built-in dataset (``heart``, ``pneumoniamnist``,
    ``medmnist`` with ``data`` a path); a run on one's own :class:`~insitu.data.dataset.FederatedData`
    passes it to :func:`simulate` as ``data`` and records its name here.
    """

    dataset: str = "heart"
    data: str | None = None
    sites: int | None = None
    partition: str | None = None
    strategy: str | None = None  # default: the recipe's
    recipe: str = "flamby"  # flamby (FLamby's Fed-Heart-Disease recipe, as deployed) or consortium (make demo)
    rounds: int | None = None
    local_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    model: str | None = None
    #: your own model: a JSON file of layers (insitu.learn.spec) or the specification itself (a dict);
    #: every site builds it from the plan, which carries it (model = "spec")
    model_spec: str | Mapping[str, Any] | None = None
    mu: float = DEFAULT_MU  # FedProx's proximal weight (fedprox only)
    server_lr: float | None = None
    seed: int = 0
    min_sites: int = 1
    dropout: float = 0.0
    round_timeout: float = 600.0
    compress: str = "none"  # update compression: int8, topk:F, shared:F, topk:F+int8 (insitu.compress)
    downlink: str = "dense"  # the global model to the sites: dense, delta (lossless) or delta:int8 (insitu.compress.downlink)
    #: plain rounds: refuse a site's per-record update longer than this × the round's median (insitu.federation.robust)
    update_norm_factor: float = DEFAULT_NORM_FACTOR
    max_site_records: int = DEFAULT_MAX_RECORDS  # plain rounds: refuse a site weight (training record count) above this
    secure_aggregation: bool = False  # pairwise-masked sums (insitu.secure.secagg)
    secagg_recovery: str | None = None  # who removes masks: survivors (default: one more upload each, least server work) or server (Bonawitz)
    homomorphic: str = "none"  # none, paillier or ckks (insitu.secure.he)
    # differential privacy (insitu.federation.dp): off, record (DP-SGD) or site (DP-FedAvg)
    dp: str = "off"
    epsilon: float | None = None  # target ε; noise is calibrated to it
    delta: float = 1e-5
    noise_multiplier: float | None = None  # instead of --epsilon
    clip: float | None = None
    dp_placement: str = "central"  # site-level noise: central or distributed
    dp_adjacency: str = "replace"  # site level: replace (sensitivity 2C, participants known) or add-remove
    adaptive_clip: bool = False
    site_budget: str | None = None  # "3" or "cleveland=1,default=3"; default: the target ε
    accountant: str = "pld"
    privacy_ledger: str | None = None  # SQLite ledger kept across runs (default: in the run directory)
    augment: int | None = None  # images: random shifts of up to N pixels during local training
    class_weights: str | None = None  # loss weight per class, "W0,W1", or a site-local rule "balanced"/"logit-adjust" ("none": unweighted); default: the dataset's
    augment_jitter: str | None = None  # images: "ROTATION,SCALE,CONTRAST" random per image in local training ("none": off); default: the dataset's
    select: str | None = None  # final model: the last round's, or the best on the sites' validation splits
    lr_schedule: str | None = None  # constant or cosine (site lr decays to 10% over the rounds)
    normalize: str | None = None  # heart: z-score per site (FLamby) or federated (sites' DP moments); default: the recipe's
    normalize_epsilon: float = 0.1  # --normalize federated: ε each site spends on its moments release
    baselines: bool = True
    #: after federation each site fine-tunes the final global model on its own records for up to this many
    #: steps, checkpoint chosen on its own validation split; only the result's test scores are reported (0: off)
    personalize: int = 0
    personalize_lr: float | None = None  # --personalize: the fine-tuning learning rate (default: the task's lr)
    personalize_mode: str = "finetune"  # --personalize: finetune | ensemble (insitu.learn.personalize.PersonalMode)
    out: str | None = None
    threads: int = 1  # torch threads for training (1: tiny models and many small steps run fastest)
    backend: str = "in-process"  # where the sites run: in-process, or ray (Ray actors: insitu.apps.raybackend)
    ray_address: str | None = None  # --backend ray: join this Ray cluster (default: a private local Ray on 127.0.0.1)
    #: derive every site's secret (sampling, DP noise, rounding) from --seed: replayable, NOT private
    insecure_replayable_randomness: bool = False

    def resolved(self, *, need_data: bool = True, own: FederatedData | None = None) -> "SimulationConfig":
        """The config with dataset defaults filled in and every value checked (``need_data``: a
        deployed job's coordinator holds no data, so it resolves without --data).  With ``own``
        data, the defaults are those of the built-in dataset of the same kind (tabular: heart,
        images: MedMNIST) and the sites are the data's."""
        ds = parse_choice(DatasetName, self.dataset, "--dataset") if own is None else own_kind(own)
        d = DEFAULTS[ds]
        recipe = parse_choice(Recipe, self.recipe, "--recipe")
        if recipe is Recipe.CONSORTIUM and ds is DatasetName.HEART and own is None:
            if not need_data:
                raise ConfigError("recipe consortium needs each site's DP release of its feature moments, which deployed "
                                  "sites do not make yet; a job runs recipe flamby (give strategy and normalize = \"site\" by name)")
            d = replace(d, strategy="fedyogi", normalize="federated")
        if not need_data and self.normalize == "federated":
            raise ConfigError("normalize = \"federated\" is simulation only: deployed sites z-score with their own statistics")
        if own is not None and self.normalize == "federated":
            raise ConfigError("--normalize federated scales the built-in heart records with public bounds; your own "
                              "FederatedData comes as you scaled it (leave normalize unset)")
        if self.dp != "off":
            from insitu.federation.dp import dp_defaults

            d = dp_defaults(ds.value, self.dp, d)  # DP-friendly batch/steps where the user set none
        cfg = replace(
            self,
            sites=self.sites if self.sites is not None else (len(own.sites) if own is not None else d.sites),
            partition=self.partition or ("natural" if own is not None else d.partition),
            rounds=self.rounds if self.rounds is not None else d.rounds,
            local_steps=self.local_steps if self.local_steps is not None else d.local_steps,
            lr=self.lr if self.lr is not None else d.lr,
            batch_size=self.batch_size if self.batch_size is not None else d.batch_size,
            optimizer=self.optimizer or d.optimizer,
            model=self.model or ("spec" if self.model_spec is not None else d.model),
            model_spec=_model_spec(self.model, self.model_spec),
            lr_schedule=self.lr_schedule or d.lr_schedule,
            select=self.select or d.select,
            augment=self.augment if self.augment is not None else d.augment,
            strategy=self.strategy or d.strategy,
            normalize=self.normalize or d.normalize,
            class_weights=self.class_weights if self.class_weights is not None else d.class_weights,
            augment_jitter=self.augment_jitter if self.augment_jitter is not None else d.augment_jitter,
        )
        parse_jitter(cfg.augment_jitter)
        if cfg.normalize == "federated" and ds is not DatasetName.HEART:
            raise ConfigError(f"--normalize federated needs public per-feature bounds; the heart task states them, {ds.value} has none (use --normalize site)")
        Partition.parse(cfg.partition)
        # validates every plan field (strategy, protection, DP, compression, …); a specification's shapes and the
        # class weights' count are checked against the data's shape and classes in plan_for
        rule = isinstance(parse_class_weights(cfg.class_weights), str)  # a site-local rule (balanced, ...) is checked against DP now
        base = replace(cfg, model="logreg", model_spec=None) if cfg.model_spec is not None else cfg
        plan = replace(base, class_weights=cfg.class_weights if rule else None).plan_for((1,), 1, ("x",))
        if plan.select is not Selection.LAST and ds is DatasetName.HEART and own is None:
            raise ConfigError("--select best-val needs validation splits; the heart data has none (FLamby's splits are train/test)")
        from insitu.federation.dp import parse_budgets

        parse_budgets(cfg.site_budget)
        _check_personalize(cfg, plan, ds, own)
        if not 0.0 <= cfg.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
        if cfg.min_sites < 1 or cfg.min_sites > cfg.sites:
            raise ConfigError(f"--min-sites {cfg.min_sites} must be between 1 and the number of sites ({cfg.sites})")
        from insitu.apps.raybackend import check_backend

        check_backend(cfg.backend, cfg.ray_address)
        if need_data and own is None and ds is not DatasetName.HEART and not cfg.data:
            from insitu.data.origins import MEDMNIST_ORIGIN, PHYSIONET2012_ORIGIN

            raise ConfigError(f"dataset {ds.value} needs --data PATH ({'a folder with set-a.tar.gz, Outcomes-a.txt, ...; ' + PHYSIONET2012_ORIGIN if ds is DatasetName.PHYSIONET2012 else 'a MedMNIST .npz file; ' + MEDMNIST_ORIGIN})")
        return cfg

    def plan_for(self, input_shape: tuple[int, ...], num_outputs: int, schema: tuple[str, ...]) -> Plan:
        """The plan of this (resolved) configuration for data of the given shape: what every site runs."""
        strategy = parse_choice(StrategyName, self.strategy, "--strategy")
        he = parse_choice(Protection, (self.homomorphic or "none").lower().replace("none", "plain"), "--homomorphic")
        if he is Protection.SECAGG:
            raise ConfigError("--homomorphic takes paillier or ckks; secure aggregation is --secure-aggregation")
        if self.secure_aggregation and he is not Protection.PLAIN:
            raise ConfigError("--secure-aggregation and --homomorphic both protect the sum; choose one")
        kind = Protection.SECAGG if self.secure_aggregation else he
        task = TaskSpec(model=self.model, input_shape=tuple(input_shape), num_outputs=num_outputs, schema=tuple(schema),
                        lr=self.lr, local_steps=self.local_steps, batch_size=self.batch_size, optimizer=self.optimizer,
                        augment_shift=self.augment or 0, model_spec=self.model_spec, class_weights=parse_class_weights(self.class_weights),
                        augment_jitter=parse_jitter(self.augment_jitter))
        return Plan(
            task=task,
            strategy=StrategySpec(strategy, self.server_lr, self.mu if strategy is StrategyName.FEDPROX else 0.0),
            protection=ProtectionSpec(kind, self.secagg_recovery),
            compression=self.compress,
            dp=DPSpec(level=self.dp, epsilon=self.epsilon, noise_multiplier=self.noise_multiplier, delta=self.delta, clip=self.clip,
                      placement=self.dp_placement, adaptive_clip=self.adaptive_clip, accountant=self.accountant,
                      adjacency=self.dp_adjacency),
            rounds=self.rounds, min_sites=self.min_sites, lr_schedule=self.lr_schedule, select=self.select, normalize=self.normalize,
            normalize_epsilon=self.normalize_epsilon, downlink=self.downlink,
            update_norm_factor=self.update_norm_factor, max_site_records=self.max_site_records,
        )


def _check_personalize(cfg: "SimulationConfig", plan: Plan, ds: DatasetName, own: FederatedData | None) -> None:
    """--personalize: a step count, on data with validation splits, without DP (the fine-tuning is not private)."""
    from insitu.learn.personalize import check_steps

    lr = cfg.personalize_lr
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 1):
        raise ConfigError(f"--personalize-lr must be a learning rate in (0, 1], got {lr!r}")
    from insitu.errors import parse_choice
    from insitu.learn.personalize import PersonalMode

    mode = parse_choice(PersonalMode, cfg.personalize_mode, "--personalize-mode")
    if check_steps(cfg.personalize) == 0:
        if lr is not None or mode is not PersonalMode.FINETUNE:
            raise ConfigError(f"--personalize-{'lr' if lr is not None else 'mode'} given without --personalize STEPS")
        return
    if ds is DatasetName.HEART and own is None:
        raise ConfigError("--personalize chooses each site's checkpoint on its own validation split; the heart data has none "
                          "(FLamby's splits are train/test)")
    if plan.dp.on:
        raise ConfigError(f"--personalize fine-tunes each site's model without DP, so its test scores would release what --dp "
                          f"{plan.dp.level.value} protects; run it without --dp")


def _model_spec(model: str | None, spec: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``model_spec`` as the canonical specification (a path is read here), checked against ``model``."""
    if spec is None:
        if model == "spec":
            raise ConfigError('model = "spec" needs model_spec: a JSON file of layers (--model-spec FILE.json) or the layers themselves')
        return None
    if model not in (None, "spec"):
        raise ConfigError(f"give either model = {model!r} (a built-in) or model_spec (your own layers), not both")
    from insitu.learn.spec import ModelSpec, load_model_spec

    if isinstance(spec, (str, os.PathLike)):
        return load_model_spec(spec).to_meta()
    return ModelSpec.parse(spec).to_meta()


def own_kind(data: FederatedData) -> DatasetName:
    """The built-in dataset whose defaults suit ``data``: heart for tabular records, MedMNIST for images."""
    return DatasetName.HEART if len(data.input_shape) == 1 else DatasetName.MEDMNIST


def check_own(data: Any) -> FederatedData:
    """Refuse, naming the site and the problem, federated data the round engine cannot train on."""
    if not isinstance(data, FederatedData):
        raise ConfigError(f"data must be a path (str) or an insitu.FederatedData, got {type(data).__name__}")
    if not data.sites:
        raise DataError(f"federated data {data.name!r} has no sites")
    names = [s.name for s in data.sites]
    if len(set(names)) != len(names):
        raise DataError(f"federated data {data.name!r} names a site twice: {names}")
    if isinstance(data.num_classes, bool) or not isinstance(data.num_classes, int) or data.num_classes < 2:
        raise DataError(f"federated data {data.name!r}: num_classes must be an integer >= 2, got {data.num_classes!r}")
    for s in data.sites:
        for split in ("train", "test", "val"):
            X, y = getattr(s, f"X_{split}"), getattr(s, f"y_{split}")
            if X is None and y is None and split == "val":
                continue
            if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise DataError(f"site {s.name!r}: X_{split} and y_{split} must be torch tensors")
            if tuple(X.shape[1:]) != tuple(data.input_shape):
                raise DataError(f"site {s.name!r}: X_{split} has records of shape {tuple(X.shape[1:])}, the data declares {tuple(data.input_shape)}")
            if y.ndim != 1 or y.shape[0] != X.shape[0]:
                raise DataError(f"site {s.name!r}: y_{split} must hold one label per record ({X.shape[0]}), got shape {tuple(y.shape)}")
            if X.dtype != torch.float32:
                raise DataError(f"site {s.name!r}: X_{split} must be float32, got {X.dtype}")
            if y.numel() and (bool(((y != y.round()) | (y < 0) | (y >= data.num_classes)).any())):
                raise DataError(f"site {s.name!r}: y_{split} must hold class indices 0..{data.num_classes - 1}")
            if not bool(torch.isfinite(X).all()):
                raise DataError(f"site {s.name!r}: X_{split} holds NaN or infinite values")
        if s.n_train == 0:
            raise DataError(f"site {s.name!r} has no training records")
    return data


def load_federated(cfg: SimulationConfig) -> FederatedData:
    if cfg.dataset == DatasetName.PHYSIONET2012.value:
        from insitu.data.physionet import load_physionet

        return load_physionet(cfg.data, cfg.partition, cfg.sites, seed=cfg.seed)
    from insitu.data.heart import heart_sites_from_indices, load_heart, load_heart_frame
    from insitu.data.medmnist import load_medmnist
    from insitu.data.partition import split_indices

    part = Partition.parse(cfg.partition)
    ds = DatasetName(cfg.dataset)
    if ds is DatasetName.HEART:
        if part.kind is PartitionKind.NATURAL:
            if cfg.sites != 4:
                raise ConfigError(f"the natural heart partition has 4 hospitals; --sites {cfg.sites} needs --partition iid or dirichlet:ALPHA")
            return load_heart(cfg.data, _heart_scaling(cfg))
        df = load_heart_frame(cfg.data)
        parts = split_indices(df["label"].to_numpy(), cfg.sites, part, np.random.default_rng(cfg.seed), min_per_site=4)
        return heart_sites_from_indices(df, parts, [f"hospital-{i + 1}" for i in range(cfg.sites)], _heart_scaling(cfg))
    return load_medmnist(cfg.data, cfg.sites, part, seed=cfg.seed, name=ds.value)


def _heart_scaling(cfg: SimulationConfig) -> str:
    """federated: load raw features; the sites' DP moments release scales them (insitu.apps.normalize)."""
    return "raw" if cfg.normalize == "federated" else cfg.normalize


def _dropout_plan(cfg: SimulationConfig) -> Callable | None:
    if cfg.dropout <= 0:
        return None
    from insitu.federation.messages import MessageKind

    def fail(site: str, rnd: int, kind: MessageKind) -> bool:
        if kind is not MessageKind.TRAIN:
            return False
        return _stable_uniform(cfg.seed, site, rnd) < cfg.dropout

    return fail


def _stable_uniform(seed: int, site: str, rnd: int) -> float:
    import hashlib

    h = hashlib.sha256(f"{seed}/{site}/{rnd}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


@dataclass
class RunWriter:
    """Writes the run directory under a temporary name and renames it only when complete."""

    final: Path
    tmp: Path = field(init=False)

    def __post_init__(self) -> None:
        check_new_dir(self.final)
        self.tmp = self.final.with_name(self.final.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self._rounds = (self.tmp / "rounds.jsonl").open("w")

    def round(self, rec: dict[str, Any]) -> None:
        self._rounds.write(json.dumps(rec, default=_jsonable) + "\n")
        self._rounds.flush()

    def finish(self) -> Path:
        self._rounds.close()
        self.tmp.rename(self.final)
        return self.final

    def abort(self) -> None:
        self._rounds.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, enum.Enum):
        return v.value
    raise TypeError(f"not JSON: {type(v)}")


def _site_accuracy(evals: dict[str, dict[str, Any]]) -> tuple[float, float]:
    accs = [e["accuracy"] for e in evals.values() if e["n"] > 0]
    correct = sum(e["correct"] for e in evals.values())
    n = sum(e["n"] for e in evals.values())
    return float(np.mean(accs)) if accs else float("nan"), correct / n if n else float("nan")


def default_out(cfg: SimulationConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.dataset}-{cfg.strategy}-s{cfg.seed}"


def secrets_for(cfg: SimulationConfig, names: list[str], given: Mapping[str, bytes] | None = None) -> dict[str, bytes]:
    """Each simulated site's secret: given explicitly (tests), derived from --seed when the run asked
    for replayable randomness by name (not private), else fresh from the OS."""
    from insitu.builder import new_secret

    if given is not None:
        missing = sorted(set(names) - set(given))
        if missing:
            raise ConfigError(f"site_secrets lacks site(s) {missing}")
        return {n: bytes(given[n]) for n in names}
    if cfg.insecure_replayable_randomness:
        import hashlib

        return {n: hashlib.sha256(f"insitu/insecure-replay/{cfg.seed}/{n}".encode()).digest() for n in names}
    return {n: new_secret() for n in names}


def simulate(config: SimulationConfig | None = None, *, progress: bool = False, write: bool = True,
             site_secrets: Mapping[str, bytes] | None = None, coordinator_secret: bytes | None = None,
             plan_by_hash: bool = True, **options: Any) -> dict[str, Any]:
    """Run a federated simulation and return its summary (also written to ``summary.json``).

    ``simulate(dataset="heart", strategy="fedyogi", rounds=30)`` is the Python face of
    ``insitu simulate``; options are the fields of :class:`SimulationConfig`.  ``data`` is a path
    (MedMNIST ``.npz``, heart CSV) or one's own :class:`~insitu.data.dataset.FederatedData`, whose
    sites are the hospitals (its name becomes ``dataset``; ``sites`` and ``partition`` do not
    apply).  ``--seed`` fixes the splits and the initial model; each site's sampling, DP noise
    and rounding come from its own secret (OS randomness), unless ``site_secrets`` (site → bytes)
    are given, as tests that compare two code paths exactly do (``coordinator_secret`` likewise
    seeds central DP noise).  ``plan_by_hash=False`` sends the whole plan in every request instead of
    its hash once a site has checked it (insitu.federation.planref; bench/downlink.py measures both).
    """
    own = options.pop("data") if "data" in options and not isinstance(options["data"], (str, os.PathLike, type(None))) else None
    if config is None:
        config = SimulationConfig(**options)
    elif options:
        config = replace(config, **options)
    if own is not None:
        own = check_own(own)
        given = [k for k in ("sites", "partition", "data") if getattr(config, k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot be combined with your own FederatedData: its sites are the hospitals")
        config = replace(config, dataset=own.name)
    cfg = config.resolved(own=own)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    if write:
        check_new_dir(out)
    if cfg.insecure_replayable_randomness and site_secrets is None:
        log.warning("--insecure-replayable-randomness: site sampling and DP noise are derived from --seed %d; anyone who "
                    "knows the seed can replay them, so this run is NOT private", cfg.seed)
    from insitu.learn.train import torch_threads

    with torch_threads(cfg.threads), _backend_session(cfg):
        return _simulate(cfg, out, write, progress, site_secrets, coordinator_secret, own, plan_by_hash)


def _backend_session(cfg: SimulationConfig) -> Any:
    """Ray for the run with ``--backend ray`` (insitu.apps.raybackend); nothing in-process."""
    if cfg.backend != "ray":
        import contextlib

        return contextlib.nullcontext()
    from insitu.apps.raybackend import ray_session

    return ray_session(cfg.ray_address)


def _simulate(cfg: SimulationConfig, out: Path, write: bool, progress: bool, site_secrets: Mapping[str, bytes] | None,
              coordinator_secret: bytes | None, own: FederatedData | None, plan_by_hash: bool = True) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    data = own if own is not None else load_federated(cfg)
    empty = [s.name for s in data.sites if s.X_val is None or s.X_val.shape[0] == 0]
    if cfg.select.startswith("best-val") and empty:
        if own is None and all(s.X_val is None for s in data.sites):
            raise ConfigError(f"--select {cfg.select} needs validation splits, and {cfg.data!r} has no val_images/val_labels; use --select last")
        raise ConfigError(f"--select {cfg.select} needs every site's validation split, and {', '.join(empty)} "
                          f"{'has' if len(empty) == 1 else 'have'} no validation records (the partition left none); "
                          "use fewer sites, a larger Dirichlet alpha, or --select last")
    plan = cfg.plan_for(data.input_shape, data.num_outputs, data.schema)
    task = plan.task
    secrets = secrets_for(cfg, [s.name for s in data.sites], site_secrets)
    ledger = report = None
    from insitu.builder import build_coordinator, build_site, initial_params

    federated_norm = plan.normalize.value == "federated"
    if plan.dp.on or federated_norm:
        from insitu.federation.dp import FALLBACK_BUDGET, DPReport, parse_budgets
        from insitu.privacy import Budget, PrivacyLedger

        ledger = PrivacyLedger(cfg.privacy_ledger or ":memory:")
        per, default = parse_budgets(cfg.site_budget)
        # default limit: the training's target ε plus the moments release (basic composition bounds both)
        norm_eps = plan.normalize_epsilon if federated_norm else 0.0
        train_eps = (plan.dp.epsilon or FALLBACK_BUDGET) if plan.dp.on else 0.0
        for s in data.sites:  # a persisted ledger keeps a site's budget across runs unless one is given
            if s.name in per or default is not None or not ledger.has_budget(s.name):
                eps = per.get(s.name, default if default is not None else train_eps + norm_eps)
                ledger.set_budget(s.name, Budget(eps, plan.dp.delta, plan.dp.accountant))
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    normalization = None
    if federated_norm:
        from insitu.apps.normalize import federated_normalization
        from insitu.data.heart import BOUNDS

        data, normalization = federated_normalization(data, BOUNDS, epsilon=plan.normalize_epsilon, delta=plan.dp.delta,
                                                      accountant=plan.dp.accountant, secrets=secrets, ledger=ledger, job=run_id)
    if cfg.backend == "ray":  # the same sites, built in Ray workers with the same secrets; DP: each charges its own ledger there
        from insitu.apps.raybackend import site_transport

        transport: Any = site_transport(plan, data.sites, secrets, job=run_id, fail=_dropout_plan(cfg), threads=cfg.threads, ledger=ledger)
        if plan.dp.on:
            report = transport.dp_report(plan)  # the driver's mirror of the sites' ledgers
    else:
        sites = {sd.name: build_site(plan, sd.name, sd, secret=secrets[sd.name], ledger=ledger, job=run_id) for sd in data.sites}
        if plan.dp.on:
            report = DPReport(plan, {n: s.budget for n, s in sites.items()}, ledger, run_id)
        transport = InProcessTransport(sites, fail=_dropout_plan(cfg))
    rng = None
    if coordinator_secret is not None:
        from insitu.builder import derive_seed

        rng = np.random.default_rng(derive_seed(coordinator_secret, "central-dp"))
    elif cfg.insecure_replayable_randomness:
        rng = np.random.default_rng(cfg.seed + 7919)
    from insitu.builder import build_protocol

    coord = build_coordinator(plan, f"sim-{cfg.seed}", transport, params=initial_params(plan, cfg.seed), timeout=cfg.round_timeout,
                              protocol=build_protocol(plan, rng=rng), plan_by_hash=plan_by_hash)
    writer = RunWriter(out) if write else None
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        from insitu.report.progress import round_progress

        from insitu.federation.evaluation import criterion_of, score

        # selecting on validation: each round is scored on the validation splits only, the test splits once, at the end
        criterion = criterion_of(plan.select)
        split = "val" if criterion is not None else "test"
        with round_progress(cfg.rounds, enabled=progress, label=f"{cfg.dataset} · {cfg.strategy}") as bar:
            best: tuple[float, int, np.ndarray] | None = None
            for r in range(1, cfg.rounds + 1):
                rec, evals = _one_round(coord, r, split)
                if criterion is not None and rec["status"] == "ok":
                    rec["val_score"] = val = score(evals, criterion)
                    if best is None or val > best[0]:
                        best = (val, r, coord.params.copy())
                if report:
                    rec.update(report.round_summary(r))
                history.append(rec)
                if writer:
                    writer.round(rec)
                bar(rec)
        fed_time = time.perf_counter() - t0
        selected = cfg.rounds
        if best is not None:
            _, selected, coord.params = best  # the model the sites' validation data chose
        final_eval = coord.evaluate(cfg.rounds + 1)  # the test splits, read once
        final_down, final_up = dict(coord.eval_bytes_down), dict(coord.eval_bytes_up)
        mean_acc, pooled_acc = _site_accuracy(final_eval)
        from insitu.federation.evaluation import summarize

        figures = summarize(final_eval)
        summary: dict[str, Any] = {
            "config": asdict(cfg),
            "plan": plan.to_meta(),
            "plan_hash": plan.content_hash(),
            "task": task.to_meta(),
            "private_randomness": site_secrets is None and coordinator_secret is None and not cfg.insecure_replayable_randomness,
            "sites": {s.name: {"n_train": s.n_train, "n_test": s.n_test} for s in data.sites},
            # accuracy of always answering the majority class of each site's test split (collapse warnings)
            "majority_rate": {s.name: _majority_rate(s.y_test) for s in data.sites},
            "final": {
                "mean_site_accuracy": mean_acc,
                "pooled_accuracy": pooled_acc,
                "site_accuracy": {k: v["accuracy"] for k, v in final_eval.items()},
                "selected_round": selected,
                "selection": {"split": split, "criterion": criterion.value if criterion else None,
                              "value": best[0] if best is not None else None},
                "worst_site_accuracy": figures["worst_site_accuracy"],
                "worst_site": figures["worst_site"],
                "balanced_accuracy": figures["balanced_accuracy"],
                "site_auc": figures["site_auc"],
                "mean_site_auc": figures["mean_site_auc"],
                "worst_site_auc": figures["worst_site_auc"],
                "sites_without_auc": figures["sites_without_auc"],
                "rounds_completed": sum(1 for h in history if h["status"] == "ok"),
                "rounds_aborted": sum(1 for h in history if h["status"] == "aborted"),
                "bytes_up_per_round": float(np.mean([h["bytes_up_total"] for h in history])) if history else 0.0,
                "bytes_up_per_round_per_site": _per_site(history, data.sites, "bytes_up"),
                "bytes_down_per_round": float(np.mean([h.get("bytes_down_total", 0) for h in history])) if history else 0.0,
                "bytes_down_per_round_per_site": _per_site(history, data.sites, "bytes_down"),
                "evaluation_bytes_down": final_down,  # the final evaluation's request to each site (after the rounds)
                "evaluation_bytes_up": final_up,  # and each site's answer
                "seconds": fed_time,
            },
        }
        if data.num_outputs == 1 and cfg.dataset != DatasetName.PHYSIONET2012.value:  # binary: AUC over all test records (MedMNIST
            # reports ACC and AUC; the table's caption promises it); PhysioNet's clinical figures below hold it already
            from insitu.apps.imaging import all_records_auc

            summary["final"]["all_records_auc"] = all_records_auc(task, coord.params, data)
        if cfg.dataset == DatasetName.PHYSIONET2012.value:  # rare outcome: AUROC, AUPRC, Score 1 (insitu.learn.clinical)
            from insitu.learn.clinical import clinical_evaluation, model_of

            summary["final"]["clinical"] = clinical_evaluation(model_of(task, coord.params), data)
        if cfg.personalize:  # each site fine-tunes the final model itself; only its test scores come back
            from insitu.federation.personalize import personalize_sites, summarize

            replies, dropped = personalize_sites(coord, cfg.rounds + 1, cfg.personalize, lr=cfg.personalize_lr, mode=cfg.personalize_mode)
            summary["final"]["personalized"] = {**summarize(replies, cfg.personalize), "lr": cfg.personalize_lr or task.lr, "dropped": dropped,
                                                "mode": str(getattr(cfg.personalize_mode, "value", cfg.personalize_mode))}
        if cfg.baselines:
            from insitu.apps.baselines import local_only, pooled

            # same compute as the federation: each site its own steps, pooled all sites' steps
            site_steps = cfg.rounds * cfg.local_steps
            summary["baselines"] = {
                "local_only": local_only(data, task, site_steps, seed=cfg.seed),
                "pooled": pooled(data, task, site_steps * len(data.sites), seed=cfg.seed),
            }
        if normalization is not None:
            summary["normalization"] = {**normalization.to_summary(), "ledger_run_id": run_id,
                                        "epsilon_spent": {n: ledger.spent(n) for n in secrets}}
        if report:
            summary["final"].update(report.final())
        if ledger is not None and writer and not cfg.privacy_ledger:
            ledger.export(writer.tmp / "privacy_ledger.sqlite")
        summary["wall_seconds"] = time.perf_counter() - t0
        if writer:
            from insitu.report.plots import accuracy_plot

            np.savez(writer.tmp / "model.npz", params=coord.params)
            (writer.tmp / "task.json").write_text(json.dumps(task.to_meta(), indent=2))
            (writer.tmp / "plan.json").write_text(json.dumps(plan.to_meta(), indent=2))
            accuracy_plot(history, writer.tmp / "accuracy.png", title=plot_title(cfg, plan, summary), baselines=_plot_baselines(summary))
            if "clinical" in summary["final"]:
                from insitu.report.clinical import calibration_plot

                calibration_plot(summary, writer.tmp / "calibration.png")
            summary["run_dir"] = str(out)
            (writer.tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
            writer.finish()
        return summary
    except BaseException:
        if writer:
            writer.abort()
        raise


def _per_site(history: list[dict[str, Any]], sites: Any, key: str) -> dict[str, float]:
    """Mean bytes per round each site sent (``bytes_up``) or was sent (``bytes_down``), over the rounds it took part in."""
    out = {}
    for s in sites:
        v = [h["sites"][s.name][key] for h in history if s.name in h["sites"] and h["sites"][s.name].get(key)]
        out[s.name] = float(np.mean(v)) if v else 0.0
    return out


def _majority_rate(y: torch.Tensor) -> float:
    y = y.reshape(-1).long()
    return float(torch.bincount(y).max()) / len(y) if len(y) else float("nan")


def protections(cfg: SimulationConfig, plan: Plan) -> str:
    """The protections of a run in a few words (plot titles)."""
    parts = [plan.protection.kind.value if plan.protection.kind is not Protection.PLAIN else "updates in clear"]
    if plan.dp.on:
        parts.append(f"{plan.dp.level.value}-level DP" + (f" ε={plan.dp.epsilon:g}" if plan.dp.epsilon else f" z={plan.dp.noise_multiplier:g}"))
    else:
        parts.append("no DP on updates")
    if plan.compression != "none":
        parts.append(f"compress {plan.compression}")
    if cfg.dataset == DatasetName.HEART.value:
        parts.append(f"z-scoring: DP moments ε={plan.normalize_epsilon:g}" if plan.normalize.value == "federated" else "z-scoring per site")
    return " · ".join(parts)


def plot_title(cfg: SimulationConfig, plan: Plan, summary: dict[str, Any]) -> str:
    return f"{cfg.dataset} · {cfg.strategy} · {summary['final']['rounds_completed']} rounds\n{protections(cfg, plan)}"


def _plot_baselines(summary: dict[str, Any]) -> dict[str, float]:
    loc = summary.get("baselines", {}).get("local_only")
    if not loc:
        return {}
    across = loc["mean_accuracy_across_sites"]
    return {"own model, own split": loc["mean_site_accuracy"],
            "local model, every site (mean)": float(np.mean(list(across.values()))),
            "pooled": summary["baselines"]["pooled"]["mean_site_accuracy"]}


def _one_round(coord: Coordinator, r: int, split: str = "test") -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    try:
        rec: RoundRecord = coord.run_round(r)
    except RoundAborted as exc:
        return {"round": r, "status": "aborted", "reason": str(exc), "bytes_up_total": 0, "sites": {}}, {}
    evals = coord.evaluate(r, split=split)
    down = round_bytes_down(rec, coord.eval_bytes_down)  # the round's requests and its evaluation's
    up = round_bytes_up(rec, coord.eval_bytes_up)  # the round's replies and the evaluation's answers
    mean_acc, pooled_acc = _site_accuracy(evals)
    sites = {}
    for sid in sorted(set(evals) | set(rec.train) | set(rec.dropped) | set(down) | set(up)):
        entry: dict[str, Any] = {}
        if sid in rec.train:
            entry.update({k: v for k, v in rec.train[sid].items()})
        if sid in evals:
            entry.update({f"{split}_loss": evals[sid]["loss"], f"{split}_accuracy": evals[sid]["accuracy"]})
        if sid in rec.dropped:
            entry["dropped"] = rec.dropped[sid]
        entry["bytes_up"] = up.get(sid, 0)
        entry["bytes_down"] = down.get(sid, 0)
        sites[sid] = entry
    return {
        "round": r,
        "status": "ok",
        "eval_split": split,
        "participants": list(rec.participants),
        "dropped": dict(rec.dropped),
        "mean_site_accuracy": mean_acc,
        "pooled_accuracy": pooled_acc,
        "update_norm": rec.update_norm,
        "seconds": rec.seconds,
        "bytes_up_total": int(sum(up.values())),
        "bytes_down_total": int(sum(down.values())),
        "sites": sites,
    }, evals

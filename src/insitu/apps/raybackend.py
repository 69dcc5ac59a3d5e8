"""Sites and devices as Ray actors: the simulation's transport, spread over processes or machines.

``insitu simulate --backend ray`` and ``insitu cross-device --backend ray`` run the same plan
through the same round engine as the in-process backend; only the transport differs.  The
coordinator stays in the driver; each Ray worker process holds a share of the sites (or makes
the devices it is asked about, one at a time) and answers wire messages: every request is encoded
in the driver, decoded in the worker, and the reply comes back encoded, so a Ray run exchanges
exactly the bytes a deployment would and counts them the same way.

Sites are built inside the workers by the one builder (:func:`insitu.builder.build_site`) from the
plan, the site's data and the site's secret, which the driver hands to each worker explicitly
(never derived from a recorded value; a device gets a fresh secret with every request, as it
does in-process).  Each worker pins torch to the run's ``threads`` (one by default).

Without ``--ray-address`` a private local Ray instance is started for the run, with the dashboard
off, usage statistics off, and every listener (GCS, raylet, workers, agents) bound to 127.0.0.1;
it is shut down when the run ends.  With ``--ray-address`` the run joins that cluster (whose nodes
need this insitu installed) and leaves it running.

With differential privacy each site's budget guard and ledger live in its worker, where the site
charges or refuses every round itself; the driver's ledger (the run's privacy report, the
persisted ledger) mirrors them (:mod:`insitu.apps.rayledger`).
"""
from __future__ import annotations

import contextlib
import enum
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from insitu.errors import ConfigError

log = logging.getLogger("insitu.ray")

#: the Ray release insitu is tested with (pyproject's ``ray`` extra and requirements.lock)
RAY_VERSION = "2.60.0"
INSTALL_HINT = f"pip install 'ray=={RAY_VERSION}' (or pip install 'insitu[ray]')"


class Backend(str, enum.Enum):
    """Where simulated sites run: in the driver's process, or as Ray actors (one or many machines)."""

    IN_PROCESS = "in-process"
    RAY = "ray"


def check_backend(backend: str, ray_address: str | None, option: str = "--backend") -> Backend:
    """The backend named ``backend``; ``ray_address`` only goes with ``ray`` and must look like an address."""
    from insitu.errors import parse_choice

    b = parse_choice(Backend, backend, option)
    if ray_address is not None:
        if b is not Backend.RAY:
            raise ConfigError(f"--ray-address {ray_address!r} given with {option} {b.value}; add {option} ray")
        if not isinstance(ray_address, str) or not ray_address.strip() or any(c.isspace() for c in ray_address):
            raise ConfigError(f"--ray-address must be a Ray address such as 10.0.0.5:6379, ray://head:10001 or auto, got {ray_address!r}")
    return b


def require_ray() -> Any:
    """The ``ray`` module, or a one-line ConfigError saying how to install it."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"--backend ray needs Ray, which is not installed: {INSTALL_HINT}")
    import ray

    return ray


# -- the Ray session of one run ----------------------------------------------------------------------
_OPEN: list[list["RayTransport"]] = []  # transports opened inside each active ray_session (innermost last)


def _local_env() -> dict[str, str]:
    """Environment for a private local Ray: loopback only (Ray binds its servers to the node IP,
    which it otherwise replaces by the machine's outward address), no usage statistics sent
    anywhere, and this insitu importable by the workers."""
    src = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's switch that keeps the node IP at 127.0.0.1
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": src + (os.pathsep + path if path else ""),
    }


@contextlib.contextmanager
def _patched_env(env: Mapping[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_local(cpus: int | None = None) -> int:
    """Start a private local Ray instance in this process: dashboard off, every listener on
    127.0.0.1, ``cpus`` worker slots (default: this machine's CPUs).  Returns the slots."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus < 1:
        raise ConfigError(f"a local Ray needs at least one CPU, got {cpus}")
    with _patched_env(_local_env()):
        ray = require_ray()
        from ray._private import ray_constants  # read at import; a driver that imported Ray before needs it too

        before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            # address="local": a new instance even if `ray start` left a cluster on this machine to join
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        except Exception as exc:  # Ray raises ValueError, RuntimeError, ConnectionError... when it cannot start
            raise ConfigError(f"could not start a local Ray: {_cause(exc)}") from None
        finally:
            if before is not None:
                ray_constants.ENABLE_RAY_CLUSTER = before
    log.warning("Ray: started a local Ray instance for this run (%d worker CPU(s); dashboard off; every listener on 127.0.0.1; "
                "usage stats off); give --ray-address to run on a cluster", cpus)
    return cpus


def connect(address: str) -> None:
    """Join the Ray cluster at ``address``; a failure is a ConfigError naming the address."""
    ray = require_ray()
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError... for a bad or dead address
        raise ConfigError(f"could not join the Ray cluster at --ray-address {address!r}: {type(exc).__name__}: {exc}") from None
    log.warning("Ray: joined the cluster at %s (%g CPU(s)); its nodes need insitu installed", address, cluster_cpus())


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once an address nobody answers at (Ray itself retries for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"could not join the Ray cluster at --ray-address {address!r}: nothing answers there "
                          f"({exc.strerror or exc}); start it with `ray start --head` or check the address") from None


def cluster_cpus() -> int:
    """CPU slots of the Ray cluster this process is connected to."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Ray for one run: joins ``address``, or starts a private local instance (shut down after), or
    reuses the Ray this process already joined (tests and notebooks running several simulations).
    Workers of transports opened inside are emptied when the block ends; with Ray started or
    joined here, Ray is shut down (the workers with it), else they wait, empty, for the next run."""
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        if address is None:
            start_local()
            started = True
        else:
            connect(address)
            started = True  # leave the cluster running; only this driver disconnects
    opened: list[RayTransport] = []
    _OPEN.append(opened)
    try:
        yield
    finally:
        _OPEN.remove(opened)
        for t in opened:
            t.close()
        if started:
            _IDLE.pop(ray.get_runtime_context().get_job_id(), None)
            ray.shutdown()


# -- the worker side ---------------------------------------------------------------------------------
class _FixedSites:
    """The sites one worker holds for a whole run, built once with their explicit secrets.

    With ``seeds`` (a DP plan) the sites charge a ledger of this worker, started from the driver's
    state of each site (:func:`insitu.apps.rayledger.worker_ledger`); ``watch`` reports their charges."""

    def __init__(self, plan: Any, sites: Sequence[tuple[Any, bytes]], job: str, seeds: Sequence[Any] = ()):
        from insitu.builder import build_site

        ledger = None
        if seeds:
            from insitu.apps.rayledger import worker_ledger

            ledger = worker_ledger(seeds)
        self._sites = {sd.name: build_site(plan, sd.name, sd, secret=secret, ledger=ledger, job=job) for sd, secret in sites}
        self.watch = None
        if ledger is not None:
            from insitu.apps.rayledger import LedgerWatch

            self.watch = LedgerWatch({n: s.budget for n, s in self._sites.items()}, ledger, job)

    def site(self, name: str, round_: int, secret: bytes | None) -> Any:
        site = self._sites.get(name)
        if site is None:
            raise ConfigError(f"unknown site {name!r}")
        return site


class SiteHost:
    """One Ray worker process: answers wire messages for the sites its ``source`` holds or makes.

    ``source.site(name, round, secret)`` gives the site (a fixed share of a simulation's sites, or
    a cross-device population that makes each device when asked).  Torch is pinned to the run's
    ``threads`` while it holds a source.  Between runs in one Ray session a host holds nothing
    (:meth:`reset`) and waits to be loaded again, so a second run does not pay for new processes."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024):
        self.source: Any = None
        self.max_bytes = max_bytes

    def load(self, source: Any, threads: int) -> dict[str, int]:
        """Take ``source`` (sites are built here, in the worker) with torch at ``threads`` threads."""
        import torch

        torch.set_num_threads(threads)
        self.source = source.start() if hasattr(source, "start") else source
        return self.info()

    def reset(self) -> None:
        """Drop the sites, their data and secrets."""
        self.source = None

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, int]:
        """This worker's process id, torch thread count, and whether it holds sites (tests check them)."""
        import torch

        return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(), "holding": int(self.source is not None)}

    def serve(self, wires: list[bytes], items: list[tuple[str, int, bytes | None]]) -> tuple[list[tuple[str, bytes, float]], list[Any]]:
        """Answer each (site, index of its request in ``wires``, secret): the encoded reply and the
        seconds the site took.  A refusal or a crash is an ERROR reply, as from a deployed site.
        Beside the replies: what this worker's DP sites charged or refused since its last answer."""
        from insitu.federation.messages import decode
        from insitu.federation.transport import answer

        out = []
        for sid, i, secret in items:
            req = decode(wires[i], max_bytes=self.max_bytes)
            out.append((sid, *answer(lambda m: self.source.site(sid, m.round, secret).handle(m), req, self.max_bytes)))
        return out, self.news()

    def news(self) -> list[Any]:
        """Charges and refusals of this worker's DP sites not reported yet (none without DP)."""
        watch = getattr(self.source, "watch", None)
        return watch.news() if watch is not None else []

    def ledger_state(self) -> list[Any]:
        """Every charge this run's sites made in this worker's ledger (the driver settles against it)."""
        watch = getattr(self.source, "watch", None)
        return watch.state() if watch is not None else []


# -- the driver side ---------------------------------------------------------------------------------
class RayTransport:
    """The round engine's :class:`~insitu.federation.transport.Transport` over Ray actors.

    ``owner(site)`` names the actor that answers for a site (a ConfigError: no such site);
    ``secret(site)`` is what the driver sends along with each request (devices: a fresh secret per
    request; simulated sites got theirs when their worker was made).  An exchange sends each
    actor one batch, waits at most ``timeout`` seconds, and returns replies and drop-outs in the
    order of the requests, exactly as the in-process transport does.  A worker that died is asked
    nothing more (its sites drop out).  ``mirror`` (DP plans): the driver's copy of the sites'
    ledgers, fed with what the workers report beside their replies."""

    def __init__(self, hosts: list[Any], owner: Callable[[str], int], names: Callable[[], list[str]], *,
                 fail: Any = None, secret: Callable[[str], bytes | None] | None = None, max_bytes: int | None = None,
                 mirror: Any = None):
        self.hosts, self._owner, self._names = hosts, owner, names
        self._fail, self._secret = fail, secret
        self._max = max_bytes or 256 * 1024 * 1024
        self.made = 0  # requests answered by a site (cross-device: devices materialised)
        self.mirror = mirror
        self.gone: dict[int, str] = {}  # workers that died: index → what Ray said
        if _OPEN:
            _OPEN[-1].append(self)

    def sites(self) -> list[str]:
        return self._names()

    def workers(self) -> list[dict[str, int]]:
        """Process id and torch threads of each Ray worker holding sites (tests check both)."""
        import ray

        return ray.get([h.info.remote() for h in self.hosts])

    def exchange(self, requests: Mapping[str, Any], timeout: float) -> Any:
        import ray

        from insitu.federation.messages import decode, encode
        from insitu.federation.transport import Exchange, sort_reply

        early: dict[str, str] = {}
        sent: dict[str, int] = {}
        batches: dict[int, tuple[list[bytes], dict[int, int], list[tuple[str, int, bytes | None]]]] = {}
        for sid, req in requests.items():
            try:
                w = self._owner(sid)
            except ConfigError as exc:
                early[sid] = str(exc)
                continue
            self.made += 1
            if self._fail is not None and self._fail(sid, req.round, req.kind):
                early[sid] = "site failed (injected drop-out)"
                continue
            if w in self.gone:
                early[sid] = f"site's Ray worker is gone ({self.gone[w]})"
                continue
            wires, index, items = batches.setdefault(w, ([], {}, []))
            if id(req) not in index:  # a broadcast is encoded once per worker, sent as one object
                index[id(req)] = len(wires)
                wires.append(encode(req, max_bytes=self._max))
            sent[sid] = len(wires[index[id(req)]])
            items.append((sid, index[id(req)], self._secret(sid) if self._secret else None))
        refs = {self.hosts[w].serve.remote(wires, items): (w, items) for w, (wires, _, items) in batches.items()}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout) if refs else ([], [])
        answers: dict[str, tuple[bytes, float]] = {}
        lost: dict[str, str] = {}
        news: list[Any] = []
        for ref in ready:
            w, items = refs[ref]
            try:
                out, told = ray.get(ref)
                answers.update({sid: (wire, seconds) for sid, wire, seconds in out})
                news += told
            except Exception as exc:  # the worker process died, or could not unpickle the batch
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
                if isinstance(exc, ray.exceptions.RayActorError):
                    self.gone[w] = why.splitlines()[0][:200]
                lost.update({sid: f"site's Ray worker failed: {why}" for sid, _, _ in items})
        for ref in late:
            lost.update({sid: f"timed out (no answer from its Ray worker within {timeout:.1f} s)" for sid, _, _ in refs[ref][1]})
        if self.mirror is not None:
            self._mirror(requests, news, lost)
        replies: dict[str, Any] = {}
        dropped: dict[str, str] = {}
        recv: dict[str, int] = {}
        refused: dict[str, str] = {}
        for sid in requests:
            if sid in early:
                dropped[sid] = early[sid]
            elif sid in lost:
                dropped[sid] = lost[sid]
            else:
                wire, seconds = answers[sid]
                recv[sid] = len(wire)
                sort_reply(sid, decode(wire, max_bytes=self._max), seconds, timeout, replies, dropped, refused)
        return Exchange(replies, dropped, sent, recv, refused)

    def _mirror(self, requests: Mapping[str, Any], news: list[Any], lost: Mapping[str, str]) -> None:
        """Charges and refusals into the driver's ledger in the order an in-process run makes them (by
        round, then request order); then a TRAIN request that got no reply is charged as if trained."""
        from insitu.federation.messages import MessageKind

        order = {sid: i for i, sid in enumerate(requests)}
        self.mirror.apply(sorted(news, key=lambda n: (n.round, order.get(n.site, len(order)), n.site)))
        for sid, why in lost.items():
            if requests[sid].kind is MessageKind.TRAIN:
                self.mirror.assume(sid, requests[sid].round, why)

    def settle(self, timeout: float = 60.0) -> None:
        """The driver's ledger checked against every live worker's (DP runs; the privacy report does this
        before it reads the ledger).  A worker that is gone or does not answer in ``timeout`` seconds
        leaves the driver's record as it is: every charge it reported, and those assumed for lost replies."""
        if self.mirror is None:
            return
        import ray

        live = {w: h.ledger_state.remote() for w, h in enumerate(self.hosts) if w not in self.gone}
        ready, _ = ray.wait(list(live.values()), num_returns=len(live), timeout=timeout) if live else ([], [])
        states: dict[str, Any] = {}
        for w, ref in live.items():
            if ref not in ready:
                log.warning("Ray worker %d did not give its sites' ledger within %.0f s; the driver keeps its own record", w, timeout)
                continue
            try:
                charges = ray.get(ref)
            except Exception as exc:  # died since its last answer
                self.gone[w] = f"{type(exc).__name__}"
                continue
            for sid in self._names():
                if self._owner(sid) == w:
                    states[sid] = [c for c in charges if c.site == sid]
        self.mirror.settle(states)

    def dp_report(self, plan: Any) -> Any:
        """The run's privacy report, read from the driver's ledger after :meth:`settle`."""
        if self.mirror is None:
            raise ConfigError("this Ray run's plan has no differential privacy to report")
        return self.mirror.report(plan, self.settle)

    def close(self) -> None:
        """Empty this transport's workers (sites, data and secrets dropped) and hand them back to the
        session's pool for the next run; the session kills them when it ends."""
        import ray

        try:
            ray.get([h.reset.remote() for h in self.hosts])
            _pool().extend(self.hosts)
        except Exception:  # a worker that cannot be emptied is not reused
            for h in self.hosts:
                with contextlib.suppress(Exception):
                    ray.kill(h)
        self.hosts = []


_IDLE: dict[str, list[Any]] = {}  # empty SiteHost actors of each Ray session (by job id), reused run after run


def _pool() -> list[Any]:
    import ray

    return _IDLE.setdefault(ray.get_runtime_context().get_job_id(), [])


def _actors(sources: list[Any], threads: int) -> list[Any]:
    """One loaded SiteHost per source: idle ones of this session first, new ones for the rest."""
    import ray

    pool = _pool()
    hosts = [pool.pop() for _ in range(min(len(pool), len(sources)))]
    host = ray.remote(num_cpus=1)(SiteHost)
    hosts += [host.remote() for _ in range(len(sources) - len(hosts))]
    try:
        ray.get([h.load.remote(src, threads) for h, src in zip(hosts, sources)])  # errors building sites surface here
    except Exception:
        for h in hosts:
            with contextlib.suppress(Exception):
                ray.kill(h)
        raise
    return hosts


def _workers(n: int) -> int:
    return max(1, min(n, cluster_cpus()))


def site_transport(plan: Any, sites: Sequence[Any], secrets: Mapping[str, bytes], *, job: str, fail: Any = None,
                   threads: int = 1, ledger: Any = None) -> RayTransport:
    """A simulation's sites (``SiteData``) spread round-robin over one Ray actor per CPU slot
    (at most one per site), each site built in its worker with ``secrets[site]``.

    A DP plan needs ``ledger`` (the run's :class:`~insitu.privacy.PrivacyLedger`, each site's budget
    set): each worker's sites charge a ledger of their own, started from it, and the transport's
    ``mirror`` keeps it equal to theirs (:mod:`insitu.apps.rayledger`)."""
    if not _OPEN:
        raise ConfigError("Ray sites are made inside ray_session() (insitu.apps.raybackend), which owns their workers")
    mirror = None
    if plan.dp.on:
        from insitu.apps.rayledger import LedgerMirror

        mirror = LedgerMirror.of(plan, sites, ledger, job)
    n = _workers(len(sites))
    shares: list[list[tuple[Any, bytes]]] = [[] for _ in range(n)]
    where: dict[str, int] = {}
    for i, sd in enumerate(sites):
        shares[i % n].append((sd, bytes(secrets[sd.name])))
        where[sd.name] = i % n
    seeds = [[mirror.seed(sd.name) for sd, _ in share] if mirror is not None else [] for share in shares]
    try:
        hosts = _actors([_SiteShare(plan, share, job, seed) for share, seed in zip(shares, seeds)], threads)
    except Exception as exc:
        raise ConfigError(f"the Ray workers could not build the sites: {_cause(exc)}") from None
    names = [sd.name for sd in sites]

    def owner(sid: str) -> int:
        if sid not in where:
            raise ConfigError(f"unknown site {sid!r}")
        return where[sid]

    return RayTransport(hosts, owner, lambda: list(names), fail=fail, mirror=mirror)


class _SiteShare:
    """What a simulation sends one worker: the plan, its share of the sites' data and their secrets
    (and, with DP, each site's ledger as the driver holds it)."""

    def __init__(self, plan: Any, share: list[tuple[Any, bytes]], job: str, seeds: Sequence[Any] = ()):
        self.plan, self.share, self.job, self.seeds = plan, share, job, list(seeds)

    def start(self) -> _FixedSites:
        """The share's sites, built (in the worker) by the one builder."""
        return _FixedSites(self.plan, self.share, self.job, self.seeds)


def device_transport(population: Any, plan: Any, *, fail: Any = None, threads: int = 1,
                     secrets: Callable[[str], bytes] | None = None) -> RayTransport:
    """Cross-device: the population split by device index over one Ray actor per CPU slot; each
    actor makes a device when it is asked something (its records drawn from the device's own
    seed), so memory grows with the sample.  Each request carries the device's secret from the
    driver: ``secrets(name)`` when given (exact-equality tests), else fresh from the OS."""
    if not _OPEN:
        raise ConfigError("Ray devices are made inside ray_session() (insitu.apps.raybackend), which owns their workers")
    from insitu.builder import new_secret
    from insitu.compress.crossdevice import _Devices

    n = _workers(len(population))
    try:
        hosts = _actors([_Devices(population, plan) for _ in range(n)], threads)
    except Exception as exc:
        raise ConfigError(f"the Ray workers could not start: {_cause(exc)}") from None

    def owner(sid: str) -> int:
        d = population.index(sid)  # a ConfigError (or -1) for a name not of the population
        if d < 0:
            raise ConfigError(f"unknown device {sid!r}")
        return d % n

    return RayTransport(hosts, owner, lambda: [population.name(d) for d in range(len(population))], fail=fail,
                        secret=secrets or (lambda _sid: new_secret()))


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


__all__ = ["Backend", "RayTransport", "SiteHost", "check_backend", "connect", "device_transport", "ray_session",
           "require_ray", "site_transport", "start_local", "INSTALL_HINT", "RAY_VERSION"]

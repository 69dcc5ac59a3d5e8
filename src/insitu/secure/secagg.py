"""Secure aggregation that survives drop-outs: Bonawitz et al. 2017 on the sparse graph of SecAgg+.

The coordinator learns Σ wᵢ·uᵢ and Σ wᵢ over the sites that finished, never one
site's vector.  One round runs four exchanges, all through ``Transport.exchange``:

1. SECAGG_ADVERTISE → each site makes two fresh X25519 pairs: ``c`` (to encrypt
   shares to peers) and ``s`` (to agree pairwise mask seeds).          U1 = answered
2. SECAGG_SHARE (all U1 public keys) → each site draws a self-mask seed bᵤ and
   Shamir-shares bᵤ and its private ``s`` key among itself and its graph
   neighbours, each share AES-GCM-sealed under the pairwise ``c`` key: the
   coordinator relays the shares but cannot read them.  It also commits to bᵤ.   U2
3. TRAIN (carrying each site's inbox of shares) → the site trains and returns
       yᵤ = encode(wᵤ·uᵤ ‖ wᵤ) + PRG(bᵤ) + Σ_{v∈N(u)∩U2} ±PRG(s_uv)   in Z_2^k   U3
   (the sign is + when u < v: pairwise masks cancel in the sum).
4. SECAGG_UNMASK (who survived, who dropped) → each site returns, per neighbour,
   the share of bᵥ if v survived, or of v's ``s`` key if v dropped — never both.
   The coordinator rebuilds the secrets from ≥ t shares (checking every share
   against the commitment or the advertised public key, naming forgers),
   subtracts the survivors' self-masks and the masks that dropped sites shared
   with survivors, and decodes the fixed-point sum.

Silence is a drop-out; a lie aborts.  A site that times out or refuses is dropped
and recovered from; a reply that is replayed, misdirected, of the wrong length,
out of the ring, or carries forged shares aborts the round with
:class:`RoundAborted` naming the site, and the global model stays unchanged.

Trust model: honest-but-curious coordinator (it follows the protocol but may
read everything it relays) colluding with fewer than t sites of any
neighbourhood.  Public keys are not signed here, so an actively malicious
coordinator could substitute keys; the deployment's mTLS channel authenticates
each site to the coordinator but not to its peers (see README).
"""
from __future__ import annotations

import base64
import enum
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from insitu.errors import ConfigError, ProtocolError, RoundAborted
from insitu.federation.messages import Message, MessageKind
from insitu.federation.protocol import AggregateResult, PhaseRunner, RoundPlan
from insitu.federation.transport import Transport, reply_metrics
from insitu.secure import shamir
from insitu.secure.attest import relayable
from insitu.secure._primitives import MaskExpander, agree, commitment, context, hkdf, open_sealed, private_key, seal, x25519_keypair, x25519_public
from insitu.secure.fixedpoint import FixedPoint
from insitu.secure.graph import neighbours, required_degree

KEY_BYTES = 32
SEED_BYTES = 16


class Recovery(str, enum.Enum):
    """Who removes the self-masks, and the masks that dropped sites shared with survivors.

    SERVER (Bonawitz et al.): the coordinator rebuilds every survivor's self-mask seed and each
    dropped site's key from shares, and expands one mask per survivor plus one per edge between
    a dropped site and a survivor; no extra upload.  SURVIVORS: in the unmask phase each
    survivor also returns one correction vector, its own self-mask plus its masks with dropped
    neighbours.  The coordinator learns nothing it would not learn from the seeds and keys in
    SERVER mode (a survivor's self-mask seed is revealed to it there too, and a dropped site's
    key gives every mask of that site); it only subtracts the corrections, falling back to
    SERVER for a survivor that stays silent (its self-mask seed and its dropped neighbours'
    keys are rebuilt from the shares every survivor sends anyway).  It trades one extra upload
    of the vector per survivor for a coordinator that expands no mask at all.
    """

    SERVER = "server"
    SURVIVORS = "survivors"


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation parameters.  The defaults are the safe recipe; every field is validated.

    ``bound`` is the largest |wᵢ·uᵢ| coordinate (and weight) a site may send; with the number of
    sites it fixes the fixed-point resolution.  ``bad_fraction`` is the share of sites (corrupted
    plus dropped out) the graph must withstand at ``security_bits``.  ``threshold`` is the fraction
    of a share group needed to rebuild a secret (default: the smallest strict majority).
    ``min_group`` is the fewest sites this party agrees to be aggregated with.
    """

    ring_bits: int = 64
    bound: float = 2.0**20
    frac_bits: int | None = None
    security_bits: int = 40
    bad_fraction: float = 0.2
    degree: int | None = None
    threshold: float | None = None
    min_group: int = 3
    recovery: Recovery = Recovery.SERVER

    def __post_init__(self) -> None:
        object.__setattr__(self, "recovery", Recovery(self.recovery))
        FixedPoint(self.ring_bits, self.frac_bits or 0, self.bound)  # validates ring size and bound
        if self.threshold is not None and not 0.5 < self.threshold <= 1.0:
            raise ConfigError(
                f"secure-aggregation threshold {self.threshold} is not a majority: it must be in (0.5, 1], otherwise "
                "the coordinator with a minority of sites could rebuild both masks of one site"
            )
        if self.min_group < 2:
            raise ConfigError(f"secure-aggregation minimum group {self.min_group} must be at least 2 (one site's sum is its update)")
        if self.degree is not None and self.degree < 2:
            raise ConfigError(f"graph degree {self.degree} must be at least 2")
        required_degree(100, self.security_bits, self.bad_fraction)  # validates both

    def degree_for(self, n: int) -> int:
        """The graph degree for ``n`` sites; a degree below what the security level needs is refused."""
        need = required_degree(n, self.security_bits, self.bad_fraction)
        if self.degree is None:
            return need
        deg = min(self.degree + self.degree % 2, n - 1)
        if deg < need:
            raise ConfigError(
                f"graph degree {self.degree} is too sparse for {n} sites at {self.security_bits}-bit security with "
                f"{self.bad_fraction:.0%} bad sites: need at least {need} (or lower --secagg-security-bits)"
            )
        return deg

    def threshold_for(self, group: int) -> int:
        """Shares needed out of ``group`` (a site and its neighbours); always a strict majority."""
        t = group // 2 + 1 if self.threshold is None else math.ceil(self.threshold * group)
        t = min(max(t, 1), group)
        if 2 * t <= group:
            raise ConfigError(f"threshold {t} of {group} is not a majority")
        return t

    def fixed_point(self, n: int) -> FixedPoint:
        return FixedPoint.fit(self.ring_bits, self.bound, n, self.frac_bits)


@dataclass(frozen=True)
class SecAggStats:
    """Where the time and bytes of the last round went (for benchmarks and reports)."""

    server_seconds: float
    unmask_seconds: float
    masks_regenerated: int
    degree: int
    threshold: int
    frac_bits: int
    survivors: int
    dropped: int


# -- wire helpers ---------------------------------------------------------------------------------
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any, size: int | None, what: str) -> bytes:
    if not isinstance(s, str):
        raise ProtocolError(f"{what} is not a base64 string")
    try:
        b = base64.b64decode(s, validate=True)
    except ValueError:
        raise ProtocolError(f"{what} is not valid base64") from None
    if size is not None and len(b) != size:
        raise ProtocolError(f"{what} is {len(b)} bytes, expected {size}")
    return b


def _mask_seed(secret: bytes, job: str, round_: int, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return hkdf(secret, context(b"insitu-secagg-mask", job, round_, lo, hi), SEED_BYTES)


def _share_key(secret: bytes, job: str, round_: int, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return hkdf(secret, context(b"insitu-secagg-share", job, round_, lo, hi), 32)


def _share_aad(job: str, round_: int, sender: str, recipient: str) -> bytes:
    return context(b"insitu-secagg-share-aad", job, round_, sender, recipient)


SEALED_SHARE_BYTES = 12 + 2 * shamir.SHARE_BYTES + 16


def _share_rows(values: list[int]) -> np.ndarray:
    return np.frombuffer(b"".join(shamir.to_bytes(v) for v in values), dtype=np.uint8).reshape(len(values), shamir.SHARE_BYTES)


@dataclass(frozen=True)
class _Setup:
    """The round parameters announced in SECAGG_ADVERTISE, checked by both sides."""

    group: tuple[str, ...]
    degree: int
    threshold: int
    graph_seed: bytes
    fp: FixedPoint

    def to_meta(self) -> dict[str, Any]:
        return {
            "group": list(self.group),
            "degree": self.degree,
            "threshold": self.threshold,
            "graph_seed": self.graph_seed.hex(),
            "ring_bits": self.fp.ring_bits,
            "frac_bits": self.fp.frac_bits,
            "bound": self.fp.bound,
        }

    @classmethod
    def from_meta(cls, msg: Message) -> "_Setup":
        group = msg.require("group", list)
        if not all(isinstance(s, str) for s in group) or len(set(group)) != len(group):
            raise ProtocolError("secagg group must be a list of distinct site names")
        try:
            seed = bytes.fromhex(msg.require("graph_seed", str))
        except ValueError:
            raise ProtocolError("secagg graph_seed is not hex") from None
        fp = FixedPoint(msg.require("ring_bits", int), msg.require("frac_bits", int), float(msg.require("bound", (int, float))))
        return cls(tuple(sorted(group)), msg.require("degree", int), msg.require("threshold", int), seed, fp)

    def index(self) -> dict[str, int]:
        return {s: i + 1 for i, s in enumerate(self.group)}

    def digest(self) -> bytes:
        """SHA-256 of the setup as announced (what a signed key advertisement binds to)."""
        return hashlib.sha256(json.dumps(self.to_meta(), sort_keys=True).encode()).digest()

    def graph(self) -> dict[str, frozenset[str]]:
        return neighbours(self.group, self.degree, self.graph_seed)


# -- site half --------------------------------------------------------------------------------------
@dataclass
class _SiteRound:
    setup: _Setup
    nbrs: frozenset[str]
    c_sk: Any  # X25519PrivateKey
    c_pk: bytes
    s_sk: bytes
    s_pk: bytes
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # U1: site → (c_pk, s_pk)
    b_seed: bytes = b""
    held: dict[str, tuple[int, int]] = field(default_factory=dict)  # owner → (b share, s share) I hold
    u2: frozenset[str] = frozenset()
    size: int = 0
    stage: str = "advertised"


class SecAggSite:
    """The site half: answers ADVERTISE / SHARE / UNMASK and masks the TRAIN_REPLY.

    Holds every secret of the site (private keys, self-mask seed, shares of peers) and
    checks each request against what it already agreed to, so that a coordinator asking
    for both shares of one peer, or replaying an old phase, is refused.
    """

    #: the TRAIN meta key this protocol adds to the plan and round instructions
    request_keys = ("secagg",)

    @staticmethod
    def egress() -> dict:
        """What this site half sends, field by field (see insitu.federation.egress)."""
        from insitu.federation.egress import Declared, Release

        pub, prot = Release.PUBLIC, Release.PROTECTED
        return {
            MessageKind.SECAGG_ADVERTISE_REPLY: Declared({"c_pk": pub, "s_pk": pub, "cert": pub, "sig": pub}),
            MessageKind.SECAGG_SHARE_REPLY: Declared({"shares": prot, "commit": pub}),  # shares sealed to each neighbour
            MessageKind.TRAIN_REPLY: Declared({"secagg": pub, "metrics": pub}, {"masked": prot}),
            # the protocol's unmasking: a survivor's self-mask share or a dropped site's key share, never both
            MessageKind.SECAGG_UNMASK_REPLY: Declared({"b": pub, "s": pub}, {"b_shares": pub, "s_shares": pub, "correction": pub}),
        }

    def __init__(self, site_id: str, config: SecAggConfig | None = None, attestation: Any = None):
        """``attestation`` (an :class:`insitu.secure.attest.Attestation`, deployments): sign this
        site's keys with its certificate and accept only peers' keys signed with theirs."""
        self.site_id = site_id
        self.config = config or SecAggConfig()
        self.attestation = attestation
        self._rounds: dict[str, tuple[int, _SiteRound]] = {}  # job → (round, state)
        self.seconds = 0.0  # time spent in this protocol (for benchmarks)

    def handlers(self) -> Mapping[MessageKind, Callable[[Message], Message]]:
        return {
            MessageKind.SECAGG_ADVERTISE: self._timed(self._advertise),
            MessageKind.SECAGG_SHARE: self._timed(self._share),
            MessageKind.SECAGG_UNMASK: self._timed(self._unmask),
        }

    def _timed(self, fn: Callable[[Message], Message]) -> Callable[[Message], Message]:
        def run(msg: Message) -> Message:
            t0 = time.perf_counter()
            try:
                return fn(msg)
            finally:
                self.seconds += time.perf_counter() - t0

        return run

    def _state(self, msg: Message, stage: str) -> _SiteRound:
        cur = self._rounds.get(msg.job)
        if cur is None or cur[0] != msg.round:
            raise ProtocolError(f"site {self.site_id}: {msg.kind.value} for round {msg.round} without key agreement for that round (replayed or out of order)")
        if cur[1].stage != stage:
            raise ProtocolError(f"site {self.site_id}: {msg.kind.value} for round {msg.round} arrives at stage {cur[1].stage!r}, expected {stage!r} (replayed or out of order)")
        return cur[1]

    def _advertise(self, msg: Message) -> Message:
        setup = _Setup.from_meta(msg)
        cfg = self.config
        n = len(setup.group)
        cur = self._rounds.get(msg.job)
        if cur is not None and (msg.round < cur[0] or (msg.round == cur[0] and cur[1].stage in ("sent", "unmasked"))):
            raise ProtocolError(f"site {self.site_id}: secagg round {msg.round} replayed (this site is at round {cur[0]}, stage {cur[1].stage})")
        if self.site_id not in setup.group:
            raise ProtocolError(f"site {self.site_id} is not in the announced group")
        if n < cfg.min_group:
            raise ConfigError(f"site {self.site_id} refuses secure aggregation in a group of {n}; its minimum is {cfg.min_group}")
        need = required_degree(n, cfg.security_bits, cfg.bad_fraction)
        if setup.degree < need:
            raise ConfigError(f"site {self.site_id} refuses graph degree {setup.degree} for {n} sites: its security level needs ≥ {need}")
        group_size = min(setup.degree, n - 1) + 1
        if setup.threshold > group_size or setup.threshold < cfg.threshold_for(group_size):
            raise ConfigError(f"site {self.site_id} refuses threshold {setup.threshold} of {group_size}: it requires ≥ {cfg.threshold_for(group_size)}")
        setup.fp.check_headroom(n)
        c_sk, c_pk = x25519_keypair()
        s_sk, s_pk = x25519_keypair()
        self._rounds[msg.job] = (msg.round, _SiteRound(setup, setup.graph()[self.site_id], private_key(c_sk), c_pk, s_sk, s_pk))
        meta: dict[str, Any] = {"c_pk": _b64(c_pk), "s_pk": _b64(s_pk)}
        if self.attestation is not None:
            from insitu.secure.attest import transcript

            meta.update(self.attestation.sign_fields(transcript(msg.job, msg.round, self.site_id, setup.digest(), c_pk, s_pk)))
        return Message(MessageKind.SECAGG_ADVERTISE_REPLY, msg.round, msg.job, meta)

    def _share(self, msg: Message) -> Message:
        st = self._state(msg, "advertised")
        raw = msg.require("keys", dict)
        keys: dict[str, tuple[bytes, bytes]] = {}
        digest = st.setup.digest() if self.attestation is not None else b""
        for sid, pair in raw.items():
            if sid not in st.setup.group or not isinstance(pair, list) or len(pair) not in (2, 4):
                raise ProtocolError(f"site {self.site_id}: bad key entry for {sid!r}")
            keys[sid] = (_unb64(pair[0], KEY_BYTES, f"c key of {sid}"), _unb64(pair[1], KEY_BYTES, f"s key of {sid}"))
            if self.attestation is not None and sid != self.site_id:
                from insitu.secure.attest import transcript

                self.attestation.check_relayed(pair[2:], sid, transcript(msg.job, msg.round, sid, digest, *keys[sid]))
        if keys.get(self.site_id) != (st.c_pk, st.s_pk):
            raise ProtocolError(f"site {self.site_id}: the coordinator relayed wrong public keys for this site")
        if len(keys) < self.config.min_group:
            raise ConfigError(f"site {self.site_id} refuses: only {len(keys)} sites advertised keys, its minimum group is {self.config.min_group}")
        holders = sorted((st.nbrs & keys.keys()) | {self.site_id})
        t = st.setup.threshold
        if len(holders) < t:
            raise RoundAborted(f"site {self.site_id}: only {len(holders)} of its share group are left, threshold is {t}")
        idx = st.setup.index()
        st.b_seed = os.urandom(SEED_BYTES)
        b_sh = shamir.split(int.from_bytes(st.b_seed, "big"), t, [idx[h] for h in holders])
        s_sh = shamir.split(int.from_bytes(st.s_sk, "big"), t, [idx[h] for h in holders])
        out: dict[str, str] = {}
        for h in holders:
            pair = (b_sh[idx[h]], s_sh[idx[h]])
            if h == self.site_id:
                st.held[h] = pair
                continue
            key = _share_key(agree(st.c_sk, keys[h][0]), msg.job, msg.round, self.site_id, h)
            blob = seal(key, shamir.to_bytes(pair[0]) + shamir.to_bytes(pair[1]), _share_aad(msg.job, msg.round, self.site_id, h))
            out[h] = _b64(blob)
        st.keys = keys
        st.stage = "shared"
        meta = {"shares": out, "commit": commitment("secagg-self-mask", msg.job, msg.round, self.site_id, st.b_seed)}
        return Message(MessageKind.SECAGG_SHARE_REPLY, msg.round, msg.job, meta)

    def protect(self, request: Message, weighted: np.ndarray, weight: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        t0 = time.perf_counter()
        try:
            return self._protect(request, weighted, weight)
        finally:
            self.seconds += time.perf_counter() - t0

    def _protect(self, request: Message, weighted: np.ndarray, weight: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        st = self._state(request, "shared")
        sec = request.require("secagg", dict)
        u2 = sec.get("u2")
        inbox = sec.get("inbox")
        if not isinstance(u2, list) or not isinstance(inbox, dict):
            raise ProtocolError(f"site {self.site_id}: TRAIN lacks the secagg survivor list or share inbox")
        u2s = frozenset(u2)
        if not u2s <= st.keys.keys() or self.site_id not in u2s:
            raise ProtocolError(f"site {self.site_id}: survivor list names sites that never advertised keys, or omits this site")
        if len(u2s) < self.config.min_group:
            raise ConfigError(f"site {self.site_id} refuses: only {len(u2s)} sites shared keys, its minimum group is {self.config.min_group}")
        peers = st.nbrs & u2s
        if set(inbox) != set(peers):
            raise ProtocolError(f"site {self.site_id}: share inbox is from {sorted(inbox)}, expected its neighbours {sorted(peers)}")
        for v in sorted(peers):
            blob = _unb64(inbox[v], SEALED_SHARE_BYTES, f"share from {v}")
            key = _share_key(agree(st.c_sk, st.keys[v][0]), request.job, request.round, self.site_id, v)
            plain = open_sealed(key, blob, _share_aad(request.job, request.round, v, self.site_id), f"share from {v} to {self.site_id}")
            st.held[v] = (shamir.from_bytes(plain[: shamir.SHARE_BYTES]), shamir.from_bytes(plain[shamir.SHARE_BYTES :]))
        fp = st.setup.fp
        vec = np.concatenate([np.asarray(weighted, dtype=np.float64).ravel(), [float(weight)]])
        enc = fp.encode(vec, what=f"update of site {self.site_id}")
        exp = MaskExpander(enc.shape[0], enc.dtype)
        exp.add(enc, st.b_seed, +1)
        s_key = private_key(st.s_sk)
        for v in sorted(peers):
            seed = _mask_seed(agree(s_key, st.keys[v][1]), request.job, request.round, self.site_id, v)
            exp.add(enc, seed, +1 if self.site_id < v else -1)
        st.u2 = u2s
        st.size = enc.shape[0]
        st.stage = "sent"
        return {"secagg": 1}, {"masked": fp.reduce(enc)}

    def _unmask(self, msg: Message) -> Message:
        st = self._state(msg, "sent")
        surv = msg.require("survivors", list)
        gone = msg.require("dropped", list)
        s3, d = frozenset(surv), frozenset(gone)
        if s3 & d or (s3 | d) != st.u2 or self.site_id not in s3:
            raise ProtocolError(f"site {self.site_id}: survivors and dropped sites do not partition the {len(st.u2)} sites that sent shares")
        t = st.setup.threshold
        if len(s3) < max(self.config.min_group, t):
            raise ConfigError(f"site {self.site_id} refuses to unmask a sum of {len(s3)} sites; needs ≥ {max(self.config.min_group, t)}")
        b = [v for v in sorted(s3) if v in st.held]
        s = [v for v in sorted(d) if v in st.held]
        tensors = {
            "b_shares": _share_rows([st.held[v][0] for v in b]),
            "s_shares": _share_rows([st.held[v][1] for v in s]),
        }
        lost = sorted(d & st.nbrs)
        if msg.meta.get("recovery") == Recovery.SURVIVORS.value:
            # own self-mask + masks with dropped neighbours, exactly what SERVER recovery would rebuild
            fp = st.setup.fp
            exp = MaskExpander(st.size, fp.dtype)
            corr = exp.expand(st.b_seed).copy()
            s_key = private_key(st.s_sk)
            for v in lost:
                seed = _mask_seed(agree(s_key, st.keys[v][1]), msg.job, msg.round, self.site_id, v)
                exp.add(corr, seed, +1 if self.site_id < v else -1)
            tensors["correction"] = fp.reduce(corr)
        st.stage = "unmasked"
        st.held.clear()
        return Message(MessageKind.SECAGG_UNMASK_REPLY, msg.round, msg.job, {"b": b, "s": s}, tensors)


# -- coordinator half ---------------------------------------------------------------------------------
def _abort(plan: RoundPlan, site: str, cause: str) -> RoundAborted:
    return RoundAborted(f"round {plan.round}: secure aggregation aborted by site {site}: {cause}; the global model is unchanged")


class SecAggProtocol:
    """Coordinator half of secure aggregation (see the module docstring for the phases)."""

    name = "secagg"

    def __init__(self, config: SecAggConfig | None = None):
        self.config = config or SecAggConfig()
        self.last_stats: SecAggStats | None = None

    def site_protection(self, site_id: str) -> SecAggSite:
        return SecAggSite(site_id, self.config)

    def collect(self, plan: RoundPlan, transport: Transport) -> AggregateResult:
        t_start = time.perf_counter()
        cfg = self.config
        group = tuple(sorted(plan.sites))
        n = len(group)
        if n < cfg.min_group:
            raise RoundAborted(f"round {plan.round}: secure aggregation needs at least {cfg.min_group} sites, {n} connected; the global model is unchanged")
        degree = cfg.degree_for(n)
        setup = _Setup(group, degree, cfg.threshold_for(min(degree, n - 1) + 1), os.urandom(16), cfg.fixed_point(n))
        graph = setup.graph()
        idx = setup.index()
        t = setup.threshold
        need = max(plan.min_sites, cfg.min_group)

        phase = PhaseRunner(plan, transport, lambda site, cause: _abort(plan, site, cause))
        dropped, up, down = phase.dropped, phase.up, phase.down

        def enough(alive: Mapping[str, Any], label: str) -> None:
            if len(alive) < need:
                why = "; ".join(f"{s}: {r}" for s, r in dropped.items()) or "none answered"
                raise RoundAborted(f"round {plan.round}: only {len(alive)} of {n} sites left after {label}, need {need} ({why}); the global model is unchanged")

        # 1. advertise keys
        adv = phase({s: Message(MessageKind.SECAGG_ADVERTISE, plan.round, plan.job, setup.to_meta()) for s in group}, MessageKind.SECAGG_ADVERTISE_REPLY, "advertise")
        keys: dict[str, tuple[bytes, bytes]] = {}
        signed: dict[str, list[str]] = {}  # site → [certificate PEM, signature], relayed for sites to check
        for sid, rep in adv.items():
            try:
                keys[sid] = (_unb64(rep.meta.get("c_pk"), KEY_BYTES, "c_pk"), _unb64(rep.meta.get("s_pk"), KEY_BYTES, "s_pk"))
            except ProtocolError as exc:
                raise _abort(plan, sid, f"bad public key: {exc}") from None
            try:
                signed[sid] = relayable(rep.meta)
            except ProtocolError as exc:
                raise _abort(plan, sid, str(exc)) from None
        enough(keys, "key advertisement")
        u1 = frozenset(keys)

        # 2. share keys
        key_meta = {"keys": {s: [_b64(c), _b64(p), *signed[s]] for s, (c, p) in sorted(keys.items())}}
        shr = phase({s: Message(MessageKind.SECAGG_SHARE, plan.round, plan.job, key_meta) for s in sorted(u1)}, MessageKind.SECAGG_SHARE_REPLY, "share")
        sealed: dict[str, dict[str, str]] = {}  # sender → recipient → blob
        commits: dict[str, str] = {}
        for sid, rep in shr.items():
            shares, com = rep.meta.get("shares"), rep.meta.get("commit")
            expected = (graph[sid] & u1) - {sid}
            if not isinstance(shares, dict) or set(shares) != expected:
                raise _abort(plan, sid, f"sent shares for {sorted(shares) if isinstance(shares, dict) else shares!r}, expected its neighbours {sorted(expected)}")
            if not isinstance(com, str) or len(com) != 64:
                raise _abort(plan, sid, "missing or malformed self-mask commitment")
            for r, blob in shares.items():
                try:
                    _unb64(blob, SEALED_SHARE_BYTES, f"share for {r}")
                except ProtocolError as exc:
                    raise _abort(plan, sid, str(exc)) from None
            sealed[sid], commits[sid] = shares, com
        u2 = frozenset(sealed)
        enough(u2, "secret sharing")
        for u in sorted(u2):
            alive = (graph[u] & u2) | {u}
            if len(alive) < t:
                raise RoundAborted(f"round {plan.round}: too few survivors: site {u} has {len(alive)} of its share group left, threshold {t}; the global model is unchanged")

        # 3. train and collect masked inputs
        reqs = {}
        for s in sorted(u2):
            inbox = {v: sealed[v][s] for v in sorted(graph[s] & u2)}
            reqs[s] = plan.train_request(s, {"secagg": {"u2": sorted(u2), "inbox": inbox}})
        trn = phase(reqs, MessageKind.TRAIN_REPLY, "train")
        fp = setup.fp
        size = plan.size + 1
        acc = np.zeros(size, dtype=fp.dtype)
        metrics: dict[str, Mapping[str, Any]] = {}
        top = fp.mask
        for sid in sorted(trn):
            rep = trn[sid]
            arr = rep.tensors.get("masked")
            if arr is None:
                raise _abort(plan, sid, "train reply carries no masked vector")
            if arr.dtype != fp.dtype or arr.shape != (size,):
                raise _abort(plan, sid, f"masked vector has shape {tuple(arr.shape)} and dtype {arr.dtype}, expected ({size},) {fp.dtype}")
            if fp.ring_bits not in (32, 64) and int(arr.max(initial=0)) > top:
                raise _abort(plan, sid, f"masked vector holds values outside Z_2^{fp.ring_bits}")
            np.add(acc, arr, out=acc)
            metrics[sid] = reply_metrics(rep)
        u3 = frozenset(trn)
        enough(u3, "training")
        gone = u2 - u3

        # 4. unmask
        umeta = {"survivors": sorted(u3), "dropped": sorted(gone), "recovery": cfg.recovery.value}
        unm = phase({s: Message(MessageKind.SECAGG_UNMASK, plan.round, plan.job, umeta) for s in sorted(u3)}, MessageKind.SECAGG_UNMASK_REPLY, "unmask")
        t_unmask = time.perf_counter()
        covered: set[tuple[str, str]] = set()  # (dropped, survivor) edges removed by a survivor's correction
        self_removed: set[str] = set()  # survivors whose correction removed their own self-mask
        b_pts: dict[str, dict[int, int]] = {u: {} for u in u3}
        s_pts: dict[str, dict[int, int]] = {v: {} for v in gone}
        for h, rep in unm.items():
            b, s = rep.meta.get("b"), rep.meta.get("s")
            want_b = sorted(u for u in u3 if u == h or u in graph[h])
            want_s = sorted(v for v in gone if v in graph[h])
            if b != want_b or s != want_s:
                raise _abort(plan, h, f"unmask reply holds shares for {b!r} / {s!r}, expected {want_b} / {want_s}")
            for name, owners, pts in (("b_shares", b, b_pts), ("s_shares", s, s_pts)):
                rows = rep.tensors.get(name)
                if rows is None or rows.dtype != np.uint8 or rows.shape != (len(owners), shamir.SHARE_BYTES):
                    raise _abort(plan, h, f"unmask reply tensor {name} is missing or not ({len(owners)}, {shamir.SHARE_BYTES}) uint8")
                try:
                    for owner, row in zip(owners, rows):
                        pts[owner][idx[h]] = shamir.from_bytes(row.tobytes())
                except ProtocolError as exc:
                    raise _abort(plan, h, str(exc)) from None
            if cfg.recovery is Recovery.SURVIVORS:
                corr = rep.tensors.get("correction")
                if corr is None or corr.dtype != fp.dtype or corr.shape != (size,):
                    raise _abort(plan, h, f"unmask reply lacks the ({size},) {fp.dtype} correction (self-mask and masks with dropped neighbours) that survivor recovery asks for")
                if fp.ring_bits not in (32, 64) and int(corr.max(initial=0)) > top:
                    raise _abort(plan, h, f"mask correction holds values outside Z_2^{fp.ring_bits}")
                np.subtract(acc, corr, out=acc)
                self_removed.add(h)
                covered.update((v, h) for v in want_s)
        names = {i: s for s, i in idx.items()}
        exp = MaskExpander(size, fp.dtype)
        regenerated = 0
        for u in sorted(u3 - self_removed):
            com = commits[u]

            def ok_b(x: int, u: str = u, com: str = com) -> bool:
                return x < 1 << (8 * SEED_BYTES) and commitment("secagg-self-mask", plan.job, plan.round, u, x.to_bytes(SEED_BYTES, "big")) == com

            try:
                seed = shamir.reconstruct(b_pts[u], t, check=ok_b, names=names, what=f"self-mask seed of site {u}").to_bytes(SEED_BYTES, "big")
            except ProtocolError as exc:
                raise RoundAborted(f"round {plan.round}: secure aggregation aborted: {exc}; the global model is unchanged") from None
            exp.add(acc, seed, -1)
            regenerated += 1
        for v in sorted(gone):
            edges = [w for w in sorted(graph[v] & u3) if (v, w) not in covered]
            if not edges:
                continue
            s_pk = keys[v][1]

            def ok_s(x: int, s_pk: bytes = s_pk) -> bool:
                return x < 1 << 256 and x25519_public(x.to_bytes(32, "big")) == s_pk

            try:
                sk = shamir.reconstruct(s_pts[v], t, check=ok_s, names=names, what=f"mask key of dropped site {v}").to_bytes(32, "big")
            except ProtocolError as exc:
                raise RoundAborted(f"round {plan.round}: secure aggregation aborted: {exc}; the global model is unchanged") from None
            sk_v = private_key(sk)
            for w in edges:
                seed = _mask_seed(agree(sk_v, keys[w][1]), plan.job, plan.round, v, w)
                exp.add(acc, seed, -1 if w < v else +1)  # y_w holds +mask when w < v
                regenerated += 1
        total = fp.decode(fp.reduce(acc))
        now = time.perf_counter()
        self.last_stats = SecAggStats(
            server_seconds=(now - t_start) - phase.seconds,
            unmask_seconds=now - t_unmask,
            masks_regenerated=regenerated,
            degree=degree,
            threshold=t,
            frac_bits=fp.frac_bits,
            survivors=len(u3),
            dropped=len(gone),
        )
        return AggregateResult(total[:-1], float(total[-1]), tuple(sorted(u3)), dropped, metrics, up, down)


__all__ = ["Recovery", "SecAggConfig", "SecAggProtocol", "SecAggSite", "SecAggStats"]

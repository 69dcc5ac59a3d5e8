"""Secure aggregation that survives drop-outs: Bonawitz et al. 2017 on the sparse graph of SecAgg+.

The coordinator learns Σ wᵢ·uᵢ and Σ wᵢ over the sites that finished, never one
site's vector.  One round runs six exchanges, all through ``Transport.exchange``:

1. SECAGG_ADVERTISE (group, degree, threshold, fixed point) → each site makes two
   fresh X25519 pairs, ``c`` (to encrypt shares to peers) and ``s`` (to agree
   pairwise mask seeds), draws a 32-byte graph-seed share rᵤ and commits to it
   with H(rᵤ).                                                                    U1 = answered
2. SECAGG_REVEAL (a digest of U1's commitments) → each site reveals rᵤ.  It does
   so only after the coordinator has fixed every commitment, so no one (the
   coordinator and its colluders included) can choose the graph: its seed is
   H(reveals in name order).  A committed site that does not reveal, or reveals a value
   that does not match its commitment, aborts the round, named.
3. SECAGG_SHARE (its neighbours' public keys, all reveals) → each site checks the
   reveals against the digest it was shown, derives the graph, draws a self-mask
   seed bᵤ and Shamir-shares bᵤ and its private ``s`` key among itself and its
   graph neighbours, each share AES-GCM-sealed under the pairwise ``c`` key: the
   coordinator relays the shares but cannot read them.  It also commits to bᵤ.  U2
4. TRAIN (carrying each site's inbox of shares) → the site trains and returns
       yᵤ = encode(wᵤ·uᵤ ‖ wᵤ) + PRG(bᵤ) + Σ_{v∈N(u)∩U2} ±PRG(s_uv)   in Z_2^k   U3
   (the sign is + when u < v: pairwise masks cancel in the sum).
5. SECAGG_CHECK (who survived, who dropped, as bitmaps) → each survivor signs that
   survivor set (consistency check, Bonawitz et al. §4) and, when someone dropped,
   also MACs it to each surviving neighbour under a key from their pairwise ``c``
   agreement (directed: sender and recipient are in the MAC).                  U4
6. SECAGG_UNMASK (the confirmations it needs) → before revealing anything that is
   only safe if a neighbour v dropped out (a share of v's ``s`` key, or its mask
   with v), a site checks that at least t members of v's share group signed the
   very set it signed: its own neighbours by their MACs (an HMAC, not an ECDSA
   verification), the others by their signatures; a confirmation of another set
   makes it refuse, naming the signer.  The coordinator verifies every signature
   itself and names a forger; it cannot forge a MAC (the ``c`` keys are never
   revealed, and in deployments they are certificate-signed).  Then it returns,
   per neighbour, the share of bᵥ if v survived or of v's ``s`` key if v dropped —
   never both — and, in survivors' recovery, one correction vector.  The
   coordinator rebuilds what it must from ≥ t shares (checking every share
   against the commitment or the advertised public key, naming forgers),
   subtracts the self-masks and the masks that dropped sites shared with
   survivors, and decodes the fixed-point sum.

Every site receives only its neighbours' keys, shares and confirmations, so its work
grows with the graph degree k = O(log n), not with n; the group (one string), the
graph-seed reveals (checked against their commitments: one SHA-256 each), the
circular order of the graph (neighbourhoods are then computed only for the sites
asked about) and the bitmaps of committed, surviving and dropped sites are the
only O(n) items.
The degree and its failure bounds: :mod:`insitu.secure.graph`.

Silence is a drop-out; a lie aborts.  A site that times out or refuses is dropped
and recovered from; a reply that is replayed, misdirected, of the wrong length,
out of the ring, or carries forged shares aborts the round with
:class:`RoundAborted` naming the site, and the global model stays unchanged.

Trust model: a coordinator colluding with fewer than t sites of any share group.
Against an *active* coordinator: it cannot choose the graph (commit-and-reveal) nor
learn a site's input by showing different survivor sets to different sites (two
holders of one site's shares that were shown different sets would need 2t > k + 1
signers of that share group between them, so one honest signer would have signed
both; this tolerates no colluder inside the share group beyond that margin).
Public keys are authenticated only in deployments (``attestation``): there every
advertisement is signed with the site's certificate key, and so are the
consistency signatures; in simulation the same signatures are made with a key the
site draws itself and advertises, through the same code.
"""
from __future__ import annotations

import base64
import enum
import functools
import hashlib
import hmac
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from insitu.errors import ConfigError, ProtocolError, RoundAborted, SecurityError
from insitu.federation.instructions import RoundInstructions
from insitu.federation.messages import Message, MessageKind
from insitu.federation.protocol import AggregateResult, PhaseRunner, RoundPlan, TimedHandlers
from insitu.federation.transport import Transport, reply_metrics
from insitu.secure import shamir
from insitu.secure.attest import relayable
from insitu.secure._primitives import MaskExpander, agree, commitment, context, hkdf, open_sealed, private_key, seal, x25519_keypair, x25519_public
from insitu.secure.fixedpoint import FixedPoint
from insitu.secure.graph import neighbour_map, private_degree, required_degree

KEY_BYTES = 32
SEED_BYTES = 16
REVEAL_BYTES = 32
POINT_BYTES = 33  # compressed P-256 point: a site's consistency-signing key
MAX_SIGNATURE_BYTES = 80  # DER ECDSA P-256 signatures are 70-72 bytes
#: the bound assumed when none is declared: raw sample-count weights times unclipped updates.
UNBOUNDED = 2.0**20
#: the automatic ring choice takes 32 bits only when the sum keeps at least this many fraction bits.
AUTO_MIN_FRAC_BITS = 16
#: how many standard deviations of a site's own noise share a declared bound leaves room for.
NOISE_TAILS = 12.0


class Recovery(str, enum.Enum):
    """Who removes the self-masks, and the masks that dropped sites shared with survivors.

    SURVIVORS (the default): in the unmask phase each survivor also returns one correction
    vector, its own self-mask plus its masks with dropped neighbours, and the coordinator only
    subtracts them, expanding no mask at all; it falls back to SERVER for a survivor that stays
    silent (its self-mask seed and its dropped neighbours' keys are rebuilt from the shares every
    survivor sends anyway).  It learns nothing it would not learn from the seeds and keys in
    SERVER mode (a survivor's self-mask seed is revealed to it there too, and a dropped site's key
    gives every mask of that site).  It trades one extra upload of the vector per survivor for a
    coordinator whose work is a sum.  SERVER (Bonawitz et al.): the coordinator rebuilds every
    survivor's self-mask seed and each dropped site's key from shares, and expands one mask per
    survivor plus one per edge between a dropped site and a survivor; no extra upload.
    """

    SERVER = "server"
    SURVIVORS = "survivors"


def value_bound(clip: float, *, weight: float = 1.0, noise_std: float = 0.0) -> float:
    """The bound to declare in :class:`SecAggConfig` for updates clipped to L2 norm ``clip``.

    A clipped vector has no coordinate above ``clip``; a site that adds its own Gaussian noise
    share of standard deviation ``noise_std`` (distributed DP) gets ``NOISE_TAILS`` of them of
    room (a coordinate beyond is refused at encoding, never wrapped: odds below 1e-30 each);
    ``weight`` multiplies both, and is itself a coordinate of the protected vector.
    """
    for name, v in (("clip", clip), ("weight", weight)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"secure-aggregation value bound needs a positive finite {name}, got {v!r}")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ConfigError(f"noise standard deviation {noise_std!r} must be ≥ 0")
    return max(weight * (clip + NOISE_TAILS * noise_std), weight)


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation parameters.  The defaults are the safe recipe; every field is validated.

    ``bound`` is the largest |wᵢ·uᵢ| coordinate (and weight) a site may send; with the number of
    sites it fixes the fixed-point resolution.  Leave it unset when nothing bounds the updates
    (2^20 is then assumed); declare it from the clip norm with :func:`value_bound` when updates
    are clipped.  ``ring_bits`` None picks the fast 32-bit ring whenever a declared bound leaves
    the sum at least ``AUTO_MIN_FRAC_BITS`` fraction bits, the 64-bit ring otherwise; asking for a
    32-bit ring where it cannot hold the sum is refused with the reason.  ``bad_fraction`` is the
    share of sites (corrupted plus dropped out) the graph must withstand at ``security_bits``, and
    ``colluding`` the part of it that colludes with the coordinator: the default degree keeps both
    privacy events of :mod:`insitu.secure.graph` (the survivors splitting, and a share group
    holding a threshold of colluders) below 2^-security_bits.
    ``threshold`` is the fraction of a share group needed to rebuild a secret (default: the
    smallest strict majority).  ``min_group`` is the fewest sites this party agrees to be
    aggregated with.  ``recovery``: see :class:`Recovery` (survivors' by default).
    """

    ring_bits: int | None = None
    bound: float | None = None
    frac_bits: int | None = None
    security_bits: int = 40
    bad_fraction: float = 0.2
    colluding: float = 0.1
    degree: int | None = None
    threshold: float | None = None
    min_group: int = 3
    recovery: Recovery = Recovery.SURVIVORS

    def __post_init__(self) -> None:
        object.__setattr__(self, "recovery", Recovery(self.recovery))
        FixedPoint(self.ring_bits or 64, self.frac_bits or 0, self.bound if self.bound is not None else UNBOUNDED)  # validates ring size and bound
        if self.ring_bits is not None and self.ring_bits <= 32 and self.bound is None:
            raise ConfigError(
                f"a {self.ring_bits}-bit secure-aggregation ring needs a declared bound on every update coordinate "
                f"(e.g. value_bound(clip) for clipped updates); without one, coordinates up to {UNBOUNDED:g} are allowed "
                "and their sum would not fit: leave ring_bits unset (64-bit for unbounded updates) or declare the bound"
            )
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
        if not 0.0 <= self.colluding <= self.bad_fraction:
            raise ConfigError(f"colluding fraction {self.colluding} must be in [0, bad_fraction {self.bad_fraction}]")

    def needed_degree(self, n: int) -> int:
        """The least graph degree for ``n`` sites at this security level (both privacy events)."""
        return private_degree(n, self.security_bits, self.bad_fraction, self.colluding, self.threshold)

    def degree_for(self, n: int) -> int:
        """The graph degree for ``n`` sites; a degree below what the security level needs is refused."""
        need = self.needed_degree(n)
        if self.degree is None:
            return need
        deg = min(self.degree + self.degree % 2, n - 1)
        if deg < need:
            raise ConfigError(
                f"graph degree {self.degree} is too sparse for {n} sites at {self.security_bits}-bit security with "
                f"{self.bad_fraction:.0%} bad sites ({self.colluding:.0%} colluding): need at least {need}"
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
        """The encoding for ``n`` sites: the ring asked for, or the fastest one the bound allows."""
        bound = self.bound if self.bound is not None else UNBOUNDED
        if self.ring_bits is not None:
            return FixedPoint.fit(self.ring_bits, bound, n, self.frac_bits)
        if self.bound is not None:
            try:
                fast = FixedPoint.fit(32, bound, n, self.frac_bits)
            except ConfigError:
                fast = None
            if fast is not None and fast.frac_bits >= AUTO_MIN_FRAC_BITS:
                return fast
        return FixedPoint.fit(64, bound, n, self.frac_bits)


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
    ring_bits: int = 64
    recovery: str = Recovery.SURVIVORS.value


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


def _b64_len(size: int) -> int:
    return 4 * ((size + 2) // 3)


@functools.lru_cache(maxsize=256)
def _prefix(label: bytes, job: str, round_: int) -> bytes:
    """``context(label, job, round_)``, computed once per round: the per-pair labels below only append two names."""
    return context(label, job, round_)


def _pair_context(label: bytes, job: str, round_: int, a: str, b: str) -> bytes:
    """``context(label, job, round_, a, b)`` (the same bytes), for the k pairs of a site's share group."""
    ea, eb = a.encode(), b.encode()
    return b"".join((_prefix(label, job, round_), len(ea).to_bytes(4, "big"), ea, len(eb).to_bytes(4, "big"), eb))


def _mask_seed(secret: bytes, job: str, round_: int, a: str, b: str) -> bytes:
    lo, hi = (a, b) if a < b else (b, a)
    return hkdf(secret, _pair_context(b"insitu-secagg-mask", job, round_, lo, hi), SEED_BYTES)


def _pair_keys(secret: bytes, job: str, round_: int, a: str, b: str) -> tuple[bytes, bytes]:
    """From one c-agreement: the AES-GCM key of the shares between ``a`` and ``b`` and the HMAC key
    they confirm survivor sets with (one HKDF call, 64 bytes: two independent 32-byte blocks)."""
    lo, hi = (a, b) if a < b else (b, a)
    okm = hkdf(secret, _pair_context(b"insitu-secagg-share", job, round_, lo, hi), 64)
    return okm[:32], okm[32:]


def _share_aad(job: str, round_: int, sender: str, recipient: str) -> bytes:
    return _pair_context(b"insitu-secagg-share-aad", job, round_, sender, recipient)


CONFIRM_BYTES = 32


_CONFIRM_LABEL = context(b"insitu-secagg-confirm-mac")


def _confirm_mac(key: bytes, sender: str, recipient: str, statement: bytes) -> bytes:
    """``sender`` tells ``recipient`` it signed ``statement`` (directed: a MAC cannot be reflected back)."""
    a, b = sender.encode(), recipient.encode()
    msg = b"".join((_CONFIRM_LABEL, len(a).to_bytes(4, "big"), a, len(b).to_bytes(4, "big"), b, statement))
    return hmac.digest(key, msg, "sha256")


SEALED_SHARE_BYTES = 12 + 2 * shamir.SHARE_BYTES + 16


def _share_rows(values: list[int]) -> np.ndarray:
    return np.frombuffer(b"".join(shamir.to_bytes(v) for v in values), dtype=np.uint8).reshape(len(values), shamir.SHARE_BYTES)


_REVEAL_LABEL = b"insitu-secagg-seed-share"


def _reveal_commitment(reveal: bytes) -> bytes:
    return hashlib.sha256(_REVEAL_LABEL + reveal).digest()


def _reveal_commitments(reveals: bytes) -> bytes:
    """The commitments of the concatenated 32-byte ``reveals``, concatenated (one SHA-256 each: a site
    checks every reveal of the group, the one O(n) computation of its round)."""
    sha, label, w = hashlib.sha256, _REVEAL_LABEL, REVEAL_BYTES
    return b"".join([sha(label + reveals[i : i + w]).digest() for i in range(0, len(reveals), w)])


def _commitments_digest(job: str, round_: int, setup_digest: bytes, u1_bits: bytes, commits: bytes) -> bytes:
    """What the coordinator fixes before any site reveals: the round's setup (its group), which of the
    group committed (a bitmap over the sorted group) and their 32-byte commitments in that order."""
    return hashlib.sha256(context(b"insitu-secagg-seed-commitments-v2", job, round_, setup_digest, u1_bits, commits)).digest()


def _graph_seed(reveals: np.ndarray | bytes) -> bytes:
    """seed = H(reveals in name order): no party chose it, since all reveals follow all commitments."""
    raw = reveals if isinstance(reveals, bytes) else np.ascontiguousarray(reveals, dtype=np.uint8).tobytes()
    return hashlib.sha256(b"insitu-secagg-graph-seed-v2" + raw).digest()


def _statement(job: str, round_: int, seed: bytes, setup_digest: bytes, survivors: bytes, dropped: bytes) -> bytes:
    """What each survivor signs in the consistency check: the set it was shown (survivors and dropped
    sites as bitmaps over the setup's sorted group), in this round's setup and graph."""
    return context(b"insitu-secagg-consistency-v2", job, round_, seed, setup_digest, survivors, dropped)


_ECDSA = ec.ECDSA(hashes.SHA256())


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def _load_point(raw: bytes, what: str) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        raise ProtocolError(f"{what} is not a P-256 point") from None


def _verifies(key: ec.EllipticCurvePublicKey, sig: bytes, message: bytes) -> bool:
    try:
        key.verify(sig, message, _ECDSA)
        return True
    except InvalidSignature:
        return False


def _name_list(value: Any, what: str) -> list[str]:
    try:
        ok = isinstance(value, list) and isinstance("".join(value), str) and len(set(value)) == len(value)
    except TypeError:  # a non-string element
        ok = False
    if not ok:
        raise ProtocolError(f"{what} must be a list of distinct site names")
    return value


@dataclass(frozen=True)
class _Setup:
    """The round parameters announced in SECAGG_ADVERTISE, checked by both sides."""

    group: tuple[str, ...]
    degree: int
    threshold: int
    fp: FixedPoint

    def to_meta(self) -> dict[str, Any]:
        return {
            "group": "\n".join(self.group),  # one JSON string, not n: a site parses it once (names hold no newline)
            "degree": self.degree,
            "threshold": self.threshold,
            "ring_bits": self.fp.ring_bits,
            "frac_bits": self.fp.frac_bits,
            "bound": self.fp.bound,
        }

    @classmethod
    def from_meta(cls, msg: Message) -> "_Setup":
        group = _name_list(msg.require("group", str).split("\n"), "secagg group")
        fp = FixedPoint(msg.require("ring_bits", int), msg.require("frac_bits", int), float(msg.require("bound", (int, float))))
        return cls(tuple(sorted(group)), msg.require("degree", int), msg.require("threshold", int), fp)

    @functools.cached_property
    def members(self) -> frozenset[str]:
        return frozenset(self.group)

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {s: i + 1 for i, s in enumerate(self.group)}

    @functools.cached_property
    def digest(self) -> bytes:
        """SHA-256 of the setup as announced (what a signed key advertisement binds to)."""
        return hashlib.sha256(json.dumps(self.to_meta(), sort_keys=True).encode()).digest()

    def graph(self, seed: bytes) -> Mapping[str, frozenset[str]]:
        return neighbour_map(self.group, self.degree, seed)

    def bits(self, names: Iterable[str]) -> np.ndarray:
        """A subset of the group as a bitmap over its sorted order (n/8 bytes instead of n names)."""
        idx = self.index
        mask = np.zeros(len(self.group), dtype=bool)
        mask[[idx[s] - 1 for s in names]] = True
        return np.packbits(mask)

    def mask(self, msg: Message, name: str) -> tuple[np.ndarray, bytes]:
        """A bitmap sent by :meth:`bits` as (boolean mask over the sorted group, its bytes); a malformed one is refused."""
        n = len(self.group)
        bits = msg.tensor(name, shape=((n + 7) // 8,), dtype="uint8")
        mask = np.unpackbits(bits)
        if mask[n:].any():
            raise ProtocolError(f"{msg.kind.value} bitmap {name!r} marks sites beyond the group of {n}")
        return mask[:n].astype(bool), bits.tobytes()

    def subset(self, msg: Message, name: str) -> list[str]:
        """The names of a bitmap sent by :meth:`bits`, in sorted order; a malformed bitmap is refused."""
        return [self.group[i] for i in np.flatnonzero(self.mask(msg, name)[0])]

    def among(self, mask: np.ndarray, names: Iterable[str]) -> frozenset[str]:
        """Those of ``names`` (members of the group) that ``mask`` marks: O(len(names)), not O(n)."""
        idx = self.index
        return frozenset(s for s in names if mask[idx[s] - 1])


# -- site half --------------------------------------------------------------------------------------
@dataclass
class _SiteRound:
    setup: _Setup
    c_sk: Any  # X25519PrivateKey
    c_pk: bytes
    s_sk: bytes
    s_pk: bytes
    reveal: bytes
    commitments: bytes = b""  # digest of every commitment, fixed by the coordinator before the reveal
    u1: np.ndarray | None = None  # which of the group advertised keys (mask over the sorted group)
    u1_commits: bytes = b""  # their graph-seed commitments, concatenated in name order
    seed: bytes = b""
    graph: Mapping[str, frozenset[str]] = field(default_factory=dict)
    nbrs: frozenset[str] = frozenset()
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # neighbours and self → (c_pk, s_pk)
    share_keys: dict[str, bytes] = field(default_factory=dict)  # neighbour → AES key of the shares between us
    confirm_keys: dict[str, bytes] = field(default_factory=dict)  # neighbour → HMAC key of consistency confirmations
    mask_seeds: dict[str, bytes] = field(default_factory=dict)  # neighbour → pairwise mask seed
    b_seed: bytes = b""
    held: dict[str, tuple[int, int]] = field(default_factory=dict)  # owner → (b share, s share) I hold
    u2: frozenset[str] = frozenset()  # this site and its neighbours that shared keys
    u2_size: int = 0
    view: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())  # survivors, dropped as signed
    statement: bytes = b""
    size: int = 0
    stage: str = "advertised"
    min_shares: int = 0  # distributed DP: the noise shares this site's share was sized for (the round's dp_min_shares)


class SecAggSite(TimedHandlers):
    """The site half: answers ADVERTISE / REVEAL / SHARE / CHECK / UNMASK and masks the TRAIN_REPLY.

    Holds every secret of the site (private keys, self-mask seed, shares of peers) and
    checks each request against what it already agreed to, so that a coordinator asking
    for both shares of one peer, replaying an old phase, steering the graph or showing
    different survivor sets to different sites is refused.
    """

    #: the TRAIN meta key this protocol adds to the plan and round instructions
    request_keys = ("secagg",)

    @staticmethod
    def egress() -> dict:
        """What this site half sends, field by field (see insitu.federation.egress)."""
        from insitu.federation.egress import Declared, Release

        pub, prot = Release.PUBLIC, Release.PROTECTED
        return {
            # fresh keys, the commitment to a graph-seed share, the key consistency statements are signed with
            MessageKind.SECAGG_ADVERTISE_REPLY: Declared({"c_pk": pub, "s_pk": pub, "commit": pub, "v_pk": pub, "cert": pub, "sig": pub}),
            MessageKind.SECAGG_REVEAL_REPLY: Declared({"reveal": pub}),  # the graph-seed share, random and fresh
            MessageKind.SECAGG_SHARE_REPLY: Declared({"shares": prot, "commit": pub}),  # shares sealed to each neighbour
            MessageKind.TRAIN_REPLY: Declared({"secagg": pub, "metrics": pub}, {"masked": prot}),
            # a signature on the survivor set it was shown, and the same as a MAC to each surviving neighbour
            MessageKind.SECAGG_CHECK_REPLY: Declared({"sig": pub, "macs": pub}),
            # the protocol's unmasking: a survivor's self-mask share or a dropped site's key share, never both
            MessageKind.SECAGG_UNMASK_REPLY: Declared({"b": pub, "s": pub}, {"b_shares": pub, "s_shares": pub, "correction": pub}),
        }

    def __init__(self, site_id: str, config: SecAggConfig | None = None, attestation: Any = None):
        """``attestation`` (an :class:`insitu.secure.attest.Attestation`, deployments): sign this
        site's keys and its consistency statements with its certificate key, and accept only
        peers' keys and statements signed with theirs.  Without it (simulation) the statements
        are signed with a P-256 key this site draws and advertises."""
        self.site_id = site_id
        self.config = config or SecAggConfig()
        self.attestation = attestation
        self._signing = attestation.signer.key if attestation is not None else ec.generate_private_key(ec.SECP256R1())
        self._signing_point = _point(self._signing.public_key())
        self._rounds: dict[str, tuple[int, _SiteRound]] = {}  # job → (round, state)
        self.seconds = 0.0  # time spent in this protocol (for benchmarks)
        #: the smallest fixed-point bound a round may announce (set by insitu.builder from the plan): a bound the
        #: coordinator picks to make the encoding fail would tell it whether this site's update fits (tests/attacks)
        self.min_bound: float | None = None

    def handlers(self) -> Mapping[MessageKind, Callable[[Message], Message]]:
        return {
            MessageKind.SECAGG_ADVERTISE: self._timed(self._advertise),
            MessageKind.SECAGG_REVEAL: self._timed(self._reveal),
            MessageKind.SECAGG_SHARE: self._timed(self._share),
            MessageKind.SECAGG_CHECK: self._timed(self._check),
            MessageKind.SECAGG_UNMASK: self._timed(self._unmask),
        }

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
        if cur is not None and (msg.round < cur[0] or (msg.round == cur[0] and cur[1].stage in ("sent", "signed", "unmasked"))):
            raise ProtocolError(f"site {self.site_id}: secagg round {msg.round} replayed (this site is at round {cur[0]}, stage {cur[1].stage})")
        if self.site_id not in setup.members:
            raise ProtocolError(f"site {self.site_id} is not in the announced group")
        if n < cfg.min_group:
            raise ConfigError(f"site {self.site_id} refuses secure aggregation in a group of {n}; its minimum is {cfg.min_group}")
        need = cfg.needed_degree(n)
        if setup.degree < need:
            raise ConfigError(f"site {self.site_id} refuses graph degree {setup.degree} for {n} sites: its security level needs ≥ {need}")
        group_size = min(setup.degree, n - 1) + 1
        if setup.threshold > group_size or setup.threshold < cfg.threshold_for(group_size):
            raise ConfigError(f"site {self.site_id} refuses threshold {setup.threshold} of {group_size}: it requires ≥ {cfg.threshold_for(group_size)}")
        setup.fp.check_headroom(n)
        c_sk, c_pk = x25519_keypair()
        s_sk, s_pk = x25519_keypair()
        reveal = os.urandom(REVEAL_BYTES)
        commit = _reveal_commitment(reveal)
        self._rounds[msg.job] = (msg.round, _SiteRound(setup, private_key(c_sk), c_pk, s_sk, s_pk, reveal))
        meta: dict[str, Any] = {"c_pk": _b64(c_pk), "s_pk": _b64(s_pk), "commit": _b64(commit), "v_pk": _b64(self._signing_point)}
        if self.attestation is not None:
            from insitu.secure.attest import transcript

            meta.update(self.attestation.sign_fields(transcript(msg.job, msg.round, self.site_id, setup.digest, c_pk, s_pk, commit)))
        return Message(MessageKind.SECAGG_ADVERTISE_REPLY, msg.round, msg.job, meta)

    def _reveal(self, msg: Message) -> Message:
        st = self._state(msg, "advertised")
        st.commitments = _unb64(msg.require("commitments", str), 32, "commitments digest")
        st.stage = "revealed"
        return Message(MessageKind.SECAGG_REVEAL_REPLY, msg.round, msg.job, {"reveal": _b64(st.reveal)})

    def _seed_from(self, msg: Message, st: _SiteRound) -> bytes:
        """The graph seed, after checking the reveals against the commitments fixed before this site revealed."""
        u1, u1_bits = st.setup.mask(msg, "u1")
        me = st.setup.index[self.site_id] - 1
        if not u1[me]:
            raise ProtocolError(f"site {self.site_id}: the sites that advertised keys must include this site")
        reveals = msg.tensor("reveals", shape=(int(np.count_nonzero(u1)), REVEAL_BYTES), dtype="uint8").tobytes()
        at = REVEAL_BYTES * int(np.count_nonzero(u1[:me]))
        if reveals[at : at + REVEAL_BYTES] != st.reveal:
            raise ProtocolError(f"site {self.site_id}: the coordinator relayed another graph-seed share for this site")
        commits = _reveal_commitments(reveals)
        if _commitments_digest(msg.job, msg.round, st.setup.digest, u1_bits, commits) != st.commitments:
            raise ProtocolError(f"site {self.site_id}: the graph-seed reveals relayed do not match the commitments this site was shown "
                                "(a reveal or the set of sites was changed after the commitments were fixed)")
        st.u1, st.u1_commits = u1, commits
        return _graph_seed(reveals)

    def _u1_commitment(self, st: _SiteRound, sid: str) -> bytes:
        at = 32 * int(np.count_nonzero(st.u1[: st.setup.index[sid] - 1]))
        return st.u1_commits[at : at + 32]

    def _share(self, msg: Message) -> Message:
        st = self._state(msg, "revealed")
        st.seed = self._seed_from(msg, st)
        st.graph = st.setup.graph(st.seed)
        st.nbrs = st.graph[self.site_id]
        u1 = st.setup.among(st.u1, st.nbrs)  # neighbours that advertised keys
        raw = msg.require("keys", dict)
        expected = u1 | {self.site_id}
        if set(raw) != expected:
            raise ProtocolError(f"site {self.site_id}: keys relayed for {sorted(raw)[:8]}…, expected this site and its neighbours {sorted(expected)[:8]}…")
        keys: dict[str, tuple[bytes, bytes]] = {}
        if self.attestation is not None:
            from insitu.secure.attest import transcript
        for sid, pair in raw.items():
            if not isinstance(pair, list) or len(pair) not in (2, 4):
                raise ProtocolError(f"site {self.site_id}: bad key entry for {sid!r}")
            keys[sid] = (_unb64(pair[0], KEY_BYTES, f"c key of {sid}"), _unb64(pair[1], KEY_BYTES, f"s key of {sid}"))
            if self.attestation is not None and sid != self.site_id:
                message = transcript(msg.job, msg.round, sid, st.setup.digest, *keys[sid], self._u1_commitment(st, sid))
                self.attestation.check_relayed(pair[2:], sid, message)
        if keys.get(self.site_id) != (st.c_pk, st.s_pk):
            raise ProtocolError(f"site {self.site_id}: the coordinator relayed wrong public keys for this site")
        advertised = int(np.count_nonzero(st.u1))
        if advertised < self.config.min_group:
            raise ConfigError(f"site {self.site_id} refuses: only {advertised} sites advertised keys, its minimum group is {self.config.min_group}")
        holders = sorted(expected)
        t = st.setup.threshold
        if len(holders) < t:
            raise RoundAborted(f"site {self.site_id}: only {len(holders)} of its share group are left, threshold is {t}")
        idx = st.setup.index
        st.b_seed = os.urandom(SEED_BYTES)
        b_sh = shamir.split(int.from_bytes(st.b_seed, "big"), t, [idx[h] for h in holders])
        s_sh = shamir.split(int.from_bytes(st.s_sk, "big"), t, [idx[h] for h in holders])
        out: dict[str, str] = {}
        for h in holders:
            pair = (b_sh[idx[h]], s_sh[idx[h]])
            if h == self.site_id:
                st.held[h] = pair
                continue
            # the share key and the key survivor sets are confirmed with (never revealed, unlike s)
            key, st.confirm_keys[h] = _pair_keys(agree(st.c_sk, keys[h][0]), msg.job, msg.round, self.site_id, h)
            st.share_keys[h] = key
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
        u2, inbox, total = sec.get("u2"), sec.get("inbox"), sec.get("u2_size")
        if not isinstance(u2, list) or not isinstance(inbox, dict) or not isinstance(total, int) or isinstance(total, bool):
            raise ProtocolError(f"site {self.site_id}: TRAIN lacks the secagg survivor list, their number or the share inbox")
        u2s = frozenset(u2)
        if not u2s <= st.keys.keys() or self.site_id not in u2s or total < len(u2s):
            raise ProtocolError(f"site {self.site_id}: survivor list names sites that never advertised keys to it, or omits this site")
        if total < self.config.min_group:
            raise ConfigError(f"site {self.site_id} refuses: only {total} sites shared keys, its minimum group is {self.config.min_group}")
        peers = st.nbrs & u2s
        if set(inbox) != set(peers):
            raise ProtocolError(f"site {self.site_id}: share inbox is from {sorted(inbox)}, expected its neighbours {sorted(peers)}")
        for v in sorted(peers):
            blob = _unb64(inbox[v], SEALED_SHARE_BYTES, f"share from {v}")
            plain = open_sealed(st.share_keys[v], blob, _share_aad(request.job, request.round, v, self.site_id), f"share from {v} to {self.site_id}")
            st.held[v] = (shamir.from_bytes(plain[: shamir.SHARE_BYTES]), shamir.from_bytes(plain[shamir.SHARE_BYTES :]))
        fp = st.setup.fp
        if self.min_bound is not None and fp.bound < self.min_bound:
            raise ProtocolError(f"site {self.site_id}: round {request.round} announces a fixed-point bound of {fp.bound:g}, below the "
                                f"{self.min_bound:g} its plan implies; refused before encoding")
        enc = fp.encode(weighted, what=f"update of site {self.site_id}", tail=(float(weight),))
        exp = MaskExpander.reused(enc.shape[0], enc.dtype)
        exp.add(enc, st.b_seed, +1)
        s_key = private_key(st.s_sk)
        for v in sorted(peers):
            seed = st.mask_seeds[v] = _mask_seed(agree(s_key, st.keys[v][1]), request.job, request.round, self.site_id, v)
            exp.add(enc, seed, +1 if self.site_id < v else -1)
        st.u2, st.u2_size = u2s, total
        # distributed DP: the sum must hold as many noise shares as this site's share was sized for; the site
        # checks it at unmasking, not only the coordinator (a hostile one would unmask a short sum: tests/attacks)
        st.min_shares = RoundInstructions.from_meta(request.require("instructions", dict)).dp_min_shares or 0
        st.u1, st.u1_commits = None, b""
        st.size = enc.shape[0]
        st.stage = "sent"
        return {"secagg": 1}, {"masked": fp.reduce(enc)}

    def _partition(self, st: _SiteRound, s3: frozenset[str], d: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
        mine = st.nbrs | {self.site_id}
        if s3 & d or (s3 | d) & mine != st.u2 or self.site_id not in s3:
            raise ProtocolError(f"site {self.site_id}: survivors and dropped sites do not partition the {len(st.u2)} sites of its share group that sent shares")
        return s3, d

    def _check(self, msg: Message) -> Message:
        st = self._state(msg, "sent")
        (surv, surv_bits), (gone, gone_bits) = st.setup.mask(msg, "survivors"), st.setup.mask(msg, "dropped")
        if (surv & gone).any():
            raise ProtocolError(f"site {self.site_id}: a site is marked both survivor and dropped")
        mine = st.nbrs | {self.site_id}
        s3, d = self._partition(st, st.setup.among(surv, mine), st.setup.among(gone, mine))  # this site's share group only
        n_surv, n_gone = int(np.count_nonzero(surv)), int(np.count_nonzero(gone))
        if n_surv + n_gone != st.u2_size:
            raise ProtocolError(f"site {self.site_id}: survivors and dropped sites number {n_surv + n_gone}, but {st.u2_size} sites shared keys")
        t = st.setup.threshold
        if n_surv < max(self.config.min_group, t):
            raise ConfigError(f"site {self.site_id} refuses to unmask a sum of {n_surv} sites; needs ≥ {max(self.config.min_group, t)}")
        if n_surv < st.min_shares:
            raise ConfigError(f"site {self.site_id} refuses to unmask a sum of {n_surv} sites: its differential-privacy noise share "
                              f"was sized for a sum of at least {st.min_shares} (dp_min_shares), so this sum would carry less noise than its ledger charged")
        st.view = (s3, d)
        st.statement = _statement(msg.job, msg.round, st.seed, st.setup.digest, surv_bits, gone_bits)
        st.stage = "signed"
        meta = {"sig": _b64(self._signing.sign(st.statement, _ECDSA))}
        if d:  # someone dropped: neighbours may need this site's confirmation before releasing a key share
            meta["macs"] = {w: _b64(_confirm_mac(st.confirm_keys[w], self.site_id, w, st.statement)) for w in sorted(s3 & st.nbrs)}
        return Message(MessageKind.SECAGG_CHECK_REPLY, msg.round, msg.job, meta)

    def _signer_key(self, w: str, entry: list[Any]) -> ec.EllipticCurvePublicKey:
        """The key ``w`` signs consistency statements with: its certificate's (deployments) or the one it advertised."""
        if self.attestation is not None:
            cert = entry[2] if len(entry) > 2 else None
            if not isinstance(cert, str):
                raise ProtocolError(f"the consistency signature relayed for site {w} carries no certificate; this site accepts only certified signatures")
            return self.attestation.verifier.public_key(cert.encode(), w)
        return _load_point(_unb64(entry[1], POINT_BYTES, f"signing key of {w}"), f"signing key of {w}")

    def _confirm(self, msg: Message, st: _SiteRound, dropped_nbrs: list[str]) -> None:
        """Before revealing what is only safe if ``v`` dropped out: ≥ t of v's share group signed this site's set."""
        if not dropped_nbrs:
            return
        sigs = msg.require("signatures", dict)
        macs = msg.meta.get("confirmations", {})
        if not isinstance(macs, dict) or not macs.keys() <= st.confirm_keys.keys():
            raise ProtocolError(f"site {self.site_id}: confirmations must come from its own share group, keyed by site")
        t = st.setup.threshold
        ok: dict[str, bool] = {self.site_id: True}
        mine = st.nbrs | {self.site_id}
        for v in dropped_nbrs:
            group = st.graph[v] - {v}
            # signers this site shares with v's group first: they count for several dropped neighbours
            ordered = sorted((group & (sigs.keys() | macs.keys())) - {self.site_id}, key=lambda w: (w not in mine, w))
            count = int(self.site_id in group)
            for w in ordered:
                if count >= t:
                    break
                if w not in ok and w in macs:  # a neighbour: its MAC under our pairwise key (no signature to verify)
                    tag = _unb64(macs[w], CONFIRM_BYTES, f"consistency confirmation of {w}")
                    ok[w] = hmac.compare_digest(tag, _confirm_mac(st.confirm_keys[w], w, self.site_id, st.statement))
                    if not ok[w]:
                        raise SecurityError(f"site {self.site_id} refuses to unmask: site {w} signed another survivor set than the one shown to "
                                            "this site (the coordinator showed different sets to different sites)")
                elif w not in ok:
                    entry = sigs[w]
                    if not isinstance(entry, list) or len(entry) < 2:
                        raise ProtocolError(f"site {self.site_id}: malformed consistency signature entry for {w}")
                    sig = _unb64(entry[0], None, f"consistency signature of {w}")
                    if len(sig) > MAX_SIGNATURE_BYTES:
                        raise ProtocolError(f"consistency signature of {w} has {len(sig)} bytes")
                    ok[w] = _verifies(self._signer_key(w, entry), sig, st.statement)
                    if not ok[w]:
                        raise SecurityError(f"site {self.site_id} refuses to unmask: site {w} signed another survivor set than the one shown to "
                                            "this site (the coordinator showed different sets to different sites)")
                count += 1
            if count < t:
                raise SecurityError(f"site {self.site_id} refuses to unmask: only {count} of the share group of dropped site {v} confirmed the "
                                    f"survivor set shown to this site, threshold {t} (different sets shown to different sites?)")

    def _unmask(self, msg: Message) -> Message:
        st = self._state(msg, "signed")
        s3 = frozenset(_name_list(msg.require("survivors", list), "survivors"))
        d = frozenset(_name_list(msg.require("dropped", list), "dropped"))
        s3, d = self._partition(st, s3, d)
        mine = st.nbrs | {self.site_id}
        if (s3, d) != (st.view[0] & mine, st.view[1] & mine):
            raise ProtocolError(f"site {self.site_id}: the unmask request shows another survivor set than the one this site signed")
        lost = sorted(d & st.nbrs)
        self._confirm(msg, st, lost)
        b = [v for v in sorted(s3) if v in st.held]
        s = [v for v in lost if v in st.held]
        tensors = {
            "b_shares": _share_rows([st.held[v][0] for v in b]),
            "s_shares": _share_rows([st.held[v][1] for v in s]),
        }
        if msg.meta.get("recovery") == Recovery.SURVIVORS.value:
            # own self-mask + masks with dropped neighbours, exactly what SERVER recovery would rebuild
            fp = st.setup.fp
            exp = MaskExpander.reused(st.size, fp.dtype)
            corr = exp.expand(st.b_seed).copy()
            for v in lost:
                exp.add(corr, st.mask_seeds[v], +1 if self.site_id < v else -1)
            tensors["correction"] = fp.reduce(corr)
        st.stage = "unmasked"
        st.held.clear()
        st.mask_seeds.clear()
        st.share_keys.clear()
        st.confirm_keys.clear()
        return Message(MessageKind.SECAGG_UNMASK_REPLY, msg.round, msg.job, {"b": b, "s": s}, tensors)


# -- coordinator half ---------------------------------------------------------------------------------
def _abort(plan: RoundPlan, site: str, cause: str) -> RoundAborted:
    return RoundAborted(f"round {plan.round}: secure aggregation aborted by site {site}: {cause}; the global model is unchanged",
                        culprits=(site,))


@dataclass(frozen=True)
class _Advert:
    """One site's key advertisement as the coordinator keeps it: raw keys for its own use, the
    strings as received for relaying (each decoded once, never re-encoded)."""

    c_pk: bytes
    s_pk: bytes
    commit: bytes
    signing: ec.EllipticCurvePublicKey
    relay: list[str]  # [c_pk, s_pk] (+ [cert, sig] in deployments)
    v_pk: str
    cert: str | None


class SecAggProtocol:
    """Coordinator half of secure aggregation (see the module docstring for the phases)."""

    name = "secagg"

    def __init__(self, config: SecAggConfig | None = None):
        self.config = config or SecAggConfig()
        self.last_stats: SecAggStats | None = None

    def site_protection(self, site_id: str) -> SecAggSite:
        return SecAggSite(site_id, self.config)

    #: checks a survivor's consistency signature, to name a site that signs what it was not shown
    #: (the sites check each other's signatures themselves; this only names the culprit early).
    _signed = staticmethod(_verifies)

    @staticmethod
    def _advert(rep: Message) -> _Advert:
        meta = rep.meta
        c, s, com, v = meta.get("c_pk"), meta.get("s_pk"), meta.get("commit"), meta.get("v_pk")
        c_pk, s_pk = _unb64(c, KEY_BYTES, "c_pk"), _unb64(s, KEY_BYTES, "s_pk")
        commit = _unb64(com, 32, "graph-seed commitment")
        signing = _load_point(_unb64(v, POINT_BYTES, "signing key"), "signing key")
        signed = relayable(meta)
        return _Advert(c_pk, s_pk, commit, signing, [c, s, *signed], v, signed[0] if signed else None)

    def collect(self, plan: RoundPlan, transport: Transport) -> AggregateResult:
        t_start = time.perf_counter()
        cfg = self.config
        group = tuple(sorted(plan.sites))
        n = len(group)
        odd = [s for s in group if not s or "\n" in s]
        if odd:
            raise ConfigError(f"round {plan.round}: secure aggregation needs non-empty site names without line breaks, got {odd[0]!r}")
        if n < cfg.min_group:
            raise RoundAborted(f"round {plan.round}: secure aggregation needs at least {cfg.min_group} sites, {n} connected; the global model is unchanged")
        degree = cfg.degree_for(n)
        setup = _Setup(group, degree, cfg.threshold_for(min(degree, n - 1) + 1), cfg.fixed_point(n))
        idx = setup.index
        t = setup.threshold
        need = max(plan.min_sites, cfg.min_group)

        phase = PhaseRunner(plan, transport, lambda site, cause: _abort(plan, site, cause))
        dropped, up, down = phase.dropped, phase.up, phase.down

        def enough(alive: Mapping[str, Any] | frozenset[str], label: str) -> None:
            if len(alive) < need:
                why = "; ".join(f"{s}: {r}" for s, r in dropped.items()) or "none answered"
                raise RoundAborted(f"round {plan.round}: only {len(alive)} of {n} sites left after {label}, need {need} ({why}); the global model is unchanged")

        # 1. advertise keys and commit to graph-seed shares
        adv_meta = setup.to_meta()
        adv = phase({s: Message(MessageKind.SECAGG_ADVERTISE, plan.round, plan.job, adv_meta) for s in group}, MessageKind.SECAGG_ADVERTISE_REPLY, "advertise")
        adverts: dict[str, _Advert] = {}
        for sid in sorted(adv):
            try:
                adverts[sid] = self._advert(adv[sid])
            except ProtocolError as exc:
                raise _abort(plan, sid, f"bad key advertisement: {exc}") from None
        enough(adverts, "key advertisement")
        u1_list = sorted(adverts)
        u1 = frozenset(u1_list)

        # 2. reveal graph-seed shares, once every commitment is fixed
        u1_bits = setup.bits(u1_list)
        digest = _b64(_commitments_digest(plan.job, plan.round, setup.digest, u1_bits.tobytes(), b"".join(adverts[s].commit for s in u1_list)))
        rev = phase({s: Message(MessageKind.SECAGG_REVEAL, plan.round, plan.job, {"commitments": digest}) for s in u1_list}, MessageKind.SECAGG_REVEAL_REPLY, "reveal")
        reveals = np.zeros((len(u1_list), REVEAL_BYTES), dtype=np.uint8)
        for i, sid in enumerate(u1_list):
            if sid not in rev:
                raise RoundAborted(f"round {plan.round}: site {sid} committed to a graph-seed share and did not reveal it ({dropped.get(sid, 'no reply')}); "
                                   "the graph cannot be drawn without it; the global model is unchanged", culprits=(sid,))
            try:
                r = _unb64(rev[sid].meta.get("reveal"), REVEAL_BYTES, "graph-seed share")
            except ProtocolError as exc:
                raise _abort(plan, sid, str(exc)) from None
            if _reveal_commitment(r) != adverts[sid].commit:
                raise _abort(plan, sid, "its graph-seed reveal does not match its commitment")
            reveals[i] = np.frombuffer(r, dtype=np.uint8)
        seed = _graph_seed(reveals)
        graph = setup.graph(seed)

        # 3. share keys: each site gets its neighbours' keys only
        shr_reqs = {}
        for s in u1_list:
            keys = {v: adverts[v].relay for v in sorted((graph[s] & u1) | {s})}
            shr_reqs[s] = Message(MessageKind.SECAGG_SHARE, plan.round, plan.job, {"keys": keys}, {"reveals": reveals, "u1": u1_bits})
        shr = phase(shr_reqs, MessageKind.SECAGG_SHARE_REPLY, "share")
        del shr_reqs
        sealed: dict[str, dict[str, str]] = {}  # sender → recipient → blob
        commits: dict[str, str] = {}
        blob_len = _b64_len(SEALED_SHARE_BYTES)
        for sid in sorted(shr):
            rep = shr[sid]
            shares, com = rep.meta.get("shares"), rep.meta.get("commit")
            expected = (graph[sid] & u1) - {sid}
            if not isinstance(shares, dict) or shares.keys() != expected:
                raise _abort(plan, sid, f"sent shares for {sorted(shares) if isinstance(shares, dict) else shares!r}, expected its neighbours {sorted(expected)}")
            if not isinstance(com, str) or len(com) != 64:
                raise _abort(plan, sid, "missing or malformed self-mask commitment")
            for r, blob in shares.items():
                if not isinstance(blob, str) or len(blob) != blob_len:  # the recipient authenticates the content
                    raise _abort(plan, sid, f"share for {r} is not a {blob_len}-character base64 string")
            sealed[sid], commits[sid] = shares, com
        u2 = frozenset(sealed)
        enough(u2, "secret sharing")
        for u in sorted(u2):
            alive = (graph[u] & u2) | {u}
            if len(alive) < t:
                raise RoundAborted(f"round {plan.round}: too few survivors: site {u} has {len(alive)} of its share group left, threshold {t}; the global model is unchanged")

        # 4. train and collect masked inputs
        reqs = {}
        for s in sorted(u2):
            peers = graph[s] & u2
            inbox = {v: sealed[v][s] for v in sorted(peers)}
            reqs[s] = plan.train_request(s, {"secagg": {"u2": sorted(peers | {s}), "u2_size": len(u2), "inbox": inbox}})
        trn = phase(reqs, MessageKind.TRAIN_REPLY, "train")
        del reqs
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
            try:
                metrics[sid] = reply_metrics(rep)
            except ProtocolError as exc:
                raise _abort(plan, sid, str(exc)) from None
            np.add(acc, arr, out=acc)
        del trn
        u3 = frozenset(metrics)
        enough(u3, "training")
        gone = u2 - u3
        surv_list, gone_list = sorted(u3), sorted(gone)

        # 5. consistency check: every survivor signs the survivor set it is shown
        chk_bits = {"survivors": setup.bits(surv_list), "dropped": setup.bits(gone_list)}
        chk = phase({s: Message(MessageKind.SECAGG_CHECK, plan.round, plan.job, {}, chk_bits) for s in surv_list}, MessageKind.SECAGG_CHECK_REPLY, "consistency check")
        statement = _statement(plan.job, plan.round, seed, setup.digest, chk_bits["survivors"].tobytes(), chk_bits["dropped"].tobytes())
        sig_entries: dict[str, list[str]] = {}
        macs_of: dict[str, Mapping[str, str]] = {}  # signer → neighbour → MAC it addressed to that neighbour
        mac_len = _b64_len(CONFIRM_BYTES)
        for sid in sorted(chk):
            sig, macs = chk[sid].meta.get("sig"), chk[sid].meta.get("macs", {})
            if not isinstance(macs, dict) or not macs.keys() <= graph[sid] & u3 or any(not isinstance(m, str) or len(m) != mac_len for m in macs.values()):
                raise _abort(plan, sid, f"its consistency confirmations must be {mac_len}-character strings addressed to surviving neighbours")
            macs_of[sid] = macs
            try:
                raw = _unb64(sig, None, "consistency signature")
            except ProtocolError as exc:
                raise _abort(plan, sid, str(exc)) from None
            if len(raw) > MAX_SIGNATURE_BYTES or not self._signed(adverts[sid].signing, raw, statement):
                raise _abort(plan, sid, "its consistency signature does not verify on the survivor set it was shown")
            a = adverts[sid]
            sig_entries[sid] = [sig, a.v_pk] + ([a.cert] if a.cert is not None else [])
        u4 = frozenset(sig_entries)

        # 6. unmask
        rec_value = cfg.recovery.value
        unm_reqs = {}
        for h in sorted(u4):
            lost = graph[h] & gone
            mine = graph[h] | {h}
            meta: dict[str, Any] = {"survivors": sorted(u3 & mine), "dropped": sorted(lost), "recovery": rec_value}
            if lost:
                signers: set[str] = set()
                for v in lost:
                    signers |= graph[v]
                signers = (signers - gone) & u4
                # a neighbour's confirmation is a MAC the site checks with their pairwise key; others' are signatures
                meta["confirmations"] = {w: macs_of[w][h] for w in sorted(signers) if h in macs_of[w]}
                meta["signatures"] = {w: sig_entries[w] for w in sorted(signers) if w not in meta["confirmations"]}
            unm_reqs[h] = Message(MessageKind.SECAGG_UNMASK, plan.round, plan.job, meta)
        unm = phase(unm_reqs, MessageKind.SECAGG_UNMASK_REPLY, "unmask")
        del unm_reqs
        t_unmask = time.perf_counter()
        covered: set[tuple[str, str]] = set()  # (dropped, survivor) edges removed by a survivor's correction
        self_removed: set[str] = set()  # survivors whose correction removed their own self-mask
        b_rows: dict[str, list[tuple[str, np.ndarray]]] = {}  # owner → [(holder, share row)], parsed only when needed
        s_rows: dict[str, list[tuple[str, np.ndarray]]] = {}
        for h in sorted(unm):
            rep = unm[h]
            b, s = rep.meta.get("b"), rep.meta.get("s")
            want_b = sorted((graph[h] | {h}) & u3)
            want_s = sorted(graph[h] & gone)
            if b != want_b or s != want_s:
                raise _abort(plan, h, f"unmask reply holds shares for {b!r} / {s!r}, expected {want_b} / {want_s}")
            for name, owners, rows_of in (("b_shares", b, b_rows), ("s_shares", s, s_rows)):
                rows = rep.tensors.get(name)
                if rows is None or rows.dtype != np.uint8 or rows.shape != (len(owners), shamir.SHARE_BYTES):
                    raise _abort(plan, h, f"unmask reply tensor {name} is missing or not ({len(owners)}, {shamir.SHARE_BYTES}) uint8")
                for owner, row in zip(owners, rows):
                    rows_of.setdefault(owner, []).append((h, row))
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

        def points(rows_of: dict[str, list[tuple[str, np.ndarray]]], owner: str) -> dict[int, int]:
            pts: dict[int, int] = {}
            for holder, row in rows_of.get(owner, ()):
                try:
                    pts[idx[holder]] = shamir.from_bytes(row.tobytes())
                except ProtocolError as exc:
                    raise _abort(plan, holder, str(exc)) from None
            return pts

        exp = MaskExpander(size, fp.dtype)
        regenerated = 0
        for u in sorted(u3 - self_removed):
            com = commits[u]

            def ok_b(x: int, u: str = u, com: str = com) -> bool:
                return x < 1 << (8 * SEED_BYTES) and commitment("secagg-self-mask", plan.job, plan.round, u, x.to_bytes(SEED_BYTES, "big")) == com

            try:
                seed_u = shamir.reconstruct(points(b_rows, u), t, check=ok_b, names=names, what=f"self-mask seed of site {u}").to_bytes(SEED_BYTES, "big")
            except RoundAborted:
                raise
            except ProtocolError as exc:
                raise RoundAborted(f"round {plan.round}: secure aggregation aborted: {exc}; the global model is unchanged") from None
            exp.add(acc, seed_u, -1)
            regenerated += 1
        for v in gone_list:
            edges = [w for w in sorted(graph[v] & u3) if (v, w) not in covered]
            if not edges:
                continue
            s_pk = adverts[v].s_pk

            def ok_s(x: int, s_pk: bytes = s_pk) -> bool:
                return x < 1 << 256 and x25519_public(x.to_bytes(32, "big")) == s_pk

            try:
                sk = shamir.reconstruct(points(s_rows, v), t, check=ok_s, names=names, what=f"mask key of dropped site {v}").to_bytes(32, "big")
            except RoundAborted:
                raise
            except ProtocolError as exc:
                raise RoundAborted(f"round {plan.round}: secure aggregation aborted: {exc}; the global model is unchanged") from None
            sk_v = private_key(sk)
            for w in edges:
                mseed = _mask_seed(agree(sk_v, adverts[w].s_pk), plan.job, plan.round, v, w)
                exp.add(acc, mseed, -1 if w < v else +1)  # y_w holds +mask when w < v
                regenerated += 1
        total = fp.decode(fp.reduce(acc))
        # every site encodes |wᵢ·uᵢ| ≤ bound (and its weight), so the sum of the survivors' cannot exceed that many
        # bounds: beyond it, a survivor uploaded a vector that was not a masked update (or a false correction).
        # Masks hide which one, so the abort names every candidate, never the sum.
        limit = len(u3) * fp.bound * (1 + 1e-9) + len(u3) * fp.resolution
        if float(np.max(np.abs(total))) > limit or not total[-1] > 0:
            raise RoundAborted(
                f"round {plan.round}: the unmasked sum lies outside what {len(u3)} sites can send (|value| ≤ {len(u3)}·{fp.bound:g}, "
                f"weight > 0): a masked vector or a correction from one of {surv_list} was not what the protocol makes; "
                "the global model is unchanged")
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
            ring_bits=fp.ring_bits,
            recovery=rec_value,
        )
        return AggregateResult(total[:-1], float(total[-1]), tuple(surv_list), dropped, metrics, up, down)


__all__ = ["Recovery", "SecAggConfig", "SecAggProtocol", "SecAggSite", "SecAggStats", "value_bound"]

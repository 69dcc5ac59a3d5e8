"""Homomorphic aggregation: sites encrypt, the coordinator sums ciphertexts it cannot read.

Two schemes, chosen by :class:`HEScheme` (an explicit registry, never a name
that selects code): packed Paillier (exact fixed-point sums, ``phe``+``gmpy2``)
and CKKS (approximate, much faster, TenSEAL).

Keys (HE_KEYS, once per job).  The sites share one key pair; the coordinator
holds only the public half.  The first site in name order (the *dealer*)
generates it and sends the private half to every other site sealed with
AES-GCM under an X25519 key it agrees with that site; the coordinator relays
the sealed blobs and never sees the key.  Each site confirms the fingerprint
of the public key it installed, so all parties provably use the same one.

A round: TRAIN → each site returns Enc(wᵢ·uᵢ ‖ wᵢ); the coordinator multiplies
(Paillier) or adds (CKKS) the ciphertexts; HE_DECRYPT → one participating site
(or ``decryptors`` of them, cross-checked) decrypts the sum only.

Trust model, stated plainly: the coordinator is honest-but-curious.  Because
every site holds the full private key, a coordinator that deviated from the
protocol could ask a site to decrypt one site's ciphertext instead of the sum;
a site decrypts at most once per round and refuses a sum of fewer than its
``min_group`` sites, which limits but does not remove this (threshold
decryption would).  In deployments the X25519 keys of the dealing phase are
signed with the sites' certificates (``insitu.secure.attest``), so an active
coordinator cannot interpose its own to catch the private key.  Secure aggregation
(``insitu.secure.secagg``) does not have the decryption-oracle weakness.
"""
from __future__ import annotations

import enum
import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from insitu.errors import ConfigError, ProtocolError, RoundAborted
from insitu.federation.messages import Message, MessageKind
from insitu.federation.protocol import AggregateResult, PhaseRunner, RoundPlan, TimedHandlers
from insitu.federation.transport import Transport, reply_metrics
from insitu.secure import ckks as _ckks
from insitu.secure import paillier as _paillier
from insitu.secure.attest import relayable
from insitu.secure._primitives import agree, context, hkdf, open_sealed, seal, x25519_keypair
from insitu.secure.secagg import _b64, _unb64


class HEScheme(str, enum.Enum):
    PAILLIER = "paillier"
    CKKS = "ckks"


#: the longest Paillier modulus a coordinator or site accepts from a dealer (sums cost ~bits^2)
MAX_KEY_BITS = 16384


@dataclass(frozen=True)
class HEConfig:
    """Homomorphic-aggregation parameters (validated; the defaults are the safe recipe).

    Paillier: ``key_bits`` modulus, values encoded with ``frac_bits`` fraction bits and
    refused above ``bound``.  CKKS: ``ckks_poly_degree`` ring and 2^``ckks_scale_bits`` scale.
    ``decryptors`` sites decrypt each sum and must agree.  ``min_group``: the fewest sites
    whose sum a site agrees to decrypt.
    """

    scheme: HEScheme = HEScheme.PAILLIER
    key_bits: int = 2048
    bound: float = 2.0**16
    frac_bits: int = 24
    ckks_poly_degree: int = 8192
    ckks_scale_bits: int = 40
    decryptors: int = 1
    min_group: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", HEScheme(self.scheme))
        if self.key_bits < 2048:
            raise ConfigError(f"Paillier key of {self.key_bits} bits is too short; use at least 2048")
        if self.decryptors < 1:
            raise ConfigError(f"--he-decryptors must be at least 1, got {self.decryptors}")
        if self.min_group < 2:
            raise ConfigError(f"HE minimum group {self.min_group} must be at least 2 (a sum of one is that site's update)")
        if not (self.bound > 0 and math.isfinite(self.bound)) or self.frac_bits < 8:
            raise ConfigError(f"HE fixed point needs a positive bound and ≥ 8 fraction bits, got {self.bound}, {self.frac_bits}")
        if self.scheme is HEScheme.CKKS:
            if self.ckks_poly_degree not in (8192, 16384) or not 20 <= self.ckks_scale_bits <= 40:
                raise ConfigError(f"CKKS needs poly degree 8192 or 16384 and a scale of 2^20..2^40, got {self.ckks_poly_degree}, 2^{self.ckks_scale_bits}")


# -- scheme back-ends (explicit registry) -------------------------------------------------------------
class _PaillierBackend:
    def keygen(self, cfg: HEConfig) -> tuple[bytes, bytes]:
        _, sk = _paillier.generate_keypair(cfg.key_bits)
        return _paillier.private_to_bytes(sk), int(sk.public_key.n).to_bytes((cfg.key_bits + 7) // 8 + 1, "big")

    def load_secret(self, blob: bytes) -> Any:
        sk = _paillier.private_from_bytes(blob)
        return sk, _paillier.FastEncryptor(sk)

    def load_public(self, blob: bytes) -> Any:
        n = int.from_bytes(blob, "big")
        if n.bit_length() < 2048:
            raise ProtocolError(f"Paillier public modulus of {n.bit_length()} bits is too short")
        if n.bit_length() > MAX_KEY_BITS:
            raise ProtocolError(f"Paillier public modulus of {n.bit_length()} bits is longer than {MAX_KEY_BITS}")
        return n

    def matches(self, secret: Any, public_blob: bytes) -> bool:
        return int(secret[0].public_key.n) == int.from_bytes(public_blob, "big")

    def round_meta(self, cfg: HEConfig, public: Any, n: int) -> dict[str, Any]:
        return {"key_bits": int(public).bit_length(), "frac_bits": cfg.frac_bits, "bound": cfg.bound, "n_max": n}

    def _layout(self, meta: Mapping[str, Any]) -> _paillier.PackedLayout:
        try:
            return _paillier.PackedLayout(int(meta["key_bits"]), int(meta["frac_bits"]), float(meta["bound"]), int(meta["n_max"]))
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"packed-Paillier round parameters are malformed: {dict(meta)}") from None

    def encrypt(self, secret: Any, vec: np.ndarray, meta: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
        sk, enc = secret
        lay = self._layout(meta)
        if lay.key_bits != int(sk.public_key.n).bit_length():
            raise ProtocolError(f"round announces a {lay.key_bits}-bit key; this site holds a {int(sk.public_key.n).bit_length()}-bit one")
        cts = [enc.encrypt(m) for m in lay.encode(vec, what)]
        return {"ct": _paillier.ciphertexts_to_array(cts, lay.ct_bytes)}

    def add(self, public: Any, parts: list[tuple[str, Mapping[str, np.ndarray]]], meta: Mapping[str, Any], size: int) -> dict[str, np.ndarray]:
        lay = self._layout(meta)
        shape = (lay.n_ciphertexts(size), lay.ct_bytes)
        nsq = int(public) ** 2
        cols = []
        for site, tensors in parts:
            arr = tensors.get("ct")
            if arr is None or arr.dtype != np.uint8 or tuple(arr.shape) != shape:
                got = None if arr is None else (tuple(arr.shape), str(arr.dtype))
                raise ProtocolError(f"site {site} sent Paillier ciphertexts {got}, expected shape {shape} uint8")
            cols.append(_paillier.array_to_ciphertexts(arr, nsq, f"ciphertexts from site {site}"))
        total = _paillier.add_ciphertexts(cols, nsq)
        return {"ct": _paillier.ciphertexts_to_array(total, lay.ct_bytes)}

    def decrypt(self, secret: Any, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any], size: int, count: int) -> np.ndarray:
        sk, _ = secret
        lay = self._layout(meta)
        arr = tensors.get("ct")
        if arr is None or arr.dtype != np.uint8 or tuple(arr.shape) != (lay.n_ciphertexts(size), lay.ct_bytes):
            raise ProtocolError("encrypted sum has the wrong shape")
        cts = _paillier.array_to_ciphertexts(arr, int(sk.public_key.nsquare), "encrypted sum")
        return lay.decode(_paillier.decrypt_raw(sk, cts), size, count)


class _CKKSBackend:
    def keygen(self, cfg: HEConfig) -> tuple[bytes, bytes]:
        ctx = _ckks.make_context(cfg.ckks_poly_degree, cfg.ckks_scale_bits)
        return _ckks.secret_bytes(ctx), _ckks.public_bytes(ctx)

    def load_secret(self, blob: bytes) -> Any:
        return _ckks.load_context(blob, secret=True)

    def load_public(self, blob: bytes) -> Any:
        return _ckks.load_context(blob, secret=False)

    def matches(self, secret: Any, public_blob: bytes) -> bool:
        # The public context must encrypt what the secret context decrypts.
        pub = _ckks.load_context(public_blob, secret=False)
        probe = np.array([1.5, -2.25, 3.0])
        data, lengths = _ckks.encrypt(pub, probe, 3)
        got = _ckks.decrypt(secret, data, lengths, 1, 3)
        return bool(np.allclose(got, probe, atol=1e-4))

    def round_meta(self, cfg: HEConfig, public: Any, n: int) -> dict[str, Any]:
        return {"chunk": cfg.ckks_poly_degree // 2, "bound": cfg.bound}

    def _chunk(self, meta: Mapping[str, Any]) -> int:
        chunk = meta.get("chunk")
        if not isinstance(chunk, int) or chunk not in (4096, 8192):
            raise ProtocolError(f"CKKS chunk size {chunk!r} is not 4096 or 8192")
        return chunk

    def encrypt(self, secret: Any, vec: np.ndarray, meta: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
        v = np.asarray(vec, dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise ProtocolError(f"{what} holds NaN or infinite values")
        bound = float(meta.get("bound", 2.0**16))
        if v.size and float(np.max(np.abs(v))) > bound:
            raise ProtocolError(f"{what} has a coordinate above the bound {bound:g} (its size is not named: it is what the protection hides)")
        data, lengths = _ckks.encrypt(secret, v, self._chunk(meta))
        return {"ct": data, "ct_len": lengths}

    def add(self, public: Any, parts: list[tuple[str, Mapping[str, np.ndarray]]], meta: Mapping[str, Any], size: int) -> dict[str, np.ndarray]:
        chunk = self._chunk(meta)
        expect = -(-size // chunk)
        flat = []
        for site, tensors in parts:
            if "ct" not in tensors or "ct_len" not in tensors:
                raise ProtocolError(f"site {site} sent no CKKS ciphertexts")
            flat.append((f"site {site}", tensors["ct"], tensors["ct_len"]))
        data, lengths = _ckks.add(public, flat, expect, chunk)
        return {"ct": data, "ct_len": lengths}

    def decrypt(self, secret: Any, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any], size: int, count: int) -> np.ndarray:
        chunk = self._chunk(meta)
        if "ct" not in tensors or "ct_len" not in tensors:
            raise ProtocolError("encrypted sum carries no ciphertexts")
        return _ckks.decrypt(secret, tensors["ct"], tensors["ct_len"], -(-size // chunk), size)


_BACKENDS: dict[HEScheme, Any] = {HEScheme.PAILLIER: _PaillierBackend(), HEScheme.CKKS: _CKKSBackend()}


def _fingerprint(public_blob: bytes) -> str:
    return hashlib.sha256(b"insitu-he-public" + public_blob).hexdigest()


def _deal_key(secret: bytes, job: str, dealer: str, peer: str) -> bytes:
    return hkdf(secret, context(b"insitu-he-deal", job, dealer, peer))


def _blob(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def _arr(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8)


# -- site half --------------------------------------------------------------------------------------
@dataclass
class _SiteKeys:
    x_sk: bytes | None = None
    secret: Any = None
    public_blob: bytes = b""
    decrypted_rounds: set[int] = field(default_factory=set)


class HESite(TimedHandlers):
    """The site half: joins key dealing, encrypts its update, decrypts only sums."""

    #: the TRAIN meta key this protocol adds to the plan and round instructions
    request_keys = ("he",)

    @staticmethod
    def egress() -> dict:
        """What this site half sends, field by field (see insitu.federation.egress)."""
        from insitu.federation.egress import Declared, Release

        pub, prot = Release.PUBLIC, Release.PROTECTED
        return {
            MessageKind.HE_KEYS_REPLY: Declared({"x_pk": pub, "cert": pub, "sig": pub, "fingerprint": pub},
                                                {"public": pub, "to:*": prot}),  # the private key sealed to each peer
            MessageKind.TRAIN_REPLY: Declared({"he": pub, "metrics": pub}, {"ct": prot, "ct_len": prot}),
            MessageKind.HE_DECRYPT_REPLY: Declared({}, {"sum": pub}),  # only sums of at least min_group sites
        }

    def __init__(self, site_id: str, config: HEConfig | None = None, attestation: Any = None):
        """``attestation`` (deployments): sign this site's dealing key with its certificate and
        accept only the dealer's / peers' keys signed with theirs."""
        self.site_id = site_id
        self.attestation = attestation
        self.config = config or HEConfig()
        self.backend = _BACKENDS[self.config.scheme]
        self._jobs: dict[str, _SiteKeys] = {}
        self.seconds = 0.0

    def handlers(self) -> Mapping[MessageKind, Callable[[Message], Message]]:
        return {MessageKind.HE_KEYS: self._timed(self._keys), MessageKind.HE_DECRYPT: self._timed(self._decrypt)}

    def _keys(self, msg: Message) -> Message:
        scheme = msg.require("scheme", str)
        if scheme != self.config.scheme.value:
            raise ProtocolError(f"site {self.site_id} is configured for {self.config.scheme.value}, the coordinator asked for {scheme!r}")
        stage = msg.require("stage", str)
        st = self._jobs.setdefault(msg.job, _SiteKeys())
        if stage == "hello":
            st.x_sk, x_pk = x25519_keypair()
            meta: dict[str, Any] = {"x_pk": _b64(x_pk)}
            if self.attestation is not None:
                from insitu.secure.attest import he_transcript

                meta.update(self.attestation.sign_fields(he_transcript(msg.job, msg.round, self.site_id, scheme, x_pk)))
            return Message(MessageKind.HE_KEYS_REPLY, msg.round, msg.job, meta)
        if st.x_sk is None:
            raise ProtocolError(f"site {self.site_id}: HE key {stage!r} without a fresh hello (replayed or out of order)")
        x_sk, st.x_sk = st.x_sk, None  # one use only: a replayed deal or install cannot be opened again
        if stage == "deal":
            peers = msg.require("peers", dict)
            secret_blob, public_blob = self.backend.keygen(self.config)
            tensors = {"public": _arr(public_blob)}
            for peer, entry in sorted(peers.items()):
                pk = self._checked_key(msg, peer, entry, scheme)
                key = _deal_key(agree(x_sk, pk), msg.job, self.site_id, peer)
                tensors[f"to:{peer}"] = _arr(seal(key, secret_blob, context(b"insitu-he-deal-aad", msg.job, self.site_id, peer)))
            st.secret, st.public_blob = self.backend.load_secret(secret_blob), public_blob
            return Message(MessageKind.HE_KEYS_REPLY, msg.round, msg.job, {"fingerprint": _fingerprint(public_blob)}, tensors)
        if stage == "install":
            dealer = msg.require("dealer", str)
            dealer_pk = self._checked_key(msg, dealer, [msg.require("dealer_pk", str), *([msg.meta.get("dealer_cert"), msg.meta.get("dealer_sig")] if "dealer_cert" in msg.meta or "dealer_sig" in msg.meta else [])], scheme)
            public_blob = _blob(msg.tensor("public"))
            key = _deal_key(agree(x_sk, dealer_pk), msg.job, dealer, self.site_id)
            secret_blob = open_sealed(key, _blob(msg.tensor("sealed")), context(b"insitu-he-deal-aad", msg.job, dealer, self.site_id), f"HE key from {dealer}")
            secret = self.backend.load_secret(secret_blob)
            if not self.backend.matches(secret, public_blob):
                raise ProtocolError(f"site {self.site_id}: the relayed public key does not match the private key dealt by {dealer}")
            st.secret, st.public_blob = secret, public_blob
            return Message(MessageKind.HE_KEYS_REPLY, msg.round, msg.job, {"fingerprint": _fingerprint(public_blob)})
        raise ProtocolError(f"unknown HE key stage {stage!r}")

    def _checked_key(self, msg: Message, peer: str, entry: Any, scheme: str) -> bytes:
        """A peer's dealing key as relayed: ``pk`` or ``[pk, cert, sig]``; signed ones are required and
        checked when this site has an attestation."""
        parts = entry if isinstance(entry, list) else [entry]
        if not parts or len(parts) not in (1, 3):
            raise ProtocolError(f"site {self.site_id}: malformed dealing key entry for {peer}")
        pk = _unb64(parts[0], 32, f"key of {peer}")
        if self.attestation is not None:
            from insitu.secure.attest import he_transcript

            self.attestation.check_relayed(parts[1:], peer, he_transcript(msg.job, msg.round, peer, scheme, pk))
        return pk

    def _secret(self, msg: Message) -> Any:
        st = self._jobs.get(msg.job)
        if st is None or st.secret is None:
            raise ProtocolError(f"site {self.site_id} holds no homomorphic key for job {msg.job!r}")
        return st

    def protect(self, request: Message, weighted: np.ndarray, weight: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        t0 = time.perf_counter()
        try:
            st = self._secret(request)
            meta = request.require("he", dict)
            vec = np.concatenate([np.asarray(weighted, dtype=np.float64).ravel(), [float(weight)]])
            tensors = self.backend.encrypt(st.secret, vec, meta, f"update of site {self.site_id}")
            return {"he": self.config.scheme.value}, tensors
        finally:
            self.seconds += time.perf_counter() - t0

    def _decrypt(self, msg: Message) -> Message:
        st = self._secret(msg)
        count, size = msg.require("count", int), msg.require("size", int)
        if msg.round in st.decrypted_rounds:
            raise ProtocolError(f"site {self.site_id} already decrypted a sum for round {msg.round}; refusing a second (replay or decryption-oracle abuse)")
        if count < self.config.min_group:
            raise ProtocolError(f"site {self.site_id} refuses to decrypt a sum of {count} sites; its minimum is {self.config.min_group}")
        st.decrypted_rounds.add(msg.round)
        out = self.backend.decrypt(st.secret, msg.tensors, msg.require("he", dict), size, count)
        return Message(MessageKind.HE_DECRYPT_REPLY, msg.round, msg.job, {}, {"sum": out})


# -- coordinator half ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HEStats:
    server_seconds: float
    keygen_seconds: float
    decrypt_seconds: float
    ciphertext_bytes_per_site: int


@dataclass
class _JobKeys:
    public_blob: bytes
    public: Any
    asked: frozenset[str]
    keyed: frozenset[str]


class HEProtocol:
    """Coordinator half of homomorphic aggregation: relays key dealing, sums ciphertexts."""

    def __init__(self, config: HEConfig | None = None):
        self.config = config or HEConfig()
        self.backend = _BACKENDS[self.config.scheme]
        self.name = f"he-{self.config.scheme.value}"
        self._jobs: dict[str, _JobKeys] = {}
        self.last_stats: HEStats | None = None

    def site_protection(self, site_id: str) -> HESite:
        return HESite(site_id, self.config)

    def collect(self, plan: RoundPlan, transport: Transport) -> AggregateResult:
        cfg = self.config
        need = max(plan.min_sites, cfg.min_group)

        def abort(site: str, cause: str) -> RoundAborted:
            return RoundAborted(f"round {plan.round}: homomorphic aggregation aborted by site {site}: {cause}; the global model is unchanged",
                                culprits=(site,))

        phase = PhaseRunner(plan, transport, abort)
        dropped, up, down = phase.dropped, phase.up, phase.down

        if len(plan.sites) < need:
            raise RoundAborted(f"round {plan.round}: homomorphic aggregation needs at least {need} sites, {len(plan.sites)} connected; the global model is unchanged")
        t_keys = time.perf_counter()
        keys = self._keys(plan, phase, abort, need)
        t_keys = time.perf_counter() - t_keys
        meta = self.backend.round_meta(cfg, keys.public, len(plan.sites))
        for s in plan.sites:
            if s not in keys.keyed:
                dropped.setdefault(s, "holds no homomorphic key (missed or failed key setup)")
        trn = phase({s: plan.train_request(s, {"he": meta}) for s in plan.sites if s in keys.keyed}, MessageKind.TRAIN_REPLY, "train")
        if len(trn) < need:
            why = "; ".join(f"{s}: {r}" for s, r in dropped.items()) or "none answered"
            raise RoundAborted(f"round {plan.round}: only {len(trn)} of {len(plan.sites)} sites sent encrypted updates, need {need} ({why}); the global model is unchanged")
        size = plan.size + 1
        t_add = time.perf_counter()
        parts = [(sid, trn[sid].tensors) for sid in sorted(trn)]
        metrics: dict[str, Mapping[str, Any]] = {}
        for sid in sorted(trn):
            try:
                metrics[sid] = reply_metrics(trn[sid])
            except ProtocolError as exc:
                raise abort(sid, str(exc)) from None
        try:
            total = self.backend.add(keys.public, parts, meta, size)
        except ProtocolError as exc:
            site = next((s for s, _ in parts if re.search(rf"\bsite {re.escape(s)}(?![\w.-])", str(exc))), "?")
            raise abort(site, str(exc)) from None
        t_add = time.perf_counter() - t_add
        participants = tuple(sorted(trn))
        dmeta = {"count": len(participants), "size": size, "he": meta}
        # ask participants in turn (rotating with the round) until enough decrypted
        order = list(participants[plan.round % len(participants) :] + participants[: plan.round % len(participants)])
        results: dict[str, np.ndarray] = {}
        t_dec = time.perf_counter()
        while order and len(results) < cfg.decryptors:
            ask = order[: cfg.decryptors - len(results)]
            order = order[len(ask) :]
            got = phase({s: Message(MessageKind.HE_DECRYPT, plan.round, plan.job, dmeta, total) for s in ask}, MessageKind.HE_DECRYPT_REPLY, "decrypt")
            for sid, rep in got.items():
                arr = rep.tensors.get("sum")
                if arr is None or arr.dtype != np.float64 or arr.shape != (size,) or not np.all(np.isfinite(arr)):
                    raise abort(sid, "decrypted sum is missing, of the wrong shape or not finite")
                results[sid] = arr
        t_dec = time.perf_counter() - t_dec
        if len(results) < cfg.decryptors:
            raise RoundAborted(f"round {plan.round}: only {len(results)} site(s) decrypted the sum, {cfg.decryptors} required; the global model is unchanged")
        first_site, plain = next(iter(results.items()))
        tol = 0.0 if cfg.scheme is HEScheme.PAILLIER else 1e-3 * (1.0 + float(np.max(np.abs(plain))))
        for sid, arr in results.items():
            if float(np.max(np.abs(arr - plain))) > tol:  # either may be the liar: both are named
                raise RoundAborted(f"round {plan.round}: homomorphic aggregation aborted: the decryption of site {sid} disagrees "
                                   f"with that of site {first_site}; the global model is unchanged", culprits=(sid, first_site))
        # every site encodes |wᵢ·uᵢ| ≤ bound (and its weight), so a sum of count sites cannot exceed count·bound:
        # beyond it, one ciphertext was malformed or the decryptors lied.  Homomorphic sums hide which
        # site it was, so the abort names every candidate (never the sum).
        limit = len(participants) * cfg.bound * (1 + 1e-6) + tol
        if float(np.max(np.abs(plain))) > limit or not plain[-1] > 0:
            raise RoundAborted(
                f"round {plan.round}: the decrypted sum lies outside what {len(participants)} sites can send (|value| ≤ "
                f"{len(participants)}·{cfg.bound:g}, weight > 0): a malformed ciphertext from one of {sorted(participants)} "
                f"or a false decryption from {sorted(results)}; the global model is unchanged")
        self.last_stats = HEStats(
            server_seconds=t_add,
            keygen_seconds=t_keys,
            decrypt_seconds=t_dec,
            ciphertext_bytes_per_site=int(sum(a.nbytes for a in parts[0][1].values())),
        )
        return AggregateResult(plain[:-1].copy(), float(plain[-1]), participants, dropped, metrics, up, down)

    def _keys(self, plan: RoundPlan, phase: PhaseRunner, abort: Callable, need: int) -> _JobKeys:
        known = self._jobs.get(plan.job)
        if known is not None and set(plan.sites) <= known.asked:
            return known
        scheme = self.config.scheme.value
        hello = phase({s: Message(MessageKind.HE_KEYS, plan.round, plan.job, {"stage": "hello", "scheme": scheme}) for s in plan.sites}, MessageKind.HE_KEYS_REPLY, "key hello")
        pks = {}
        signed: dict[str, list[str]] = {}  # site → [certificate PEM, signature], relayed for sites to check
        for sid, rep in hello.items():
            try:
                pks[sid] = _unb64(rep.meta.get("x_pk"), 32, "x_pk")
            except ProtocolError as exc:
                raise abort(sid, str(exc)) from None
            try:
                signed[sid] = relayable(rep.meta)
            except ProtocolError as exc:
                raise abort(sid, str(exc)) from None
        if len(pks) < need:
            raise RoundAborted(f"round {plan.round}: only {len(pks)} sites joined homomorphic key setup, need {need}; the global model is unchanged")
        dealer = sorted(pks)[0]
        peers: dict[str, Any] = {s: [_b64(pk), *signed[s]] if signed[s] else _b64(pk) for s, pk in sorted(pks.items()) if s != dealer}
        deal = phase({dealer: Message(MessageKind.HE_KEYS, plan.round, plan.job, {"stage": "deal", "scheme": scheme, "peers": peers})}, MessageKind.HE_KEYS_REPLY, "key deal")
        if dealer not in deal:
            why = phase.dropped.get(dealer)
            raise RoundAborted(f"round {plan.round}: key dealer {dealer} dropped out{f' ({why})' if why else ''}; the global model is unchanged")
        rep = deal[dealer]
        if set(rep.tensors) != {"public"} | {f"to:{p}" for p in peers} or any(a.dtype != np.uint8 or a.ndim != 1 for a in rep.tensors.values()):
            raise abort(dealer, "key deal reply does not hold exactly one sealed key per peer and the public key, each a flat uint8 array")
        public_blob = _blob(rep.tensors["public"])
        fp = _fingerprint(public_blob)
        if rep.meta.get("fingerprint") != fp:
            raise abort(dealer, "public-key fingerprint does not match the public key sent")
        try:
            public = self.backend.load_public(public_blob)
        except ProtocolError as exc:
            raise abort(dealer, str(exc)) from None
        inst = phase(
            {
                p: Message(MessageKind.HE_KEYS, plan.round, plan.job, {"stage": "install", "scheme": scheme, "dealer": dealer, "dealer_pk": _b64(pks[dealer]),
                                                               **(dict(zip(("dealer_cert", "dealer_sig"), signed[dealer])))}, {"sealed": rep.tensors[f"to:{p}"], "public": rep.tensors["public"]})
                for p in peers
            },
            MessageKind.HE_KEYS_REPLY,
            "key install",
        )
        for sid, r in inst.items():
            if r.meta.get("fingerprint") != fp:
                raise abort(sid, "installed a different public key than the dealer's")
        self._jobs[plan.job] = _JobKeys(public_blob, public, frozenset(plan.sites), frozenset(inst) | {dealer})
        return self._jobs[plan.job]


__all__ = ["HEScheme", "HEConfig", "HEProtocol", "HESite", "HEStats"]

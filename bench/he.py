"""Homomorphic aggregation: packed Paillier and CKKS against plain ``phe`` (one value per ciphertext).

    .venv/bin/python bench/he.py            # 4 sites × 100,000 parameters; phe baseline on 200 values
    .venv/bin/python bench/he.py --quick    # 4 sites × 10,000 parameters; phe baseline on 40 values

Each scheme runs one full round of the real protocol (``insitu.secure.HEProtocol``: key
dealing, TRAIN with encryption at every site, homomorphic sum at the coordinator,
HE_DECRYPT at one site) over the in-process transport.  The baseline is what a
straightforward use of ``phe`` does: ``public_key.encrypt(x)`` per parameter, ``+`` of
``EncryptedNumber``s at the coordinator, ``private_key.decrypt`` per parameter; it is
measured on a slice in the same run and scaled to the full vector (its cost is linear in
the number of values).  Times are CPU seconds of this process (the machine is shared).
Target of issue 4: ≥ 50× faster than plain phe per parameter.  BENCHMARKS.md quotes
about 810 s (one value per ciphertext) and 12.5 s (≈68 values packed) to encrypt 1e5
parameters, and 0.08 s for CKKS.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from phe import paillier as phe_paillier
from rich.console import Console
from rich.table import Table

from insitu.federation.messages import Message, MessageKind
from insitu.federation.protocol import RoundPlan
from insitu.federation.transport import InProcessTransport
from insitu.secure import HEConfig, HEProtocol, HEScheme
from insitu.secure.paillier import PackedLayout


class BenchSite:
    def __init__(self, site_id, protection, vec):
        self.site_id, self.protection, self.vec = site_id, protection, vec
        self.handlers = dict(protection.handlers())
        self.cpu: dict[MessageKind, float] = {}

    def handle(self, msg: Message) -> Message:
        c0 = time.process_time()
        try:
            if msg.kind is MessageKind.TRAIN:
                meta, tensors = self.protection.protect(msg, self.vec, 1.0)
                return Message(MessageKind.TRAIN_REPLY, msg.round, msg.job, meta, tensors)
            return self.handlers[msg.kind](msg)
        finally:
            self.cpu[msg.kind] = self.cpu.get(msg.kind, 0.0) + time.process_time() - c0


def ours(scheme: HEScheme, n: int, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vecs = [rng.normal(0, 0.01, size) for _ in range(n)]
    proto = HEProtocol(HEConfig(scheme=scheme))
    sites = {f"site{i}": BenchSite(f"site{i}", proto.site_protection(f"site{i}"), vecs[i]) for i in range(n)}
    transport = InProcessTransport(sites)
    plan = RoundPlan("bench", 1, tuple(sites), size, 3600.0, 1, {}, {})
    proto.collect(plan, transport)  # round 1 includes key dealing; measure round 2
    for s in sites.values():
        s.cpu.clear()
    res = proto.collect(RoundPlan("bench", 2, tuple(sites), size, 3600.0, 1, {}, {}), transport)
    err = float(np.max(np.abs(res.total - sum(vecs))))
    st = proto.last_stats
    dec = max(s.cpu.get(MessageKind.HE_DECRYPT, 0.0) for s in sites.values())
    return {
        "encrypt_s": float(np.mean([s.cpu[MessageKind.TRAIN] for s in sites.values()])),
        "sum_s": st.server_seconds,
        "decrypt_s": dec,
        "bytes": st.ciphertext_bytes_per_site,
        "err": err,
    }


def plain_phe(n: int, slice_: int, seed: int = 0) -> dict:
    """phe as documented: one EncryptedNumber per value.  Measured on ``slice_`` values."""
    pk, sk = phe_paillier.generate_paillier_keypair(n_length=2048)
    rng = np.random.default_rng(seed)
    vecs = [rng.normal(0, 0.01, slice_) for _ in range(n)]
    c0 = time.process_time()
    encs = [[pk.encrypt(float(x)) for x in v] for v in vecs[:1]]
    enc_t = (time.process_time() - c0) / slice_
    encs += [[pk.encrypt(float(x)) for x in v] for v in vecs[1:]]
    c0 = time.process_time()
    total = encs[0]
    for e in encs[1:]:
        total = [a + b for a, b in zip(total, e)]
    sum_t = (time.process_time() - c0) / slice_
    c0 = time.process_time()
    out = np.array([sk.decrypt(c) for c in total])
    dec_t = (time.process_time() - c0) / slice_
    err = float(np.max(np.abs(out - sum(vecs))))
    return {"encrypt_per_value": enc_t, "sum_per_value": sum_t, "decrypt_per_value": dec_t, "bytes_per_value": 2 * 2048 // 8, "err": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 parameters, baseline on 40 values")
    ap.add_argument("--sites", type=int, default=4)
    args = ap.parse_args()
    size = 10_000 if args.quick else 100_000
    slice_ = 40 if args.quick else 200
    console = Console(width=200)
    base = plain_phe(args.sites, slice_)
    lay = PackedLayout(2048, HEConfig().frac_bits, HEConfig().bound, args.sites)
    console.print(f"plain phe (measured on {slice_} values): encrypt {base['encrypt_per_value'] * 1e3:.2f} ms/value, "
                  f"sum {base['sum_per_value'] * 1e6:.0f} µs/value, decrypt {base['decrypt_per_value'] * 1e3:.2f} ms/value", highlight=False)
    console.print(f"packed layout: {lay.slots} values of {lay.slot_bits} bits per 2048-bit plaintext ({args.sites} sites)", highlight=False)
    table = Table(title=f"{args.sites} sites × {size:,} parameters: CPU seconds, this run")
    for col in ("scheme", "encrypt / site s", "sum (server) s", "decrypt s", "total s", "per-param ×phe (encrypt)", "per-param ×phe (total)", "MB / site", "× float32", "max |err|"):
        table.add_column(col, justify="right")
    b_enc = base["encrypt_per_value"] * size
    b_tot = (base["encrypt_per_value"] + base["sum_per_value"] + base["decrypt_per_value"]) * size
    table.add_row("phe, 1 value/ct (scaled)", f"{b_enc:.1f}", f"{base['sum_per_value'] * size:.2f}", f"{base['decrypt_per_value'] * size:.1f}", f"{b_tot:.1f}", "1.0", "1.0",
                  f"{base['bytes_per_value'] * size / 1e6:.1f}", f"{base['bytes_per_value'] / 4:.0f}", f"{base['err']:.1e}")
    for scheme in HEScheme:
        r = ours(scheme, args.sites, size)
        tot = r["encrypt_s"] + r["sum_s"] + r["decrypt_s"]
        table.add_row(f"ours: {scheme.value}" + (" packed" if scheme is HEScheme.PAILLIER else ""), f"{r['encrypt_s']:.2f}", f"{r['sum_s']:.2f}", f"{r['decrypt_s']:.2f}", f"{tot:.2f}",
                      f"{b_enc / r['encrypt_s']:.0f}", f"{b_tot / tot:.0f}", f"{r['bytes'] / 1e6:.1f}", f"{r['bytes'] / (4 * size):.1f}", f"{r['err']:.1e}")
    console.print(table)
    console.print("target (issue 4): packed Paillier ≥ 50× faster than plain phe per parameter")


if __name__ == "__main__":
    main()

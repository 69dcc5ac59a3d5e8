"""Secure aggregation cost against plain aggregation, measured in the same run.

    .venv/bin/python bench/secagg.py            # n ∈ {4, 10, 100} × {1e5, 1e6} parameters × {0, 10, 30} % drop-outs
    .venv/bin/python bench/secagg.py --quick    # n ∈ {4, 10, 100} × 1e5 × {0, 10} %, plus two target rows
    .venv/bin/python bench/secagg.py --target   # only the target configuration, four ways

The target configuration (n = 100, 1e6, 10 %) is also run with a 32- and a 64-bit ring and
both recovery modes (two of the four with --quick) (``Recovery.SERVER``: Bonawitz, the coordinator
rebuilds every survivor's self-mask and the dropped sites' masks from shares and expands them;
``Recovery.SURVIVORS``: each survivor returns one correction vector, its self-mask plus its masks
with dropped neighbours, so the upload doubles and the server expands no mask at all).

Every configuration runs the real protocol (``insitu.secure.SecAggProtocol``) over the
in-process transport, which encodes every message as the wire would, so bytes are real.
Sites return a fixed random update (no training), so "client" is the protocol's own work per
site: key agreement, secret sharing, fixed-point encoding, mask expansion, unmasking answers.
"Server" is the coordinator's CPU time in ``collect`` with the CPU time inside
``transport.exchange`` (the sites' work and the codec) taken out; "client" is each site's
CPU time.  CPU time, not wall time, because the benchmark machine is shared: wall time
under load is printed beside it in the log lines.  Drop-outs happen
after the masks were agreed (at TRAIN), the worst case: the server must rebuild the
dropped sites' keys and regenerate their masks with every surviving neighbour.

The graph degree follows the chosen security level (σ = 40 bits) for a bad fraction of
10 % corrupted sites plus the drop-out rate.  Baseline: ``PlainProtocol`` on the same sites
(float32 updates in the clear).  Target of issue 4: server ≤ 150 ms at n = 100, 1e6
parameters, 10 % drop-outs.  BENCHMARKS.md quotes 49 ms (k-regular) / 322 ms (complete)
for n = 100 at 1e5 parameters on this kind of machine.
"""
from __future__ import annotations

import argparse
import gc
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from insitu.federation.messages import Message, MessageKind
from insitu.federation.protocol import PlainProtocol, RoundPlan
from insitu.federation.transport import InProcessTransport
from insitu.secure import Recovery, SecAggConfig, SecAggProtocol


class BenchSite:
    """A site whose update is a seeded random vector; times its own handling of every message."""

    def __init__(self, site_id: str, protection, size: int, seed: int):
        self.site_id, self.protection, self.size, self.seed = site_id, protection, size, seed
        self.handlers = dict(protection.handlers())
        self.seconds = 0.0

    def handle(self, msg: Message) -> Message:
        t0 = time.process_time()
        try:
            if msg.kind is MessageKind.TRAIN:
                vec = np.random.default_rng(self.seed).normal(0.0, 0.01, self.size)
                meta, tensors = self.protection.protect(msg, vec, 1.0)
                return Message(MessageKind.TRAIN_REPLY, msg.round, msg.job, meta, tensors)
            return self.handlers[msg.kind](msg)
        finally:
            self.seconds += time.process_time() - t0


class TimedTransport:
    """Counts the time spent inside ``exchange`` (site work + codec), to subtract it from the server's."""

    def __init__(self, inner: InProcessTransport):
        self.inner, self.seconds, self.cpu = inner, 0.0, 0.0

    def sites(self):
        return self.inner.sites()

    def exchange(self, requests, timeout):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return self.inner.exchange(requests, timeout)
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu += time.process_time() - c0


def run(protocol, n: int, size: int, drop: float, seed: int = 0) -> dict:
    ids = [f"site{i:03d}" for i in range(n)]
    gone = set(np.random.default_rng(seed + 1).choice(ids, int(round(drop * n)), replace=False).tolist())
    sites = {s: BenchSite(s, protocol.site_protection(s), size, seed * 1000 + i) for i, s in enumerate(ids)}
    transport = TimedTransport(InProcessTransport(sites, fail=lambda s, r, k: s in gone and k is MessageKind.TRAIN))
    plan = RoundPlan("bench", 1, tuple(ids), size, 3600.0, 1, {}, {})
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    res = protocol.collect(plan, transport)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    alive = [s for s in ids if s not in gone]
    expect = sum(np.random.default_rng(seed * 1000 + ids.index(s)).normal(0.0, 0.01, size) for s in alive)
    err = float(np.max(np.abs(res.total - expect)))
    return {
        "server_s": cpu - transport.cpu,
        "server_wall_s": wall - transport.seconds,
        "client_s": float(np.mean([sites[s].seconds for s in alive])),
        "client_up_bytes": float(np.mean([res.bytes_up.get(s, 0) for s in alive])),
        "server_sent_bytes": float(sum(res.bytes_down.values())),
        "max_err": err,
        "participants": len(res.participants),
        "stats": getattr(protocol, "last_stats", None),
    }


def secagg_config(n: int, drop: float, ring_bits: int, recovery: Recovery = Recovery.SERVER) -> SecAggConfig:
    bound = 1.0 if ring_bits == 32 else 2.0**20  # updates here are N(0, 0.01²), weight 1
    return SecAggConfig(ring_bits=ring_bits, bound=bound, bad_fraction=min(0.45, 0.1 + drop), recovery=recovery)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1e5 parameters and 0/10 %% drop-outs only, plus the target rows")
    ap.add_argument("--ring-bits", type=int, default=64, help="ring Z_2^k of the grid (the target row is run with 32 and 64)")
    ap.add_argument("--target", action="store_true", help="only the target configuration (n=100, 1e6, 10 %%), both rings and recovery modes")
    args = ap.parse_args()
    grid = [] if args.target else [(n, size, drop) for n in (4, 10, 100) for size in ((100_000,) if args.quick else (100_000, 1_000_000)) for drop in ((0.0, 0.1) if args.quick else (0.0, 0.1, 0.3))]
    console = Console(width=220)
    table = Table(title=f"secure aggregation vs plain, same run (ring 2^{args.ring_bits} unless noted)")
    for col in ("n", "params", "drop", "ring", "recovery", "k / t", "server CPU ms", "plain server CPU ms", "server ×plain", "client CPU ms", "client MB up", "plain MB up", "bytes ×plain", "masks regen", "max |err|"):
        table.add_column(col, justify="right")
    rows = [(n, s, d, args.ring_bits, Recovery.SERVER) for n, s, d in grid]
    target = [(100, 1_000_000, 0.1, bits, rec) for bits in (32, 64) for rec in Recovery]
    if args.quick:  # the default protocol and the fastest setting only
        target = [(100, 1_000_000, 0.1, 64, Recovery.SERVER), (100, 1_000_000, 0.1, 32, Recovery.SURVIVORS)]
    rows += [r for r in target if r not in rows]
    for n, size, drop, bits, rec in rows:
        sec = run(SecAggProtocol(secagg_config(n, drop, bits, rec)), n, size, drop)
        plain = run(PlainProtocol(), n, size, drop)
        st = sec["stats"]
        table.add_row(
            str(n), f"{size:.0e}", f"{drop:.0%}", str(bits), rec.value, f"{st.degree} / {st.threshold}",
            f"{sec['server_s'] * 1e3:.0f}", f"{plain['server_s'] * 1e3:.1f}", f"{sec['server_s'] / max(plain['server_s'], 1e-9):.1f}",
            f"{sec['client_s'] * 1e3:.0f}", f"{sec['client_up_bytes'] / 1e6:.2f}", f"{plain['client_up_bytes'] / 1e6:.2f}",
            f"{sec['client_up_bytes'] / plain['client_up_bytes']:.2f}", str(st.masks_regenerated), f"{sec['max_err']:.1e}",
        )
        console.print(f"n={n} params={size:.0e} drop={drop:.0%} ring={bits} recovery={rec.value}: server CPU {sec['server_s'] * 1e3:.0f} ms, wall {sec['server_wall_s'] * 1e3:.0f} ms "
                      f"(plain {plain['server_s'] * 1e3:.1f} ms), client {sec['client_s'] * 1e3:.0f} ms, unmask {st.unmask_seconds * 1e3:.0f} ms, "
                      f"{st.masks_regenerated} masks regenerated", highlight=False)
        del sec, plain
        gc.collect()
    console.print(table)
    console.print("target (issue 4): server ≤ 150 ms at n=100, 1e6 parameters, 10 % drop-outs; "
                  "BENCHMARKS.md: 49 ms (k-regular) … 322 ms (complete graph) at n=100, 1e5 parameters")


if __name__ == "__main__":
    main()

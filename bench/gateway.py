"""Gateway /predict throughput and latency over TLS 1.3, against baselines measured in the same run.

    .venv/bin/python bench/gateway.py            # 10 s per configuration
    .venv/bin/python bench/gateway.py --quick    # 3 s per configuration

Three servers, each a separate uvicorn process on 127.0.0.1 (one worker), driven in turn by one
load-generator process (asyncio, persistent HTTP/1.1 connections, a fixed number in flight):

* ``gateway /predict, TLS 1.3``  — the real thing: Ed25519 token check, the policy decision
  point, an audit-log append (signed, hash-chained, SQLite), validation against the model schema,
  the federated logistic regression, the model card in the reply;
* ``gateway /predict, plain HTTP`` — the same app without TLS (what TLS costs);
* ``bare FastAPI hello, TLS 1.3``  — an empty endpoint behind the same TLS stack (what the
  gateway's work costs on top of FastAPI + uvicorn + TLS).

The server and the client share the machine's 2 cores, as they would on a small site host; the
figures are requests per second and p50/p99 latency, and the ratios are ours / baseline.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

FEATURES = ("age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak",
            "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2")


# -- setup ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_site(d: Path) -> Path:
    """CA + server certificate (consortium PKI), token and audit keys, a model run dir, gateway.toml."""
    import numpy as np

    from insitu.audit.keys import write_keypair
    from insitu.federation.task import TaskSpec
    from insitu.gateway.config import GatewayConfig
    from insitu.gateway.service import keygen
    from insitu.learn.models import build_model, get_flat
    from insitu.net.pki import CertificateAuthority, Role

    ca = CertificateAuthority.init(d / "ca")
    # the PKI has no gateway role yet; the coordinator role is its TLS-server certificate profile
    ca.issue("gateway", Role.COORDINATOR, d / "tls", hosts=("127.0.0.1", "localhost"))
    run = d / "run"
    run.mkdir()
    spec = TaskSpec(model="logreg", input_shape=(13,), num_outputs=1, schema=FEATURES, lr=0.1, local_steps=5, batch_size=16)
    (run / "task.json").write_text(json.dumps(spec.to_meta()))
    np.savez(run / "model.npz", params=get_flat(build_model("logreg", (13,), 1, seed=1)))
    (run / "summary.json").write_text(json.dumps({"sites": {"a": {}, "b": {}, "c": {}, "d": {}},
                                                  "final": {"rounds_completed": 20}}))
    write_keypair(d / "keys", "gateway")
    cfg = d / "gateway.toml"
    cfg.write_text(f"""
[server]
cert = "tls/gateway.pem"
key = "tls/gateway.key"
ca = "tls/ca.pem"
client_certs = "optional"
[tokens]
issuer = "bench"
public_key = "keys/token.pub"
private_key = "keys/token.key"
[records]
url = "sqlite:///records.db"
[model]
run_dir = "run"
[audit]
path = "audit.db"
key = "keys/gateway.key"
writer = "gateway"
""")
    keygen(GatewayConfig.load(cfg))
    return cfg


# -- servers (each in its own process) ---------------------------------------------------------------
def _serve(kind: str, cfg_path: str, port: int) -> None:
    import logging

    import uvicorn
    from fastapi import FastAPI

    from insitu.gateway.app import create_app
    from insitu.gateway.config import GatewayConfig
    from insitu.gateway.service import build_gateway
    from insitu.gateway.tls import server_context, uvicorn_config

    logging.disable(logging.WARNING)
    cfg = GatewayConfig.load(cfg_path)
    ctx = server_context(cfg.cert, cfg.key, cfg.ca, cfg.client_certs)
    if kind == "hello-tls":
        app = FastAPI()

        @app.post("/predict")
        def hello() -> dict[str, str]:
            return {"hello": "world"}
    else:
        app = create_app(build_gateway(cfg))
    if kind == "gateway-http":
        ctx = None
    uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, ctx)).run()


def _wait(port: int, server, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not server.is_alive():
            raise RuntimeError(f"server for port {port} exited with code {server.exitcode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start")


# -- the load generator (its own process) -------------------------------------------------------------
async def _load(port: int, ca: str | None, token: str, body: bytes, seconds: float, warmup: float,
                concurrency: int) -> dict:
    ctx = None
    if ca:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    req = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    lat: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    t_measure, t_end = start + warmup, start + warmup + seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       server_hostname="127.0.0.1" if ctx else None)
        while True:
            t = time.perf_counter()
            if t >= t_end:
                break
            writer.write(req)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            done = time.perf_counter()
            if t >= t_measure:
                lat.append(done - t)
                statuses[status] = statuses.get(status, 0) + 1
                if status != 200:
                    errors += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": lat, "seconds": seconds, "errors": errors, "statuses": statuses}


def _client(port: int, ca: str | None, token: str, seconds: float, warmup: float, concurrency: int, q) -> None:
    body = json.dumps({"features": {f: 0.1 * i for i, f in enumerate(FEATURES)}}).encode()
    q.put(asyncio.run(_load(port, ca, token, body, seconds, warmup, concurrency)))


def _drive(kind: str, port: int, cfg: Path, token: str, seconds: float, warmup: float, concurrency: int) -> dict:
    spawn = mp.get_context("spawn")
    q = spawn.Queue()
    ca = None if kind == "gateway-http" else str(cfg.parent / "tls" / "ca.pem")
    client = spawn.Process(target=_client, args=(port, ca, token, seconds, warmup, concurrency, q))
    client.start()
    res = q.get(timeout=seconds + warmup + 120)
    client.join()
    return res


def _summary(kind: str, runs: list[dict]) -> dict:
    """Median over interleaved rounds of requests/s; latency percentiles over all measured requests."""
    lat = sorted(x for r in runs for x in r["latencies"])
    n = len(lat)
    statuses: dict[int, int] = {}
    for r in runs:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "kind": kind, "requests": n, "rps": statistics.median(len(r["latencies"]) / r["seconds"] for r in runs),
        "rps_rounds": [len(r["latencies"]) / r["seconds"] for r in runs],
        "errors": sum(r["errors"] for r in runs), "statuses": statuses,
        "p50_ms": 1000 * lat[n // 2] if n else float("nan"),
        "p99_ms": 1000 * lat[min(n - 1, int(n * 0.99))] if n else float("nan"),
    }


KINDS = ("gateway-tls", "gateway-http", "hello-tls")


def measure_all(cfg: Path, token: str, seconds: float, warmup: float, concurrency: int, rounds: int) -> list[dict]:
    """Start the three servers once, then drive them in turn, round after round (load drifts cancel out)."""
    spawn = mp.get_context("spawn")
    ports = {k: _free_port() for k in KINDS}
    servers = [spawn.Process(target=_serve, args=(k, str(cfg), ports[k]), daemon=True) for k in KINDS]
    for s in servers:
        s.start()
    try:
        for k, server in zip(KINDS, servers):
            _wait(ports[k], server)
        time.sleep(0.5)
        runs: dict[str, list[dict]] = {k: [] for k in KINDS}
        for _ in range(rounds):
            for k in KINDS:
                runs[k].append(_drive(k, ports[k], cfg, token, seconds, warmup, concurrency))
    finally:
        for s in servers:
            s.terminate()
            s.join(10)
    return [_summary(k, runs[k]) for k in KINDS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 3 s per configuration instead of 3 of 10 s")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per configuration")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (persistent connections)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    warmup = 1.0 if args.quick else 2.0

    from insitu.gateway.config import GatewayConfig
    from insitu.gateway.service import issue_token

    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_site(Path(tmp))
        token = issue_token(GatewayConfig.load(cfg), "bench-agent", "ai-model", dt.timedelta(hours=1))
        rounds = args.rounds or (2 if args.quick else 3)
        load_before = os.getloadavg()[0]
        rows = measure_all(cfg, token, seconds, warmup, args.concurrency, rounds)
        load_after = os.getloadavg()[0]
        from insitu.audit import AuditLog
        from insitu.audit.keys import load_public_keys

        log = AuditLog.read(Path(tmp) / "audit.db")
        audited = log.head().seq
        ok = log.verify(load_public_keys(Path(tmp) / "keys")).ok

    names = {"gateway-tls": "gateway /predict, TLS 1.3", "gateway-http": "gateway /predict, plain HTTP (baseline)",
             "hello-tls": "bare FastAPI hello, TLS 1.3 (baseline)"}
    ours = rows[0]
    print(f"\n/predict, {os.cpu_count()} cores shared by server and client, {args.concurrency} in flight, "
          f"{rounds} interleaved rounds of {seconds:.0f} s (+{warmup:.0f} s warm-up) per configuration; "
          f"req/s is the median round; 1-min load average {load_before:.1f} before, {load_after:.1f} after")
    print(f"{'configuration':44s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'ours/baseline req/s':>20s}")
    for r in rows:
        ratio = "" if r is ours else f"{ours['rps'] / r['rps']:.2f}x"
        print(f"{names[r['kind']]:44s} {r['rps']:8.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {ratio:>20s}")
        if r["errors"]:
            print(f"  non-200 responses: {r['statuses']}")
    print(f"audit log: {audited} entries written by the gateway runs (one per request, warm-up included), chain verifies: {ok}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "seconds": seconds, "concurrency": args.concurrency,
                                         "rounds": rounds, "audit_entries": audited, "audit_verifies": ok}, indent=2))


if __name__ == "__main__":
    sys.exit(main())

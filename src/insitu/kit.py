"""``insitu kit``: a whole consortium's start-up kit in one command (CA, certificates, every config).

For N named hospitals the kit holds one directory per party, each self-contained so that it can
be copied to the machine that runs it (every path in a config is relative to the config file)::

    DIR/README.txt                      what goes where, and the commands to start everything
    DIR/ca/                             the root CA: ca.key stays with the consortium admin, offline
    DIR/coordinator/coordinator.toml    + pki/ (coordinator certificate and key, ca.pem, crl.pem), keys/ (audit key)
    DIR/operator/operator.toml          + pki/ (operator certificate and key, ca.pem)
    DIR/operator/job.toml               an example heart job over the kit's hospitals
    DIR/sites/NAME/site.toml            + pki/ (the hospital's certificate and key, ca.pem)
    DIR/gateway/gateway.toml            + tls/ (gateway server certificate), keys/ (token and audit keys)

Every configuration file is a commented template: each key says what it does and what else it
may be.  Certificates carry their role (site, operator, coordinator, gateway); the gateway's is a
``gateway`` TLS-server certificate, which sites refuse as a coordinator.  Private keys are 0600.

The kit makes every key itself (convenient for a trial or a single organisation).  Hospitals
that want their key never to leave their machine replace their ``pki/`` with
``insitu ca csr`` / ``insitu ca sign`` (see the README of the kit).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from insitu.errors import ConfigError
from insitu.net.pki import CertificateAuthority, Role, _check_name

HEART_HOSPITALS = ("cleveland", "hungary", "switzerland", "va-long-beach")


@dataclass(frozen=True)
class Kit:
    """Where :func:`write_kit` put each party's directory and configuration."""

    root: Path
    ca: Path
    coordinator: Path  # coordinator.toml
    operator: Path  # operator.toml
    job: Path  # job.toml
    sites: dict[str, Path]  # name → site.toml
    gateway: Path  # gateway.toml


def _host_port(coordinator: str) -> tuple[str, int]:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator must be HOST:PORT (e.g. coord.example.org:8443), got {coordinator!r}")
    return host, int(port)


def write_kit(out: str | Path, sites: list[str] | tuple[str, ...], *, coordinator: str = "127.0.0.1:8443", operator: str = "ops",
              gateway: str = "gateway", gateway_host: str = "127.0.0.1", gateway_port: int = 8444, dashboard_port: int = 8445,
              days: int = 365) -> Kit:
    """Write the kit for ``sites`` under ``out`` (which must not exist or be empty)."""
    root = Path(out)
    sites = tuple(sites)
    if not sites:
        raise ConfigError("name at least one hospital, e.g. `insitu kit cleveland hungary --out kit/`")
    for name in (*sites, operator, gateway):
        _check_name(name)
    dup = sorted({s for s in sites if sites.count(s) > 1} | ({operator, gateway, "coordinator"} & set(sites)))
    if dup or operator == gateway or "coordinator" in (operator, gateway):
        raise ConfigError(f"party names must be distinct (and not 'coordinator'): {dup or [operator, gateway]}")
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} exists and is not empty; choose a new --out (a kit never overwrites keys)")
    host, port = _host_port(coordinator)
    hosts = tuple(dict.fromkeys((host, "localhost", "127.0.0.1")))
    ca = CertificateAuthority.init(root / "ca")
    co = root / "coordinator"
    ca.issue("coordinator", Role.COORDINATOR, co / "pki", days=days, hosts=hosts)
    shutil.copy(root / "ca" / "crl.pem", co / "pki" / "crl.pem")
    listen = "127.0.0.1" if host in ("127.0.0.1", "localhost", "::1") else "0.0.0.0"
    (co / "coordinator.toml").write_text(COORDINATOR_TOML.format(port=port, listen=listen, host=host, dashboard_port=dashboard_port))
    from insitu.audit.keys import write_keypair

    write_keypair(co / "keys", "coordinator")
    op = root / "operator"
    ca.issue(operator, Role.OPERATOR, op / "pki", days=days)
    (op / "operator.toml").write_text(OPERATOR_TOML.format(coordinator=f"{host}:{port}", name=operator))
    (op / "job.toml").write_text(JOB_TOML.format(sites=", ".join(f'"{s}"' for s in sites), min_sites=min(len(sites), 2)))
    site_paths = {}
    for s in sites:
        d = root / "sites" / s
        ca.issue(s, Role.SITE, d / "pki", days=days)
        data = (HEART_DATA.format(name=s) if s in HEART_HOSPITALS else CSV_DATA.format(name=s))
        (d / "site.toml").write_text(SITE_TOML.format(coordinator=f"{host}:{port}", name=s, data=data))
        site_paths[s] = d / "site.toml"
    gw = root / "gateway"
    gw_hosts = tuple(dict.fromkeys((gateway_host, "localhost", "127.0.0.1")))
    ca.issue(gateway, Role.GATEWAY, gw / "tls", days=days, hosts=gw_hosts)
    from insitu.gateway.tokens import generate_keypair

    write_keypair(gw / "keys", gateway)
    generate_keypair(gw / "keys" / "token.key", gw / "keys" / "token.pub")
    (gw / "gateway.toml").write_text(GATEWAY_TOML.format(host=gateway_host, port=gateway_port, name=gateway))
    (root / "README.txt").write_text(README.format(sites=" ".join(sites), first=sites[0], root=root.name, operator=operator))
    return Kit(root, root / "ca", co / "coordinator.toml", op / "operator.toml", op / "job.toml", site_paths, gw / "gateway.toml")


COORDINATOR_TOML = """\
# coordinator.toml: `insitu coordinator serve --config coordinator.toml`
# Paths are relative to this file.  The coordinator listens on one TLS 1.3 port that sites and
# operators dial; it refuses TLS 1.2, clients without a certificate from the consortium CA, and
# expired or revoked certificates.
[coordinator]
host = "{listen}"                      # interface to listen on ("127.0.0.1": this machine only; "0.0.0.0": all)
port = {port}                          # the port in every site.toml and operator.toml; 0 = any free port
# port_file = "coordinator.port"       # with port = 0: where the chosen port is written
cert = "pki/coordinator.pem"           # role "coordinator"; its SAN lists the host names sites dial
key = "pki/coordinator.key"
ca = "pki/ca.pem"                      # the consortium root: only certificates it issued get in
crl = "pki/crl.pem"                    # revocation list: copy the CA's crl.pem here after `insitu ca revoke`
                                       #   (reloaded when it changes; it expires after 30 days: `insitu ca crl`)
db = "coordinator.db"                  # jobs, rounds and model versions (SQLite); a restart resumes from it
heartbeat = 2.0                        # seconds between heart-beats on an idle site channel
dead_after = 10.0                      # a site silent this long is dropped (it reconnects on its own)

[dashboard]                            # the operators' web page (TLS 1.3, its own port); delete the table to turn it off
host = "{listen}"
port = {dashboard_port}
# public_url = "https://{host}:{dashboard_port}"   # what `insitu coordinator login` links point at
login_ttl = 120                        # seconds a login link stays valid (it works once)
session_ttl = 28800                    # seconds a browser session lasts
audit_log = "audit.db"                 # the coordinator's audit chain: every model release, signed
audit_key = "keys/coordinator.key"     # its Ed25519 key (coordinator.pub beside it verifies the chain)
"""

OPERATOR_TOML = """\
# operator.toml: the operator's credentials for `insitu job ... --config operator.toml`
# (submit, status, logs, model, cancel) and `insitu sites`.  Only an "operator" certificate may run jobs.
[operator]
coordinator = "{coordinator}"          # HOST:PORT of the coordinator (must match a name in its certificate)
cert = "pki/{name}.pem"
key = "pki/{name}.key"                 # keep private (0600)
ca = "pki/ca.pem"                      # trust only the consortium CA
"""

JOB_TOML = """\
# job.toml: `insitu job submit job.toml --config operator.toml`
# The options are those of `insitu simulate` (`--secure-aggregation` is secure_aggregation = true),
# parsed into the same plan.  The plan (model, schema, hyper-parameters, strategy, protection, DP)
# has a content hash (`insitu job hash job.toml`) that each site's admin approves; the job waits for
# their approvals up to approval_timeout, naming the sites it waits for.
name = "heart-fedavg"                  # job name; free again once the job has ended
dataset = "heart"                      # the task from the embedded heart dataset's schema and defaults
strategy = "fedavg"                    # fedavg | fedprox | fedadam | fedyogi | fedadagrad | scaffold
rounds = 20
seed = 0                               # the initial model
min_sites = {min_sites}                # a round needs this many sites; fewer and it is aborted
# model = "mlp"                        # a built-in model: logreg | mlp | cnn | lstm | grud (default: the dataset's) ...
# model_spec = "my_model.json"         # ... or your own layers (insitu.learn.spec); `job submit` sends the file's layers
# lr = 0.05                            # the sites' learning rate (default: the dataset's)
# local_steps = 50
secure_aggregation = false             # true: pairwise masks, the coordinator learns only the sum
# homomorphic = "paillier"             # or "ckks": a homomorphic sum instead
# update_norm_factor = 50.0            # plain rounds: refuse a site's update longer than this x the round's median
# max_site_records = 100000            # plain rounds: refuse a site claiming more training records (default 10^9)
# dp = "record"                        # DP-SGD at every site (part of the plan and its hash); each site
# noise_multiplier = 1.5               #   computes its own ε and refuses a round past its budget
# clip = 1.0

# deployment only
sites = [{sites}]                      # optional: only these sites (default: every connected site)
round_timeout = 60.0                   # seconds a round waits for the sites' updates
wait_for_sites = 60.0                  # seconds a round waits for min_sites to be connected
approval_timeout = 1800.0              # seconds to wait for approvals before round one (0: do not wait)
# exclude_after = 3                    # leave out a site named as the cause of this many aborted rounds or refused updates (0: never)
"""

HEART_DATA = """\
[data]
source = "heart"                       # the embedded UCI heart-disease hospitals (for a trial) ...
hospital = "{name}"                    # cleveland | hungary | switzerland | va-long-beach
# source = "csv"                       # ... or this hospital's own records:
# train = "data/train.csv"             #   one row per record, numeric features, a label column
# test = "data/test.csv"
# label = "label"
"""

CSV_DATA = """\
[data]
source = "csv"                         # this hospital's own records (numeric features, a label column)
train = "data/train.csv"
test = "data/test.csv"
label = "label"
# source = "heart"                     # or, for a trial, one of the embedded heart hospitals:
# hospital = "cleveland"
"""

SITE_TOML = """\
# site.toml: `insitu site serve --config site.toml` at hospital {name}.
# The site dials out to the coordinator (no inbound port), runs only tasks its admin approved,
# and keeps its approvals, refusals and privacy ledger in `state`.
[site]
coordinator = "{coordinator}"          # HOST:PORT the site dials
cert = "pki/{name}.pem"                # role "site"; the coordinator knows this site by the certificate's name
key = "pki/{name}.key"                 # never leaves this machine (0600)
ca = "pki/ca.pem"
state = "state"                        # approvals.json, pending.json, refusals.jsonl, privacy_ledger.sqlite
# heartbeat = 2.0                      # seconds between heart-beats
# dead_after = 10.0                    # reconnect when the coordinator is silent this long

{data}
[policy]
approved = []                          # task hashes approved here; easier: `insitu site pending`, then
                                       #   `insitu site approve ID` (takes effect without a restart)
min_secagg_group = 0                   # >= 2: send updates only masked (secure aggregation) among that many sites
# max_params = 1000000                 # build no model (built-in or a job's own specification) with more parameters
# epsilon_budget = 3.0                 # set a budget and only record-level DP tasks run, each round charged to
# delta = 1e-5                         #   this site's own ledger before training, until the next would pass it
# [policy.ranges]                      # limits every task must meet, approved or not
# local_steps = [1, 500]
# lr = [1e-5, 1.0]
"""

GATEWAY_TOML = """\
# gateway.toml: `insitu gateway serve --config gateway.toml`
# HTTPS (TLS 1.3 only) access to the hospital's records and to the federated model, by role.
[server]
host = "{host}"
port = {port}
cert = "tls/{name}.pem"                # role "gateway": a TLS-server certificate from the consortium CA
key = "tls/{name}.key"
ca = "tls/ca.pem"                      # verifies client certificates (agents, staff) from the consortium CA
client_certs = "optional"              # optional | required | none (tokens only)

[tokens]
issuer = "{name}"
public_key = "keys/token.pub"          # the gateway needs only this one
private_key = "keys/token.key"         # for `insitu gateway token`; keep it off the gateway host
max_ttl = "12h"

[records]
url = "sqlite:///records.db"           # or postgresql://user:pw@host/db; fill with `insitu gateway import-records`
# schema = "schema.toml"               # the consortium's record schema; without it, the built-in demonstration record

[model]
run_dir = "model"                      # `insitu job model NAME --out model` (or an `insitu simulate` run)

[audit]
path = "audit.db"                      # every access decision, hash-chained and signed
key = "keys/{name}.key"
writer = "{name}"

[policy]
timezone = "UTC"                       # shifts in rules are local times of this zone

# [[mtls.clients]]                     # client-certificate name → gateway role
# cn = "agent-triage"
# role = "ai-model"                    # doctor | nurse | ai-model
"""

README = """\
insitu consortium kit for: {sites}

Copy each directory to the machine that runs it; paths inside are relative to each config.

  ca/            the root CA.  ca.key signs every certificate: keep it offline, with the admin.
  coordinator/   insitu coordinator serve --config coordinator/coordinator.toml
                 (its dashboard: `insitu coordinator login --config operator/operator.toml` prints a login link)
  operator/      insitu job submit operator/job.toml --config operator/operator.toml
                 insitu job status heart-fedavg --watch --config operator/operator.toml
                 insitu job model heart-fedavg --out model --config operator/operator.toml
  sites/NAME/    insitu site serve --config sites/NAME/site.toml     (one per hospital)
                 insitu site pending --config sites/NAME/site.toml   then  insitu site approve ID ...
  gateway/       insitu gateway serve --config gateway/gateway.toml  (after `insitu job model ... --out gateway/model`)

To try everything on one machine, start the coordinator, then each site, e.g.
  insitu site serve --config sites/{first}/site.toml

A hospital that wants its private key never to leave its machine replaces sites/NAME/pki with:
  insitu ca csr --name NAME --out pki/           (at the hospital)
  insitu ca sign pki/NAME.csr --role site --ca ca/   (at the CA; send back NAME.pem and ca.pem)

Revoking: insitu ca revoke --ca ca/ --name NAME, then copy ca/crl.pem to coordinator/pki/crl.pem.
"""

__all__ = ["write_kit", "Kit"]

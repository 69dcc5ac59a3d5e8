"""``insitu ca``: the consortium's certificate authority (init, issue, csr, sign, revoke, list)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from insitu.net import pki

app = typer.Typer(help="Consortium PKI: one root CA; certificates carry a role (site, operator, coordinator); revocation by CRL.", no_args_is_help=True)
out = Console()

CA_DIR = typer.Option(Path("ca"), "--ca", help="CA directory (holds ca.pem, ca.key, crl.pem, index.json).")


@app.command("init")
def init(out_dir: Path = typer.Option(..., "--out", "-o", help="Directory for the new CA; refuses to overwrite an existing key."),
         name: str = typer.Option("insitu consortium root", help="The CA's common name."),
         days: int = typer.Option(3650, help="Validity of the root certificate in days.")) -> None:
    """Create the consortium root CA and publish an empty revocation list."""
    ca = pki.CertificateAuthority.init(out_dir, name=name, days=days)
    out.print(f"root CA written to {ca.dir} (ca.pem to distribute; ca.key stays offline)")


@app.command("issue")
def issue(name: str = typer.Option(..., help="Party name, becomes the certificate CN (e.g. hospital-a)."),
          role: pki.Role = typer.Option(..., help="site, operator, coordinator or gateway."),
          out_dir: Path = typer.Option(..., "--out", "-o", help="Where to write NAME.key, NAME.pem and ca.pem."),
          ca_dir: Path = CA_DIR, days: int = typer.Option(365, help="Validity in days."),
          host: list[str] = typer.Option(["localhost", "127.0.0.1"], help="Coordinator and gateway only: DNS names / IPs clients dial (repeat).")) -> None:
    """Issue a key and certificate in one step (for parties that let the CA make their key)."""
    creds = pki.CertificateAuthority(ca_dir).issue(name, role, out_dir, days=days, hosts=tuple(host))
    out.print(f"{role.value} certificate for {name}: {creds.cert} (key {creds.key})")


@app.command("csr")
def csr(name: str = typer.Option(..., help="Party name (CN)."), out_dir: Path = typer.Option(..., "--out", "-o")) -> None:
    """Make a key and a certificate signing request; the key never leaves this machine. Refuses to overwrite an existing key."""
    req, key = pki.create_csr(name, out_dir)
    out.print(f"CSR {req} (key {key}); send the CSR to the CA: insitu ca sign {req} --role ROLE")


@app.command("sign")
def sign(csr_path: Path = typer.Argument(..., help="The party's .csr file."),
         role: pki.Role = typer.Option(..., help="Role the CA grants (the CSR cannot choose it)."),
         out_path: Path = typer.Option(None, "--out", "-o", help="Certificate file (default: NAME.pem beside the CSR)."),
         ca_dir: Path = CA_DIR, days: int = typer.Option(365),
         host: list[str] = typer.Option(["localhost", "127.0.0.1"], help="Coordinator and gateway only: DNS names / IPs clients dial (repeat).")) -> None:
    """Sign a certificate signing request for a role."""
    ca = pki.CertificateAuthority(ca_dir)
    cert = ca.sign(pki.load_csr(csr_path), role, days=days, hosts=tuple(host))
    from cryptography.hazmat.primitives import serialization

    target = out_path or csr_path.with_suffix(".pem")
    target.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (target.parent / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    out.print(f"signed {role.value} certificate: {target}")


@app.command("revoke")
def revoke(name: str = typer.Option(..., help="Party whose certificates to revoke."), ca_dir: Path = CA_DIR) -> None:
    """Revoke every certificate of NAME and republish crl.pem (the coordinator reloads it)."""
    serials = pki.CertificateAuthority(ca_dir).revoke(name)
    out.print(f"revoked {len(serials)} certificate(s) of {name}; CRL republished at {ca_dir / 'crl.pem'}")


@app.command("crl")
def crl(ca_dir: Path = CA_DIR) -> None:
    """Re-sign and republish crl.pem before it expires (it is valid 30 days; an expired CRL makes
    the coordinator refuse every handshake, which fails closed)."""
    path = pki.CertificateAuthority(ca_dir).publish_crl()
    out.print(f"revocation list republished at {path}")


@app.command("list")
def list_(ca_dir: Path = CA_DIR) -> None:
    """Certificates this CA issued, with role, expiry and revocation."""
    t = Table("name", "role", "serial", "not after", "revoked")
    for e in pki.CertificateAuthority(ca_dir).issued():
        t.add_row(e["name"], e["role"], e["serial"][:12] + "…", e["not_after"][:19], e["revoked"] or "")
    out.print(t)

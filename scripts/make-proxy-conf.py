#!/usr/bin/env python3
"""nginx configuration for the SuperLink's proxy, without Docker (the compose
files let the nginx image fill in the same templates, docker/nginx/*.template).

Flower 1.42 serves the SuperLink's Fleet, Control and Runtime APIs on one
host:port and has no account authentication (OIDC is a Flower Enterprise
feature), so the SuperLink listens only on an internal address and nginx
splits it: a client-facing listener that forwards only the Fleet API, and an
operator listener that forwards only the Control API. TLS on every leg.

  scripts/make-proxy-conf.py -o DIR --upstream 127.0.0.1:9091 \\
      --fleet-listen 203.0.113.10:9092 --control-listen 127.0.0.1:9093 --control-allow 127.0.0.1 \\
      --cert certs/superlink.crt --key certs/superlink.key --ca certs/ca.crt

  DIR/fleet.conf, DIR/control.conf  server blocks: put them in nginx's http {} (Debian:
                                    /etc/nginx/conf.d/), or
  DIR/nginx.conf                    a whole configuration using both: nginx -p DIR -c DIR/nginx.conf

--control-allow may be given several times (addresses or CIDRs that may use the
Control API); --tls-name is the name the proxy expects in the SuperLink's
certificate (default: superlink). --fleet-only / --control-only write one half.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[1] / "docker" / "nginx"
HALVES = ("fleet", "control")


def template_vars(text: str) -> set[str]:
    """The ${NAME}s of a template (nginx's own $variables have no braces there)."""
    return set(re.findall(r"\$\{(\w+)\}", text))


def render(text: str, values: dict[str, str]) -> str:
    """Fill in a template like the nginx image's envsubst; every ${NAME} must be given."""
    missing = template_vars(text) - set(values)
    if missing:
        raise KeyError(f"no value for {', '.join(sorted(missing))}")
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def main_conf(out: Path, includes: list[Path], foreground: bool) -> str:
    """A self-contained nginx.conf (pid, logs, temp files in ``out``)."""
    head = "daemon off;\nmaster_process off;\n" if foreground else ""
    temp = "".join(f"    {k}_temp_path {out / 'tmp' / k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    inc = "".join(f"    include {p};\n" for p in includes)
    return (
        f"{head}worker_processes 1;\npid {out / 'nginx.pid'};\nerror_log {out / 'error.log'} notice;\n"
        f"events {{\n    worker_connections 256;\n}}\n"
        f"http {{\n    access_log {out / 'access.log'};\n{temp}{inc}}}\n"
    )


def write(out: Path, values: dict[str, str], halves=HALVES, foreground: bool = False) -> Path:
    """Render the templates into ``out``; return the path of its nginx.conf."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tmp").mkdir(exist_ok=True)
    written = []
    for half in halves:
        path = out / f"{half}.conf"
        path.write_text(render((TEMPLATES / f"{half}.conf.template").read_text(), values))
        written.append(path)
    conf = out / "nginx.conf"
    conf.write_text(main_conf(out, written, foreground))
    return conf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", required=True, type=Path)
    p.add_argument("--upstream", required=True, help="host:port where the SuperLink listens (flower-superlink --host/--port)")
    p.add_argument("--tls-name", default="superlink", help="a DNS name or IP in the SuperLink's certificate")
    p.add_argument("--fleet-listen", default="9092", help="[address:]port for SuperNodes (client hosts)")
    p.add_argument("--control-listen", default="127.0.0.1:9093", help="[address:]port for the operator's flwr CLI")
    p.add_argument("--control-allow", action="append", help="address/CIDR allowed on the Control listener (default 127.0.0.1)")
    p.add_argument("--cert", required=True, help="certificate the proxy presents (every name clients and the operator use)")
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True, help="CA that signed the SuperLink's certificate")
    p.add_argument("--fleet-only", action="store_true")
    p.add_argument("--control-only", action="store_true")
    p.add_argument("--foreground", action="store_true", help="nginx.conf runs as one foreground process (tests)")
    a = p.parse_args(argv)
    allow = a.control_allow or ["127.0.0.1"]
    values = {
        "SUPERLINK_UPSTREAM": a.upstream,
        "SUPERLINK_TLS_NAME": a.tls_name,
        "FLEET_LISTEN": a.fleet_listen,
        "CONTROL_LISTEN": a.control_listen,
        # One `allow` per address: the template says `allow ${CONTROL_ALLOW};`.
        "CONTROL_ALLOW": ";\n    allow ".join(allow),
        "TLS_CERT": str(Path(a.cert).resolve()),
        "TLS_KEY": str(Path(a.key).resolve()),
        "TLS_CA": str(Path(a.ca).resolve()),
    }
    halves = ("fleet",) if a.fleet_only else ("control",) if a.control_only else HALVES
    conf = write(a.out.resolve(), values, halves, a.foreground)
    print(f"wrote {', '.join(f'{h}.conf' for h in halves)} and {conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

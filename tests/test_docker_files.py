"""Static checks of docker/ (Docker cannot run on these machines): the compose
files parse and point at files and build contexts that exist (or that
scripts/deploy-docker-setup.sh creates), the Dockerfiles build on the official
Flower images and start installed commands, every flag given to a Flower
command is one the installed CLI knows, the secure files are secure and the
insecure one says so, and deployment secrets / private data stay out of the
app bundle that `flwr run .` sends to every node.

Control plane: the SuperLink publishes nothing in the secure files; nginx
proxies (docker/nginx/*.template) give client hosts the Fleet API only and the
operator the Control API only, never on all interfaces. The templates are run
here for real (nginx -t, then nginx in front of a stand-in SuperLink)."""

from __future__ import annotations

import io
import json
import os
import re
import runpy
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from flwr.common.config import parse_config_args

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
SECURE = ("compose.yml", "server.compose.yml", "client.compose.yml")
ALL = (*SECURE, "compose.insecure.yml")
FLOWER_CLIS = ("flower-superlink", "flower-supernode", "flower-superexec")
SERVER_SIDE = ("compose.yml", "server.compose.yml")  # files with a SuperLink behind the proxies
TEMPLATES = {"fleet": DOCKER / "nginx" / "fleet.conf.template", "control": DOCKER / "nginx" / "control.conf.template"}
REFUSED = "Refused by the SuperLink proxy"


def _example_env() -> dict[str, str]:
    lines = (DOCKER / "client.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, from ``env``."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env:
            return env[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} is required and unset: {arg}")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value)


def _load(name: str, env: dict[str, str] | None = None) -> dict:
    doc = yaml.safe_load((DOCKER / name).read_text())
    env = _example_env() if env is None else env

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return _interpolate(x, env) if isinstance(x, str) else x

    return walk(doc)


def _dockerfile(service: dict, base: Path = DOCKER) -> Path:
    build = service["build"]
    return (base / build["context"]).resolve() / build["dockerfile"]


def _entrypoint(dockerfile: Path) -> list[str]:
    (line,) = [x for x in dockerfile.read_text().splitlines() if x.startswith("ENTRYPOINT")]
    return yaml.safe_load(line.split(None, 1)[1])  # exec form: a JSON list


def _cli(service: dict) -> str:
    return _entrypoint(_dockerfile(service))[0] if "build" in service else ""


def _flower(services: dict) -> dict:
    """The services that run a Flower command (built from docker/*.Dockerfile)."""
    return {n: s for n, s in services.items() if "build" in s}


def _proxy_half(service: dict) -> str | None:
    """'fleet' or 'control' for an nginx proxy service (by the template it mounts), else None."""
    for src, dst in _bind_mounts(service):
        for half, path in TEMPLATES.items():
            if (DOCKER / src).resolve() == path:
                assert dst == "/etc/nginx/templates/default.conf.template", "replaces the image's default server (port 80)"
                return half
    return None


def _published(service: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port; address '' means all interfaces."""
    out = []
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        assert len(parts) in (2, 3) and "-" not in spec and "/" not in spec, f"unexpected port syntax {spec!r}"
        ip = parts[0] if len(parts) == 3 else ""
        out.append((ip, int(parts[-2]), int(parts[-1])))
    return out


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    out = []
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith((".", "/")):
            out.append((src, dst))
    return out


def _flag(service: dict, name: str) -> str | None:
    for arg in service.get("command", []):
        if arg == name or arg.startswith(name + "="):
            return arg.split("=", 1)[1] if "=" in arg else ""
    return None


@pytest.mark.parametrize("name", ALL)
def test_compose_file_parses_and_builds_from_existing_files(name):
    services = _load(name)["services"]
    assert services
    for sname, s in services.items():
        if "build" not in s:  # the proxies: the official nginx image and a template of docker/nginx/
            assert s["image"].startswith("nginx:") and _proxy_half(s), f"{name}: {sname} is neither Flower nor a proxy"
            for src, _ in _bind_mounts(s):
                assert not Path(src).is_absolute()
            continue
        dockerfile = _dockerfile(s)
        assert dockerfile.parent.is_dir() and dockerfile.is_file(), f"{name}: {sname} builds from a missing {dockerfile}"
        # BuildKit reads <Dockerfile>.dockerignore: the context never ships .venv, keys or data.
        assert Path(f"{dockerfile}.dockerignore").is_file(), f"{dockerfile.name} has no .dockerignore"
        assert _cli(s) in FLOWER_CLIS
        for src, _ in _bind_mounts(s):
            assert not Path(src).is_absolute(), f"{name}: {sname} mounts an absolute host path {src}"
    for vol in (v.split(":")[0] for s in services.values() for v in s.get("volumes", [])):
        if not vol.startswith((".", "/")):
            assert vol in _load(name)["volumes"], f"{name}: named volume {vol} is not declared"


def _console_scripts() -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.distribution("flwr").entry_points if ep.group == "console_scripts"}


@pytest.mark.parametrize("image", ["superlink", "supernode", "superexec"])
def test_dockerfile_builds_on_the_official_image_and_starts_an_installed_command(image):
    path = DOCKER / f"{image}.Dockerfile"
    text = path.read_text()
    version = metadata.version("flwr")
    assert f"ARG FLWR_VERSION={version}" in text, "images pinned to the installed Flower version"
    assert re.search(rf"^FROM flwr/{image}:\$\{{FLWR_VERSION\}}$", text, re.M)
    entry = _entrypoint(path)
    assert entry == [f"flower-{image}"] and entry[0] in _console_scripts()
    assert (BIN / entry[0]).is_file()
    # What the images COPY exists and is let through their .dockerignore.
    ignore = Path(f"{path}.dockerignore").read_text()
    for line in text.splitlines():
        if line.startswith("COPY"):
            for src in [a for a in shlex.split(line)[1:-1] if not a.startswith("--")]:
                assert (ROOT / src).exists(), f"{path.name} copies a missing {src}"
                assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded by {path.name}.dockerignore"


def test_superexec_image_installs_cpu_torch_by_default_with_a_cuda_option():
    text = (DOCKER / "superexec.Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    for name in SECURE + ("compose.insecure.yml",):
        for s in _flower(_load(name)["services"]).values():
            if _cli(s) == "flower-superexec":
                assert s["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_image_requirements_are_the_apps_without_the_simulation_extra():
    sys.path.insert(0, str(DOCKER))
    try:
        from requirements import requirements
    finally:
        sys.path.remove(str(DOCKER))
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    got = requirements(str(ROOT / "pyproject.toml"))
    assert len(got) == len(declared) and not any("[simulation]" in r for r in got)
    assert any(r.startswith("flwr>=") for r in got) and any(re.match(r"torch>=", r) for r in got)


def _parser(cli: str):
    """The installed command's own argument parser (Flower 1.42 internals; flwr is pinned)."""
    if cli == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as make
    elif cli == "flower-supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as make
    else:
        from flwr.supercore.cli.flower_superexec import _parse_args as make
    return make()


@pytest.mark.parametrize("name", ALL)
def test_every_command_parses_with_the_installed_flower_cli(name):
    for sname, s in _flower(_load(name)["services"]).items():
        parser = _parser(_cli(s))
        parser.exit_on_error = False
        try:
            args = parser.parse_args(s["command"])
        except (SystemExit, Exception) as e:  # argparse exits on an unknown flag or a bad value
            pytest.fail(f"{name}: {sname}: {_cli(s)} rejects {s['command']}: {e!r}")
        if hasattr(args, "isolation"):
            assert args.isolation == "process", f"{name}: {sname}"


@pytest.mark.parametrize("name", SECURE)
def test_secure_files_use_tls_and_node_authentication(name):
    for sname, s in _flower(_load(name)["services"]).items():
        cli, cmd = _cli(s), s["command"]
        assert "--insecure" not in cmd, f"{name}: {sname}"
        if cli == "flower-superlink":
            assert _flag(s, "--enable-supernode-auth") == ""
            assert all(_flag(s, f) for f in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"))
            assert _flag(s, "--isolation") == "process" and _flag(s, "--database")
        elif cli == "flower-supernode":
            assert all(_flag(s, f) for f in ("--root-certificates", "--auth-supernode-private-key", "--ssl-certfile"))
            assert _flag(s, "--isolation") == "process"
        else:
            assert _flag(s, "--root-certificates")
            assert _flag(s, "--runtime-api-address")


def test_insecure_file_is_labelled_and_explicit():
    text = (DOCKER / "compose.insecure.yml").read_text()
    assert text.startswith("# !!! INSECURE: NO TLS, NO SUPERNODE AUTHENTICATION !!!")
    services = _load("compose.insecure.yml")["services"]
    assert _flower(services) == services, "no proxy in the insecure file"
    for sname, s in services.items():
        assert "--insecure" in s["command"], sname


@pytest.mark.parametrize("name", ["compose.yml", "compose.insecure.yml"])
def test_each_node_reads_its_own_data_in_its_clientapp_container(name):
    services = _load(name)["services"]
    nodes = sorted(n for n, s in _flower(services).items() if _cli(s) == "flower-supernode")
    assert len(nodes) == 3
    data_dirs = set()
    for node in nodes:
        assert parse_config_args([_flag(services[node], "--node-config")]) == {"data-path": "/data"}
        assert not [m for m in _bind_mounts(services[node]) if m[1] == "/data"], "the SuperNode itself needs no data"
        i = node.rsplit("-", 1)[1]
        executor = services[f"superexec-clientapp-{i}"]
        assert _flag(executor, "--runtime-api-address") == f"{node}:9094"
        (src,) = [src for src, dst in _bind_mounts(executor) if dst == "/data"]
        assert src == f"./data/{node}"
        data_dirs.add(src)
    assert len(data_dirs) == 3
    # The server sees only its own evaluation set.
    assert [src for src, dst in _bind_mounts(services["superexec-serverapp"]) if dst == "/data"] == ["./data/server"]


@pytest.mark.parametrize(
    "compose,args,from_operator",
    [
        ("compose.yml", ["single", "3"], set()),
        ("server.compose.yml", ["server", "fl.example.org", "203.0.113.10"], set()),
        ("client.compose.yml", ["client"], {"./certs/superlink-ca.crt"}),
    ],
)
def test_setup_script_creates_every_file_the_compose_file_mounts(tmp_path, compose, args, from_operator):
    env = {**os.environ, "FEDLORA_DOCKER_DIR": str(tmp_path)}
    out = subprocess.run([str(ROOT / "scripts" / "deploy-docker-setup.sh"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for s in _load(compose)["services"].values():
        for src, _ in _bind_mounts(s):
            if src in from_operator:
                continue
            if src.startswith("./nginx/"):  # the proxy templates: part of the repository
                assert (DOCKER / src).is_file(), f"{compose} mounts a missing {src}"
                continue
            assert (tmp_path / src).exists(), f"{compose} mounts {src}; {' '.join(args)} did not create it"
    if compose in SERVER_SIDE:
        # The SuperLink's certificate (the proxies present it too) names what SuperNodes dial,
        # what the proxies check ("superlink") and the operator's loopback / SSH-tunnel address.
        sans = subprocess.run(
            ["openssl", "x509", "-in", str(tmp_path / "certs/superlink.crt"), "-noout", "-ext", "subjectAltName"], capture_output=True, text=True
        ).stdout
        assert {"DNS:superlink", "DNS:superlink-fleet", "DNS:localhost", "IP Address:127.0.0.1"} <= set(
            re.split(r",\s*", sans.strip().splitlines()[-1].strip())
        )
    if compose == "server.compose.yml":
        assert "DNS:fl.example.org" in sans and "203.0.113.10" in sans


def test_deployment_secrets_and_data_stay_out_of_the_app_bundle():
    from flwr.cli.build import build_fab_from_files

    private = [
        "docker/data/supernode-1/train.jsonl",
        "docker/data/server/validation.json",
        "docker/keys/supernode-1",
        "docker/certs/superlink.key",
        "docker/secrets/superlink.secret",
        "docker/client.env",
    ]
    files = {p: b'{"text": "private", "label": 0}\n' for p in private}
    files.update(
        {
            "pyproject.toml": (ROOT / "pyproject.toml").read_bytes(),
            ".gitignore": (ROOT / ".gitignore").read_bytes(),
            "docker/compose.yml": (DOCKER / "compose.yml").read_bytes(),
            "README.md": b"# app",
            "experiments/results/run/metrics.jsonl": b"{}\n",
        }
    )
    files.update({str(f.relative_to(ROOT)): f.read_bytes() for f in (ROOT / "fedlora").rglob("*.py")})  # the real package
    fab, _ = build_fab_from_files(files)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    # pyproject's fab-include ships the package and the README only.
    assert {"fedlora/__init__.py", "README.md"} <= names
    assert not {n for n in names if n.startswith(("docker/", "experiments/"))}, names
    assert not names & set(private), names & set(private)


# -- control plane: who reaches which API ----------------------------------------


def _serves(service: dict, container_port: int) -> set[str]:
    """The SuperLink APIs a container port of a service serves."""
    if _cli(service) == "flower-superlink":  # Flower 1.42: every API on --port
        return {"fleet", "control", "runtime"} if container_port == int(_flag(service, "--port")) else set()
    half = _proxy_half(service)
    env = service.get("environment", {})
    if half and str(env.get(f"{half.upper()}_LISTEN", "")).rsplit(":", 1)[-1] == str(container_port):
        return {half}
    return set()


@pytest.mark.parametrize("name", ALL)
def test_control_api_is_never_published_beyond_loopback(name):
    """No compose file publishes the Control API on all interfaces (or on any address but
    127.0.0.1 by default); the secure files publish the SuperLink itself nowhere."""
    # Compose's defaults, what `docker compose up` does unconfigured (a client host must name its SuperLink).
    services = _load(name, env={"SUPERLINK_ADDRESS": _example_env()["SUPERLINK_ADDRESS"]})["services"]
    published = []
    for sname, s in services.items():
        for ip, _, port in _published(s):
            apis = _serves(s, port)
            assert apis, f"{name}: {sname} publishes {port}, which serves no SuperLink API"
            published.append((sname, ip, apis))
            if "control" in apis:
                assert ip == "127.0.0.1", f"{name}: {sname} publishes the Control API on {ip or 'all interfaces'}"
    if name == "compose.insecure.yml":
        assert published and all(ip == "127.0.0.1" for _, ip, _ in published), published
    if name in SERVER_SIDE:
        assert not services["superlink"].get("ports"), f"{name}: the SuperLink publishes its port"
        assert any(apis == {"control"} for *_, apis in published), f"{name}: the operator has no way in"
    if name == "server.compose.yml":  # client hosts reach the Fleet API, and that only
        assert [(ip, apis) for _, ip, apis in published if "fleet" in apis] == [("", {"fleet"})]


@pytest.mark.parametrize("name", SERVER_SIDE)
def test_superlink_sits_behind_the_proxies_on_an_internal_network(name):
    doc = _load(name)
    services, networks = doc["services"], doc.get("networks", {})
    superlink = services["superlink"]
    port = int(_flag(superlink, "--port"))
    assert superlink.get("networks") and all(networks[n] and networks[n].get("internal") for n in superlink["networks"])
    proxies = {_proxy_half(s): (n, s) for n, s in services.items() if "build" not in s}
    assert set(proxies) == {"fleet", "control"}
    for half, (sname, s) in proxies.items():
        env = {k: str(v) for k, v in s["environment"].items()}
        assert template_vars(TEMPLATES[half].read_text()) <= set(env), f"{sname}: template variables without a value"
        assert env["SUPERLINK_UPSTREAM"] == f"superlink:{port}" and env["SUPERLINK_TLS_NAME"] == "superlink"
        mounted = {dst: src for src, dst in _bind_mounts(s)}
        assert {env["TLS_CERT"]: "./certs/superlink.crt", env["TLS_KEY"]: "./certs/superlink.key", env["TLS_CA"]: "./certs/ca.crt"}.items() <= mounted.items()
        assert set(s["networks"]) & set(superlink["networks"]), f"{sname} cannot reach the SuperLink"
    ctl_nets = set(proxies["control"][1]["networks"])
    for sname, s in _flower(services).items():
        if _cli(s) == "flower-superexec" and sname == "superexec-serverapp":
            assert _flag(s, "--runtime-api-address") == f"superlink:{port}"
        if _cli(s) == "flower-supernode":  # through the Fleet proxy; no network with the SuperLink or the Control proxy
            assert _flag(s, "--superlink") == f"superlink-fleet:{proxies['fleet'][1]['environment']['FLEET_LISTEN']}"
            assert not set(s["networks"]) & (ctl_nets | set(superlink["networks"])), sname
    if name == "server.compose.yml":  # client hosts dial the published Fleet port
        ((_, host_port, _),) = _published(proxies["fleet"][1])
        assert _example_env()["SUPERLINK_ADDRESS"].rsplit(":", 1)[1] == str(host_port)


def template_vars(text: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+)\}", text))


def _locations(text: str) -> list[tuple[str, str]]:
    """(location pattern, its body) of an nginx server block, top-level locations only."""
    out, i = [], 0
    for m in re.finditer(r"^\s*location\s+([^{]+?)\s*\{", text, re.M):
        if m.start() < i:
            continue
        depth, j = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        out.append((m.group(1), text[m.end() : j - 1]))
        i = j
    return out


@pytest.mark.parametrize("half", ["fleet", "control"])
def test_proxy_template_forwards_only_its_api(half):
    text = TEMPLATES[half].read_text()
    # Values are filled in outside comments only (a multi-line value must not escape a comment).
    assert not [line for line in text.splitlines() if line.lstrip().startswith("#") and template_vars(line)]
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # without comments
    forwarding = [(pattern, body) for pattern, body in _locations(text) if "proxy_pass" in body]
    assert [p for p, _ in forwarding] == [f"~ ^/v1/{half}/[a-z-]+$"], forwarding
    body = forwarding[0][1]
    assert f"if ($request_uri !~ ^/v1/{half}/[a-z-]+$)" in body  # the raw request line too
    assert re.search(r"limit_except POST\s*\{\s*deny all;\s*\}", body)
    assert "proxy_pass https://" in body and "proxy_ssl_verify on;" in body and "proxy_ssl_trusted_certificate ${TLS_CA};" in body
    assert re.search(r"listen \$\{" + half.upper() + r"_LISTEN\} ssl;", text)
    if half == "control":
        assert re.search(r"allow \$\{CONTROL_ALLOW\};\s*deny all;", text)


# -- the templates, run ---------------------------------------------------------


def _nginx() -> str:
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")  # sbin: not on a user's PATH
    if not path:
        if os.environ.get("CI"):
            pytest.fail("CI must install nginx (see .ci/run)")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _StandIn(BaseHTTPRequestHandler):
    """A stand-in SuperLink over TLS: answers every POST with what it received."""

    hits: list = []

    def do_POST(self):  # noqa: N802
        self.hits.append(self.path)
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.dumps({"path": self.path, "host": self.headers["host"], "proto": self.headers.get("x-forwarded-proto")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy(tmp_path):
    """The two templates rendered by scripts/make-proxy-conf.py, checked by `nginx -t`, and
    run in front of a stand-in SuperLink (TLS, certificate for "superlink")."""
    nginx = _nginx()
    pki = tmp_path / "pki"
    subprocess.run(
        [str(ROOT / "scripts" / "make-certs.sh"), "-o", str(pki), "-n", "superlink", "superlink", "127.0.0.1"], check=True, capture_output=True, timeout=60
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "superlink.crt", pki / "superlink.key")
    _StandIn.hits = []
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    upstream.socket = ctx.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    make = runpy.run_path(str(ROOT / "scripts" / "make-proxy-conf.py"))
    procs = []

    def start(out: str, **over: str) -> dict:
        ports = {"fleet": _free_port(), "control": _free_port()}
        values = {
            "SUPERLINK_UPSTREAM": f"127.0.0.1:{upstream.server_address[1]}",
            "SUPERLINK_TLS_NAME": "superlink",
            "FLEET_LISTEN": f"127.0.0.1:{ports['fleet']}",
            "CONTROL_LISTEN": f"127.0.0.1:{ports['control']}",
            "CONTROL_ALLOW": "127.0.0.1",
            "TLS_CERT": str(pki / "superlink.crt"),
            "TLS_KEY": str(pki / "superlink.key"),
            "TLS_CA": str(pki / "ca.crt"),
            **over,
        }
        conf = make["write"](tmp_path / out, values, foreground=True)
        args = [nginx, "-p", str(conf.parent), "-c", str(conf), "-e", str(conf.parent / "error.log")]
        test = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
        assert test.returncode == 0 and "test is successful" in test.stderr, test.stderr
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        end = time.time() + 10
        while time.time() < end:
            try:
                for p in ports.values():
                    socket.create_connection(("127.0.0.1", p), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        return {h: f"https://127.0.0.1:{p}" for h, p in ports.items()}

    try:
        yield start, pki / "ca.crt"
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        upstream.shutdown()


def _post(url: str, ca, method: str = "POST", source: str | None = None):
    import httpx

    transport = httpx.HTTPTransport(verify=str(ca), local_address=source) if source else None
    with httpx.Client(verify=str(ca), transport=transport, timeout=20) as c:
        return c.request(method, url, content=b"\x00", headers={"content-type": "application/protobuf"})


def test_proxy_routes_each_api_to_its_own_listener_only(proxy):
    start, ca = proxy
    url = start("proxy")
    # Client-facing listener: Fleet calls reach the SuperLink, re-encrypted, as "superlink".
    r = _post(url["fleet"] + "/v1/fleet/pull-messages", ca)
    assert r.status_code == 200 and r.json() == {"path": "/v1/fleet/pull-messages", "host": "superlink", "proto": "https"}
    refused = [
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/control/list-runs",
        "/v1/runtime/acquire-task",
        "/v1/fleet/..%2Fcontrol/start-run",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet/pull-messages?x=1",
        "/v1/fleet/PULL-messages",
        "/health",
        "/docs",
        "/",
    ]
    for path in refused:
        r = _post(url["fleet"] + path, ca)
        assert r.status_code == 403 and REFUSED in r.json()["detail"], (path, r.status_code, r.text[:200])
    assert _post(url["fleet"] + "/v1/fleet/pull-messages", ca, method="GET").status_code == 403
    # Operator listener: the Control API only, for the allowed address only.
    r = _post(url["control"] + "/v1/control/start-run", ca)
    assert r.status_code == 200 and r.json()["path"] == "/v1/control/start-run"
    for path in ("/v1/fleet/pull-messages", "/v1/runtime/acquire-task", "/v1/control/start-run?x=1", "/docs"):
        r = _post(url["control"] + path, ca)
        assert r.status_code == 403 and REFUSED in r.json()["detail"], (path, r.status_code, r.text[:200])
    r = _post(url["control"] + "/v1/control/start-run", ca, source="127.0.0.2")  # not the operator's address
    assert r.status_code == 403 and "operator only" in r.json()["detail"], r.text[:200]
    # Only the two allowed calls reached the SuperLink.
    assert _StandIn.hits == ["/v1/fleet/pull-messages", "/v1/control/start-run"]


def test_proxy_verifies_the_superlinks_certificate(proxy):
    start, ca = proxy
    url = start("wrong-name", SUPERLINK_TLS_NAME="not-the-superlink")  # the certificate names "superlink"
    assert _post(url["fleet"] + "/v1/fleet/pull-messages", ca).status_code == 502
    assert _post(url["control"] + "/v1/control/start-run", ca).status_code == 502
    assert _StandIn.hits == []


def test_make_proxy_conf_writes_a_configuration_nginx_accepts(tmp_path):
    """The script an operator without Docker uses (several operator addresses allowed)."""
    nginx = _nginx()
    pki = tmp_path / "pki"
    subprocess.run(
        [str(ROOT / "scripts" / "make-certs.sh"), "-o", str(pki), "-n", "superlink", "superlink", "127.0.0.1"], check=True, capture_output=True, timeout=60
    )
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make-proxy-conf.py"),
            "-o",
            str(tmp_path / "proxy"),
            "--upstream",
            "127.0.0.1:9091",
            "--fleet-listen",
            "127.0.0.1:9092",
            "--control-allow",
            "127.0.0.1",
            "--control-allow",
            "10.8.0.0/24",
            "--cert",
            str(pki / "superlink.crt"),
            "--key",
            str(pki / "superlink.key"),
            "--ca",
            str(pki / "ca.crt"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    conf = tmp_path / "proxy" / "nginx.conf"
    test = subprocess.run([nginx, "-t", "-c", str(conf), "-e", str(tmp_path / "proxy" / "error.log")], capture_output=True, text=True, timeout=30)
    assert test.returncode == 0, test.stderr
    control = (tmp_path / "proxy" / "control.conf").read_text()
    assert re.search(r"allow 127\.0\.0\.1;\s*allow 10\.8\.0\.0/24;\s*deny all;", control)
    assert "listen 127.0.0.1:9093 ssl;" in control  # the operator listener defaults to loopback

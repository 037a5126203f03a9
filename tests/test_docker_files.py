"""Static checks of docker/ (Docker cannot run on these machines): the compose
files parse and point at files and build contexts that exist (or that
scripts/deploy-docker-setup.sh creates), the Dockerfiles build on the official
Flower images and start installed commands, every flag given to a Flower
command is one the installed CLI knows, the secure files are secure and the
insecure one says so, and deployment secrets / private data stay out of the
app bundle that `flwr run .` sends to every node."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import zipfile
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
    return _entrypoint(_dockerfile(service))[0]


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
        for s in _load(name)["services"].values():
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
    assert any(r.startswith("flwr>=") for r in got) and "torch>=2.2" in got


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
    for sname, s in _load(name)["services"].items():
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
    for sname, s in _load(name)["services"].items():
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
    for sname, s in _load("compose.insecure.yml")["services"].items():
        assert "--insecure" in s["command"], sname


@pytest.mark.parametrize("name", ["compose.yml", "compose.insecure.yml"])
def test_each_node_reads_its_own_data_in_its_clientapp_container(name):
    services = _load(name)["services"]
    nodes = sorted(n for n, s in services.items() if _cli(s) == "flower-supernode")
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
            assert (tmp_path / src).exists(), f"{compose} mounts {src}; {' '.join(args)} did not create it"
    if compose == "compose.yml":  # the SuperLink's certificate names what clients connect to
        sans = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "certs/superlink.crt"), "-noout", "-ext", "subjectAltName"],
                              capture_output=True, text=True).stdout
        assert "DNS:superlink" in sans and "DNS:localhost" in sans and "127.0.0.1" in sans
    if compose == "server.compose.yml":
        sans = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "certs/superlink.crt"), "-noout", "-ext", "subjectAltName"],
                              capture_output=True, text=True).stdout
        assert "DNS:fl.example.org" in sans and "203.0.113.10" in sans


def test_deployment_secrets_and_data_stay_out_of_the_app_bundle():
    from flwr.cli.build import build_fab_from_files

    private = ["docker/data/supernode-1/train.jsonl", "docker/data/server/validation.json", "docker/keys/supernode-1",
               "docker/certs/superlink.key", "docker/secrets/superlink.secret", "docker/client.env"]
    files = {p: b'{"text": "private", "label": 0}\n' for p in private}
    files.update({"pyproject.toml": (ROOT / "pyproject.toml").read_bytes(), ".gitignore": (ROOT / ".gitignore").read_bytes(),
                  "docker/compose.yml": (DOCKER / "compose.yml").read_bytes(), "fedlora/__init__.py": b"",
                  "README.md": b"# app", "experiments/results/run/metrics.jsonl": b"{}\n"})
    fab, _ = build_fab_from_files(files)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    # pyproject's fab-include ships the package and the README only.
    assert {"fedlora/__init__.py", "README.md"} <= names
    assert not {n for n in names if n.startswith(("docker/", "experiments/"))}, names
    assert not names & set(private), names & set(private)

"""A real networked deployment, the way an operator federates organisations:
a SuperLink host, three SuperNode hosts and an operator's machine, each with
its own IP address, connected by TLS, with SuperNode authentication (only
registered public keys may join) and process isolation (separate SuperExec
processes run the ServerApp and every node's ClientApp), driven by `flwr run`.

Control plane: Flower 1.42 serves the SuperLink's Fleet, Control and Runtime
APIs on one port, without account authentication. So the SuperLink listens on
its host's loopback only, and nginx on the SuperLink host (the project's
docker/nginx templates) splits it: the client hosts' network reaches a listener
that forwards only the Fleet API; the operator's network (a second bridge that
only the operator and the SuperLink host are on) reaches a listener that
forwards only the Control API, to the operator's address only. TLS on both legs.

The hosts are Linux network namespaces with veth links on private bridges
(which live in a namespace of their own, so the machine's network is untouched).
Where namespaces cannot be created (not root, no iproute2, a sandbox), every
process binds to its own loopback address (127.x.y.z) instead: the test says
so loudly (a warning and the `network` property) and still checks everything
that does not need separate networks. FEDLORA_TEST_NETWORK=loopback forces that mode.

Every process started here carries a marker in its environment; teardown ends
exactly those (and deletes the namespaces), also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import secrets
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import make_rows, write_jsonl, write_task

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODES = ("node-1", "node-2", "node-3")
NODE_SIZES = {"node-1": 90, "node-2": 120, "node-3": 150}  # distinct: shows whose data each reply used
INTRUDER = "node-x"  # a SuperNode whose key the operator never registered
HOSTS = ("operator", "superlink", *NODES, INTRUDER)
REFUSED = "Refused by the SuperLink proxy"  # the proxy's answer on a listener that does not serve the API
UNAVAILABLE = "Connection to the SuperLink is unavailable"  # the flwr CLI, when nothing answers
PROXY_CONF = runpy.run_path(str(ROOT / "scripts" / "make-proxy-conf.py"))  # renders docker/nginx/*.template
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")  # sbin: not on a user's PATH
CONNECTION = "deployment"  # the operator's name for this SuperLink in its Flower config
MARKER = "FEDLORA_DEPLOY_TEST"

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc, iproute2)"), pytest.mark.slow]


# -- hosts --------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Network:
    """One IP address per host: namespaces on bridges, or loopback addresses.

    Namespaces: the client network (10.77.0.0/24: SuperLink host, SuperNodes, intruder)
    and the operator's network (10.78.0.0/24: operator, SuperLink host); the SuperLink
    host is on both and routes nothing between them."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.mode = ""
        self.addr: dict[str, str] = {}  # each host's address (the operator's on the operator network)
        self.control_addr = ""  # the SuperLink host's address on the operator's network
        self.internal = "127.0.0.1"  # where the SuperLink itself listens: its own host's loopback
        self.namespaces: list[str] = []
        # The SuperLink (all its APIs), the proxy's Fleet and Control listeners, a SuperNode's Runtime API.
        self.port = {"superlink": 9091, "fleet": 9092, "control": 9093, "runtime": 9094}

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"[:15]

    def up(self) -> None:
        forced = os.environ.get("FEDLORA_TEST_NETWORK", "") == "loopback"
        why = "FEDLORA_TEST_NETWORK=loopback" if forced else ""
        if not forced:
            try:
                self._namespaces()
                self.mode = "namespaces"
                return
            except (OSError, subprocess.SubprocessError) as e:
                why = getattr(e, "stderr", None) or str(e)
                self.down()
        # Fallback: distinct loopback addresses, random ports (other software may use the defaults).
        self.mode = "loopback"
        base = f"127.{100 + secrets.randbelow(150)}.{secrets.randbelow(250)}"
        self.addr = {h: f"{base}.{10 + i}" for i, h in enumerate(HOSTS)}
        self.control_addr, self.internal = self.addr["superlink"], f"{base}.9"
        p = 20000 + secrets.randbelow(20000)
        self.port = {k: p + i for i, k in enumerate(self.port)}
        msg = (
            f"NETWORK NAMESPACES NOT USED ({str(why).strip()[:200]}): every process runs on this host, "
            f"bound to its own loopback address ({base}.x), not on separate network hosts"
        )
        print(f"\n!!! {msg}", file=sys.stderr)
        warnings.warn(msg, stacklevel=2)

    def _namespaces(self) -> None:
        bridge = self.ns("br")
        _ip("netns", "add", bridge)
        self.namespaces.append(bridge)
        for br in ("br0", "br1"):  # br0: the client network; br1: the operator's network
            _ip("-n", bridge, "link", "add", br, "type", "bridge")
            _ip("-n", bridge, "link", "set", br, "up")

        def link(ns: str, dev: str, peer: str, br: str, addr: str) -> None:
            _ip("link", "add", dev, "netns", ns, "type", "veth", "peer", "name", peer, "netns", bridge)
            _ip("-n", bridge, "link", "set", peer, "master", br)
            _ip("-n", bridge, "link", "set", peer, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")

        for i, host in enumerate(HOSTS):
            ns = self.ns(host)
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            if host == "operator":  # on the operator's network only
                self.addr[host] = f"10.78.0.{10 + i}"
                link(ns, "eth0", f"v{i}", "br1", self.addr[host])
                continue
            self.addr[host] = f"10.77.0.{10 + i}"
            link(ns, "eth0", f"v{i}", "br0", self.addr[host])
            if host == "superlink":  # on both networks (forwarding is off in a new namespace)
                self.control_addr = f"10.78.0.{10 + i}"
                link(ns, "eth1", f"w{i}", "br1", self.control_addr)

    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)] if self.mode == "namespaces" else []

    def down(self) -> None:
        for ns in reversed(self.namespaces):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:  # only processes inside our own namespaces
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()


class Processes:
    """Processes started for the deployment, and every process they start:
    all carry ``MARKER=<token>:<host>`` in their environment."""

    def __init__(self, net: Network, workdir: Path) -> None:
        self.net, self.workdir = net, workdir
        self.token = secrets.token_hex(8)
        self.popens: list[subprocess.Popen] = []
        self.logs: dict[str, Path] = {}

    def env(self, host: str, **extra: str) -> dict[str, str]:
        home = self.workdir / host
        env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "FLWR_HOME": str(home / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FEDLORA_CACHE_DIR": str(home / "cache"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            MARKER: f"{self.token}:{host}",
            **extra,
        }
        env.pop("FEDLORA_DATA_DIR", None)
        return env

    def start(self, name: str, host: str, argv: list[str]) -> subprocess.Popen:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*self.net.prefix(host), *argv],
                env=self.env(host),
                cwd=self.workdir / host,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.popens.append(proc)
        self.logs[name] = log
        return proc

    def cli(self, *args: str, timeout: float = 120, host: str = "operator") -> subprocess.CompletedProcess:
        """The `flwr` CLI on a host: the operator's unless ``host`` says otherwise."""
        return subprocess.run(
            [*self.net.prefix(host), str(BIN / "flwr"), *args],
            env=self.env(host),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def marked(self, host: str | None = None) -> list[int]:
        want = f"{MARKER}={self.token}:{host or ''}".encode()
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if any(v.startswith(want) for v in env) and int(pid) != os.getpid():
                found.append(int(pid))
        return found

    def kill_host(self, host: str) -> None:
        """The host dies: every process on it at once."""
        for pid in self.marked(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        for sig, wait in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
            pids = self.marked()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            for p in self.popens:  # also those that drop the marker (nginx rewrites its environment)
                if p.poll() is None:
                    p.send_signal(sig)
            end = time.time() + wait
            while time.time() < end and self.marked():
                for p in self.popens:
                    p.poll()  # reap our direct children
                time.sleep(0.2)
        for p in self.popens:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def tail(self, name: str, n: int = 40) -> str:
        path = self.logs.get(name)
        lines = path.read_text(errors="replace").splitlines()[-n:] if path and path.exists() else []
        return f"--- {name} ---\n" + "\n".join(lines)


def _wait(what: str, predicate, timeout: float, diagnostics=lambda: "", every: float = 2.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(every)  # a `flwr` CLI call costs a second of CPU: poll gently
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnostics()}")


def _json(stdout: str) -> dict:
    """The JSON document of a `flwr ... --format json` call; {} when the call
    failed (the CLI exits 0 then too, with "success": false)."""
    try:
        doc = json.loads(stdout[stdout.index("{") :])
    except ValueError:
        return {}
    return doc if doc.get("success") else {}


# -- the federation -----------------------------------------------------------


class Federation:
    def __init__(self, tmp: Path, model: str) -> None:
        self.tmp, self.model = tmp, model
        self.net = Network("fl" + secrets.token_hex(3))
        self.procs = Processes(self.net, tmp / "hosts")
        self.node_ids: dict[str, int] = {}  # SuperNode name -> the id the SuperLink gave its key
        self.tls = tmp / "pki"

    # Each host's files live in its own folder (all on this machine's disk; the
    # processes of one host only ever read their own folder and the CA certificate).
    def home(self, host: str) -> Path:
        return self.tmp / "hosts" / host

    def up(self) -> None:
        self.net.up()
        for host in HOSTS:
            self.home(host).mkdir(parents=True, exist_ok=True)
        net, port = self.net, self.net.port
        internal = f"{net.internal}:{port['superlink']}"
        self._make_credentials()

        # Server host: SuperLink (TLS, SuperNode auth, ServerApps run by a separate SuperExec),
        # listening on its host's loopback only: its one port serves every API.
        sl = self.home("superlink")
        (sl / "superexec.secret").write_bytes(secrets.token_bytes(32))
        self.procs.start(
            "superlink",
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--host",
                net.internal,
                "--port",
                str(port["superlink"]),
                "--ssl-ca-certfile",
                str(self.tls / "ca.crt"),
                "--ssl-certfile",
                str(self.tls / "superlink.crt"),
                "--ssl-keyfile",
                str(self.tls / "superlink.key"),
                "--enable-supernode-auth",
                "--isolation",
                "process",
                "--database",
                str(sl / "state.db"),
                "--superexec-auth-secret-file",
                str(sl / "superexec.secret"),
            ],
        )
        self.procs.start(
            "superexec-server",
            "superlink",
            [
                str(BIN / "flower-superexec"),
                "--runtime-api-address",
                internal,
                "--root-certificates",
                str(self.tls / "ca.crt"),
                "--superexec-auth-secret-file",
                str(sl / "superexec.secret"),
            ],
        )
        # The proxy on the server host: the Fleet API on the client network, the Control API
        # on the operator's network for the operator's address only (everyone shares one
        # source address, 127.0.0.1, in loopback mode).
        conf = PROXY_CONF["write"](
            sl / "proxy",
            {
                "SUPERLINK_UPSTREAM": internal,
                "SUPERLINK_TLS_NAME": "superlink",
                "FLEET_LISTEN": f"{net.addr['superlink']}:{port['fleet']}",
                "CONTROL_LISTEN": f"{net.control_addr}:{port['control']}",
                "CONTROL_ALLOW": net.addr["operator"] if net.mode == "namespaces" else "127.0.0.0/8",
                "TLS_CERT": str(self.tls / "superlink.crt"),
                "TLS_KEY": str(self.tls / "superlink.key"),
                "TLS_CA": str(self.tls / "ca.crt"),
            },
            foreground=True,
        )
        self.procs.start("proxy", "superlink", [NGINX, "-p", str(conf.parent), "-c", str(conf), "-e", str(conf.parent / "error.log")])

        # Operator: its Flower config names the SuperLink's Control listener and trusts the deployment's CA.
        self.write_flwr_config("operator", {CONNECTION: f"{net.control_addr}:{port['control']}"})
        _wait(
            "the SuperLink's Control API",
            lambda: bool(_json(self.procs.cli("supernode", "ls", CONNECTION, "--format", "json").stdout)),
            60,
            lambda: self.procs.tail("superlink") + "\n" + self.procs.tail("proxy") + (sl / "proxy" / "error.log").read_text()[-2000:],
        )

        # Register the three SuperNodes' public keys (not the intruder's).
        for name in NODES:
            out = self.procs.cli("supernode", "register", str(self.home(name) / "keys" / f"{name}.pub"), CONNECTION, "--format", "json")
            assert out.returncode == 0 and '"node-id"' in out.stdout, out.stdout + out.stderr
            self.node_ids[name] = int(_json(out.stdout)["node-id"])

        for name in NODES:
            self.start_node(name)
        _wait(
            "three SuperNodes online",
            lambda: self.online() == set(self.node_ids.values()),
            90,
            lambda: "\n".join(self.procs.tail(n) for n in ("superlink", *NODES)),
        )

    def write_flwr_config(self, host: str, connections: dict[str, str]) -> None:
        """A host's Flower config: SuperLink connections by name, all trusting the deployment's CA."""
        home = self.home(host) / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        text = f'[superlink]\ndefault = "{next(iter(connections))}"\n'
        for name, address in connections.items():
            text += f'\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{self.tls / "ca.crt"}"\n'
        (home / "config.toml").write_text(text)

    def _make_credentials(self) -> None:
        """CA and certificates for every TLS server (the SuperLink and its proxy, each
        SuperNode's Runtime API), and an auth key pair per SuperNode, by the project's scripts."""
        env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        run = lambda *a: subprocess.run(a, check=True, capture_output=True, text=True, env=env, timeout=60)  # noqa: E731
        # One certificate for the SuperLink and the proxy: every address clients, the operator
        # and the server-side SuperExec use, and the name the proxy checks ("superlink").
        net = self.net
        run(
            str(ROOT / "scripts" / "make-certs.sh"),
            "-o",
            str(self.tls),
            "-n",
            "superlink",
            net.addr["superlink"],
            *sorted({net.control_addr, net.internal} - {net.addr["superlink"]}),
            "superlink",
        )
        for name in (*NODES, INTRUDER):
            run(str(ROOT / "scripts" / "make-certs.sh"), "-o", str(self.tls), "-n", name, self.net.addr[name])
            run(str(ROOT / "scripts" / "make-node-keys.sh"), "-o", str(self.home(name) / "keys"), name)

    def node_argv(self, name: str, with_key: bool = True) -> list[str]:
        home, addr = self.home(name), self.net.addr[name]
        fleet, runtime = self.net.port["fleet"], self.net.port["runtime"]
        data = home / "data" / "train.jsonl"
        if not data.exists():  # the node's own private data, on its own host
            write_jsonl(data, make_rows(NODE_SIZES.get(name, 60), seed=sum(map(ord, name))))
        argv = [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"{self.net.addr['superlink']}:{fleet}",
            "--root-certificates",
            str(self.tls / "ca.crt"),
            "--node-config",
            f'data-path="{data}"',
            "--isolation",
            "process",
            "--host",
            addr,
            "--port",
            str(runtime),
            "--ssl-certfile",
            str(self.tls / f"{name}.crt"),
            "--ssl-keyfile",
            str(self.tls / f"{name}.key"),
            "--ssl-ca-certfile",
            str(self.tls / "ca.crt"),
            "--superexec-auth-secret-file",
            str(home / "superexec.secret"),
            "--max-retries",
            "3",
        ]
        if with_key:
            argv += ["--auth-supernode-private-key", str(home / "keys" / name)]
        return argv

    def start_node(self, name: str) -> subprocess.Popen:
        home = self.home(name)
        if not (home / "superexec.secret").exists():
            (home / "superexec.secret").write_bytes(secrets.token_bytes(32))
        proc = self.procs.start(name, name, self.node_argv(name))
        self.procs.start(
            f"superexec-{name}",
            name,
            [
                str(BIN / "flower-superexec"),
                "--runtime-api-address",
                f"{self.net.addr[name]}:{self.net.port['runtime']}",
                "--root-certificates",
                str(self.tls / "ca.crt"),
                "--superexec-auth-secret-file",
                str(home / "superexec.secret"),
            ],
        )
        return proc

    def nodes(self) -> list[dict]:
        out = self.procs.cli("supernode", "ls", CONNECTION, "--format", "json")
        return _json(out.stdout).get("nodes", [])

    def runs(self) -> set[str]:
        """Every run the SuperLink knows, as the operator sees it."""
        doc = _json(self.procs.cli("ls", CONNECTION, "--format", "json").stdout)
        assert doc, "the operator cannot list runs"
        return {str(r["run-id"]) for r in doc["runs"]}

    def online(self) -> set[int]:
        return {int(n["node-id"]) for n in self.nodes() if n["status"] == "online"}

    def run(self, name: str, rounds: int, *extra: str) -> str:
        """Submit a run (FFA-LoRA with DP) and return its id; the CLI returns at once."""
        server = self.home("superlink")
        eval_dir = server / "eval"
        if not eval_dir.exists():  # the server's own evaluation set: it never sees a node's data
            write_task(eval_dir, 40, 60)
        pairs = [
            f'model="{self.model}"',
            f'dataset="{eval_dir}"',
            f'output-dir="{server / "outputs"}"',
            f'run-name="{name}"',
            'strategy="ffa-lora"',
            "dp.epsilon=3.0",
            f"num-server-rounds={rounds}",
            "local-steps=2",
            "batch-size=16",
            # The server trains once 2 nodes are connected and samples all connected ones;
            # a round needs 2 training nodes and updates the adapter with >= 1 reply.
            "min-train-nodes=2",
            "min-replies=1",
            *extra,
        ]
        args = ["run", str(ROOT), CONNECTION, "--format", "json"]
        for kv in pairs:
            args += ["--run-config", kv]
        out = self.procs.cli(*args)
        assert "run-id" in _json(out.stdout), out.stdout + out.stderr
        return str(_json(out.stdout)["run-id"])

    def status(self, run_id: str) -> str:
        out = self.procs.cli("ls", CONNECTION, "--run-id", run_id, "--format", "json")
        runs = _json(out.stdout).get("runs", [])
        return runs[0]["status"] if runs else "unknown"

    def wait_finished(self, run_id: str, timeout: float) -> str:
        state = {"status": ""}

        def done() -> bool:
            state["status"] = self.status(run_id)
            return state["status"].startswith("finished")

        _wait(f"run {run_id} to finish", done, timeout, lambda: "\n".join(self.procs.tail(n) for n in ("superexec-server", "superlink", *NODES)), every=4)
        return state["status"]

    def metrics(self, name: str) -> list[dict]:
        path = self.home("superlink") / "outputs" / name / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def down(self) -> None:
        try:
            self.procs.stop_all()
        finally:
            self.net.down()


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir):
    for tool in ("openssl", "ssh-keygen"):
        assert shutil.which(tool), f"{tool} is needed to make the deployment's TLS certificates and node keys"
    if not NGINX:  # the proxy that keeps the Control API away from client hosts
        if os.environ.get("CI"):
            pytest.fail("CI must install nginx (see .ci/run)")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    fed = Federation(tmp_path_factory.mktemp("deployment"), tiny_model_dir)
    try:
        fed.up()
        yield fed
    finally:
        fed.down()
        assert not fed.procs.marked(), "processes of the deployment are still running"


# -- tests ----------------------------------------------------------------------


def test_run_over_tls_with_node_auth_uses_every_nodes_own_data(federation, record_property):
    fed = federation
    record_property("network", fed.net.mode)
    print(f"\ndeployment network: {fed.net.mode} {fed.net.addr}")
    run_id = fed.run("all-nodes", 2, "round-timeout=120")
    assert fed.wait_finished(run_id, 300) == "finished:completed", fed.procs.tail("superexec-server", 80)

    rows = fed.metrics("all-nodes")
    assert [r["round"] for r in rows] == [0, 1, 2]
    ids = {str(i): name for name, i in fed.node_ids.items()}
    for r in rows[1:]:
        assert r["clients"] == 3 and r["failures"] == 0, r
        # Every registered node replied, each from its own data (sizes differ per node).
        assert {ids[k]: m["num-examples"] for k, m in r["client_metrics"].items()} == NODE_SIZES
        assert 0 < r["epsilon"] <= 3.0
    assert rows[-1]["strategy"] == "ffa-lora"

    # The operator sees the run and its log through the SuperLink.
    listed = _json(fed.procs.cli("ls", CONNECTION, "--format", "json").stdout)["runs"]
    assert run_id in {str(r["run-id"]) for r in listed}
    log = fed.procs.cli("log", run_id, CONNECTION, "--show", timeout=60)
    assert "round 2/2" in log.stdout and "3/3 clients" in log.stdout, log.stdout[-3000:]


ROGUE_APP = {  # what an organisation might submit: any code, run next to every node's data
    "pyproject.toml": """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rogue"
version = "1.0.0"
description = "reads other organisations' data"
license = "Apache-2.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "node-1"

[tool.flwr.app.components]
serverapp = "rogue:server"
clientapp = "rogue:client"

[tool.flwr.app.config]
""",
    "rogue.py": "from flwr.clientapp import ClientApp\nfrom flwr.serverapp import ServerApp\n\nserver = ServerApp()\nclient = ClientApp()\n",
}

# Raw calls from a client host to the proxy's Fleet listener: status and the start of the body, per path.
PROBE = """
import json, sys, httpx
base, ca, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
with httpx.Client(verify=ca, timeout=30) as c:
    out = {p: c.post(base + p, content=b"", headers={"content-type": "application/protobuf"}) for p in paths}
print(json.dumps({p: [r.status_code, r.text[:300]] for p, r in out.items()}))
"""


def test_client_hosts_cannot_start_runs_or_register_nodes(federation, record_property):
    """An organisation's host reaches the SuperLink's Fleet API (its SuperNode needs it) and
    nothing else: `flwr run` and `flwr supernode register` fail on every way in it has,
    and the SuperLink's runs and nodes stay as they were; the operator is unaffected."""
    fed = federation
    record_property("network", fed.net.mode)
    net, port = fed.net, fed.net.port
    org = "node-1"  # a registered organisation, holding the federation's CA, on the client network
    runs, nodes = fed.runs(), {int(n["node-id"]) for n in fed.nodes()}
    assert nodes == set(fed.node_ids.values())

    def control_calls(*calls: str) -> list[int]:  # the SuperLink's access log (uvicorn): a line per request
        log = fed.procs.logs["superlink"].read_text(errors="replace")
        return [log.count(f'"POST /v1/control/{c} ') for c in calls]

    assert control_calls("list-nodes")[0] > 0, "the SuperLink's access log does not show requests"
    before = control_calls("start-run", "register-node")

    # Its ways in: the address its SuperNode uses (the proxy's Fleet listener), the SuperLink's
    # own port on that host, and the operator's Control listener (on another network).
    ways = {"fleet": (f"{net.addr['superlink']}:{port['fleet']}", REFUSED), "direct": (f"{net.addr['superlink']}:{port['superlink']}", UNAVAILABLE)}
    if net.mode == "namespaces":  # in loopback mode every address is reachable by every process
        ways["control"] = (f"{net.control_addr}:{port['control']}", UNAVAILABLE)
    fed.write_flwr_config(org, {name: addr for name, (addr, _) in ways.items()})
    app = fed.home(org) / "rogue-app"
    for name, text in ROGUE_APP.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    key = str(fed.home(INTRUDER) / "keys" / f"{INTRUDER}.pub")  # a key of its own making

    def refused(connection: str, expect: str) -> None:
        for args in (("supernode", "register", key, connection), ("run", str(app), connection)):
            out = fed.procs.cli(*args, host=org)
            said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out.stdout + out.stderr).split())  # the CLI's error box, unwrapped
            assert out.returncode != 0 and expect in said, (
                f"`flwr {args[0]}` from {org} via {connection}: exit {out.returncode}\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}"
            )

    for connection, (_, expect) in ways.items():
        refused(connection, expect)
    if net.mode == "namespaces":
        # Even routed through the SuperLink host (which accepts packets for any of its addresses),
        # the Control listener serves the operator's address only.
        route = [*net.prefix(org), "ip", "route"]
        subprocess.run([*route, "add", f"{net.control_addr.rsplit('.', 1)[0]}.0/24", "via", net.addr["superlink"]], check=True, capture_output=True, timeout=30)
        try:
            refused("control", "the Control API is for the federation operator only")
        finally:
            subprocess.run([*route, "del", f"{net.control_addr.rsplit('.', 1)[0]}.0/24"], capture_output=True, timeout=30)

    # On the Fleet listener only plain Fleet calls pass (the SuperLink then wants a registered
    # node's signature: 401); the Control and Runtime APIs, /docs and path tricks are refused.
    fleet_call, others = (
        "/v1/fleet/get-run",
        [
            "/v1/control/start-run",
            "/v1/control/register-node",
            "/v1/control/list-runs",
            "/v1/runtime/acquire-task",
            "/v1/fleet/..%2Fcontrol/list-runs",
            "/v1/fleet/%2e%2e/control/list-runs",
            "/v1/fleet/get-run?x=1",
            "/docs",
        ],
    )
    out = subprocess.run(
        [*net.prefix(org), sys.executable, "-c", PROBE, f"https://{ways['fleet'][0]}", str(fed.tls / "ca.crt"), fleet_call, *others],
        env=fed.procs.env(org),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got[fleet_call][0] == 401 and REFUSED not in got[fleet_call][1], got[fleet_call]
    for path in others:
        assert got[path][0] == 403 and REFUSED in got[path][1], (path, got[path])

    # Nothing changed on the SuperLink (no such call even reached it), and the operator still drives it.
    assert fed.runs() == runs
    assert {int(n["node-id"]) for n in fed.nodes()} == nodes
    assert control_calls("start-run", "register-node") == before, "a refused call reached the SuperLink"


def test_unregistered_node_cannot_join(federation, record_property):
    fed = federation
    record_property("network", fed.net.mode)
    before = {int(n["node-id"]) for n in fed.nodes()}
    # A valid TLS client with a key the operator never registered, and one with no key at all.
    fed.home(INTRUDER).joinpath("superexec.secret").write_bytes(secrets.token_bytes(32))
    cases = (
        ("unregistered-key", fed.node_argv(INTRUDER), "Failed to activate SuperNode"),
        ("no-key", fed.node_argv(INTRUDER, with_key=False), "All SuperNodes must be registered"),
    )
    for label, argv, reason in cases:
        proc = fed.procs.start(f"intruder-{label}", INTRUDER, argv)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {label} SuperNode was not turned away\n{fed.procs.tail(f'intruder-{label}')}")
        log = fed.procs.logs[f"intruder-{label}"].read_text()
        assert code != 0 and "Failed to initialize the connection to the SuperLink" in log and reason in log, log[-2000:]
    assert "No SuperNode found with the given public key" in fed.procs.logs["superlink"].read_text()
    # The SuperLink knows exactly the registered nodes, before and after.
    assert {int(n["node-id"]) for n in fed.nodes()} == before == set(fed.node_ids.values())


def test_node_killed_mid_round_run_goes_on(federation, record_property):
    fed = federation
    record_property("network", fed.net.mode)
    victim = "node-3"
    received = lambda: fed.procs.logs[victim].read_text().count("Receiving: train message")  # noqa: E731
    start = received()
    # Long enough for a healthy round on a busy 2-core machine. The SuperLink itself
    # gives up on a silent node after 2 missed heartbeats (2 x 30 s in Flower 1.42).
    run_id = fed.run("node-killed", 2, "round-timeout=60")
    # Round 1 is under way and the victim holds its task: the whole host dies.
    _wait("node-3 to receive its round-1 task", lambda: received() > start, 200, lambda: fed.procs.tail(victim) + fed.procs.tail("superexec-server"), every=0.5)
    fed.procs.kill_host(victim)
    assert fed.wait_finished(run_id, 300) == "finished:completed", fed.procs.tail("superexec-server", 80)

    rows = fed.metrics("node-killed")
    dead = str(fed.node_ids[victim])
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:  # the others go on without it
        assert r["clients"] == 2 and dead not in r["client_metrics"] and r["accuracy"] is not None, r
    # Its absence is on record: sampled, no reply, named with the reason.
    assert rows[1]["sampled"] == 3 and any(f.startswith(f"node {dead}:") for f in rows[1]["failure_reasons"]), rows[1]
    log = fed.procs.cli("log", run_id, CONNECTION, "--show", timeout=60).stdout
    assert "2/3 clients" in log and f"node {dead}" in log, log[-3000:]
    # The SuperLink marks the node offline once its heartbeats stop.
    _wait("the SuperLink to mark node-3 offline", lambda: int(dead) not in fed.online(), 90)

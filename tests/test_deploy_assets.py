"""``deploy/``, the Dockerfile and the commands they run, checked with the real tools.

nats-server configs: ``nats-server -t`` with generated certificates and the auth config
``shipyard auth init`` writes, and the 3-server cluster config started for real (TLS
routes, JetStream at R3).  systemd units: ``systemd-analyze verify`` where it exists, and
always the hardening keys and an ``ExecStart`` that ``shipyard node start`` accepts.
Kubernetes manifests: the Kubernetes JSON schemas (``kubernetes-validate``, strict, for
``K8S_VERSION``), container args and exec probes parsed by the real CLI, HTTP probes on
paths the API node serves.  The NATS Helm values: only keys the official chart has.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodes.api.http import PROBES
from nodes.auth.store import AuthStore
from nodes.cli import cli, main
from nodes.cli.health_check import node_health
from nodes.cli.stack import node_start
from nodes.runtime.connection import CannotReachNats, close, connect
from nodes.runtime.embedded import find_binary
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from tests.authstack import auth_stack
from tests.helpers import Background, shipyard, wait_until
from tests.test_cli_stack import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NATS_DIR = DEPLOY / "nats"
UNITS = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"
NODE_ROLES = ("deployer", "govern", "design", "automation", "api")
DATA_ROLES = ("design", "automation", "api")


# -- certificates ----------------------------------------------------------------------------

def make_certs(out: Path) -> dict[str, Path]:
    """A CA and a server certificate (localhost, 127.0.0.1; server and client use) like
    the ones deploy/nats/make-certs.sh makes."""
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": out / "ca.pem", "cert": out / "server.pem", "key": out / "server-key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths


def install_nats_config(name: str, etc: Path, state: Path) -> Path:
    """deploy/nats/NAME.conf laid out as on a host, under ``etc`` (for /etc/nats) and
    ``state`` (for /var/lib/nats): certificates, the auth config ``shipyard auth init``
    writes (copied to auth/nats-auth.conf, as deploy/README.md says), the config."""
    make_certs(etc / "tls")
    store = AuthStore(etc.parent / "shipyard-auth")
    store.init()
    (etc / "auth").mkdir(parents=True)
    shutil.copy(store.server_config, etc / "auth" / "nats-auth.conf")
    text = (NATS_DIR / f"{name}.conf").read_text()
    assert "/etc/nats/" in text and "/var/lib/nats/" in text
    conf = etc / "nats.conf"
    conf.write_text(text.replace("/etc/nats/", f"{etc}/").replace("/var/lib/nats/",
                                                                  f"{state}/"))
    return conf


def nats_check(conf: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_binary(), "-t", "-c", str(conf)], capture_output=True,
                          text=True, timeout=20, env=env)


@pytest.mark.parametrize("name", ["single", "cluster"])
def test_nats_configs_pass_nats_server_check_with_tls_and_generated_auth(
        name: str, tmp_path: Path) -> None:
    text = (NATS_DIR / f"{name}.conf").read_text()
    assert "include auth/nats-auth.conf" in text  # the generated users, not a copy of them
    assert re.search(r"^tls \{", text, re.M) and "jetstream {" in text
    if name == "cluster":
        cluster = text[text.index("cluster {"):]
        assert "name: shipyard" in cluster and "verify: true" in cluster
        assert len(re.findall(r'"nats-route://nats-\d\.example\.internal:6222"', cluster)) == 3
    conf = install_nats_config(name, tmp_path / "etc", tmp_path / "state")
    ok = nats_check(conf, env={"NATS_SERVER_NAME": "nats-1"})
    assert ok.returncode == 0 and "is valid" in ok.stderr + ok.stdout, ok.stderr
    # The server name comes from the environment (the unit sets it): required.
    assert "NATS_SERVER_NAME" in nats_check(conf, env={}).stderr
    # The include is read: without the generated file the config is refused.
    (tmp_path / "etc" / "auth" / "nats-auth.conf").unlink()
    missing = nats_check(conf, env={"NATS_SERVER_NAME": "nats-1"})
    assert missing.returncode != 0 and "nats-auth.conf" in missing.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="make-certs.sh needs the openssl "
                    "CLI, which is not installed here")
def test_make_certs_script_makes_a_ca_and_per_host_certificates_nats_accepts(
        tmp_path: Path) -> None:
    out = tmp_path / "certs"
    made = subprocess.run(["sh", str(NATS_DIR / "make-certs.sh"), str(out), "nats-1.test",
                           "nats-2.test"], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    for host in ("nats-1.test", "nats-2.test"):
        cert = x509.load_pem_x509_certificate((out / host / "server.pem").read_bytes())
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in sans.get_values_for_type(x509.DNSName)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
        assert (out / host / "server-key.pem").stat().st_mode & 0o077 == 0
    etc = tmp_path / "etc"
    conf = install_nats_config("single", etc, tmp_path / "state")
    for f in ("server.pem", "server-key.pem", "ca.pem"):
        shutil.copy(out / "nats-1.test" / f, etc / "tls" / f)
    assert nats_check(conf, env={"NATS_SERVER_NAME": "nats-1"}).returncode == 0
    usage = subprocess.run(["sh", str(NATS_DIR / "make-certs.sh")], capture_output=True,
                           text=True, timeout=10)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_cluster_config_forms_a_tls_cluster_that_keeps_shipyard_state_at_r3(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster config on three local 'hosts' (ports moved, routes to 127.0.0.1): the
    servers route over mutual TLS, and 'shipyard auth publish' as the admin, with the CA
    and SHIPYARD_REPLICAS=3 of deploy/systemd/shipyard.env, stores identities at R3."""
    etc = tmp_path / "etc"
    conf = install_nats_config("cluster", etc, tmp_path / "state")
    text = conf.read_text()
    ports = [(free_port(), free_port(), free_port()) for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for n, (client, route, http) in enumerate(ports, start=1):
            mine = text.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{client}")
            mine = mine.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{route}")
            mine = mine.replace("http: 127.0.0.1:8222", f"http: 127.0.0.1:{http}")
            mine = mine.replace("jetstream\"", f"jetstream-{n}\"")
            for m, (_, other, _) in enumerate(ports, start=1):
                mine = mine.replace(f"nats-{m}.example.internal:6222", f"127.0.0.1:{other}")
            assert mine.count("127.0.0.1:") == 3 + 3 and f"jetstream-{n}" in mine
            path = etc / f"nats-{n}.conf"
            path.write_text(mine)
            with (tmp_path / f"nats-{n}.log").open("wb") as log:
                procs.append(subprocess.Popen([find_binary(), "-c", str(path)], stdout=log,
                                              stderr=subprocess.STDOUT,
                                              env={"NATS_SERVER_NAME": f"nats-{n}"}))

        def healthy() -> bool:
            for _, _, http in ports:
                try:
                    r = httpx.get(f"http://127.0.0.1:{http}/healthz", timeout=1)
                except httpx.HTTPError:
                    return False
                if r.status_code != 200:
                    return False
            return True

        wait_until(healthy, timeout=30, message="three healthy clustered servers")
        routez = httpx.get(f"http://127.0.0.1:{ports[0][2]}/routez", timeout=2).json()
        assert routez["num_routes"] >= 2 and routez["server_name"] == "nats-1"
        url = ",".join(f"tls://127.0.0.1:{c}" for c, _, _ in ports)
        # The CLI in this process (a subprocess start costs seconds on a loaded machine),
        # with the environment deploy/systemd/shipyard.env gives.
        monkeypatch.chdir(tmp_path)
        for key in [k for k in os.environ if k.startswith("SHIPYARD_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("SHIPYARD_NATS_TLS_CA", str(etc / "tls" / "ca.pem"))
        monkeypatch.setenv("SHIPYARD_REPLICAS", "3")
        auth_dir = tmp_path / "shipyard-auth"
        with pytest.raises(SystemExit) as published:
            main(["auth", "publish", "--dir", str(auth_dir), "--nats", url, "--json"])
        assert published.value.code == 0
        assert json.loads(capsys.readouterr().out)["changed"] == 7  # admin, init's 6 nodes

        async def replicas() -> tuple[int, int]:
            settings = NatsSettings(servers=tuple(url.split(",")),
                                    creds_file=str(auth_dir / "creds" / "admin.creds"),
                                    tls_ca_file=str(etc / "tls" / "ca.pem"))
            nc = await connect(settings, name="test")
            try:
                info = await nc.jetstream().stream_info(f"KV_{subjects.IDENTITIES_BUCKET}")
                assert info.cluster is not None
                return info.config.num_replicas or 0, 1 + len(info.cluster.replicas or [])
            finally:
                await close(nc)

        assert asyncio.run(replicas()) == (3, 3)
        # Without the CA the client cannot trust the servers: TLS is really on.
        untrusted = NatsSettings(servers=tuple(url.split(",")),
                                 creds_file=str(auth_dir / "creds" / "admin.creds"))
        with pytest.raises(CannotReachNats, match="certificate verify failed"):
            asyncio.run(connect(untrusted, name="test", first_connect_timeout=5))
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait(10)


# -- systemd units -----------------------------------------------------------------------------

def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: keys may repeat (Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"{path.name}: stray line {raw!r}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
             "PrivateTmp": "yes", "Restart": "on-failure"}


@pytest.mark.parametrize("unit", ["nats-server.service",
                                  *(f"shipyard-{r}@.service" for r in NODE_ROLES)])
def test_systemd_units_restart_with_backoff_and_run_hardened_as_a_dedicated_user(
        unit: str) -> None:
    sections = read_unit(UNITS / unit)
    service = sections["Service"]
    for key, value in HARDENING.items():
        assert values(service, key) == [value], f"{unit}: {key}"
    assert values(service, "User") and values(service, "User")[0] not in ("root", "0")
    assert float(values(service, "RestartSec")[0]) > 0
    assert int(values(service, "RestartSteps")[0]) > 0
    assert values(service, "RestartMaxDelaySec")
    assert values(sections["Unit"], "StartLimitIntervalSec") == ["0"]  # never gives up
    assert values(sections["Install"], "WantedBy") == ["multi-user.target"]
    assert set(sections) == {"Unit", "Service", "Install"}


@pytest.mark.parametrize("role", NODE_ROLES)
def test_systemd_node_units_run_a_command_shipyard_node_start_accepts(role: str) -> None:
    service = read_unit(UNITS / f"shipyard-{role}@.service")["Service"]
    assert "/etc/shipyard/shipyard.env" in values(service, "EnvironmentFile")
    assert values(service, "LoadCredential") == ["nats.creds:/etc/shipyard/creds/%i.creds"]
    assert "SHIPYARD_NATS_CREDS=%d/nats.creds" in values(service, "Environment")
    (exec_start,) = values(service, "ExecStart")
    argv = shlex.split(exec_start.replace("%i", "node-1").replace("%S", "/var/lib"))
    assert argv[:4] == ["/opt/shipyard/bin/shipyard", "node", "start", role]
    assert argv[-1] == "$SHIPYARD_NODE_ARGS"  # the per-node env file's extra options
    ctx = node_start.make_context("start", argv[3:-1])  # raises on an unknown option
    assert ctx.params["role"] == role and ctx.params["name"] == "node-1"
    if role in DATA_ROLES:
        (state,) = values(service, "StateDirectory")
        assert str(ctx.params["data_dir"]) == f"/var/lib/{state.replace('%i', 'node-1')}"
    else:
        assert ctx.params["data_dir"] is None


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here; the hardening and "
                           "ExecStart tests above still parse every unit")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Binaries moved to where they are on this machine; template units as an instance."""
    shipyard_bin = Path(sys.executable).parent / "shipyard"
    assert shipyard_bin.exists()
    names = []
    for unit in sorted(UNITS.glob("*.service")):
        text = unit.read_text().replace("/opt/shipyard/bin/shipyard", str(shipyard_bin))
        text = text.replace("/usr/local/bin/nats-server", find_binary())
        name = unit.name.replace("@.service", "@node-1.service")
        (tmp_path / name).write_text(text)
        names.append(name)
    assert len(names) == 1 + len(NODE_ROLES)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    version = int(re.search(r"systemd (\d+)", subprocess.run(
        ["systemd-analyze", "--version"], capture_output=True, text=True).stdout).group(1))
    # RestartSteps/RestartMaxDelaySec (the backoff) arrived in systemd 254; older ones
    # ignore them, with this warning, and restart every RestartSec.
    newer = re.compile(r"Unknown key '?(RestartSteps|RestartMaxDelaySec)'?")
    problems = [line for line in proc.stderr.splitlines()
                if line.strip() and not (version < 254 and newer.search(line))]
    assert proc.returncode == 0 and problems == [], proc.stderr


# -- Kubernetes ------------------------------------------------------------------------------

def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def manifests() -> list[dict[str, Any]]:
    return [d for name in kustomization()["resources"] for d in load_all(K8S / name)]


CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "PodMonitor")}


def test_kubernetes_manifests_validate_against_the_kubernetes_schemas() -> None:
    kinds = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name in ("kustomization.yaml", "nats-values.yaml") or "values" in path.name:
            continue
        for doc in load_all(path):
            if (doc["apiVersion"], doc["kind"]) in CRDS:
                continue  # not in the Kubernetes schemas: checked below
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}: {exc.message}")
            kinds.append(doc["kind"])
    assert sorted(set(kinds)) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                                  "Namespace", "PersistentVolumeClaim",
                                  "PodDisruptionBudget", "Service", "StatefulSet"]
    # The validator does catch a misspelt field.
    bad = yaml.safe_load((K8S / "api-hpa.yaml").read_text())
    bad["spec"]["maxReplica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_kubectl_builds_it() -> None:
    k = kustomization()
    listed = set(k["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "nats-values.yaml"}
    assert listed == on_disk
    assert k["namespace"] == "shipyard"
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # the schema test above covers each file; the build needs kubectl
    built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                           timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert len(docs) == len(manifests())
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "shipyard"
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert c["image"] == "registry.example.com/shipyard:0.1.0"


def workloads() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests()
            if d["kind"] in ("Deployment", "StatefulSet")}


def resolve_env(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)


def test_kubernetes_nodes_run_real_commands_with_their_credentials_and_real_probes() -> None:
    config = next(d for d in manifests() if d["kind"] == "ConfigMap")["data"]
    found = workloads()
    assert set(found) == set(NODE_ROLES)
    assert found["automation"]["kind"] == found["api"]["kind"] == "StatefulSet"
    assert found["automation"]["spec"]["volumeClaimTemplates"]
    design_volumes = found["design"]["spec"]["template"]["spec"]["volumes"]
    assert any("persistentVolumeClaim" in v for v in design_volumes)
    for role, doc in found.items():
        pod = doc["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        pod_name = f"{role}-0" if doc["kind"] == "StatefulSet" else role
        env = dict(config, POD_NAME=pod_name)
        for e in c["env"]:
            if "value" in e:
                env[e["name"]] = resolve_env(e["value"], env)
        args = [resolve_env(a, env) for a in c["args"]]
        assert args[:3] == ["node", "start", role]
        ctx = node_start.make_context("start", args[2:])
        assert ctx.params["name"] == pod_name == env["SHIPYARD_NODE_NAME"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]
                   if "secret" in v}
        creds = Path(env["SHIPYARD_NATS_CREDS"])
        assert creds.name == f"{pod_name}.creds"
        assert secrets[mounts[str(creds.parent)]] == f"shipyard-creds-{role}"
        if role in DATA_ROLES:
            assert str(ctx.params["data_dir"]).startswith("/var/lib/shipyard")
            assert "/var/lib/shipyard" in mounts
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[kind]
            if "httpGet" in probe:
                assert probe["httpGet"]["path"] in PROBES
                assert probe["httpGet"]["port"] in {p["name"] for p in c["ports"]}
                continue
            command = probe["exec"]["command"]
            assert command[:4] == ["shipyard", "node", "health", role]
            hc = node_health.make_context("health", command[3:], default_map={
                "name": env["SHIPYARD_NODE_NAME"]})
            assert hc.params["within"] < probe["timeoutSeconds"]
            # It connects as the probe identity (a viewer), mounted from its Secret.
            probe_creds = Path(env["SHIPYARD_IDENTITY"])
            assert secrets[mounts[str(probe_creds.parent)]] == "shipyard-probe"
    api = found["api"]["spec"]["template"]["spec"]["containers"][0]
    assert {p["path"] for k in ("readinessProbe", "livenessProbe")
            for p in [api[k]["httpGet"]]} == {"/isAlive", "/metrics"}


def test_the_leased_roles_run_an_active_and_a_standby_on_two_hosts_in_every_layout() -> None:
    """The Deployer and Govern hold their role through a lease, so a second instance is a
    standby, not a second actor: Kubernetes runs two pods of each (distinct names, so
    distinct identities; spread over hosts; a drain takes one at a time), and the
    three-host guide starts a second instance of each on another host, with its own
    identity."""
    by_kind: dict[tuple[str, str], dict[str, Any]] = {
        (d["kind"], d["metadata"]["name"]): d for d in manifests()}
    for role in ("deployer", "govern"):
        sts = by_kind[("StatefulSet", role)]["spec"]
        assert sts["replicas"] >= 2 and sts["podManagementPolicy"] == "Parallel"
        assert by_kind[("Service", role)]["spec"]["clusterIP"] == "None"
        assert sts["serviceName"] == role
        labels = sts["selector"]["matchLabels"]
        pdb = by_kind[("PodDisruptionBudget", role)]["spec"]
        assert pdb["selector"]["matchLabels"] == labels and pdb["maxUnavailable"] == 1
        anti = sts["template"]["spec"]["affinity"]["podAntiAffinity"]
        (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == labels
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    guide = (DEPLOY / "README.md").read_text()
    added = {(w[3], w[5]) for w in shipyard_commands(guide)
             if w[:3] == ["auth", "node", "add"] and "--role" in w}
    started = re.findall(r"shipyard-(deployer|govern)@([\w-]+)", guide)
    for role in ("deployer", "govern"):
        # Kubernetes: an identity per pod of the StatefulSet, in the role's Secret.
        for i in range(by_kind[("StatefulSet", role)]["spec"]["replicas"]):
            assert (f"{role}-{i}", role) in added
            assert f"k8s-auth/creds/{role}-{i}.creds" in guide
        # systemd: two instances of the role, each an identity of its own.
        names = {name for r, name in started if r == role}
        assert len(names) >= 2, names
        assert all(name == role or (name, role) in added for name in names)


def test_api_nodes_autoscale_on_the_worker_utilization_metric() -> None:
    (hpa,) = [d for d in manifests() if d["kind"] == "HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", "api")
    assert workloads()["api"]["kind"] == "StatefulSet"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "shipyard_api_worker_utilization"
    assert hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (keda,) = load_all(K8S / "autoscaling" / "keda-scaledobject.yaml")
    assert (keda["apiVersion"], keda["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert keda["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                              "name": "api"}
    assert keda["spec"]["maxReplicaCount"] == hpa["spec"]["maxReplicas"]
    (trigger,) = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "shipyard_api_worker_utilization" in trigger["metadata"]["query"]
    float(trigger["metadata"]["threshold"])
    (monitor,) = load_all(K8S / "autoscaling" / "podmonitor.yaml")
    api_labels = workloads()["api"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= api_labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    adapter = yaml.safe_load((K8S / "autoscaling" / "prometheus-adapter-values.yaml")
                             .read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == "shipyard_api_worker_utilization"


# Keys of the official NATS chart's values.yaml that nats-values.yaml sets
# (github.com/nats-io/k8s, helm/charts/nats/values.yaml, chart 2.14.2, commit 957650f).
# ``merge``/``patch`` take free-form NATS config or JSON patches, ``resources`` and
# ``topologySpreadConstraints`` free-form Kubernetes objects.
NATS_CHART_KEYS = {
    "config.cluster.enabled", "config.cluster.replicas", "config.jetstream.enabled",
    "config.jetstream.fileStore.enabled", "config.jetstream.fileStore.dir",
    "config.jetstream.fileStore.pvc.enabled", "config.jetstream.fileStore.pvc.size",
    "config.nats.tls.enabled", "config.nats.tls.secretName", "config.monitor.enabled",
    "config.merge", "container.patch", "container.resources", "podTemplate.patch",
    "podTemplate.topologySpreadConstraints", "natsBox.enabled",
}


def leaf_paths(data: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in NATS_CHART_KEYS or not isinstance(value, dict):
            yield path
        else:
            yield from leaf_paths(value, path + ".")


def test_nats_helm_values_set_only_chart_keys_and_mount_the_generated_auth() -> None:
    v = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    assert set(leaf_paths(v)) <= NATS_CHART_KEYS, set(leaf_paths(v)) - NATS_CHART_KEYS
    assert v["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert v["config"]["jetstream"]["enabled"] is True
    assert v["config"]["jetstream"]["fileStore"]["enabled"] is True
    # The chart turns "...$include" keys into include directives relative to
    # /etc/nats-config; the file must be where the Secret is mounted.
    (include,) = [val for key, val in v["config"]["merge"].items() if key.endswith("$include")]
    (mount,) = [p["value"] for p in v["container"]["patch"]
                if p["op"] == "add" and p["path"] == "/volumeMounts/-"]
    (volume,) = [p["value"] for p in v["podTemplate"]["patch"]
                 if p["op"] == "add" and p["path"] == "/spec/volumes/-"]
    assert (Path("/etc/nats-config") / include).resolve() == \
        Path(mount["mountPath"]) / "nats-auth.conf"
    assert mount["name"] == volume["name"]
    assert volume["secret"]["secretName"] == "shipyard-nats-auth"
    config = next(d for d in manifests() if d["kind"] == "ConfigMap")["data"]
    assert config["SHIPYARD_NATS_URL"] == "nats://nats:4222"  # the release "nats"
    assert config["SHIPYARD_REPLICAS"] == str(v["config"]["cluster"]["replicas"])


def shipyard_variables_read() -> set[str]:
    """Every SHIPYARD_* environment variable the package's code names."""
    names: set[str] = set()
    for path in (ROOT / "nodes").rglob("*.py"):
        names |= set(re.findall(r"\bSHIPYARD_[A-Z_]+\b", path.read_text()))
    return names


def test_environment_given_to_nodes_names_only_variables_shipyard_reads() -> None:
    known = shipyard_variables_read()
    assert {"SHIPYARD_NATS_URL", "SHIPYARD_NATS_CREDS", "SHIPYARD_REPLICAS"} <= known
    env_file = [line.split("=", 1)[0] for line in (UNITS / "shipyard.env").read_text()
                .splitlines() if line.strip() and not line.startswith("#")]
    config = next(d for d in manifests() if d["kind"] == "ConfigMap")["data"]
    pods = [e["name"] for w in workloads().values()
            for e in w["spec"]["template"]["spec"]["containers"][0]["env"]]
    units = [assignment.split("=", 1)[0] for r in NODE_ROLES
             for line in values(read_unit(UNITS / f"shipyard-{r}@.service")["Service"],
                                "Environment")
             for assignment in line.split()]
    given = {n for n in [*env_file, *config, *pods, *units] if n.startswith("SHIPYARD_")}
    assert "SHIPYARD_NATS_TLS_CA" in env_file and "SHIPYARD_NATS_CREDS" in units
    assert given - known == set(), "variables no code reads"


# -- Dockerfile ------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def test_dockerfile_installs_the_package_on_python_slim_and_runs_shipyard_as_non_root() -> None:
    steps = dockerfile()
    known = {"FROM", "RUN", "COPY", "ENV", "USER", "WORKDIR", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert {i for i, _ in steps} <= known
    froms = [a for i, a in steps if i == "FROM"]
    assert froms and all(a.split()[0] == "python:3.11-slim" for a in froms)
    final = steps[max(n for n, (i, _) in enumerate(steps) if i == "FROM"):]
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert json.loads(next(a for i, a in final if i == "ENTRYPOINT")) == ["shipyard"]
    assert any("pip install" in a and a.rstrip().endswith(".") for i, a in steps if i == "RUN")
    # What COPY takes from the build context exists and is not excluded by .dockerignore.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    sources = [s for i, a in steps if i == "COPY" and not a.startswith("--from")
               for s in a.split()[:-1]]
    assert sources == ["pyproject.toml", "README.md", "protocol", "nodes"]
    for s in sources:
        assert (ROOT / s).exists() and s not in ignored
    # The units and the image agree on where shipyard is installed.
    assert "/opt/shipyard/bin/shipyard" in (UNITS / "shipyard-api@.service").read_text()
    assert any("python -m venv /opt/shipyard" in a for i, a in steps if i == "RUN")


# -- the operator's README ---------------------------------------------------------------------

def shipyard_commands(text: str) -> list[list[str]]:
    """Every ``shipyard ...`` command line in the README's shell blocks."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and (words[0] == "sudo" or re.match(r"^\w+=", words[0])):
                words = words[1:]
            if words and Path(words[0]).name == "shipyard":
                commands.append(words[1:])
    return commands


def unparsed(ctx: click.Context) -> list[str]:
    """What a group's context left for its sub-command (click 8 keeps the sub-command's
    name apart, in a private list; click 9 puts it in ``args``)."""
    return [*getattr(ctx, "_protected_args", []), *ctx.args]


def test_every_shipyard_command_in_the_deploy_readme_is_one_the_cli_accepts() -> None:
    commands = shipyard_commands((DEPLOY / "README.md").read_text())
    assert len(commands) >= 10
    for words in commands:
        ctx = cli.make_context("shipyard", list(words))  # raises on a wrong option
        command: click.Command = cli
        rest = unparsed(ctx)
        while isinstance(command, click.Group):
            assert rest, f"incomplete command: shipyard {shlex.join(words)}"
            name, sub, rest = command.resolve_command(ctx, rest)
            assert sub is not None and name is not None
            ctx = sub.make_context(name, rest, parent=ctx)
            command = sub
            rest = unparsed(ctx) if isinstance(sub, click.Group) else []


# -- shipyard node health / shipyard auth publish ---------------------------------------------

def test_node_health_passes_while_a_node_beats_and_fails_once_it_is_killed(
        tmp_path: Path, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With auth on: identities published by 'auth publish', a Govern node started the way
    its systemd unit starts it, the check run as a viewer the way the Kubernetes probes
    run it."""
    monkeypatch.chdir(tmp_path)  # the in-process CLI calls find no stack.json
    for key in [k for k in os.environ if k.startswith("SHIPYARD_")]:
        monkeypatch.delenv(key)
    with auth_stack(tmp_path, ("probe", "user", "viewer", None)) as stack:
        url = stack.server.url
        auth_dir = str(stack.store.dir)
        first = shipyard("auth", "publish", "--dir", auth_dir, "--nats", url, "--json",
                         env=cli_env, cwd=tmp_path, check=True)
        assert json.loads(first.stdout)["changed"] == 8
        with pytest.raises(SystemExit) as again:  # in this process: a second CLI start
            main(["auth", "publish", "--dir", auth_dir, "--nats", url, "--json"])
        assert again.value.code == 0
        assert json.loads(capsys.readouterr().out)["changed"] == 0  # safe to repeat
        # The Govern node as its systemd unit starts it: ExecStart with the instance name,
        # the credential systemd hands over, and extra options from SHIPYARD_NODE_ARGS.
        service = read_unit(UNITS / "shipyard-govern@.service")["Service"]
        (exec_start,) = values(service, "ExecStart")
        credentials = tmp_path / "credentials"
        credentials.mkdir()
        shutil.copy(stack.store.creds_path("govern"), credentials / "nats.creds")
        argv = []
        for word in shlex.split(exec_start.replace("%i", "govern")):
            if word == "$SHIPYARD_NODE_ARGS":
                argv += ["--heartbeat-interval", "0.2"]
            else:
                argv.append(word.replace("/opt/shipyard/bin/shipyard",
                                         str(Path(sys.executable).parent / "shipyard")))
        unit_env = dict(cli_env, SHIPYARD_NATS_URL=url)
        for line in values(service, "Environment"):
            for assignment in line.split():
                key, _, value = assignment.partition("=")
                unit_env[key] = value.replace("%d", str(credentials))
        node = Background(argv, env=unit_env, cwd=tmp_path)
        try:
            node.wait_line("node ready", timeout=30)
            probe_env = dict(cli_env, SHIPYARD_NODE_NAME="govern", SHIPYARD_NATS_URL=url,
                             SHIPYARD_IDENTITY=str(stack.store.creds_path("probe")),
                             SHIPYARD_NATS_CREDS=str(stack.store.creds_path("govern")))
            ok = shipyard("node", "health", "govern", "--json", env=probe_env, cwd=tmp_path)
            assert ok.returncode == 0, ok.stderr
            beat = json.loads(ok.stdout)
            assert (beat["node"], beat["role"], beat["pid"]) == ("govern", "govern",
                                                                 node.proc.pid)
            with pytest.raises(SystemExit) as as_node:
                main(["--identity", str(stack.store.creds_path("govern")), "--nats", url,
                      "node", "health", "govern", "--name", "govern"])
            assert as_node.value.code == 2
            assert "may not read heartbeats" in capsys.readouterr().err
        finally:
            node.stop(signal.SIGKILL)
        with pytest.raises(SystemExit) as gone:
            main(["--identity", str(stack.store.creds_path("probe")), "--nats", url, "node",
                  "health", "govern", "--name", "govern", "--within", "1"])
        assert gone.value.code == 1
        assert capsys.readouterr().err == ("shipyard: no heartbeat from govern node 'govern' "
                                           "within 1s\n")

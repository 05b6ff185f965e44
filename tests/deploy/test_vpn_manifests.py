"""Checks of deploy/'s WireGuard variants (issue 20 §2) that need no Docker engine or
cluster: the `wireguard` sidecar image and its entrypoint, the compose files of an
edge and of a worker (deploy/vpn/), the Kubernetes overlays (deploy/k8s/vpn-edge,
deploy/k8s/vpn-worker) and the systemd drop-ins (deploy/systemd/vpn/). Each agrees
with the real CLIs, with what `edge-proxy vpn init` writes and with the firewall of
docs/vpn.md. Each checker returns problems; the `*_is_caught` tests feed it a broken
copy to show it can fail. The entrypoint itself runs for real in
tests/netns/test_vpn_nat.py."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from edge_proxy import direct_spec, vpn
from tests.deploy.test_manifests import (
    DEPLOY,
    DOCKER,
    K8S,
    LOOPBACK,
    ROOT,
    SYSTEMD,
    Cli,
    clis,  # noqa: F401 - the module-scoped fixture
    compose_env,
    container_env,
    dockerfiles,
    exec_form,
    image_name,
    k8s_problems,
    kubectl,
    kustomize,
    parse_dockerfile,
    unit,
)

VPN = DEPLOY / "vpn"
ENTRYPOINT = DOCKER / "wireguard-up.sh"
WG_PACKAGES = {"wireguard-go", "wireguard-tools", "iproute2", "nftables"}
K8S_VERSION = "1.30.0"


# ------------------------------------------------------------------------ the image

def wireguard_dockerfile_problems(path: Path) -> list[str]:
    problems: list[str] = []
    final = parse_dockerfile(path)[-1]
    installs = " ".join(i.args for i in final.all("RUN"))
    if "--no-install-recommends" not in installs:
        problems.append("apt-get install without --no-install-recommends (pulls a kernel image)")
    for package in sorted(WG_PACKAGES):
        if not re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", installs):
            problems.append(f"does not install {package}")
    copies = {ins.args.split()[-1]: ins.args.split()[-2] for ins in final.all("COPY")}
    entry = exec_form(final.all("ENTRYPOINT")[-1].args) if final.all("ENTRYPOINT") else []
    if entry[:1] != ["/usr/local/bin/wireguard-up"]:
        problems.append(f"ENTRYPOINT {entry} is not /usr/local/bin/wireguard-up")
    elif copies.get(entry[0]) != str(ENTRYPOINT.relative_to(ROOT)):
        problems.append(f"no COPY of {ENTRYPOINT.relative_to(ROOT)} to {entry[0]}")
    checks = final.all("HEALTHCHECK")
    if not checks or "wireguard-up" not in checks[-1].args or '"check"' not in checks[-1].args:
        problems.append("HEALTHCHECK does not run `wireguard-up check`")
    if final.all("EXPOSE"):
        problems.append("EXPOSE: the compose file publishes the ports of the namespace it owns")
    return problems


def test_wireguard_image_installs_the_tools_and_runs_the_entrypoint() -> None:
    assert wireguard_dockerfile_problems(DOCKER / "wireguard.Dockerfile") == []


def test_wireguard_image_missing_a_tool_is_caught(tmp_path: Path) -> None:
    bad = tmp_path / "wireguard.Dockerfile"
    bad.write_text((DOCKER / "wireguard.Dockerfile").read_text().replace(" wireguard-go", "")
                   .replace("wireguard-up.sh /usr/local/bin/wireguard-up", "wireguard-up.sh /usr/local/bin/wg-up"))
    problems = wireguard_dockerfile_problems(bad)
    assert "does not install wireguard-go" in problems
    assert any(p.startswith("no COPY of deploy/docker/wireguard-up.sh") for p in problems)


def test_entrypoint_is_valid_sh_and_says_what_is_missing(tmp_path: Path) -> None:
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)], capture_output=True).returncode == 0
    out = subprocess.run(["sh", str(ENTRYPOINT)], env={"PATH": "/usr/bin:/bin", "WG_CONF": str(tmp_path / "no.conf")},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "cannot read" in out.stderr and "secret" in out.stderr


def firewall_rules(text: str) -> list[str]:
    """The rule lines of the `chain input` of a ruleset, comments dropped, the interface named wg0."""
    start = text.index("chain input {")
    body = text[start:text.index("}", start)]
    rules = [line.split("#")[0].strip() for line in body.splitlines()[1:]]
    return [re.sub(r'iifname "[^"]+"', 'iifname "wg0"', r) for r in rules if r]


def test_every_worker_firewall_is_the_one_docs_vpn_gives() -> None:
    docs = (ROOT / "docs" / "vpn.md").read_text()
    expected = firewall_rules(docs[docs.index("table inet worker {"):])
    assert 'iifname "wg0" tcp dport 8000 accept' in expected and "policy drop;" in " ".join(expected)
    assert firewall_rules((SYSTEMD / "vpn" / "worker-firewall.nft").read_text()) == expected
    script = ENTRYPOINT.read_text().replace("{ $ports }", "8000").replace('"$ifname"', '"wg0"')
    assert firewall_rules(script) == expected


def test_systemd_firewall_file_loads() -> None:
    if not shutil.which("nft"):
        pytest.skip("nft is not installed (`apt-get install nftables`)")
    out = subprocess.run(["nft", "-c", "-f", str(SYSTEMD / "vpn" / "worker-firewall.nft")], capture_output=True,
                         text=True, timeout=30)
    if out.returncode != 0 and "Operation not permitted" in out.stderr:
        pytest.skip("nft -c needs CAP_NET_ADMIN here")
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------ compose

def load_compose(name: str) -> dict[str, Any]:
    data = yaml.safe_load((VPN / name).read_text())
    assert isinstance(data, dict)
    return data


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def vpn_compose_problems(data: dict[str, Any], role: str, clis: dict[str, Cli]) -> list[str]:  # noqa: F811
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = data["services"]
    secrets: dict[str, dict[str, Any]] = data.get("secrets") or {}
    wg = services.get("wireguard")
    if wg is None:
        return ["no `wireguard` service"]
    for name, svc in services.items():
        image = image_name(str(svc.get("image", "")))
        if image not in dockerfiles():
            problems.append(f"{name}: image {svc.get('image')!r} is built by no deploy/docker/*.Dockerfile")
        build = svc.get("build")
        if build and (VPN / build["context"] / build["dockerfile"]).resolve() != dockerfiles().get(image or ""):
            problems.append(f"{name}: builds {build['dockerfile']} but is tagged {svc.get('image')}")
        for secret in svc.get("secrets", []):
            if secret not in secrets or "file" not in secrets[secret]:
                problems.append(f"{name}: secret {secret} is not declared with a file")
        if "no-new-privileges:true" not in svc.get("security_opt", []) and name != "init":
            problems.append(f"{name}: no no-new-privileges")
    # The sidecar: NET_ADMIN and the TUN device, nothing more; its config a secret.
    if wg.get("cap_drop") != ["ALL"] or wg.get("cap_add") != ["NET_ADMIN"]:
        problems.append(f"wireguard: capabilities drop {wg.get('cap_drop')} add {wg.get('cap_add')}, expected "
                        "ALL and NET_ADMIN")
    if not any(str(d).split(":")[0] == "/dev/net/tun" for d in wg.get("devices", [])):
        problems.append("wireguard: no /dev/net/tun device")
    wg_env = compose_env(wg)
    conf = wg_env.get("WG_CONF", "")
    if not (conf.startswith("/run/secrets/") and conf.removeprefix("/run/secrets/") in wg.get("secrets", [])):
        problems.append(f"wireguard: WG_CONF {conf!r} is not one of its secrets")
    # Everything else lives in the sidecar's network namespace.
    for name, svc in services.items():
        if name in ("wireguard", "init"):
            continue
        if svc.get("network_mode") != "service:wireguard":
            problems.append(f"{name}: network_mode {svc.get('network_mode')!r}, expected service:wireguard")
        if svc.get("ports") or svc.get("networks"):
            problems.append(f"{name}: ports/networks belong to the wireguard service that owns the namespace")
        if (svc.get("depends_on") or {}).get("wireguard", {}).get("condition") != "service_healthy":
            problems.append(f"{name}: does not wait for wireguard to be healthy")
    if role == "worker":
        server = services.get("inference", {})
        env = compose_env(server)
        if wg.get("ports"):
            problems.append("wireguard: a worker publishes ports")
        if server.get("entrypoint", [None])[0] != "inference-server":
            problems.append("inference: does not run inference-server alone (no agent: the edge dials it)")
        host = env.get("INFER_HOST", "")
        if host in LOOPBACK or host in ("0.0.0.0", "::", ""):
            problems.append(f"inference: INFER_HOST {host!r}: it must be the WireGuard address only")
        allowed = wg_env.get("WG_FIREWALL_PORTS", "").split()
        if env.get("INFER_PORT") not in allowed:
            problems.append(f"wireguard: WG_FIREWALL_PORTS {allowed} does not let the edge reach INFER_PORT")
    else:
        edge = services.get("edge", {})
        env = compose_env(edge)
        listen = port_of(env.get("EDGE_LISTEN", clis["edge-proxy"].defaults["--listen"]))
        published = {str(p).rpartition(":")[2] for p in wg.get("ports", [])}
        if f"{listen}/tcp" not in published:
            problems.append(f"wireguard: does not publish the edge's {listen}/tcp ({sorted(published)})")
        if not any(p.endswith("/udp") for p in published):
            problems.append("wireguard: publishes no UDP port for WireGuard")
        directs = env.get("EDGE_DIRECTS", "")
        if not (directs.startswith("/run/secrets/") and directs.removeprefix("/run/secrets/") in edge.get("secrets", [])):
            problems.append(f"edge: EDGE_DIRECTS {directs!r} is not one of its secrets")
        if "WG_FIREWALL_PORTS" in wg_env:
            problems.append("wireguard: the edge's sidecar must not load the worker's input policy")
    return problems


@pytest.mark.parametrize("role", ["edge", "worker"])
def test_vpn_compose_files_agree_with_the_clis(role: str, clis: dict[str, Cli]) -> None:  # noqa: F811
    assert vpn_compose_problems(load_compose(f"{role}.compose.yml"), role, clis) == []


def test_vpn_compose_mistakes_are_caught(clis: dict[str, Cli]) -> None:  # noqa: F811
    worker = copy.deepcopy(load_compose("worker.compose.yml"))
    worker["services"]["inference"]["environment"]["INFER_HOST"] = "0.0.0.0"
    worker["services"]["wireguard"]["cap_add"] = ["NET_ADMIN", "SYS_ADMIN"]
    worker["services"]["wireguard"]["environment"]["WG_FIREWALL_PORTS"] = "22"
    worker["services"]["inference"]["network_mode"] = "bridge"
    problems = vpn_compose_problems(worker, "worker", clis)
    for expected in ("inference: INFER_HOST '0.0.0.0'", "wireguard: capabilities", "WG_FIREWALL_PORTS ['22']",
                     "inference: network_mode 'bridge'"):
        assert any(p.startswith(expected) or expected in p for p in problems), (expected, problems)
    edge = copy.deepcopy(load_compose("edge.compose.yml"))
    edge["services"]["wireguard"]["ports"] = ["8443:8443/tcp"]
    edge["services"]["edge"]["environment"]["EDGE_DIRECTS"] = "/etc/directs"
    problems = vpn_compose_problems(edge, "edge", clis)
    assert "wireguard: publishes no UDP port for WireGuard" in problems
    assert any(p.startswith("edge: EDGE_DIRECTS '/etc/directs'") for p in problems)


# ------------------------------------------------------- agreement with `vpn init`

def test_examples_match_what_vpn_init_writes(tmp_path: Path) -> None:
    """Ports, addresses and direct lines in the manifests are the ones `vpn init` produces by default."""
    state = vpn.init(tmp_path / "vpn", "edge.example.org:51820", 1)
    listen_port = state.listen_port
    worker = state.workers[0]
    edge_compose = load_compose("edge.compose.yml")
    udp = [str(p) for p in edge_compose["services"]["wireguard"]["ports"] if str(p).endswith("/udp")]
    assert [p.rpartition(":")[2] for p in udp] == [f"{listen_port}/udp"]
    worker_compose = load_compose("worker.compose.yml")
    infer_port = int(compose_env(worker_compose["services"]["inference"])["INFER_PORT"])
    # Kubernetes: the sidecar's port, the Service, the worker's address and the ConfigMap's line.
    docs = {(d["kind"], d["metadata"]["name"]): d for f in (K8S / "vpn-edge").glob("*.yaml")
            for d in yaml.safe_load_all(f.read_text()) if d and "kind" in d and d["kind"] != "Kustomization"}
    service = docs[("Service", "edge-wireguard")]
    assert [(p["port"], p["targetPort"], p["protocol"]) for p in service["spec"]["ports"]] == \
        [(listen_port, listen_port, "UDP")]
    sidecar = docs[("Deployment", "edge")]["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["ports"] == [{"name": "wireguard", "containerPort": listen_port, "protocol": "UDP"}]
    lines = docs[("ConfigMap", "edge-directs")]["data"]["directs"]
    (spec,) = direct_spec.parse_lines(lines, "edge-directs")
    (printed,) = direct_spec.parse_lines(vpn.direct_line(worker, "default", infer_port), "vpn init")
    assert spec == printed
    k8s_worker = next(d for d in yaml.safe_load_all((K8S / "vpn-worker" / "worker.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    inference = next(c for c in k8s_worker["spec"]["template"]["spec"]["containers"] if c["name"] == "inference")
    env = container_env(inference)
    assert env["INFER_HOST"] == worker.address and int(env["INFER_PORT"]) == infer_port
    assert urlsplit(spec.url).hostname == worker.address


# --------------------------------------------------------------------------- Kubernetes

def sidecar_problems(pod: dict[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    sidecars = [c for c in pod.get("initContainers", []) if image_name(c["image"]) == "wireguard"]
    if len(sidecars) != 1:
        return [f"{where}: expected one wireguard init container, found {len(sidecars)}"]
    (wg,) = sidecars
    if wg.get("restartPolicy") != "Always":
        problems.append(f"{where}: the wireguard sidecar is not a native sidecar (restartPolicy: Always)")
    ctx = wg.get("securityContext", {})
    caps = ctx.get("capabilities", {})
    if caps.get("drop") != ["ALL"] or caps.get("add") != ["NET_ADMIN"]:
        problems.append(f"{where}: wireguard capabilities {caps}, expected drop ALL add NET_ADMIN")
    if ctx.get("allowPrivilegeEscalation") is not False or ctx.get("privileged"):
        problems.append(f"{where}: wireguard may escalate privileges")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in wg.get("volumeMounts", [])}
    tun = volumes.get(mounts.get("/dev/net/tun", ""), {})
    if tun.get("hostPath") != {"path": "/dev/net/tun", "type": "CharDevice"}:
        problems.append(f"{where}: /dev/net/tun is not the host's TUN device")
    conf = container_env(wg).get("WG_CONF", "")
    folder, _, filename = conf.rpartition("/")
    secret = volumes.get(mounts.get(folder, ""), {}).get("secret")
    if secret is None or filename not in {i["path"] for i in secret.get("items", [])}:
        problems.append(f"{where}: WG_CONF {conf} is not a file of a mounted Secret")
    # The server's container: no ports, and never root.
    for c in pod["containers"]:
        if c.get("securityContext", {}).get("runAsUser") == 0:
            problems.append(f"{where}/{c['name']}: runs as root")
    return problems


@pytest.fixture(scope="module")
def vpn_edge() -> list[dict[str, Any]]:
    if kubectl() is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: the VPN overlays are not rendered")
    return kustomize(K8S / "vpn-edge")


@pytest.fixture(scope="module")
def vpn_worker() -> list[dict[str, Any]]:
    if kubectl() is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: the VPN overlays are not rendered")
    return kustomize(K8S / "vpn-worker")


def pod_security_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Pod Security admission would refuse NET_ADMIN and a hostPath unless the namespace enforces
    `privileged`; `restricted` should stay as the warning for everything else."""
    namespaces = {d["metadata"]["name"]: d["metadata"].get("labels", {}) for d in docs if d["kind"] == "Namespace"}
    problems = []
    for d in docs:
        if d["kind"] == "Deployment" and d["spec"]["template"]["spec"].get("initContainers"):
            labels = namespaces.get(d["metadata"]["namespace"], {})
            if labels.get("pod-security.kubernetes.io/enforce", "privileged") != "privileged":
                problems.append(f"{d['metadata']['name']}: namespace enforces "
                                f"{labels['pod-security.kubernetes.io/enforce']}, which refuses the sidecar")
            if labels.get("pod-security.kubernetes.io/warn") != "restricted":
                problems.append(f"{d['metadata']['name']}: namespace does not warn on `restricted` any more")
    return problems


def example_secret_keys() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d["stringData"]) for f in (K8S / "vpn-edge").glob("*.example.yaml")
            for d in yaml.safe_load_all(f.read_text()) if d}


def edge_vpn_problems(docs: list[dict[str, Any]], clis: dict[str, Cli]) -> list[str]:  # noqa: F811
    # Everything the base must satisfy still holds; the sidecar's Secret has its own example file.
    examples = example_secret_keys()
    problems = [p for p in k8s_problems(docs, clis)
                if not (p == "edge: mounts keys ['wg0.conf'] absent from secrets.example.yaml"
                        and "wg0.conf" in examples.get("wireguard-edge", set()))]
    problems += pod_security_problems(docs)
    edge = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "edge")
    pod = edge["spec"]["template"]["spec"]
    if edge["spec"].get("replicas") != 1 or edge["spec"].get("strategy", {}).get("type") != "Recreate":
        problems.append("edge: one WireGuard key needs exactly one pod at a time (replicas 1, Recreate)")
    problems += sidecar_problems(pod, "edge")
    container = next(c for c in pod["containers"] if c["name"] == "edge")
    directs = container_env(container).get("EDGE_DIRECTS", "")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    folder, _, key = directs.rpartition("/")
    config_map = volumes.get(mounts.get(folder, ""), {}).get("configMap", {}).get("name")
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    if config_map not in maps or key not in maps[config_map].get("data", {}):
        problems.append(f"edge: EDGE_DIRECTS {directs!r} is not a key of a mounted ConfigMap")
    else:
        try:
            direct_spec.parse_lines(maps[config_map]["data"][key], config_map)
        except direct_spec.DirectSpecError as exc:
            problems.append(f"edge: ConfigMap {config_map}: {exc}")
    udp = [s for s in docs if s["kind"] == "Service" and any(p["protocol"] == "UDP" for p in s["spec"]["ports"])]
    if not udp or udp[0]["spec"]["selector"].items() - edge["spec"]["template"]["metadata"]["labels"].items():
        problems.append("no UDP Service selects the edge pods")
    allowed = [p for d in docs if d["kind"] == "NetworkPolicy"
               and d["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "edge"
               for rule in d["spec"].get("ingress", []) for p in rule.get("ports", []) if p["protocol"] == "UDP"]
    if not allowed:
        problems.append("no NetworkPolicy lets WireGuard's UDP in to the edge")
    return problems


def test_k8s_vpn_edge_overlay(vpn_edge: list[dict[str, Any]], clis: dict[str, Cli]) -> None:  # noqa: F811
    assert edge_vpn_problems(vpn_edge, clis) == []


def test_k8s_vpn_edge_mistakes_are_caught(vpn_edge: list[dict[str, Any]], clis: dict[str, Cli]) -> None:  # noqa: F811
    bad = copy.deepcopy(vpn_edge)
    edge = next(d for d in bad if d["kind"] == "Deployment" and d["metadata"]["name"] == "edge")
    edge["spec"]["strategy"] = {"type": "RollingUpdate"}
    pod = edge["spec"]["template"]["spec"]
    pod["initContainers"][0]["securityContext"]["capabilities"]["add"] = ["NET_ADMIN", "SYS_ADMIN"]
    next(v for v in pod["volumes"] if v["name"] == "directs")["configMap"]["name"] = "edge-direct"
    next(d for d in bad if d["kind"] == "Namespace")["metadata"]["labels"] = {
        "pod-security.kubernetes.io/enforce": "restricted"}
    problems = edge_vpn_problems(bad, clis)
    assert any("namespace enforces restricted" in p for p in problems)
    assert any(p.startswith("edge: one WireGuard key") for p in problems)
    assert any("wireguard capabilities" in p for p in problems)
    assert any(p.startswith("edge: EDGE_DIRECTS") for p in problems)


def test_k8s_vpn_worker(vpn_worker: list[dict[str, Any]]) -> None:
    assert pod_security_problems(vpn_worker) == []
    deployments = [d for d in vpn_worker if d["kind"] == "Deployment"]
    assert len(deployments) == 1 and deployments[0]["spec"]["replicas"] == 1
    pod = deployments[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert sidecar_problems(pod, "worker") == []
    (wg,) = pod["initContainers"]
    (server,) = pod["containers"]
    env = container_env(server)
    assert env["INFER_HOST"] not in LOOPBACK | {"0.0.0.0"}
    assert env["INFER_PORT"] in container_env(wg)["WG_FIREWALL_PORTS"].split()
    assert not server.get("ports") and not [d for d in vpn_worker if d["kind"] == "Service"]
    labels = deployments[0]["spec"]["template"]["metadata"]["labels"]
    (policy,) = [d for d in vpn_worker if d["kind"] == "NetworkPolicy"]
    assert not policy["spec"]["podSelector"]["matchLabels"].items() - labels.items()
    assert policy["spec"]["ingress"] == [] and "Ingress" in policy["spec"]["policyTypes"]
    assert any(p == {"port": 51820, "protocol": "UDP"} for rule in policy["spec"]["egress"]
               for p in rule.get("ports", []))


def test_k8s_vpn_overlays_are_schema_valid(vpn_edge: list[dict[str, Any]],
                                           vpn_worker: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in vpn_edge + vpn_worker:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- systemd

def test_systemd_drop_ins_order_the_units_after_wg_quick(clis: dict[str, Cli]) -> None:  # noqa: F811
    edge = unit(SYSTEMD / "vpn" / "edge-proxy-wireguard.conf")
    assert "wg-quick@wg0.service" in edge.get("Unit", "After").split()
    assert "wg-quick@wg0.service" in edge.get("Unit", "Wants").split()
    env = dict(re.findall(r"([A-Z_]+)=(\S+)", edge.get("Service", "Environment")))
    assert set(env) <= clis["edge-proxy"].env and "EDGE_DIRECTS" in env
    assert "-HUP" in edge.get("Service", "ExecReload")
    server = unit(SYSTEMD / "vpn" / "inference-server-wireguard.conf")
    # It binds the WireGuard address: it cannot start before wg0 has it, and stops with it.
    assert "wg-quick@wg0.service" in server.get("Unit", "Requires").split()
    assert {"wg-quick@wg0.service", "nftables.service"} <= set(server.get("Unit", "After").split())

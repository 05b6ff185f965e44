"""Checks of deploy/ that need no Docker engine or cluster: every YAML, Dockerfile and
unit parses, and each agrees with the real command lines (env names, ports, images).

The CLIs are asked for their `--help` (which names each option's environment
variable in parentheses), so a misspelt or stale variable in any manifest fails
here. Each checker returns a list of problems; the `*_is_caught` tests feed it a
broken copy to show it can fail.
"""

from __future__ import annotations

import base64
import configparser
import copy
import importlib.util
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
COMPOSE = DEPLOY / "docker-compose.yml"
VPN_COMPOSE = sorted((DEPLOY / "vpn").glob("*.compose.yml"))  # WireGuard variants: tests/deploy/test_vpn_manifests.py
# The WireGuard sidecar runs as root with NET_ADMIN only (it creates the TUN interface): checked on its own terms.
ROOT_IMAGES = {"wireguard"}
IMAGE_REPO = "edge-inference"  # images are named edge-inference/<Dockerfile stem>
PREFIX_PROGRAM = {"EDGE_": "edge-proxy", "AGENT_": "worker-agent", "INFER_": "inference-server"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

Env = dict[str, str]


# --------------------------------------------------------------------------- the CLIs

HELP_COMMANDS = {
    "edge-proxy": ["-m", "edge_proxy", "serve", "--help"],
    "worker-agent": ["-m", "worker_agent", "--help"],
    "inference-server": ["-m", "inference", "serve", "--help"],
}


def _help_text(program: str) -> str:
    # Without the callers' EDGE_/AGENT_/INFER_ variables, so defaults are the CLI's own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(PREFIX_PROGRAM))}
    env["COLUMNS"] = "400"  # one line per option
    out = subprocess.run([sys.executable, *HELP_COMMANDS[program]], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=120)
    assert out.returncode == 0, f"{program} --help failed: {out.stderr[-2000:]}"
    return out.stdout


def inference_cli_exists() -> bool:
    return importlib.util.find_spec("inference.cli") is not None


@dataclass
class Cli:
    env: set[str]  # every environment variable the program reads
    defaults: dict[str, str]  # option -> default shown by --help


def parse_help(text: str) -> Cli:
    """Env names are written `(NAME)` or `(NAME, comma-separated)` after each option's help."""
    joined = re.sub(r"\s+", " ", text)
    names = set(re.findall(r"\(((?:EDGE|AGENT|INFER)_[A-Z0-9_]+)[,)]", joined))
    # One block per option: its `  --name METAVAR` line plus the indented help lines under it.
    blocks: list[str] = []
    for line in text.splitlines():
        if re.match(r"\s{1,4}-", line):
            blocks.append(line)
        elif blocks and line.startswith(" " * 5):
            blocks[-1] += " " + line.strip()
        else:
            blocks.append("")
    defaults = {}
    for block in blocks:
        option = re.search(r"--[a-z0-9-]+", block)
        default = re.search(r"[(,] ?default: (.*)\)\s*$", block)
        if option and default:
            defaults[option.group(0)] = default.group(1)
    return Cli(names, defaults)


@pytest.fixture(scope="module")
def clis() -> dict[str, Cli]:
    programs = ["edge-proxy", "worker-agent"] + (["inference-server"] if inference_cli_exists() else [])
    return {p: parse_help(_help_text(p)) for p in programs}


def test_help_parser_finds_the_documented_variables(clis: dict[str, Cli]) -> None:
    # Guards the parser itself: if it found nothing, every later check would pass vacuously.
    assert {"EDGE_LISTEN", "EDGE_CERT", "EDGE_KEY", "EDGE_CLIENT_KEYS", "EDGE_WORKER_TOKENS"} <= clis["edge-proxy"].env
    assert {"AGENT_EDGE", "AGENT_TOKEN", "AGENT_TOKEN_FILE", "AGENT_CA", "AGENT_UPSTREAM", "AGENT_POOL",
            "AGENT_CAPACITY", "AGENT_LABELS"} <= clis["worker-agent"].env
    assert clis["edge-proxy"].defaults["--listen"].endswith(":8443")


# ------------------------------------------------------------------- parsing the files

@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Line by line: comments dropped, `\\` continuations joined, grouped by FROM."""
    stages: list[Stage] = []
    pending, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are ignored by Docker too
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert m, f"{path.name}:{n}: cannot parse FROM {args!r}"
            stages.append(Stage(m.group(1), m.group(2)))
        else:
            assert stages or keyword == "ARG", f"{path.name}:{n}: {keyword} before the first FROM"
            if stages:
                stages[-1].instructions.append(Instruction(keyword, args.strip(), start))
    assert not pending, f"{path.name}: ends inside a continued line"
    return stages


def dockerfile_env(stage: Stage) -> Env:
    env: Env = {}
    for ins in stage.all("ENV"):
        for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S*)', ins.args):
            env[key] = value.strip('"')
    return env


def exec_form(args: str) -> list[str]:
    value = yaml.safe_load(args)  # a JSON array is valid YAML
    assert isinstance(value, list), f"not exec form: {args!r}"
    return [str(v) for v in value]


def dockerfiles() -> dict[str, Path]:
    return {p.name.removesuffix(".Dockerfile"): p for p in sorted(DOCKER.glob("*.Dockerfile"))}


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def unit(path: Path) -> configparser.ConfigParser:
    # systemd allows repeated keys (the last wins, or they accumulate): strict=False.
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";"))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text(), source=str(path))
    return cp


def unit_environment(cp: configparser.ConfigParser) -> Env:
    env: Env = {}
    for line in cp.get("Service", "Environment", fallback="").splitlines():
        for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S*)', line):
            env[key] = value.strip('"')
    return env


def env_file(path: Path) -> tuple[Env, set[str]]:
    """(set variables, names mentioned in commented-out default lines)."""
    env: Env = {}
    commented: set[str] = set()
    for line in path.read_text().splitlines():
        if m := re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line.strip()):
            env[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"#([A-Z][A-Z0-9_]*)=.*", line.strip()):
            commented.add(m.group(1))
    return env, commented


def compose_env(service: dict[str, Any]) -> Env:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(k): str(v) for k, v in raw.items()}


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every manifest document under deploy/k8s (Kustomize patches included), with its file."""
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for d in load_yaml(path):
            docs.append((str(path.relative_to(ROOT)), d))
    return docs


def pod_templates(docs: list[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, workload document, pod spec) for Deployments and StatefulSets."""
    for where, d in docs:
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            spec = d.get("spec", {}).get("template", {}).get("spec", {})
            yield f"{where}:{d['kind']}/{d['metadata']['name']}", d, spec


def container_env(container: dict[str, Any]) -> Env:
    return {e["name"]: str(e.get("value", "<from:valueFrom>")) for e in container.get("env", [])}


def kubectl() -> str | None:
    return shutil.which("kubectl")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    exe = kubectl()
    assert exe is not None
    out = subprocess.run([exe, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


# ------------------------------------------------ where each environment variable is set

def env_sources() -> dict[str, set[str]]:
    """Every place deploy/ sets an environment variable -> the names it sets."""
    sources: dict[str, set[str]] = {}
    for name, path in dockerfiles().items():
        for stage in parse_dockerfile(path):
            sources.setdefault(f"{name}.Dockerfile", set()).update(dockerfile_env(stage))
    for sname, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        sources[f"docker-compose.yml:{sname}"] = set(compose_env(service))
    for path in VPN_COMPOSE:
        for sname, service in yaml.safe_load(path.read_text())["services"].items():
            sources[f"vpn/{path.name}:{sname}"] = set(compose_env(service))
    for where, _doc, spec in pod_templates(k8s_documents()):
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            sources[f"{where}:{c['name']}"] = set(container_env(c))
    for path in sorted(SYSTEMD.glob("*.service")):
        sources[path.name] = set(unit_environment(unit(path)))
    for path in sorted(SYSTEMD.glob("*.env")):
        env, commented = env_file(path)
        sources[path.name] = set(env) | commented
    return sources


def unknown_env_names(sources: dict[str, set[str]], clis: dict[str, Cli], prefix: str) -> list[str]:
    program = PREFIX_PROGRAM[prefix]
    known = clis[program].env
    return [f"{where}: {name} is not an option of {program} (known: {', '.join(sorted(known))})"
            for where, names in sources.items() for name in sorted(names)
            if name.startswith(prefix) and name not in known]


@pytest.mark.parametrize("prefix", sorted(PREFIX_PROGRAM))
def test_every_prefixed_variable_is_a_real_cli_option(prefix: str, clis: dict[str, Cli]) -> None:
    if PREFIX_PROGRAM[prefix] not in clis:
        pytest.skip("inference/cli.py does not exist yet: INFER_* names are unchecked until it does")
    sources = env_sources()
    assert any(name.startswith(prefix) for names in sources.values() for name in names), f"no {prefix}* found"
    assert unknown_env_names(sources, clis, prefix) == []


def test_a_misspelt_variable_is_caught(clis: dict[str, Cli]) -> None:
    sources = env_sources()
    sources["docker-compose.yml:edge"] = sources["docker-compose.yml:edge"] | {"EDGE_LISTN"}
    sources["worker-agent.env"] = sources["worker-agent.env"] | {"AGENT_TOKENFILE"}
    problems = unknown_env_names(sources, clis, "EDGE_") + unknown_env_names(sources, clis, "AGENT_")
    assert [p.split(" is ")[0] for p in problems] == ["docker-compose.yml:edge: EDGE_LISTN",
                                                      "worker-agent.env: AGENT_TOKENFILE"]


# ------------------------------------------------------------------------ Dockerfiles

def dockerfile_problems(path: Path) -> list[str]:
    problems: list[str] = []
    stages = parse_dockerfile(path)
    final = stages[-1]
    names = {s.name for s in stages if s.name}
    if len(stages) < 2:
        problems.append("not multi-stage")
    users = final.all("USER")
    if not users:
        problems.append("final stage has no USER (would run as root)")
    elif users[-1].args.split(":")[0] in ("root", "0", ""):
        problems.append(f"final stage runs as {users[-1].args!r}")
    elif not users[-1].args.split(":")[0].isdigit():
        problems.append("USER should be numeric so Kubernetes runAsNonRoot can verify it")
    checks = final.all("HEALTHCHECK")
    if not checks or checks[-1].args.upper().startswith("NONE"):
        problems.append("final stage has no HEALTHCHECK")
    if not final.all("VOLUME"):
        problems.append("no VOLUME")
    for stage in stages:
        for ins in stage.all("COPY") + stage.all("ADD"):
            words = [w for w in ins.args.split() if not w.startswith("--")]
            src_from = re.search(r"--from=(\S+)", ins.args)
            if src_from:
                if src_from.group(1) not in names:
                    problems.append(f"line {ins.line}: COPY --from={src_from.group(1)} names no stage")
                continue
            for src in words[:-1]:  # the build context is the repository root
                if not (ROOT / src).exists():
                    problems.append(f"line {ins.line}: COPY source {src} does not exist in the repository")
    # Files the final stage runs must be copied into it.
    copied = {w.split()[-1] for w in (i.args for i in final.all("COPY"))}
    for ins in final.all("HEALTHCHECK") + final.all("ENTRYPOINT"):
        for word in re.findall(r"/usr/local/bin/[\w.-]+", ins.args):
            if word not in copied:
                problems.append(f"line {ins.line}: runs {word}, which no COPY puts there")
    return problems


@pytest.mark.parametrize("name", sorted(set(dockerfiles()) - ROOT_IMAGES))
def test_dockerfile_is_multistage_non_root_with_healthcheck(name: str) -> None:
    assert dockerfile_problems(dockerfiles()[name]) == []


def test_dockerfile_running_as_root_is_caught(tmp_path: Path) -> None:
    text = (DOCKER / "edge.Dockerfile").read_text()
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text(re.sub(r"^USER .*$", "USER root", text, flags=re.M).replace("HEALTHCHECK", "# HEALTHCHECK", 1)
                   .replace("COPY deploy/docker/healthcheck.py", "COPY deploy/docker/healthchek.py"))
    problems = dockerfile_problems(bad)
    assert any("runs as 'root'" in p for p in problems)
    assert any("no HEALTHCHECK" in p for p in problems)
    assert any("healthchek.py does not exist" in p for p in problems)


def test_images_are_the_expected_four() -> None:
    assert sorted(dockerfiles()) == ["edge", "wireguard", "worker-opencv", "worker-tf-gpu"]


@pytest.mark.parametrize("name", ["worker-opencv", "worker-tf-gpu"])
def test_worker_image_runs_both_processes_and_caches_models(name: str, clis: dict[str, Cli]) -> None:
    final = parse_dockerfile(dockerfiles()[name])[-1]
    env = dockerfile_env(final)
    assert exec_form(final.all("ENTRYPOINT")[-1].args)[-1] == "/usr/local/bin/worker-entrypoint"
    volumes = {v for ins in final.all("VOLUME") for v in exec_form(ins.args)}
    assert env["INFER_CACHE_DIR"] in volumes, "the model cache must be a volume"
    assert env["INFER_HOST"] in LOOPBACK, "the inference server must not listen beyond the container"
    assert urlsplit(env["AGENT_UPSTREAM"]).port == int(env["INFER_PORT"])
    assert not final.all("EXPOSE"), "a worker accepts no inbound connection"
    backend = {"worker-opencv": "opencv-dnn", "worker-tf-gpu": "tensorflow"}[name]
    assert env["INFER_BACKEND"] == backend


def test_edge_image_exposes_the_cli_default_port(clis: dict[str, Cli]) -> None:
    final = parse_dockerfile(DOCKER / "edge.Dockerfile")[-1]
    env = dockerfile_env(final)
    port = clis["edge-proxy"].defaults["--listen"].rpartition(":")[2]
    assert [i.args for i in final.all("EXPOSE")] == [port]
    assert env["EDGE_LISTEN"].rpartition(":")[2] == port
    assert exec_form(final.all("ENTRYPOINT")[-1].args) == ["edge-proxy"]


def transitive_closure(names: set[str], normalise: Any) -> set[str]:
    """`names` plus everything they depend on (unconditionally) in this environment:
    e.g. multidict, which the edge imports and aiohttp brings along."""
    from importlib.metadata import PackageNotFoundError, requires

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        todo += [normalise(r) for r in reqs if "extra ==" not in r and "extra==" not in r]
    return seen


def test_edge_image_requirements_cover_the_edge_imports() -> None:
    """The edge image installs only some dependencies: every third-party module that
    tunnel/ and edge_proxy/ import must come from one of them."""
    out = subprocess.run([sys.executable, str(DOCKER / "requirements.py"), "edge", "--pyproject",
                          str(ROOT / "pyproject.toml")], capture_output=True, text=True, check=True)
    from importlib.metadata import packages_distributions

    spec = importlib.util.spec_from_file_location("deploy_requirements", DOCKER / "requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    distribution_name = module.distribution_name
    installed = transitive_closure({distribution_name(line) for line in out.stdout.splitlines() if line.strip()},
                                   distribution_name)
    dists = packages_distributions()
    imported: set[str] = set()
    ours = ("tunnel", "relay", "httpcontract", "runtime", "edge_proxy")
    for package in ours:
        for path in (ROOT / package).rglob("*.py"):
            for m in re.finditer(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", path.read_text(), re.M):
                imported.add(m.group(1))
    third_party = {m for m in imported if m in dists and m not in ours}
    needed = {distribution_name(d) for m in third_party for d in dists[m]}
    assert needed, "found no third-party import at all: the scan is broken"
    assert needed <= installed, f"edge image lacks {sorted(needed - installed)}"


# --------------------------------------------------------------------------- compose

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def image_name(ref: str) -> str | None:
    """`edge-inference/worker-opencv:${TAG:-latest}` -> `worker-opencv`."""
    m = re.fullmatch(rf"{IMAGE_REPO}/([a-z0-9-]+)(?::\S+)?", ref)
    return m.group(1) if m else None


def compose_problems(data: dict[str, Any], clis: dict[str, Cli]) -> list[str]:
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = data["services"]
    networks: dict[str, dict[str, Any] | None] = data.get("networks", {})
    internal = {n for n, spec in networks.items() if spec and spec.get("internal") is True}
    edge_port = int(clis["edge-proxy"].defaults["--listen"].rpartition(":")[2])
    if not internal:
        problems.append("no network with internal: true")
    for name, svc in services.items():
        image = image_name(str(svc.get("image", "")))
        if image not in dockerfiles():
            problems.append(f"{name}: image {svc.get('image')!r} is built by no deploy/docker/*.Dockerfile")
        build = svc.get("build")
        if build:
            dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
            if dockerfile != dockerfiles().get(image or ""):
                problems.append(f"{name}: builds {build['dockerfile']} but is tagged {svc.get('image')}")
        for vol in svc.get("volumes", []):
            source = str(vol).split(":")[0]
            if source not in (data.get("volumes") or {}):
                problems.append(f"{name}: volume {source} is not declared")
        env = compose_env(svc)
        svc_networks = svc.get("networks", [])
        svc_networks = list(svc_networks) if isinstance(svc_networks, list | dict) else []
        if image and image.startswith("worker-"):
            if svc.get("ports") or svc.get("expose"):
                problems.append(f"{name}: a worker publishes ports")
            if svc.get("network_mode"):
                problems.append(f"{name}: a worker must not use network_mode")
            if not svc_networks or set(svc_networks) - internal:
                problems.append(f"{name}: a worker must sit on internal networks only, not {svc_networks}")
            if env.get("INFER_HOST") not in LOOPBACK:
                problems.append(f"{name}: INFER_HOST must be loopback")
            if urlsplit(env.get("AGENT_UPSTREAM", "")).port != int(env.get("INFER_PORT", "-1")):
                problems.append(f"{name}: AGENT_UPSTREAM port differs from INFER_PORT")
            for url in env.get("AGENT_EDGE", "").split(","):
                parts = urlsplit(url)
                target = services.get(parts.hostname or "")
                if parts.scheme != "wss" or parts.path != "/_edge/tunnel":
                    problems.append(f"{name}: AGENT_EDGE {url!r} is not wss://HOST:PORT/_edge/tunnel")
                elif target is None:
                    problems.append(f"{name}: AGENT_EDGE host {parts.hostname} is no service")
                else:
                    listen = compose_env(target).get("EDGE_LISTEN", f":{edge_port}")
                    if parts.port != int(listen.rpartition(":")[2]):
                        problems.append(f"{name}: AGENT_EDGE port {parts.port} is not the edge's {listen}")
                    if not set(target.get("networks", [])) & set(svc_networks):
                        problems.append(f"{name}: shares no network with {parts.hostname}")
            for key in ("AGENT_TOKEN_FILE", "AGENT_CA"):
                if key not in env:
                    problems.append(f"{name}: {key} not set")
        elif image == "edge" and name != "init":
            listen_port = int(env.get("EDGE_LISTEN", f":{edge_port}").rpartition(":")[2])
            published = [str(p) for p in svc.get("ports", [])]
            if not published or any(int(p.rpartition(":")[2].split("/")[0]) != listen_port for p in published):
                problems.append(f"{name}: publishes {published}, the edge listens on {listen_port}")
            if not set(svc_networks) - internal:
                problems.append(f"{name}: the edge must be on a public network")
            if not set(svc_networks) & internal:
                problems.append(f"{name}: the edge must be on the internal network to be dialled")
    published_by = [n for n, s in services.items() if s.get("ports")]
    if [image_name(services[n]["image"]) for n in published_by] != ["edge"]:
        problems.append(f"only the edge may publish ports, not {published_by}")
    return problems


def test_compose_reproduces_the_diagram(compose: dict[str, Any], clis: dict[str, Cli]) -> None:
    assert compose_problems(compose, clis) == []


def test_compose_worker_with_a_port_or_on_the_public_network_is_caught(compose: dict[str, Any],
                                                                         clis: dict[str, Cli]) -> None:
    bad = copy.deepcopy(compose)
    bad["services"]["worker-opencv"]["ports"] = ["8000:8000"]
    bad["services"]["worker-tf-gpu"]["networks"] = ["internal", "public"]
    bad["services"]["worker-tf-gpu"]["environment"]["AGENT_EDGE"] = "wss://edge:9443/_edge/tunnel"
    bad["services"]["edge"]["image"] = "edge-inference/egde:latest"
    problems = compose_problems(bad, clis)
    assert any(p.startswith("worker-opencv: a worker publishes ports") for p in problems)
    assert any(p.startswith("worker-tf-gpu: a worker must sit on internal networks only") for p in problems)
    assert any("AGENT_EDGE port 9443" in p for p in problems)
    assert any("egde" in p for p in problems)


def test_compose_init_runs_without_network_and_others_wait_for_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["init"]["network_mode"] == "none"
    assert services["init"]["entrypoint"] == ["edge-init"]
    for name, svc in services.items():
        if name != "init":
            assert svc["depends_on"]["init"]["condition"] == "service_completed_successfully", name


# --------------------------------------------------------------------------- Kubernetes

K8S_VERSION = "1.30.0"  # the oldest supported minor at the time of writing


@pytest.fixture(scope="module")
def k8s_base() -> list[dict[str, Any]]:
    base = K8S / "base"
    files = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    return [d for f in files for d in load_yaml(base / f)]


def test_every_k8s_manifest_is_valid_against_the_api_schema() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    problems = []
    patches = {str((k.parent / p["path"]).relative_to(ROOT)) for k in K8S.rglob("kustomization.yaml")
               for p in yaml.safe_load(k.read_text()).get("patches", []) if "path" in p}
    assert patches, "found no Kustomize patch files: the scale-out overlay has changed shape"
    for where, doc in k8s_documents():
        if doc.get("kind") == "Kustomization" or where in patches:
            continue  # partial documents; checked by rendering the overlay below
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert problems == []


def test_a_misspelt_k8s_field_is_caught(k8s_base: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = copy.deepcopy(next(d for d in k8s_base if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def k8s_problems(docs: list[dict[str, Any]], clis: dict[str, Cli]) -> list[str]:
    """Cross-references inside one rendered set of manifests."""
    problems: list[str] = []
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    secrets_example = {d["metadata"]["name"]: set(d["stringData"]) for d in load_yaml(K8S / "secrets.example.yaml")}
    edge_port = None
    edge_labels: dict[str, str] = {}
    for w in workloads:
        name, pod = w["metadata"]["name"], w["spec"]["template"]
        labels = pod["metadata"]["labels"]
        if w["spec"]["selector"]["matchLabels"].items() - labels.items():
            problems.append(f"{name}: selector does not match its pod labels")
        ctx = pod["spec"].get("securityContext", {})
        if not ctx.get("runAsNonRoot") or ctx.get("runAsUser", 0) == 0:
            problems.append(f"{name}: pods must run as a non-root uid")
        for vol in pod["spec"].get("volumes", []):
            if "secret" in vol:
                keys = {i["key"] for i in vol["secret"].get("items", [])}
                missing = keys - secrets_example.get(vol["secret"]["secretName"], set())
                if missing:
                    problems.append(f"{name}: mounts keys {sorted(missing)} absent from secrets.example.yaml")
        for c in pod["spec"]["containers"]:
            image = image_name(c["image"])
            if image not in dockerfiles():
                problems.append(f"{name}/{c['name']}: image {c['image']} is built by no Dockerfile")
            env = container_env(c)
            if image == "edge":
                edge_labels = labels
                edge_port = int(env.get("EDGE_LISTEN", clis["edge-proxy"].defaults["--listen"]).rpartition(":")[2])
                if [p["containerPort"] for p in c.get("ports", [])] != [edge_port]:
                    problems.append(f"{name}: containerPort differs from EDGE_LISTEN {edge_port}")
            elif image and image.startswith("worker-"):
                if c.get("ports"):
                    problems.append(f"{name}/{c['name']}: a worker container declares ports")
                if "INFER_HOST" in env and env["INFER_HOST"] not in LOOPBACK:
                    problems.append(f"{name}/{c['name']}: INFER_HOST must be loopback")
    # Agents: upstream is the pod's own inference container; every edge URL resolves.
    for w in workloads:
        name, spec = w["metadata"]["name"], w["spec"]["template"]["spec"]
        envs = {c["name"]: container_env(c) for c in spec["containers"]}
        agents = [e for e in envs.values() if "AGENT_EDGE" in e]
        servers = [e for e in envs.values() if "INFER_PORT" in e]
        for agent in agents:
            if not servers or urlsplit(agent["AGENT_UPSTREAM"]).port != int(servers[0]["INFER_PORT"]):
                problems.append(f"{name}: AGENT_UPSTREAM does not reach the inference container beside it")
            for url in agent["AGENT_EDGE"].split(","):
                parts = urlsplit(url)
                host = parts.hostname or ""
                # edge-tunnel, or edge-N.edge-peers for a StatefulSet pod
                svc_name = host.split(".")[1] if re.fullmatch(r"[a-z0-9-]+-\d+\.[a-z0-9-]+(\..*)?", host) \
                    else host.split(".")[0]
                svc = services.get(svc_name)
                if svc is None:
                    problems.append(f"{name}: AGENT_EDGE host {host} names no Service")
                    continue
                if svc["spec"]["selector"].items() - edge_labels.items() or not edge_labels:
                    problems.append(f"{name}: Service {svc_name} does not select the edge pods")
                port = next((p for p in svc["spec"]["ports"] if p["port"] == parts.port), None)
                if port is None or port.get("targetPort", port["port"]) not in (edge_port, "https"):
                    problems.append(f"{name}: {url} does not reach the edge's port {edge_port}")
                if not svc["spec"].get("publishNotReadyAddresses"):
                    problems.append(f"{name}: Service {svc_name} must publish not-ready edges (they turn ready "
                                    "only after agents connect)")
    # No Service may route to workers; the worker NetworkPolicy refuses all ingress.
    worker_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads
                     if w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "worker"]
    for svc in services.values():
        for labels in worker_labels:
            if not svc["spec"].get("selector", {}).items() - labels.items():
                problems.append(f"Service {svc['metadata']['name']} routes to worker pods")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"
                and d["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "worker"]
    if not any(p["spec"].get("ingress") == [] and "Ingress" in p["spec"]["policyTypes"] for p in policies):
        problems.append("no NetworkPolicy denies ingress to workers")
    return problems


def test_k8s_base_manifests_agree_with_each_other_and_the_clis(k8s_base: list[dict[str, Any]],
                                                                clis: dict[str, Cli]) -> None:
    assert k8s_problems(k8s_base, clis) == []


def test_k8s_broken_agent_url_or_worker_service_is_caught(k8s_base: list[dict[str, Any]],
                                                         clis: dict[str, Cli]) -> None:
    bad = copy.deepcopy(k8s_base)
    worker = next(d for d in bad if d["metadata"]["name"] == "worker-opencv")
    agent = next(c for c in worker["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
    next(e for e in agent["env"] if e["name"] == "AGENT_EDGE")["value"] = "wss://edge-tunel:8443/_edge/tunnel"
    bad.append({"kind": "Service", "metadata": {"name": "oops"},
                "spec": {"selector": {"app.kubernetes.io/name": "worker"}, "ports": [{"port": 8000}]}})
    problems = k8s_problems(bad, clis)
    assert any("edge-tunel names no Service" in p for p in problems)
    assert any("Service oops routes to worker pods" in p for p in problems)


def test_k8s_images_in_kustomizations_are_built_here() -> None:
    for path in K8S.rglob("kustomization.yaml"):
        for entry in yaml.safe_load(path.read_text()).get("images", []):
            assert image_name(entry["name"]) in dockerfiles(), f"{path}: {entry['name']}"


@pytest.fixture(scope="module")
def scale_out() -> list[dict[str, Any]]:
    if kubectl() is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: the scale-out overlay is not rendered")
    return kustomize(K8S / "scale-out")


def test_scale_out_gives_every_agent_every_edge(scale_out: list[dict[str, Any]], clis: dict[str, Cli]) -> None:
    assert k8s_problems(scale_out, clis) == []
    kinds = {(d["kind"], d["metadata"]["name"]) for d in scale_out}
    assert ("Deployment", "edge") not in kinds and ("StatefulSet", "edge") in kinds
    sts = next(d for d in scale_out if d["kind"] == "StatefulSet")
    replicas, peers = sts["spec"]["replicas"], sts["spec"]["serviceName"]
    assert replicas >= 2
    expected = [f"wss://edge-{i}.{peers}:8443/_edge/tunnel" for i in range(replicas)]
    workers = [d for d in scale_out if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("worker-")]
    assert len(workers) == 2
    for w in workers:
        agent = next(c for c in w["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
        env = container_env(agent)
        assert env["AGENT_EDGE"].split(",") == expected, w["metadata"]["name"]
        # The strategic merge must patch AGENT_EDGE, not replace the agent's other settings.
        assert {"AGENT_TOKEN_FILE", "AGENT_CA", "AGENT_POOL", "AGENT_ID"} <= set(env)
    headless = next(d for d in scale_out if d["kind"] == "Service" and d["metadata"]["name"] == peers)
    assert headless["spec"]["clusterIP"] == "None"


def test_scale_out_rendering_is_schema_valid(scale_out: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in scale_out:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_make_secrets_produces_the_secrets_the_pods_mount(tmp_path: Path) -> None:
    """Runs deploy/k8s/make-secrets.sh for real and checks its output against the
    manifests: same Secret names and keys, valid tokens, and a certificate naming
    every address an agent dials in both the base and the scale-out form."""
    from cryptography import x509

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    sts = next(d for _w, d in k8s_documents() if d.get("kind") == "StatefulSet")
    replicas = sts["spec"]["replicas"]
    out = subprocess.run(["sh", str(K8S / "make-secrets.sh"), str(tmp_path), "--replicas", str(replicas),
                          "--host", "edge.example.com"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    generated = {d["metadata"]["name"]: d for d in load_yaml(tmp_path / "secrets.yaml")}
    example = {d["metadata"]["name"]: d for d in load_yaml(K8S / "secrets.example.yaml")}
    assert {n: set(d["data"]) for n, d in generated.items()} == {n: set(d["stringData"]) for n, d in example.items()}
    data = {n: {k: base64.b64decode(v) for k, v in d["data"].items()} for n, d in generated.items()}
    cert = x509.load_pem_x509_certificate(data["edge-credentials"]["edge.pem"])
    names = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.DNSName))
    dialled = {urlsplit(u).hostname for _w, d in k8s_documents() if d.get("kind") in ("Deployment", None)
               for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
               for e in c.get("env", []) if e["name"] == "AGENT_EDGE" for u in e["value"].split(",")}
    assert "edge-tunnel" in dialled and f"edge-{replicas - 1}.{sts['spec']['serviceName']}" in dialled
    assert dialled | {"edge.example.com"} <= names
    # The CA in both Secrets verifies the edge certificate, as the agents will.
    assert data["edge-credentials"]["ca.pem"] == data["worker-credentials"]["ca.pem"]
    ctx = ssl.create_default_context(cadata=data["worker-credentials"]["ca.pem"].decode())
    assert ctx.get_ca_certs()
    from edge_proxy.auth import CredentialStore

    tokens = CredentialStore.load(_write(tmp_path / "t.json", data["edge-credentials"]["worker-tokens.json"]))
    keys = CredentialStore.load(_write(tmp_path / "k.json", data["edge-credentials"]["client-keys.json"]))
    for token_key in ("opencv.token", "tf-gpu.token"):
        assert tokens.verify(data["worker-credentials"][token_key].decode().strip()) is not None
    assert keys.verify((tmp_path / "client-key").read_text().strip()) is not None
    assert tokens.verify((tmp_path / "client-key").read_text().strip()) is None


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


# ----------------------------------------------------------------------------- systemd

UNITS = {
    "edge-proxy.service": ("edge-proxy", "edge-proxy.env"),
    "worker-agent@.service": ("worker-agent", "worker-agent.env"),
    "inference-server@.service": ("inference-server", "inference-server.env"),
}


def console_scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def unit_problems(path: Path, program: str, example_env: Path) -> list[str]:
    problems: list[str] = []
    cp = unit(path)
    for section in ("Unit", "Service", "Install"):
        if not cp.has_section(section):
            problems.append(f"no [{section}]")
    service = cp["Service"] if cp.has_section("Service") else {}
    exec_start = service.get("ExecStart", "").split()
    if not exec_start or Path(exec_start[0]).name not in console_scripts():
        problems.append(f"ExecStart {exec_start[:1]} is not a console script of pyproject.toml")
    elif Path(exec_start[0]).name != program:
        problems.append(f"ExecStart runs {exec_start[0]}, expected {program}")
    env_file_setting = service.get("EnvironmentFile", "")
    expected = example_env.name.replace(".env", "-%i.env") if "@" in path.name else example_env.name
    if Path(env_file_setting.lstrip("-")).name != expected:
        problems.append(f"EnvironmentFile={env_file_setting!r}, expected one named {expected}")
    hardening = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes"}
    for key, value in hardening.items():
        if service.get(key) != value:
            problems.append(f"{key}={service.get(key)!r}, expected {value}")
    user = service.get("User")
    if service.get("DynamicUser") != "yes" and (not user or user in ("root", "0")):
        problems.append("runs as root: set User= or DynamicUser=yes")
    if user:
        sysusers = (SYSTEMD / "edge-inference.sysusers.conf").read_text()
        if not re.search(rf"^u\s+{re.escape(user)}\s", sysusers, re.M):
            problems.append(f"User={user} is not created by edge-inference.sysusers.conf")
    return problems


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_unit_runs_a_console_script_hardened(name: str) -> None:
    program, env_name = UNITS[name]
    assert unit_problems(SYSTEMD / name, program, SYSTEMD / env_name) == []


def test_systemd_units_are_all_known() -> None:
    assert sorted(p.name for p in SYSTEMD.glob("*.service")) == sorted(UNITS)


def test_systemd_unit_without_hardening_is_caught(tmp_path: Path) -> None:
    text = (SYSTEMD / "edge-proxy.service").read_text()
    bad = tmp_path / "edge-proxy.service"
    bad.write_text(text.replace("ProtectSystem=strict", "ProtectSystem=full")
                   .replace("/bin/edge-proxy serve", "/bin/edge-proxi serve"))
    problems = unit_problems(bad, "edge-proxy", SYSTEMD / "edge-proxy.env")
    assert any(p.startswith("ProtectSystem='full'") for p in problems)
    assert any("is not a console script" in p for p in problems)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_env_file_lists_every_setting_of_the_cli(name: str, clis: dict[str, Cli]) -> None:
    program, env_name = UNITS[name]
    if program not in clis:
        pytest.skip("inference/cli.py does not exist yet: its env file is unchecked until it does")
    env, commented = env_file(SYSTEMD / env_name)
    unit_env = unit_environment(unit(SYSTEMD / name))
    listed = set(env) | commented | set(unit_env)
    assert sorted(clis[program].env - listed) == [], f"{env_name} does not mention every {program} setting"


def test_systemd_agent_and_server_ports_agree() -> None:
    agent, _ = env_file(SYSTEMD / "worker-agent.env")
    server, _ = env_file(SYSTEMD / "inference-server.env")
    assert urlsplit(agent["AGENT_UPSTREAM"]).port == int(server["INFER_PORT"])
    assert server["INFER_HOST"] in LOOPBACK
    # Shutdown order: the agent drains before its server stops (After= reverses on stop).
    after = unit(SYSTEMD / "worker-agent@.service").get("Unit", "After")
    assert "inference-server@%i.service" in after.split()


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    venv_bin = Path(sys.executable).parent
    paths = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/edge-inference/venv/bin", str(venv_bin))
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    out = subprocess.run([exe, "verify", "--man=no", *paths], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if ".service" in line]
    assert complaints == []


# ----------------------------------------------- the scripts the images run, run for real

def test_edge_init_is_idempotent_and_separates_secrets(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "INIT_PRIVATE_DIR": str(tmp_path / "private"), "INIT_EDGE_DIR": str(tmp_path / "edge"),
           "INIT_WORKERS_DIR": str(tmp_path / "workers"), "INIT_HOSTS": "localhost edge",
           "INIT_WORKERS": "opencv tf-gpu"}
    script = str(DOCKER / "edge-init.sh")
    subprocess.run(["sh", script], env=env, check=True, capture_output=True, timeout=120)
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    subprocess.run(["sh", script], env=env, check=True, capture_output=True, timeout=120)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot, "re-run changed secrets"
    edge = {p.name for p in (tmp_path / "edge").iterdir()}
    workers = {p.name for p in (tmp_path / "workers").iterdir()}
    assert {"edge.pem", "edge-key.pem", "client-keys.json", "worker-tokens.json"} <= edge
    assert workers == {"ca.pem", "opencv.token", "tf-gpu.token"}
    assert "ca-key.pem" not in edge | workers
    # The compose file mounts exactly these names.
    compose = yaml.safe_load(COMPOSE.read_text())
    for svc in ("worker-opencv", "worker-tf-gpu"):
        token = Path(compose_env(compose["services"][svc])["AGENT_TOKEN_FILE"]).name
        assert token in workers
    edge_env = compose_env(compose["services"]["edge"])
    for key in ("EDGE_CERT", "EDGE_KEY", "EDGE_CLIENT_KEYS", "EDGE_WORKER_TOKENS"):
        assert Path(edge_env[key]).name in edge
    # Changing the host list re-issues the edge certificate under the same CA.
    ca = (tmp_path / "workers" / "ca.pem").read_bytes()
    subprocess.run(["sh", script], env={**env, "INIT_HOSTS": "localhost edge edge.example.com"}, check=True,
                   capture_output=True, timeout=120)
    assert (tmp_path / "edge" / "edge.pem").read_bytes() != snapshot[tmp_path / "edge" / "edge.pem"]
    assert (tmp_path / "workers" / "ca.pem").read_bytes() == ca


def test_worker_entrypoint_exits_when_either_process_dies() -> None:
    script = str(DOCKER / "worker_entrypoint.py")
    py = sys.executable
    out = subprocess.run([py, script, "--server", f"{py} -c 'import time; time.sleep(60)'",
                          "--agent", f"{py} -c 'raise SystemExit(3)'"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 3
    assert "worker-agent exited with status 3; stopping inference-server" in out.stderr
    # A server that exits 0 on its own is still a failure for the container.
    out = subprocess.run([py, script, "--server", f"{py} -c 'pass'", "--agent",
                          f"{py} -c 'import time; time.sleep(60)'"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "inference-server exited with status 0" in out.stderr


def test_worker_entrypoint_stops_the_agent_before_the_server_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "order"
    py = sys.executable
    child = ("import signal, sys, time\n"
             "def bye(*_):\n"
             f"    open({str(log)!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, bye)\n"
             f"open({str(log)!r}, 'a').write('up\\n')\n"
             "time.sleep(60)\n")
    (tmp_path / "child.py").write_text(child)
    proc = subprocess.Popen([py, str(DOCKER / "worker_entrypoint.py"), "--server",
                             f"{py} {tmp_path / 'child.py'} server", "--agent", f"{py} {tmp_path / 'child.py'} agent"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not log.exists() or log.read_text().count("up") < 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert log.read_text().split() == ["up", "up", "agent", "server"]


def test_healthcheck_probe_follows_the_edge_settings(tmp_path: Path) -> None:
    """Starts a real edge (on a free loopback port, TLS, configured by EDGE_*) and
    runs the image's healthcheck against it, as Docker would, then against nothing."""
    from edge_proxy import auth, certs

    files = certs.make_all(tmp_path, ["edge.example.com"])
    auth.create(tmp_path / "client-keys.json", "c", auth.CLIENT_KEY_PREFIX)
    auth.create(tmp_path / "worker-tokens.json", "w", auth.WORKER_TOKEN_PREFIX)
    port = free_port()
    edge_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    edge_env.update(EDGE_LISTEN=f"127.0.0.1:{port}", EDGE_CERT=str(files["cert"]), EDGE_KEY=str(files["key"]),
                    EDGE_CLIENT_KEYS=str(tmp_path / "client-keys.json"),
                    EDGE_WORKER_TOKENS=str(tmp_path / "worker-tokens.json"))
    probe = [sys.executable, str(DOCKER / "healthcheck.py"), "edge", "--timeout", "1"]
    edge = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve"], env=edge_env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            result = subprocess.run(probe, env=edge_env, capture_output=True, text=True, timeout=30)
            if result.returncode == 0 or time.monotonic() > deadline or edge.poll() is not None:
                break
            time.sleep(0.1)
        assert result.returncode == 0, result.stderr
    finally:
        edge.terminate()
        edge.wait(timeout=30)
    result = subprocess.run(probe, env=edge_env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith(f"unhealthy: https://127.0.0.1:{port}/_edge/health:")

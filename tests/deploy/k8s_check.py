"""Checks of the Kubernetes manifests in deploy/k8s/ that no cluster is needed for.

A schema check alone passes manifests that cannot work: a Service whose selector matches no pod, a
targetPort no container opens, a ConfigMap key that does not exist, a device file whose devices overlap.
Each check here returns a list of problems, each naming the resource and the field, so a test can
assert on a deliberately broken copy that the problem is found and named.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import re
import shlex
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate  # ships the JSON schemas of each Kubernetes version: no network
import yaml

from device_service.bus import DeviceBus
from device_service.config import (
    ConfigError,
    DeviceSpec,
    create_device,
    load_config,
    parse_device_specs,
)
from mmiosplit.address import parse_address
from mmiosplit.security import is_local
from mmiosplit_cli.cli import build_parser
from mmiosplit_cli.envconfig import PREFIX, parse_with_environment, service_parsers, unknown_variables
from vcpu_service.machines import virt

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the manifests are written for (native gRPC probes: 1.24+)
IMAGE = "mmiosplit:dev"
UID = GID = 10001  # the non-root user of the image (deploy/Dockerfile)
VCPU_SERVICE, DEVICE_SERVICE, CLIENT = "vcpu-service", "device-service", "client"
COMPONENT = "app.kubernetes.io/component"
NAME = "app.kubernetes.io/name"
# What QEMU's virt board uses besides the device regions a device service describes: no device
# service may claim these (RAM up to the high ECAM window, the largest RAM the board maps below it).
VIRT_RESERVED = {
    "GIC distributor": virt.GIC_DIST,
    "GIC CPU interface": virt.GIC_CPU,
    "GICv2m": virt.GIC_V2M,
    "platform bus": virt.PLATFORM_BUS,
    "PCIe MMIO window": virt.PCIE_MMIO,
    "PCIe PIO window": virt.PCIE_PIO,
    "PCIe low ECAM": virt.PCIE_ECAM_LOW,
    "PCIe high MMIO window": virt.PCIE_MMIO_HIGH,
    "RAM": (virt.RAM_BASE, virt.PCIE_ECAM_HIGH[0] - virt.RAM_BASE),
}

Problems = list[str]


# ----- loading ------------------------------------------------------------------------------------------------
@dataclass
class Resource:
    """One Kubernetes object and the file it came from."""

    source: str
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", "?"))

    @property
    def name(self) -> str:
        return str(self.body.get("metadata", {}).get("name", "?"))

    @property
    def namespace(self) -> str:
        return str(self.body.get("metadata", {}).get("namespace", "default"))

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass
class Stack:
    """The manifests that go together: the applied ones, the examples, and the text that documents them."""

    resources: list[Resource]
    kustomization: dict[str, Any] | None = None
    manifest_files: list[str] = field(default_factory=list)
    docs: dict[str, str] = field(default_factory=dict)  # file name -> text (README.md)

    def copy(self) -> Stack:
        return copy.deepcopy(self)

    def of_kind(self, kind: str) -> list[Resource]:
        return [r for r in self.resources if r.kind == kind]

    def get(self, kind: str, name: str) -> Resource:
        for r in self.resources:
            if r.kind == kind and r.name == name:
                return r
        raise KeyError(f"{kind} {name}")


def load_yaml(path: Path, root: Path) -> list[Resource]:
    text = path.read_text(encoding="utf-8")
    return [Resource(str(path.relative_to(root)), doc) for doc in yaml.safe_load_all(text) if doc]


def load_stack(root: Path = K8S_DIR) -> Stack:
    """Every *.yaml of deploy/k8s/ and deploy/k8s/examples/, the Kustomization, and README.md."""
    files = sorted(root.glob("*.yaml")) + sorted((root / "examples").glob("*.yaml"))
    resources = [r for path in files for r in load_yaml(path, root)]
    kustomization = None
    if (root / "Kustomization").exists():
        kustomization = yaml.safe_load((root / "Kustomization").read_text(encoding="utf-8"))
    docs = {p.name: p.read_text(encoding="utf-8") for p in sorted(root.glob("*.md"))}
    return Stack(resources, kustomization, [p.name for p in sorted(root.glob("*.yaml"))], docs)


# ----- pods -----------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """A pod template and what owns it (a Deployment or a Job), or a bare Pod."""

    owner: Resource

    @property
    def template(self) -> dict[str, Any]:
        if self.owner.kind == "Pod":
            return {"metadata": self.owner.body.get("metadata", {}), "spec": self.owner.body.get("spec", {})}
        spec: dict[str, Any] = self.owner.body.get("spec", {}).get("template", {})
        return spec

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.template.get("metadata", {}).get("labels", {}) or {})

    @property
    def pod(self) -> dict[str, Any]:
        pod: dict[str, Any] = self.template.get("spec", {})
        return pod

    def containers(self, init: bool = True) -> list[dict[str, Any]]:
        found = list(self.pod.get("initContainers", []) or []) if init else []
        return found + list(self.pod.get("containers", []) or [])

    def ports(self) -> list[dict[str, Any]]:
        return [p for c in self.pod.get("containers", []) or [] for p in c.get("ports", []) or []]

    def has_port(self, port: object) -> bool:
        """A port by name or by number, as a Service's targetPort or a NetworkPolicy's port names it."""
        key = "name" if isinstance(port, str) else "containerPort"
        return any(p.get(key) == port for p in self.ports())

    def role(self, container: Mapping[str, Any]) -> str:
        """What a container runs: the mmiosplit subcommand (the image's entry point), or its command."""
        if container.get("command"):
            return " ".join(container["command"])
        args = container.get("args") or []
        return str(args[0]) if args else ""

    def __str__(self) -> str:
        return str(self.owner)


def workloads(stack: Stack) -> list[Workload]:
    return [Workload(r) for r in stack.resources if r.kind in ("Deployment", "Job", "Pod")]


def service_containers(stack: Stack, command: str) -> Iterator[tuple[Workload, dict[str, Any]]]:
    for w in workloads(stack):
        for c in w.containers(init=False):
            if w.role(c) == command:
                yield w, c


def env_of(container: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for e in container.get("env", []) or [] if "name" in e}


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions, or a Service's plain map) against pod labels."""
    if selector is None:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values):
            return False
        if (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


# ----- schemas and files ----------------------------------------------------------------------------------------
def check_schemas(stack: Stack, version: str = KUBERNETES_VERSION) -> Problems:
    """Every object against the Kubernetes JSON schemas of `version`, strict (unknown fields are errors)."""
    problems = []
    for r in stack.resources:
        try:
            kubernetes_validate.validate(r.body, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path) or "(top)"
            problems.append(f"{r.source}: {r}: {where}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            problems.append(f"{r.source}: {r}: {err.message}")
    return problems


def check_kustomization(stack: Stack) -> Problems:
    """`apply -k` and `apply -f deploy/k8s/` must apply the same objects: the Kustomization lists every file."""
    if stack.kustomization is None:
        return ["Kustomization: missing (kubectl apply -k deploy/k8s needs it)"]
    listed = list(stack.kustomization.get("resources", []))
    problems = [f"Kustomization: lists {f}, which is not a manifest in deploy/k8s/"
                for f in listed if f not in stack.manifest_files]
    problems += [f"Kustomization: does not list {f}" for f in stack.manifest_files if f not in listed]
    return problems


def check_namespaces(stack: Stack) -> Problems:
    """Namespaced objects name a Namespace the manifests create, and come after it for `apply -f`."""
    namespaces = {r.name: r.source for r in stack.of_kind("Namespace")}
    problems = []
    for r in stack.resources:
        if r.kind == "Namespace":
            continue
        ns = r.body.get("metadata", {}).get("namespace")
        if ns not in namespaces:
            problems.append(f"{r.source}: {r}: namespace {ns!r} is not created by any manifest")
        elif "/" not in r.source and r.source < namespaces[ns]:
            problems.append(f"{r.source}: {r}: sorts before {namespaces[ns]}, so `kubectl apply -f` creates it first")
    return problems


# ----- labels, Services, probes ---------------------------------------------------------------------------------
def check_labels(stack: Stack) -> Problems:
    """Deployments select their own pods, and every pod says what it is (name and component)."""
    problems = []
    for w in workloads(stack):
        for key in (NAME, COMPONENT):
            if key not in w.labels:
                problems.append(f"{w}: pod template has no label {key}")
        if w.owner.kind == "Deployment":
            selector = w.owner.body.get("spec", {}).get("selector")
            if not selects(selector, w.labels):
                problems.append(f"{w}: spec.selector {selector} does not match its pod template's labels {w.labels}")
    return problems


def check_services(stack: Stack) -> Problems:
    """Each Service selects the pods of exactly one Deployment, and every targetPort is open on them."""
    problems = []
    deployments = [w for w in workloads(stack) if w.owner.kind == "Deployment"]
    for svc in stack.of_kind("Service"):
        selector = svc.body.get("spec", {}).get("selector") or {}
        chosen = [w for w in deployments if w.owner.namespace == svc.namespace and selects(selector, w.labels)]
        if len(chosen) != 1:
            names = ", ".join(str(w) for w in chosen) or "none"
            problems.append(f"{svc}: selector {selector} matches the pods of {len(chosen)} Deployments ({names}), "
                            "not one")
            continue
        for port in svc.body.get("spec", {}).get("ports", []) or []:
            target = port.get("targetPort", port.get("port"))
            if not chosen[0].has_port(target):
                problems.append(f"{svc}: port {port.get('name', port.get('port'))}: targetPort {target!r} is not a "
                                f"containerPort of {chosen[0]}")
    return problems


def check_probes(stack: Stack) -> Problems:
    """Probes are gRPC health checks on a port the container opens (grpc.health.v1, service "")."""
    problems = []
    for w in workloads(stack):
        for c in w.containers(init=False):
            if w.role(c) not in ("serve-vcpu", "serve-devices"):
                continue
            for kind in ("readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe:
                    problems.append(f"{w}: container {c['name']}: no {kind}")
                    continue
                if "grpc" not in probe:
                    problems.append(f"{w}: container {c['name']}: {kind} is not a native gRPC probe")
                    continue
                port = probe["grpc"].get("port")
                if not any(p.get("containerPort") == port for p in c.get("ports", []) or []):
                    problems.append(f"{w}: container {c['name']}: {kind} port {port} is not a containerPort of it")
    return problems


# ----- ConfigMaps and files in containers -----------------------------------------------------------------------
def configmap_data(stack: Stack, namespace: str, name: str) -> dict[str, str] | None:
    for r in stack.of_kind("ConfigMap"):
        if r.name == name and r.namespace == namespace:
            data = dict(r.body.get("data") or {})
            data.update({k: "" for k in r.body.get("binaryData") or {}})
            return data
    return None


def mounted_files(stack: Stack, w: Workload, container: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Paths in the container that come from a ConfigMap: path -> (ConfigMap name, key)."""
    volumes = {v["name"]: v for v in w.pod.get("volumes", []) or []}
    files: dict[str, tuple[str, str]] = {}
    for mount in container.get("volumeMounts", []) or []:
        source = volumes.get(mount["name"], {}).get("configMap")
        if source is None:
            continue
        data = configmap_data(stack, w.owner.namespace, source["name"]) or {}
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        projected = {item["path"]: item["key"] for item in items}
        base = mount["mountPath"].rstrip("/")
        if mount.get("subPath"):
            if mount["subPath"] in projected:
                files[base] = (source["name"], projected[mount["subPath"]])
            continue
        for path, key in projected.items():
            files[f"{base}/{path}"] = (source["name"], key)
    return files


def config_paths(container: Mapping[str, Any]) -> list[str]:
    """The device files a serve-devices container reads (--config or MMIOSPLIT_CONFIG, as the service parses them)."""
    args = parse_service(container)
    return [] if isinstance(args, str) else list(getattr(args, "config", None) or [])


def check_configmap_refs(stack: Stack) -> Problems:
    """ConfigMap volumes name ConfigMaps and keys that exist; subPaths and MMIOSPLIT_CONFIG name mounted files."""
    problems = []
    for w in workloads(stack):
        volumes = {v["name"]: v for v in w.pod.get("volumes", []) or []}
        for vol in volumes.values():
            source = vol.get("configMap")
            if source is None:
                continue
            data = configmap_data(stack, w.owner.namespace, source.get("name", ""))
            if data is None:
                if not source.get("optional"):
                    problems.append(f"{w}: volume {vol['name']}: ConfigMap {source.get('name')!r} does not exist")
                continue
            for item in source.get("items") or []:
                if item["key"] not in data:
                    problems.append(f"{w}: volume {vol['name']}: ConfigMap {source['name']} has no key "
                                    f"{item['key']!r} (it has {', '.join(sorted(data))})")
        for c in w.containers():
            files = mounted_files(stack, w, c)
            for mount in c.get("volumeMounts", []) or []:
                if mount["name"] not in volumes:
                    problems.append(f"{w}: container {c['name']}: volumeMount {mount['name']!r} names no volume")
                source = volumes.get(mount["name"], {}).get("configMap")
                if source and mount.get("subPath") and mount["mountPath"].rstrip("/") not in files:
                    problems.append(f"{w}: container {c['name']}: subPath {mount['subPath']!r} is no file of "
                                    f"ConfigMap {source['name']}")
            for path in config_paths(c):
                if path not in files:
                    problems.append(f"{w}: container {c['name']}: device file {path} (MMIOSPLIT_CONFIG) is not a "
                                    f"mounted ConfigMap key; mounted: {', '.join(sorted(files)) or 'none'}")
    return problems


# ----- device files ---------------------------------------------------------------------------------------------
@dataclass
class DeviceService:
    """One serve-devices container and the devices it will host."""

    workload: Workload
    container: dict[str, Any]
    specs: list[DeviceSpec]

    def __str__(self) -> str:
        return str(self.workload)


def device_services(stack: Stack) -> tuple[list[DeviceService], Problems]:
    """Parse every device service's devices the way serve-devices does (device_service.config)."""
    found, problems = [], []
    for w, c in service_containers(stack, "serve-devices"):
        args = parse_service(c)
        if isinstance(args, str):
            problems.append(f"{w}: container {c['name']}: {args}")
            continue
        try:
            specs = parse_device_specs(args.device or [])
            files = mounted_files(stack, w, c)
            for path in config_paths(c):
                if path not in files:
                    continue  # check_configmap_refs reports it
                name, key = files[path]
                text = (configmap_data(stack, w.owner.namespace, name) or {}).get(key, "")
                with tempfile.TemporaryDirectory() as tmp:
                    copy_path = Path(tmp) / Path(path).name
                    copy_path.write_text(text, encoding="utf-8")
                    try:
                        specs += load_config(copy_path)
                    except ConfigError as err:
                        raise ConfigError(
                            f"ConfigMap {name} key {key}: {str(err).replace(str(copy_path), key)}") from None
        except ConfigError as err:
            problems.append(f"{w}: container {c['name']}: {err}")
            continue
        if not specs:
            problems.append(f"{w}: container {c['name']}: no devices (neither MMIOSPLIT_CONFIG nor MMIOSPLIT_DEVICE)")
        found.append(DeviceService(w, c, specs))
    return found, problems


def geometry(spec: DeviceSpec) -> DeviceSpec:
    """The spec without the options that only matter at run time (flash files live on the cluster's volume)."""
    options = {k: v for k, v in spec.options.items() if k not in ("file", "persist", "readonly")}
    return DeviceSpec(spec.type, spec.base, spec.name, options)


def check_devices(stack: Stack) -> Problems:
    """Device files parse; no two regions overlap, within a service, across services, or with the virt board."""
    services, problems = device_services(stack)
    placed: list[tuple[str, str, str, int, int]] = []  # (owner, device, region, base, end)
    for svc in services:
        try:
            bus = DeviceBus([create_device(geometry(s)) for s in svc.specs])
        except ConfigError as err:
            problems.append(f"{svc}: {err}")
            continue
        placed += [(str(svc), r.device.name, str(r), r.base, r.end) for r in bus.regions]
    reported: set[tuple[str, ...]] = set()  # one line per pair of devices, not per region
    for i, (owner_a, device_a, region_a, base_a, end_a) in enumerate(placed):
        for owner_b, device_b, region_b, base_b, end_b in placed[i + 1:]:
            pair = (owner_a, device_a, owner_b, device_b)
            if owner_a != owner_b and base_a < end_b and base_b < end_a and pair not in reported:
                reported.add(pair)
                problems.append(f"{owner_a}: {region_a} overlaps {owner_b}: {region_b}")
        for what, (base, size) in VIRT_RESERVED.items():
            if base_a < base + size and base < end_a and (owner_a, device_a, what) not in reported:
                reported.add((owner_a, device_a, what))
                problems.append(f"{owner_a}: {region_a} overlaps the virt board's {what} "
                                f"[{base:#x}-{base + size - 1:#x}]")
    return problems


def check_flash_files(stack: Stack) -> Problems:
    """Flash files are on a mounted volume, writable where persist=on writes them back."""
    services, problems = device_services(stack)
    for svc in services:
        volumes = {v["name"]: v for v in svc.workload.pod.get("volumes", []) or []}
        mounts = svc.container.get("volumeMounts", []) or []
        for spec in svc.specs:
            path = spec.options.get("file")
            if not path:
                continue
            mount = max((m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")),
                        key=lambda m: len(m["mountPath"]), default=None)
            volume = volumes.get(mount["name"], {}) if mount else {}
            if mount is None or not ({"persistentVolumeClaim", "emptyDir", "hostPath"} & set(volume)):
                problems.append(f"{svc}: device {spec.name}: file {path} is on no mounted data volume")
            elif spec.options.get("persist") in ("on", "true", "1", "yes") and (
                    mount.get("readOnly") or volume.get("persistentVolumeClaim", {}).get("readOnly")):
                problems.append(f"{svc}: device {spec.name}: persist=on writes {path}, but its volume is read-only")
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and not any(r.name == claim and r.namespace == svc.workload.owner.namespace
                                 for r in stack.of_kind("PersistentVolumeClaim")):
                problems.append(f"{svc}: volume {mount['name'] if mount else '?'}: PersistentVolumeClaim {claim!r} "
                                "does not exist")
    return problems


# ----- the services' own settings -------------------------------------------------------------------------------
def parse_service(container: Mapping[str, Any]) -> argparse.Namespace | str:
    """The container's command line and MMIOSPLIT_* variables parsed as `mmiosplit` parses them, or the error."""
    env = {k: v for k, v in env_of(container).items() if k.startswith(PREFIX)}
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_with_environment(build_parser(), [str(a) for a in container.get("args") or []], env)
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines()
        return lines[-1] if lines else "does not parse"


def _host_port(text: str) -> tuple[str, int] | None:
    try:
        address = parse_address(text)
    except ValueError:
        return None
    return (address.host, address.port) if address.host is not None and address.port is not None else None


def memory_bytes(quantity: str) -> float:
    """A Kubernetes memory quantity (512Mi, 1G, 1.5Gi) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    if not match or match.group(2) not in {**units, "": 1}:
        raise ValueError(f"not a memory quantity: {quantity!r}")
    return float(match.group(1)) * units.get(match.group(2), 1)


def check_service_settings(stack: Stack) -> Problems:
    """The settings parse as the services parse them, and agree with ports, annotations, grace and limits."""
    problems = []
    parsers = service_parsers(build_parser())
    for command, parser in parsers.items():
        for w, c in service_containers(stack, command):
            where = f"{w}: container {c['name']}"
            for name in unknown_variables(parser, env_of(c)):
                problems.append(f"{where}: {name} is no flag of `mmiosplit {command}`")
            args = parse_service(c)
            if isinstance(args, str):
                problems.append(f"{where}: `mmiosplit {command}` refuses its settings: {args}")
                continue
            listen = parse_address(args.listen)
            grpc_ports = [p.get("containerPort") for p in c.get("ports", []) or [] if p.get("name") == "grpc"]
            if not (is_local(listen) or args.insecure or args.tls_cert or args.token_file):
                problems.append(f"{where}: would refuse to listen on {args.listen} unprotected: set MMIOSPLIT_INSECURE "
                                "(the network policies are the boundary), MMIOSPLIT_TOKEN_FILE or MMIOSPLIT_TLS_CERT")
            if listen.host not in ("0.0.0.0", "[::]"):
                problems.append(f"{where}: listens on {args.listen}, which other pods cannot reach")
            elif grpc_ports != [listen.port]:
                problems.append(f"{where}: listens on port {listen.port}, not on its containerPort named grpc "
                                f"({grpc_ports})")
            metric_ports = [p.get("containerPort") for p in c.get("ports", []) or [] if p.get("name") == "metrics"]
            annotations = w.template.get("metadata", {}).get("annotations", {}) or {}
            if args.metrics_port is None:
                problems.append(f"{where}: no metrics (MMIOSPLIT_METRICS_PORT)")
            else:
                if metric_ports != [args.metrics_port]:
                    problems.append(f"{where}: metrics on port {args.metrics_port} (MMIOSPLIT_METRICS_PORT), not on "
                                    f"its containerPort named metrics ({metric_ports})")
                if annotations.get("prometheus.io/port") != str(args.metrics_port) or \
                        annotations.get("prometheus.io/scrape") != "true":
                    problems.append(f"{where}: annotations prometheus.io/scrape and prometheus.io/port do not say "
                                    f"scrape port {args.metrics_port}")
                if args.metrics_host in ("127.0.0.1", "localhost", "::1"):
                    problems.append(f"{where}: metrics on {args.metrics_host} (MMIOSPLIT_METRICS_HOST), which "
                                    "nothing outside the pod can scrape")
            period = w.pod.get("terminationGracePeriodSeconds", 30)
            if period <= args.grace_s:
                problems.append(f"{w}: terminationGracePeriodSeconds {period} is not above the drain's "
                                f"{args.grace_s:g} s (MMIOSPLIT_GRACE_S), so the kubelet kills the drain")
            limit = (c.get("resources", {}).get("limits") or {}).get("memory")
            max_ram = getattr(args, "max_ram", None)
            if max_ram is not None and limit is not None and memory_bytes(limit) <= max_ram:
                problems.append(f"{where}: memory limit {limit} leaves no room above one VM's RAM "
                                f"({max_ram / 2**30:g} GiB, MMIOSPLIT_MAX_RAM)")
    return problems


def check_containers(stack: Stack) -> Problems:
    """Every container: the project image, requests and limits, and the restricted security context."""
    problems = []
    for w in workloads(stack):
        pod_sc = w.pod.get("securityContext") or {}
        for c in w.containers():
            where = f"{w}: container {c['name']}"
            if c.get("image") != IMAGE:
                problems.append(f"{where}: image {c.get('image')!r} is not {IMAGE}")
            if c.get("imagePullPolicy") not in ("IfNotPresent", "Never"):
                problems.append(f"{where}: imagePullPolicy {c.get('imagePullPolicy')!r} would pull {IMAGE}, which "
                                "is loaded into the cluster, not pushed (IfNotPresent or Never)")
            resources = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in (resources.get(kind) or {}):
                        problems.append(f"{where}: no {res} in resources.{kind}")
            sc = c.get("securityContext") or {}

            def effective(key: str, sc: Mapping[str, Any] = sc, pod_sc: Mapping[str, Any] = pod_sc) -> Any:
                return sc.get(key, pod_sc.get(key))  # a container's setting wins over the pod's

            wanted = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": GID}
            for key, value in wanted.items():
                if effective(key) != value:
                    problems.append(f"{where}: securityContext.{key} is {effective(key)!r}, not {value!r}")
            for key, value in {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}.items():
                if sc.get(key) != value:
                    problems.append(f"{where}: securityContext.{key} is {sc.get(key)!r}, not {value!r}")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []) or caps.get("add"):
                problems.append(f"{where}: securityContext.capabilities must drop ALL and add none, not {caps}")
            if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: securityContext.seccompProfile.type is not RuntimeDefault")
            tmp = [m for m in c.get("volumeMounts", []) or [] if m.get("mountPath") == "/tmp"]
            volumes = {v["name"]: v for v in w.pod.get("volumes", []) or []}
            if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
                problems.append(f"{where}: no emptyDir at /tmp (the root filesystem is read-only)")
    return problems


# ----- network policy -------------------------------------------------------------------------------------------
OUTSIDER = {"app.kubernetes.io/name": "something-else"}  # a pod of another application in the namespace


def admitted(stack: Stack, target: Workload, port_name: str, source: Mapping[str, str] | None) -> bool | None:
    """Whether a pod labelled `source` (None: outside the namespace) may open `port_name` of `target`'s pods.

    None when no policy selects the target: then every pod may, and nothing is isolated.
    """
    number = next((p.get("containerPort") for p in target.ports() if p.get("name") == port_name), None)
    policies = [p for p in stack.of_kind("NetworkPolicy") if p.namespace == target.owner.namespace
                and selects(p.body.get("spec", {}).get("podSelector"), target.labels)
                and "Ingress" in (p.body.get("spec", {}).get("policyTypes") or ["Ingress"])]
    if not policies:
        return None
    for policy in policies:
        for rule in policy.body.get("spec", {}).get("ingress", []) or []:
            ports = rule.get("ports") or []
            if ports and not any(p.get("port") in (port_name, number) for p in ports):
                continue
            peers = rule.get("from") or []
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    return True  # addresses, not pods: treat as open
                in_namespace = "namespaceSelector" not in peer
                if source is None and in_namespace:
                    continue
                if "podSelector" not in peer or selects(peer["podSelector"], source or {}):
                    return True
    return False


def check_network_policies(stack: Stack) -> Problems:
    """Only the vcpu service (and clients, to a device service with a console) reach device services' gRPC."""
    problems = []
    pods = workloads(stack)
    for policy in stack.of_kind("NetworkPolicy"):
        spec = policy.body.get("spec", {})
        chosen = [w for w in pods if w.owner.kind == "Deployment" and w.owner.namespace == policy.namespace
                  and selects(spec.get("podSelector"), w.labels)]
        if not chosen:
            problems.append(f"{policy}: podSelector {spec.get('podSelector')} selects no Deployment's pods")
        for rule in spec.get("ingress", []) or []:
            for port in rule.get("ports") or []:
                for w in chosen:
                    if not w.has_port(port.get("port")):
                        problems.append(f"{policy}: port {port.get('port')!r} is not a containerPort of {w}")
            for peer in rule.get("from") or []:
                if "podSelector" in peer and not any(selects(peer["podSelector"], w.labels) for w in pods):
                    problems.append(f"{policy}: from podSelector {peer['podSelector']} matches no pod of the "
                                    "manifests")
    vcpus = [w for w in pods if w.labels.get(COMPONENT) == VCPU_SERVICE]
    clients = [w for w in pods if w.labels.get(COMPONENT) == CLIENT]
    services, _ = device_services(stack)
    consoles = {str(s) for s in services if any(spec.type == "pl011" for spec in s.specs)}
    for target in pods:
        component = target.labels.get(COMPONENT)
        if component not in (VCPU_SERVICE, DEVICE_SERVICE):
            continue
        allowed = {VCPU_SERVICE} if component == DEVICE_SERVICE else {CLIENT}
        if component == DEVICE_SERVICE and str(target) in consoles:
            allowed.add(CLIENT)
        others: list[tuple[str, Mapping[str, str] | None]] = [
            (f"{w} ({w.labels.get(COMPONENT)})", w.labels) for w in pods if w.labels.get(COMPONENT) not in allowed]
        others += [("a pod of another application", OUTSIDER), ("a pod in another namespace", None)]
        for name, labels in others:
            if admitted(stack, target, "grpc", labels) is not False:
                problems.append(f"{target}: {name} may connect to its gRPC port")
        for w in [w for w in vcpus + clients if w.labels.get(COMPONENT) in allowed]:
            if admitted(stack, target, "grpc", w.labels) is False:
                problems.append(f"{target}: {w} ({w.labels.get(COMPONENT)}) may not connect to its gRPC port")
    return problems


# ----- addresses ------------------------------------------------------------------------------------------------
ADDRESS_FLAG = re.compile(r"--(vcpu-service|device-service)[= ]+([^\s\"'`\\]+)")


def addresses(stack: Stack) -> Iterator[tuple[str, str, str, str]]:
    """(where, flag, address, namespace) for every --vcpu-service/--device-service in containers and docs."""
    for w in workloads(stack):
        for c in w.containers():
            words = [str(word) for word in list(c.get("command") or []) + list(c.get("args") or [])]
            text = " ".join(shlex.quote(word) for word in words) + " " + " ".join(env_of(c).values())
            for match in ADDRESS_FLAG.finditer(text):
                yield f"{w}: container {c['name']}", match.group(1), match.group(2), w.owner.namespace
    for name, text in stack.docs.items():
        for match in ADDRESS_FLAG.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield f"{name}:{line}", match.group(1), match.group(2), "mmiosplit"


def check_addresses(stack: Stack) -> Problems:
    """Service addresses given to `mmiosplit run` name a Service, one of its ports, and the right kind of pods."""
    problems = []
    for where, flag, address, namespace in addresses(stack):
        hp = _host_port(address)
        if hp is None or address.startswith(("127.", "localhost", "unix:")):
            continue  # not a cluster address (a placeholder, a local socket)
        labels = hp[0].split(".")
        name, ns = labels[0], labels[1] if len(labels) > 1 and labels[1] != "svc" else namespace
        services = [s for s in stack.of_kind("Service") if s.name == name and s.namespace == ns]
        if not services:
            problems.append(f"{where}: --{flag} {address}: no Service {name} in namespace {ns}")
            continue
        svc = services[0]
        if not any(p.get("port") == hp[1] for p in svc.body.get("spec", {}).get("ports", []) or []):
            problems.append(f"{where}: --{flag} {address}: Service {name} has no port {hp[1]}")
        want = {"vcpu-service": "serve-vcpu", "device-service": "serve-devices"}[flag]
        selector = svc.body.get("spec", {}).get("selector") or {}
        if not any(w.role(c) == want for w in workloads(stack) if selects(selector, w.labels)
                   for c in w.containers(init=False)):
            problems.append(f"{where}: --{flag} {address}: Service {name} does not lead to `mmiosplit {want}`")
    return problems


CHECKS: dict[str, Callable[[Stack], Problems]] = {
    "kustomization": check_kustomization,
    "namespaces": check_namespaces,
    "labels": check_labels,
    "services": check_services,
    "probes": check_probes,
    "configmap_refs": check_configmap_refs,
    "devices": check_devices,
    "flash_files": check_flash_files,
    "containers": check_containers,
    "network_policies": check_network_policies,
    "addresses": check_addresses,
}

"""deploy/k8s/ validates against the Kubernetes schemas and its pieces fit together, with no cluster.

Every check also runs on a deliberately broken copy of the manifests, so a check that cannot fail
(and would pass anything) shows up as a failing test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

try:
    import kubernetes_validate
    import yaml
except ImportError as err:  # a dev dependency; on CI its absence is an error, not a skip
    if os.environ.get("CI"):
        raise
    pytest.skip(f"{err.name} is not installed (pip install 'kubernetes-validate>=1.30' 'pyyaml>=6')",
                allow_module_level=True)

from device_service.config import load_config, parse_device_specs
from device_service.models import DEVICE_TYPES
from tests.deploy import k8s_check as k
from vcpu_service.machines.virt import device_specs

FLASH = "/var/lib/mmiosplit/flash"


@pytest.fixture(scope="module")
def pristine() -> k.Stack:
    return k.load_stack()


@pytest.fixture
def stack(pristine: k.Stack) -> k.Stack:
    return pristine.copy()


def virt_board_problems(stack: k.Stack) -> list[str]:
    """virt.toml is the virt board as `mmiosplit run --machine virt` builds it, with its files on the volume."""
    data = k.configmap_data(stack, "mmiosplit", "mmiosplit-devices") or {}
    want = parse_device_specs(device_specs("aarch64", flash0=f"{FLASH}/flash0.img", flash1=f"{FLASH}/flash1.img",
                                           persist=True, write_buffer="direct"))
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"virt-{os.getpid()}.toml"
    path.write_text(data.get("virt.toml", ""), encoding="utf-8")
    try:
        have = load_config(path)
    finally:
        path.unlink()

    def key(spec: Any) -> tuple[str, int, dict[str, Any]]:
        return spec.type, spec.base, DEVICE_TYPES[spec.type].parse_options(spec.name, spec.options)

    have_by_name = {s.name: s for s in have}
    problems = [f"virt.toml: device {s.name} ({s.type}@{s.base:#x}) is missing" for s in want
                if s.name not in have_by_name]
    problems += [f"virt.toml: device {s.name} is {key(have_by_name[s.name])}, the virt board's is {key(s)}"
                 for s in want if s.name in have_by_name and key(have_by_name[s.name]) != key(s)]
    problems += [f"virt.toml: device {s.name} is not on the virt board" for s in have
                 if s.name not in {w.name for w in want}]
    return problems


# ----- the manifests as they are ------------------------------------------------------------------------------
def test_kubernetes_validate_ships_the_schemas_it_is_asked_for() -> None:
    versions = kubernetes_validate.utils.all_versions()
    assert any(v.startswith(k.KUBERNETES_VERSION + ".") for v in versions), versions


def test_every_manifest_validates_against_the_kubernetes_schemas_offline(
        pristine: k.Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    kinds = {r.kind for r in pristine.resources}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy",
            "Job", "Pod"} <= kinds
    assert k.check_schemas(pristine) == []


@pytest.mark.parametrize("name", sorted(k.CHECKS))
def test_manifests_pass(pristine: k.Stack, name: str) -> None:
    assert k.CHECKS[name](pristine) == []


def test_service_settings_agree_with_the_real_flags_ports_and_limits(pristine: k.Stack) -> None:
    assert k.check_service_settings(pristine) == []


def test_virt_device_file_is_the_virt_board(pristine: k.Stack) -> None:
    assert virt_board_problems(pristine) == []


def test_one_deployment_per_service_and_the_addresses_the_client_uses(pristine: k.Stack) -> None:
    roles = {w.owner.name: w.role(c) for w in k.workloads(pristine) for c in w.containers(init=False)}
    assert roles == {"vcpu": "serve-vcpu", "devices": "serve-devices", "scratch": "serve-devices",
                     "uboot-client": "python3 /opt/mmiosplit-client/uboot_session.py", "uboot-console": "run"}
    for client in ("Job uboot-client", "Pod uboot-console"):
        used = {(flag, address) for where, flag, address, _ in k.addresses(pristine) if where.startswith(client)}
        assert used == {("vcpu-service", "vcpu:50051"), ("device-service", "devices:50052"),
                        ("device-service", "scratch:50053")}, client


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_same_objects_as_apply_f(pristine: k.Stack) -> None:
    """`kubectl apply -k deploy/k8s` and `apply -f deploy/k8s/` apply the same objects (kustomize needs no cluster)."""
    built = subprocess.run(["kubectl", "kustomize", str(k.K8S_DIR)], capture_output=True, text=True, timeout=60,
                           check=True).stdout
    objects = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(built) if d}
    assert objects == {(r.kind, r.name) for r in pristine.resources if "/" not in r.source}


def test_the_client_job_embeds_the_session_script_unchanged(pristine: k.Stack) -> None:
    embedded = k.configmap_data(pristine, "mmiosplit", "uboot-client") or {}
    assert embedded.get("uboot_session.py") == (k.K8S_DIR / "examples" / "uboot_session.py").read_text()


# ----- each check finds what it is for --------------------------------------------------------------------------
def container(stack: k.Stack, kind: str, name: str, index: int = 0, init: bool = False) -> dict[str, Any]:
    spec = stack.get(kind, name).body["spec"]["template"]["spec"]
    found: dict[str, Any] = spec["initContainers" if init else "containers"][index]
    return found


def pod(stack: k.Stack, name: str, kind: str = "Deployment") -> dict[str, Any]:
    spec: dict[str, Any] = stack.get(kind, name).body["spec"]["template"]["spec"]
    return spec


def set_env(stack: k.Stack, deployment: str, name: str, value: str) -> None:
    env = container(stack, "Deployment", deployment)["env"]
    env[:] = [e for e in env if e["name"] != name] + [{"name": name, "value": value}]


def rename_env(stack: k.Stack, deployment: str, old: str, new: str) -> None:
    for variable in container(stack, "Deployment", deployment)["env"]:
        if variable["name"] == old:
            variable["name"] = new


def configmap(stack: k.Stack, name: str = "mmiosplit-devices") -> dict[str, str]:
    data: dict[str, str] = stack.get("ConfigMap", name).body["data"]
    return data


def policy(stack: k.Stack, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = stack.get("NetworkPolicy", name).body["spec"]
    return spec


def drop(stack: k.Stack, kind: str, name: str | None = None) -> None:
    """Remove one object, or every object of a kind."""
    stack.resources[:] = [r for r in stack.resources if not (r.kind == kind and name in (None, r.name))]


Mutation = Callable[[k.Stack], object]
SCHEMAS = "schemas"
SETTINGS = "settings"
VIRT = "virt"

MUTATIONS: list[tuple[str, Mutation, str, list[str]]] = [
    # (what is broken, how, which check, what its message must name)
    ("probe port by name", lambda s: container(s, "Deployment", "vcpu")["readinessProbe"]["grpc"].update(
        port="grpc"), SCHEMAS, ["Deployment vcpu", "readinessProbe.grpc.port"]),
    ("unknown field", lambda s: container(s, "Deployment", "scratch").update(imagePolicy="x"), SCHEMAS,
     ["Deployment scratch", "imagePolicy"]),
    ("unknown kind", lambda s: s.get("Service", "vcpu").body.update(apiVersion="v2"), SCHEMAS,
     ["Service vcpu", "v2"]),
    ("file left out of the Kustomization", lambda s: s.kustomization and s.kustomization["resources"].remove(
        "31-scratch.yaml"), "kustomization", ["does not list 31-scratch.yaml"]),
    ("Kustomization lists a missing file", lambda s: s.kustomization and s.kustomization["resources"].append(
        "50-gone.yaml"), "kustomization", ["50-gone.yaml"]),
    ("wrong namespace", lambda s: s.get("Service", "scratch").body["metadata"].update(namespace="mmiosplt"),
     "namespaces", ["Service scratch", "'mmiosplt'"]),
    ("Namespace applied last", lambda s: setattr(s.get("Namespace", "mmiosplit"), "source", "99-namespace.yaml"),
     "namespaces", ["31-scratch.yaml", "Deployment scratch", "sorts before 99-namespace.yaml"]),
    ("Deployment selector misses its pods", lambda s: s.get("Deployment", "scratch").body["spec"]["selector"][
        "matchLabels"].update({"app.kubernetes.io/instance": "scratch0"}), "labels", ["Deployment scratch",
                                                                                     "spec.selector"]),
    ("pod without component label", lambda s: s.get("Deployment", "devices").body["spec"]["template"]["metadata"][
        "labels"].pop(k.COMPONENT), "labels", ["Deployment devices", k.COMPONENT]),
    ("Service selector matches nothing", lambda s: s.get("Service", "devices").body["spec"]["selector"].update(
        {"app.kubernetes.io/instance": "device"}), "services", ["Service devices", "0 Deployments"]),
    ("Service selector matches two Deployments", lambda s: s.get("Service", "scratch").body["spec"].update(
        selector={"app.kubernetes.io/component": "device-service"}), "services", ["Service scratch",
                                                                                 "2 Deployments"]),
    ("targetPort by a wrong name", lambda s: s.get("Service", "vcpu").body["spec"]["ports"][0].update(
        targetPort="grcp"), "services", ["Service vcpu", "'grcp'", "Deployment vcpu"]),
    ("targetPort by a wrong number", lambda s: s.get("Service", "devices").body["spec"]["ports"][0].update(
        targetPort=50051), "services", ["Service devices", "50051"]),
    ("probe on a port not opened", lambda s: container(s, "Deployment", "scratch")["livenessProbe"]["grpc"].update(
        port=50052), "probes", ["Deployment scratch", "livenessProbe port 50052"]),
    ("probe not gRPC", lambda s: container(s, "Deployment", "devices").update(
        readinessProbe={"tcpSocket": {"port": 50052}}), "probes", ["Deployment devices", "not a native gRPC"]),
    ("ConfigMap key missing", lambda s: configmap(s).pop("scratch.toml"), "configmap_refs",
     ["Deployment scratch", "no key 'scratch.toml'"]),
    ("ConfigMap missing", lambda s: pod(s, "devices")["volumes"][0]["configMap"].update(name="mmiosplit-device"),
     "configmap_refs", ["Deployment devices", "'mmiosplit-device' does not exist"]),
    ("MMIOSPLIT_CONFIG names no mounted key", lambda s: set_env(s, "devices", "MMIOSPLIT_CONFIG",
                                                               "/etc/mmiosplit/virt.yaml"),
     "configmap_refs", ["Deployment devices", "/etc/mmiosplit/virt.yaml"]),
    ("subPath names no key", lambda s: container(s, "Deployment", "scratch")["volumeMounts"][0].update(
        mountPath="/etc/mmiosplit/scratch.toml", subPath="scratch.tml"), "configmap_refs",
     ["Deployment scratch", "subPath 'scratch.tml'"]),
    ("scratch over virtio-mmio", lambda s: configmap(s).update(
        {"scratch.toml": configmap(s)["scratch.toml"].replace("0x0b000000", "0x0a000000")}), "devices",
     ["Deployment devices", "virtio.slot0", "overlaps Deployment scratch", "scratch.mem"]),
    ("scratch over the GIC", lambda s: configmap(s).update(
        {"scratch.toml": configmap(s)["scratch.toml"].replace("0x0b000000", "0x08000000")}), "devices",
     ["Deployment scratch", "GIC distributor"]),
    ("overlap inside a service", lambda s: configmap(s).update(
        {"virt.toml": configmap(s)["virt.toml"].replace("0x09010000", "0x09000000")}), "devices",
     ["Deployment devices", "overlaps"]),
    ("MMIOSPLIT_DEVICE over a device file", lambda s: set_env(s, "scratch", "MMIOSPLIT_DEVICE",
                                                              "pl011@0x09000000,name=uart9"),
     "devices", ["Deployment devices", "uart0", "overlaps Deployment scratch: uart9"]),
    ("device file with a typo", lambda s: configmap(s).update(
        {"scratch.toml": configmap(s)["scratch.toml"].replace('"scratch"\nbase', '"scrach"\nbase')}), "devices",
     ["Deployment scratch", "ConfigMap mmiosplit-devices key scratch.toml", "unknown device type 'scrach'"]),
    ("flash file off the volume", lambda s: configmap(s).update(
        {"virt.toml": configmap(s)["virt.toml"].replace(f"{FLASH}/flash1.img", "/data/flash1.img")}),
     "flash_files", ["Deployment devices", "flash1", "/data/flash1.img"]),
    ("persisted flash on a read-only mount", lambda s: container(s, "Deployment", "devices")["volumeMounts"][
        1].update(readOnly=True), "flash_files", ["Deployment devices", "read-only"]),
    ("flash claim missing", lambda s: pod(s, "devices")["volumes"][1]["persistentVolumeClaim"].update(
        claimName="flash"), "flash_files", ["Deployment devices", "PersistentVolumeClaim 'flash'"]),
    ("root user", lambda s: container(s, "Deployment", "vcpu")["securityContext"].update(runAsUser=0), "containers",
     ["Deployment vcpu", "container vcpu", "runAsUser is 0"]),
    ("writable root filesystem", lambda s: container(s, "Deployment", "devices", init=True)[
        "securityContext"].pop("readOnlyRootFilesystem"), "containers",
     ["container wait-for-firmware", "readOnlyRootFilesystem"]),
    ("a capability added", lambda s: container(s, "Job", "uboot-client")["securityContext"]["capabilities"].update(
        add=["NET_RAW"]), "containers", ["Job uboot-client", "capabilities"]),
    ("console pod as root", lambda s: s.get("Pod", "uboot-console").body["spec"]["containers"][0][
        "securityContext"].update(runAsUser=0), "containers", ["Pod uboot-console", "runAsUser is 0"]),
    ("privilege escalation", lambda s: container(s, "Deployment", "scratch")["securityContext"].update(
        allowPrivilegeEscalation=True), "containers", ["Deployment scratch", "allowPrivilegeEscalation"]),
    ("no seccomp profile", lambda s: (container(s, "Deployment", "vcpu")["securityContext"].pop("seccompProfile"),
                                      pod(s, "vcpu")["securityContext"].pop("seccompProfile")), "containers",
     ["Deployment vcpu", "seccompProfile"]),
    ("another image", lambda s: container(s, "Deployment", "vcpu").update(image="mmiosplit:latest"), "containers",
     ["Deployment vcpu", "'mmiosplit:latest'"]),
    ("pulled image", lambda s: container(s, "Deployment", "vcpu").update(imagePullPolicy="Always"), "containers",
     ["Deployment vcpu", "imagePullPolicy 'Always'"]),
    ("no memory limit", lambda s: container(s, "Deployment", "devices")["resources"]["limits"].pop("memory"),
     "containers", ["Deployment devices", "no memory in resources.limits"]),
    ("no /tmp", lambda s: container(s, "Deployment", "scratch")["volumeMounts"].pop(), "containers",
     ["Deployment scratch", "/tmp"]),
    ("policy selects no pods", lambda s: policy(s, "vcpu-from-clients")["podSelector"]["matchLabels"].update(
        {k.COMPONENT: "vcpu"}), "network_policies", ["NetworkPolicy vcpu-from-clients", "selects no Deployment"]),
    ("device services admit a selector that matches no pod", lambda s: policy(s, "device-services-from-vcpu")[
        "ingress"][0]["from"][0]["podSelector"]["matchLabels"].update({k.COMPONENT: "vcpu"}), "network_policies",
     ["NetworkPolicy device-services-from-vcpu", "from podSelector", "matches no pod"]),
    ("device services closed to the vcpu service", lambda s: policy(s, "device-services-from-vcpu")["ingress"][0][
        "from"][0]["podSelector"]["matchLabels"].update({k.COMPONENT: "client"}), "network_policies",
     ["Deployment scratch", "Deployment vcpu (vcpu-service) may not connect"]),
    ("device services open to all", lambda s: policy(s, "device-services-from-vcpu")["ingress"][0].pop("from"),
     "network_policies", ["Deployment scratch", "a pod of another application may connect"]),
    ("scratch open to clients", lambda s: policy(s, "console-from-clients").update(
        podSelector={"matchLabels": {k.COMPONENT: "device-service"}}), "network_policies",
     ["Deployment scratch", "Job uboot-client (client) may connect"]),
    ("console closed to clients", lambda s: drop(s, "NetworkPolicy", "console-from-clients"),
     "network_policies", ["Deployment devices", "Job uboot-client (client) may not connect"]),
    ("no policy at all", lambda s: drop(s, "NetworkPolicy"),
     "network_policies", ["Deployment scratch", "a pod in another namespace may connect"]),
    ("policy port misnamed", lambda s: policy(s, "device-services-from-vcpu")["ingress"][0]["ports"][0].update(
        port="grcp"), "network_policies", ["NetworkPolicy device-services-from-vcpu", "'grcp'"]),
    ("client uses a wrong port", lambda s: container(s, "Job", "uboot-client")["args"].__setitem__(
        5, "devices:50062"), "addresses", ["Job uboot-client", "devices:50062", "no port 50062"]),
    ("client uses a missing Service", lambda s: container(s, "Job", "uboot-client")["args"].__setitem__(
        7, "scratch0:50053"), "addresses", ["Job uboot-client", "no Service scratch0"]),
    ("client uses the vcpu service as a device service", lambda s: container(s, "Job", "uboot-client")[
        "args"].__setitem__(7, "vcpu.mmiosplit.svc:50051"), "addresses",
     ["Job uboot-client", "does not lead to `mmiosplit serve-devices`"]),
    ("README names a wrong address", lambda s: s.docs.update({"README.md": "x\n--vcpu-service vcpu:5005\n"}),
     "addresses", ["README.md:2", "vcpu:5005"]),
    ("a variable that is no flag", lambda s: set_env(s, "vcpu", "MMIOSPLIT_LISTN", "0.0.0.0:1"), SETTINGS,
     ["Deployment vcpu", "MMIOSPLIT_LISTN is no flag of `mmiosplit serve-vcpu`"]),
    ("a device flag on the vcpu service", lambda s: set_env(s, "vcpu", "MMIOSPLIT_CONFIG", "/x"), SETTINGS,
     ["MMIOSPLIT_CONFIG is no flag of `mmiosplit serve-vcpu`"]),
    ("listening on another port", lambda s: set_env(s, "scratch", "MMIOSPLIT_LISTEN", "0.0.0.0:50059"), SETTINGS,
     ["Deployment scratch", "port 50059"]),
    ("listening on loopback", lambda s: set_env(s, "scratch", "MMIOSPLIT_LISTEN", "127.0.0.1:50053"), SETTINGS,
     ["Deployment scratch", "127.0.0.1"]),
    ("listening unprotected", lambda s: set_env(s, "vcpu", "MMIOSPLIT_INSECURE", "0"), SETTINGS,
     ["Deployment vcpu", "would refuse to listen on 0.0.0.0:50051 unprotected"]),
    ("metrics elsewhere than annotated", lambda s: set_env(s, "devices", "MMIOSPLIT_METRICS_PORT", "9200"),
     SETTINGS, ["Deployment devices", "metrics on port 9200", "containerPort named metrics"]),
    ("a value the service refuses", lambda s: set_env(s, "vcpu", "MMIOSPLIT_METRICS_PORT", "99999"), SETTINGS,
     ["Deployment vcpu", "refuses its settings", "MMIOSPLIT_METRICS_PORT='99999'"]),
    ("a required flag missing", lambda s: rename_env(s, "scratch", "MMIOSPLIT_LISTEN", "MMIOSPLIT_LISTN"),
     SETTINGS, ["Deployment scratch", "refuses its settings", "--listen"]),
    ("metrics annotated elsewhere", lambda s: s.get("Deployment", "scratch").body["spec"]["template"]["metadata"][
        "annotations"].update({"prometheus.io/port": "9101"}), SETTINGS, ["Deployment scratch", "prometheus.io"]),
    ("metrics on loopback", lambda s: set_env(s, "devices", "MMIOSPLIT_METRICS_HOST", "127.0.0.1"), SETTINGS,
     ["Deployment devices", "MMIOSPLIT_METRICS_HOST"]),
    ("grace period shorter than the drain", lambda s: pod(s, "vcpu").update(terminationGracePeriodSeconds=10),
     SETTINGS, ["Deployment vcpu", "terminationGracePeriodSeconds 10"]),
    ("memory limit below a VM's RAM", lambda s: container(s, "Deployment", "vcpu")["resources"]["limits"].update(
        memory="1Gi"), SETTINGS, ["Deployment vcpu", "memory limit 1Gi", "MMIOSPLIT_MAX_RAM"]),
    ("virt board missing a device", lambda s: configmap(s).update(
        {"virt.toml": configmap(s)["virt.toml"].split('[[device]]\ntype = "pl061"')[0]}), VIRT, ["gpio0", "missing"]),
    ("virt board device moved", lambda s: configmap(s).update(
        {"virt.toml": configmap(s)["virt.toml"].replace("0x09010000", "0x09050000")}), VIRT, ["rtc0"]),
]


def run_check(name: str, stack: k.Stack) -> list[str]:
    if name == SCHEMAS:
        return k.check_schemas(stack)
    if name == SETTINGS:
        return k.check_service_settings(stack)
    if name == VIRT:
        return virt_board_problems(stack)
    return k.CHECKS[name](stack)


@pytest.mark.parametrize(("mutation", "check", "named"), [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_a_broken_copy_is_reported_by_name(stack: k.Stack, mutation: Mutation, check: str,
                                           named: list[str]) -> None:
    assert run_check(check, stack) == [], "the unbroken copy must pass first"
    mutation(stack)
    problems = run_check(check, stack)
    assert problems, "the check did not notice"
    assert any(all(part in p for part in named) for p in problems), problems


def test_every_check_is_exercised_by_a_broken_copy() -> None:
    assert {m[2] for m in MUTATIONS} == set(k.CHECKS) | {SCHEMAS, SETTINGS, VIRT}


def test_a_broken_device_file_names_the_configmap_key(stack: k.Stack) -> None:
    configmap(stack)["scratch.toml"] = "[[device]\n"
    problems = k.check_devices(stack)
    assert any("Deployment scratch" in p and "key scratch.toml" in p and "not valid TOML" in p for p in problems), \
        problems


"""Renders the Kubernetes overlays in deploy/kubernetes with `kubectl kustomize`, validates them
against the Kubernetes schemas and lists what deploy/ asks of the binaries (flags, environment,
ports, probes, metrics).

  python tools/deploy_manifests.py render cuda        # YAML stream on stdout (kubectl's output)
  python tools/deploy_manifests.py validate           # every overlay, strict schemas
  python tools/deploy_manifests.py references         # JSON for the cross-check test

Needs `kubectl` on PATH (its built-in kustomize renders the overlays; the environment variable
KUBECTL names another binary), PyYAML and kubernetes-validate (tools/requirements-ci.txt).
"""

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
OVERLAYS = ["cpu", "cuda"]
KUBERNETES_VERSION = "1.33.0"
BINARIES = {"gateway", "vision-worker", "llm-worker", "sam-worker"}


def kubectl():
    """The kubectl binary, or a clear exit when there is none."""
    name = os.environ.get("KUBECTL", "kubectl")
    path = shutil.which(name)
    if path is None:
        raise SystemExit(
            f"`{name}` not found on PATH: the overlays are rendered with `kubectl kustomize` "
            "(install kubectl, e.g. https://kubernetes.io/docs/tasks/tools/, or set KUBECTL)"
        )
    return path


def kustomize(directory):
    """The objects `kubectl kustomize <directory>` renders, in its order."""
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"kubectl kustomize {directory} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def containers(obj):
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def render(overlay):
    return kustomize(KUBE / "overlays" / overlay)


def validate():
    import kubernetes_validate

    failures = 0
    for overlay in OVERLAYS:
        objects = render(overlay)
        for obj in objects:
            name = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                failures += 1
                print(f"INVALID {name}: {err.message} at {list(err.path)}")
            else:
                print(f"valid {name}")
        for obj in objects:
            if obj["kind"] == "ConfigMap" and "config.yaml" in obj.get("data", {}):
                yaml.safe_load(obj["data"]["config.yaml"])
    print(f"{failures} invalid")
    return 1 if failures else 0


def split_flags(args):
    """`--flag=value` / `--flag value` / `--switch` into (name, value or None)."""
    flags, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected positional argument {arg!r} in {args}")
        if "=" in arg:
            name, value = arg.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            name, value = arg, args[i + 1]
            i += 1
        else:
            name, value = arg, None
        flags.append([name, value])
        i += 1
    return flags


def image_binary(image):
    name = image.rsplit("/", 1)[-1].split(":")[0]
    return name if name in BINARIES else None


def kubernetes_references():
    refs = []
    for overlay in OVERLAYS:
        objects = render(overlay)
        services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
        hpas = {o["spec"]["scaleTargetRef"]["name"]: o for o in objects if o["kind"] == "HorizontalPodAutoscaler"}
        for obj in objects:
            if obj["kind"] != "Deployment":
                continue
            pod = obj["spec"]["template"]
            for c in containers(obj):
                binary = image_binary(c["image"])
                if binary is None:
                    continue
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                probes = []
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    probe = c.get(kind)
                    if probe:
                        if "grpc" not in probe:
                            raise SystemExit(f"{obj['metadata']['name']}: {kind} is not a gRPC probe")
                        probes.append({"kind": kind, "port": probe["grpc"]["port"],
                                       "service": probe["grpc"].get("service")})
                service = services.get(obj["metadata"]["name"])
                hpa = hpas.get(obj["metadata"]["name"])
                hpa_metrics = [m["pods"]["metric"]["name"] for m in (hpa or {}).get("spec", {}).get("metrics", [])
                               if m["type"] == "Pods"]
                refs.append({
                    "source": f"kubernetes/{overlay}: Deployment/{obj['metadata']['name']}",
                    "binary": binary,
                    "argv": c.get("args", []),
                    "env": {e["name"]: e.get("value") for e in c.get("env", [])},
                    "grpc_port": ports.get("grpc"),
                    "metrics_port": ports.get("metrics"),
                    "scrape_port": int(pod["metadata"].get("annotations", {}).get("prometheus.io/port", 0)) or None,
                    "probes": probes,
                    "service": None if service is None else {
                        "name": service["metadata"]["name"],
                        "headless": service["spec"].get("clusterIP") == "None",
                        "ports": [{"port": p["port"], "targetPort": p["targetPort"]} for p in service["spec"]["ports"]],
                    },
                    "termination_grace_seconds": pod["spec"].get("terminationGracePeriodSeconds", 30),
                    "prestop_sleep_seconds": c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0),
                    "hpa_metrics": hpa_metrics,
                })
    return refs


def adapter_rules():
    rules = []
    for obj in render(OVERLAYS[0]):
        if obj["kind"] == "ConfigMap" and "config.yaml" in obj.get("data", {}):
            for rule in yaml.safe_load(obj["data"]["config.yaml"])["rules"]:
                series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
                rules.append({"series": series, "published_as": rule["name"]["as"]})
    return rules


def compose_references():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    refs = []
    for name, service in compose["services"].items():
        binary = image_binary(service.get("image", ""))
        if binary is None:
            continue
        aliases = service.get("networks", {}).get("default", {}).get("aliases", [])
        refs.append({
            "source": f"compose: {name}",
            "binary": binary,
            "argv": service["command"],
            "env": service.get("environment", {}),
            "names": [name] + aliases,
            "profiles": service.get("profiles", []),
        })
    return refs


def dockerfile_references():
    """Each final stage of the Dockerfiles: binary, ENV, EXPOSE, HEALTHCHECK address, CMD."""
    refs = []
    for dockerfile in sorted(DEPLOY.glob("Dockerfile*")):
        if dockerfile.suffix == ".dockerignore":
            continue
        # Join continuation lines, drop comments.
        text = re.sub(r"\\\n", " ", dockerfile.read_text())
        stages, current = {}, None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            instruction, _, rest = line.partition(" ")
            instruction = instruction.upper()
            if instruction == "FROM":
                words = rest.split()
                base = words[0]
                name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
                current = {**copy.deepcopy(stages.get(base, {"env": {}})), "name": name}
                stages[name] = current
            elif instruction == "ENV" and current is not None:
                for pair in shlex.split(rest):
                    key, _, value = pair.partition("=")
                    current["env"][key] = value
            elif instruction == "EXPOSE":
                current["expose"] = [int(p) for p in rest.split()]
            elif instruction == "HEALTHCHECK":
                address = re.search(r"-addr=([^\"\s]+)", rest)
                current["health_addr"] = address.group(1) if address else None
            elif instruction == "ENTRYPOINT":
                current["entrypoint"] = json.loads(rest)
            elif instruction == "CMD":
                current["cmd"] = json.loads(rest)
        for name, stage in stages.items():
            if name in BINARIES and stage.get("entrypoint") == [name]:
                refs.append({
                    "source": f"{dockerfile.name}: target {name}",
                    "binary": name,
                    "argv": stage.get("cmd", [])[1:],
                    "subcommand": stage.get("cmd", [None])[0],
                    "env": stage["env"],
                    "expose": stage.get("expose", []),
                    "health_addr": stage.get("health_addr"),
                })
    return refs


def references():
    invocations = []
    for ref in kubernetes_references() + compose_references():
        argv = ref["argv"]
        if not argv or argv[0] != "serve":
            raise SystemExit(f"{ref['source']}: the first argument must be `serve`")
        invocations.append({**ref, "subcommand": "serve", "flags": split_flags(argv[1:])})
    for ref in dockerfile_references():
        invocations.append({**ref, "flags": split_flags(ref["argv"])})
    return {"invocations": invocations, "adapter_rules": adapter_rules()}


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    command = sys.argv[1]
    if command == "render":
        print(yaml.safe_dump_all(render(sys.argv[2]), sort_keys=False))
    elif command == "validate":
        sys.exit(validate())
    elif command == "references":
        print(json.dumps(references(), indent=1))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()

"""Renders the Kubernetes overlays in deploy/kubernetes, validates them against the Kubernetes
schemas and lists what deploy/ asks of the binaries (flags, environment, ports, probes, metrics).

kustomize is not needed: the overlays use only `resources`, `images` (newName/newTag) and
`patches` with a `target` and a JSON 6902 patch file, which this script applies the way kustomize
does; any other kustomization key is an error, so real kustomize renders the same objects.

  python tools/deploy_manifests.py render cuda        # YAML stream on stdout
  python tools/deploy_manifests.py validate           # every overlay, strict schemas
  python tools/deploy_manifests.py references         # JSON for the cross-check test

Needs PyYAML and kubernetes-validate (tools/requirements-ci.txt).
"""

import copy
import json
import re
import shlex
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
OVERLAYS = ["cpu", "cuda"]
KUBERNETES_VERSION = "1.33.0"
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}
BINARIES = {"gateway", "vision-worker", "llm-worker", "sam-worker"}


def load_kustomization(directory):
    """The objects a kustomization directory renders to, in order."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise SystemExit(f"{directory}: unsupported kustomization keys {sorted(unknown)}")
    objects = []
    for resource in spec.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            objects.extend(load_kustomization(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for patch in spec.get("patches", []):
        target = patch["target"]
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        matched = [o for o in objects if matches(o, target)]
        if len(matched) != 1:
            raise SystemExit(f"{directory}: patch {patch['path']} matches {len(matched)} objects")
        index = objects.index(matched[0])
        objects[index] = apply_json_patch(matched[0], operations, patch["path"])
    for image in spec.get("images", []):
        for obj in objects:
            for container in containers(obj):
                name, _, _tag = container["image"].partition(":")
                if name == image["name"]:
                    new_name = image.get("newName", name)
                    container["image"] = f"{new_name}:{image['newTag']}" if "newTag" in image else new_name
    return objects


def matches(obj, target):
    group, _, version = obj["apiVersion"].rpartition("/")
    return (
        obj["kind"] == target.get("kind", obj["kind"])
        and obj["metadata"]["name"] == target.get("name", obj["metadata"]["name"])
        and group == target.get("group", group)
        and version == target.get("version", version)
    )


def apply_json_patch(obj, operations, where):
    """RFC 6902 add/replace/remove/test, as kustomize applies them."""
    obj = copy.deepcopy(obj)
    for op in operations:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = obj
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        key = (len(parent) if last == "-" else int(last)) if isinstance(parent, list) else last
        if op["op"] == "test":
            if parent[key] != op["value"]:
                raise SystemExit(f"{where}: test failed at {op['path']}: {parent[key]!r} != {op['value']!r}")
        elif op["op"] == "add" and isinstance(parent, list):
            parent.insert(key, op["value"])
        elif op["op"] in ("add", "replace"):
            if op["op"] == "replace" and (key not in parent if isinstance(parent, dict) else key >= len(parent)):
                raise SystemExit(f"{where}: replace of missing {op['path']}")
            parent[key] = op["value"]
        elif op["op"] == "remove":
            del parent[key]
        else:
            raise SystemExit(f"{where}: unsupported op {op['op']}")
    return obj


def containers(obj):
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def render(overlay):
    return load_kustomization(KUBE / "overlays" / overlay)


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
    base = load_kustomization(KUBE / "base")
    rules = []
    for obj in base:
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

"""Bytes per request between the gateway and its workers, through the real binaries.

Starts `vision-worker`, `llm-worker` and `gateway` from `--bin-dir` on loopback with the checkpoint
`--checkpoint` (tools/make_full_width_checkpoint.py writes one with the released widths), then
reads the gateway's `osprey_gateway_worker_bytes_total{kind,direction}` before and after each
request:

1. RegisterImage of `--image` (pixels kept by the gateway; no worker call);
2. Describe, short task, one polygon region, by image key: cold (nothing computed yet);
3. the same Describe again: warm;
4. Ask about the same region: warm;
5. the LLM worker restarted (it keeps nothing), then the Describe again.

Prints one JSON object per request (bytes sent to and received from each worker kind) and a
Markdown table for docs/BENCHMARKS.md. Needs grpcio and grpcio-tools (.venv-ci):

    .venv-ci/bin/python tools/bench_bytes.py --checkpoint .cache/full-width --bin-dir target/debug
"""

import argparse
import json
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from osprey_client import load_stubs  # noqa: E402

KINDS = [("vision", "sent"), ("vision", "received"), ("llm", "sent"), ("llm", "received")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One binary as a child process on 127.0.0.1, with its own /metrics port."""

    def __init__(self, bin_dir, name, args, logs):
        self.name, self.port, self.metrics_port = name, free_port(), free_port()
        self.argv = [str(bin_dir / name), "serve", *args, "--listen", f"127.0.0.1:{self.port}"]
        self.argv += ["--prometheus-port", str(self.metrics_port)]
        self.log = open(logs / f"{name}.log", "ab")
        self.process = None
        self.start()

    def start(self):
        self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=120)

    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def wait_serving(self, grpc, timeout=900):
        """Polls grpc.health.v1 Check (empty request; response field 1 = 1 means SERVING)."""
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log.name}")
            try:
                if check(b"", timeout=2) == b"\x08\x01":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not serving after {timeout} s")


def worker_bytes(metrics_port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    totals = dict.fromkeys(KINDS, 0)
    for line in text.splitlines():
        if not line.startswith("osprey_gateway_worker_bytes_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        for kind, direction in KINDS:
            if f'kind="{kind}"' in labels and f'direction="{direction}"' in labels:
                totals[(kind, direction)] += int(float(value))
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=pathlib.Path, required=True)
    parser.add_argument("--bin-dir", type=pathlib.Path, default=ROOT / "target" / "debug")
    parser.add_argument("--image", type=pathlib.Path, default=ROOT / "tests/fixtures/eval/samples/voc.jpg")
    parser.add_argument("--stubs", type=pathlib.Path, default=ROOT / ".cache" / "osprey-stubs")
    parser.add_argument("--label", default="", help="name of this run in the output")
    args = parser.parse_args()

    import grpc

    gateway_pb2, types_pb2, gateway_grpc = load_stubs(args.stubs)
    logs = pathlib.Path(tempfile.mkdtemp(prefix="osprey-bytes-"))
    checkpoint = str(args.checkpoint.resolve())
    services = []
    try:
        vision = Service(args.bin_dir, "vision-worker", ["--weights", checkpoint], logs)
        llm = Service(args.bin_dir, "llm-worker", ["--weights", checkpoint, "--default-max-new-tokens", "3"], logs)
        services += [vision, llm]
        for service in services:
            service.wait_serving(grpc)
        gateway = Service(
            args.bin_dir, "gateway", ["--vision-workers", vision.url(), "--llm-workers", llm.url()], logs
        )
        services.append(gateway)
        gateway.wait_serving(grpc)
        stub = gateway_grpc.OspreyStub(grpc.insecure_channel(f"127.0.0.1:{gateway.port}"))

        registered = stub.RegisterImage(gateway_pb2.RegisterImageRequest(encoded=args.image.read_bytes()))
        w, h = registered.width, registered.height
        box = [w * 0.25, h * 0.25, w * 0.75, h * 0.25, w * 0.75, h * 0.75, w * 0.25, h * 0.75]
        region = gateway_pb2.Region(
            label="box",
            mask=types_pb2.Mask(polygon=types_pb2.PolygonMask(height=h, width=w, polygons=[types_pb2.Polygon(xy=box)])),
        )
        image = types_pb2.Image(key=registered.key)

        def describe():
            request = gateway_pb2.DescribeRequest(
                image=image, regions=[region], task=gateway_pb2.DescribeTask.Value("DESCRIBE_TASK_SHORT")
            )
            results = list(stub.Describe(request, timeout=900))
            cache = results[0].metadata.cache
            return {
                "vision_features": types_pb2.CacheTier.Name(cache.vision_features),
                "llm_prefix_hit": cache.llm_prefix,
                "answer": results[0].raw_text,
            }

        def ask():
            request = gateway_pb2.AskRequest(image=image, regions=[region], question="what is region1?")
            response = stub.Ask(request, timeout=900)
            cache = response.metadata.cache
            return {
                "vision_features": types_pb2.CacheTier.Name(cache.vision_features),
                "llm_prefix_hit": cache.llm_prefix,
                "answer": response.raw_text,
            }

        rows = []

        def measure(name, call):
            before = worker_bytes(gateway.metrics_port)
            outcome = call()
            after = worker_bytes(gateway.metrics_port)
            row = {"run": args.label, "request": name, **outcome}
            row.update({f"{k}_{d}": after[(k, d)] - before[(k, d)] for k, d in KINDS})
            print(json.dumps(row), flush=True)
            rows.append(row)

        measure("Describe, cold", describe)
        measure("Describe, warm", describe)
        measure("Ask, warm", ask)
        llm.stop()
        llm.start()
        llm.wait_serving(grpc)
        time.sleep(3)  # the gateway's health check (every 2 s) sees the replica back
        measure("Describe, LLM restarted", describe)

        print(f"\nimage {args.image.name} {w}x{h}: pixels {w * h * 3:,} B\n")
        print("| request | to vision | from vision | to LLM | from LLM |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for row in rows:
            cells = " | ".join(f"{row[f'{k}_{d}']:,}" for k, d in KINDS)
            print(f"| {row['request']} | {cells} |")
    finally:
        for service in services:
            if service.process.poll() is None:
                service.process.kill()
        print(f"logs: {logs}", file=sys.stderr)


if __name__ == "__main__":
    main()

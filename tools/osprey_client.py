"""A small Python client for the Osprey gateway (`osprey.v1.Osprey`).

The gRPC stubs are generated from the repository's `proto/` with grpcio-tools into a folder of
your choice (`--stubs DIR`, made on first use), so nothing generated is checked in.

    python tools/osprey_client.py --endpoint localhost:50051 --stubs /tmp/osprey-stubs \
        --image tests/fixtures/vision/photo.png --polygon 20,20,120,20,120,90,20,90 --task short

prints one JSON object: the image key and size, and one result per region (text, area, bbox,
timings and cache flags). Needs `grpcio` and `grpcio-tools` (pinned in tools/requirements-ci.txt).
"""

import argparse
import importlib
import json
import pathlib
import sys

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[1] / "proto"
PROTOS = ["osprey/v1/types.proto", "osprey/v1/gateway.proto"]


def load_stubs(stubs_dir):
    """Generates the osprey.v1 modules into `stubs_dir` (unless there already) and imports them."""
    stubs_dir = pathlib.Path(stubs_dir)
    if not (stubs_dir / "osprey" / "v1" / "gateway_pb2_grpc.py").exists():
        from grpc_tools import protoc
        import grpc_tools

        stubs_dir.mkdir(parents=True, exist_ok=True)
        well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={stubs_dir}",
                f"--grpc_python_out={stubs_dir}",
                *[str(PROTO_ROOT / p) for p in PROTOS],
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
    sys.path.insert(0, str(stubs_dir))
    gateway_pb2 = importlib.import_module("osprey.v1.gateway_pb2")
    types_pb2 = importlib.import_module("osprey.v1.types_pb2")
    gateway_grpc = importlib.import_module("osprey.v1.gateway_pb2_grpc")
    return gateway_pb2, types_pb2, gateway_grpc


class OspreyClient:
    """Registers images and describes regions through a gateway."""

    def __init__(self, endpoint, stubs_dir, api_key=None):
        import grpc

        self.gateway_pb2, self.types_pb2, gateway_grpc = load_stubs(stubs_dir)
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = gateway_grpc.OspreyStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []

    def register_image(self, encoded):
        """Sends the image file's bytes once; returns (key, width, height)."""
        request = self.gateway_pb2.RegisterImageRequest(encoded=encoded)
        response = self.stub.RegisterImage(request, metadata=self.metadata)
        return response.key, response.width, response.height

    def describe(self, key, width, height, polygons, task="short"):
        """One result per polygon region (a flat x0, y0, x1, y1, ... list each), in region order."""
        types, gateway = self.types_pb2, self.gateway_pb2
        regions = [
            gateway.Region(
                label=f"polygon {i}",
                mask=types.Mask(
                    polygon=types.PolygonMask(height=height, width=width, polygons=[types.Polygon(xy=xy)])
                ),
            )
            for i, xy in enumerate(polygons)
        ]
        request = gateway.DescribeRequest(
            image=types.Image(key=key),
            regions=regions,
            task=gateway.DescribeTask.Value(f"DESCRIBE_TASK_{task.upper()}"),
        )
        results = [self._result(r) for r in self.stub.Describe(request, metadata=self.metadata)]
        return sorted(results, key=lambda r: r["region_index"])

    def _result(self, result):
        timing = result.metadata.timing
        cache = result.metadata.cache
        return {
            "region_index": result.region_index,
            "label": result.label,
            "text": result.text,
            "raw_text": result.raw_text,
            "area": result.area,
            "bbox": list(result.bbox),
            "generated_tokens": result.generated_tokens,
            "timing_ns": {
                "encode": timing.encode_ns,
                "pool": timing.pool_ns,
                "prefill": timing.prefill_ns,
                "decode": timing.decode_ns,
                "total": timing.total_ns,
            },
            "cache": {
                "vision_features": self.types_pb2.CacheTier.Name(cache.vision_features),
                "llm_prefix": cache.llm_prefix,
                "result": cache.result,
            },
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", required=True, help="host:port of the gateway")
    parser.add_argument("--stubs", required=True, help="folder for the generated gRPC modules")
    parser.add_argument("--image", required=True, help="PNG, JPEG or WebP file")
    parser.add_argument(
        "--polygon", action="append", required=True, help="a region: x0,y0,x1,y1,... (repeat for more)"
    )
    parser.add_argument("--task", default="short", choices=["short", "detailed", "category"])
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()

    client = OspreyClient(args.endpoint, args.stubs, args.api_key)
    key, width, height = client.register_image(pathlib.Path(args.image).read_bytes())
    polygons = [[float(v) for v in p.split(",")] for p in args.polygon]
    results = client.describe(key, width, height, polygons, args.task)
    print(json.dumps({"key": key, "width": width, "height": height, "results": results}))


if __name__ == "__main__":
    main()

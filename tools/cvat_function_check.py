"""Runs the CVAT functions of deploy/cvat/ (their nuclio handler, with nuclio's context and event
faked) against a running gateway, and prints what they answer as one JSON object
(tests/tests/integrations.rs checks it).

    python3 tools/cvat_function_check.py --gateway http://127.0.0.1:8080/x-anylabeling --key KEY \
        --image tests/fixtures/vision/photo.png --point 60,50 --negative 140,20 --box 20,10,120,90
"""

import argparse
import base64
import importlib.util
import json
import logging
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Response:
    def __init__(self, body, headers, content_type, status_code):
        self.body, self.headers, self.content_type, self.status_code = body, headers, content_type, status_code


def load(function):
    path = ROOT / "deploy/cvat" / function / "nuclio/main.py"
    spec = importlib.util.spec_from_file_location(function.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(function, env, body):
    module = load(function)
    context = types.SimpleNamespace(user_data=types.SimpleNamespace(), logger=logging.getLogger(function), Response=Response)
    saved = {k: module.os.environ.get(k) for k in env}
    module.os.environ.update(env)
    try:
        module.init_context(context)
    finally:
        for k, v in saved.items():
            if v is None:
                module.os.environ.pop(k, None)
            else:
                module.os.environ[k] = v
    response = module.handler(context, types.SimpleNamespace(body=body))
    return {"status": response.status_code, "body": json.loads(response.body)}


def auto_annotation(gateway, key, image_path):
    """The cvat-sdk auto-annotation function's shapes for the image (needs cvat-sdk and Pillow)."""
    import PIL.Image

    spec = importlib.util.spec_from_file_location("osprey_auto_annotation", ROOT / "deploy/cvat/osprey_auto_annotation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function = module.create(gateway=gateway, api_key=key, points_per_side=4, max_shapes=4)
    label = function.spec.labels[0]
    shapes = function.detect(None, PIL.Image.open(image_path))
    return {
        "label": label.name,
        "attributes": [a.name for a in label.attributes],
        "shapes": [shape.to_dict() for shape in shapes],
    }


def describe_masks(grpc, key, stubs, image_path, polygon):
    """deploy/cvat/osprey_describe_masks.py on a stand-in for a cvat-sdk task (cvat-sdk's own models
    for labels, shapes and the update; no CVAT server): which shapes it describes and what it writes."""
    import io

    import PIL.Image
    from cvat_sdk.api_client import models

    spec = importlib.util.spec_from_file_location("osprey_describe_masks", ROOT / "deploy/cvat/osprey_describe_masks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    encoded = pathlib.Path(image_path).read_bytes()
    width, height = PIL.Image.open(io.BytesIO(encoded)).size
    text = models.Attribute(id=5, name="description", input_type="text", mutable=True, values=[""], default_value="")
    labels = [models.Label(id=3, name="object", attributes=[text]), models.Label(id=4, name="plain", attributes=[])]
    # A mask shape in CVAT's encoding (runs across the rows of its box, background first, then the
    # box's left, top, right, bottom): in the box of columns 40-109 and rows 30-69, the pixels with
    # x - 40 < 2 * (y - 30) + 10 (tests/tests/integrations.rs builds the same mask).
    left, top, right, bottom = 40, 30, 109, 69
    runs, value, run = [], False, 0
    for y in range(top, bottom + 1):
        for x in range(left, right + 1):
            if (x - 40 < 2 * (y - 30) + 10) == value:
                run += 1
            else:
                runs.append(run)
                value, run = not value, 1
    runs.append(run)
    mask_points = [float(v) for v in runs + [left, top, right, bottom]]

    def shape(id, type, label_id, points, value=None):
        attributes = [models.AttributeVal(spec_id=5, value=value)] if value is not None else []
        return models.LabeledShape(
            type=type, frame=0, label_id=label_id, points=points, id=id, occluded=False, z_order=0,
            rotation=0.0, outside=False, attributes=attributes, group=0, source="manual", elements=[],
        )

    shapes = [
        shape(11, "polygon", 3, polygon, ""),
        shape(12, "mask", 3, mask_points),
        shape(13, "polygon", 3, polygon, "described by hand"),  # left alone without --overwrite
        shape(14, "polygon", 4, polygon),  # its label has no description attribute
        shape(15, "rectangle", 3, [10.0, 10.0, 50.0, 50.0], ""),  # not a mask or polygon
    ]

    class Task:
        updates = []

        def get_labels(self):
            return labels

        def get_annotations(self):
            return models.LabeledData(version=0, tags=[], shapes=shapes, tracks=[])

        def get_frame(self, frame, quality=None):
            assert frame == 0 and quality == "original"
            return io.BytesIO(encoded)

        def update_annotations(self, data):
            self.updates.append(data.to_dict())

    task = Task()
    osprey = module.OspreyClient(grpc, stubs, key)
    written = module.describe_task(task, osprey)
    return {"written": {str(k): v for k, v in written.items()}, "updates": task.updates}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--point", required=True)
    parser.add_argument("--negative", required=True)
    parser.add_argument("--box", required=True)
    parser.add_argument("--grpc", required=True, help="host:port of the gateway's gRPC side")
    parser.add_argument("--stubs", required=True, help="folder for the generated gRPC modules")
    parser.add_argument("--polygon", required=True, help="x0,y0,x1,y1,... of a region to describe")
    args = parser.parse_args()
    image = base64.b64encode(pathlib.Path(args.image).read_bytes()).decode()
    xy = lambda text: [float(v) for v in text.split(",")]
    box = xy(args.box)
    env = {"OSPREY_GATEWAY_URL": args.gateway, "OSPREY_API_KEY": args.key}
    interactor = dict(env, OSPREY_MODE="interactor")
    # A small point grid keeps everything mode short in the test.
    detector = dict(env, OSPREY_MODE="detector", OSPREY_POINTS_PER_SIDE="4", OSPREY_MAX_SHAPES="4")
    body = {"image": image, "pos_points": [xy(args.point)], "neg_points": [xy(args.negative)], "obj_bbox": [box[:2], box[2:]]}
    out = {
        "identical_handlers": (ROOT / "deploy/cvat/osprey-interactor/nuclio/main.py").read_bytes()
        == (ROOT / "deploy/cvat/osprey-detector/nuclio/main.py").read_bytes(),
        "interactor": run("osprey-interactor", interactor, body),
        "interactor_as_bytes": run("osprey-interactor", interactor, json.dumps(body).encode()),
        "detector": run("osprey-detector", detector, {"image": image, "threshold": 0.5}),
        "no_points": run("osprey-interactor", interactor, {"image": image, "pos_points": [], "neg_points": []}),
        "bad_image": run("osprey-interactor", interactor, {"image": "bm90IGFuIGltYWdl", "pos_points": [[1, 1]]}),
        "wrong_key": run("osprey-detector", dict(detector, OSPREY_API_KEY="wrong"), {"image": image}),
        "not_json": run("osprey-detector", detector, b"{oops"),
        "auto_annotation": auto_annotation(args.gateway, args.key, args.image),
        "describe_masks": describe_masks(args.grpc, args.key, args.stubs, args.image, xy(args.polygon)),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--point", required=True)
    parser.add_argument("--negative", required=True)
    parser.add_argument("--box", required=True)
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
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

"""Describes the regions already annotated in a CVAT task with Osprey: every polygon and mask
shape whose label has a text attribute `description` gets the gateway's description of exactly
that region written into the attribute (docs/INTEGRATIONS.md).

    python deploy/cvat/osprey_describe_masks.py --cvat https://CVAT --user USER --password PASSWORD \
        --task TASK_ID --gateway GATEWAY:50051 --api-key KEY [--describe short] [--overwrite]

A cvat-sdk auto-annotation function only sees each frame, not the shapes already on it, so this
is a script over the task's annotations with cvat-sdk's client: it reads the shapes, sends each
frame once and its shapes as regions to the gateway's Describe (gRPC), and updates the shapes'
attribute. Shapes whose description is already filled are left alone unless --overwrite.
Needs cvat-sdk, grpcio and grpcio-tools (tools/requirements-ci.txt); the gRPC stubs come from
proto/ through tools/osprey_client.py.
"""

import argparse
import collections
import pathlib
import sys
import tempfile

from cvat_sdk.api_client import models

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from osprey_client import OspreyClient  # noqa: E402

ATTRIBUTE = "description"
SHAPE_TYPES = ("polygon", "mask")


def description_attributes(labels, attribute=ATTRIBUTE):
    """Label id -> the id of its text attribute called `attribute` (labels without one are left out)."""
    found = {}
    for label in labels:
        for spec in label.attributes or []:
            if spec.name == attribute and str(spec.input_type) == "text":
                found[label.id] = spec.id
    return found


def current_value(shape, spec_id):
    return next((a.value for a in shape.attributes or [] if a.spec_id == spec_id), "")


def mask_runs(points, width, height):
    """COCO run lengths (down the columns, background first) of a CVAT mask shape, whose points are
    run lengths across the rows of its box (background first) then the box: left, top, right,
    bottom, inclusive."""
    *runs, left, top, right, _bottom = (int(v) for v in points)
    box_width = right - left + 1
    inside = set()
    position, value = 0, False
    for run in runs:
        if value:
            for i in range(position, position + run):
                inside.add((left + i % box_width) * height + top + i // box_width)
        position, value = position + run, not value
    counts, end = [], 0  # end: the index after the last pixel counted
    for index in sorted(inside):
        if not counts or index != end:
            counts += [index - end, 0]
        counts[-1] += 1
        end = index + 1
    if end < width * height:
        counts.append(width * height - end)
    return counts


def region(osprey, shape, width, height):
    """The shape as an osprey.v1 Region: a polygon as COCO polygons, a CVAT mask as COCO RLE."""
    types, gateway = osprey.types_pb2, osprey.gateway_pb2
    label = f"shape {shape.id}"
    if str(shape.type) == "polygon":
        polygon = types.PolygonMask(height=height, width=width, polygons=[types.Polygon(xy=shape.points)])
        return gateway.Region(label=label, mask=types.Mask(polygon=polygon))
    counts = mask_runs(shape.points, width, height)
    rle = types.RleMask(height=height, width=width, uncompressed=types.RunLengths(counts=counts))
    return gateway.Region(label=label, mask=types.Mask(rle=rle))


def describe_task(task, osprey, describe="short", overwrite=False, attribute=ATTRIBUTE):
    """Describes `task`'s polygon and mask shapes and writes the text back; returns {shape id: text}.

    `task` is a cvat-sdk task (get_labels, get_annotations, get_frame, update_annotations);
    `osprey` an OspreyClient.
    """
    spec_ids = description_attributes(task.get_labels(), attribute)
    if not spec_ids:
        raise SystemExit(f"no label of the task has a text attribute {attribute!r} to write descriptions into")
    by_frame = collections.defaultdict(list)
    for shape in task.get_annotations().shapes:
        spec_id = spec_ids.get(shape.label_id)
        if str(shape.type) not in SHAPE_TYPES or spec_id is None:
            continue
        if current_value(shape, spec_id) and not overwrite:
            continue
        by_frame[shape.frame].append(shape)

    written = {}
    updated = []
    for frame, shapes in sorted(by_frame.items()):
        encoded = task.get_frame(frame, quality="original").read()
        key, width, height = osprey.register_image(encoded)
        request = osprey.gateway_pb2.DescribeRequest(
            image=osprey.types_pb2.Image(key=key),
            regions=[region(osprey, shape, width, height) for shape in shapes],
            task=osprey.gateway_pb2.DescribeTask.Value(f"DESCRIBE_TASK_{describe.upper()}"),
        )
        # Results stream in as they are ready; the update lists the shapes in the task's order.
        texts = {r.region_index: r.text for r in osprey.stub.Describe(request, metadata=osprey.metadata)}
        for index, shape in enumerate(shapes):
            spec_id = spec_ids[shape.label_id]
            fields = shape.to_dict()
            fields["attributes"] = [a for a in fields.get("attributes") or [] if a["spec_id"] != spec_id]
            fields["attributes"].append({"spec_id": spec_id, "value": texts[index]})
            updated.append(models.LabeledShapeRequest(**fields))
            written[shape.id] = texts[index]
    if updated:
        task.update_annotations(models.PatchedLabeledDataRequest(shapes=updated))
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cvat", required=True, help="CVAT's URL")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--task", type=int, required=True, help="the CVAT task id")
    parser.add_argument("--gateway", required=True, help="host:port of the gateway's gRPC side")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--describe", default="short", choices=["short", "detailed", "category"])
    parser.add_argument("--overwrite", action="store_true", help="also replace descriptions already there")
    parser.add_argument(
        "--stubs", default=str(pathlib.Path(tempfile.gettempdir()) / "osprey-stubs"), help="folder for the gRPC modules"
    )
    args = parser.parse_args()

    from cvat_sdk import make_client

    osprey = OspreyClient(args.gateway, args.stubs, args.api_key)
    with make_client(args.cvat, credentials=(args.user, args.password)) as client:
        task = client.tasks.retrieve(args.task)
        written = describe_task(task, osprey, args.describe, args.overwrite)
    print(f"described {len(written)} shapes of task {args.task}")


if __name__ == "__main__":
    main()

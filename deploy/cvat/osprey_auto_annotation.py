"""Osprey as a cvat-sdk auto-annotation function: every object SAM finds in a frame, as a polygon
labelled `object`, with the region's description and category as text attributes, all computed
by the Osprey gateway (docs/INTEGRATIONS.md). Run it on a task with cvat-cli:

    cvat-cli --server-host CVAT task auto-annotate TASK_ID \
        --function-file deploy/cvat/osprey_auto_annotation.py \
        -p gateway=str:http://GATEWAY:8080/x-anylabeling -p api_key=str:KEY

It calls the gateway's X-AnyLabeling-protocol endpoint, as the nuclio functions beside it do.
"""

import base64
import io
import json
import urllib.error
import urllib.request

import cvat_sdk.auto_annotation as cvataa
from cvat_sdk.api_client import models

DESCRIPTION, CATEGORY = 0, 1


class OspreyFunction:
    spec = cvataa.DetectionFunctionSpec(
        labels=[
            cvataa.label_spec(
                "object",
                0,
                type="polygon",
                attributes=[
                    cvataa.text_attribute_spec("description", DESCRIPTION),
                    cvataa.text_attribute_spec("category", CATEGORY),
                ],
            )
        ]
    )

    def __init__(self, gateway, api_key="", points_per_side=0, max_shapes=32, timeout=600.0):
        self.url = gateway.rstrip("/") + "/v1/predict"
        self.api_key = api_key
        self.params = {"max_shapes": max_shapes}
        if points_per_side:
            self.params["points_per_side"] = points_per_side
        self.timeout = timeout

    def shapes(self, image):
        """The gateway's everything-mode shapes for a PIL image."""
        encoded = io.BytesIO()
        image.convert("RGB").save(encoded, format="PNG")
        body = {"model": "osprey", "image": base64.b64encode(encoded.getvalue()).decode(), "params": self.params}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Token"] = self.api_key
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:
            answer = json.load(error)
        if not answer.get("success"):
            error = answer.get("error") or {}
            raise RuntimeError(f"Osprey gateway: {error.get('code')}: {error.get('message')}")
        return answer["data"]["shapes"]

    def detect(self, context, image):
        return [
            cvataa.polygon(
                0,
                [v for point in shape["points"][:-1] for v in point],
                attributes=[
                    models.AttributeValRequest(spec_id=DESCRIPTION, value=shape.get("description") or ""),
                    models.AttributeValRequest(spec_id=CATEGORY, value=shape.get("label") or ""),
                ],
            )
            for shape in self.shapes(image)
        ]


def create(gateway: str, api_key: str = "", points_per_side: int = 0, max_shapes: int = 32) -> OspreyFunction:
    """cvat-cli's entry point (`-p name=type:value` gives the arguments)."""
    return OspreyFunction(gateway, api_key, points_per_side, max_shapes)

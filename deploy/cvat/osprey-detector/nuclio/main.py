"""Osprey for CVAT: a nuclio handler that forwards CVAT's requests to the Osprey gateway.

The same file serves both functions of deploy/cvat/ (OSPREY_MODE in function.yaml picks one):
- interactor: CVAT's positive/negative points and optional box -> SAM's mask outline (polygon);
- detector: everything mode -> one polygon per mask, labelled by its category when the function
  declares that label (OSPREY_LABELS), with the region's description and category as attributes.
The gateway does all the work (docs/INTEGRATIONS.md); this calls its X-AnyLabeling-protocol
endpoint with the Python standard library only, so the function image needs no packages.
"""

import json
import os
import urllib.error
import urllib.request


class GatewayError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def init_context(context):
    settings = context.user_data
    settings.gateway = os.environ.get("OSPREY_GATEWAY_URL", "http://osprey-gateway:8080/x-anylabeling").rstrip("/")
    settings.api_key = os.environ.get("OSPREY_API_KEY", "")
    settings.mode = os.environ.get("OSPREY_MODE", "interactor")
    settings.labels = [l.strip() for l in os.environ.get("OSPREY_LABELS", "object").split(",") if l.strip()]
    settings.timeout = float(os.environ.get("OSPREY_TIMEOUT_SECONDS", "300"))
    # Everything mode's point grid (points per side; the gateway's default when unset) and most shapes.
    settings.everything = {
        name: int(os.environ[variable])
        for name, variable in [("points_per_side", "OSPREY_POINTS_PER_SIDE"), ("max_shapes", "OSPREY_MAX_SHAPES")]
        if os.environ.get(variable)
    }


def predict(settings, image, marks):
    """The gateway's shapes for a base64 image and SAM marks (none: everything mode)."""
    params = {"marks": marks} if marks else dict(settings.everything)
    body = json.dumps({"model": "osprey", "image": image, "params": params}).encode()
    headers = {"Content-Type": "application/json"}
    if settings.api_key:
        headers["Token"] = settings.api_key
    request = urllib.request.Request(settings.gateway + "/v1/predict", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as error:
        try:
            answer = json.load(error)
        except ValueError:
            raise GatewayError(502, f"the gateway answered HTTP {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        raise GatewayError(502, f"cannot reach the Osprey gateway at {settings.gateway}: {error}") from None
    if not answer.get("success"):
        error = answer.get("error") or {}
        status = 401 if error.get("code") == "UNAUTHORIZED" else 400
        raise GatewayError(status, f"{error.get('code', 'ERROR')}: {error.get('message', 'no message')}")
    return answer["data"]["shapes"]


def interactor_marks(body):
    """CVAT's interactor request as SAM marks: points in pixels, and an optional box given as two
    corners ([[x1, y1], [x2, y2]]) or four numbers."""
    marks = [{"type": "point", "data": [float(x), float(y)], "label": 1} for x, y in body.get("pos_points") or []]
    marks += [{"type": "point", "data": [float(x), float(y)], "label": 0} for x, y in body.get("neg_points") or []]
    box = body.get("obj_bbox") or body.get("bbox")
    if box:
        flat = [float(v) for corner in box for v in (corner if isinstance(corner, (list, tuple)) else [corner])]
        if len(flat) != 4:
            raise GatewayError(400, "obj_bbox must be two corners [[x1, y1], [x2, y2]]")
        marks.append({"type": "rectangle", "data": flat})
    if not any(m["label"] == 1 for m in marks if m["type"] == "point") and not box:
        raise GatewayError(400, "give at least one positive point or a box")
    return marks


def polygon_area(points):
    return abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(points, points[1:] + points[:1]))) / 2


def interact(settings, body):
    shapes = predict(settings, body["image"], interactor_marks(body))
    if not shapes:
        return {"points": []}
    # The gateway closes polygons (first point repeated); CVAT's interactors give open rings.
    largest = max((shape["points"][:-1] for shape in shapes), key=polygon_area)
    return {"points": [[round(x, 2), round(y, 2)] for x, y in largest], "description": shapes[0].get("description", "")}


def detect(settings, body):
    detections = []
    for shape in predict(settings, body["image"], []):
        category = shape.get("label", "")
        label = next((l for l in settings.labels if l.lower() == category.lower()), settings.labels[0])
        detections.append(
            {
                "confidence": "1",
                "label": label,
                "type": "polygon",
                "points": [round(v, 2) for point in shape["points"][:-1] for v in point],
                "attributes": [
                    {"name": "description", "value": shape.get("description", "")},
                    {"name": "category", "value": category},
                ],
            }
        )
    return detections


def handler(context, event):
    settings = context.user_data
    body = event.body
    try:
        if isinstance(body, (bytes, str)):
            try:
                body = json.loads(body)
            except ValueError:
                raise GatewayError(400, "the request body is not JSON") from None
        if not isinstance(body, dict) or not body.get("image"):
            raise GatewayError(400, "the request has no image")
        result = interact(settings, body) if settings.mode == "interactor" else detect(settings, body)
        status = 200
    except GatewayError as error:
        context.logger.warn(str(error))
        result, status = {"error": str(error)}, error.status
    return context.Response(
        body=json.dumps(result), headers={}, content_type="application/json", status_code=status
    )

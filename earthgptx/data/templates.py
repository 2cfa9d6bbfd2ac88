"""The wording of instruction samples: several phrasings per task so that an answer never
hinges on one sentence. ``{noun}``/``{nouns}`` are the object's singular/plural
("ship"/"ships"); ``{where}`` a position phrase; ``{region}`` a ``<regionK>`` token.
Answers are short and fixed in form so that they can be scored (class names, counts,
yes/no, boxes in EarthGPT's ``[x0,y0,x1,y1]`` normalised form)."""
from __future__ import annotations

import re

CLASSIFY_SCENE = (
    "What kind of scene is this?", "Classify this scene.", "Which scene category does this image belong to?",
    "What is the land-use class of this image?", "What type of area is shown here?",
    "Name the scene class of this image.", "What category best describes this aerial image?",
)
CLASSIFY_VEHICLE = (
    "Which vehicle is in this SAR image?", "What type of military vehicle is this?", "Classify the target.",
    "Identify the vehicle in this chip.", "What is the class of the target in this image?",
    "Which vehicle type does this SAR chip show?", "What kind of vehicle is this?",
)
CAPTION = (
    "Describe the scene.", "Write a caption for this image.", "Describe this image briefly.",
    "What does this image show?", "Give a short description of the image.", "Caption this scene.",
)
MODALITY_Q = (
    "What kind of imagery is this?", "Which sensor type produced this image?",
    "Is this an optical, SAR or infrared image?", "What is the imaging modality?",
)
MODALITY_A = {"optical": "An optical image.", "sar": "A SAR image.", "infrared": "An infrared image."}
COUNT_Q = ("How many {nouns} are there?", "Count the {nouns} in this image.", "How many {nouns} can you see?",
           "What is the number of {nouns}?")
PRESENCE_Q = ("Is there a {noun} in this image?", "Are there any {nouns}?", "Does this image contain a {noun}?",
              "Can you see any {nouns} here?")
REGION_Q = ("What is in {region}?", "What does {region} show?", "Describe {region}.", "What object is at {region}?",
            "Identify {region}.", "What is marked by {region}?")
SEGMENT_ALL = ("Segment all {nouns}.", "Segment the {nouns}.", "Mask every {noun} in this image.",
               "Outline the {nouns}.", "Give me a mask of the {nouns}.", "Please segment each {noun}.")
SEGMENT_ONE = ("Segment the {noun} {where}.", "Mask the {noun} {where}.", "Outline the {noun} {where}.",
               "Please segment the {noun} {where}.")
SEGMENT_REGION = ("Segment {region}.", "Segment the object at {region}.", "Mask the object in {region}.",
                  "Outline {region}.")
GROUND_ALL = ("Where are the {nouns}?", "Locate the {nouns}.", "Find all {nouns}.", "Detect the {nouns}.",
              "Give the bounding boxes of the {nouns}.")
GROUND_ONE = ("Where is the {noun} {where}?", "Locate the {noun} {where}.", "Find the {noun} {where}.")

# nouns: the object words of each dataset, as (singular, plural) and region answers
NOUNS = {"ship": ("ship", "ships"), "target": ("infrared target", "infrared targets"), "road": ("road", "roads"),
         "vehicle": ("vehicle", "vehicles"), "object": ("object", "objects")}
NOUN_VARIANTS = {"target": (("small infrared target", "small infrared targets"), ("target", "targets"),
                            ("infrared target", "infrared targets"), ("small target", "small targets")),
                 "ship": (("ship", "ships"), ("vessel", "vessels"), ("boat", "boats")),
                 "road": (("road", "roads"), ("street", "streets"))}
REGION_A = {"ship": "A ship.", "target": "A small infrared target.", "road": "A road.", "vehicle": "A vehicle."}
POSITIONS = {  # phrase -> key on a box's centre (cx, cy) in 0-1; the smallest key wins
    "nearest the top-left corner": lambda cx, cy: cx + cy,
    "nearest the bottom-right corner": lambda cx, cy: -(cx + cy),
    "on the left": lambda cx, cy: cx,
    "on the right": lambda cx, cy: -cx,
    "at the top": lambda cx, cy: cy,
    "at the bottom": lambda cx, cy: -cy,
}
SIZES = {"largest": -1, "biggest": -1, "smallest": 1}


def readable_class(label: str) -> str:
    """A dataset class name as an answer: ``DenseResidential`` -> ``dense residential``,
    ``ZSU_23_4`` -> ``ZSU-23-4``, ``BRDM_2`` -> ``BRDM-2``, ``2S1`` stays."""
    if "_" in label or label.isupper() or any(c.isdigit() for c in label):
        return label.replace("_", "-")
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label).lower()


def class_key(text: str) -> str:
    """A class name reduced for comparison: case, spaces, ``_`` and ``-`` do not count."""
    return re.sub(r"[\s_\-]+", "", text).lower()


def clean_caption(text: str) -> str:
    """RSICD captions carry spaces before the full stop and double spaces: tidy them."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([.,])", r"\1", text)
    if text and text[-1] not in ".!?":
        text += "."
    return text[:1].upper() + text[1:]

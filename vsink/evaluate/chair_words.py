"""CHAIR's ``vsink`` vocabulary: the 80 COCO classes and the surface words that name them, written
for vsink (the ``reference`` vocabulary is the reference table, :mod:`vsink.evaluate.chair_reference`).

* :data:`SYNONYMS`: COCO class → words or phrases (singular; plurals are handled by the
  singulariser) that mean that class in a caption.
* :data:`COMPOUNDS`: phrases whose first word names a class but which mean another class or no
  COCO object ("bus stop", "baseball player" → person, "laptop computer" → one laptop).
* :data:`MODIFIERS`: person words that only qualify a following animal or vehicle ("baby
  elephant" → elephant, "passenger train" → train), never a person there.

Phrases are matched longest first (see :mod:`vsink.evaluate.chair_vsink`).

Left out on purpose, although the reference table maps them: "goat" (not a sheep), "wallet" (not a
handbag), "bagel" (not a donut), "pancake" (not a cake), "container" (not a bowl), "bow" (rarely a
tie), "sub" and "liner"; and "glove" (ski and work gloves are not baseball gloves) and "vehicle" (as
often a bus or truck as a car), which earlier vsink tables mapped.
"""

from __future__ import annotations

from typing import Optional

SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("person", "people", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "adult",
               "guy", "lady", "gentleman", "player", "skier", "snowboarder", "surfer", "skateboarder", "rider",
               "biker", "cyclist", "pedestrian", "crowd", "spectator", "worker", "chef", "cook", "officer",
               "policeman", "cop", "soldier", "teenager", "teen", "student", "tourist", "passenger", "driver", "catcher",
               "batter", "pitcher", "umpire", "athlete", "friend", "family", "mother", "father", "daughter", "son",
               "husband", "wife", "bride", "groom", "someone", "somebody", "human", "individual", "customer",
               "vendor", "farmer", "cowboy", "fisherman", "businessman", "youngster", "infant", "mom", "dad",
               "grandmother", "grandfather", "sister", "brother", "audience", "team"),
    "bicycle": ("bicycle", "bike", "mountain bike", "road bike"),
    "car": ("car", "automobile", "sedan", "taxi", "cab", "suv", "coupe", "hatchback", "jeep", "minivan", "van"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "scooter", "moped", "dirt bike"),
    "airplane": ("airplane", "plane", "aeroplane", "jet", "aircraft", "airliner", "jetliner", "passenger jet"),
    "bus": ("bus", "double decker", "trolley bus", "school bus"),
    "train": ("train", "locomotive", "tram", "subway", "railcar", "streetcar", "trolley"),
    "truck": ("truck", "pickup", "pickup truck", "lorry", "semi", "fire truck", "dump truck", "tow truck"),
    "boat": ("boat", "ship", "sailboat", "yacht", "canoe", "kayak", "ferry", "vessel", "raft", "rowboat",
             "speedboat", "gondola", "dinghy", "tugboat"),
    "traffic light": ("traffic light", "traffic signal", "stop light", "stoplight", "street light", "signal light"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),
    "bench": ("bench", "pew"),
    "bird": ("bird", "pigeon", "seagull", "gull", "duck", "goose", "swan", "parrot", "eagle", "hawk",
             "owl", "crow", "sparrow", "chicken", "hen", "rooster", "penguin", "flamingo", "pelican", "heron",
             "crane bird", "finch", "robin", "dove", "turkey", "ostrich", "peacock"),
    "cat": ("cat", "kitten", "kitty", "tabby", "feline"),
    "dog": ("dog", "puppy", "pup", "doggy", "doggie", "canine", "hound", "terrier", "labrador", "retriever", "poodle",
            "bulldog", "chihuahua", "dachshund", "beagle", "husky", "collie", "shepherd dog", "pitbull"),
    "horse": ("horse", "pony", "foal", "stallion", "mare", "colt"),
    "sheep": ("sheep", "lamb", "ram", "ewe"),
    "cow": ("cow", "cattle", "bull", "calf", "ox", "oxen", "steer", "heifer", "buffalo"),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly", "polar bear", "black bear", "brown bear", "cub"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "knapsack", "rucksack", "back pack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "purse", "hand bag", "clutch"),
    "tie": ("tie", "necktie", "bow tie", "bowtie"),
    "suitcase": ("suitcase", "luggage", "suit case", "baggage", "briefcase"),
    "frisbee": ("frisbee", "flying disc"),
    "skis": ("ski", "skis"),
    "snowboard": ("snowboard", "snow board"),
    "sports ball": ("sports ball", "ball", "soccer ball", "football", "basketball", "baseball", "tennis ball",
                    "volleyball", "softball", "beach ball", "golf ball", "rugby ball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "baseball mitt", "mitt", "catcher's mitt"),
    "skateboard": ("skateboard", "skate board", "longboard"),
    "surfboard": ("surfboard", "surf board", "paddle board"),
    "tennis racket": ("tennis racket", "racket", "racquet", "tennis racquet"),
    "bottle": ("bottle", "water bottle", "beer bottle", "wine bottle", "flask"),
    "wine glass": ("wine glass", "wineglass", "champagne glass", "goblet", "glass of wine"),
    "cup": ("cup", "mug", "coffee cup", "teacup", "tea cup"),
    "fork": ("fork",),
    "knife": ("knife", "knives", "butter knife", "steak knife", "cleaver"),
    "spoon": ("spoon", "teaspoon", "tablespoon", "ladle"),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "panini", "cheeseburger"),
    "orange": ("orange", "tangerine", "mandarin", "clementine"),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog", "frankfurter", "sausage"),
    "pizza": ("pizza", "pizza slice"),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake", "birthday cake", "pastry"),
    "chair": ("chair", "seat", "stool", "armchair", "recliner", "highchair", "high chair"),
    "couch": ("couch", "sofa", "loveseat", "love seat", "futon", "sectional"),
    "potted plant": ("potted plant", "houseplant", "house plant", "plant", "flower pot", "flowerpot", "planter"),
    "bed": ("bed", "mattress", "bunk bed", "crib", "cot"),
    "dining table": ("dining table", "table", "desk", "coffee table", "kitchen table", "picnic table"),
    "toilet": ("toilet", "toilet seat", "urinal", "commode", "lavatory"),
    "tv": ("tv", "television", "tv set", "flat screen", "flatscreen", "monitor"),
    "laptop": ("laptop", "notebook computer", "computer", "macbook"),
    "mouse": ("mouse", "computer mouse"),
    "remote": ("remote", "remote control", "controller", "game controller"),
    "keyboard": ("keyboard", "keypad"),
    "cell phone": ("cell phone", "cellphone", "phone", "smartphone", "mobile phone", "iphone", "telephone"),
    "microwave": ("microwave", "microwave oven"),
    "oven": ("oven", "stove", "stovetop", "cooker"),
    "toaster": ("toaster",),
    "sink": ("sink", "basin", "washbasin"),
    "refrigerator": ("refrigerator", "fridge", "freezer", "icebox"),
    "book": ("book", "novel", "textbook", "notebook", "magazine"),
    "clock": ("clock", "wall clock", "alarm clock", "clock tower"),
    "vase": ("vase",),
    "scissors": ("scissors", "scissor", "shears"),
    "teddy bear": ("teddy bear", "teddybear", "teddy", "stuffed bear", "stuffed animal", "plush toy"),
    "hair drier": ("hair drier", "hair dryer", "hairdryer", "blow dryer", "blowdryer"),
    "toothbrush": ("toothbrush", "tooth brush"),
}

_BALL_SPORTS = ("baseball", "softball", "football", "basketball", "volleyball")
_SPORT_PEOPLE = ("player", "team", "fan", "coach", "pitcher", "catcher", "batter", "referee", "umpire")
_SPORT_THINGS = ("game", "field", "court", "diamond", "stadium", "cap", "hat", "uniform", "jersey", "helmet",
                 "mound", "match", "net", "hoop", "park", "league", "practice", "card", "shirt", "season")

#: phrases led by a class word that mean another class (value) or no COCO object (None)
COMPOUNDS: dict[str, Optional[str]] = {
    # one object named by a compound, counted once
    "laptop computer": "laptop", "flat screen tv": "tv", "flat screen television": "tv", "flatscreen tv": "tv",
    "flatscreen television": "tv", "tv screen": "tv", "television screen": "tv", "tv monitor": "tv",
    "computer monitor": "tv", "computer screen": "tv", "computer keyboard": "keyboard",
    "computer desk": "dining table", "stove top": "oven", "stove top oven": "oven", "coffee mug": "cup", "toilet bowl": "toilet", "toilet tank": "toilet",
    "toilet lid": "toilet", "truck bed": "truck", "pizza oven": "oven", "bike seat": "bicycle",
    "bicycle seat": "bicycle", "motorcycle seat": "motorcycle", "baby bottle": "bottle",
    # a class word qualifying a place or thing that is not that object
    **{f"bus {w}": None for w in ("stop", "station", "shelter", "terminal", "depot", "lane", "route")},
    **{f"train {w}": None for w in ("station", "track", "platform", "yard", "crossing")},
    **{f"{v} {w}": None for v in ("bike", "bicycle") for w in ("rack", "lane", "path", "helmet")},
    **{f"ski {w}": None for w in ("slope", "lift", "resort", "pole", "boot", "jacket", "suit", "trail", "run",
                                  "lodge", "goggle", "area", "mask")},
    "car park": None, "car seat": None, "car wash": None, "car dealership": None, "boat dock": None,
    "boat ramp": None, "boat house": None, "chair lift": None, "skateboard park": None, "skateboard ramp": None,
    "tie dye": None, "cowboy hat": None, "cowboy boot": None, "man made": None, "family room": None,
    "baby stroller": None, "baby carriage": None, "baby shower": None, "baby food": None, "baby monitor": None,
    "passenger seat": None, "passenger side": None, "front seat": None, "back seat": None, "driver seat": None,
    "toilet paper": None, "toilet brush": None, "dog food": None, "dog toy": None, "dog leash": None,
    "dog park": None, "dog house": None, "cat food": None, "cat toy": None, "cat tree": None,
    "bird feeder": None, "bird cage": None, "bird bath": None, "bird house": None, "horse trailer": None,
    "pizza box": None, "pizza cutter": None, "pizza place": None, "pizza shop": None, "pizza parlor": None,
    "cake stand": None, "oven mitt": None, "tv stand": None, "television stand": None, "phone booth": None,
    # ball games: the ball word qualifies people and things, not a ball
    **{f"{sport} {w}": "person" for sport in _BALL_SPORTS for w in _SPORT_PEOPLE},
    **{f"{sport} {w}": None for sport in _BALL_SPORTS for w in _SPORT_THINGS},
    "softball bat": "baseball bat", "softball glove": "baseball glove", "softball mitt": "baseball glove",
}

_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "teddy bear")
_VEHICLES = ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat")
#: person word → classes whose words it only qualifies when it comes right before one of them
MODIFIERS: dict[str, tuple[str, ...]] = {"baby": _ANIMALS, "adult": _ANIMALS, "mother": _ANIMALS,
                                         "passenger": _VEHICLES}

#: irregular plurals (plural → singular) the rules below would get wrong
IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
             "geese": "goose", "teeth": "tooth", "feet": "foot", "knives": "knife", "leaves": "leaf",
             "wolves": "wolf", "shelves": "shelf", "calves": "calf", "halves": "half", "oxen": "ox",
             "sheep": "sheep", "skis": "skis", "scissors": "scissors", "buses": "bus",
             "gentlemen": "gentleman", "policemen": "policeman", "businessmen": "businessman",
             "fishermen": "fisherman", "cattle": "cattle", "dishes": "dish", "benches": "bench",
             "sandwiches": "sandwich", "couches": "couch", "boxes": "box", "bunches": "bunch",
             "ladies": "lady", "puppies": "puppy", "kitties": "kitty", "babies": "baby"}

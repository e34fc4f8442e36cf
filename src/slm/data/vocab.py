"""The words of the synthetic world and the small grammar that puts them together, shared by the
corpus (`synth.py`, `lessons.py`) and the probes that test what a model learnt from it (`probes.py`).

Words starting with a vowel letter but a consonant sound ("unicorn", "one") or the reverse ("hour",
"honest") are kept out of anything that takes an article, so a/an can be decided (and tested) by
the first letter alone.
"""

from __future__ import annotations

import random

GIRLS = """Lily Mia Emma Ava Zoe Ella Lucy Sophie Anna Grace Ruby Chloe Amy Rosa Nina Sara Maya Lena
Hannah Clara Ivy Daisy Molly Rose Kate Julia Tina Nora Alice Bella Hazel Jenny Kim Luna Mila Olive
Poppy Stella Wendy Fiona Holly Iris Jade Leah Megan Paula Rita Sally Tara Vera Amber Emily Isla
Layla Elsa Jasmine Penny Lola Eva Gina Heidi Lisa Nadia Olivia Pia Sofia Lottie Maria Abby Cora""".split()
BOYS = """Tom Ben Max Sam Leo Jack Finn Noah Liam Jake Tim Dan Ollie Alex Oscar Theo Henry Lucas Adam
Owen Eli Hugo Ryan Ethan Kai Luke Mark Nick Pete Ray Sid Ted Victor Will Zack Omar Ivan Jonah Milo
Otis Toby Rudy Felix George Harry Jamie Carlos Diego Marco Arlo Bruno Caleb Dylan Evan Frank Gabe
Isaac Joel Kevin Louis Matt Nate Paul Rex Simon Tony Wes Yusuf Ahmed Ravi""".split()

# Kinds a hero or friend can be.  Children and animals both get a gendered pronoun.
CHILD_KINDS = {"she": ["girl"], "he": ["boy"]}
ANIMALS = """cat dog puppy kitten rabbit bunny fox bear owl duck frog mouse bird fish squirrel turtle
horse cow pig sheep goat hen chick lion tiger elephant monkey giraffe zebra deer wolf bee butterfly
ant snail ladybug hedgehog otter beaver penguin seal whale dolphin crab parrot robin goose lamb pony
donkey kangaroo koala panda raccoon mole bat crow swan camel hippo""".split()
# Small animals a child can pick up and rescue.
SMALL_ANIMALS = """cat kitten puppy rabbit bunny duck frog mouse bird squirrel turtle hedgehog chick lamb
owl robin""".split()
# Animals that make sense as a story's talking hero (no bees or snails climbing hills).
HERO_ANIMALS = """cat dog puppy kitten rabbit bunny fox bear owl duck frog mouse squirrel turtle pig
goat lion tiger elephant monkey giraffe zebra hedgehog otter beaver penguin panda raccoon lamb pony
koala kangaroo""".split()

TOYS = """ball kite doll teddy_bear toy_train toy_boat book hat scarf sock key box cup spoon bucket
shovel drum whistle crayon pencil paintbrush blanket pillow umbrella balloon marble puzzle robot
block basket bell ribbon shell stone feather flag lamp map mirror necklace ring coin jar bag
backpack wagon sled acorn envelope apron anchor yo-yo rocket puppet top button glove boot
mitten notebook trumpet violin flute guitar toy_truck jump_rope sticker star""".split()
TOYS = [t.replace("_", " ") for t in TOYS]
OBJ_ADJ = """red blue green yellow pink purple orange brown white black gray gold silver shiny old new
big little tiny soft round bright striped spotted fluffy smooth heavy favorite special pretty funny
magic wooden small warm""".split()
HERO_ADJ = """kind brave curious shy happy clever friendly gentle cheerful playful quiet busy silly
careful proud sleepy hungry lonely bold polite sweet smart lively calm eager wise patient jolly
little small young tiny""".split()
PLACES = """park garden forest beach farm pond river lake hill meadow playground school library zoo
market bakery kitchen backyard field barn village cave island mountain orchard attic
woods valley""".split()
FOODS = """apple banana orange pear grape cookie cake pie carrot pea muffin pancake egg cherry plum
peach lemon melon potato tomato cupcake strawberry sandwich pretzel pumpkin onion radish biscuit
lollipop cucumber""".split()
MASS_FOODS = """bread cheese soup honey jam milk juice rice popcorn yogurt corn pasta cereal""".split()
FEEL_BAD = "sad scared worried upset lonely grumpy nervous confused".split()
FEEL_GOOD = "happy glad proud excited grateful cheerful relieved calm".split()
WEATHER = "sunny rainy windy snowy cloudy warm cold bright foggy".split()
TIMES = "morning afternoon evening day".split()
SPOTS = """under the bed|behind the door|in the toy box|under the big tree|next to the pond|behind a
bush|under the table|inside the old barn|near the fence|under a pile of leaves|behind the sofa|
in the tall grass|under a rock|by the swings|inside a hollow log|on top of the shelf""".replace("\n", " ").split("|")
SPOTS = [s.strip() for s in SPOTS]
NUM_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()

# --------------------------------------------------------------------------------------------
# Small grammar helpers.
# --------------------------------------------------------------------------------------------

_IRREG_PLURAL = {"mouse": "mice", "sheep": "sheep", "fish": "fish", "deer": "deer", "goose": "geese",
                 "wolf": "wolves", "leaf": "leaves", "potato": "potatoes", "tomato": "tomatoes",
                 "box": "boxes", "peach": "peaches", "radish": "radishes", "sandwich": "sandwiches"}


def article(word: str) -> str:
    """'a' or 'an' for the next word; the word lists avoid first-letter exceptions."""
    return "an" if word[0].lower() in "aeiou" else "a"


def a(word: str) -> str:
    return f"{article(word)} {word}"


def plural(noun: str, n: int = 2) -> str:
    if n == 1:
        return noun
    if noun in _IRREG_PLURAL:
        return _IRREG_PLURAL[noun]
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def say(speaker: str, line: str, verb: str = "said") -> str:
    """Quote a line of dialogue: '"We can do it," said Tom.' / '"Where is it?" asked Mia.'"""
    if line.endswith("."):
        line = line[:-1] + ","
    if " " in verb:  # "said gently": '"...," Mom said gently.' rather than "said gently Mom"
        return f'"{line}" {speaker} {verb}.'
    return f'"{line}" {verb} {speaker}.'


class Char:
    """A character with a name, a kind (girl, fox...) and matching pronouns."""

    __slots__ = ("name", "kind", "adj", "he", "him", "his", "He", "His")

    def __init__(self, name: str, kind: str, adj: str, gender: str):
        self.name, self.kind, self.adj = name, kind, adj
        self.he, self.him, self.his = ("she", "her", "her") if gender == "she" else ("he", "him", "his")
        self.He, self.His = cap(self.he), cap(self.his)


def make_char(rng: random.Random, taken: set, animal_ok: bool = True) -> Char:
    gender = rng.choice(("she", "he"))
    names = GIRLS if gender == "she" else BOYS
    name = rng.choice(names)
    while name in taken:
        name = rng.choice(names)
    taken.add(name)
    kind = rng.choice(HERO_ANIMALS) if animal_ok and rng.random() < 0.35 else CHILD_KINDS[gender][0]
    return Char(name, kind, rng.choice(HERO_ADJ), gender)

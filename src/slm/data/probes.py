"""Built-in common-sense probes (`slm eval --task builtin`): multiple-choice questions about the
world of the synthetic corpus (`synth.py`: its names, animals, foods, toys, feelings, number
rules and everyday facts), so a model trained on that corpus can be evaluated with nothing
downloaded.

The probes are written in their own sentences, never copied from the corpus templates, and drawn
from their own random stream (a string seed, not the integer seeds of `write_corpus`); a test
checks that no probe's answered text occurs in the training documents. Each probe is scored like
ARC or PIQA: the context, then " " + each choice. Chance level is the mean of 1 / choices.
"""

from __future__ import annotations

import random
from collections import defaultdict

from ..runtime.lm import LM
from ..runtime.loglik import encode_pair, loglikelihoods
from .vocab import BOYS, FOODS, GIRLS, NUM_WORDS, PLACES, TOYS, a, cap, plural

# -- facts of the synthetic world, restated ---------------------------------------------------
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "pig": "oink", "sheep": "baa",
          "owl": "hoot", "bee": "buzz", "lion": "roar", "frog": "ribbit", "horse": "neigh", "mouse": "squeak"}
BABIES = {"cat": "kittens", "dog": "puppies", "sheep": "lambs", "hen": "chicks", "frog": "tadpoles"}
# No two pairs on one scale (big/little with tall/short), so a wrong answer is never half right.
OPPOSITES = [("hot", "cold"), ("big", "little"), ("happy", "sad"), ("day", "night"), ("up", "down"),
             ("fast", "slow"), ("wet", "dry"), ("open", "closed"), ("full", "empty"), ("loud", "quiet"),
             ("soft", "hard"), ("first", "last"), ("early", "late"), ("old", "young"), ("black", "white"),
             ("push", "pull"), ("yes", "no"), ("inside", "outside"), ("awake", "asleep"), ("clean", "dirty")]
COLORS = "red blue green yellow orange purple pink white black brown".split()
# (thing, its color, colors it can also honestly be): the last never serve as wrong answers.
COLORED = [("the sky on a clear, sunny day", "blue", ()), ("fresh grass in spring", "green", ()),
           ("snow", "white", ()), ("a ripe banana", "yellow", ("green", "brown")),
           ("a ripe strawberry", "red", ()), ("a carrot", "orange", ()), ("milk", "white", ()),
           ("a lemon", "yellow", ("green",)), ("a ripe tomato", "red", ("green", "yellow", "orange")),
           ("a pumpkin", "orange", ("green", "yellow", "white")), ("a pea", "green", ()),
           ("the sky at midnight", "black", ("blue",)), ("a cucumber", "green", ())]
BAD_NEWS = ["lost {his} favorite {toy} and could not find it anywhere",
            "dropped {his} {food} in the mud",
            "saw that {his} {toy} was broken",
            "had to stay inside because {he} was sick",
            "could not find {his} friend at the {place}"]
GOOD_NEWS = ["got {a_toy} for {his} birthday",
             "won a prize at the school fair",
             "saw {his} best friend after a long time away",
             "found the {toy} {he} had been looking for all week",
             "made {his} first snowman with {his} family"]
FEEL_BAD = ["sad", "upset"]
FEEL_GOOD = ["happy", "glad"]
# (context, right ending, wrong endings); {name}, {he}, {his}, {place} are filled in.
NATURE = [
    ("{name} left an ice cube on a plate in the hot sun. After a while, the ice cube",
     "melted", ["grew bigger", "turned to stone", "began to sing"]),
    ("{name} threw a small stone into the {water}. The stone", "sank to the bottom",
     ["floated on top", "flew up to the clouds", "turned into a fish"]),
    ("{name} dropped a feather into the {water}. The feather", "floated on the water",
     ["sank like a rock", "caught fire", "turned into a bird"]),
    ("{name} put a cup of water in the freezer. The next morning, the water had turned into",
     "ice", ["steam", "juice", "sand"]),
    ("{name} watched a pot of water boil on the stove. Above the pot rose a cloud of",
     "steam", ["snow", "sand", "leaves"]),
    ("It was snowy and very cold outside, so {name} put on {his}", "warm coat",
     ["swimsuit", "sun hat", "sandals"]),
    ("The sun went down and the sky grew dark. Looking up, {name} saw the", "moon and the stars",
     ["sun and a rainbow", "midday sun", "bright blue sky"]),
    ("{name} forgot to water {his} little plant for many weeks. The plant", "dried up",
     ["grew taller", "began to dance", "turned into a tree"]),
    ("{name} dropped a glass on the hard kitchen floor. The glass", "broke into pieces",
     ["bounced like a ball", "began to grow", "turned into water"]),
    ("{name} ran around the {place} as fast as {he} could. Soon {his} heart was beating", "faster",
     ["slower", "not at all", "backwards"]),
    ("The bees flew from flower to flower to make", "honey", ["milk", "bread", "cheese"]),
    ("{name} helped the farmer collect milk from the", "cow", ["hen", "duck", "bee"]),
    ("{name} found three eggs in the nest of the", "hen", ["cow", "pig", "horse"]),
    ("A fish lives and swims in", "the water", ["a tree", "the sky", "a box"]),
    ("{name} was very tired after a long day, so {he}", "went to bed",
     ["ran a race", "went to school", "ate breakfast"]),
    ("A week has", "seven days", ["three days", "twenty days", "one day"]),
    ("A year has", "twelve months", ["two months", "five months", "fifty months"]),
    ("After the cold winter comes", "spring", ["autumn", "midnight", "lunch"]),
    ("{name} woke up when the sun came up and ate {his} breakfast. It was", "morning",
     ["midnight", "evening", "bedtime"]),
]


def _mc(r: random.Random, kind: str, context: str, answer: str, wrong: list[str]) -> dict:
    choices = wrong + [answer]
    r.shuffle(choices)
    return {"kind": kind, "context": context, "choices": choices, "gold": choices.index(answer)}


def _person(r: random.Random) -> tuple[str, dict]:
    if r.random() < 0.5:
        return r.choice(GIRLS), {"he": "she", "him": "her", "his": "her", "He": "She", "kind": "girl"}
    return r.choice(BOYS), {"he": "he", "him": "him", "his": "his", "He": "He", "kind": "boy"}


def _count(n: int, item: str) -> str:
    return f"{n} {plural(item, n)}"


def _numbers(r: random.Random, answer: int, others: list[int]) -> list[int]:
    """Three wrong numbers near the answer, all different and >= 0."""
    pool = [x for x in dict.fromkeys(others + [answer + 1, answer - 1, answer + 2, answer - 2, answer + 3])
            if x >= 0 and x != answer]
    return r.sample(pool[:5], 3)


def _arithmetic(r: random.Random) -> dict:
    name, p = _person(r)
    food = r.choice([f for f in FOODS if f not in ("pea",)])
    if r.random() < 0.5:
        x, y = r.randint(3, 9), r.randint(1, 3)
        ctx = f"{name} has {_count(x, food)} and eats {NUM_WORDS[y]}. Now {p['he']} has"
        ans, others = x - y, [x, x + y]
    else:
        x, y = r.randint(1, 6), r.randint(1, 4)
        ctx = (f"{name} had {_count(x, food)}, and then {p['his']} {r.choice(['mom', 'dad', 'grandma'])} "
               f"gave {p['him']} {NUM_WORDS[y]} more. Now {p['he']} has")
        ans, others = x + y, [x, max(x - y, 0)]
    return _mc(r, "arithmetic", ctx, _count(ans, food), [_count(n, food) for n in _numbers(r, ans, others)])


def _compare(r: random.Random) -> dict:
    (n1, _), (n2, _) = _person(r), _person(r)
    while n2 == n1:
        n2, _ = _person(r)
    item = r.choice([t for t in TOYS if " " not in t and t != "yo-yo"])
    x, y = r.sample(range(1, 15), 2)
    ctx = f"{n1} has {_count(x, item)} and {n2} has {_count(y, item)}. The one with more {plural(item)} is"
    return _mc(r, "compare", ctx, n1 if x > y else n2, [n2 if x > y else n1])


def _animal_sound(r: random.Random) -> dict:
    animal = r.choice(sorted(SOUNDS))
    others = [a_ for a_ in sorted(SOUNDS) if a_ != animal]
    name, _ = _person(r)
    if r.random() < 0.5:
        ctx = f"On the farm, {name} heard {a(animal)} say"
        return _mc(r, "animal_sound", ctx, SOUNDS[animal], [SOUNDS[o] for o in r.sample(others, 3)])
    ctx = f'"{cap(SOUNDS[animal])}, {SOUNDS[animal]}!" {name} heard. It was the sound of the'
    return _mc(r, "animal_sound", ctx, animal, r.sample(others, 3))


def _baby_animal(r: random.Random) -> dict:
    animal = r.choice(sorted(BABIES))
    name, _ = _person(r)
    ctx = f"{name} saw the {plural(animal)} on the farm with their babies. The babies were"
    wrong = r.sample([b for k, b in sorted(BABIES.items()) if k != animal], 3)
    return _mc(r, "baby_animal", ctx, BABIES[animal], wrong)


def _opposite(r: random.Random) -> dict:
    pair = list(r.choice(OPPOSITES))
    r.shuffle(pair)
    word, ans = pair
    pool = [w for p in OPPOSITES if word not in p for w in p]
    wrong = r.sample(pool, 3)
    ctx = r.choice([f"The opposite of {word} is", f"{cap(word)} is the opposite of"])
    return _mc(r, "opposite", ctx, ans, wrong)


def _color(r: random.Random) -> dict:
    thing, color, also = r.choice(COLORED)
    wrong = r.sample([c for c in COLORS if c != color and c not in also], 3)
    ctx = r.choice([f"The color of {thing} is", f"What color is {thing}? It is"])
    return _mc(r, "color", ctx, color, wrong)


def _fill(r: random.Random, template: str, name: str, p: dict) -> str:
    toy = r.choice(TOYS)
    return template.format(name=name, he=p["he"], his=p["his"], toy=toy, a_toy=a(toy),
                           food=r.choice(FOODS), place=r.choice(PLACES), water=r.choice(["pond", "lake", "river"]))


def _feeling(r: random.Random) -> dict:
    name, p = _person(r)
    if r.random() < 0.5:
        event, ans, wrong = r.choice(BAD_NEWS), r.choice(FEEL_BAD), FEEL_GOOD
    else:
        event, ans, wrong = r.choice(GOOD_NEWS), r.choice(FEEL_GOOD), FEEL_BAD
    ctx = f"{name} {_fill(r, event, name, p)}. {p['He']} felt very"
    return _mc(r, "feeling", ctx, ans, [r.choice(wrong)])


def _pronoun(r: random.Random) -> dict:
    name, p = _person(r)
    toy = r.choice(TOYS)
    ctx = f"{name} is a {p['kind']} who likes to play at the {r.choice(PLACES)}. Every day, {name} brings"
    his, other = p["his"], "his" if p["his"] == "her" else "her"
    return _mc(r, "pronoun", ctx, f"{his} {toy}", [f"{other} {toy}"])


def _nature(r: random.Random) -> dict:
    ctx, ans, wrong = r.choice(NATURE)
    name, p = _person(r)
    return _mc(r, "nature", _fill(r, ctx, name, p), ans, list(wrong))


def _food(r: random.Random) -> dict:
    name, p = _person(r)
    food = r.choice(FOODS)
    toys = r.sample([t for t in TOYS if t not in ("cup", "spoon", "jar", "basket", "bag", "box")], 3)
    ctx = f"{name} was very hungry after playing at the {r.choice(PLACES)}, so {p['he']} ate"
    return _mc(r, "food", ctx, a(food), [a(t) for t in toys])


KINDS = {"arithmetic": _arithmetic, "compare": _compare, "animal_sound": _animal_sound,
         "baby_animal": _baby_animal, "opposite": _opposite, "color": _color, "feeling": _feeling,
         "pronoun": _pronoun, "nature": _nature, "food": _food}


def probes(per_kind: int = 20, seed: int = 0) -> list[dict]:
    """per_kind distinct probes of each kind, {"kind", "context", "choices", "gold"}, with the
    kinds taking turns, so the first n probes (`--limit n`) cover every kind evenly."""
    r = random.Random(f"slm.data.probes/{seed}")  # a stream of its own, apart from the corpus seeds
    by_kind = []
    for make in KINDS.values():
        seen: dict[str, dict] = {}
        for _ in range(per_kind * 50):  # a kind with fewer distinct probes stops short of per_kind
            if len(seen) == per_kind:
                break
            p = make(r)
            seen.setdefault(p["context"], p)
        by_kind.append(list(seen.values()))
    return [ps[i] for i in range(per_kind) for ps in by_kind if i < len(ps)]


def held_out(per_kind: int = 60, seed: int = 11) -> list[dict]:
    """Probes from the same generators on another seed, less any whose context is one of probes()'s:
    a second, larger sample for choosing between corpora and recipes, so the 200 reported probes
    are not also the ones that choices were made on."""
    reported = {p["context"] for p in probes()}
    return [p for p in probes(per_kind, seed) if p["context"] not in reported]


def score(lm: LM, items: list[dict], batch_size: int = 32) -> dict:
    """How lm answers the probes, scored as `slm eval --task builtin` scores them (lm-eval's acc:
    the choice whose " " + text is likeliest after the context, encoded with BOS):
    {"acc", "chance", "by_kind": {kind: acc}, "tokens", "sequences": what was read}. For use during training,
    where the full evaluation (slm.eval, a layer above) is out of reach."""
    requests = [encode_pair(lm, p["context"], " " + c, add_bos=True) for p in items for c in p["choices"]]
    lls = iter(ll for ll, _ in loglikelihoods(lm, requests, batch_size=batch_size, progress=False))
    right = defaultdict(list)
    for p in items:
        scores = [next(lls) for _ in p["choices"]]
        right[p["kind"]].append(float(max(range(len(scores)), key=scores.__getitem__) == p["gold"]))
    every = [x for xs in right.values() for x in xs]
    return {"acc": sum(every) / len(every), "chance": sum(1 / len(p["choices"]) for p in items) / len(items),
            "by_kind": {k: sum(xs) / len(xs) for k, xs in right.items()},
            "tokens": sum(len(c) + len(x) for c, x in requests), "sequences": len(requests)}


def summary(scored: dict) -> str:
    """One line of score()'s result: the accuracy against chance, and the kinds from best to worst."""
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(scored["by_kind"].items(), key=lambda kv: -kv[1]))
    return f"built-in probes: acc {scored['acc']:.3f} (chance {scored['chance']:.3f}); {kinds}"

"""Does a trained model know a fact, or only the sentence it was taught in? For the probe kinds that
a small model finds hardest, the same fact asked in the lessons' own sentence shape and in the
probes' shape, 60 generated items each, scored as the probes are (the likeliest choice after the
context). A kind right in its lesson shape and at chance in the probes' has learnt a sentence, not
a fact: the corpus needs the probes' everyday words in sentences of its own (docs/training.md).

    python benchmarks/probe_forms.py RUN [RUN ...]

The two lesson shapes are sentences of `slm.data.lessons` and the textbook's exercises (`synth.py`)
as the corpus before both tenses wrote them; the probe shape is one of `slm.data.probes`'s. Names,
numbers and things are drawn here, on their own seed.
"""

import argparse
import random
import sys

from slm import load
from slm.data.probes import OPPOSITES, SOUNDS, score
from slm.data.vocab import BOYS, FOODS, GIRLS, NUM_WORDS, TOYS, a, cap, plural

ITEMS = 60
COUNTABLE = [f for f in FOODS if f != "pea"]
THINGS = [t for t in TOYS if " " not in t and t != "yo-yo"]


def _n(n: int, item: str) -> str:
    return f"{n} {plural(item, n)}"


def take_away(r: random.Random, shape: str):
    name, item, x, y = r.choice(BOYS), r.choice(COUNTABLE), r.randint(3, 9), r.randint(1, 3)
    ctx = {"lesson": f"{name} had {_n(x, item)}. He ate {NUM_WORDS[y]} of them, so he had",
           "lesson 2": f"Exercise: {name} has {_n(x, item)}. He gives {y} to a friend. How many "
                       f"{plural(item)} are left?\nAnswer: {x} - {y} =",
           "probe": f"{name} has {_n(x, item)} and eats {NUM_WORDS[y]}. Now he has"}[shape]
    nums = [x - y, x, x - y + 1, x - y - 1]
    return ctx, [str(n) if shape == "lesson 2" else _n(n, item) for n in nums]


def who_has_more(r: random.Random, shape: str):
    p, q = r.sample(GIRLS + BOYS, 2)
    x, y = r.sample(range(1, 15), 2)
    item = r.choice(THINGS)
    things = plural(item)
    ctx = {"lesson": f"{p} has {_n(x, item)}. {q} has {_n(y, item)}. Who has more {things}?",
           "lesson 2": f"Exercise: {p} has {_n(x, item)}. {q} has {_n(y, item)}. Who has more {things}?\nAnswer:",
           "probe": f"{p} has {_n(x, item)} and {q} has {_n(y, item)}. The one with more {things} is"}[shape]
    if shape == "lesson":
        return ctx, [f"{p if x > y else q} does.", f"{q if x > y else p} does."]
    if shape == "lesson 2":  # the textbook answers with the comparison first
        return ctx, [f"{x} is {'more' if x > y else 'less'} than {y}", f"{x} is {'less' if x > y else 'more'} than {y}"]
    return ctx, [p if x > y else q, q if x > y else p]


def animal_sound(r: random.Random, shape: str):
    animal = r.choice(sorted(SOUNDS))
    wrong = [SOUNDS[o] for o in r.sample([o for o in sorted(SOUNDS) if o != animal], 3)]
    name = r.choice(GIRLS)
    ctx = {"lesson": f"{name} heard {a(animal)}. It said", "lesson 2": f"{cap(a(animal))} says",
           "probe": f"On the farm, {name} heard {a(animal)} say"}[shape]
    return ctx, [SOUNDS[animal]] + wrong


def opposite(r: random.Random, shape: str):
    pair = list(r.choice(OPPOSITES))
    r.shuffle(pair)
    word, answer = pair
    wrong = r.sample([w for p in OPPOSITES if word not in p for w in p], 3)
    if shape == "lesson 2":
        return f"Exercise: Which word is the opposite of {word}?\nAnswer:", [cap(w) + "." for w in [answer] + wrong]
    ctx = {"lesson": f"The opposite word for {word} is", "probe": f"{cap(word)} is the opposite of"}[shape]
    return ctx, [answer] + wrong


KINDS = {"take away": take_away, "who has more": who_has_more, "animal sound": animal_sound, "opposite": opposite}
SHAPES = ("lesson", "lesson 2", "probe")


def accuracy(lm, make, shape: str) -> float:
    r = random.Random(f"probe_forms/{make.__name__}")  # the same items for every run and shape
    items = [make(r, shape) for _ in range(ITEMS)]
    # scored as the probes are; each maker puts the right choice first
    return score(lm, [{"kind": shape, "context": ctx, "choices": choices, "gold": 0} for ctx, choices in items])["acc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    args = p.parse_args()
    print(f"{'run':<28} {'kind':<14} " + " ".join(f"{s:>9}" for s in SHAPES))
    for run in args.runs:
        lm = load(run)
        for kind, make in KINDS.items():
            print(f"{run[-28:]:<28} {kind:<14} " + " ".join(f"{accuracy(lm, make, s):>9.2f}" for s in SHAPES),
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""World lessons: short documents that teach the facts of the synthetic world, each in many phrasings.

The stories of `synth.py` teach a model the corpus's form (names, dialogue, a moral) but state few
facts, and a fact stated once in a hundred documents is not learnt by a small model in minutes.
Each lesson here teaches one kind of fact that the built-in probes (`probes.py`) ask about:
animal sounds, baby animals, opposites, colours, feelings, everyday physics, food, counting
(adding and taking away small numbers), comparing, and pronouns that follow a name. A lesson
mixes plain statements ("A duck says quack.") with small scenes about named children ("Mia heard
the duck. It said quack."), and exercises with answers, so the fact is seen from several sides.

The probes are written in their own sentences: no lesson uses a probe's sentence frame (tests check
that no probe's context occurs in the training split, and that no lesson matches the frame of any
probe kind with its names, numbers and things left open), so a model that scores on the probes has
carried the fact over to a new sentence, not completed one it was shown.

What a lesson must give is the probes' everyday words in sentences of its own. A model trained on
lessons told only in the past tense completed its own take-away sentences ("had 5 pears. He ate
two of them, so he had") right every time and the probes' present-tense ones at chance: "Now",
"eats", "brings" and "felt very" never occurred in that corpus. So each kind is told in both
tenses, with several starts and several endings that combine freely.
"""

from __future__ import annotations

import random

from .vocab import BOYS, FOODS, GIRLS, NUM_WORDS, PLACES, TOYS, Char, a, cap, plural

# -- the facts ------------------------------------------------------------------------------------
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "pig": "oink", "sheep": "baa",
          "owl": "hoot", "bee": "buzz", "lion": "roar", "frog": "ribbit", "horse": "neigh", "mouse": "squeak"}
BABIES = {"cat": "kittens", "dog": "puppies", "sheep": "lambs", "hen": "chicks", "frog": "tadpoles",
          "cow": "calves", "horse": "foals", "duck": "ducklings"}
OPPOSITES = [("hot", "cold"), ("big", "little"), ("happy", "sad"), ("day", "night"), ("up", "down"),
             ("fast", "slow"), ("wet", "dry"), ("open", "closed"), ("full", "empty"), ("loud", "quiet"),
             ("soft", "hard"), ("first", "last"), ("early", "late"), ("old", "young"), ("black", "white"),
             ("push", "pull"), ("yes", "no"), ("inside", "outside"), ("awake", "asleep"), ("clean", "dirty")]
# (thing, the colour it is, how a scene shows it)
COLORS = [("the sky", "blue", "on a clear, sunny day"), ("the grass", "green", "in spring"),
          ("snow", "white", ""), ("a ripe banana", "yellow", ""), ("a ripe strawberry", "red", ""),
          ("a carrot", "orange", ""), ("milk", "white", ""), ("a lemon", "yellow", ""),
          ("a ripe tomato", "red", ""), ("a pumpkin", "orange", ""), ("a pea", "green", ""),
          ("the sky", "black", "at midnight"), ("a cucumber", "green", ""), ("a cherry", "red", ""),
          ("coal", "black", ""), ("a leaf", "green", "in summer")]
SAD_EVENTS = ["could not find {his} {toy} anywhere", "broke {his} {toy} by mistake", "was sick and had to stay in bed",
              "dropped {his} {food} on the ground", "lost {his} {toy} at the {place}",
              "saw that the rain had ruined {his} {toy}", "missed {his} friend, who had moved away",
              "fell down and hurt {his} knee", "found {his} {toy} torn in two", "had nobody to play with at the {place}",
              "spilled {his} juice all over {his} picture", "could not go to the {place} because of the storm"]
GLAD_EVENTS = ["got {a_toy} as a present", "won a race at the {place}", "found {his} lost {toy}",
               "played all day with {his} best friend", "got a big hug from {his} grandma",
               "built a snowman with {his} family", "got a prize for {his} picture",
               "had a birthday party with all {his} friends", "learnt to ride a bike at last",
               "got a new {toy} from {his} aunt", "went to the {place} with {his} best friend",
               "saw a rainbow after the rain"]
SAD_WORDS, GLAD_WORDS = ["sad", "upset", "unhappy"], ["happy", "glad", "joyful"]
# (what happened, what came of it): everyday physics and the way of things
NATURE = [
    ("put an ice cube in the warm sun", "the ice cube melted into water"),
    ("left some ice on a hot plate", "the ice melted away"),
    ("dropped a stone into the {water}", "the stone sank to the bottom"),
    ("tossed a heavy rock into the {water}", "the rock sank"),
    ("put a feather on the {water}", "the feather floated on top"),
    ("set a leaf on the {water}", "the leaf floated"),
    ("put some water in the freezer", "the water froze and turned into ice"),
    ("heated a pot of water until it boiled", "steam rose up from the pot"),
    ("went out on a snowy, cold day", "{he} wore a warm coat"),
    ("looked up at the sky at night", "{he} saw the moon and the stars"),
    ("did not water {his} plant for a long time", "the plant dried up"),
    ("dropped a glass cup on the floor", "the glass broke into pieces"),
    ("ran very fast", "{his} heart beat faster"),
    ("watched the bees in the garden", "the bees made honey from the flowers"),
    ("visited the cow in the barn", "the cow gave milk"),
    ("looked in the nest of the hen", "there were eggs in the nest"),
    ("looked into the pond", "fish were swimming in the water"),
    ("was very tired at the end of the day", "{he} went to bed and slept"),
    ("counted the days from one Sunday to the next", "there were seven days in the week"),
    ("counted the months from January to December", "there were twelve months in the year"),
    ("waited for the long, cold winter to end", "spring came and the flowers grew"),
    ("got up early when the sun came up", "it was morning, time for breakfast"),
]
FACT_LINES = ["Ice melts in the sun.", "A stone sinks in water.", "A feather floats on water.",
              "Water in the freezer turns into ice.", "Boiling water makes steam.",
              "On a cold, snowy day we wear a warm coat.", "At night we can see the moon and the stars.",
              "A plant with no water dries up.", "Glass breaks when you drop it.",
              "When you run, your heart beats faster.", "Bees make honey.", "Cows give us milk.",
              "Hens lay eggs.", "Fish live in water.", "When we are tired, we go to bed.",
              "There are seven days in a week.", "There are twelve months in a year.",
              "Spring comes after winter.", "We eat breakfast in the morning."]
PARENTS = ["mom", "dad", "grandma", "grandpa"]


def _child(r: random.Random) -> Char:
    if r.random() < 0.5:
        return Char(r.choice(GIRLS), "girl", "", "she")
    return Char(r.choice(BOYS), "boy", "", "he")


def _two(r: random.Random) -> tuple[Char, Char]:
    x = _child(r)
    y = _child(r)
    while y.name == x.name:
        y = _child(r)
    return x, y


def _count(n: int, item: str, words: bool = False) -> str:
    return f"{NUM_WORDS[n] if words and n < len(NUM_WORDS) else n} {plural(item, n)}"


# -- one lesson per kind of fact --------------------------------------------------------------------
def _sounds(r: random.Random) -> list[str]:
    animals = r.sample(sorted(SOUNDS), 5)
    out = ["Lesson: Animal sounds", "Every animal has its own sound."]
    for an in animals:
        c, s = _child(r), SOUNDS[an]
        out.append(r.choice([
            f"{c.name} heard {a(an)}. It said {s}.",
            f"{cap(s)}, {s}! That is the sound {a(an)} makes.",
            f"When you hear {s}, it is {a(an)}.",
            f"{cap(a(an))} says {s}.",
            f"The {an} goes {s}, {s}.",
            f"{c.name} went to see the {an}. The {an} looked at {c.him} and said {s}.",
            f'"{cap(s)}!" said the {an}, and {c.name} laughed.',
            f"When {a(an)} talks, it says {s}.",
            f"{c.name} can make the sound of {a(an)}: {s}, {s}!",
            f"{c.name} could hear {a(an)} saying {s}.",
            f"Listen! The {an} says {s} to {c.name}.",
            f"{cap(s)} is the sound of {a(an)}.",
            f'{c.name} heard "{s}, {s}" from the barn. That was the {an}.',
            f'"{cap(s)}, {s}!" {c.name} knew at once that it was {a(an)}.',
        ]))
    for an in r.sample(animals, 2):
        out += [f"Exercise: What does {a(an)} say?", f"Answer: {cap(a(an))} says {SOUNDS[an]}."]
    return out


def _babies(r: random.Random) -> list[str]:
    animals = r.sample(sorted(BABIES), 4)
    out = ["Lesson: Baby animals", "Animal babies have their own names."]
    for an in animals:
        c, b = _child(r), BABIES[an]
        out.append(r.choice([
            f"A baby {an} is one of the {b}. The mother {an} takes care of her {b}.",
            f"{c.name} saw a mother {an} with her {b}.",
            f"The {plural(an)} had babies in the spring, and {c.name} counted the little {b}.",
            f"Baby {plural(an)} are called {b}.",
            f"The mother {an} had three babies, and the babies were {b}.",
            f"{c.name} visited the {plural(an)} and their little ones. The little ones were {b}.",
        ]))
    for an in r.sample(animals, 2):
        out += [f"Exercise: What are the babies of the {an} called?", f"Answer: They are called {BABIES[an]}."]
    return out


def _opposites(r: random.Random) -> list[str]:
    pairs = r.sample(OPPOSITES, 5)
    out = ["Lesson: Opposites", "Some words mean the other way around. We call them opposites."]
    for x, y in pairs:
        if r.random() < 0.5:
            x, y = y, x
        out.append(r.choice([
            f"{cap(x)} and {y} are opposites.",
            f"{cap(x)} goes with {y}: they are opposites.",
            f"If it is not {x}, it may be {y}. {cap(x)} and {y} are a pair of opposites.",
            f"The word {x} has an opposite, and that opposite is {y}.",
            f"The opposite word for {x} is {y}.",
            f"What is the other way around from {x}? It is {y}.",
            f"{cap(x)} means the opposite of {y}.",
            f"{cap(x)} has an opposite, and it is {y}.",
            f"{cap(x)} is not {y}: {x} and {y} are opposites.",
        ]))
    for x, y in r.sample(pairs, 2):
        out += [f"Exercise: Which word is the opposite of {x}?", f"Answer: {cap(y)}."]
    return out


def _colors(r: random.Random) -> list[str]:
    things = r.sample(COLORS, 4)
    out = ["Lesson: Colors", "Things around us have colors."]
    for thing, color, when in things:
        c = _child(r)
        where = f" {when}" if when else ""
        out.append(r.choice([
            f"{cap(thing)}{where} is {color}.",
            f"{c.name} looked at {thing}{where}. It was {color}.",
            f"{cap(thing)}{where} has {a(color)} color.",
            f"{c.name} used {a(color)} crayon to draw {thing}{where}.",
        ]))
    thing, color, when = r.choice(things)
    out += [f"Exercise: Which color is {thing}{' ' + when if when else ''}?", f"Answer: It is {color}."]
    return out


def _feelings(r: random.Random) -> list[str]:
    out = ["Lesson: Feelings", "How we feel depends on what happens to us."]
    for _ in range(4):
        c = _child(r)
        sad = r.random() < 0.5
        event = r.choice(SAD_EVENTS if sad else GLAD_EVENTS)
        toy = r.choice(TOYS)
        event = event.format(his=c.his, toy=toy, a_toy=a(toy), food=r.choice(FOODS), place=r.choice(PLACES))
        feel = r.choice(SAD_WORDS if sad else GLAD_WORDS)
        out.append(r.choice([
            f"When {c.name} {event}, {c.he} was {feel}.",
            f"{c.name} {event}. That made {c.him} feel {feel}.",
            f"{c.name} {event}, so {c.he} was very {feel}.",
            f"{c.name} {event}. {c.He} felt {feel}.",
            f"After {c.name} {event}, {c.he} felt very {feel}.",
        ]))
    return out


def _nature(r: random.Random) -> list[str]:
    out = ["Lesson: How things work", " ".join(r.sample(FACT_LINES, 3))]
    for did, then in r.sample(NATURE, 3):
        c = _child(r)
        water = r.choice(["pond", "lake", "river"])
        did, then = (s.format(he=c.he, his=c.his, water=water) for s in (did, then))
        out.append(r.choice([f"{c.name} {did}, and {then}.", f"One day {c.name} {did}. Soon {then}.",
                             f"{c.name} {did}. What happened? {cap(then)}."]))
    return out


def _food(r: random.Random) -> list[str]:
    out = ["Lesson: Food", "We eat food when we are hungry. We do not eat toys."]
    for _ in range(3):
        c, food, toy = _child(r), r.choice(FOODS), r.choice(TOYS)
        out.append(r.choice([
            f"{c.name} was hungry, so {c.he} had {a(food)} for a snack.",
            f"After a long walk, {c.name} was hungry. {c.He} ate {a(food)}.",
            f"{c.name} ate {a(food)}, but {c.he} played with {a(toy)}.",
            f"You can eat {a(food)}, but you cannot eat {a(toy)}.",
        ]))
    return out


def _taken_away(r: random.Random, c: Char, x: str, y: str, friend: str) -> tuple[str, bool]:
    """The start of a take-away scene and whether it is told in the present tense."""
    return r.choice([
        (f"{c.name} had {x}. {c.He} ate {y} of them", False),
        (f"{c.name} had {x}, but {c.he} gave {y} to {friend}", False),
        (f"{c.name} had {x} and dropped {y} on the way home", False),
        (f"{c.name} picked {x}, and {y} of them rolled away", False),
        (f"{c.name} has {x}. {c.He} eats {y} of them", True),
        (f"{c.name} has {x} and gives {y} to {friend}", True),
        (f"{c.name} has {x}. {c.He} loses {y} in the grass", True),
    ])


def _given_more(r: random.Random, c: Char, x: str, y: str, friend: str) -> tuple[str, bool]:
    parent = r.choice(PARENTS)
    return r.choice([
        (f"{c.name} had {x}. {c.His} {parent} gave {c.him} {y} more", False),
        (f"{c.name} found {x} and then {y} more", False),
        (f"{c.name} had {x}, and {friend} brought {c.him} {y} more", False),
        (f"{c.name} has {x}. {c.His} {parent} gives {c.him} {y} more", True),
        (f"{c.name} has {x} and finds {y} more", True),
        (f"{c.name} has {x}. {friend} gives {c.him} {y} more", True),
    ])


def _counting(r: random.Random) -> list[str]:
    """Take-away and add-more scenes told in the past and the present, each start with several
    endings ("so she had 3 left", "Now she has 3"), so the sum is tied to no one sentence."""
    out = ["Lesson: Counting"]
    for _ in range(5):
        (c, other), item = _two(r), r.choice([f for f in FOODS if f != "pea"] + ["ball", "book", "shell", "flower"])
        friend = other.name
        if r.random() < 0.5:
            x = r.randint(2, 9)
            y = r.randint(1, min(x, 4))
            z, sign = x - y, f"{x} take away {y} is {x - y}."
            start, now = _taken_away(r, c, _count(x, item), NUM_WORDS[y] if r.random() < 0.7 else str(y), friend)
        else:
            x, y = r.randint(1, 7), r.randint(1, 4)
            z, sign = x + y, f"{x} and {y} make {x + y}."
            start, now = _given_more(r, c, _count(x, item), NUM_WORDS[y] if r.random() < 0.7 else str(y), friend)
        left = _count(z, item)
        end = r.choice([f". Now {c.he} has {left}.", f", so now {c.he} has {left}.",
                        f". {c.He} still has {left}." if z < x else f", so {c.he} has {left} in all."] if now else
                       [f". Then {c.he} had {left}.", f". After that, {c.he} had {left}.",
                        f", so {c.he} had {left} left." if z < x else f", so {c.he} had {left} in all."])
        out.append(start + end + (" " + sign if r.random() < 0.3 else ""))
    return out


def _comparing(r: random.Random) -> list[str]:
    """Who has more, said straight after the two numbers (the way a question is answered) in
    several sentence shapes, and sometimes why."""
    out = ["Lesson: Who has more?"]
    for _ in range(4):
        (p, q), item = _two(r), r.choice([t for t in TOYS if " " not in t and t != "yo-yo"])
        x, y = r.sample(range(1, 15), 2)
        more, less = (p, q) if x > y else (q, p)
        big, small, things = max(x, y), min(x, y), plural(item)
        why = f", because {big} is more than {small}" if r.random() < 0.4 else ""
        out.append(r.choice([
            f"{p.name} had {_count(x, item)} and {q.name} had {_count(y, item)}. {more.name} had more{why}.",
            f"{p.name} has {_count(x, item)}. {q.name} has {_count(y, item)}. Who has more {things}? "
            f"{more.name} does{why}.",
            f"{p.name} has {_count(x, item)} and {q.name} has {_count(y, item)}, so {more.name} has more {things}{why}.",
            f"{p.name} has {_count(x, item)} and {q.name} has {_count(y, item)}. More {things} belong to {more.name}.",
            f"Who has more {things}, {p.name} or {q.name}? {p.name} has {x} and {q.name} has {y}, so it is {more.name}.",
            f"{less.name} had fewer {things} than {more.name}: {small} is less than {big}.",
        ]))
    return out


def _pronouns(r: random.Random) -> list[str]:
    out = ["Lesson: He and she", "We say she and her for a girl, and he and his for a boy."]
    for _ in range(3):
        c = _child(r)
        toy, place = r.choice(TOYS), r.choice(PLACES)
        out.append(r.choice([
            f"{c.name} is a {c.kind}. {c.He} took {c.his} {toy} to the {place} and played with it all day.",
            f"{c.name} is a {c.kind}, so we say {c.his} {toy}, not {'his' if c.his == 'her' else 'her'} {toy}.",
            f"Each morning, {c.name} packs {c.his} bag and walks to the {place} with {c.his} {toy}.",
            f"{c.name} is a {c.kind} who loves {c.his} {toy}. {c.He} keeps it on {c.his} bed.",
            f"{c.name} likes to take {c.his} {toy} to the {place}.",
            f"Every morning, {c.name} brings {c.his} {toy} to the {place}.",
            f"{c.name} is a {c.kind}. After school, {c.he} plays with {c.his} {toy} at the {place}.",
        ]))
    out += [f"Exercise: {c.name} has {a(toy)}. Whose {toy} is it?", f"Answer: It is {c.his} {toy}."]
    return out


LESSONS = {"sounds": _sounds, "babies": _babies, "opposites": _opposites, "colors": _colors,
           "feelings": _feelings, "nature": _nature, "food": _food, "counting": _counting,
           "comparing": _comparing, "pronouns": _pronouns}


def lesson(r: random.Random, kind: str | None = None) -> tuple[str, str]:
    """(kind, document) of one world lesson; kind None: drawn at random."""
    kind = kind or r.choice(tuple(LESSONS))
    return kind, "\n".join(LESSONS[kind](r))

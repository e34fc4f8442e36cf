"""Synthetic English for training tiny language models from scratch (TinyStories / "textbooks" style).

Three kinds of documents, all over a controlled vocabulary of about 1,500 simple words:

* children's stories (STORY_SHARE, ~40%): named characters with matching pronouns, dialogue,
  cause and effect, a problem, a twist and a moral, all in the past tense, 80-250 words;
* world lessons (WORLD_SHARE, ~35%, `lessons.py`): the facts the built-in probes ask about
  (animal sounds, opposites, colours, counting...), each kind in many phrasings, so that a small
  model learns them in minutes and not only the stories' form;
* textbook passages (the rest): "Lesson: / Exercise: / Answer:" blocks with arithmetic word
  problems whose answers are computed, and everyday common-sense facts.

Every document is assembled from many independent choices (a skeleton, then several alternative
templates per story part, then the word lists), so no single template dominates and the space of
documents is astronomically large.  Only the standard library is used; generation is pure Python.

    from slm.data.synth import write_corpus
    write_corpus("data/synth", n_docs=200_000, seed=0)
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import time
from collections import Counter
from typing import Iterable, Iterator

from ..files import atomic_write, output_folder, write_json
from .lessons import lesson
from .vocab import (
    ANIMALS,
    FEEL_BAD,
    FEEL_GOOD,
    FOODS,
    GIRLS,
    HERO_ADJ,
    OBJ_ADJ,
    PLACES,
    SMALL_ANIMALS,
    SPOTS,
    TIMES,
    TOYS,
    WEATHER,
    Char,
    a,
    cap,
    make_char,
    plural,
    say,
)

HOMES = ["in a little house near the {place}", "with {his} family in a cozy house", "at the edge of a big forest",
         "in a small town by the sea", "on a quiet farm", "in a yellow house on a hill",
         "near a sparkling river", "in a tall tree at the end of the lane", "in a busy village"]
# (base, past) activity phrases; dialogue uses the base, narration the past.
ACTIVITIES = [
    ("play tag", "played tag"), ("build sandcastles", "built sandcastles"), ("fly kites", "flew kites"),
    ("read books", "read books"), ("draw pictures", "drew pictures"), ("sing songs", "sang songs"),
    ("dance in the rain", "danced in the rain"), ("jump in puddles", "jumped in puddles"),
    ("pick flowers", "picked flowers"), ("ride a bike", "rode a bike"), ("swim in the lake", "swam in the lake"),
    ("climb trees", "climbed trees"), ("play hide and seek", "played hide and seek"),
    ("look at the stars", "looked at the stars"), ("bake cookies", "baked cookies"),
    ("play with blocks", "played with blocks"), ("chase butterflies", "chased butterflies"),
    ("skip stones", "skipped stones"), ("paint with bright colors", "painted with bright colors"),
    ("play ball", "played ball"), ("dig in the sand", "dug in the sand"), ("feed the ducks", "fed the ducks"),
    ("count the clouds", "counted the clouds"), ("run in the grass", "ran in the grass"),
    ("make funny faces", "made funny faces"), ("tell jokes", "told jokes"), ("play music", "played music"),
    ("collect shells", "collected shells"), ("roll down the hill", "rolled down the hill"),
    ("splash in the river", "splashed in the river"), ("watch the birds", "watched the birds"),
]
# Morals are grouped by skeleton so the lesson fits the story that precedes it.
MORALS = {
    "lost": ["Good friends help each other.", "Two friends can find more than one.",
             "It is okay to ask for help.", "Take good care of the things you love."],
    "goal": ["If you keep trying, you can do hard things.", "It is okay to ask for help.",
             "Every mistake is a chance to learn.", "Patience is a good friend.",
             "Listening to others can solve a problem."],
    "share": ["Sharing makes everyone happy.", "Being kind is the best way to make friends.",
              "Saying sorry can fix a lot of things.", "Fun is bigger when it is shared."],
    "fear": ["Being brave does not mean you are never scared.", "Things are often less scary than they seem.",
             "A friend by your side makes you brave."],
    "rescue": ["Helping others makes you feel good inside.", "A kind heart is worth more than gold.",
               "Small things can make a big difference."],
    "mistake": ["It is always better to tell the truth.", "Every mistake is a chance to learn.",
                "Saying sorry can fix a lot of things."],
    "trip": ["Working together makes hard jobs easy.", "The world is full of wonderful things to see.",
             "Adventures are better with friends."],
}
GOALS = [  # (want, obstacle, idea, success)
    ("build the tallest tower of blocks", "the tower kept falling down",
     "put the big blocks at the bottom and the small ones on top", "the tower stood tall and strong"),
    ("bake a cake for {parent}", "the cake came out flat", "add more eggs and wait longer",
     "the cake was soft and sweet"),
    ("climb to the top of the big hill", "the hill was steep and {he} got tired",
     "rest for a moment and take small steps", "{he} reached the top and saw the whole village"),
    ("learn to ride a bike", "{he} kept falling off", "look ahead and pedal fast",
     "{he} rode all the way down the street"),
    ("catch a fish in the river", "the fish swam away every time", "sit very still and be quiet",
     "a shiny fish bit the line"),
    ("plant a garden", "the seeds did not grow", "give them water and sunlight every day",
     "little green plants popped out of the ground"),
    ("make a kite that could fly", "the kite would not go up", "wait for a windy day and run fast",
     "the kite flew high in the sky"),
    ("paint a picture of the sea", "the colors got mixed up", "let each color dry before adding the next",
     "the picture looked just like the sea"),
    ("win the race at school", "{he} was slower than the other kids", "practice a little every day",
     "{he} ran faster than ever before"),
    ("build a snowman", "the snow was too dry and would not stick", "wait until the sun made the snow wet",
     "a big round snowman stood in the yard"),
    ("make a birdhouse", "the pieces did not fit", "measure each piece twice",
     "two little birds moved into the birdhouse"),
    ("sing a song at the school show", "{his} voice shook when {he} felt nervous",
     "take a deep breath and think of {his} friends", "everyone clapped and cheered"),
    ("find the end of the rainbow", "the rainbow kept moving away", "look at it with a friend and just enjoy it",
     "they saw the most beautiful colors"),
    ("build a boat that could float", "the boat sank in the pond", "use light wood and seal the holes",
     "the boat floated across the pond"),
]
FEARS = [  # (fear, sign, reveal)
    ("the dark", "strange shadows on the wall", "the shadow was only {his} coat hanging on the door"),
    ("the noise in the attic", "a scratching sound above the ceiling",
     "it was just a little mouse looking for crumbs"),
    ("the big dog next door", "loud barking over the fence", "the dog only wanted someone to play with"),
    ("thunder", "a loud boom in the sky", "thunder is just the sound that lightning makes, and it cannot hurt you inside"),
    ("the deep water", "dark water at the end of the dock", "the water was warm and {he} could float"),
    ("the tall slide", "how high the slide looked", "the slide was fast and fun"),
    ("the old tree in the woods", "branches that looked like long arms", "the tree was full of friendly birds"),
    ("the first day of school", "a room full of kids {he} did not know", "the other kids were nervous too"),
    ("the monster under the bed", "two glowing eyes under the bed", "the glowing eyes belonged to {his} own cat"),
    ("the wind at night", "a howling sound at the window", "the wind was only playing with the leaves"),
]
TROUBLES = [  # (trouble, help, thanks)
    ("stuck in a tall tree", "climbed a ladder and gently lifted it down", "looked at {him} with big, happy eyes"),
    ("caught in a fishing net", "carefully untied the net", "wiggled free and jumped for joy"),
    ("limping on a hurt leg", "made a soft bed in a box and gave it water", "got better and ran around {him} in a happy circle"),
    ("lost and looking for its mother", "helped it look all around the {place}", "ran to its mother, who was very glad"),
    ("stuck in the mud", "pushed a long stick into the mud to pull it out", "shook off the mud and hopped around"),
    ("hungry and cold in the snow", "shared some {food} and a warm scarf", "curled up and looked up with bright eyes"),
    ("trapped under a fallen branch", "lifted the heavy branch with all {his} might", "climbed out and sat on {his} hand"),
]
MISHAPS = [  # {what} is filled in by the thing that broke
    ("{parent}'s favorite vase", "knocked {what} off the table while playing ball"),
    ("a big glass of milk", "spilled {what} all over the new rug"),
    ("{friend}'s toy car", "stepped on {what} by mistake"),
    ("the garden fence", "crashed into {what} with {his} bike"),
    ("a jar of jam", "dropped {what} on the kitchen floor"),
    ("{parent}'s reading glasses", "sat on {what} by mistake"),
    ("the kitchen window", "kicked a ball right through {what}"),
    ("a plate of cookies for the neighbors", "ate {what} before dinner"),
]
SIGHTS = ["a family of ducks swimming in a row", "a squirrel hiding acorns", "a rainbow over the trees",
          "a frog sitting on a lily pad", "bright flowers of every color", "a tiny snail on a leaf",
          "an old boat tied to a post", "a giant pile of orange leaves", "a deer drinking from a stream",
          "a kite stuck in a tree", "two butterflies dancing in the air", "a bird building a nest",
          "a crab hiding under a rock", "a big red barn", "a man selling balloons", "a cloud shaped like a whale"]
SURPRISES = [
    "they found an old map with a big X on it. They followed the map and found a box full of shiny buttons",
    "it started to rain, so they hid under a big tree and told stories until the sun came out",
    "they met a new girl named {newgirl}, who showed them a secret path by the water",
    "a friendly goat followed them all the way back, because it liked the apples in their basket",
    "they saw a hot air balloon land in the field, and the pilot let them ring its bell",
    "they found a lost puppy, so they took it to the farmer, who was very happy to see it",
]


# --------------------------------------------------------------------------------------------
# Story parts.  Each function picks one of several templates; the skeletons below combine them.
# --------------------------------------------------------------------------------------------

def _opening(r: random.Random, h: Char, place: str) -> str:
    home = r.choice(HOMES).format(place=place, his=h.his)
    act = r.choice(ACTIVITIES)
    k = r.randrange(6)
    if k == 0:
        s = f"Once upon a time, there was {a(h.adj)} {h.kind} named {h.name}."
    elif k == 1:
        s = f"{h.name} was {a(h.adj)} {h.kind} who lived {home}."
    elif k == 2:
        s = f"There once was {a(h.adj)} {h.kind} called {h.name}. {h.He} lived {home}."
    elif k == 3:
        s = f"One {r.choice(WEATHER)} {r.choice(TIMES)}, {a(h.adj)} {h.kind} named {h.name} woke up early."
    elif k == 4:
        s = f"Not long ago, {a(h.adj)} {h.kind} named {h.name} lived {home}."
    else:
        s = f"{h.name} the {h.kind} loved to {act[0]}."
    k = r.randrange(5)
    if k == 0:
        s += f" {h.He} liked to {act[0]} more than anything."
    elif k == 1:
        s += f" Every day, {h.he} {act[1]} with {h.his} friends."
    elif k == 2:
        s += f" {h.He} was very {r.choice(HERO_ADJ)}, and everyone liked {h.him}."
    elif k == 3:
        s += f" {h.His} favorite place in the world was the {place}."
    else:
        s += f" {h.He} always had a big smile on {h.his} face."
    return s


def _going(r: random.Random, h: Char, f: Char, place: str) -> str:
    k = r.randrange(4)
    w = r.choice(WEATHER)
    if k == 0:
        return f"One {w} day, {h.name} and {h.his} friend {f.name} went to the {place}."
    if k == 1:
        return f"One {w} {r.choice(TIMES)}, {h.name} went to the {place} to play with {f.name} the {f.kind}."
    if k == 2:
        return f"It was {a(w)} day, so {h.name} asked {f.name} to come to the {place}."
    return f"After breakfast, {h.name} ran to the {place}, where {f.name} was waiting."


def _moral(r: random.Random, h: Char, skel: str) -> str:
    k = r.randrange(4)
    m = r.choice(MORALS[skel])
    if k == 0:
        return f"{h.name} learned something that day. {m}"
    if k == 1:
        return f"And so {h.name} knew that it was true: {m[0].lower()}{m[1:]}"
    if k == 2:
        return f"The end. Remember: {m[0].lower()}{m[1:]}"
    return f"From that day on, {h.name} never forgot it. {m}"


def _happy(r: random.Random, h: Char, f: Char) -> str:
    feel = r.choice(FEEL_GOOD)
    k = r.randrange(4)
    if k == 0:
        return f"{h.name} felt so {feel} that {h.he} gave {f.name} a big hug."
    if k == 1:
        return f"{h.name} and {f.name} laughed and {r.choice(ACTIVITIES)[1]} until the sun went down."
    if k == 2:
        return say(h.name, f"Thank you, {f.name}! You are the best friend ever!", "shouted")
    return f"{h.name} smiled. {h.He} was {feel}, and {f.name} was {r.choice(FEEL_GOOD)} too."


# Each skeleton returns a list of sentences/paragraph pieces.

def _lost(r: random.Random, h: Char, f: Char, p: Char, place: str) -> list[str]:
    toy = r.choice(TOYS)
    adj = r.choice(OBJ_ADJ)
    spots = r.sample(SPOTS, 3)
    animal = r.choice(ANIMALS)
    out = [_opening(r, h, place)]
    out.append(r.choice([
        f"{h.name} had {a(adj)} {toy}. {h.He} loved it very much.",
        f"{h.His} favorite toy was {a(adj)} {toy}, and {h.he} took it everywhere.",
        f"For {h.his} birthday, {p.name} gave {h.name} {a(adj)} {toy}.",
    ]))
    out.append(_going(r, h, f, place))
    out.append(r.choice([
        f"But when it was time to go home, the {toy} was gone!",
        f"{h.He} put the {toy} down to {r.choice(ACTIVITIES)[0]}, and when {h.he} looked back, it was not there.",
        f"Then a gust of wind blew, and the {toy} was nowhere to be seen.",
    ]))
    out.append(r.choice([
        say(h.name, f"Oh no! Where is my {toy}?", "cried"),
        f"{h.name} felt {r.choice(FEEL_BAD)} because the {toy} was very special to {h.him}.",
        say(h.name, f"I lost my {toy}. What will I do?", "said sadly"),
    ]))
    out.append(r.choice([
        f"{f.name} saw that {h.name} was sad. " + say(f.name, "Don't worry. I will help you look."),
        say(f.name, "Let's look together. Two friends can find anything!"),
        f"{f.name} wanted to help, so {f.he} took {h.name}'s hand.",
    ]))
    out.append(f"They looked {spots[0]}. They looked {spots[1]}. But the {toy} was not there.")
    out.append(r.choice([
        f"Then they heard a funny noise {spots[2]}. {cap(a(animal))} was playing with the {toy}!",
        f"At last, {f.name} found it {spots[2]}. {cap(a(animal))} had carried it away to its home.",
        f"Then {h.name} put {h.his} hand in {h.his} pocket. The {toy} was there the whole time!",
        f"Just then, {p.name} walked up with the {toy}. {p.He} had found it {spots[2]}.",
    ]))
    out.append(_happy(r, h, f))
    out.append(r.choice([
        f"After that, {h.name} always kept {h.his} {toy} close.",
        _moral(r, h, "lost"),
    ]))
    return out


def _goal(r: random.Random, h: Char, f: Char, p: Char, place: str) -> list[str]:
    want, obstacle, idea, success = (s.format(parent=p.name, he=h.he, his=h.his) for s in r.choice(GOALS))
    helper = r.choice((f, p))
    out = [_opening(r, h, place)]
    out.append(r.choice([
        f"More than anything, {h.name} wanted to {want}.",
        f"One day, {h.name} had a big idea. {h.He} wanted to {want}.",
        say(h.name, f"Today I will {want}!", "said"),
    ]))
    out.append(r.choice([
        f"{h.He} tried and tried, but {obstacle}.",
        f"It was harder than {h.he} thought, because {obstacle}.",
        f"{h.He} tried once. {h.He} tried again. Each time, {obstacle}.",
    ]))
    out.append(r.choice([
        f"{h.name} felt {r.choice(FEEL_BAD)} and sat down on the ground.",
        say(h.name, "I can't do it. It is too hard!", "cried"),
        f"{h.name} wanted to give up, so {h.he} kicked a little stone.",
    ]))
    out.append(r.choice([
        f"Then {helper.name} came by. " + say(helper.name, f"Why don't you {idea}?", "asked"),
        say(helper.name, f"I know a trick. You can {idea}.", "said"),
        f"{helper.name} sat next to {h.him} and said, \"Try to {idea}.\"",
    ]))
    out.append(r.choice([
        f"{h.name} listened. {h.He} tried to {idea}, and this time {success}!",
        f"So {h.name} tried one more time. Slowly, {success}.",
        f"{h.name} did just that, and soon {success}.",
    ]))
    out.append(_happy(r, h, helper))
    out.append(_moral(r, h, "goal"))
    return out


def _share(r: random.Random, h: Char, f: Char, p: Char, place: str) -> list[str]:
    if r.random() < 0.5:
        thing = f"{r.choice(OBJ_ADJ)} {r.choice(TOYS)}"
        use = "play with"
    else:
        thing = plural(r.choice(FOODS))
        use = "have some of"
    the = f"the {thing}"
    owned = a(thing) if use == "play with" else f"a big bag of {thing}"
    out = [_opening(r, h, place)]
    out.append(f"One day, {h.name} brought {owned} to the {place}.")
    out.append(r.choice([
        f"{f.name} came over and looked at it. " + say(f.name, f"Can I {use} {the}, please?", "asked"),
        say(f.name, f"Wow! May I {use} {the} too?", "asked"),
    ]))
    out.append(r.choice([
        say(h.name, "No! It is mine.", "said"),
        f"But {h.name} held it tight and said, \"No, I want it all for me.\"",
    ]))
    out.append(r.choice([
        f"{f.name} felt {r.choice(FEEL_BAD)}, so {f.he} walked away and sat alone.",
        f"{f.name}'s eyes filled with tears, and {f.he} went home.",
    ]))
    out.append(r.choice([
        f"{h.name} played alone, but it was not fun anymore.",
        f"Soon {h.name} felt {r.choice(FEEL_BAD)} too, because playing alone was boring.",
    ]))
    out.append(r.choice([
        f"Later, {p.name} said, \"When we share, we have twice the fun.\"",
        f"{h.He} thought about how {f.name} felt, and {h.he} knew what to do.",
    ]))
    out.append(r.choice([
        f"{h.name} ran to {f.name}. " + say(h.name, f"I am sorry. Let's {use} {the} together."),
        f"So {h.name} found {f.name} and shared {the} with {f.him}.",
    ]))
    out.append(_happy(r, h, f))
    out.append(_moral(r, h, "share"))
    return out


def _fear(r: random.Random, h: Char, f: Char, p: Char, place: str) -> list[str]:
    fear, sign, reveal = (s.format(his=h.his, he=h.he) for s in r.choice(FEARS))
    helper = r.choice((f, p))
    out = [_opening(r, h, place)]
    out.append(r.choice([
        f"But {h.name} had a secret. {h.He} was afraid of {fear}.",
        f"{h.name} was brave about most things, but {h.he} was scared of {fear}.",
    ]))
    out.append(r.choice([
        f"One {r.choice(TIMES)}, {h.he} noticed {sign}, and {h.his} heart beat fast.",
        f"Whenever {h.he} saw {sign}, {h.he} wanted to hide.",
    ]))
    out.append(r.choice([
        say(h.name, f"I don't like {fear}. It makes me feel {r.choice(FEEL_BAD)}.", "whispered"),
        say(h.name, "Help! I am scared!", "cried"),
    ]))
    out.append(r.choice([
        f"{helper.name} held {h.his} hand. " + say(helper.name, "Let's go and look together. I am right here."),
        say(helper.name, "Being scared is okay. Let's be brave together.", "said kindly"),
    ]))
    out.append(r.choice([
        f"So they went to look, step by step. Then {h.name} saw that {reveal}.",
        f"They took a closer look, and guess what? {cap(reveal)}.",
    ]))
    out.append(r.choice([
        f"{h.name} began to laugh, because there was nothing to fear after all.",
        say(h.name, "Oh! That is not scary at all!", "laughed"),
    ]))
    out.append(r.choice([_moral(r, h, "fear"), f"After that day, {h.name} was not afraid of {fear} anymore."]))
    return out


def _rescue(r: random.Random, h: Char, f: Char, p: Char, place: str) -> list[str]:
    trouble, help_, thanks = (s.format(place=place, food=plural(r.choice(FOODS)), his=h.his, him=h.him)
                              for s in r.choice(TROUBLES))
    animal = r.choice(SMALL_ANIMALS)
    out = [_opening(r, h, place)]
    out.append(_going(r, h, f, place))
    out.append(r.choice([
        f"Suddenly, they heard a small cry. It was {a(animal)}, and it was {trouble}.",
        f"Near the path, {h.name} saw {a(r.choice(('little', 'tiny', 'small')))} {animal} {trouble}.",
    ]))
    out.append(r.choice([
        say(h.name, f"Poor little {animal}! We have to help it.", "said"),
        say(f.name, "What should we do?", "asked") + " " + say(h.name, "We must help it!"),
    ]))
    out.append(f"{h.name} was careful and gentle. {h.He} {help_}.")
    out.append(f"The {animal} {thanks}.")
    out.append(r.choice([
        f"The next day, the {animal} came back with its friends, and they all played together at the {place}.",
        f"From then on, the {animal} visited {h.name} every {r.choice(TIMES)}.",
        f"{p.name} was proud of {h.name} because {h.he} had been so kind.",
    ]))
    out.append(r.choice([_moral(r, h, "rescue"), _happy(r, h, f)]))
    return out


def _mistake(r: random.Random, h: Char, f: Char, p: Char, place: str) -> list[str]:
    what, how = r.choice(MISHAPS)
    what = what.format(parent=p.name, friend=f.name)
    how = how.format(what=what, his=h.his)
    out = [_opening(r, h, place)]
    out.append(r.choice([f"One day, {h.name} {how}.",
                         f"One {r.choice(WEATHER)} day, {h.name} was not careful and {how}."]))
    out.append(r.choice([
        f"{h.name} felt {r.choice(FEEL_BAD)}. {h.He} thought about hiding {h.his} mistake.",
        say(h.name, "Oh no! What if I get in trouble?", "whispered"),
    ]))
    out.append(r.choice([
        f"{h.He} wanted to say that the {r.choice(ANIMALS)} did it.",
        f"{h.He} hid behind the door and did not say a word.",
    ]))
    out.append(r.choice([
        f"But {h.his} tummy felt funny, because {h.he} knew that hiding was wrong.",
        f"Then {h.he} thought, \"If I tell the truth, I will feel better.\"",
    ]))
    out.append(f"So {h.name} went to {p.name}. " + say(h.name, "I am sorry. It was me. I made a mistake."))
    out.append(r.choice([
        f"{p.name} gave {h.name} a hug. " + say(p.name, "Thank you for telling me the truth. Let's fix it together."),
        say(p.name, "Everyone makes mistakes. I am proud of you for being honest.", "said gently"),
    ]))
    out.append(r.choice([
        "So they cleaned up together, and soon everything was fine again.",
        f"Together they fixed what {h.he} could, and {h.name} felt light as a feather.",
    ]))
    out.append(_moral(r, h, "mistake"))
    return out


def _trip(r: random.Random, h: Char, f: Char, p: Char, place: str) -> list[str]:
    sights = r.sample(SIGHTS, 3)
    newgirl = r.choice(GIRLS)
    out = [_opening(r, h, place)]
    out.append(r.choice([
        f"One {r.choice(WEATHER)} {r.choice(TIMES)}, {p.name} took {h.name} and {f.name} on a trip to the {place}.",
        say(h.name, f"Let's go on an adventure to the {place}!", "said") + f" {f.name} said yes right away.",
    ]))
    out.append(f"On the way, they saw {sights[0]}. Then they saw {sights[1]}.")
    out.append(r.choice([
        say(f.name, f"Look! There is {sights[2]}!", "shouted"),
        f"{h.name} pointed and laughed when {h.he} spotted {sights[2]}.",
    ]))
    out.append("Then something surprising happened: " + r.choice(SURPRISES).format(newgirl=newgirl) + ".")
    out.append(r.choice([
        f"When they got home, {h.name} told {p.name} all about it.",
        f"That night, {h.name} was tired but {r.choice(FEEL_GOOD)}.",
    ]))
    out.append(r.choice([_happy(r, h, f), _moral(r, h, "trip"),
                         say(h.name, "That was the best day ever!", "said") + " And it really was."]))
    return out


STORY_SKELETONS = {"lost": _lost, "goal": _goal, "share": _share, "fear": _fear,
                   "rescue": _rescue, "mistake": _mistake, "trip": _trip}


def _story(r: random.Random, skeleton: str) -> str:
    taken: set = set()
    hero = make_char(r, taken)
    friend = make_char(r, taken)
    parent = r.choice([Char("Mom", "mom", "kind", "she"), Char("Dad", "dad", "kind", "he"),
                       Char("Grandma", "grandma", "kind", "she"), Char("Grandpa", "grandpa", "kind", "he")])
    parts = STORY_SKELETONS[skeleton](r, hero, friend, parent, r.choice(PLACES))
    # Break into two or three paragraphs on single newlines (never a blank line: that separates docs).
    cuts = sorted(r.sample(range(2, len(parts) - 1), r.choice((1, 2))))
    paras, start = [], 0
    for c in cuts + [len(parts)]:
        paras.append(" ".join(parts[start:c]))
        start = c
    return "\n".join(paras), {"hero_gender": hero.he, "friend_gender": friend.he, "parent_gender": parent.he}


# --------------------------------------------------------------------------------------------
# Textbook passages.  Answers are computed, never written by hand.
# --------------------------------------------------------------------------------------------

COUNTABLE = FOODS + [t for t in TOYS if " " not in t] + ["flower", "leaf", "stamp", "bead", "ticket", "seed"]


# The numbers of the lessons' sums: addends up to 10 (sums to 20, and differences of such sums),
# factors up to 5. A 2M-parameter model learns this table in the minutes of `make demo` (its lessons'
# sums right ~90% of the time); with addends to 20 it wrote wrong sums two times in three.
MAX_ADDEND, MAX_FACTOR = 10, 5


def _who(r: random.Random) -> Char:
    return make_char(r, set(), animal_ok=False)


def _add_ex(r: random.Random) -> tuple[str, str]:
    c, x, y, item = _who(r), r.randint(1, MAX_ADDEND), r.randint(1, MAX_ADDEND), r.choice(COUNTABLE)
    q = r.choice([
        f"{c.name} has {x} {plural(item, x)}. {c.His} friend gives {c.him} {y} more. How many {plural(item)} does {c.name} have now?",
        f"There are {x} {plural(item, x)} in a basket and {y} {plural(item, y)} on the table. How many {plural(item)} are there in all?",
        f"{c.name} found {x} {plural(item, x)} in the morning and {y} in the afternoon. How many did {c.he} find?",
    ])
    return q, f"{x} + {y} = {x + y}. The answer is {x + y} {plural(item, x + y)}."


def _sub_ex(r: random.Random) -> tuple[str, str]:
    c, item = _who(r), r.choice(COUNTABLE)
    x = r.randint(2, 2 * MAX_ADDEND)
    y = r.randint(1, min(x, MAX_ADDEND))
    q = r.choice([
        f"{c.name} has {x} {plural(item, x)}. {c.He} gives {y} to a friend. How many {plural(item)} are left?",
        f"There were {x} {plural(item, x)} on a plate. {c.name} took {y}. How many {plural(item)} are on the plate now?",
        f"{c.name} had {x} {plural(item, x)}, but {y} got lost. How many does {c.he} have now?",
    ])
    return q, f"{x} - {y} = {x - y}. The answer is {x - y} {plural(item, x - y)}."


def _mul_ex(r: random.Random) -> tuple[str, str]:
    c, item = _who(r), r.choice(COUNTABLE)
    x, y = r.randint(2, MAX_FACTOR), r.randint(2, MAX_FACTOR)
    box = r.choice(("box", "bag", "basket", "jar", "plate"))
    q = r.choice([
        f"{c.name} has {x} {plural(box, x)}. Each {box} has {y} {plural(item, y)}. How many {plural(item)} are there in all?",
        f"There are {x} rows of {plural(item)}, with {y} in each row. How many {plural(item)} are there?",
        f"{c.name} gets {y} {plural(item, y)} every day for {x} days. How many {plural(item)} does {c.he} get?",
    ])
    return q, f"{x} x {y} = {x * y}. The answer is {x * y} {plural(item, x * y)}."


def _cmp_ex(r: random.Random) -> tuple[str, str]:
    taken: set = set()
    c1, c2 = make_char(r, taken, False), make_char(r, taken, False)
    item = r.choice(COUNTABLE)
    x, y = r.sample(range(1, 30), 2)  # never equal, so "which is more" always has an answer
    q = f"{c1.name} has {x} {plural(item, x)}. {c2.name} has {y} {plural(item, y)}. Who has more {plural(item)}?"
    if x > y:
        ans = f"{x} is more than {y}, so {c1.name} has more. {c1.He} has {x - y} more than {c2.name}."
    else:
        ans = f"{x} is less than {y}, so {c2.name} has more. {c2.He} has {y - x} more than {c1.name}."
    return q, ans


MATH = {
    "add": ("Adding numbers", "When we add, we put groups together to find how many there are in all.", _add_ex),
    "sub": ("Taking away", "When we subtract, we take some away and count how many are left.", _sub_ex),
    "mul": ("Equal groups", "When we multiply, we add the same number again and again. Three groups of two is six.", _mul_ex),
    "cmp": ("Which is more?", "To compare two numbers, we ask which one is bigger. The bigger number is more.", _cmp_ex),
}

# (topic, fact, question, answer)
FACTS = [
    ("water", "Ice is cold. If you leave ice in the sun, it melts and turns into water.", "What happens to ice in the sun?", "It melts and turns into water."),
    ("water", "Water boils when it gets very hot. Then it turns into steam.", "What does water turn into when it boils?", "It turns into steam."),
    ("water", "When water gets very cold, it freezes and becomes ice.", "What happens to water when it gets very cold?", "It freezes and becomes ice."),
    ("water", "A wet towel dries in the sun because the water goes into the air.", "Why does a wet towel dry in the sun?", "Because the water goes into the air."),
    ("water", "Heavy things like stones sink in water. Light things like leaves float.", "Does a stone sink or float?", "A stone sinks."),
    ("weather", "Rain comes from clouds. When clouds get full of water, drops fall down.", "Where does rain come from?", "Rain comes from clouds."),
    ("weather", "We wear a coat in winter because it is cold outside.", "Why do we wear a coat in winter?", "Because it is cold outside."),
    ("weather", "After rain, the sun can make a rainbow in the sky.", "What can you see in the sky after rain?", "You can see a rainbow."),
    ("weather", "Wind is moving air. You cannot see it, but you can see it move the trees.", "What is wind?", "Wind is moving air."),
    ("weather", "Snow falls when it is very cold. Snow is made of tiny bits of ice.", "What is snow made of?", "Snow is made of tiny bits of ice."),
    ("sky", "The sun rises in the morning and sets in the evening.", "When does the sun set?", "The sun sets in the evening."),
    ("sky", "At night the sky is dark, and we can see the moon and the stars.", "What can we see in the sky at night?", "We can see the moon and the stars."),
    ("sky", "The sun is a star. It gives us light and keeps us warm.", "What does the sun give us?", "It gives us light and keeps us warm."),
    ("animals", "Fish live in water. They use their gills to breathe.", "Where do fish live?", "Fish live in water."),
    ("animals", "Birds have wings and feathers. Most birds can fly.", "What do birds have?", "Birds have wings and feathers."),
    ("animals", "Cows eat grass and give us milk.", "What do cows give us?", "Cows give us milk."),
    ("animals", "Bees make honey from flowers.", "What do bees make?", "Bees make honey."),
    ("animals", "A baby cat is called a kitten, and a baby dog is called a puppy.", "What is a baby cat called?", "A baby cat is called a kitten."),
    ("animals", "Bears sleep for a long time in winter because there is little food.", "Why do bears sleep in winter?", "Because there is little food."),
    ("animals", "A frog starts life as a tadpole in a pond.", "What does a frog start life as?", "It starts life as a tadpole."),
    ("plants", "Plants need water, air and sunlight to grow.", "What do plants need to grow?", "Plants need water, air and sunlight."),
    ("plants", "A seed grows into a plant when it is in warm, wet soil.", "What does a seed grow into?", "A seed grows into a plant."),
    ("plants", "In autumn, many leaves turn red and yellow and fall from the trees.", "What happens to leaves in autumn?", "They turn red and yellow and fall."),
    ("plants", "Apples grow on trees. Carrots grow under the ground.", "Where do carrots grow?", "Carrots grow under the ground."),
    ("body", "We see with our eyes and hear with our ears.", "What do we hear with?", "We hear with our ears."),
    ("body", "Sleep helps the body rest, so we feel strong the next day.", "Why do we sleep?", "Sleep helps the body rest."),
    ("body", "We wash our hands before we eat because dirty hands can make us sick.", "Why do we wash our hands before we eat?", "Because dirty hands can make us sick."),
    ("body", "Fruit and vegetables help us grow strong and stay healthy.", "What helps us grow strong?", "Fruit and vegetables help us grow strong."),
    ("body", "When you run fast, your heart beats faster.", "What happens to your heart when you run?", "It beats faster."),
    ("safety", "A hot stove can burn you, so you should not touch it.", "Why should you not touch a hot stove?", "Because it can burn you."),
    ("safety", "We look left and right before we cross the street.", "What do we do before we cross the street?", "We look left and right."),
    ("safety", "If you feel lost, stay where you are and ask a grown-up for help.", "What should you do if you feel lost?", "Stay where you are and ask a grown-up for help."),
    ("things", "Glass can break if you drop it, so we carry it with care.", "What can happen if you drop glass?", "It can break."),
    ("things", "A magnet pulls things made of iron, like a nail.", "What does a magnet pull?", "It pulls things made of iron."),
    ("things", "A ball rolls because it is round.", "Why does a ball roll?", "Because it is round."),
    ("things", "Wood comes from trees, and paper is made from wood.", "What is paper made from?", "Paper is made from wood."),
    ("things", "A shadow forms when something blocks the light.", "When does a shadow form?", "When something blocks the light."),
    ("time", "There are seven days in a week and twelve months in a year.", "How many days are in a week?", "There are seven days in a week."),
    ("time", "We eat breakfast in the morning and dinner in the evening.", "When do we eat breakfast?", "We eat breakfast in the morning."),
    ("time", "Spring comes after winter. In spring, flowers begin to bloom.", "What comes after winter?", "Spring comes after winter."),
]
FACT_TOPICS: dict[str, list] = {}
for _f in FACTS:
    FACT_TOPICS.setdefault(_f[0], []).append(_f)
TOPIC_TITLES = {"water": "Water and ice", "weather": "The weather", "sky": "The sky", "animals": "Animals",
                "plants": "Plants", "body": "Our body", "safety": "Staying safe", "things": "Things around us",
                "time": "Days and seasons"}


def _textbook(r: random.Random, kind: str) -> str:
    if kind == "facts":
        topic = r.choice(sorted(FACT_TOPICS))
        picks = r.sample(FACTS, 1) + r.sample(FACT_TOPICS[topic], min(3, len(FACT_TOPICS[topic])))
        picks = list(dict.fromkeys(picks))  # drop a repeat
        r.shuffle(picks)  # order and the exercise subset multiply the (small) space of fact lessons
        lines = [f"Lesson: {TOPIC_TITLES[topic]}", " ".join(p[1] for p in picks)]
        for p in r.sample(picks, r.randint(2, len(picks))):
            lines += [f"Exercise: {p[2]}", f"Answer: {p[3]}"]
        return "\n".join(lines)
    title, intro, ex = MATH[kind]
    lines = [f"Lesson: {title}", intro]
    for _ in range(r.randint(3, 5)):
        q, ans = ex(r)
        lines += [f"Exercise: {q}", f"Answer: {ans}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------

TEXTBOOK_KINDS = ("add", "sub", "mul", "cmp", "facts")
# The mix of a corpus: stories, world lessons, and textbook passages for the rest. Without the
# world lessons a 2M-parameter model trained for 7 minutes scored at chance on the probes (0.33).
STORY_SHARE, WORLD_SHARE = 0.4, 0.35
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def generate_document_with_meta(rng: random.Random) -> tuple[str, dict]:
    """One document and a record of how it was made: {"kind", "skeleton", ...}."""
    draw = rng.random()
    if draw < STORY_SHARE:
        skel = rng.choice(tuple(STORY_SKELETONS))
        while True:  # the rare story outside 80-250 words is redrawn
            text, meta = _story(rng, skel)
            if 80 <= len(text.split()) <= 250:
                return text, {"kind": "story", "skeleton": f"story/{skel}", **meta}
    if draw < STORY_SHARE + WORLD_SHARE:
        kind, text = lesson(rng)
        return text, {"kind": "world", "skeleton": f"world/{kind}"}
    kind = rng.choice(TEXTBOOK_KINDS)
    return _textbook(rng, kind), {"kind": "textbook", "skeleton": f"textbook/{kind}"}


def generate_document(rng: random.Random) -> str:
    return generate_document_with_meta(rng)[0]


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def iter_documents_with_meta(seed: int, n_docs: int) -> Iterator[tuple[str, dict]]:
    """Deterministic for a seed; never yields the same document twice (duplicates are skipped)."""
    rng, seen = random.Random(seed), set()
    emitted = 0
    while emitted < n_docs:
        text, meta = generate_document_with_meta(rng)
        h = _digest(text)
        if h in seen:
            continue
        seen.add(h)
        emitted += 1
        yield text, meta


def iter_documents(seed: int, n_docs: int) -> Iterator[str]:
    for text, _ in iter_documents_with_meta(seed, n_docs):
        yield text


def corpus_stats(docs: Iterable[str], skeletons: Iterable[str] | None = None) -> dict:
    """Size and diversity of a list of documents.  distinct-n = distinct word n-grams / all n-grams."""
    docs = list(docs)
    n_words, vocab = 0, set()
    grams: list[set] = [set(), set(), set()]
    totals = [0, 0, 0]
    ids: dict[str, int] = {}
    for d in docs:
        # Integer-coded n-grams keep memory low enough for tens of thousands of documents.
        words = [ids.setdefault(w, len(ids)) for w in d.lower().split()]
        n_words += len(words)
        vocab.update(w for w in _WORD.findall(d.lower()))
        for n in range(3):
            if len(words) > n:
                totals[n] += len(words) - n
                if n == 0:
                    grams[0].update(words)
                elif n == 1:
                    grams[1].update(zip(words, words[1:]))
                else:
                    grams[2].update(zip(words, words[1:], words[2:]))
    counts = Counter(_digest(d) for d in docs)
    sk = Counter(skeletons) if skeletons is not None else Counter()
    return {
        "n_docs": len(docs),
        "n_words": n_words,
        "distinct_1": len(grams[0]) / max(totals[0], 1),
        "distinct_2": len(grams[1]) / max(totals[1], 1),
        "distinct_3": len(grams[2]) / max(totals[2], 1),
        "duplicate_rate": (len(docs) - len(counts)) / max(len(docs), 1),
        "vocab_size": len(vocab),
        "top_template_share": (sk.most_common(1)[0][1] / max(sum(sk.values()), 1)) if sk else None,
        "template_counts": dict(sk.most_common()),
    }


# Bytes of a document as written: the shortest are about 280 (so a corpus of n documents needs at
# least n x MIN_DOC_BYTES of disk); about 600 on average.
MIN_DOC_BYTES, AVG_DOC_BYTES = 250, 600


def write_corpus(out_dir: str, n_docs: int, seed: int = 0, val_fraction: float = 0.02,
                 stats_sample: int = 20_000) -> dict:
    """Write train.txt / val.txt (documents separated by a blank line) and stats.json.

    The split is by document, so train and val never share one.  Diversity statistics are
    computed on the first `stats_sample` documents (n-gram sets of a full 20M-token corpus would
    need gigabytes); counts and the template mix cover every document.
    """
    if not isinstance(n_docs, int) or isinstance(n_docs, bool) or n_docs < 2:
        raise ValueError(f"--n-docs must be an integer of at least 2 (one document for each split), got {n_docs}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    output_folder(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    if n_docs * MIN_DOC_BYTES > free:
        raise ValueError(f"--n-docs {n_docs:,} needs at least {n_docs * MIN_DOC_BYTES / 1e9:,.1f} GB "
                         f"(~{AVG_DOC_BYTES} bytes a document), but {out_dir} has {free / 1e9:,.1f} GB free")
    split_rng = random.Random(seed * 7919 + 1)  # separate stream: the split does not perturb the text
    counts = {"train": 0, "val": 0}
    n_words, skel, sample, sample_skel = 0, Counter(), [], []
    t0 = time.perf_counter()
    # written whole or not at all: an interrupted run leaves no half corpus for `data prepare` to read
    with atomic_write(os.path.join(out_dir, "train.txt")) as ft, atomic_write(os.path.join(out_dir, "val.txt")) as fv:
        files = {"train": ft, "val": fv}
        for i, (text, meta) in enumerate(iter_documents_with_meta(seed, n_docs)):
            # The first two documents seed both splits, so neither is ever empty (n_docs >= 2).
            split = "val" if i == 0 else "train" if i == 1 else ("val" if split_rng.random() < val_fraction else "train")
            f = files[split]
            if counts[split]:
                f.write("\n\n")
            f.write(text)
            counts[split] += 1
            n_words += len(text.split())
            skel[meta["skeleton"]] += 1
            if len(sample) < stats_sample:
                sample.append(text)
                sample_skel.append(meta["skeleton"])
        for f in files.values():
            f.write("\n")
    seconds = time.perf_counter() - t0
    diversity = corpus_stats(sample, sample_skel)
    stats = {
        "n_docs": counts["train"] + counts["val"], "n_train": counts["train"], "n_val": counts["val"],
        "n_words": n_words, "seed": seed, "seconds": round(seconds, 2),
        "docs_per_s": round((counts["train"] + counts["val"]) / max(seconds, 1e-9)),
        "top_template_share": skel.most_common(1)[0][1] / max(sum(skel.values()), 1) if skel else None,
        "template_counts": dict(skel.most_common()),
        "sample_stats": {k: v for k, v in diversity.items() if k != "template_counts"},
    }
    write_json(os.path.join(out_dir, "stats.json"), stats)
    return stats

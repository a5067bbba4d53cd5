"""The embedded default corpus: English-like text from a small probabilistic grammar.

Why generated: training must work offline and in a minute on a CPU, and a grammar gives a
1-10M-parameter model structure worth learning - subject-verb agreement (also across an
intervening noun of the other number), determiner-noun number, which verbs take an object,
reflexives that agree with their antecedent - and lets us emit BLiMP-format minimal pairs
that test exactly those rules. The grammar is the ground truth: a transitive verb never
appears without an object, a reflexive always agrees with its subject.

Every draw comes from a `random.Random` that the caller seeds, never the global RNG, so the
output is a pure function of (arguments, VERSION).
"""
from __future__ import annotations

import random

VERSION = 1  # bump on any change to the grammar or lexicon: the embedded dataset's cache key uses it

# ---------------------------------------------------------------------------------------------
# Lexicon. Nouns come in three kinds (person, animal, thing) so verbs can select sensible
# subjects and objects; people carry a gender ("f", "m", or "" when the noun fixes none)
# because a singular reflexive must agree with it.

NOUNS = {
    "person": [
        ("girl", "girls", "f"), ("boy", "boys", "m"), ("woman", "women", "f"), ("man", "men", "m"),
        ("mother", "mothers", "f"), ("father", "fathers", "m"), ("sister", "sisters", "f"),
        ("brother", "brothers", "m"), ("queen", "queens", "f"), ("king", "kings", "m"),
        ("actress", "actresses", "f"), ("actor", "actors", "m"), ("aunt", "aunts", "f"),
        ("uncle", "uncles", "m"), ("teacher", "teachers", ""), ("doctor", "doctors", ""),
        ("painter", "painters", ""), ("student", "students", ""), ("farmer", "farmers", ""),
        ("child", "children", ""), ("nurse", "nurses", ""), ("baker", "bakers", ""),
        ("pilot", "pilots", ""), ("lawyer", "lawyers", ""), ("neighbor", "neighbors", ""),
        ("author", "authors", ""), ("engineer", "engineers", ""), ("officer", "officers", ""),
    ],
    "animal": [
        ("dog", "dogs", ""), ("cat", "cats", ""), ("horse", "horses", ""), ("bird", "birds", ""),
        ("mouse", "mice", ""), ("owl", "owls", ""), ("fox", "foxes", ""), ("wolf", "wolves", ""),
        ("rabbit", "rabbits", ""), ("elephant", "elephants", ""), ("goose", "geese", ""),
    ],
    "thing": [
        ("key", "keys", ""), ("cabinet", "cabinets", ""), ("book", "books", ""), ("table", "tables", ""),
        ("door", "doors", ""), ("window", "windows", ""), ("picture", "pictures", ""), ("box", "boxes", ""),
        ("car", "cars", ""), ("letter", "letters", ""), ("chair", "chairs", ""), ("lamp", "lamps", ""),
        ("bottle", "bottles", ""), ("cup", "cups", ""), ("apple", "apples", ""), ("umbrella", "umbrellas", ""),
        ("house", "houses", ""), ("bridge", "bridges", ""), ("glass", "glasses", ""), ("knife", "knives", ""),
        ("shelf", "shelves", ""), ("map", "maps", ""), ("coat", "coats", ""), ("egg", "eggs", ""),
    ],
}
NAMES = [("Mary", "f"), ("Anna", "f"), ("Susan", "f"), ("Emma", "f"),
         ("John", "m"), ("David", "m"), ("Peter", "m"), ("Thomas", "m")]  # singular, no determiner

# Verbs: (3rd person singular, plural, past, subject kinds, object kinds). Only verbs that are
# strictly transitive or strictly intransitive in real English, so that the argument-structure
# pairs are wrong in English too and not only in our grammar.
TRANSITIVE = [
    ("admires", "admire", "admired", "person", "person animal thing"),
    ("praises", "praise", "praised", "person", "person animal"),
    ("criticizes", "criticize", "criticized", "person", "person"),
    ("thanks", "thank", "thanked", "person", "person"),
    ("trusts", "trust", "trusted", "person animal", "person animal"),
    ("blames", "blame", "blamed", "person", "person animal"),
    ("greets", "greet", "greeted", "person animal", "person animal"),
    ("likes", "like", "liked", "person animal", "person animal thing"),
    ("hates", "hate", "hated", "person animal", "person animal thing"),
    ("needs", "need", "needed", "person animal", "person animal thing"),
    ("finds", "find", "found", "person animal", "person animal thing"),
    ("describes", "describe", "described", "person", "person animal thing"),
    ("carries", "carry", "carried", "person animal", "animal thing"),
    ("brings", "bring", "brought", "person animal", "animal thing"),
    ("fixes", "fix", "fixed", "person", "thing"),
    ("buys", "buy", "bought", "person", "animal thing"),
    ("kicks", "kick", "kicked", "person animal", "person animal thing"),
    ("feeds", "feed", "fed", "person", "person animal"),
]
INTRANSITIVE = [
    ("arrives", "arrive", "arrived", "person animal"), ("sleeps", "sleep", "slept", "person animal"),
    ("laughs", "laugh", "laughed", "person"), ("smiles", "smile", "smiled", "person"),
    ("complains", "complain", "complained", "person"), ("sneezes", "sneeze", "sneezed", "person animal"),
    ("yawns", "yawn", "yawned", "person animal"), ("disappears", "disappear", "disappeared", "person animal thing"),
    ("falls", "fall", "fell", "person animal thing"), ("snores", "snore", "snored", "person animal"),
    ("shivers", "shiver", "shivered", "person animal"), ("frowns", "frown", "frowned", "person"),
    ("sighs", "sigh", "sighed", "person"), ("hesitates", "hesitate", "hesitated", "person animal"),
]
ADJECTIVES = {
    "person": ["happy", "tired", "hungry", "angry", "clever", "brave", "young", "old", "famous", "quiet"],
    "animal": ["happy", "tired", "hungry", "angry", "clever", "young", "old", "small", "big", "quiet"],
    "thing": ["heavy", "broken", "empty", "expensive", "clean", "dirty", "wooden", "red", "old", "small", "big",
              "new"],
}


def _bag(*weighted: tuple[str, int]) -> list[str]:
    """A weighted choice as a list with repeats: one `rng.choice` per draw (fast, readable)."""
    return [w for w, k in weighted for _ in range(k)]


# "the" carries no number, so most NPs leave number to the noun alone.
DETERMINERS = {
    "sg": _bag(("the", 10), ("a", 4), ("this", 2), ("that", 2), ("every", 1), ("each", 1)),
    "pl": _bag(("the", 10), ("some", 3), ("these", 2), ("those", 2), ("many", 1), ("two", 1), ("three", 1),
               ("several", 1)),
}
DEMONSTRATIVE_SWAP = {"this": "these", "these": "this", "that": "those", "those": "that"}
PREPOSITIONS = {"person": ["near", "behind", "beside", "with", "without"],
                "animal": ["near", "behind", "beside", "with"],
                "thing": ["near", "behind", "under", "on", "beside", "of", "to"]}
PLACES = ["near", "behind", "beside", "under", "in"]  # "the cat sleeps under the table"
ADVERBS = ["again", "today", "yesterday", "quietly", "suddenly", "early", "late", "outside"]
REFLEXIVES = {"f": "herself", "m": "himself", "pl": "themselves"}
COPULA = {("present", "sg"): "is", ("present", "pl"): "are", ("past", "sg"): "was", ("past", "pl"): "were"}

SHAPES = _bag(("trans", 9), ("refl", 2), ("intrans", 5), ("cop", 4))  # cop: "the key is heavy"
TENSES = _bag(("present", 7), ("past", 3))  # past tense hides agreement, except was/were
ATTRACTORS = _bag(("none", 11), ("pp", 5), ("src", 2), ("orc", 2))  # subject modifiers, see _sentence
MODIFIERS = [a for a in ATTRACTORS if a != "none"]

# Verbs by the kinds they accept, precomputed (kind names are not substrings of each other).
KINDS = list(NOUNS)
TRANS_BY_SUBJECT = {k: [v for v in TRANSITIVE if k in v[3]] for k in KINDS}
TRANS_BY_OBJECT = {k: [v for v in TRANSITIVE if k in v[4]] for k in KINDS}
INTRANS_BY_SUBJECT = {k: [v for v in INTRANSITIVE if k in v[3]] for k in KINDS}

PHENOMENA = ["subject_verb_agreement", "agreement_across_attractor", "determiner_noun_agreement",
             "argument_structure", "anaphor_agreement"]


# ---------------------------------------------------------------------------------------------
# Grammar. Each builder returns a word list; `slots` collects, per phenomenon, one
# (index, bad word) whose substitution breaks exactly that rule - the minimal pairs.

def _other(number: str) -> str:
    return "pl" if number == "sg" else "sg"


def _noun_phrase(rng, kinds: str, number: str, *, det: str | None = None, gendered: bool = False,
                 names: bool = True, pp: float = 0.0) -> tuple[list[str], tuple[str, str, str]]:
    """Returns (words, (kind, number, gender)). `gendered`: a person whose reflexive is fixed."""
    kind = rng.choice(kinds.split())
    if kind == "person" and number == "sg" and names and det is None and rng.random() < 0.12:
        name, gender = rng.choice(NAMES)
        return [name], (kind, number, gender)
    pool = [n for n in NOUNS[kind] if n[2]] if gendered else NOUNS[kind]
    sg, pl, gender = rng.choice(pool)
    words = [sg if number == "sg" else pl]
    if rng.random() < 0.2:
        words.insert(0, rng.choice(ADJECTIVES[kind]))
    det = det or rng.choice(DETERMINERS[number])
    if det == "a" and words[0][0] in "aeiou":  # "an owl", "an old dog", but "a cat"
        det = "an"
    words.insert(0, det)
    if rng.random() < pp:  # a plain PP, no further nesting: keeps sentences short
        words += [rng.choice(PREPOSITIONS[kind])] + _noun_phrase(rng, "person animal thing",
                                                                  rng.choice(["sg", "pl"]))[0]
    return words, (kind, number, gender)


def _verb_form(entry, number: str, tense: str) -> str:
    return entry[2] if tense == "past" else entry[0 if number == "sg" else 1]


def _sentence(rng: random.Random, *, shape: str | None = None, tense: str | None = None,
              attractor: str | None = None, mismatch: bool = False, demonstrative: bool = False):
    """One sentence: (words, slots). The keyword arguments force structure for minimal pairs
    (mismatch: a modifier whose noun has the other number); left as None they are drawn with
    the corpus's own probabilities."""
    shape = shape or rng.choice(SHAPES)
    tense = tense or rng.choice(TENSES)
    attractor = attractor or rng.choice(MODIFIERS if mismatch else ATTRACTORS)
    number = rng.choice(["sg", "pl"])
    slots: dict[str, tuple[int, str]] = {}

    # The main verb first: it decides which kinds of subject make sense.
    if shape in ("trans", "refl"):
        verb = rng.choice(TRANSITIVE if shape == "trans" else TRANS_BY_OBJECT["person"])
        subj_kinds = "person" if shape == "refl" else verb[3]
    elif shape == "intrans":
        verb = rng.choice(INTRANSITIVE)
        subj_kinds = verb[3]
    else:
        verb, subj_kinds = None, "person animal thing"
    words, (kind, _, gender) = _noun_phrase(rng, subj_kinds, number, gendered=shape == "refl" and number == "sg",
                                            names=attractor in ("none", "pp"))

    # Subject modifiers put a second noun between subject and verb: the attractor.
    attr_number = _other(number) if mismatch else rng.choice(["sg", "pl"])
    if attractor == "src" and not TRANS_BY_SUBJECT[kind]:
        attractor = "orc"  # things do nothing: "the key that the girl finds", not "the key that finds"
    if attractor == "pp":
        words += [rng.choice(PREPOSITIONS[kind])] + _noun_phrase(rng, "person animal thing", attr_number)[0]
    elif attractor == "src":  # "the teacher who admires the students ..." (agrees with the head)
        rc = rng.choice(TRANS_BY_SUBJECT[kind])
        words += ["who" if kind == "person" else "that", _verb_form(rc, number, "present")]
        words += _noun_phrase(rng, rc[4], attr_number)[0]
    elif attractor == "orc":  # "the teacher that the students admire ..." (agrees with the inner subject)
        rc = rng.choice(TRANS_BY_OBJECT[kind])
        words += ["that"] + _noun_phrase(rng, rc[3], attr_number)[0]
        words.append(_verb_form(rc, attr_number, "present"))

    # The main verb and what follows it.
    v = len(words)
    if shape == "cop":
        words.append(COPULA[tense, number])
        slots["agreement"] = (v, COPULA[tense, _other(number)])
        if rng.random() < 0.75:
            words.append(rng.choice(ADJECTIVES[kind]))
        else:
            words += [rng.choice(PLACES)] + _noun_phrase(rng, "thing", rng.choice(["sg", "pl"]))[0]
        return words, slots
    words.append(_verb_form(verb, number, tense))
    if tense == "present":
        slots["agreement"] = (v, _verb_form(verb, _other(number), tense))
    if shape == "intrans":
        other = TRANS_BY_SUBJECT[kind]
        if other:  # things have no transitive verbs to swap in
            slots["argument_structure"] = (v, _verb_form(rng.choice(other), number, tense))
        tail = rng.random()
        if tail < 0.3:
            words.append(rng.choice(ADVERBS))
        elif tail < 0.6:
            words += [rng.choice(PLACES)] + _noun_phrase(rng, "thing", rng.choice(["sg", "pl"]))[0]
        return words, slots
    other = INTRANS_BY_SUBJECT[kind]
    slots["argument_structure"] = (v, _verb_form(rng.choice(other), number, tense))
    if shape == "refl":
        good = REFLEXIVES["pl" if number == "pl" else gender]
        bad = rng.choice([r for r in REFLEXIVES.values() if r != good])  # number or gender wrong
        slots["anaphor"] = (len(words), bad)
        words.append(good)
    else:
        obj_number = rng.choice(["sg", "pl"])
        det = rng.choice(["this", "that"] if obj_number == "sg" else ["these", "those"]) if demonstrative else None
        obj, _ = _noun_phrase(rng, verb[4], obj_number, det=det, pp=0.0 if demonstrative else 0.1)
        if obj[0] in DEMONSTRATIVE_SWAP:
            slots["determiner"] = (len(words), DEMONSTRATIVE_SWAP[obj[0]])
        words += obj
    if rng.random() < 0.15:
        words.append(rng.choice(ADVERBS))
    return words, slots


def render(words: list[str]) -> str:
    """Words -> a sentence as it appears in the corpus: capitalised, with a full stop."""
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def generate_documents(num_sentences: int, seed: int) -> list[str]:
    """Paragraphs of 3-8 sentences joined by spaces, `num_sentences` sentences in all."""
    rng = random.Random(seed)
    docs: list[str] = []
    left = num_sentences
    while left > 0:
        k = min(left, rng.randint(3, 8))
        docs.append(" ".join(render(_sentence(rng)[0]) for _ in range(k)))
        left -= k
    return docs


# phenomenon -> (constraints for _sentence, which slot to break)
_PAIR_RECIPES = {
    "subject_verb_agreement": (dict(attractor="none"), "agreement"),
    "agreement_across_attractor": (dict(mismatch=True), "agreement"),
    "determiner_noun_agreement": (dict(shape="trans", demonstrative=True), "determiner"),
    "argument_structure": (dict(), "argument_structure"),
    "anaphor_agreement": (dict(shape="refl"), "anaphor"),
}


def generate_minimal_pairs(per_phenomenon: int, seed: int) -> list[dict]:
    """BLiMP-format pairs {sentence_good, sentence_bad, phenomenon}, differing in one word.

    A string seed gives a stream independent of `generate_documents(n, seed)`, so the good
    sentences are mostly unseen in training (the grammar has far more sentences than any corpus).
    """
    rng = random.Random(f"minimal-pairs/{seed}")
    pairs: list[dict] = []
    for phenomenon in PHENOMENA:
        constraints, slot = _PAIR_RECIPES[phenomenon]
        seen: set[str] = set()
        for _ in range(per_phenomenon * 50):  # a bound, not a target: duplicates are skipped
            if len(seen) == per_phenomenon:
                break
            words, slots = _sentence(rng, **constraints)
            if slot not in slots or render(words) in seen:
                continue
            i, bad_word = slots[slot]
            bad = list(words)
            bad[i] = bad_word
            seen.add(render(words))
            pairs.append({"sentence_good": render(words), "sentence_bad": render(bad), "phenomenon": phenomenon})
    return pairs

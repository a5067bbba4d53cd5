"""The generated corpus: deterministic, closed vocabulary, agreement holds; minimal pairs are
one-word edits that break exactly the rule they name."""
import collections

from trainer.data import corpus

# The grammar's own lexicon, as lookups a test can parse sentences with.
NOUN_NUMBER = {sg: "sg" for kind in corpus.NOUNS.values() for sg, _, _ in kind}
NOUN_NUMBER.update({pl: "pl" for kind in corpus.NOUNS.values() for _, pl, _ in kind})
NOUN_NUMBER.update({name.lower(): "sg" for name, _ in corpus.NAMES})
GENDER = {sg: g for kind in corpus.NOUNS.values() for sg, _, g in kind if g}
GENDER.update({name.lower(): g for name, g in corpus.NAMES})
VERBS = corpus.TRANSITIVE + corpus.INTRANSITIVE
VERB_NUMBER = {v[0]: "sg" for v in VERBS} | {v[1]: "pl" for v in VERBS}
VERB_NUMBER.update({"is": "sg", "was": "sg", "are": "pl", "were": "pl"})
TRANSITIVE_FORMS = {f for v in corpus.TRANSITIVE for f in v[:3]}
INTRANSITIVE_FORMS = {f for v in corpus.INTRANSITIVE for f in v[:3]}
DET_NUMBER = {"this": "sg", "that": "sg", "these": "pl", "those": "pl"}


def words(sentence: str) -> list[str]:
    assert sentence.endswith(".") and sentence[0].isupper(), sentence
    return sentence[:-1].lower().split()


def head(ws: list[str]) -> str:
    return next(w for w in ws if w in NOUN_NUMBER)


def diff(pair: dict) -> tuple[int, str, str]:
    good, bad = words(pair["sentence_good"]), words(pair["sentence_bad"])
    assert len(good) == len(bad), pair
    changed = [i for i, (a, b) in enumerate(zip(good, bad)) if a != b]
    assert len(changed) == 1, pair
    return changed[0], good[changed[0]], bad[changed[0]]


def test_documents_deterministic_and_sized():
    a = corpus.generate_documents(500, seed=1)
    assert a == corpus.generate_documents(500, seed=1)
    assert a != corpus.generate_documents(500, seed=2)
    assert sum(doc.count(".") for doc in a) == 500  # every sentence ends with the one full stop
    assert all(3 <= doc.count(".") <= 8 for doc in a[:-1])
    vocab = {w for doc in a for w in doc.replace(".", "").lower().split()}
    lexicon = set(NOUN_NUMBER) | set(VERB_NUMBER) | TRANSITIVE_FORMS | INTRANSITIVE_FORMS | {"an", "who", "that"}
    for table in (corpus.ADJECTIVES, corpus.DETERMINERS, corpus.PREPOSITIONS):
        lexicon |= {w for ws in table.values() for w in ws}
    lexicon |= set(corpus.PLACES) | set(corpus.ADVERBS) | set(corpus.REFLEXIVES.values())
    assert vocab <= lexicon
    assert 150 < len(vocab) < 400


def test_agreement_holds_in_the_corpus():
    checked = 0
    for doc in corpus.generate_documents(3000, seed=3):
        for sentence in doc.split(". "):
            ws = sentence.rstrip(".").lower().split()
            if "that" in ws:  # "that" opens object relatives (the verb agrees inside) and is a determiner
                continue
            h = head(ws)
            verb = next((w for w in ws if w in VERB_NUMBER), None)
            if verb is not None:
                assert VERB_NUMBER[verb] == NOUN_NUMBER[h], sentence
                checked += 1
            if ws[0] in ("a", "an"):
                assert ws[0] == ("an" if ws[1][0] in "aeiou" else "a"), sentence
    assert checked > 500


def test_minimal_pairs_shape():
    pairs = corpus.generate_minimal_pairs(40, seed=0)
    assert pairs == corpus.generate_minimal_pairs(40, seed=0)
    counts = collections.Counter(p["phenomenon"] for p in pairs)
    assert counts == {name: 40 for name in corpus.PHENOMENA}
    assert set(corpus.PHENOMENA) >= {"subject_verb_agreement", "agreement_across_attractor",
                                     "determiner_noun_agreement", "argument_structure", "anaphor_agreement"}
    for p in pairs:
        assert set(p) == {"sentence_good", "sentence_bad", "phenomenon"}
        assert p["sentence_good"] != p["sentence_bad"]
        diff(p)  # exactly one word differs


def test_minimal_pairs_break_the_rule_they_name():
    for p in corpus.generate_minimal_pairs(60, seed=5):
        i, good, bad = diff(p)
        ws = words(p["sentence_good"])
        kind = p["phenomenon"]
        if kind in ("subject_verb_agreement", "agreement_across_attractor"):
            number = NOUN_NUMBER[head(ws)]
            assert VERB_NUMBER[good] == number and VERB_NUMBER[bad] != number, p
            if kind == "agreement_across_attractor":  # some noun of the other number sits in between
                assert any(NOUN_NUMBER.get(w) not in (None, number) for w in ws[:i]), p
        elif kind == "determiner_noun_agreement":
            noun = next(w for w in ws[i + 1:] if w in NOUN_NUMBER)
            assert DET_NUMBER[good] == NOUN_NUMBER[noun] != DET_NUMBER[bad], p
        elif kind == "anaphor_agreement":
            h = head(ws)
            expected = "themselves" if NOUN_NUMBER[h] == "pl" else corpus.REFLEXIVES[GENDER[h]]
            assert good == expected != bad, p
        else:
            assert {good in TRANSITIVE_FORMS, bad in TRANSITIVE_FORMS} == {True, False}, p
            following = ws[i + 1] if i + 1 < len(ws) else None
            objects = {"an", *corpus.DETERMINERS["sg"], *corpus.DETERMINERS["pl"], *corpus.REFLEXIVES.values()}
            takes_object = following in objects or following in NOUN_NUMBER
            assert takes_object == (good in TRANSITIVE_FORMS), p


def test_minimal_pairs_mostly_held_out():
    training = {s.strip().rstrip(".") for doc in corpus.generate_documents(20000, seed=0) for s in doc.split(". ")}
    pairs = corpus.generate_minimal_pairs(100, seed=0)
    seen = sum(p["sentence_good"].rstrip(".") in training for p in pairs)
    assert seen < 0.1 * len(pairs)

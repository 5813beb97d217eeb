"""benchmarks/evidence's real-text corpus and tasks: fixed entries, held-out entries never asked
about, train and dev asking about different names with the answer the corpus states."""

import os

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/usr/lib/python3.11"), reason="needs Debian's python3.11 stdlib")


def test_corpus_is_fixed_and_held_out_entries_are_not_pretrained_on():
    from benchmarks.evidence.corpus import corpus_hash, entries, extra_texts, render, split, validation

    es = entries()
    assert len(es) > 3000 and corpus_hash() == corpus_hash()
    seen, held = split()
    valid = validation()
    assert len(held) == len(valid) == int(0.05 * len(es)) and len(seen) + len(held) + len(valid) == len(es)
    texts = [{render(e) for e in x} for x in (seen, held, valid)]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    # the extra text never continues a held-out or validation entry's docstring
    extra = extra_texts()
    unseen = {f"{e['qual']} in {e['module']}, more: " for e in held + valid}
    assert len(extra) > 1000 and not any(t.startswith(p) for t in extra for p in unseen if t[:1] == p[:1])
    e = next(e for e in es if e["qual"] == "ensure_future")
    assert render(e).startswith("ensure_future(coro_or_future, loop) in asyncio.tasks: ")


@pytest.mark.parametrize("name", ["module", "verb", "arg", "sub", "tail"])
def test_tasks_ask_dev_about_other_names_and_answer_as_the_corpus_does(name):
    from benchmarks.evidence.corpus import split
    from benchmarks.evidence.corpus import MAX_SUMMARY
    from benchmarks.evidence.tasks import SUBS, _label, cloze_text, labels, make, question

    train, dev = make(name)
    assert (train, dev) == make(name)
    q = lambda r: question(name, r["prompt"])  # noqa: E731
    assert not {q(r).split(".")[0] for r in train} & {q(r).split(".")[0] for r in dev}  # no class on both sides
    by_qual = {e["qual"]: e for e in split()[0]}
    for r in train + dev:
        e = by_qual[q(r)]  # every question is about a pretrained entry
        want = {"module": lambda: e["module"].split(".")[0], "verb": lambda: e["summary"].split()[0],
                "arg": lambda: e["args"].split(",")[0].strip(), "sub": lambda: e["module"].split(".")[1],
                "tail": lambda: e["summary"].rstrip(".").split()[-1]}[name]()
        assert r["completion"] == " " + want == " " + _label(name, e) and r["completion"] in labels(name)
        if name == "sub":  # asked under its own package only (wsgiref.handlers is not logging.handlers)
            assert e["module"].startswith(f"{SUBS[want]}.{want}")
        if name == "tail":  # a whole first paragraph, not one corpus.py cut short
            assert len(e["summary"]) < MAX_SUMMARY
        # the cloze's true candidate is the corpus's own text, up to the asked-about word
        from benchmarks.evidence.corpus import render

        assert render(e).startswith(cloze_text(name, e, want))
    counts = [sum(r["completion"] == lab for r in dev) for lab in labels(name)]
    assert min(counts) >= 12 and len(dev) >= 140 and len(train) >= 130

"""fixtures/world.py (the evidence corpus) and the `home` task: fixed facts, disjoint people."""

import hashlib
import json


def test_world_is_fixed_and_documents_state_its_facts():
    from fixtures.world import documents, world

    people = world()
    assert len({p["name"] for p in people}) == len(people) == 1500
    assert world() == people  # drawn from a fixed seed
    assert documents(20, seed=3) == documents(20, seed=3) != documents(20, seed=4)
    facts = {f"{p['name']} lives {p['place']}." for p in people}
    text = " ".join(documents(400, seed=0, fact_share=1.0))
    assert sum(f in text for f in facts) > 50  # fact sentences are the world's, not random pairings


def test_home_task_asks_dev_only_about_people_train_never_mentions():
    from fixtures.tasks import HOME_TRAIN_PEOPLE, labels, make_task
    from fixtures.world import world

    people = world()
    home = {p["name"]: p["home"] for p in people}
    train, dev = make_task("home", 300, seed=0), make_task("home", 300, seed=1000, split="dev")
    name = lambda r: next(n for n in r["prompt"].replace("?", " ").split() if n in home)  # noqa: E731
    tn, dn = {name(r) for r in train}, {name(r) for r in dev}
    assert not tn & dn
    assert tn <= {p["name"] for p in people[:HOME_TRAIN_PEOPLE]}
    assert all(r["completion"] == " " + home[name(r)] for r in train + dev)
    assert {r["completion"] for r in dev} <= set(labels("home"))


def test_existing_tasks_are_unchanged_by_the_split_argument():
    from fixtures.tasks import make_task

    digest = hashlib.sha256(json.dumps([make_task(t, 50, seed=2) for t in ("colour", "count", "place")]).encode())
    again = hashlib.sha256(json.dumps([make_task(t, 50, seed=2, split="dev") for t in ("colour", "count", "place")]).encode())
    assert digest.hexdigest() == again.hexdigest()

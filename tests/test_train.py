"""surgery train and surgery eval: data handling, every method learns, eval matches transformers and a hand count."""

import json

import pytest

from .conftest import run_cli
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)


def _cfg(**kw):
    from surgery.train.loop import TrainConfig

    return TrainConfig(**{"epochs": 1, "lr": 3e-2, "batch_size": 16, **kw})


# ---- data --------------------------------------------------------------------------------------
def test_bad_lines_are_named(tmp_path, fx):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "the cat"}\n\n{"text": oops}\n')
    code, _, err = run_cli("train", fx.model("llama"), "--data", f, "-o", tmp_path / "o")
    assert code == 2 and "d.jsonl:3: not valid JSON" in err and not (tmp_path / "o").exists()
    f.write_text('{"text": "the cat"}\n{"prompt": "a", "completion": " b"}\n')
    code, _, err = run_cli("train", fx.model("llama"), "--data", f, "-o", tmp_path / "o")
    assert "d.jsonl:2 is a completion record but earlier lines are text records" in err
    f.write_text('{"question": "a"}\n')
    code, _, err = run_cli("eval", fx.model("llama"), "--data", f)
    assert code == 2 and "d.jsonl:1: a JSON object with none of the known record fields" in err and "['question']" in err


def test_completion_only_labels(fx):
    from transformers import AutoTokenizer

    from surgery.io.data import make_record
    from surgery.train.data import IGNORE, encode

    tok = AutoTokenizer.from_pretrained(fx.model("llama"))
    rec = {"prompt": "the red cat. colour?", "completion": " red"}
    (e,) = encode([make_record(rec)], tok, seq2seq=False, max_length=64)
    p, c = tok(rec["prompt"])["input_ids"], tok(rec["completion"], add_special_tokens=False)["input_ids"]
    assert e.input_ids == p + c and e.labels == [IGNORE] * len(p) + c
    (s,) = encode([make_record(rec)], tok, seq2seq=True, max_length=64)  # encoder reads the prompt, decoder predicts
    assert s.input_ids == p and s.labels == tok(rec["completion"])["input_ids"]
    (t,) = encode([make_record(rec)], tok, seq2seq=False, max_length=len(c) + 2)  # the prompt loses its start
    assert t.input_ids == p[-2:] + c and t.labels[-len(c):] == c


# ---- train -------------------------------------------------------------------------------------
def test_lora_training_learns_the_task_and_eval_reproduces_it(fx, task, tmp_path):
    train, dev = task
    out = tmp_path / "ad"
    code, o, err = run_cli("train", fx.model("llama"), "--data", train, "--eval", dev, "-o", out, "--epochs", "4",
                           "--lr", "1e-2", "--batch-size", "16", "--rank", "4", "--json")
    assert code == 0, err
    s = json.loads(o)
    assert s["after"]["loss"] < s["before"]["loss"] - 0.5
    assert s["before"]["accuracy"] < 0.5 and s["after"]["accuracy"] >= 0.9
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["base_model_name_or_path"] == fx.model("llama")
    log = json.loads((out / "training.json").read_text())
    assert [e["step"] for e in log["history"]["evals"]] == [4, 8, 12, 16]  # once per epoch
    assert [st for st, _ in log["history"]["train_loss"]] == [10, 16] and log["history"]["log_every"] == 10  # the default
    code, o, err = run_cli("eval", fx.model("llama"), "--adapter", out, "--data", dev, "--json")
    assert code == 0, err
    e = json.loads(o)
    assert e["loss"] == pytest.approx(s["after"]["loss"], rel=1e-5) and e["correct"] == s["after"]["correct"]


@pytest.mark.parametrize("family,method", [("gpt2", "lora"), ("t5", "lora"), ("llama", "lokr"), ("gpt2", "bitfit"),
                                           ("llama", "prefix"), ("gpt2", "prompt"), ("t5", "prefix")])
def test_every_method_reduces_loss_and_saves_what_eval_loads(fx, task, tmp_path, family, method):
    from surgery.pipelines.evaluate import evaluate
    from surgery.pipelines.train import train_adapter

    train, _ = task
    s = train_adapter(fx.model(family), train, str(tmp_path / "a"), method=method, cfg=_cfg())
    assert s["after"]["loss"] < s["before"]["loss"]
    assert 0 < s["trainable"] < s["parameters"] / 5
    e = evaluate(fx.model(family), train, adapter=str(tmp_path / "a"))
    assert e["loss"] == pytest.approx(s["after"]["loss"], rel=1e-5)


def test_bitfit_writes_the_bitfit_format(fx, task, tmp_path):
    """docs/formats.md `surgery.bitfit/1`: biases and norm biases per the family map, base's dtype and config hash."""
    import hashlib

    from safetensors import safe_open

    from surgery.arch import arch_of
    from surgery.io.checkpoint import Checkpoint
    from surgery.pipelines.train import train_adapter

    base = fx.model("gpt2")
    train_adapter(base, task[0], str(tmp_path / "b"), method="bitfit", cfg=_cfg())
    m = json.loads((tmp_path / "b" / "bitfit.json").read_text())
    ck = Checkpoint.open(base)
    biases = [t.name for t in arch_of(ck).stored_tensors() if t.role in ("bias", "norm_bias")]
    assert m["format"] == "surgery.bitfit/1" and m["heads"] == [] and m["dropped"] == []
    assert m["base"]["config_sha256"] == hashlib.sha256(open(f"{base}/config.json", "rb").read()).hexdigest()
    assert sorted(k["name"] for k in m["kept"]) == sorted(biases) and "transformer.h.0.ln_1.bias" in biases
    with safe_open(str(tmp_path / "b" / "bitfit.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(biases)
        for k in m["kept"]:
            t = f.get_tensor(k["name"])
            assert list(t.shape) == k["shape"] == list(ck.shape(k["name"])) and k["dtype"] == "float32"
    assert m["norms"]["bias_norm"] > 0 and m["config"] == ck.config


def test_same_seed_same_bytes(fx, task, tmp_path):
    from surgery.pipelines.train import train_adapter

    train, _ = task
    for name in ("a", "b"):
        train_adapter(fx.model("gpt2"), train, str(tmp_path / name), cfg=_cfg())
    a, b = ((tmp_path / n / "adapter_model.safetensors").read_bytes() for n in "ab")
    assert a == b


def test_training_loss_is_recorded_every_log_step(fx, task, tmp_path):
    """Each train_loss record is the mean of the per-step losses since the previous one (the last at the end)."""
    train, _ = task
    hist = {}
    for every in (1, 3):
        code, _, err = run_cli("train", fx.model("gpt2"), "--data", train, "-o", tmp_path / f"l{every}", "--epochs", "2",
                               "--batch-size", "16", "--log-every", str(every))
        assert code == 0, err
        hist[every] = json.loads((tmp_path / f"l{every}" / "training.json").read_text())["history"]
    per_step = dict(hist[1]["train_loss"])
    assert list(per_step) == list(range(1, 9)) and hist[1]["steps"] == 8 and hist[3]["log_every"] == 3
    assert [st for st, _ in hist[3]["train_loss"]] == [3, 6, 8]
    for (st, mean), lo in zip(hist[3]["train_loss"], (1, 4, 7)):
        assert mean == pytest.approx(sum(per_step[k] for k in range(lo, st + 1)) / (st - lo + 1), rel=1e-6)
    assert per_step[8] < per_step[1]
    code, _, err = run_cli("train", fx.model("gpt2"), "--data", train, "-o", tmp_path / "l0", "--log-every", "0")
    assert code != 0 and err.count("\n") == 1 and "--log-every 0 is out of range" in err and not (tmp_path / "l0").exists()


def test_method_errors(fx, task, tmp_path):
    train, _ = task
    code, _, err = run_cli("train", fx.model("gpt2"), "--data", train, "-o", tmp_path / "o", "--method", "lokr")
    assert code == 2 and "attn.c_attn is stored transposed" in err and "--method lora" in err
    code, _, err = run_cli("train", fx.model("llama"), "--data", train, "-o", tmp_path / "o", "--method", "bitfit")
    assert code == 2 and "no bias parameters" in err
    code, _, err = run_cli("train", fx.model("llama"), "--data", train, "-o", tmp_path / "o", "--targets", "c_fc")
    assert code == 2 and "match no linear layer" in err and "self_attn.q_proj" in err
    code, _, err = run_cli("train", fx.model("llama"), "--data", train, "-o", fx.model("llama") + "/x")
    assert code == 2 and "overlaps input" in err


# ---- eval --------------------------------------------------------------------------------------
def test_eval_matches_greedy_decoding_and_a_hand_count(fx, tmp_path):
    """Half the completions are the model's own greedy continuation (right by construction), half are
    that continuation with its last token changed (wrong): accuracy must be exactly 1/2; the loss must
    equal transformers' own loss, token-weighted."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fixtures.tasks import make_task, write_jsonl
    from surgery.pipelines.evaluate import evaluate

    path = fx.model("llama")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    recs, hand, nll, ntok = [], 0, 0.0, 0
    for i, r in enumerate(make_task("colour", 40, seed=5)):
        ids = tok(r["prompt"], return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        if i % 2:
            gen[-1] = (gen[-1] + 1) % len(tok)
        comp = tok.decode(gen)
        if tok(comp, add_special_tokens=False)["input_ids"] != gen:  # keep only round-tripping token strings
            continue
        recs.append({"prompt": r["prompt"], "completion": comp})
        hand += i % 2 == 0
        full = torch.tensor([ids[0].tolist() + gen])
        labels = full.clone()
        labels[0, : ids.shape[1]] = -100
        with torch.no_grad():
            nll += float(model(input_ids=full, labels=labels).loss) * len(gen)
        ntok += len(gen)
    data = write_jsonl(str(tmp_path / "hand.jsonl"), recs)
    res = evaluate(path, data, batch_size=5)
    assert res["scored"] == len(recs) >= 8 and 0 < hand < len(recs)
    assert res["correct"] == hand == sum(_greedy_equals(model, tok, r) for r in recs)
    assert res["accuracy"] == hand / len(recs)
    assert res["loss"] == pytest.approx(nll / ntok, rel=1e-5) and res["tokens"] == ntok


def _greedy_equals(model, tok, rec) -> bool:
    ids = tok(rec["prompt"], return_tensors="pt")["input_ids"]
    want = tok(rec["completion"], add_special_tokens=False)["input_ids"]
    gen = model.generate(ids, max_new_tokens=len(want), do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    return gen == want


def test_eval_on_text_records_is_the_lm_loss(fx, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fixtures.corpus import sentences
    from fixtures.tasks import write_jsonl

    path = fx.model("gpt2")
    texts = sentences(5, seed=2)
    data = write_jsonl(str(tmp_path / "text.jsonl"), [{"text": t} for t in texts])
    code, o, err = run_cli("eval", path, "--data", data, "--json", "--batch-size", "2")
    assert code == 0, err
    res = json.loads(o)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll = n = 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert res["accuracy"] is None and res["scored"] == 0 and res["tokens"] == n
    assert res["loss"] == pytest.approx(nll / n, rel=1e-5)
    code, o, _ = run_cli("eval", path, "--data", data)
    assert code == 0 and "accuracy" in o and "perplexity" in o

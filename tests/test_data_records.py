"""Chat ({"messages": [...]}) and Alpaca (instruction/input/output) records in the one data reader."""

import json
import shutil

import pytest

from surgery.errors import DataError
from surgery.io.data import documents, read_records

from .conftest import run_cli

# ChatML-like, with the BOS token as text at the start as many real templates have it
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHAT = [
    {"messages": [{"role": "system", "content": "Answer with a colour."}, {"role": "user", "content": "the sky"},
                  {"role": "assistant", "content": "blue"}]},
    {"messages": [{"role": "user", "content": "grass"}, {"role": "assistant", "content": "green"}]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def chat_model(fx, tmp_path_factory):
    """The llama fixture with a chat template in its tokenizer_config.json."""
    d = tmp_path_factory.mktemp("chat") / "llama-chat"
    shutil.copytree(fx.model("llama"), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d)


def test_chat_records_render_with_the_template_and_score_the_last_answer(chat_model, tmp_path):
    from transformers import AutoTokenizer

    from surgery.train.data import IGNORE, load_examples

    tok = AutoTokenizer.from_pretrained(chat_model)
    path = _jsonl(tmp_path / "chat.jsonl", CHAT)
    recs = read_records(path)
    assert [r.kind.name for r in recs] == ["chat", "chat"]
    prompt, answer = recs[0].pair(tok)
    assert tok("x")["input_ids"][:1] != [tok.bos_token_id]  # this tokenizer adds no BOS: the template's stays
    assert answer == "blue</s>\n" and prompt + answer == tok.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    assert prompt.endswith("<|user|>\nthe sky</s>\n<|assistant|>\n")
    ex = load_examples(path, tok, seq2seq=False)[0]
    scored = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert scored == tok(answer, add_special_tokens=False)["input_ids"]
    assert ex.input_ids.count(tok.bos_token_id) == 1
    assert documents(path, tokenizer=tok)[1] == tok.apply_chat_template(CHAT[1]["messages"], tokenize=False)


def test_a_tokenizer_that_adds_bos_keeps_one():
    from surgery.io.data import _no_bos

    class AddsBos:  # what a Llama tokenizer does: encode() starts with BOS
        bos_token, bos_token_id = "<s>", 3

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [3, 9] if add_special_tokens else [9]}

    assert _no_bos(AddsBos(), "<s><|user|>\nhi") == "<|user|>\nhi"
    assert _no_bos(AddsBos(), "<|user|>\nhi") == "<|user|>\nhi"


def test_chat_and_alpaca_through_eval(fx, chat_model, tmp_path):
    chat = _jsonl(tmp_path / "chat.jsonl", CHAT)
    code, out, err = run_cli("eval", chat_model, "--data", chat, "--json")
    assert code == 0, err
    assert json.loads(out)["examples"] == 2
    # a tokenizer without a chat template: one line that says what to do
    code, _, err = run_cli("eval", fx.model("llama"), "--data", chat)
    assert code == 2 and err.count("\n") == 1 and "chat.jsonl:1" in err and "chat template" in err
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Name the colour.", "input": "the sky", "output": "blue"},
                                                {"instruction": "Say yes.", "output": "yes"}])
    code, out, err = run_cli("eval", fx.model("llama"), "--data", alpaca, "--json")
    assert code == 0, err
    assert json.loads(out)["examples"] == 2


def test_alpaca_prompt_is_stanford_alpacas(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "2 2", "output": "4"},
                                         {"instruction": "Greet.", "input": "", "output": "hi"}])
    a, b = read_records(path)
    assert a.kind.name == "alpaca" and a.pair() == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 2\n\n"
        "### Response:\n", "4")
    assert b.pair() == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                        "the request.\n\n### Instruction:\nGreet.\n\n### Response:\n", "hi")
    assert a.document() == "".join(a.pair())


@pytest.mark.parametrize("row,message", [
    ({"messages": "hi"}, "not a non-empty array"),
    ({"messages": [{"role": "user"}]}, "message 0 is not an object"),
    ({"instruction": "x", "input": 3, "output": "y"}, "\"input\" is a number"),
])
def test_malformed_records_name_the_line(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=message) as e:
        read_records(path)
    assert "bad.jsonl:1" in str(e.value)


def test_a_conversation_must_end_with_the_answer(chat_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    (rec,) = read_records(path)
    with pytest.raises(DataError, match="no answer to score"):
        rec.pair(tok)

"""The kinds registry: one name per kind, each kind implements exactly the commands it lists, and
a command refuses a kind with the registry's own list."""

import pytest

from surgery import kinds
from surgery.errors import AdapterError
from surgery.kinds.base import Kind

# command -> the operation a kind must override to support it
HOOKS = {"merge-lora": "merge_steps", "unmerge-lora": "merge_steps", "transfer": "port",
         "tune-bridge": "bridge_route", "train": "wrap", "refine": "tunable"}


def _overrides(kind, op: str) -> bool:
    return getattr(type(kind), op) is not getattr(Kind, op)


def test_names_are_unique_and_commands_match_operations():
    names = kinds.names()
    assert len(names) == len(set(names)) == len(kinds.REGISTRY)
    for k in kinds.all_kinds():
        assert k.name and set(k.commands) <= set(kinds.COMMANDS), k
        for command, op in HOOKS.items():
            assert (command in k.commands) == _overrides(k, op), (k.name, command)


def test_unsupported_command_names_the_supported_kinds():
    with pytest.raises(AdapterError) as e:
        kinds.get("prompt", "merge-lora")
    assert str(e.value).startswith("prompt is not supported by merge-lora (supported: lora, dora, lokr, ia3)")
    with pytest.raises(AdapterError, match="prompt is not supported by merge-lora"):
        kinds.get("prompt").merge_steps(None, None, 1.0, 1)
    with pytest.raises(AdapterError, match=r"unknown adapter kind 'loha'; choose one of lora, lokr"):
        kinds.get("loha", "train")
    assert kinds.get("adapter").name == "bottleneck"  # the old --method adapter


def test_detect_each_fixture_kind(fx, tmp_path):
    assert kinds.detect(fx.lora("llama", targets=["q_proj"])).name == "lora"
    assert kinds.detect(fx.lora("llama", targets=["q_proj"], name="dora", use_dora=True)).name == "dora"
    assert kinds.detect(fx.model("llama")) is None
    assert kinds.detect(str(tmp_path)) is None


def test_cli_refusals_come_from_the_registry(fx, tmp_path):
    from .conftest import run_cli

    dora = fx.lora("llama", targets=["q_proj"], name="dora", use_dora=True)
    code, _, err = run_cli("transfer", "--slm", dora, "--llm", fx.model("llama"), "-o", tmp_path / "o")
    assert code == 2 and "dora is not supported by transfer (supported: lora, prompt, prefix, bottleneck)" in err
    code, _, err = run_cli("train", fx.model("llama"), "--data", "x.jsonl", "-o", tmp_path / "o", "--method", "dora")
    assert code == 2 and "dora is not supported by train (supported: lora, lokr, ia3, prompt, prefix, bottleneck, bitfit)" in err


def test_docs_support_table_is_current():
    import os

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "kinds.md")) as f:
        assert kinds.support_table() in f.read(), "docs/kinds.md's table is stale: paste surgery.kinds.support_table()"

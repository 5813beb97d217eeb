"""CLI conventions: --version, -h, completion, -q/-v, pipeline order, whole summaries, piped tables."""

import json

from surgery import __version__

from .conftest import run_cli


def test_version_help_and_completion():
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"surgery {__version__}"
    code, out, _ = run_cli("-h")
    assert code == 0 and "--install-completion" in out and "-q, --quiet" in out and "-v, --verbose" in out
    code, out, _ = run_cli("merge-lora", "-h")
    assert code == 0 and "--weight" in out


def test_commands_in_pipeline_order_with_whole_summaries():
    code, out, _ = run_cli("--help")
    commands = out.split("Commands:")[1]
    names = [line.split()[0] for line in commands.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert names[:7] == ["inspect", "train", "transfer", "prune-bridge", "tune-bridge", "refine", "eval"]
    assert "..." not in commands and "…" not in commands
    assert "checkpoint." in commands.replace("\n", " ")  # merge-lora's summary, to its end


def test_quiet_silences_notes(fx):
    base = fx.model("olmo2")  # no family map: inspect notes the generic map
    code, out, err = run_cli("inspect", base, "--json")
    assert code == 0 and "generic linear-layer map" in err
    code, out, err = run_cli("-q", "inspect", base, "--json")
    assert code == 0 and err == "" and json.loads(out)["family"] == "generic"


def test_piped_tables_are_not_folded_at_80_columns(fx):
    code, out, err = run_cli("inspect", fx.model("llama"))
    assert code == 0, err
    row = next(line for line in out.splitlines() if "side_files" in line)
    assert "config.json, generation_config.json, tokenizer.json, tokenizer_config.json" in row

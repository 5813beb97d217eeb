"""CLI conventions: --version, -h, completion, -q/-v, pipeline order, whole summaries, piped tables."""

import json

from surgery import __version__

from .conftest import run_cli, run_fresh
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)


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


def _choice_cases():
    """(argv before the flag, flag, the library's list of values) for every enumerated option."""
    from surgery.io.adapterhub import PRESETS
    from surgery.io.model import DEVICE_MAPS, DTYPES
    from surgery.kinds import names
    from surgery.pipelines.bridge_plan import RESIDUAL
    from surgery.pipelines.importance import METHODS
    from surgery.pipelines.prune import DROP_BY
    from surgery.pipelines.transfer.run import DEPTHS, MAPS

    prune = ["prune-bridge", "m", "-o", "o", "--data", "d"]
    transfer = ["transfer", "--slm", "a", "--llm", "b", "-o", "o"]
    train = ["train", "m", "--data", "d", "-o", "o"]
    return [(prune, "--importance", METHODS), (prune, "--residual", RESIDUAL), (prune, "--drop-by", DROP_BY),
            (prune, "--dtype", DTYPES), (prune, "--device-map", DEVICE_MAPS),
            (transfer, "--map", MAPS), (transfer, "--depth", DEPTHS), (transfer, "--dtype", DTYPES),
            (train, "--method", names("train")), (train, "--adapter-config", list(PRESETS)), (train, "--dtype", DTYPES),
            (["tune-bridge", "--adapter", "a", "--bridge", "b", "--data", "d", "-o", "o"], "--dtype", DTYPES),
            (["refine", "--adapter", "a", "--llm", "b", "--data", "d", "-o", "o"], "--dtype", DTYPES),
            (["eval", "m", "--data", "d"], "--device-map", DEVICE_MAPS),
            (["merge-lora", "b", "a", "-o", "o"], "--dtype", DTYPES),
            (["unmerge-lora", "m", "a", "-o", "o"], "--dtype", DTYPES),
            (["extract-lora", "b", "t", "-o", "o", "--rank", "2"], "--dtype", DTYPES)]


def test_choices_are_listed_in_help():
    for argv, flag, values in _choice_cases():
        code, out, _ = run_cli(argv[0], "-h")
        assert code == 0 and f"{flag} [{'|'.join(values)}]" in out, (argv[0], flag)


def test_a_mistyped_choice_is_refused_before_torch_is_imported():
    """Every enumerated option refuses a typo while the flags are parsed: one line naming the valid
    values, exit 2, and neither torch nor transformers imported (they cost seconds)."""
    cases = [(argv, flag, list(values)) for argv, flag, values in _choice_cases()]
    out, heavy = run_fresh(
        "import io, json, contextlib\nres = []\n"
        f"for argv, flag, values in {cases!r}:\n"
        "    sys.argv = ['surgery', *argv, flag, values[0] + 'x']\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try: main()\n"
        "        except SystemExit as e: res.append([e.code, err.getvalue()])\n"
        "print(json.dumps(res))")
    res = json.loads(out)
    assert heavy == []
    assert len(res) == len(cases)
    for (argv, flag, values), (exit_code, err) in zip(cases, res):
        assert exit_code == 2 and err.count("\n") == 1, (flag, err)
        assert err.startswith(f"surgery: error: unknown {flag} '{values[0]}x'; did you mean {values[0]}? choose one of "
                              + ", ".join(values)), err


def test_the_old_method_alias_is_still_accepted_but_not_listed(fx, tmp_path):
    code, out, _ = run_cli("train", "-h")
    assert "adapter|" not in out and "|adapter" not in out
    code, _, err = run_cli("train", tmp_path / "missing", "--data", "d", "-o", tmp_path / "o", "--method", "adapter")
    assert code == 2 and "--method" not in err and "does not exist" in err  # got past the flags


def test_piped_table_titles_stay_on_one_line(fx, task):
    """rich wraps a title to its table's width: eval's two narrow columns folded the model and adapter
    paths mid-word, one piece a line."""
    model, adapter = fx.model("llama"), fx.lora("llama", targets=["q_proj"], name="a-long-adapter-name-for-a-title")
    code, out, err = run_cli("eval", model, "--adapter", adapter, "--data", task[1], "--max-length", "32")
    assert code == 0, err
    assert out.splitlines()[0].strip() == f"eval {model} + {adapter}"
    assert len(out.splitlines()[0]) > max(len(line) for line in out.splitlines()[1:])  # wider than its table

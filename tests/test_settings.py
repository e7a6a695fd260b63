"""The one settings pattern (cli/settings.py): flags with DW_* fallbacks, lists, every bad value
named at once, and the variables a program hands to another named by the receiver's table."""

from __future__ import annotations

import argparse

import pytest

from cli.settings import Setting, environment, parse_settings, read_environment, seconds, text, whole
from cron.config import SETTINGS as SCALER_SETTINGS
from endpoint.config import OPTIONS as ENDPOINT_SETTINGS
from worker.config import SETTINGS as WORKER_SETTINGS

TABLE = {
    "endpoints": Setting("DW_T_ENDPOINTS", "", text, "endpoints", many=True),
    "count": Setting("DW_T_COUNT", "2", whole(1), "how many"),
    "wait": Setting("DW_T_WAIT", "0.5", seconds(0, inclusive=True), "seconds"),
    "every": Setting("", "0", seconds(0, inclusive=True), "no variable"),
}


def parse(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    return parse_settings(argparse.ArgumentParser(prog="t"), TABLE, argv, environ=environ)


def test_a_flag_beats_its_variable_which_beats_the_default() -> None:
    assert vars(parse([], {})) == {"endpoints": [], "count": 2, "wait": 0.5, "every": 0.0}
    environ = {"DW_T_ENDPOINTS": "http://a, http://b", "DW_T_COUNT": "3"}
    assert vars(parse([], environ)) == {"endpoints": ["http://a", "http://b"], "count": 3, "wait": 0.5, "every": 0.0}
    args = parse(["--endpoint", "http://c", "--count", "4", "--every", "2"], environ)
    assert (args.endpoints, args.count, args.every) == (["http://c"], 4, 2.0)


def test_every_bad_value_is_named_at_once_with_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--count", "0"], {"DW_T_WAIT": "soon"})
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "usage: t" in error
    assert "--count must be at least 1, not 0" in error
    assert "--wait must be a number of seconds, not 'soon' (from DW_T_WAIT)" in error


def test_what_a_program_hands_over_reads_back_as_the_same_values() -> None:
    values = {"endpoints": ["http://a:5000", "http://b:5000"], "count": 7, "wait": 1.5}
    handed = environment(TABLE, values)
    assert handed == {"DW_T_ENDPOINTS": "http://a:5000,http://b:5000", "DW_T_COUNT": "7", "DW_T_WAIT": "1.5"}
    assert read_environment(TABLE, handed) == {**values, "every": 0.0}
    with pytest.raises(KeyError):
        environment(TABLE, {"cuont": 7})  # a misspelt name is no variable nobody reads
    with pytest.raises(ValueError, match="no environment variable"):
        environment(TABLE, {"every": 1})
    with pytest.raises(ValueError, match="DW_T_COUNT must be a whole number"):
        read_environment(TABLE, {"DW_T_COUNT": "many"})


def test_the_names_shared_by_programs_are_the_same_variables() -> None:
    """What the deploy hands to an endpoint host is read by its endpoint and its scaler alike; the
    scaler and the worker name the knobs they share alike."""
    for name in ("node_id", "peer", "secret_file"):
        assert ENDPOINT_SETTINGS[name].env == SCALER_SETTINGS[name].env, name
    for name in ("endpoints", "idle_timeout"):
        assert WORKER_SETTINGS[name].env == SCALER_SETTINGS[name].env, name

import argparse
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedrnn.shared.cli import build_parser, config_from_args, main
from fedrnn.shared.config import FLAG_GROUPS, RunConfig, dump_toml, key_of
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.mechanisms import NO_DP, RECORD_AND_USER_LEVEL, RECORD_LEVEL, USER_LEVEL

ROOT = Path(__file__).resolve().parents[2]


def test_flat_round_trip_and_toml_dump():
    config = RunConfig(rounds=3, epsilon=2.5, dp=False, labels="a,b")
    assert RunConfig.from_flat(config.to_flat()) == config
    assert RunConfig.from_flat(tomllib.loads(dump_toml(config))) == config


@pytest.mark.parametrize("dp,level,mechanism", [
    (True, "record", RECORD_LEVEL), (True, "user", USER_LEVEL),
    (True, "both", RECORD_AND_USER_LEVEL),
    (False, "record", NO_DP), (False, "user", NO_DP), (False, "both", NO_DP)])
def test_dp_and_dp_level_resolve_to_one_mechanism(dp, level, mechanism):
    config = RunConfig(dp=dp, dp_level=level)
    assert config.mechanism is mechanism
    assert config.record_level == mechanism.sites_run_dpsgd == (dp and level != "user")
    assert config.user_level == mechanism.server_clips_and_noises == (dp and level != "record")
    assert mechanism.describe() == (f"dp-level {level}" if dp else "no DP")


def test_unknown_key_and_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="unknown setting"):
        RunConfig.from_flat({"round": 3})
    with pytest.raises(ConfigError, match="model must be one of"):
        RunConfig(model="transformer")
    with pytest.raises(ConfigError, match="rounds must be a int"):
        RunConfig.from_flat({"rounds": "many"})
    with pytest.raises(ConfigError, match="delta"):
        RunConfig(delta=2.0)
    with pytest.raises(ConfigError, match="lr is NaN"):
        RunConfig.from_flat({"lr": "nan"})


@pytest.mark.parametrize("key", ["clip-norm", "noise-multiplier", "user-clip-norm",
                                 "user-noise-multiplier"])
def test_an_infinite_clip_or_noise_is_refused(key):
    """An infinite clip bounds no record's influence (the ledger would charge an epsilon the
    update does not have); infinite noise leaves no model."""
    with pytest.raises(ConfigError, match=f"{key}.* must be"):
        RunConfig.from_flat({key: "inf", "dp-level": "both"})


def test_flags_override_file_which_overrides_defaults(tmp_path):
    file = tmp_path / "exp.toml"
    file.write_text('rounds = 7\nmodel = "lstm"\nepsilon = 3.0\n')
    args = build_parser().parse_args(["simulate", "--config", str(file), "--epsilon", "1.5",
                                      "--no-dp"])
    config = config_from_args(args)
    assert (config.rounds, config.model, config.epsilon, config.dp) == (7, "lstm", 1.5, False)
    assert config.hidden_size == RunConfig().hidden_size


def test_pyproject_app_config_agrees_with_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_flat(app_config) == RunConfig()
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedrnn.server.app:app",
                          "clientapp": "fedrnn.client.app:app"}


def test_the_fedrnn_command_turns_flowers_telemetry_off():
    """A privacy tool does not report run events to a third party by default."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    code = ("import fedrnn.shared.cli, flwr.supercore.telemetry as t; "
            "print(t.FLWR_TELEMETRY_ENABLED, t.os.environ['FLWR_TELEMETRY_ENABLED'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["0", "0"]


def test_the_fedrnn_command_turns_rays_usage_stats_off():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_USAGE_STATS_ENABLED"}
    code = ("import fedrnn.shared.cli; "
            "from ray._common.usage.usage_lib import usage_stats_enabled; "
            "print(usage_stats_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["False"]


def test_every_setting_is_in_exactly_one_flag_group():
    grouped = [name for names in FLAG_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in fields(RunConfig))


def _flags(command: list[str]) -> set[str]:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices  # argparse keeps no public accessor
    for name in command:
        parser = sub[name]
        if parser._subparsers is not None:
            sub = parser._subparsers._group_actions[0].choices
    return {flag for action in parser._actions for flag in action.option_strings
            if action.help != argparse.SUPPRESS}


def test_each_command_offers_only_the_settings_it_reads():
    split = _flags(["split"])
    assert {"--dataset", "--partitioner", "--clients", "--seed", "--config"} <= split
    assert not split & {"--model", "--rounds", "--dropout", "--epsilon", "--attack"}
    server = _flags(["server"])
    assert {"--model", "--rounds", "--epsilon", "--address", "--min-clients"} <= server
    # the server holds no records; sites split, budget and keep their own ledgers
    assert not server & {"--data", "--partitioner", "--attack", "--budget-epsilon",
                         "--ledger-dir", "--eval-fraction"}
    assert {"--" + key_of(f.name) for f in fields(RunConfig)} <= _flags(["simulate"])
    client = _flags(["client"])
    assert "--budget-epsilon" in client and not client & {"--epsilon", "--model"}


def test_a_refused_server_setting_says_why(capsys):
    assert main(["server", "--insecure", "--data", "x.csv"]) == 2
    assert "the server holds no records" in capsys.readouterr().err


def test_the_bottom_layer_imports_nothing_above_it():
    """shared/ is the bottom layer (import-linter checks the source in CI; this checks what
    actually loads): the program finds its commands through entry points."""
    import subprocess
    import sys

    code = ("import sys, fedrnn.shared.cli, fedrnn.shared.config, fedrnn.shared.data, "
            "fedrnn.shared.privacy; sys.exit(any(m.startswith(('fedrnn.server', "
            "'fedrnn.client', 'fedrnn.simulations')) for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

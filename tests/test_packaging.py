"""The distribution installs one import name, ``fedrnn``: the design's folders server/,
client/, shared/ and simulations/ are ``fedrnn.server`` ... and nothing else."""

import json
import os
import subprocess
import sys


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    """``code`` as a user's fresh shell in ``cwd`` runs it (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, env=env)


def test_no_generic_top_level_names_are_installed(tmp_path):
    # from a directory of the user's, as the installed distribution (not this checkout) says
    code = ("import importlib.util, json; from importlib.metadata import distribution; "
            "print(json.dumps([[n for n in ('server', 'client', 'shared', 'simulations') "
            "if importlib.util.find_spec(n)], [str(f) for f in distribution('fedrnn').files "
            "if str(f).endswith('.py')]]))")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    importable, files = json.loads(result.stdout)
    assert importable == []
    # a wheel install holds fedrnn/...; an editable one only its finder module
    assert files and all(f.startswith("fedrnn/") or f.startswith("__editable__")
                         for f in files), files


def test_a_script_directory_holding_server_py_does_not_shadow_fedrnn(tmp_path):
    for name in ("server", "client", "shared", "simulations"):
        (tmp_path / f"{name}.py").write_text("raise SystemExit('shadowed')\n")
    result = _python("import fedrnn.server.app, fedrnn.client.app, fedrnn.shared.config, "
                     "fedrnn.simulations.simulate; print('ok')", tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_program_offers_every_command():
    from fedrnn.shared.cli import installed_commands

    assert [c.name for c in installed_commands()] == [
        "simulate", "server", "client", "certs", "split", "budget", "audit", "ledger", "predict",
        "evaluate", "generate", "export", "bench"]


def test_every_source_package_is_installed():
    """A folder with an ``__init__.py`` missing from pyproject's ``packages`` is left out of a
    wheel (the editable install would still find it, so only this test would notice)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {folder: name for name, folder in setuptools["package-dir"].items()}
    found = {folders[init.parent.relative_to(root).parts[0]] + "".join(
                 "." + part for part in init.parent.relative_to(root).parts[1:])
             for folder in folders for init in (root / folder).rglob("__init__.py")}
    assert found == set(setuptools["packages"])


def test_the_dev_extra_installs_the_export_extra_so_ci_tests_the_export():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    assert set(extras["export"]) <= set(extras["dev"])

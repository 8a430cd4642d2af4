"""The README's commands run as written: every `harness ...` line of its bash blocks is
parsed by the real command line, and the runs and sweeps it asks for are the ones it says
(seeds, ratios), with training itself stubbed out."""
import re
import shlex
import sys
from pathlib import Path

import pytest

import harness.runner
import harness.sweep
import harness.tune
from harness.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            command = line.split(" #")[0].strip()
            if command.startswith("harness ") or " -m harness.cli " in command:
                lines.append(command)
    return lines


def argv_of(command: str, run_id: str) -> list[str]:
    words = shlex.split(command.replace("RUN_ID", run_id))
    return words[words.index("harness.cli") + 1:] if "harness.cli" in words else words[1:]


def test_the_readme_has_commands_to_check():
    commands = readme_commands()
    assert any(c.startswith("harness run") for c in commands) and any(c.startswith("harness sweep") for c in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs_as_written(command, tmp_path, monkeypatch, capsys):
    from tests.test_hostile import existing_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HARNESS_BENCHMARKS", raising=False)
    monkeypatch.setenv("HARNESS_DB", f"sqlite:///{tmp_path / 'results.db'}")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    existing_store(tmp_path / "results.db")
    requests = []
    monkeypatch.setattr(harness.runner, "execute", lambda req: requests.append(req) or [])
    monkeypatch.setattr(harness.sweep, "execute_sweep", lambda planned, *a, **k: requests.extend(planned) or (0, 0))
    monkeypatch.setattr(harness.tune, "tune", lambda req, report: requests.append(req) or {})
    argv = argv_of(command, "r1")
    if argv[:2] == ["db", "merge"]:   # the store it merges from, as another machine left it
        existing_store(tmp_path / argv[2].removeprefix("sqlite:///"))
    monkeypatch.setattr(sys, "argv", ["harness", *argv])
    try:
        main()
    except SystemExit as exit_:
        assert exit_.code in (0, None), capsys.readouterr().err
    written = [int(w) for w in re.search(r"--seeds? ((?:-?\d+ ?)+)", command).group(1).split()] \
        if re.search(r"--seeds? \d", command) else None
    if argv[:1] == ["run"] and "--dry-run" in argv:   # shows the recipe, trains nothing
        assert not requests and "nothing trained, nothing written" in capsys.readouterr().out
    elif argv[0] in ("run", "tune"):
        [req] = requests
        req = req if argv[0] == "run" else req.run
        assert req.seeds == (written or [0])
        if "--set" in argv:   # its value parsed as the number it is, not as text
            assert req.settings == {"stage1.weight_decay": 0.001}, req.settings
    if argv[0] == "sweep" and written:
        planned_seeds = {s for p in requests for s in p.request.seeds + p.skipped_seeds}
        assert planned_seeds == set(written), f"{command} planned seeds {planned_seeds}"
        rhos = re.search(r"--rho ((?:[\d.]+ ?)+)", command)
        if rhos:
            assert {p.request.rho for p in requests} == {float(r) for r in rhos.group(1).split()}


def test_the_readme_python_imports_what_exists():
    """The README's Python snippets import names the harness has (a renamed function would leave
    them pointing at nothing)."""
    imports = [line for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
               for line in block.splitlines() if line.startswith(("from harness", "import harness"))]
    assert "from harness.models import load_model" in imports
    for line in imports:
        exec(line, {})

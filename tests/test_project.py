"""The project's own promises: pins, environment.yml in step with pyproject, CI calls make test."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            r = Requirement(line)
            pins[r.name.lower().replace("_", "-")] = str(r.specifier)
    return pins


def _deps() -> list[Requirement]:
    p = _pyproject()["project"]
    return [Requirement(d) for d in p["dependencies"] + p["optional-dependencies"]["dev"]]


def test_every_dependency_is_pinned_and_pins_satisfy_ranges() -> None:
    pins = _pins()
    assert pins["torch"] == "==2.13.0"
    for req in _deps():
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency but has no pin in constraints.txt"
        version = pins[name].removeprefix("==")
        assert req.specifier.contains(version, prereleases=True), (
            f"{name}: pin {version} outside {req.specifier}"
        )


def test_environment_yml_matches_pyproject() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda and "pip" in conda
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e .[dev]" in pip, "environment.yml must install the package's own dependencies"
    assert "-c constraints.txt" in pip and "torch==2.13.0" in pip
    # anything else named in environment.yml must be a declared dependency with the same pin
    names = {r.name.lower() for r in _deps()}
    for d in conda + pip:
        if d.startswith(("-", "python", "pip")):
            continue
        name = re.split(r"[=<>!~ ]", d)[0].lower()
        assert name in names, f"environment.yml lists {name}, which pyproject.toml does not"


def test_console_script_and_extras() -> None:
    p = _pyproject()["project"]
    assert p["name"] == "moshivis_lab"
    assert p["scripts"]["moshivis-lab"] == "moshivis_lab.cli:app"
    assert "dev" in p["optional-dependencies"]


def test_ci_runs_make_test_and_readme_opens_with_two_commands() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    head = readme[: readme.find("##", readme.find("make test"))]
    assert "make reproduce" in head and "make test" in head
    for target in ("reproduce:", "test:", "lab:", "bench:"):
        assert target in (ROOT / "Makefile").read_text()


def test_notebooks_are_committed_without_outputs() -> None:
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert nbs, "no notebooks found"
    for nb in nbs:
        d = json.loads(nb.read_text())
        for cell in d["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs"), f"{nb.name} carries outputs: strip them"
                assert cell.get("execution_count") is None, f"{nb.name} carries execution counts"


NOTEBOOK_MAP = (
    "00_quickstart",
    "01_data_world",
    "02_pretrained_parts",
    "03_building_adapters",
    "04_training_mixed_data",
    "05_gates",
    "06_cross_attention_and_attribution",
    "07_prosody_preservation",
    "08_paper_figures",
)


def test_every_notebook_says_what_how_long_and_real_weights() -> None:
    names = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert names == sorted(NOTEBOOK_MAP), f"notebook map changed: {names}"
    readme = (ROOT / "README.md").read_text()
    for name in NOTEBOOK_MAP:
        d = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        top = d["cells"][0]
        assert top["cell_type"] == "markdown", f"{name}: the first cell must explain the notebook"
        text = "".join(top["source"])
        for part in ("**What this shows.**", "**How long.**", "**Real weights.**"):
            assert part in text, f"{name}: its first cell lacks {part}"
        code = "".join("".join(c["source"]) for c in d["cells"] if c["cell_type"] == "code")
        assert "MOSHIVIS_PRESET" in code, f"{name}: no preset switch (MOSHIVIS_PRESET)"
        assert name in readme, f"README's notebook map lacks {name}"


def test_only_the_shipped_bases_are_large_files() -> None:
    """No tracked file over 5 MB except a shipped base: under bases/<preset>/, recorded with its
    sha256 in that preset's recipe.json (the recipe that made it), all bases <= 60 MB."""
    import hashlib
    import subprocess

    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        import pytest

        pytest.skip("not a git checkout")
    tracked = [ROOT / p for p in out.decode().split("\0") if p]
    recorded: dict[Path, str] = {}
    for recipe in ROOT.glob("bases/*/recipe.json"):
        r = json.loads(recipe.read_text())
        for part in r["parts"].values():
            for rel, info in part["files"].items():
                recorded.update({p: info["sha256"] for p in recipe.parent.glob(f"*/{rel}")})
    big = [p for p in tracked if p.is_file() and p.stat().st_size > 5_000_000]
    for p in big:
        assert p in recorded, f"{p.relative_to(ROOT)} is over 5 MB and not a shipped base"
        assert hashlib.sha256(p.read_bytes()).hexdigest() == recorded[p], p
    bases = [p for p in tracked if p.is_file() and "bases" in p.relative_to(ROOT).parts[:1]]
    assert sum(p.stat().st_size for p in bases) <= 60_000_000

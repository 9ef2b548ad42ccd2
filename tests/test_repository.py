"""The repository keeps its promises: CI runs exactly the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Run the tests:", 1)[1].split("```sh", 1)[1].split("```", 1)[0].strip()
    assert block in (ROOT / ".ci" / "run").read_text().splitlines()


def test_passes_and_targets_are_installed_under_the_tandemc_namespace():
    import tandemc.passes
    import tandemc.targets

    assert Path(tandemc.passes.__file__).parent == ROOT / "passes"
    assert Path(tandemc.targets.__file__).parent == ROOT / "targets"

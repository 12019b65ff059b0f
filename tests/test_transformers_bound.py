"""The transformers range declared in pyproject.toml is true at both ends.

The upper end: `.ci/run` (and the README's test command, the same line) upgrades transformers to
the newest release the range allows and runs the whole suite on it. The lower end: the parity tests
against transformers' NemotronH run here in a virtual environment that holds the lowest allowed
release (`--system-site-packages`, so torch and everything else come from this environment, and
pip installs only transformers, shadowing this environment's own). The venv is built once per test
session under pytest's temporary directory; it needs the package index, like `.ci/run` does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
# Every test that compares us with transformers' NemotronH (modeling, config, save / load, generate).
PARITY_TESTS = [
    "tests/test_time_step_limit.py",
    "tests/test_towers.py",
    "tests/test_generation.py::test_generate_ar_equals_transformers_greedy_generate",
    "tests/test_training.py::test_ar_pretraining_learns_and_saves_transformers_checkpoint",
    "tests/test_evaluation.py::test_loglikelihoods_equal_transformers_nemotron_h_on_the_backbone",
]


def declared_range() -> tuple[Version, Version]:
    """(lower, upper) of pyproject.toml's transformers requirement, which must read `>=L,<U`."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == "transformers")
    bounds = {s.operator: Version(s.version) for s in req.specifier}
    assert set(bounds) == {">=", "<"}, f"transformers must be declared as '>=lower,<upper', got {req}"
    return bounds[">="], bounds["<"]


def test_declared_range_holds_the_installed_transformers():
    import transformers

    lower, upper = declared_range()
    assert lower < upper
    assert lower <= Version(transformers.__version__) < upper, (transformers.__version__, lower, upper)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = re.search(r"what `\.ci/run` does\):\n\n```bash\n(.*?)\n```", (ROOT / "README.md").read_text()).group(1)
    # .ci/run spells pip through the running interpreter and keeps pytest's cache out of the tree.
    assert ci.replace("python -m pip", "pip").replace(" -p no:cacheprovider", "") == readme


@pytest.fixture(scope="session")
def lower_bound_python(tmp_path_factory) -> Path:
    """The interpreter of a venv whose transformers is the declared lower bound."""
    lower, _ = declared_range()
    venv = tmp_path_factory.mktemp("transformers_lower_bound") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          f"transformers=={lower}"], capture_output=True, text=True, timeout=900)
    if pip.returncode:
        pytest.fail(f"pip could not install transformers=={lower} into {venv} (it needs the package index):\n"
                    + pip.stdout[-2000:] + pip.stderr[-3000:])
    return python


@pytest.mark.slow
def test_parity_tests_pass_on_the_lowest_declared_transformers(lower_bound_python):
    lower, _ = declared_range()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's twotower, whatever is installed
    probe = subprocess.run(
        [str(lower_bound_python), "-c", "import transformers, twotower; print(transformers.__version__); "
                                        "print(twotower.__file__)"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    version, where = probe.stdout.split()
    assert Version(version) == lower and Path(where).is_relative_to(ROOT), probe.stdout
    run = subprocess.run([str(lower_bound_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY_TESTS],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert run.returncode == 0, f"parity tests on transformers {lower}:\n" + run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", run.stdout), run.stdout[-2000:]

"""The built wheel is a working install: it carries the embedded default and the recipes, so `predict`
from a recipe by name runs in a fresh environment, from a directory outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Build from a copy: an in-tree build would leave build/ and *.egg-info behind in the checkout.
LEAVE_OUT = shutil.ignore_patterns(".git", "runs", "outputs", "build", "dist", "*.egg-info", "__pycache__",
                                   ".pytest_cache", ".venv", "lightning_logs")


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_wheel_install_predicts_from_a_recipe_by_name(tmp_path):
    src, dist, venv, work = tmp_path / "src", tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    shutil.copytree(ROOT, src, symlinks=True, ignore=LEAVE_OUT)  # symlinks: twotower/recipes -> ../recipes
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)])
    wheel, = dist.glob("twotower-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"twotower/assets/twotower/model.safetensors", "twotower/assets/backbone/config.json",
            "twotower/recipes/generate.yaml", "twotower/recipes/prompts.jsonl"} <= names

    # torch & co. come from the system site; the wheel goes into the venv (system pip, venv prefix).
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)])
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = run([str(python), "-c", "import twotower; print(twotower.__file__)"], cwd=work, env=env).strip()
    # The venv's copy, not an editable install of the system site (its finder comes after the venv's path).
    assert Path(where).is_relative_to(venv), where

    run([str(venv / "bin" / "twotower"), "predict", "--config", "generate", "--model.init_args.max_new_tokens", "24",
         "--trainer.enable_progress_bar", "false"], cwd=work, env=env)
    rows = [json.loads(line) for line in (work / "runs" / "generate" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8  # the shipped recipes/prompts.jsonl, found without a checkout
    assert all(r["completion"].strip() and r["generated_tokens"] >= 1 for r in rows), rows

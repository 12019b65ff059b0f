"""Plug-ins from outside the repository (`twotower.plugins`, issue 22 part 3).

* ``--plugins mypkg`` imports a user's package before any subcommand parses its arguments: a tower
  family registered there (a new model_type) converts, fine-tunes, exports, predicts and serves.
* Entry points (``twotower.families`` / ``twotower.decoders`` / ``twotower.plugins``) of an installed
  distribution are found (a dist-info folder on sys.path, no pip), loaded once, and a broken one is
  named in the error.
* A time conditioning whose parameters have their own names round-trips through save / export and
  load (its names under ``time.``; AdaLNSingle keeps the released names).
* The user's package passes the contract checks of `twotower.testing` (`check_family("myllama")`,
  `check_decoder(RepeatLast())`, `check_time_conditioning`), as its author would run them.
* Only public Lightning APIs: no ``._trainer``, ``_device_mesh`` or ``_prepare_subcommand_parser``.

The user's package is written into a temporary folder and put on PYTHONPATH for subprocesses; the
in-process tests that import it restore the family registry afterwards (test_families runs over
every registered family).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import free_port, left_pad, make_context, random_prompts, save_tiny_llama
from twotower import plugins
from twotower.model import TwoTowerLM
from twotower.time_embedding import TimeConditioning, sinusoidal_features
from twotower.towers import base, registry

ROOT = Path(__file__).resolve().parents[1]

# A user's package: Llama's towers under a new model_type, a decoder, a time conditioning.
MYPKG = '''
"""A user's package: a tower family under a new model_type, a decoder and a time conditioning."""

import torch
import torch.nn as nn
from transformers import LlamaConfig

from twotower.decoding import Decoder, register_decoder
from twotower.time_embedding import TimeConditioning, sinusoidal_features
from twotower.towers.base import TowerFamily, register_family
from twotower.towers.llama import LlamaContextTower, LlamaDenoiserTower


class MyLlamaConfig(LlamaConfig):
    """Llama's config under its own model_type."""
    model_type = "myllama"


class MyContextTower(LlamaContextTower):
    """Llama's context tower, for MyLlamaConfig."""


class MyDenoiserTower(LlamaDenoiserTower):
    """Llama's denoiser tower, for MyLlamaConfig."""


FAMILY = TowerFamily(model_type="myllama", config_class=MyLlamaConfig, context=MyContextTower,
                     denoiser=MyDenoiserTower, embed_key="embed_tokens.weight", hf_architecture="LlamaForCausalLM")
register_family(FAMILY)


class RepeatLast(Decoder):
    """Writes the prompt's last token `times` times per step, with no forward after the prompt's."""
    uses_denoiser = False

    def __init__(self, times: int = 2):
        super().__init__()
        self.times = times

    # A step-wise decoder (prefill / advance over a DecodeState), so `serve` can batch it too: the
    # server joins rows by their caches, so the prompts are prefilled even if nothing reads it.
    def prefill(self, state):
        call = state.call
        _, state.cache = call.context.prefill(call.input_ids, call.valid, logits="none")
        state.carry["last"] = call.input_ids[:, -1:]

    def advance(self, state, drafted):
        # No network forward, so none is counted (a counted forward owes a step callback a call).
        state.commit(state.carry["last"].repeat(1, self.times))
        state.drop_finished()


register_decoder("repeat", RepeatLast)


class GateOnly(TimeConditioning):
    """A per-layer gate from t, its parameters under their own names (proj, gates)."""

    def __init__(self, hidden_size, num_layers, *, width: int = 8):
        super().__init__(hidden_size, num_layers)
        self.width = width
        self.proj = nn.Linear(width, hidden_size)
        self.gates = nn.Parameter(torch.randn(num_layers, hidden_size) * 0.1)

    def init_args(self):
        return {"width": self.width}

    def forward(self, t):
        if t.dim() == 0:
            t = t[None]
        e = self.proj(sinusoidal_features(t, self.width).to(self.proj.weight.dtype))[..., None, :]
        zero = torch.zeros_like(e)
        return [(zero, zero + 1, 1 + e * g) for g in self.gates]
'''


def write_package(root: Path) -> Path:
    """`MYPKG` as root/mypkg/__init__.py; returns root (the folder to put on the path)."""
    (root / "mypkg").mkdir(parents=True, exist_ok=True)
    (root / "mypkg" / "__init__.py").write_text(MYPKG)
    return root


def write_backbone(path: Path) -> Path:
    """A tiny random Llama backbone (byte vocabulary) whose config.json says model_type "myllama"."""
    save_tiny_llama(path, seed=10, vocab_size=260)
    raw = json.loads((path / "config.json").read_text())
    raw.update(model_type="myllama", tokenizer="byte")
    (path / "config.json").write_text(json.dumps(raw))
    return path


def env_with(*paths: Path) -> dict:
    """os.environ with the worktree, then `paths`, first on PYTHONPATH."""
    parts = [str(ROOT), *map(str, paths), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in parts if p), "OMP_NUM_THREADS": "1"}


def cli(env: dict, *args, ok: bool = True) -> subprocess.CompletedProcess:
    """`python -m twotower.cli ARGS` in the repository root; asserts success unless ok=False."""
    proc = subprocess.run([sys.executable, "-m", "twotower.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's package, a "myllama" backbone and its two-tower conversion (`convert --plugins mypkg`)."""
    root = tmp_path_factory.mktemp("plugins")
    pkg = write_package(root / "site")
    backbone = write_backbone(root / "ar")
    env = env_with(pkg)
    cli(env, "convert", "--plugins", "mypkg", backbone, root / "tt", "--block-size", "4")
    return {"root": root, "pkg": pkg, "backbone": backbone, "tt": root / "tt", "env": env}


@pytest.fixture
def imported_user_package(user, monkeypatch):
    """`mypkg` imported in this process; the family registry and sys.modules are restored afterwards."""
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    monkeypatch.syspath_prepend(str(user["pkg"]))
    yield __import__("mypkg")
    sys.modules.pop("mypkg", None)


def test_the_users_package_passes_the_contract_checks(imported_user_package):
    """What the plug-in's author runs in their own tests (`twotower.testing`): the family against
    transformers' Llama, the decoder through `generate` and the server's working batch, and the time
    conditioning through save / load."""
    from twotower.testing import check_decoder, check_family, check_time_conditioning

    check_family("myllama")
    check_decoder(imported_user_package.RepeatLast())
    check_decoder(imported_user_package.RepeatLast(times=3))
    check_time_conditioning({"class_path": "mypkg.GateOnly", "init_args": {"width": 6}})


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def f(x):", "abc")))
    return path


def _predict_args(model, prompts, out, *extra):
    return ["predict", "--config", "recipes/generate.yaml", "--model.init_args.model", model,
            "--data.init_args.prompts", prompts, "--model.init_args.max_new_tokens", "6",
            "--model.init_args.stop_at_eos", "false", "--trainer.callbacks.init_args.output", out,
            "--trainer.enable_progress_bar", "false", *extra]


# ---- --plugins through the CLI ---------------------------------------------------------------------


def test_predict_needs_the_plugin_and_works_with_it(user, tmp_path):
    prompts, out = _prompts(tmp_path), tmp_path / "pred.jsonl"
    # Without the plug-in the model_type is unknown: the error names it and the registry.
    bad = cli(user["env"], *_predict_args(user["tt"], prompts, out), ok=False)
    assert bad.returncode != 0 and "myllama" in bad.stderr and "register_family" in bad.stderr
    # With it, before or after the subcommand; the decoder class from the same package.
    cli(user["env"], "--plugins", "mypkg", *_predict_args(user["tt"], prompts, out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["generated_tokens"] for r in rows] == [6, 6]
    out2 = tmp_path / "pred2.jsonl"
    cli(user["env"], *_predict_args(user["tt"], prompts, out2, "--plugins=mypkg",
                                    "--model.init_args.decoder", "mypkg.RepeatLast"))
    rows = [json.loads(line) for line in out2.read_text().splitlines()]
    assert [r["completion"] for r in rows] == [":" * 6, "c" * 6] and {r["decoder"] for r in rows} == {"RepeatLast"}


def test_fit_and_export_with_a_plugin_family_and_time_conditioning(user, tmp_path, imported_user_package):
    run = tmp_path / "run"
    (tmp_path / "fit.yaml").write_text(textwrap.dedent(f"""
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 1
          max_steps: 1
          limit_val_batches: 0
          num_sanity_val_steps: 0
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {run}
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: {run / 'ckpt'}, save_last: true}}
        model:
          class_path: twotower.training.DenoiserFineTuning
          init_args:
            backbone: {user['backbone']}
            block_size: 4
            lr: 1.0e-2
            warmup_steps: 0
            time_conditioning: {{class_path: mypkg.GateOnly, init_args: {{width: 6}}}}
        data:
          class_path: twotower.data.TextDataModule
          init_args:
            source: {_corpus(tmp_path)}
            tokenizer: twotower.tokenizers.ByteTokenizer
            seq_len: 16
            block_size: 4
            batch_size: 2
        """))
    cli(user["env"], "fit", "--plugins", "mypkg", "--config", tmp_path / "fit.yaml")
    ckpt_path = run / "ckpt" / "last.ckpt"
    cli(user["env"], "export", "--plugins", "mypkg", ckpt_path, tmp_path / "tt")
    raw = json.loads((tmp_path / "tt" / "config.json").read_text())
    assert raw["model_type"] == "myllama" and raw["time_conditioning"]["class_path"] == "mypkg.GateOnly"
    model = TwoTowerLM.from_pretrained(tmp_path / "tt").eval()
    assert type(model.denoiser).__name__ == "MyDenoiserTower" and type(model.denoiser.time).__name__ == "GateOnly"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    trained = {k.removeprefix("denoiser."): v for k, v in ckpt["state_dict"].items()}
    assert {k for k in trained if k.startswith("time.")} == {"time.proj.weight", "time.proj.bias", "time.gates"}
    for k, v in model.denoiser.state_dict().items():
        assert torch.equal(v, trained[k]), k


def _corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    for i in range(4):
        (root / f"doc{i}.txt").write_text(f"def g{i}(y):\n    return y * {i}\n" * 6)
    return root


def _serve(env: dict, model: Path, *extra):
    """A `serve --plugins mypkg` subprocess on a free port that stops after one request; returns
    (process, base url) once /health answers (fails the test with its output if it never does)."""
    from test_serve import get

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", "--plugins", "mypkg", "--config",
                             "recipes/serve.yaml", "--port", str(port), "--model", str(model), "--max_requests", "1",
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while True:
        try:
            if get(url, "/health")["status"] == "ok":
                return proc, url
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None or time.time() > deadline:  # stop it first: read() waits for its end
            proc.kill()
            pytest.fail(f"the server did not come up: {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.2)


def _serve_one(env: dict, model: Path, body: dict, *extra) -> dict:
    from test_serve import post

    proc, url = _serve(env, model, *extra)
    try:
        status, out = post(url, {"model": "twotower", **body})
        assert status == 200, out
        assert proc.wait(timeout=60) == 0  # max_requests reached: it stops by itself
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_a_plugin_family(user):
    out = _serve_one(user["env"], user["tt"], {"prompt": "hi", "max_tokens": 3, "decoder": "ar"})
    assert out["choices"][0]["finish_reason"] in ("stop", "length")


def test_serve_a_plugin_decoder(user):
    out = _serve_one(user["env"], user["tt"], {"prompt": "hi", "max_tokens": 4}, "--decoder", "repeat")
    assert out["choices"][0]["text"] == "iiii"


def test_bad_plugins_name_the_module_and_the_fix(tmp_path, capsys):
    from twotower.cli import main

    assert main(["export", "--plugins", "no_such_pkg_xyz", "a.ckpt", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'no_such_pkg_xyz'" in err and "PYTHONPATH" in err and "installed" in err
    (tmp_path / "broken_plugin_xyz.py").write_text("raise RuntimeError('boom in the plug-in')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(plugins.PluginError, match=r"'broken_plugin_xyz'.*RuntimeError: boom in the plug-in"):
            plugins.load_plugins(["broken_plugin_xyz"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("broken_plugin_xyz", None)
    for bad in (["--plugins"], ["--plugins", "--config"], ["--plugins=a-b"], ["--plugins", ","]):
        with pytest.raises(plugins.PluginError, match="--plugins"):
            plugins.strip_plugins_option(["predict", *bad])


def test_strip_plugins_option_anywhere_in_order():
    names, rest = plugins.strip_plugins_option(["--plugins", "a,b.c", "predict", "--x", "1", "--plugins=d"])
    assert names == ["a", "b.c", "d"] and rest == ["predict", "--x", "1"]
    assert plugins.strip_plugins_option(["fit", "--config", "f.yaml"]) == ([], ["fit", "--config", "f.yaml"])


def readme_plugin_package() -> str:
    """The package listing of the README's plug-ins section (a ```py block: test_readme runs only the
    ```python ones, in-process, and this one registers a family)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Plug-ins"):]
    return re.search(r"```py\n(.*?)```", section, re.S)[1]


def test_the_readme_plugin_example_runs(tmp_path):
    demo = tmp_path / "plugins_demo"
    (demo / "mypkg").mkdir(parents=True)
    (demo / "mypkg" / "__init__.py").write_text(readme_plugin_package())
    env = env_with(demo)
    cli(env, "convert", "--plugins", "mypkg", write_backbone(tmp_path / "ar"), tmp_path / "my_tt")
    prompts, out = _prompts(tmp_path), tmp_path / "pred.jsonl"
    cli(env, *_predict_args(tmp_path / "my_tt", prompts, out, "--plugins", "mypkg",
                            "--model.init_args.decoder", "mypkg.RepeatLast"))
    assert [json.loads(line)["completion"] for line in out.read_text().splitlines()] == [":" * 6, "c" * 6]


# ---- entry points ----------------------------------------------------------------------------------


def write_distribution(root: Path, name: str, entry_points: str) -> Path:
    """An installed-looking distribution: root/<name>-0.1.dist-info with METADATA and entry_points.txt."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return root


@pytest.fixture
def fresh_entry_points(monkeypatch):
    """No group loaded yet in this process, and a recorder in place of the decoder registry."""
    monkeypatch.setattr(plugins, "_LOADED_GROUPS", set())
    registered = []
    monkeypatch.setattr(plugins, "register_decoder", lambda name, cls: registered.append((name, cls)))
    return registered


def test_entry_points_are_discovered_and_loaded_once(user, tmp_path, monkeypatch, fresh_entry_points):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    (tmp_path / "ep_hello.py").write_text("LOADS = []\nLOADS.append(1)\n")
    write_distribution(tmp_path, "mypkg_plugins", """
        [twotower.families]
        myllama = mypkg:FAMILY
        [twotower.decoders]
        repeat = mypkg:RepeatLast
        [twotower.plugins]
        hello = ep_hello
        """)
    monkeypatch.syspath_prepend(str(user["pkg"]))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        loaded = plugins.load_entry_points()
        assert {"twotower.families:myllama", "twotower.decoders:repeat", "twotower.plugins:hello"} <= set(loaded)
        assert base.family_for("myllama").context.__name__ == "MyContextTower"
        assert [(n, c.__name__) for n, c in fresh_entry_points] == [("repeat", "RepeatLast")]
        assert plugins.load_entry_points() == []  # once per process
        assert sys.modules["ep_hello"].LOADS == [1]
    finally:
        for name in ("mypkg", "ep_hello"):
            sys.modules.pop(name, None)


def test_a_broken_entry_point_is_named(tmp_path, monkeypatch, fresh_entry_points):
    write_distribution(tmp_path, "broken_dist", """
        [twotower.plugins]
        broken = no_such_module_xyz.sub:thing
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(plugins.PluginError, match=r"'broken' = 'no_such_module_xyz.sub:thing'.*broken_dist.*"
                                                   r"ModuleNotFoundError"):
        plugins.load_entry_points(["twotower.plugins"])


def test_the_cli_loads_an_entry_point_family_without_plugins_option(user, tmp_path):
    eps = write_distribution(tmp_path / "eps", "mypkg_plugins", "[twotower.families]\nmyllama = mypkg:FAMILY\n")
    cli(env_with(user["pkg"], eps), "convert", user["backbone"], tmp_path / "tt")
    assert json.loads((tmp_path / "tt" / "config.json").read_text())["model_type"] == "myllama"


# ---- a custom time conditioning through save / load ------------------------------------------------


class OwnNames(TimeConditioning):
    """Test conditioning with its own parameter names (encoder.*, per_layer, bias_table): a shift and
    a gate per layer from t."""

    def __init__(self, hidden_size: int, num_layers: int, *, width: int = 16):
        super().__init__(hidden_size, num_layers)
        self.width = width
        self.encoder = nn.Sequential(nn.Linear(width, hidden_size), nn.Tanh())
        self.per_layer = nn.Parameter(torch.randn(num_layers, hidden_size) * 0.2)
        self.register_buffer("bias_table", torch.linspace(-0.1, 0.1, hidden_size))

    def init_args(self) -> dict:
        return {"width": self.width}

    def forward(self, t):
        t = t[None] if t.dim() == 0 else t
        e = self.encoder(sinusoidal_features(t, self.width).to(self.per_layer.dtype))[..., None, :]
        return [(e * p + self.bias_table, torch.ones_like(e), 1 + e * p) for p in self.per_layer]


OWN = {"class_path": f"{OwnNames.__module__}.OwnNames", "init_args": {"width": 12}}


def _denoiser_outputs(model: TwoTowerLM) -> torch.Tensor:
    ids, _ = left_pad(random_prompts([7], seed=3))
    _, cache = model.context.prefill(ids)
    x = torch.full((1, model.block_size), model.mask_token_id)
    with torch.inference_mode():
        return torch.stack([model.denoiser.forward_block(x, cache, torch.tensor([t])) for t in (0.25, 0.75)])


def _own_names_model() -> TwoTowerLM:
    model = TwoTowerLM.from_backbone(make_context("M*-EM*E", 4), block_size=4, time=OWN).eval()
    with torch.no_grad():
        for p in model.denoiser.time.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_custom_time_conditioning_round_trips_through_save_and_load(tmp_path):
    model = _own_names_model()
    released = model.released_state_dict()
    assert {k for k in released if k.startswith("time.")} == {"time.encoder.0.weight", "time.encoder.0.bias",
                                                               "time.per_layer", "time.bias_table"}
    model.save_pretrained(tmp_path / "tt")
    back = TwoTowerLM.from_pretrained(tmp_path / "tt").eval()
    assert type(back.denoiser.time) is OwnNames and back.denoiser.time.width == 12
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert torch.equal(_denoiser_outputs(model), _denoiser_outputs(back))


def test_bare_names_of_a_custom_time_conditioning_still_load():
    """Exports written before the time namespace stored a custom module's parameters bare (they
    failed to load); they are read under the module's prefix."""
    model = _own_names_model()
    old = {k.removeprefix("time."): v.clone() for k, v in model.released_state_dict().items()}
    with torch.device("meta"):
        back = TwoTowerLM(model.config, block_size=4, time=OWN)
    back.load_released_state_dict(old)
    assert torch.equal(_denoiser_outputs(model), _denoiser_outputs(back.eval()))


def test_adaln_single_keeps_the_released_names_and_the_shipped_checkpoint_loads():
    model = TwoTowerLM.from_pretrained("embedded")
    names = set(model.released_state_dict())
    assert {"t_embedder.mlp.0.weight", "t_block.1.weight", "scale_shift_tables.0"} <= names
    assert not any(k.startswith("time.") for k in names)


# ---- public Lightning APIs only --------------------------------------------------------------------


def test_no_private_lightning_attributes_in_the_package():
    private = re.compile(r"\._trainer\b|\b_device_mesh\b|\b_prepare_subcommand_parser\b")
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted((ROOT / "twotower").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert found == []


def test_predict_links_the_models_tokenizer_into_the_data_and_fit_does_not(twotower_dir, tmp_path, capsys):
    """The behaviour the private _prepare_subcommand_parser override gave: predict's data module gets
    the model's tokenizer (and refuses one of its own); fit's parser has no such link."""
    from twotower.cli import cli_main, main

    prompts, out = _prompts(tmp_path), tmp_path / "pred.jsonl"
    args = [str(a) for a in _predict_args(twotower_dir, prompts, out)]
    cli = cli_main(args)
    assert cli.datamodule.tokenizer is cli.model.tokenizer and len(out.read_text().splitlines()) == 2
    # The link target is computed, so predict's printed config leaves it out; fit's keeps it.
    assert "tokenizer" not in _printed_config(main, [*args, "--data.init_args.tokenizer", BYTE], capsys)["data"]
    fit = ["fit", "--model", "twotower.training.DenoiserFineTuning", "--model.backbone", "somewhere",
           "--data", "twotower.data.TextDataModule", "--data.source", str(tmp_path), "--data.tokenizer", BYTE]
    assert _printed_config(main, fit, capsys)["data"]["init_args"]["tokenizer"]["class_path"] == BYTE


BYTE = "twotower.tokenizers.ByteTokenizer"


def _printed_config(main, args: list[str], capsys) -> dict:
    """`main([*args, "--print_config"])` (which exits 0) -> the printed YAML."""
    import yaml

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*args, "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)

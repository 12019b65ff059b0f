"""LoRA adapter denoisers (`twotower.towers.adapters`): a fresh one computes exactly the full copy's
logits (Llama, and NemotronH with its Mamba projections adapted); it owns only its adapters and time
conditioning and really shares the context tower's weights; speculative decoding with it keeps the AR
output; adapter checkpoints round-trip over a recorded or given backbone; bad arguments and unsupported
set-ups (two devices, int8, a missing backbone) are refused clearly; LoRA fine-tuning through the CLI
trains only the adapters, and its export is an adapter folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import (FAMILY_CONFIGS, MASK, left_pad, random_prompts, randomize_, randomize_time_, save_chat_llama,
                      tiny_llama_config)

from twotower.decoding import Autoregressive, Speculative
from twotower.model import ADAPTER_FILE, TwoTowerLM
from twotower.towers.adapters import (LLAMA_PROJECTIONS, Borrowed, DenoiserBuilder, FullCopy, LoRA, LoRALinear,
                                      builder_from_spec, dense_state_dict, is_adapter)
from twotower.towers.base import ContextTowerBase, family_for
from twotower.towers.llama import LlamaContextTower

# Every projection of every family: NemotronH's Mamba in_proj / out_proj, attention and MLPs; the
# Llama-like families (Llama, Qwen2, Mistral) share Llama's projection names.
ALL_PROJECTIONS = ("in_proj", "out_proj") + LLAMA_PROJECTIONS
TARGETS = {"llama": LLAMA_PROJECTIONS, "qwen2": LLAMA_PROJECTIONS, "mistral": LLAMA_PROJECTIONS,
           "nemotron_h": ALL_PROJECTIONS}
FAMILIES = sorted(FAMILY_CONFIGS)


def family_context(model_type: str, seed: int = 0, **overrides) -> ContextTowerBase:
    """A random tiny context tower (eval mode) of a registered family."""
    return randomize_(family_for(model_type).context(FAMILY_CONFIGS[model_type](**overrides)), seed=seed).eval()


def lora_names(den) -> set[str]:
    """The last path component of every adapted projection of a denoiser."""
    return {n.rsplit(".", 1)[-1] for n, m in den.named_modules() if isinstance(m, LoRALinear)}


def randomize_lora_(den, seed: int, scale: float = 0.3) -> None:
    """Give every lora_B (zero when fresh) random values, as training would: the update B A is then non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in den.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(scale * torch.randn(m.lora_B.shape, generator=g))


def both_forwards(ctx, den, seed: int = 0, S: int = 4, nB: int = 3):
    """(forward_block logits of a block after a 7-token prompt, forward_train logits of nB blocks), t random."""
    g = torch.Generator().manual_seed(seed)
    vocab = ctx.config.vocab_size
    prompt, block = torch.randint(4, vocab, (2, 7), generator=g), torch.randint(4, vocab, (2, S), generator=g)
    block[:, 1::2] = MASK
    x = torch.randint(4, vocab, (2, S * nB), generator=g)
    noisy = torch.where(torch.rand(x.shape, generator=g) < 0.5, torch.full_like(x, MASK), x)
    t_block, t_train = torch.rand(2, generator=g), torch.rand(2, nB, generator=g)
    with torch.inference_mode():
        _, cache = ctx.prefill(prompt)
        per_block = den.forward_block(block, cache, t_block)
        _, states = ctx.forward_train(x, S)
        train = den.forward_train(noisy, states, t_train)
    return per_block, train


# ---- the contract: a fresh adapter is the full copy -------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fresh_lora_denoiser_gives_exactly_the_full_copys_logits(model_type):
    ctx = family_context(model_type, seed=1)
    full = FullCopy().build(ctx).eval()
    lora = LoRA(rank=4, targets=TARGETS[model_type]).build(ctx).eval()
    names = {n.rsplit(".", 1)[-1] for n, m in ctx.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    assert lora_names(lora) == names  # every projection of the family got an adapter (Mamba's too)
    if model_type == "nemotron_h":
        assert {"in_proj", "out_proj", "q_proj", "up_proj"} <= lora_names(lora)
    got, want = both_forwards(ctx, lora), both_forwards(ctx, full)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # Sanity: the time conditioning is on (t matters to neither only because both start as identity)
    # and a non-zero update changes the output.
    randomize_lora_(lora, seed=2)
    moved = both_forwards(ctx, lora)
    assert not torch.allclose(moved[0], want[0]) and not torch.allclose(moved[1], want[1])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_lora_update_equals_a_full_copy_with_merged_weights(model_type):
    """W x + (alpha / r) B A x: a full copy whose projections hold W + (alpha / r) B A gives the same logits."""
    ctx = family_context(model_type, seed=3)
    lora = LoRA(rank=3, alpha=6.0, targets=TARGETS[model_type]).build(ctx).eval()
    randomize_lora_(lora, seed=4)
    randomize_time_(lora, seed=5)
    full = FullCopy().build(ctx).eval()
    with torch.no_grad():
        full.time.load_state_dict(lora.time.state_dict())
        full.lm_head.weight.copy_(lora.lm_head.weight)  # randomize_time_ sharpened the (shared) head
        merged = 0
        for name, m in lora.named_modules():
            if isinstance(m, LoRALinear):
                assert m.scaling == 2.0
                full.get_submodule(name).weight.add_(m.scaling * m.lora_B @ m.lora_A)
                merged += 1
    assert merged == len([m for m in lora.modules() if isinstance(m, LoRALinear)]) > 0
    for g, w in zip(both_forwards(ctx, lora, seed=6), both_forwards(ctx, full, seed=6)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_dense_state_dict_is_the_hand_merged_full_copy(model_type):
    """`dense_state_dict` of a trained adapter denoiser loads strictly into a full copy, holds W + (alpha / r) B A
    where the test above merges by hand, and gives the adapters' logits; a full denoiser's is its state dict."""
    ctx = family_context(model_type, seed=7)
    lora = LoRA(rank=3, alpha=6.0, targets=TARGETS[model_type]).build(ctx).eval()
    randomize_lora_(lora, seed=8)
    randomize_time_(lora, seed=9)
    dense = dense_state_dict(lora)
    full = FullCopy().build(ctx).eval()
    assert dense.keys() == full.state_dict().keys()
    full.load_state_dict(dense)  # strict: no key missing or left over
    for name, m in lora.named_modules():
        if isinstance(m, LoRALinear):
            want = m.weight + m.scaling * m.lora_B @ m.lora_A
            torch.testing.assert_close(full.get_submodule(name).weight, want, rtol=0, atol=1e-6)
    assert torch.equal(full.lm_head.weight, lora.lm_head.weight)
    for k, v in lora.time.state_dict().items():
        assert torch.equal(full.time.state_dict()[k], v), k
    for g, w in zip(both_forwards(ctx, lora, seed=10), both_forwards(ctx, full, seed=10)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # Copies, not views: training the full copy must not move the context tower's weights.
    full.lm_head.weight.data.add_(1.0)
    assert not torch.equal(full.lm_head.weight, ctx.lm_head.weight)
    own = dense_state_dict(full)
    assert own.keys() == full.state_dict().keys() and all(torch.equal(own[k], v) for k, v in full.state_dict().items())


def test_a_full_fine_tune_starts_from_an_adapter_export_and_adapters_refuse_a_full_start(chat_llama, tmp_path):
    from twotower.training import DenoiserFineTuning

    model = trained_adapter_model(chat_llama)
    model.save_pretrained(tmp_path / "lora")
    module = DenoiserFineTuning(str(chat_llama), block_size=8, init_from=str(tmp_path / "lora"))
    module.configure_model()
    assert not is_adapter(module.denoiser)
    start = TwoTowerLM.from_pretrained(tmp_path / "lora").eval()
    for g, w in zip(both_forwards(start.context, start.denoiser, seed=11),
                    both_forwards(module.context, module.denoiser.eval(), seed=11)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    full = TwoTowerLM.from_backbone(chat_llama, block_size=8)
    full.save_pretrained(tmp_path / "full")
    adapters = DenoiserFineTuning(str(chat_llama), block_size=8, init_from=str(tmp_path / "full"),
                                  denoiser=LoRA(rank=4, alpha=8))
    with pytest.raises(ValueError, match="holds a full denoiser, but this run trains adapters"):
        adapters.configure_model()


# ---- sharing: owned, borrowed, counted --------------------------------------------------------------


def test_lora_denoiser_owns_only_adapters_and_time_and_the_pair_costs_little():
    # Wide enough for the time conditioning (a 256-frequency embedding + adaLN tables, ~ 256 H + 4 H^2
    # parameters) to be small next to the backbone, as it is at any real size.
    cfg = tiny_llama_config(hidden_size=128, intermediate_size=256, head_dim=32, vocab_size=1024,
                            num_hidden_layers=4)
    ctx = LlamaContextTower(cfg)
    model = TwoTowerLM.from_backbone(ctx, block_size=8, denoiser=LoRA(rank=2))
    den = model.denoiser
    keys = list(den.state_dict())
    assert keys and all(k.startswith("time.") or k.endswith((".lora_A", ".lora_B")) for k in keys), keys
    assert {n for n, _ in den.named_parameters()} == set(keys)  # nothing borrowed is registered
    # The bound, from shapes: the context + r (in + out) per adapted projection + the time modules.
    adapters = [m for m in den.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 7 * cfg.num_hidden_layers
    ctx_count = sum(p.numel() for p in ctx.parameters())
    lora_count = sum(2 * (m.weight.shape[0] + m.weight.shape[1]) for m in adapters)
    time_count = sum(p.numel() for p in den.time.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total == ctx_count + lora_count + time_count
    assert total <= 1.15 * ctx_count, total / ctx_count
    # Borrowed means the very same tensors: no context weight is stored twice.
    ctx_ptrs = {p.data_ptr() for p in ctx.parameters()}
    assert not ctx_ptrs & {p.data_ptr() for p in den.parameters()}
    assert den.lm_head.weight is ctx.lm_head.weight
    assert den.backbone.embed_tokens.weight is ctx.backbone.embed_tokens.weight
    assert adapters[0].weight is ctx.backbone.layers[0].self_attn.q_proj.weight
    assert is_adapter(den) and not is_adapter(FullCopy().build(ctx))
    assert isinstance(den.backbone.norm, Borrowed) and "borrows RMSNorm" in repr(den.backbone.norm)


def _in_place_changes(ctx, model_type: str) -> dict:
    """name -> a function changing one context tensor in place: a borrowed module's (the final norm),
    an adapted projection's base weight and, on NemotronH, a split Mamba mixer's own A_log."""
    b = ctx.backbone
    if model_type != "nemotron_h":  # the Llama-like families
        return {"borrowed norm": lambda: b.norm.weight.add_(0.1),
                "adapted base": lambda: b.layers[0].mlp.down_proj.weight.mul_(2)}
    return {"borrowed norm": lambda: b.norm_f.weight.add_(0.1),
            "adapted base": lambda: b.layers[0].mixer.out_proj.weight.mul_(2),
            "split mixer": lambda: b.layers[0].mixer.A_log.add_(0.5)}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_context_weight_changed_in_place_changes_the_denoiser(model_type):
    ctx = family_context(model_type, seed=7)
    den = LoRA(rank=4, targets=TARGETS[model_type]).build(ctx).eval()
    if model_type == "nemotron_h":  # the mixer's own tensors are the context's, unregistered
        assert den.backbone.layers[0].mixer.A_log is ctx.backbone.layers[0].mixer.A_log
        assert "backbone.layers.0.mixer.A_log" not in den.state_dict()
    for name, change in _in_place_changes(ctx, model_type).items():
        before = both_forwards(ctx, den, seed=8)
        with torch.no_grad():
            change()
        after = both_forwards(ctx, den, seed=8)
        assert not torch.allclose(after[0], before[0]) and not torch.allclose(after[1], before[1]), name
        # ... and the denoiser still equals a full copy of the changed context.
        for g, w in zip(after, both_forwards(ctx, FullCopy().build(ctx).eval(), seed=8)):
            assert torch.equal(g, w), name


def test_moving_the_model_moves_the_borrowed_weights_too():
    """`.to(float64)` converts the context's tensors in place, and the denoiser reads the same objects."""
    ctx = family_context("nemotron_h", seed=9)
    model = TwoTowerLM.from_backbone(ctx, block_size=4, denoiser=LoRA(rank=2, targets=ALL_PROJECTIONS)).eval()
    model.to(torch.float64)
    mixer = model.denoiser.backbone.layers[0].mixer
    assert mixer.A_log.dtype == mixer.in_proj.weight.dtype == mixer.in_proj.lora_A.dtype == torch.float64
    assert model.denoiser.lm_head.weight.dtype == model.denoiser.time.t_block[1].weight.dtype == torch.float64
    full = FullCopy().build(model.context).eval()  # a copy of the float64 context
    for g, w in zip(both_forwards(model.context, model.denoiser, seed=11), both_forwards(model.context, full, seed=11)):
        assert g.dtype == torch.float32 and torch.equal(g, w)


# ---- decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shifted", [False, True])
def test_speculative_with_a_trained_lora_denoiser_equals_greedy_ar(shifted):
    ctx = family_context("llama", seed=12)
    model = TwoTowerLM.from_backbone(ctx, block_size=6, shifted=shifted, denoiser=LoRA(rank=4)).eval()
    randomize_lora_(model.denoiser, seed=13)
    randomize_time_(model.denoiser, seed=14)
    ids, mask = left_pad(random_prompts([4, 9, 6], seed=12))
    ar = model.generate(ids, mask, decoder=Autoregressive(), max_new_tokens=21)
    out = model.generate(ids, mask, decoder=Speculative(block_size=6, draft_steps=1), max_new_tokens=21)
    assert torch.equal(out.new_tokens, ar.new_tokens)
    assert out.num_generated.tolist() == [21, 21, 21]
    assert int(out.nfe.sum()) > 0  # the adapter denoiser drafted


# ---- builders: arguments and specs ------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be an int >= 1"),
    (dict(rank=-2), "rank must be an int >= 1"),
    (dict(rank=2.5), "rank must be an int >= 1"),
    (dict(rank=True), "rank must be an int >= 1"),
    (dict(alpha=0), "alpha must be a number > 0"),
    (dict(targets=[]), "targets must be a non-empty list"),
    (dict(targets="q_proj"), "targets must be a non-empty list"),
    (dict(targets=["q_proj", 3]), "targets must be a non-empty list"),
])
def test_bad_lora_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRA(**kwargs)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_targets_matching_no_projection_name_the_real_ones(model_type):
    ctx = family_context(model_type)
    with pytest.raises(ValueError, match=r"match no linear layer.*q_proj"):
        LoRA(rank=2, targets=["query", "value"]).build(ctx)
    if model_type != "nemotron_h":  # Mamba's names on a Llama-like family
        with pytest.raises(ValueError, match=r"\['in_proj', 'out_proj'\] match no linear layer"):
            LoRA(rank=2, targets=["in_proj", "out_proj"]).build(ctx)


def test_builder_specs_round_trip_and_bad_specs_are_refused():
    lora = LoRA(rank=3, alpha=5, targets=("q_proj", "v_proj"))
    spec = json.loads(json.dumps(lora.spec()))  # what config.json and checkpoints hold
    assert spec == {"class_path": "twotower.towers.adapters.LoRA",
                    "init_args": {"rank": 3, "alpha": 5.0, "targets": ["q_proj", "v_proj"]}}
    again = builder_from_spec(spec)
    assert isinstance(again, LoRA) and again.init_args() == lora.init_args()
    assert repr(again) == "LoRA(rank=3, alpha=5.0, targets=['q_proj', 'v_proj'])"
    assert isinstance(builder_from_spec(None), FullCopy) and builder_from_spec(lora) is lora
    assert isinstance(builder_from_spec(FullCopy().spec()), FullCopy)
    with pytest.raises(ValueError, match="cannot be imported"):
        builder_from_spec({"class_path": "twotower.towers.adapters.NoSuchBuilder"})
    with pytest.raises(ValueError, match="is not a twotower.towers.adapters.DenoiserBuilder"):
        builder_from_spec({"class_path": "torch.nn.Linear"})
    with pytest.raises(ValueError, match="rank must be"):
        builder_from_spec({"class_path": "twotower.towers.adapters.LoRA", "init_args": {"rank": 0}})
    assert issubclass(LoRA, DenoiserBuilder)


def test_adapters_refuse_two_devices_and_int8():
    from twotower.quantization import quantize_model

    ctx = family_context("llama")
    with pytest.raises(ValueError, match="borrows the context tower's weights.*FullCopy"):
        TwoTowerLM.from_backbone(ctx, denoiser=LoRA(rank=2), denoiser_device="meta")
    model = TwoTowerLM.from_backbone(ctx, block_size=4, denoiser=LoRA(rank=2))
    with pytest.raises(ValueError, match="must share one device"):
        model.place_towers_on_devices("cpu", "meta")
    model.place_towers_on_devices("cpu", "cpu")  # one device is fine
    with pytest.raises(ValueError, match="int8 would replace the weights it borrows"):
        quantize_model(model, "int8")
    assert model.quantization is None  # refused before anything was swapped
    assert isinstance(model.context.backbone.layers[0].self_attn.q_proj, torch.nn.Linear)


# ---- adapter checkpoints ----------------------------------------------------------------------------


@pytest.fixture
def chat_llama(tmp_path):
    """A tiny Llama backbone folder with an HF tokenizer (`conftest.save_chat_llama`)."""
    return save_chat_llama(tmp_path / "backbone", seed=0)


def trained_adapter_model(backbone, **kw) -> TwoTowerLM:
    """A LoRA model over `backbone` whose adapters and time modules look trained (random, non-zero)."""
    model = TwoTowerLM.from_backbone(backbone, block_size=8, denoiser=LoRA(rank=4, alpha=8), **kw).eval()
    randomize_lora_(model.denoiser, seed=20)
    randomize_(model.denoiser.time, seed=21, scale=0.05)
    return model


def assert_same_denoiser(a: TwoTowerLM, b: TwoTowerLM) -> None:
    """Equal denoiser state dicts and equal logits of both forwards."""
    sa, sb = a.denoiser.state_dict(), b.denoiser.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for g, w in zip(both_forwards(a.context, a.denoiser, seed=22), both_forwards(b.context, b.denoiser, seed=22)):
        assert torch.equal(g, w)


def test_save_pretrained_writes_an_adapter_and_from_pretrained_restores_it(chat_llama, tmp_path):
    from twotower.tokenizers import ByteTokenizer, HFTokenizer

    model = trained_adapter_model(chat_llama)
    assert model.backbone_source == str(chat_llama.resolve())
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == [ADAPTER_FILE, "config.json"]  # no context weights, no denoiser copy
    raw = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert raw["backbone"] == str(chat_llama.resolve()) and raw["model_type"] == "llama"
    assert raw["denoiser"] == LoRA(rank=4, alpha=8).spec() and raw["block_size"] == 8
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "adapter" / ADAPTER_FILE)).keys() == model.denoiser.state_dict().keys()
    loaded = TwoTowerLM.from_pretrained(tmp_path / "adapter")
    assert is_adapter(loaded.denoiser) and isinstance(loaded.denoiser_builder, LoRA)
    assert loaded.block_size == 8 and not loaded.shifted
    assert isinstance(loaded.tokenizer, HFTokenizer)  # the backbone's own
    assert_same_denoiser(loaded, model)
    # from_adapter in bfloat16: the adapter weights are cast with the backbone.
    half = TwoTowerLM.from_adapter(tmp_path / "adapter", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    # A tokenizer given explicitly is written beside the adapter and preferred to the backbone's.
    model.save_pretrained(tmp_path / "bytes", tokenizer=ByteTokenizer(model.config.vocab_size))
    assert json.loads((tmp_path / "bytes" / "config.json").read_text())["tokenizer"] == "byte"
    assert isinstance(TwoTowerLM.from_pretrained(tmp_path / "bytes").tokenizer, ByteTokenizer)


def test_from_adapter_over_a_moved_backbone_and_a_missing_one(chat_llama, tmp_path):
    model = trained_adapter_model(chat_llama)
    model.save_pretrained(tmp_path / "adapter")
    moved = tmp_path / "elsewhere"
    shutil.move(chat_llama, moved)
    with pytest.raises(FileNotFoundError, match=r"adapter over the backbone .*backbone.*recorded in .*"
                                                r"config.json.*missing.*pass backbone="):
        TwoTowerLM.from_pretrained(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="given"):
        TwoTowerLM.from_adapter(tmp_path / "adapter", backbone=tmp_path / "nowhere")
    loaded = TwoTowerLM.from_adapter(tmp_path / "adapter", backbone=moved)
    assert loaded.backbone_source == str(moved.resolve())
    assert_same_denoiser(loaded, model)
    # Saved again, it records where the backbone is now.
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["backbone"] == str(moved.resolve())
    assert_same_denoiser(TwoTowerLM.from_pretrained(tmp_path / "again"), model)
    # A backbone of other shapes is refused by name.
    other = save_chat_llama(tmp_path / "wide", seed=1, hidden_size=64, head_dim=16)
    with pytest.raises(ValueError, match=f"{ADAPTER_FILE}"):
        TwoTowerLM.from_adapter(tmp_path / "adapter", backbone=other)


def test_adapter_loading_refusals(chat_llama, tmp_path):
    model = trained_adapter_model(chat_llama)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="adapter over a shared backbone; int8"):
        TwoTowerLM.from_pretrained(tmp_path / "adapter", quantize="int8")
    with pytest.raises(ValueError, match="cannot be built on meta"):
        TwoTowerLM.from_pretrained(tmp_path / "adapter", denoiser_device="meta")
    raw = json.loads((tmp_path / "adapter" / "config.json").read_text())
    del raw["backbone"]
    (tmp_path / "adapter" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match='records no "backbone"; pass backbone='):
        TwoTowerLM.from_pretrained(tmp_path / "adapter")
    assert_same_denoiser(TwoTowerLM.from_adapter(tmp_path / "adapter", backbone=chat_llama), model)
    # Saving needs to know the backbone; a full copy is not an adapter.
    bare = TwoTowerLM.from_backbone(LlamaContextTower.from_pretrained(chat_llama), denoiser=LoRA(rank=2))
    assert bare.backbone_source is None
    with pytest.raises(ValueError, match="pass backbone="):
        bare.save_pretrained(tmp_path / "bare")
    bare.save_adapter(tmp_path / "bare", backbone=str(chat_llama))
    assert TwoTowerLM.from_pretrained(tmp_path / "bare").backbone_source == str(chat_llama.resolve())
    with pytest.raises(ValueError, match="full copy; save it with save_pretrained"):
        TwoTowerLM.from_backbone(chat_llama).save_adapter(tmp_path / "full")


# ---- fine-tuning and export -------------------------------------------------------------------------


def test_lora_fine_tuning_from_yaml_trains_only_the_adapters_and_exports_an_adapter(chat_llama, code_corpus, tmp_path):
    from twotower.cli import cli_main, main

    run = tmp_path / "run"
    (tmp_path / "lora.yaml").write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 3
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
    backbone: {chat_llama}
    block_size: 8
    lr: 1.0e-2
    warmup_steps: 0
    denoiser:
      class_path: twotower.towers.adapters.LoRA
      init_args: {{rank: 4}}
data:
  class_path: twotower.data.TextDataModule
  init_args: {{source: {code_corpus}, seq_len: 32, block_size: 8, batch_size: 4}}
""")
    reference = LlamaContextTower.from_pretrained(chat_llama)
    fresh = LoRA(rank=4).build(reference)
    cli = cli_main(["fit", "--config", str(tmp_path / "lora.yaml")])
    module = cli.model
    assert isinstance(module.builder, LoRA) and module.builder.rank == 4 and cli.trainer.global_step == 3
    # The context tower: frozen and bit-identical; the denoiser: only adapters and time, all of them moved.
    assert all(not p.requires_grad for p in module.context.parameters())
    for k, v in reference.state_dict().items():
        assert torch.equal(module.context.state_dict()[k], v), k
    trained = module.denoiser.state_dict()
    assert trained.keys() == fresh.state_dict().keys()
    assert all(not torch.equal(v, fresh.state_dict()[k]) for k, v in trained.items() if k.endswith("lora_B"))
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in trained.items() if k.startswith("time."))
    # The checkpoint holds the denoiser's own tensors and how it was built.
    ckpt = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert {k.removeprefix("denoiser.") for k in ckpt["state_dict"]} == set(trained)
    # Export through the CLI: an adapter folder over the recorded backbone, with the trained outputs.
    out = tmp_path / "exported"
    assert main(["export", str(run / "ckpt" / "last.ckpt"), str(out)]) == 0
    assert (out / ADAPTER_FILE).is_file() and not list(out.glob("model*.safetensors"))
    assert json.loads((out / "config.json").read_text())["denoiser"] == LoRA(rank=4).spec()
    loaded = TwoTowerLM.from_pretrained(out)
    module.eval()
    for k, v in trained.items():
        assert torch.equal(loaded.denoiser.state_dict()[k], v), k
    for g, w in zip(both_forwards(loaded.context, loaded.denoiser, seed=30),
                    both_forwards(module.context, module.denoiser, seed=30)):
        assert torch.equal(g, w)


def test_lora_fine_tuning_refuses_a_sharded_context(chat_llama):
    from twotower.training import DenoiserFineTuning

    with pytest.raises(ValueError, match="context_sharding='replicate'"):
        DenoiserFineTuning(str(chat_llama), block_size=8, denoiser=LoRA(rank=2), context_sharding="shard")
    DenoiserFineTuning(str(chat_llama), block_size=8, denoiser=FullCopy(), context_sharding="shard")


# ---- shallow drafts: `skip_layers` --------------------------------------------------------------------

OUTPUT_PROJECTIONS = {"o_proj", "down_proj", "out_proj"}  # what writes a layer's sub-blocks into the residual


def zero_layer_outputs_(den, layers) -> None:
    """Zero every output projection of `layers`: each layer then adds nothing to the residual stream, which
    is what skipping it must compute (written without `skip_layers`, through the full-depth forward)."""
    with torch.no_grad():
        for i in layers:
            for name, p in den.backbone.layers[i].named_parameters():
                if OUTPUT_PROJECTIONS & set(name.split(".")):
                    p.zero_()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_skipped_layer_computes_what_a_layer_adding_nothing_does(model_type):
    ctx = family_context(model_type, seed=3)
    skip = [1] if model_type != "nemotron_h" else [0, 3, 5]  # NemotronH: a Mamba, a MoE and an attention layer
    den = FullCopy(skip_layers=skip).build(ctx).eval()
    randomize_(den, seed=4, scale=0.3)  # the copy's own weights: a skipped layer must not be the context's either
    randomize_time_(den, 5)
    reference = FullCopy().build(ctx).eval()
    reference.load_state_dict(den.state_dict())
    deep = both_forwards(ctx, reference, seed=6)
    zero_layer_outputs_(reference, skip)
    assert reference.skip_layers == frozenset() and den.skip_layers == frozenset(skip)
    for got, want, full in zip(both_forwards(ctx, den, seed=6), both_forwards(ctx, reference, seed=6), deep):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - full).abs().max() > 1e-2  # the skipped layers did matter: the check can fail


def test_skipped_layers_are_frozen_and_get_no_gradient(chat_llama):
    model = TwoTowerLM.from_backbone(chat_llama, block_size=4, denoiser=LoRA(rank=2, skip_layers=[1]))
    den = model.denoiser
    trainable = {n.split(".")[2] for n, p in den.named_parameters() if p.requires_grad and ".layers." in n}
    assert trainable == {"0", "2"}
    x = torch.randint(4, model.config.vocab_size, (2, 8))
    _, states = model.context.forward_train(x, 4)
    den.forward_train(torch.where(x % 2 == 0, MASK, x), states, torch.rand(2, 2)).sum().backward()
    for n, p in den.named_parameters():
        if ".layers." in n:
            assert (p.grad is None) == (".layers.1." in n), n
    den.set_skip_layers([])  # run again: trains again
    assert all(p.requires_grad for p in den.parameters())


def test_skip_layers_round_trip_through_adapter_and_full_checkpoints(chat_llama, tmp_path):
    model = trained_adapter_model(chat_llama)
    model.denoiser.set_skip_layers([2])  # set after the build: the record follows the tower
    model.save_pretrained(tmp_path / "adapter")
    raw = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert raw["denoiser"] == LoRA(rank=4, alpha=8, skip_layers=[2]).spec()
    loaded = TwoTowerLM.from_pretrained(tmp_path / "adapter").eval()
    assert loaded.denoiser.skip_layers == frozenset([2])
    assert_same_denoiser(model, loaded)

    full = TwoTowerLM.from_backbone(chat_llama, block_size=8, denoiser=FullCopy(skip_layers=[0, 2])).eval()
    randomize_time_(full.denoiser, 7)
    full.save_pretrained(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["denoiser"] == FullCopy(skip_layers=[0, 2]).spec()
    again = TwoTowerLM.from_pretrained(tmp_path / "full").eval()
    assert again.denoiser.skip_layers == frozenset([0, 2])
    assert_same_denoiser(full, again)
    full.denoiser.set_skip_layers([])  # a full-depth model writes the file it wrote before the option
    full.save_pretrained(tmp_path / "deep")
    assert "denoiser" not in json.loads((tmp_path / "deep" / "config.json").read_text())


def test_speculative_with_a_shallow_draft_equals_greedy_ar(chat_llama):
    model = trained_adapter_model(chat_llama, shifted=True)
    model.denoiser.set_skip_layers([0, 1])
    ids, mask = left_pad(random_prompts([4, 9, 6], seed=9))
    ar = model.generate(ids, mask, decoder=Autoregressive(), max_new_tokens=20)
    out = model.generate(ids, mask, decoder=Speculative(block_size=8), max_new_tokens=20)
    assert torch.equal(out.new_tokens, ar.new_tokens)
    assert int(out.nfe.sum()) > 0  # the shallow denoiser drafted


@pytest.mark.parametrize("skip, match", [
    ("13", "list of layer indices"), (3, "list of layer indices"), ([1.0], "integer layer indices"),
    ([True], "integer layer indices"), ([-1], r"from 0; got \[-1\]"),
])
def test_bad_skip_layers_are_refused_by_value(skip, match):
    with pytest.raises(ValueError, match=match):
        LoRA(rank=2, skip_layers=skip)
    with pytest.raises(ValueError, match=match):
        FullCopy(skip_layers=skip)


def test_skip_layers_beyond_the_tower_or_of_every_layer_are_refused_at_build():
    ctx = family_context("llama")
    with pytest.raises(ValueError, match=r"below the tower's 3 layers; got \[3\]"):
        FullCopy(skip_layers=[3]).build(ctx)
    den = LoRA(rank=2).build(ctx)
    with pytest.raises(ValueError, match="skips all 3 layers; keep at least one"):
        den.set_skip_layers([0, 1, 2])
    assert den.skip_layers == frozenset()  # refused before anything changed


def test_merge_adapters_makes_no_copies_for_skipped_layers_and_a_shallow_draft_stays_lossless():
    from twotower.towers.llama.layers import Fusable

    ctx = family_context("llama", seed=17)
    model = TwoTowerLM.from_backbone(ctx, block_size=6, shifted=True, denoiser=LoRA(rank=4, skip_layers=[1])).eval()
    randomize_lora_(model.denoiser, seed=18)
    randomize_time_(model.denoiser, seed=19)
    ids, mask = left_pad(random_prompts([4, 9, 6], seed=20))
    want = model.generate(ids, mask, decoder=Autoregressive(), max_new_tokens=15)
    unmerged = model.generate(ids, mask, decoder=Speculative(block_size=6), max_new_tokens=15)
    model.merge_adapters(pack=False)
    layers = model.denoiser.backbone.layers
    for i, has_copies in ((0, True), (1, False), (2, True)):
        assert any(m.fused_nbytes for m in layers[i].modules() if isinstance(m, Fusable)) == has_copies, i
        assert any(m.merged for m in layers[i].modules() if isinstance(m, LoRALinear)) == has_copies, i
    got = model.generate(ids, mask, decoder=Speculative(block_size=6), max_new_tokens=15)
    assert torch.equal(got.new_tokens, want.new_tokens) and torch.equal(unmerged.new_tokens, want.new_tokens)


def test_a_full_checkpoint_naming_a_missing_builder_still_loads_unless_it_is_shallow(chat_llama, tmp_path):
    """config.json's "denoiser" entry is read for a full copy only when it lists skip_layers: a full copy a plug-in
    builder made loads without that package, as before the option; a shallow one needs its builder."""
    model = TwoTowerLM.from_backbone(chat_llama, block_size=8).eval()
    model.save_pretrained(tmp_path / "full")
    config = tmp_path / "full" / "config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "denoiser": {"class_path": "not_installed.Builder", "init_args": {}}}))
    assert TwoTowerLM.from_pretrained(tmp_path / "full").denoiser.skip_layers == frozenset()
    config.write_text(json.dumps({**raw, "denoiser": {"class_path": "not_installed.Builder",
                                                       "init_args": {"skip_layers": [1]}}}))
    with pytest.raises(ValueError, match="'not_installed.Builder' cannot be imported"):
        TwoTowerLM.from_pretrained(tmp_path / "full")

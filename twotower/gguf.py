"""Import a GGUF file (llama.cpp's format) as a backbone folder the tower families load.

    python -m twotower.cli import-gguf model.gguf OUT_DIR [--dtype float32|bfloat16]

transformers reads the file: it dequantizes the weights (undoing llama.cpp's Q/K row permutation)
and rebuilds the HF tokenizer, chat template included, from the metadata. The folder written here
is a plain transformers checkpoint (config.json without the GGUF `quantization_config`,
model.safetensors, tokenizer files, chat_template.jinja), so `ContextTowerBase.from_pretrained`
and `TwoTowerLM.from_backbone` load it like any other. Needs the `[gguf]` extra (the `gguf`
reader, and `accelerate`, which transformers' GGUF loading requires).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from pathlib import Path

import torch

from .towers.registry import registered_families
from .validation import parse_dtype

__all__ = ["import_gguf", "supported_architectures"]

GGUF_MAGIC = b"GGUF"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what an import may write
EXTRA_PACKAGES = ("gguf", "accelerate")


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Write the model in the GGUF file `gguf_path` to `out_dir` as a backbone folder; returns its path.

    dtype: "float32" or "bfloat16", the weights' dtype on disk (quantized blocks are dequantized
    to it). `out_dir` must not exist yet (an empty folder is fine). It appears complete or not at
    all: everything is written to a hidden sibling folder that is renamed at the end.
    """
    path = check_gguf_file(gguf_path)
    torch_dtype = parse_dtype("dtype", dtype, DTYPES, purpose=" for a GGUF import")
    require_extra()
    check_architecture(path)
    out = check_out_dir(out_dir)
    staging = staging_dir(out)
    try:
        write_backbone(path, staging, torch_dtype)
        publish(staging, out)
    except BaseException:  # KeyboardInterrupt too: no half folder is left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# ---- checks, cheapest first --------------------------------------------------------------------


def check_gguf_file(gguf_path: str | os.PathLike) -> Path:
    """The path of an existing GGUF file, judged by its 4-byte magic before anything reads it."""
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist (or is not a file); "
                                "pass the path of a .gguf file")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{str(gguf_path)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                         "pass a .gguf file as llama.cpp writes it (a safetensors folder is already a backbone)")
    return path


def require_extra() -> None:
    """Refuse early, naming the extra, when a package transformers needs for GGUF is missing."""
    missing = [name for name in EXTRA_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"importing a GGUF file needs {missing} (not installed); "
                          'install them with pip install "twotower[gguf]"')


def supported_architectures() -> list[str]:
    """GGUF architectures `import_gguf` takes: the ones transformers reads from a GGUF whose
    model_type has a registered tower family (today ["llama", "mistral", "qwen2"])."""
    # Deferred, as every transformers / gguf import here: transformers' GGUF reading is heavy and needs
    # the [gguf] extra, which only an import uses.
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(registered_families()) & set(GGUF_SUPPORTED_ARCHITECTURES))


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file (metadata only; the tensors are memory-mapped, not read)."""
    from gguf import GGUFReader  # the [gguf] extra (see supported_architectures)

    field = GGUFReader(path).fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path} has no general.architecture in its metadata, so it holds no model; "
                         "pass a model's GGUF (llama.cpp writes the key into every one)")
    return bytes(field.parts[field.data[0]]).decode("utf-8")  # the string's bytes, as transformers reads them


def check_architecture(path: Path) -> str:
    """The file's architecture, refused before any tensor is loaded unless a tower family takes it."""
    architecture = gguf_architecture(path)
    supported = supported_architectures()
    if architecture not in supported:
        raise ValueError(f"{path} holds a {architecture!r} model (general.architecture); import_gguf supports "
                         f"{supported}: pass a GGUF of one of those, or register a tower family for "
                         f"{architecture!r} (twotower.towers.base.register_family)")
    return architecture


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The output folder, which must not hold anything yet (its parent is created)."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {str(out_dir)!r} already exists and is not an empty folder; "
                              "remove it or pass another OUT_DIR")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


# ---- loading and writing -----------------------------------------------------------------------


def write_backbone(path: Path, folder: Path, dtype: torch.dtype) -> None:
    """Load the GGUF with transformers (dequantized, in `dtype`) and save it to `folder` as a plain
    checkpoint: model.safetensors, config.json, tokenizer files and chat template."""
    from transformers import AutoTokenizer  # heavy; see supported_architectures

    model = load_dense_model(path, dtype)
    model.save_pretrained(folder)  # safetensors
    # The chat template is GGUF metadata (tokenizer.chat_template); save_pretrained writes it out.
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(folder)


def load_dense_model(path: Path, dtype: torch.dtype):
    """transformers' model of the GGUF, every weight dequantized, turned into a plain model that
    `save_pretrained` writes as an ordinary checkpoint; refused unless a tower family takes it."""
    from transformers import AutoModelForCausalLM  # heavy; see supported_architectures

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 **dequantize_kwargs())
    check_model_type(model.config.model_type, path)
    # The GGUF "quantizer" only describes where the weights came from; with it transformers refuses
    # to save (GGUF is not serializable) and the saved config would ask to load a GGUF again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def dequantize_kwargs() -> dict:
    """`from_pretrained` arguments asking for every GGUF weight unpacked: newer transformers can keep
    blocks packed in GGUF modules, which a safetensors checkpoint cannot hold."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: GGUF weights are always dequantized
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def check_model_type(model_type: str, path: Path) -> None:
    """Refuse a model transformers read as a type no tower family takes (a "llama" GGUF whose
    general.name says Mistral is loaded as model_type "mistral", for one)."""
    if model_type not in registered_families():
        raise ValueError(f"{path}: transformers reads this GGUF as model_type {model_type!r}, which no tower family "
                         f"takes (registered: {sorted(registered_families())}); register a family for it "
                         "(twotower.towers.base.register_family)")


def staging_dir(out: Path) -> Path:
    """A new hidden sibling of `out` to write into: same file system, so the final rename is
    atomic, and a name no loader takes for the finished folder if the import dies half way."""
    staging = out.parent / f".{out.name}.importing-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


def publish(staging: Path, out: Path) -> None:
    """Move the finished folder into place in one rename (an empty `out` is replaced)."""
    if out.is_dir():
        out.rmdir()  # empty (checked before the import); rename cannot replace a folder on every OS
    staging.rename(out)

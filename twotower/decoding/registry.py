"""One registry of decoders, by short name: what `predict`, `serve` and `eval` resolve a decoder name with.

    from twotower.decoding import register_decoder, build_decoder
    register_decoder("greedy_twice", GreedyTwice, aliases=("g2",))
    build_decoder("g2", temperature=0.0)            # -> GreedyTwice(temperature=0.0)
    build_decoder("my_pkg.decoders.GreedyTwice")    # a class_path needs no registration

A name is a registered name or alias, or the `module.Class` path of a `Decoder` subclass (imported
on demand). The built-in decoders are registered below. An unknown name is refused with the list
of registered names and how to register one.

`build_decoder(name, **settings)` builds the decoder from flat settings: `threshold` becomes the
decoder's `sampler=ConfidenceThreshold(threshold)`, and a setting the decoder's constructor does not
take is refused (`strict=True`, what `eval` wants: the user named it) or left out (`strict=False`,
what `serve` wants: every request carries every setting, each decoder takes its own). The
sampling settings (`temperature`, `top_k`, `top_p`) are always passed only to decoders that take
them: a request or task may set them for any decoder.
"""

from __future__ import annotations

import importlib
import inspect

from ..samplers import ConfidenceThreshold
from .autoregressive import Autoregressive
from .base import Decoder
from .diffusion import MaskDiffusion
from .mock_ar import MockAR
from .speculative import Speculative
from .tolerant import TolerantSpeculative
from .two_branch import TwoBranchSpeculative

__all__ = ["register_decoder", "decoder_class", "build_decoder", "registered_decoders"]

_BY_NAME: dict[str, type[Decoder]] = {}  # every name and alias -> its class
_NAMES: dict[str, tuple[str, ...]] = {}  # the registered name -> its aliases


def register_decoder(name: str, cls: type[Decoder], *, aliases=()) -> type[Decoder]:
    """Make `cls` available as `name` (and each of `aliases`) wherever a decoder is named by string.

    Registering a name again for the same class (or a redefinition of it: same module and name, e.g. a
    notebook cell run twice) replaces it; for another class it is refused: pick another name.
    Returns `cls`."""
    if not (isinstance(cls, type) and issubclass(cls, Decoder)):
        raise TypeError(f"register_decoder({name!r}, ...) needs a twotower.decoding.Decoder subclass, got {cls!r}")
    names = (name, *aliases)
    for n in names:
        if not isinstance(n, str) or not n or "." in n:
            raise ValueError(f"decoder name {n!r} must be a non-empty string without '.' (dots mean a class_path)")
        if not _same_class(_BY_NAME.get(n, cls), cls):
            raise ValueError(f"decoder name {n!r} is already registered for {_BY_NAME[n].__qualname__}; "
                             f"choose another name for {cls.__qualname__}")
    for n in names:
        _BY_NAME[n] = cls
    _NAMES[name] = tuple(sorted(set(_NAMES.get(name, ())) | set(aliases)))
    return cls


def _same_class(a: type, b: type) -> bool:
    # By name too: re-running a cell or reloading a module makes a new class object for the same decoder.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def registered_decoders() -> dict[str, type[Decoder]]:
    """Every registered name and alias -> its class."""
    return dict(_BY_NAME)


def decoder_class(name: str) -> type[Decoder]:
    """A registered name / alias, or a `module.Class` path, -> the Decoder subclass."""
    if isinstance(name, str) and name in _BY_NAME:
        return _BY_NAME[name]
    module, _, attr = str(name).rpartition(".")
    cls = None
    if module:
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, Decoder)):
        raise ValueError(f"unknown decoder {name!r}: use one of {sorted(_BY_NAME)} or the class_path of a "
                         "twotower.decoding.Decoder subclass (e.g. twotower.decoding.Speculative); to add a name, "
                         "call twotower.decoding.register_decoder('my_name', MyDecoder)")
    return cls


_SAMPLING = frozenset({"temperature", "top_k", "top_p"})


def build_decoder(name: str, *, strict: bool = True, threshold: float | None = None, **settings) -> Decoder:
    """The decoder `name` built from flat settings (None values are left out)."""
    cls = decoder_class(name)
    params = inspect.signature(cls.__init__).parameters
    # None means "not set" in flat settings (CLI flags, lm_eval model_args): the class default applies.
    kwargs = {k: v for k, v in settings.items() if v is not None}
    if threshold is not None:
        if "sampler" in params:
            kwargs["sampler"] = ConfidenceThreshold(float(threshold))
        elif strict:
            raise ValueError(f"decoder {cls.__name__} takes no threshold (it has no sampler)")
    # Sampling settings a decoder does not take are dropped below, not refused: one shared flag
    # (e.g. temperature) then works with every decoder, a plug-in without sampling included.
    unknown = sorted(k for k in kwargs if k not in params and k not in _SAMPLING)
    if unknown and strict:
        raise ValueError(f"decoder {cls.__name__} takes no setting(s) {unknown}; it takes "
                         f"{sorted(p for p in params if p != 'self')}")
    return cls(**{k: v for k, v in kwargs.items() if k in params})


register_decoder("speculative", Speculative)
register_decoder("diffusion", MaskDiffusion, aliases=("mask_diffusion",))
register_decoder("ar", Autoregressive, aliases=("autoregressive",))
register_decoder("mock_ar", MockAR)
register_decoder("tolerant", TolerantSpeculative, aliases=("tolerant_speculative",))
register_decoder("two_branch", TwoBranchSpeculative, aliases=("two_branch_speculative",))

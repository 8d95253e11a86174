"""Loading HF checkpoints (local folders or hub names) and writing folders atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from rlhf_ray.errors import BadInputError

CONFIG_FILE = "config.json"
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")  # torch pickles: loading one may run code
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # what from_pretrained prefers


class UnsafeWeightsError(BadInputError):
    """A model folder whose weights exist only as pickles (no safetensors)."""


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"bfloat16"``, ... (or a dtype) -> ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if isinstance(dtype, torch.dtype):
        return dtype
    raise ValueError(f"unknown dtype {name!r}")


def looks_local(path: str) -> bool:
    """Whether ``path`` can only be a local path: hub ids are "name" or "org/name"."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


def check_model_path(path: str | os.PathLike) -> str:
    """Returns ``path`` as a string; raises an error naming it if it cannot be a model folder.

    Names that may be hub ids and do not exist locally pass through to transformers. A folder
    whose weights are only pickles (``pytorch_model.bin``) is refused: safetensors only.
    """
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            raise FileNotFoundError(f"{path!r} is not a model folder: it has no {CONFIG_FILE}")
        names = os.listdir(path)
        pickles = sorted(n for n in names if n.endswith(PICKLE_WEIGHTS))
        # What transformers loads first; another *.safetensors beside a pickle would not be read.
        if pickles and not any(n in SAFE_WEIGHTS for n in names):
            raise UnsafeWeightsError(
                f"model folder {path!r} has weights only as pickles ({', '.join(pickles)}), which can run code "
                f"when loaded; convert them to safetensors (transformers: save_pretrained(..., "
                f"safe_serialization=True)) and remove the pickles")
    elif os.path.exists(path):
        raise NotADirectoryError(f"model path {path!r} is a file, expected a model folder")
    elif looks_local(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    return path


class DamagedModelError(BadInputError):
    """A model folder with a file that cannot be what its name says (truncated, not JSON, ...)."""


def check_model_folder(path: str | os.PathLike) -> str:
    """``check_model_path``, then the folder's JSON files parse and its safetensors headers fit
    their files: a truncated download or a half-written copy is named before a run starts, not
    deep in a worker's traceback. Reads headers only (no tensor data); for the checks of user
    input at a stage's start, while every load calls only the cheap ``check_model_path``."""
    import json

    from safetensors import SafetensorError, safe_open

    path = check_model_path(path)
    if not os.path.isdir(path):
        _check_hub_model(path)
        return path
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name.endswith(".json"):
            try:
                with open(file, encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise DamagedModelError(f"model folder {path!r}: {name} is not valid JSON ({e})") from None
        elif name.endswith(".safetensors"):
            try:
                with safe_open(file, framework="pt") as f:
                    f.keys()
            except (SafetensorError, OSError) as e:
                raise DamagedModelError(f"model folder {path!r}: {name} is not a complete safetensors file "
                                        f"({e}); download or copy it again") from None
    return path


def _check_hub_model(name: str) -> None:
    """A name that is no local folder must be a hub model this machine can get: in the hub cache,
    or served by the hub now. One request without retries, so an offline machine or a misspelt
    name is told in a second instead of a minute into a worker's start."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, CONFIG_FILE), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{name!r} is not a local folder, and the hub cache has no such model "
                                f"(HF_HUB_OFFLINE is set)")
    try:
        get_hf_file_metadata(hf_hub_url(name, CONFIG_FILE), timeout=10)
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors mean the same to the user
        reason = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(f"{name!r} is not a local folder, and the hub cannot serve it "
                                f"({type(e).__name__}: {reason}); check the name, the network and "
                                f"HF_TOKEN, or give a local folder") from None


def _from_pretrained(loader, path: str | os.PathLike, **kwargs):
    path = check_model_path(path)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as e:  # hub misses and unreadable folders: say which path failed
        raise OSError(f"could not load {path!r}: {e}") from e


def load_causal_lm(path: str | os.PathLike, dtype: str | torch.dtype = "float32",
                   trust_remote_code: bool = False):
    """An ``AutoModelForCausalLM`` from an HF folder or hub name."""
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, path, dtype=resolve_dtype(dtype),
                            trust_remote_code=trust_remote_code)


def load_backbone(path: str | os.PathLike, dtype: str | torch.dtype = "float32",
                  trust_remote_code: bool = False):
    """The base model (``AutoModel``, no LM head) of a causal LM checkpoint."""
    from transformers import AutoModel

    return _from_pretrained(AutoModel, path, dtype=resolve_dtype(dtype),
                            trust_remote_code=trust_remote_code)


def load_sequence_classifier(path: str | os.PathLike, dtype: str | torch.dtype = "float32",
                             trust_remote_code: bool = False):
    """An ``AutoModelForSequenceClassification`` (a reward model's standard format)."""
    from transformers import AutoModelForSequenceClassification

    return _from_pretrained(AutoModelForSequenceClassification, path, dtype=resolve_dtype(dtype),
                            trust_remote_code=trust_remote_code)


def load_config(path: str | os.PathLike, trust_remote_code: bool = False):
    """The ``AutoConfig`` of an HF folder or hub name (config.json alone: no weights read)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, path, trust_remote_code=trust_remote_code)


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether a model folder holds a tokenizer (every ``save_pretrained`` of one writes
    tokenizer_config.json); a hub name is assumed to."""
    path = os.path.expanduser(str(path))
    return not os.path.isdir(path) or os.path.isfile(os.path.join(path, "tokenizer_config.json"))


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """Tokenizer with a pad token (eos if it has none) that pads on the left, for generation."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling path to write a folder into; on success it replaces ``out_dir``.

    Readers never see a half-written folder; a crash leaves the old folder (if any) intact.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # os.replace cannot overwrite a non-empty folder: move the old one aside first.
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

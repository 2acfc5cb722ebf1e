"""Calibrated bases for SLICER ECSQ: fitted from split-layer rows and log-likelihood gradients, named by digest,
shipped beside the config, held by both sides; a packet coded in one decodes only where the same basis is held."""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from slicer_hf import ProtocolError, SlicerConfig, SlicerModelForCausalLM, build_codec, protocol
from slicer_hf.cli import app
from slicer_hf.codec import basis as basis_module
from slicer_hf.codec.basis import Basis, basis_file, load_bases, lookup
from slicer_hf.config import PRESETS_DIR
from slicer_hf.errors import CodecError, ConfigError
from slicer_hf.link import open_request
from slicer_hf.server import SplitServer
from slicer_hf.tuning.calibrate import collect, fit_basis

D = 32


def synthetic(n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows on a few strong directions plus noise, one massive channel; gradients from an anisotropic metric."""
    mix = torch.randn(4, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # one source
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, 4, generator=gen, dtype=torch.float64) @ mix * 3 + 0.3 * torch.randn(
        n, D, generator=gen, dtype=torch.float64
    )
    scale = rows.pow(2).mean(1).sqrt()
    rows[:, 5] = 20 * scale * (1 + 0.02 * torch.randn(n, generator=gen, dtype=torch.float64))  # a massive channel
    sens = torch.linspace(0.2, 3.0, D, dtype=torch.float64)
    grads = torch.randn(n, D, generator=gen, dtype=torch.float64) * sens
    return rows, grads


@pytest.fixture(scope="module")
def fitted() -> Basis:
    return fit_basis(*synthetic(), metadata={"model": "synthetic"})


def codec(basis: Basis | None, step: float = 0.3):
    if basis is None:
        return build_codec("slicer", quantizer="ecsq", step=step, outliers=2)
    return build_codec("slicer", quantizer="ecsq", step=step, outliers=0, rotation="calibrated", basis=basis.digest)


def test_the_basis_whitens_the_metric_and_decorrelates_the_rows(fitted):
    rows, grads = synthetic()
    identity = torch.eye(D, dtype=torch.float64)
    assert torch.allclose(fitted.forward.double() @ fitted.inverse.double(), identity, atol=1e-4)
    assert fitted.norm_weight[5] == 0 and fitted.norm_weight.sum() == D - 1  # the massive channel leaves the RMS
    u = rows / fitted.row_rms(rows)[:, None]
    z = (u - fitted.mean.double()) @ fitted.forward.double()
    cov = z.T @ z / len(z)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-3 * cov.diagonal().max()  # uncorrelated
    assert (cov.diagonal()[:-1] >= cov.diagonal()[1:] - 1e-9).all()  # widest first
    # squared error in the coordinates is proportional to the Fisher metric of u
    gw = grads * fitted.row_rms(rows)[:, None]
    fisher = gw.T @ gw / len(gw)
    metric = fitted.forward.double() @ fitted.forward.double().T
    assert torch.allclose(metric / metric.trace(), fisher / fisher.trace(), atol=1e-4)


def test_calibrated_coding_spends_fewer_bits_for_less_weighted_error(fitted):
    rows, grads = synthetic(800, seed=1)  # held-out rows of the same source
    sens = torch.linspace(0.2, 3.0, D, dtype=torch.float64)

    def cost(c) -> tuple[float, float]:
        packets = [c.encode(r.float().reshape(1, 1, D)) for r in rows]
        out = torch.cat([c.decode(p).reshape(1, D).double() for p in packets])
        return sum(map(len, packets)) * 8 / len(rows), float(((out - rows) * sens).pow(2).sum(1).mean())

    bits_rot, err_rot = cost(codec(None, 0.3))
    calibrated = [cost(codec(fitted, step)) for step in (0.3, 0.6, 1.0, 1.5, 2.0)]
    # some step of the calibrated basis beats the seeded rotation on both counts, by a margin
    assert any(bits < 0.8 * bits_rot and err < 0.8 * err_rot for bits, err in calibrated)


def test_decoding_is_deterministic_and_the_step_travels_in_the_packet(fitted):
    x = synthetic(8, seed=2)[0].float().reshape(2, 4, D)
    packet = codec(fitted, 0.5).encode(x)
    assert torch.equal(codec(fitted, 0.5).decode(packet), codec(fitted, 0.1).decode(packet))
    assert codec(fitted, 0.5).encode(x) == packet


def test_a_calibrated_packet_needs_the_same_basis_on_the_other_side(fitted):
    x = synthetic(4, seed=3)[0].float().reshape(1, 4, D)
    packet = codec(fitted).encode(x)
    with pytest.raises(CodecError, match="calibrated basis .* holds none"):
        codec(None).decode(packet)
    other = fit_basis(*synthetic(seed=9))
    with pytest.raises(CodecError, match="width"):
        build_codec("slicer", quantizer="ecsq", rotation="calibrated", basis=other.digest, outliers=0).encode(
            torch.randn(1, 1, D + 1)
        )
    with pytest.raises(CodecError, match="unknown SLICER basis 'deadbeefdeadbeef'"):
        build_codec("slicer", quantizer="ecsq", rotation="calibrated", basis="deadbeefdeadbeef")


def assert_malformed_packets_raise_codec_errors_only(c, packet: bytes, shape: tuple[int, ...]) -> None:
    """Every truncation of `packet` and 200 single bit flips: a `CodecError`, or rows of the claimed shape."""
    gen = torch.Generator().manual_seed(0)
    for cut in range(len(packet)):
        with pytest.raises(CodecError):
            c.decode(packet[:cut])
    for _ in range(200):
        bad = bytearray(packet)
        i = int(torch.randint(0, len(bad), (1,), generator=gen))
        bad[i] ^= 1 << int(torch.randint(0, 8, (1,), generator=gen))
        try:
            out = c.decode(bytes(bad))
        except CodecError:
            continue
        assert out.shape == shape  # a flip that still decodes gives rows of the claimed shape


def test_malformed_calibrated_packets_raise_codec_errors_only(fitted):
    c = codec(fitted)
    packet = c.encode(synthetic(4, seed=4)[0].float().reshape(1, 4, D))
    assert_malformed_packets_raise_codec_errors_only(c, packet, (1, 4, D))


def test_config_validation_names_what_goes_with_a_calibrated_basis(fitted):
    with pytest.raises(ConfigError, match="calibrated"):
        SlicerConfig(rotation="calibrated")  # no basis
    with pytest.raises(ConfigError, match="calibrated"):
        SlicerConfig(rotation="calibrated", basis=fitted.digest)  # the blocks quantizer
    with pytest.raises(ConfigError, match="downlink_step"):
        SlicerConfig(downlink_basis=fitted.digest)
    config = SlicerConfig(quantizer="ecsq", rotation="calibrated", basis=fitted.digest, outliers=0)
    assert build_codec(config).spec()["basis"] == fitted.digest
    assert "basis" not in build_codec(SlicerConfig(quantizer="ecsq")).spec()  # other specs are unchanged
    down = config.replace(downlink_step=0.1).downlink_codec()
    assert down.spec()["rotation"] == "orthogonal"  # the uplink's basis is not the last layer's


def test_a_basis_fitted_again_to_the_same_tensors_carries_its_latest_provenance(tmp_path):
    first = fit_basis(*synthetic(), metadata={"text": "first.txt"})
    again = fit_basis(*synthetic(), metadata={"text": "again.txt"})
    assert again.digest == first.digest and lookup(first.digest).metadata["text"] == "again.txt"
    SlicerConfig(quantizer="ecsq", rotation="calibrated", basis=again.digest, outliers=0).save_pretrained(tmp_path)
    assert Basis.load(tmp_path / basis_file(again.digest)).metadata["text"] == "again.txt"  # what the config says


def test_the_basis_travels_beside_the_config(fitted, tmp_path, monkeypatch):
    config = SlicerConfig(
        quantizer="ecsq",
        rotation="calibrated",
        basis=fitted.digest,
        outliers=0,
        downlink_step=0.1,
        downlink_basis=fitted.digest,
    )
    config.save_pretrained(tmp_path)
    assert (tmp_path / basis_file(fitted.digest)).is_file()
    monkeypatch.setattr(basis_module, "_REGISTRY", basis_module._Registry())  # a fresh process: nothing registered
    with pytest.raises(CodecError, match="unknown SLICER basis"):
        lookup(fitted.digest)
    assert basis_module._REGISTRY.presets_scanned  # once: the next miss does not read the preset files again
    loaded = SlicerConfig.from_pretrained(tmp_path)
    assert loaded == config and lookup(fitted.digest).digest == fitted.digest
    assert build_codec(loaded).decode(build_codec(config).encode(torch.ones(1, 1, D))).shape == (1, 1, D)

    monkeypatch.setattr(basis_module, "_REGISTRY", basis_module._Registry())
    other = fit_basis(*synthetic(seed=5))
    other.save(tmp_path / basis_file(fitted.digest))  # the file no longer holds what the config names
    with pytest.raises(ConfigError, match="does not hold the basis"):
        SlicerConfig.from_pretrained(tmp_path)
    (tmp_path / basis_file(fitted.digest)).unlink()
    with pytest.raises(ConfigError, match="is missing"):
        SlicerConfig.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodecError, match="no slicer_basis_"):
        load_bases([tmp_path / "empty"])


def test_concurrent_lookups_in_a_fresh_process_all_find_the_presets_bases(monkeypatch):
    """Many sessions opening at once (the first lookups of a server) must not see the scan half done."""
    digest = SlicerConfig.from_pretrained(PRESETS_DIR / "smollm2-135m-split24").basis
    monkeypatch.setattr(basis_module, "_REGISTRY", basis_module._Registry())
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda _: lookup(digest).digest, range(16)))
    assert found == [digest] * 16


def test_one_pass_collects_every_split_with_its_whole_gradient():
    model = tiny_model("llama")
    windows = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    both = collect(model, windows, [1, model.config.num_hidden_layers], seed=3)
    alone = collect(model, windows, [1], seed=3)
    assert torch.equal(both[1][0], alone[1][0]) and torch.allclose(both[1][1], alone[1][1])
    rows, grads = both[model.config.num_hidden_layers]
    assert rows.shape == grads.shape == (24, model.config.hidden_size) and grads.abs().sum() > 0
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


def calibrated_config(model) -> SlicerConfig:
    d = model.config.hidden_size
    found = collect(model, torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1)), [2])
    basis = fit_basis(*found[2])
    assert basis.width == d
    return SlicerConfig(split_layer=2, quantizer="ecsq", rotation="calibrated", basis=basis.digest, outliers=0)


def test_a_basis_fitted_at_one_split_warns_when_it_codes_another():
    base = tiny_model("llama").eval()
    found = collect(base, torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1)), [2])
    basis = fit_basis(*found[2], metadata={"split_layer": "2"})
    config = SlicerConfig(split_layer=2, quantizer="ecsq", rotation="calibrated", basis=basis.digest, outliers=0)
    model = SlicerModelForCausalLM.from_model(base, config)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings(), torch.no_grad():  # (with gradients on, a split forward warns of them)
        warnings.simplefilter("error")
        model(ids)  # its own split: silent
    with pytest.warns(UserWarning, match="fitted at split 2 and now codes split 1"), torch.no_grad():
        model(ids, split_layer=1)


def test_a_predicting_downlink_basis_warns_when_the_call_splits_elsewhere():
    """It predicts the reply from the rows at the split it was fitted for; at another split its predictions miss."""
    base = tiny_model("llama").eval()
    last = base.config.num_hidden_layers
    found = collect(base, torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1)), [2, last])
    down = fit_basis(*found[last], metadata={"split_layer": str(last), "given_split_layer": "2"}, given=found[2][0])
    config = SlicerConfig(split_layer=2, codec="identity", downlink_basis=down.digest, downlink_step=0.1)
    model = SlicerModelForCausalLM.from_model(base, config)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        model(ids)  # its own split: silent
    with (
        pytest.warns(
            UserWarning, match="predicts the reply from the hidden states at split 2, and this call splits at 1"
        ),
        torch.no_grad(),
    ):
        model(ids, split_layer=1)


def test_calibrate_refuses_too_few_tokens_before_loading_the_model(tmp_path):
    from live import tiny_smol_dir

    folder = tiny_smol_dir(tmp_path / "m", SlicerConfig(split_layer=2))
    args = ["calibrate", "--model", str(folder), "--text", "missing.txt", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--tokens", "120", "--window", "64"])  # 64 used, 2 x 64 needed
    assert result.exit_code != 0 and "2 x the hidden size = 128 tokens" in str(result.exception)


@pytest.mark.parametrize("split", ["0", "-1", "4"])
def test_calibrate_refuses_a_split_the_model_does_not_have_before_loading_it(tmp_path, split):
    from live import tiny_smol_dir

    folder = tiny_smol_dir(tmp_path / "m", SlicerConfig(split_layer=2))
    args = ["calibrate", "--model", str(folder), "--text", "missing.txt", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--split-layer", split, "--tokens", "256", "--window", "64"])
    assert result.exit_code != 0 and f"in [1, 3] for this model, got {split}" in str(result.exception)


def test_calibrate_refuses_text_too_short_for_a_basis_before_loading_the_model(tmp_path):
    from live import tiny_smol_dir

    folder = tiny_smol_dir(tmp_path / "m", SlicerConfig(split_layer=2))
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here. " * 8)
    args = ["calibrate", "--model", str(folder), "--text", str(text), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--tokens", "512", "--window", "32"])
    assert result.exit_code != 0 and "needs at least 128 tokens in whole windows of 32" in str(result.exception)


def test_a_basis_for_a_codec_with_exact_outliers_is_fitted_on_what_they_leave():
    """The codec sends each row's largest entry exactly and codes the rest: the massive channel (5 in these rows)
    is then nothing to the basis, neither in its mean nor as a channel the RMS leaves out."""
    rows, grads = synthetic(4000)
    plain, with_outlier = fit_basis(rows, grads), fit_basis(rows, grads, outliers=1)
    assert plain.mean[5] > 10 and plain.norm_weight[5] == 0  # the massive channel, as the rows hold it
    assert with_outlier.mean[5] == 0 and with_outlier.norm_weight[5] == 1


def test_calibrate_keeps_the_outliers_of_the_config_it_starts_from_unless_told(tmp_path):
    base = tmp_path / "base"
    SlicerConfig(quantizer="ecsq", outliers=2, split_layer=2).save_pretrained(base)
    _, _, out = calibrate_tiny(tmp_path, "--config", str(base))
    assert SlicerConfig.from_pretrained(out).outliers == 2
    _, _, out = calibrate_tiny(tmp_path / "again", "--config", str(base), "--outliers", "1")
    assert SlicerConfig.from_pretrained(out).outliers == 1
    _, _, out = calibrate_tiny(tmp_path / "plain")
    assert SlicerConfig.from_pretrained(out).outliers == 0  # no config: the massive channels stay in the basis


def test_calibrate_refuses_to_move_a_split_under_a_downlink_basis_that_predicts_from_it(tmp_path):
    folder, text, out = calibrate_tiny(tmp_path, "--downlink")  # its downlink predicts from split 2's rows
    args = ["calibrate", "--model", str(folder), "--config", str(out), "--text", str(text), "--split-layer", "1"]
    result = CliRunner().invoke(app, [*args, "--tokens", "512", "--window", "128", "--out", str(tmp_path / "moved")])
    assert result.exit_code != 0 and "predicts from the rows of split 2, not 1" in str(result.exception)
    moved = tmp_path / "moved"
    result = CliRunner().invoke(app, [*args, "--downlink", "--tokens", "512", "--window", "128", "--out", str(moved)])
    assert result.exit_code == 0, result.output
    assert lookup(SlicerConfig.from_pretrained(moved).downlink_basis).given_width == 64


def test_calibrate_refuses_to_keep_a_downlink_basis_fitted_for_rows_of_another_width(tmp_path):
    """`--config smollm2-135m-split24-both` for a 64-wide model kept the preset's 576-wide downlink basis: the config
    was written, and every session it opened was refused."""
    folder, text, _ = calibrate_tiny(tmp_path / "first")
    args = ["calibrate", "--model", str(folder), "--config", "smollm2-135m-split24-both", "--text", str(text)]
    result = CliRunner().invoke(app, [*args, "--split-layer", "2", "--tokens", "512", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "codes rows of width 576" in str(result.exception)
    assert "this model's are 64 wide" in str(result.exception) and not (tmp_path / "o").exists()


def test_calibrate_refuses_a_config_it_could_not_write_before_loading_the_model(tmp_path, monkeypatch):
    """Impossible combinations, a window of no tokens and an --out that is a file are refused before any work."""
    from live import tiny_smol_dir

    import slicer_hf.tuning.calibrate as calibrate_module

    monkeypatch.setattr(calibrate_module, "collect", lambda *a, **k: pytest.fail("the model ran"))
    folder = tiny_smol_dir(tmp_path / "m", SlicerConfig(split_layer=2))
    base = tmp_path / "base"
    args = ["calibrate", "--model", str(folder), "--split-layer", "2", "--tokens", "512", "--out", str(tmp_path / "o")]
    for config, flags, refusal in [
        (SlicerConfig(outliers=2), ["--predict-previous"], "`predict_previous` goes with"),
        (SlicerConfig(downlink="topk_logits"), ["--downlink"], "`downlink` must be 'hidden' with a downlink_step"),
        (SlicerConfig(), ["--window", "0"], "window must be an integer of at least 2 tokens, got 0"),
        (SlicerConfig(), ["--window", "1024"], "a window of 1024 tokens exceeds the model's 512 positions"),
    ]:
        config.save_pretrained(base)
        result = CliRunner().invoke(app, [*args, "--config", str(base), *flags])
        assert result.exit_code != 0 and refusal in str(result.exception), result.output
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "file")])
    assert result.exit_code == 2 and "Invalid value for --out" in result.output  # the message: "... is a file"


def test_calibrate_splits_where_the_model_would_without_a_split_named(tmp_path, monkeypatch):
    """With no split given or in the config, calibrate fits the basis at the split generate and the server take
    (`SlicerConfig.split_layer_for`): 8 of 10 layers, where 3/4 rounded down would have fitted it at 7."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    import slicer_hf.tuning.calibrate as calibrate_module
    from slicer_hf.data import default_model_path

    class Collected(Exception):
        """Raised where the rows would be collected: the split is what this test is about."""

    width = 32
    config = LlamaConfig(
        hidden_size=width, intermediate_size=48, num_hidden_layers=10, num_attention_heads=4, vocab_size=128
    )
    folder = tmp_path / "m"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.save_pretrained(folder)
    fitted_at = []

    def collecting(model, windows, split_layers, seed=0):
        fitted_at.extend(split_layers)
        raise Collected

    monkeypatch.setattr(calibrate_module, "collect", collecting)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    with pytest.raises(Collected):
        calibrate_module.calibrate(str(folder), SlicerConfig(), text=str(text), tokens=256, window=64)
    assert fitted_at == [SlicerConfig().split_layer_for(10)] == [8]


def test_calibrate_writes_a_slicer_config_for_the_model_it_calibrated(tmp_path):
    """Whatever codec the config started from, and whichever model it was made for, the written config codes with
    the fitted basis and names the model calibrated."""
    base = tmp_path / "base"
    SlicerConfig.from_pretrained("smollm2-135m-split24").replace(codec="fp16", split_layer=2).save_pretrained(base)
    folder, _, out = calibrate_tiny(tmp_path, "--config", str(base))
    written = SlicerConfig.from_pretrained(out)
    assert written.codec == "slicer" and build_codec(written).spec()["basis"] == written.basis
    assert (written.model_id, written.hidden_size, written.num_hidden_layers) == (str(folder), 64, 4)


def test_a_server_refuses_a_session_whose_basis_it_does_not_hold_and_serves_the_rest(monkeypatch):
    model = tiny_model("llama")
    config = calibrated_config(model)
    server = SplitServer(tiny_model("llama"))
    body = open_request(config, server.model.config, "tiny", 2, build_codec(config), torch.float32)
    protocol.raise_if_error(server.handle(protocol.encode_json(protocol.OPEN, body)))  # held: opened
    monkeypatch.setattr(basis_module, "_REGISTRY", basis_module._Registry())
    with pytest.raises(ProtocolError, match="unknown SLICER basis"):
        protocol.raise_if_error(server.handle(protocol.encode_json(protocol.OPEN, body)))
    plain = SlicerConfig(split_layer=2, quantizer="ecsq")
    body = open_request(plain, server.model.config, "tiny", 2, build_codec(plain), torch.float32)
    protocol.raise_if_error(server.handle(protocol.encode_json(protocol.OPEN, body)))


def test_split_generation_with_a_calibrated_basis_stays_close_to_the_unsplit_model():
    base = tiny_model("llama").eval()
    config = calibrated_config(base).replace(step=0.05)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    split = SlicerModelForCausalLM.from_model(base, config)
    with torch.no_grad():
        ref_logits = base(ids).logits
        split_logits = split(ids).logits
    assert torch.allclose(split_logits, ref_logits, atol=0.05 * ref_logits.abs().max())
    out = split.generate(ids, **kwargs)
    assert out.shape == (1, 14) and split.wire_stats().uplink_payload_bytes > 0


def calibrate_tiny(tmp_path, *flags: str) -> tuple:
    """(model folder, calibration text, output folder) of `slicer-hf calibrate` on a tiny model at split 2."""
    from live import tiny_smol_dir

    folder = tiny_smol_dir(tmp_path / "m", SlicerConfig(split_layer=2))
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 60)
    out = tmp_path / "calibrated"
    args = ["calibrate", "--model", str(folder), "--split-layer", "2", *flags, "--text", str(text)]
    result = CliRunner().invoke(app, [*args, "--tokens", "512", "--window", "128", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return folder, text, out


def test_the_calibrate_command_writes_a_config_that_loads(tmp_path, monkeypatch):
    _, text, out = calibrate_tiny(tmp_path, "--downlink")
    monkeypatch.setattr(basis_module, "_REGISTRY", basis_module._Registry())
    config = SlicerConfig.from_pretrained(out)
    assert config.rotation == "calibrated" and config.split_layer == 2 and config.downlink_step == 0.1
    assert lookup(config.basis).metadata["split_layer"] == "2"
    assert lookup(config.downlink_basis).metadata["text"] == str(text)
    assert config.downlink_codec().spec()["basis"] == config.downlink_basis
    assert config.downlink_codec().given_width == lookup(config.basis).width  # predicts from the split rows
    assert not config.predict_previous and not lookup(config.basis).predicts


def test_the_calibrate_command_fits_a_chained_uplink_that_eval_measures_in_closed_loop(tmp_path):
    from slicer_hf.evaluate import evaluate

    folder, text, out = calibrate_tiny(tmp_path, "--predict-previous")
    config = SlicerConfig.from_pretrained(out)
    assert config.predict_previous and lookup(config.basis).given_width == lookup(config.basis).width
    assert build_codec(config).chains
    r = evaluate(str(folder), str(text), config=str(out), window=64, max_tokens=128, progress=False)
    assert r["tokens_scored"] == 2 * 63 and math.isfinite(r["kl_mean"]) and r["bits_per_token"] > 0


def test_the_benchmark_chooses_the_cheapest_setting_within_budget_on_text_the_calibration_did_not_see(tmp_path):
    from live import tiny_smol_dir

    from slicer_hf.bench.calibrated import choose, heldout_text

    rows = [
        {"bits_per_token": 2000, "downlink_bits_per_token": 100, "kl_mean": 0.012, "ppl_change_pct": 0.8},
        {"bits_per_token": 2100, "downlink_bits_per_token": 100, "kl_mean": 0.009, "ppl_change_pct": 0.9},
        {"bits_per_token": 2300, "downlink_bits_per_token": 100, "kl_mean": 0.007, "ppl_change_pct": 0.6},
    ]
    assert choose(rows, 0.01, 1.0) is rows[1]
    assert choose(rows, None, 1.0) is rows[0]
    with pytest.raises(SystemExit, match="no setting meets"):
        choose(rows, 0.001, 1.0)
    folder = tiny_smol_dir(tmp_path / "m", SlicerConfig(split_layer=2))
    text = tmp_path / "t.txt"
    text.write_text("alpha beta gamma delta epsilon zeta eta theta")
    rest = heldout_text(str(folder), str(text), 3)
    assert text.read_text().endswith(rest) and 0 < len(rest) < len(text.read_text())


def test_a_malformed_basis_in_a_peers_spec_is_a_codec_error_at_open():
    server = SplitServer(tiny_model("llama"))
    plain = SlicerConfig(split_layer=2, quantizer="ecsq")
    body = open_request(plain, server.model.config, "tiny", 2, build_codec(plain), torch.float32)
    for bad in (123, "zz", ["a"], None):
        spec = {**body["codec"], "rotation": "calibrated", "basis": bad}
        with pytest.raises(ProtocolError, match="bad parameters") as caught:
            protocol.raise_if_error(server.handle(protocol.encode_json(protocol.OPEN, {**body, "codec": spec})))
        assert caught.value.code == "codec"
    protocol.raise_if_error(server.handle(protocol.encode_json(protocol.OPEN, body)))  # still serving


@pytest.mark.slow
def test_the_demo_runs_a_config_calibrated_here_and_hands_its_basis_to_its_server(tmp_path):
    from slicer_hf.demo import run_demo

    folder, _, out = calibrate_tiny(tmp_path)
    result = run_demo(model=str(folder), prompt="Hi", max_new_tokens=2, config=str(out))
    assert result["wire"]["uplink_payload_bytes"] > 0


def test_the_demo_hands_its_server_the_configs_bases_from_a_folder_a_tilde_or_a_hub_name(tmp_path, monkeypatch):
    """A config named rather than a folder (a Hub repo) had given the server no basis: every session refused."""
    from pathlib import Path

    from live import tiny_smol_dir

    import slicer_hf.demo as demo
    from slicer_hf import ConfigError

    folder = tiny_smol_dir(tmp_path / "m", SlicerConfig(split_layer=2))
    monkeypatch.setenv("HOME", str(tmp_path))
    SlicerConfig.from_pretrained("smollm2-135m-split24", split_layer=2).save_pretrained(tmp_path / "cal")
    asked = []

    def start_server(path, args):  # the basis files the server is given, as they are while it starts
        given = Path(args[args.index("--basis") + 1]) if "--basis" in args else None
        asked.append(sorted(p.name for p in given.glob("slicer_basis_*")) if given else [])
        raise RuntimeError("the server's arguments are all this test needs")

    monkeypatch.setattr(demo, "start_server", start_server)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the demo's one thread, not this process's
    with pytest.raises(RuntimeError, match="arguments are all"):
        demo.run_demo(model=str(folder), config="~/cal")
    with pytest.raises(RuntimeError, match="arguments are all"):  # its file named, as from_pretrained takes it
        demo.run_demo(model=str(folder), config=str(tmp_path / "cal" / "slicer_config.json"))
    SlicerConfig.from_pretrained("smollm2-135m-split24", split_layer=2).save_pretrained(folder)  # the model's own
    with pytest.raises(RuntimeError, match="arguments are all"):
        demo.run_demo(model=str(folder))
    with pytest.raises(RuntimeError, match="arguments are all"):  # named (a Hub repo, say): no folder given
        demo.run_demo(model=str(folder), config="smollm2-135m-split24", split_layer=2)
    basis = SlicerConfig.from_pretrained("smollm2-135m-split24").basis
    assert asked == [[f"slicer_basis_{basis}.safetensors"]] * 4
    with pytest.raises(ConfigError, match="must be 1..3"):  # said before a server starts, not by its exit
        demo.run_demo(model=str(folder), config="smollm2-135m-split24", split_layer=7)


def test_the_demo_refuses_an_encoder_before_starting_a_server():
    from slicer_hf.demo import run_demo

    with pytest.raises(ConfigError, match="is an encoder"):
        run_demo(model="minilm")


def test_calibrate_keeps_the_chain_of_the_config_it_starts_from_unless_told(tmp_path):
    _, _, chained = calibrate_tiny(tmp_path / "first", "--predict-previous")
    assert SlicerConfig.from_pretrained(chained).predict_previous
    _, _, again = calibrate_tiny(tmp_path / "again", "--config", str(chained))  # a preset refits as it was
    assert (
        SlicerConfig.from_pretrained(again).predict_previous
        and lookup(SlicerConfig.from_pretrained(again).basis).predicts
    )
    _, _, plain = calibrate_tiny(tmp_path / "plain", "--config", str(chained), "--no-predict-previous")
    assert not SlicerConfig.from_pretrained(plain).predict_previous


def test_a_step_too_fine_for_a_predicting_basis_is_refused_not_clipped():
    """Such a basis bounds no coordinate: below some step its codes would pass the largest the wire holds."""
    from slicer_hf.codec.basis import lookup

    preset = SlicerConfig.from_pretrained("smollm2-135m-split24")
    assert lookup(preset.basis).code_bound == float("inf")
    x = torch.randn(1, 8, 576, generator=torch.Generator().manual_seed(0)) * 3
    given = torch.zeros(1, 8, 576)
    coarse = build_codec(preset, step=0.01, predict_previous=False, trellis=False)
    assert (coarse.decode(coarse.encode(x, given=given), given=given) - x).norm() < 0.01 * x.norm()
    fine = build_codec(preset, step=0.001, predict_previous=False, trellis=False)
    with pytest.raises(CodecError, match=r"ECSQ step 0.001\d* is too fine for this basis.*use a step of at least"):
        fine.encode(x, given=given)


def test_the_benchmark_refuses_fewer_tokens_than_a_window_and_removes_its_work_folder(monkeypatch):
    from slicer_hf.bench import calibrated

    with pytest.raises(SystemExit) as exit_info:
        calibrated.main(["--choose-tokens", "100"])
    assert exit_info.value.code == 2
    seen = []
    monkeypatch.setattr(calibrated, "run", lambda args, work: seen.append((work, work.is_dir())))
    calibrated.main([])
    [(work, existed)] = seen
    assert existed and not work.exists()  # a calibration and a held-out text per run: gone afterwards


def test_a_row_held_only_in_the_channels_its_rms_leaves_out_is_coded_not_dropped(fitted):
    """Its RMS over the counted channels is 0, and it went as a silent row: all zeros came back, without an error."""
    c = codec(fitted)
    row = torch.zeros(1, D)
    row[0, 5] = 40.0  # the massive channel alone
    assert (c.decode(c.encode(row)) - row).norm() < 0.2 * row.norm()


def test_a_basis_refuses_a_zero_scale_and_weights_other_than_zeros_and_ones():
    d = 4
    whole = dict(forward=torch.eye(d), inverse=torch.eye(d), mean=torch.zeros(d), scale=torch.ones(d))
    Basis(**whole, norm_weight=torch.ones(d))
    with pytest.raises(CodecError, match="`scale` must be positive"):
        Basis(**{**whole, "scale": torch.tensor([1.0, 0.0, 1.0, 1.0])}, norm_weight=torch.ones(d))
    for weight in (torch.tensor([1.0, 0.5, 1.0, 1.0]), torch.zeros(d)):
        with pytest.raises(CodecError, match="`norm_weight` must hold 0s and 1s"):
            Basis(**whole, norm_weight=weight)


def test_a_predicting_basis_has_no_bound_on_its_coordinates_even_where_every_channel_counts():
    """What it codes is a residual, not a row over its RMS: a finite bound would clip it."""
    d = 4
    whole = dict(forward=torch.eye(d), inverse=torch.eye(d), mean=torch.zeros(d), scale=torch.ones(d))
    assert math.isfinite(Basis(**whole, norm_weight=torch.ones(d)).code_bound)
    predictor = dict(given_weight=torch.eye(d), given_bias=torch.zeros(d), given_norm=torch.ones(d))
    assert Basis(**whole, norm_weight=torch.ones(d), **predictor).code_bound == math.inf

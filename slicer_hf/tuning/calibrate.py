"""`slicer-hf calibrate`: fit the calibrated basis of SLICER ECSQ (`rotation="calibrated"`) at a split layer.

What the server does with a decoded row is what its coding error costs: to second order, the KL between the
model's output on the true and on the decoded row is e^T F e / 2, F the Fisher information of the output
distribution with respect to the row (through every later layer and every later position that attends to it).
F is estimated from gradients of the log-likelihood of tokens sampled from the model itself, taken at the split.

The basis makes squared error in its coordinates equal that KL (the Fisher metric, whitened), then turns to the
principal axes of the rows in that metric: coordinates uncorrelated, each with its own Laplace scale, so that one
uniform step gives every coordinate the same KL per unit of error and costs each only the bits its spread needs.
Rows are taken as the codec takes them: exact outliers removed, over their RMS, less the mean.

The compressed downlink's basis also predicts (`Basis.predicts`): the server answers rows the edge has just sent, and
the last layer's output still carries much of the split layer's row (the residual stream), so a linear predictor of
the whitened coordinates from the split rows, fitted by ridge regression, is taken out before coding, and the
principal axes and scales are those of what is left.

Calibrate on validation text only; measure on test text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..codec import ops
from ..codec.basis import Basis, given_features, lookup, register, weighted_rms
from ..compat import check_supported, check_window, decoder_layers
from ..config import SlicerConfig
from ..data import CALIBRATION_TEXT
from ..errors import ConfigError
from ..version import __version__


def collect(
    model: Any, windows: Iterable[torch.Tensor], split_layers: Sequence[int], seed: int = 0
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Rows at each split (the output of decoder layer k-1) and the gradient, with respect to them, of the
    log-likelihood of one token sampled from the model at every position; one forward and backward per window.

    Args:
        model: a causal LM with every layer local, in eval mode.
        windows: token windows `[T]` (or `[1, T]`).
        split_layers: each k in [1, L]; k = L gives the last layer's output (what a hidden-state downlink carries).

    Returns:
        `{k: (rows, grads)}`, float64 `[N, d]` each, N the tokens of all windows.
    """
    layers = decoder_layers(model)
    if not split_layers or not all(1 <= k <= len(layers) for k in split_layers):
        raise ConfigError(f"split layers must be in [1, {len(layers)}], got {list(split_layers)}")
    leaves: dict[int, torch.Tensor] = {}
    first = min(split_layers)

    def hook_at(k: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            if k != first:  # downstream of the first split's leaf: keep the graph whole, keep the gradient
                hidden.retain_grad()
                leaves[k] = hidden
                return output
            leaves[k] = hidden.detach().clone().requires_grad_(True)
            return (leaves[k], *output[1:]) if isinstance(output, tuple) else leaves[k]

        return hook

    gen = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    handles = [layers[k - 1].register_forward_hook(hook_at(k)) for k in sorted(set(split_layers))]
    found: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {k: ([], []) for k in set(split_layers)}
    try:
        for ids in tqdm(windows, desc="calibrate: rows and gradients", unit="window", disable=None):  # on a terminal
            with torch.enable_grad():
                logprobs = F.log_softmax(model(ids.reshape(1, -1), use_cache=False).logits.float(), dim=-1)[0]
                sampled = torch.multinomial(logprobs.detach().exp(), 1, generator=gen)  # [T, 1]
                logprobs.gather(-1, sampled).sum().backward()
            for k, (rows, grads) in found.items():
                rows.append(leaves[k].detach()[0].double())
                grads.append(leaves[k].grad[0].double())
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    return {k: (torch.cat(rows), torch.cat(grads)) for k, (rows, grads) in found.items()}


def ridge(x: torch.Tensor, y: torch.Tensor, alpha: float = 1e-4) -> torch.Tensor:
    """Weights `[k + 1, d]` (the last row the intercept) of y `[N, d]` ~ x `[N, k]` by ridge regression in
    float64, the penalty `alpha` per row."""
    xa = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    eye = torch.eye(xa.shape[1], dtype=torch.float64)
    return torch.linalg.solve(xa.T @ xa + alpha * len(x) * eye, xa.T @ y.double())


def _massive_free(x: torch.Tensor, massive: float) -> torch.Tensor:
    """`[d]` 0/1: the channels of rows `x` whose mean square is at most `massive` times the median channel's."""
    power = x.pow(2).mean(0)
    return (power <= massive * power.median()).double()


def fit_basis(
    rows: torch.Tensor,
    grads: torch.Tensor,
    outliers: int = 0,
    massive: float = 25.0,
    metadata: dict[str, str] | None = None,
    given: torch.Tensor | None = None,
) -> Basis:
    """The calibrated basis for rows `[N, d]` with log-likelihood gradients `[N, d]` (see the module docstring).

    Args:
        rows: split-layer rows, as `collect` returns them.
        grads: their gradients.
        outliers: exact outliers per row the codec will send (the basis is fitted on what is left).
        massive: channels whose mean square exceeds this many times the median channel's are left out of the RMS.
        metadata: provenance to keep in the file (model, layer, text).
        given: `[N, d_in]` rows the coordinates are predicted from (a predicting basis); None for none.
    """
    if rows.ndim != 2 or rows.shape != grads.shape or rows.shape[0] < 2 * rows.shape[1]:
        raise ValueError(
            f"fit_basis needs rows and grads of one shape [N, d] with N >= 2d, got {tuple(rows.shape)} and "
            f"{tuple(grads.shape)}"
        )
    if given is not None and (given.ndim != 2 or len(given) != len(rows) or len(given) < 2 * given.shape[1]):
        raise ValueError(f"given rows must be [N, d_in] with N = {len(rows)} >= 2 d_in, got {tuple(given.shape)}")
    x, g = rows.double(), grads.double()
    n, d = x.shape
    if outliers:
        x = x.scatter(1, ops.top_positions(x.float(), min(outliers, d)), 0.0)
    norm_weight = _massive_free(x, massive)
    rms = weighted_rms(x, norm_weight).clamp_min(1e-30)  # [N], as the codec takes it
    u = x / rms[:, None]  # what the codec codes, before the mean
    mean = u.mean(0)
    # Fisher metric of u: a step e in u is an error rms * e in the row
    gw = g * rms[:, None]
    fisher = gw.T @ gw / n
    lam, vecs = torch.linalg.eigh(fisher)
    lam = lam.clamp_min(float(lam.max()) * 1e-6)
    whiten = vecs * lam.sqrt() / math.exp(0.5 * float(lam.log().mean()))  # [d, d], unit geometric-mean gain
    z = (u - mean) @ whiten
    predictor: dict[str, torch.Tensor] = {}
    if given is not None:  # code what the given rows do not predict: z less (given / rms) @ w
        given_norm = _massive_free(given.double(), massive)
        features = given_features(given, given_norm)
        w = ridge(features, z)
        z = z - features @ w[:-1] - w[-1]
        predictor = {"given_weight": w[:-1], "given_bias": w[-1], "given_norm": given_norm}
    _, axes = torch.linalg.eigh(z.T @ z / n)
    axes = axes.flip(1)  # widest coordinate first
    forward = whiten @ axes
    inverse = torch.linalg.inv(forward)
    scale = (z @ axes).abs().mean(0).clamp_min(1e-6)  # the coded coordinates, (u - mean) @ forward (less prediction)
    if predictor:
        predictor["given_weight"] = predictor["given_weight"] @ axes
        predictor["given_bias"] = predictor["given_bias"] @ axes
    info = {
        "format": "slicer_hf.basis/1",
        "rows": str(n),
        "outliers": str(outliers),
        "massive_channels": ",".join(str(i) for i in (norm_weight == 0).nonzero().flatten().tolist()),
        "fisher_spread": f"{float(lam.mean() / lam.log().mean().exp()):.4f}",
        "slicer_hf_version": __version__,
        **(metadata or {}),
    }
    if predictor:
        info["given_massive_channels"] = ",".join(map(str, (predictor["given_norm"] == 0).nonzero().flatten().tolist()))
    tensors = (forward, inverse, mean, scale, norm_weight)
    predictor = {name: t.float() for name, t in predictor.items()}
    return register(Basis(*(t.float() for t in tensors), metadata=info, **predictor))


def calibrate(
    model: str,
    base: SlicerConfig,
    split_layer: int | None = None,
    downlink: bool = False,
    predict: bool = True,
    predict_previous: bool = False,
    text: str = CALIBRATION_TEXT,
    tokens: int = 24576,
    window: int = 512,
    seed: int = 0,
) -> SlicerConfig:
    """`base` coded in bases fitted for `model` on `text` (what `slicer-hf calibrate` writes): the uplink's at the
    split layer and, with `downlink`, the compressed downlink's at the last layer. The bases are registered; the
    returned config's `save_pretrained` writes them beside it.

    Args:
        model: Hub id, local folder or alias (`data.resolve_model`).
        base: the config to start from (its outliers, split layer, downlink step; its model id if it names a model
            of this one's shape, else `model` is written).
        split_layer: the split (default: the config's, else 3/4 of the layers).
        downlink: also fit the downlink's basis (the downlink step defaults to 0.1).
        predict: the downlink's basis predicts from the split rows (see the module docstring).
        predict_previous: the uplink's basis predicts each row from the one before it (`predict_previous`).
        text: calibration text, a file or `wikitext-2-raw-v1[:split]`; keep test text for testing.
        tokens, window: calibration tokens, cut in windows of this many.
        seed: of the sampled tokens whose gradients estimate the metric.
    """
    from transformers import AutoModelForCausalLM

    from ..data import load_text, load_tokenizer, resolve_model, token_windows
    from ..loading import model_config as model_config_of
    from ..loading import model_loading

    if type(window) is not int or window < 2:
        raise ConfigError(f"the calibration window must be an integer of at least 2 tokens, got {window!r}")
    path = resolve_model(model)
    model_config = model_config_of(model, path)
    check_supported(model_config)  # an encoder would get a random LM head, and a basis fitted to its gradients
    width, n_layers = int(model_config.hidden_size), int(model_config.num_hidden_layers)
    check_window(model_config, window)
    if tokens // window * window < 2 * width:  # a basis of width d is fitted on at least 2d rows
        raise ConfigError(
            f"calibration needs at least 2 x the hidden size = {2 * width} tokens in whole windows of {window}; "
            f"{tokens} tokens make {tokens // window * window}"
        )
    k = split_layer if split_layer is not None else base.split_layer_for(n_layers)
    if type(k) is not int or not 1 <= k < n_layers:
        raise ConfigError(f"split_layer must be an integer in [1, {n_layers - 1}] for this model, got {k!r}")
    kept = lookup(base.downlink_basis) if not downlink and base.downlink_basis else None
    if kept is not None and {kept.width, kept.given_width} - {width, None}:
        raise ConfigError(
            f"the config's downlink basis {base.downlink_basis} codes rows of width {kept.width}"
            + (f" from rows of width {kept.given_width}" if kept.given_width else "")
            + f", and this model's are {width} wide: calibrate the downlink too (--downlink), or start from a config "
            "without a downlink basis"
        )
    if kept is not None and k != base.split_layer and kept.given_width:
        raise ConfigError(
            f"the config's downlink basis predicts from the rows of split {base.split_layer}, not {k}: calibrate "
            "the downlink at this split too (--downlink), or start from a config without a downlink basis"
        )
    # the config this run writes, checked before the model runs (a placeholder digest stands for each basis)
    changes: dict[str, Any] = {
        "split_layer": k,
        "codec": "slicer",
        "quantizer": "ecsq",
        "sparsity": 0.0,
        "rotation": "calibrated",
        "model_id": base.model_id_for(model, width, n_layers),
        "num_hidden_layers": n_layers,
        "hidden_size": width,
        "predict_previous": predict_previous,
    }
    if downlink:
        changes["downlink_step"] = base.downlink_step or 0.1
    placeholder = "0" * 16
    base.replace(**changes, basis=placeholder, **({"downlink_basis": placeholder} if downlink else {}))
    tokenizer = load_tokenizer(path, "to read the calibration text")
    windows = token_windows(tokenizer, load_text(text), window=window, max_tokens=tokens)
    if windows.numel() < 2 * width:
        raise ConfigError(
            f"calibration needs at least {2 * width} tokens in whole windows of {window}; {text!r} gave "
            f"{windows.numel()}"
        )
    with model_loading(model):
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    found = collect(lm, windows, [k, n_layers] if downlink else [k], seed=seed)
    provenance = {"model": model, "text": text, "tokens": str(windows.numel()), "seed": str(seed)}

    def previous_rows(rows: torch.Tensor) -> torch.Tensor:
        """Each row's predecessor in its window (zeros before a window's first: a sequence starting afresh)."""
        before = rows.reshape(len(windows), -1, rows.shape[-1]).roll(1, dims=1)
        before[:, 0] = 0.0
        return before.reshape(rows.shape)

    def fit(layer: int, given: torch.Tensor | None = None) -> str:
        info = {**provenance, "split_layer": str(layer)}
        if given is not None and layer == n_layers:  # a predicting downlink: from the rows at the split
            info["given_split_layer"] = str(k)
        return fit_basis(*found[layer], outliers=base.outliers, metadata=info, given=given).digest

    changes["basis"] = fit(k, previous_rows(found[k][0]) if predict_previous else None)
    if downlink:
        changes["downlink_basis"] = fit(n_layers, found[k][0] if predict else None)
    return base.replace(**changes)

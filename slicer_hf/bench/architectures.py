"""Which decoder-only architectures split exactly: every causal LM in transformers' auto mapping that can be built
tiny from its config class runs the exactness anchor (lossless codec; greedy, seeded sampling and a left-padded
batch; split layers 1 and L-1), and the result becomes the support table in docs/architectures.md.

    slicer-hf bench architectures                 # run every architecture, print and write the table and JSON
    slicer-hf bench architectures --only llama gpt2
"""

from __future__ import annotations

import copy
import inspect
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from .. import compat
from ..config import SlicerConfig
from .common import suite_arguments

VOCAB = 128
MAX_PARAMS = 20_000_000
# Sizes that make a config tiny; a key is set only where the config class knows it.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "ffn_dim": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "word_embed_proj_dim": 64,
    "sliding_window": 8,
    "rotary_dim": 8,
    "is_decoder": True,
    "attention_window_size": 8,
    # mixtures of experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    # multi-head latent attention
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "qk_head_dim": 16,
    "global_head_dim": 16,
    "num_global_key_value_heads": 2,
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB,
    "laurel_rank": 8,
    "activation_sparsity_pattern": None,
}


def tiny_config(model_type: str) -> Any:
    """A small config of `model_type` (raises with a reason when the family cannot be built that way)."""
    config_class = compat.config_class(model_type)
    default = config_class()
    params = inspect.signature(config_class.__init__).parameters
    aliases = getattr(config_class, "attribute_map", {})

    def known(key: str) -> bool:
        try:
            return key in params or key in aliases or hasattr(default, key)
        except Exception:  # a property that refuses to answer (XLNet's max_position_embeddings)
            return False

    settable = lambda key: not isinstance(getattr(config_class, key, None), property)  # noqa: E731
    kwargs = {key: value for key, value in TINY.items() if known(key) and settable(key) and value is not None}
    if "kv_lora_rank" in kwargs:  # multi-head latent attention derives its head sizes from the ranks above
        kwargs.pop("head_dim", None)
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)
    kwargs.update(FAMILY_SIZES.get(model_type, {}))
    if "layer_types" in params:
        kwargs["layer_types"] = None  # derived again from the new layer count
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if known(key):
            kwargs[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
    return config_class(**kwargs)


# sizes one family needs beyond the generic shrink
FAMILY_SIZES: dict[str, dict[str, Any]] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 2]], "window_size": 8},
}


class Untested(Exception):
    """The generic tiny config of a family does not build, stays too large, or does not run even unsplit: nothing is
    known about its split."""


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    config = tiny_config(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # count first: some families keep large sizes the generic shrink misses
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(copy.deepcopy(config)).parameters())
        if n > MAX_PARAMS:
            raise Untested(f"the generic shrink leaves {n / 1e6:.1f}M parameters")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init leaves some biases and norms trivial: perturb so every weight matters
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.02)
    return model


def anchor(model_type: str) -> bool:
    """Raise unless split generation equals plain `generate()` token for token at split layers 1 and L-1; return
    whether the server ran it on its KV store (else on per-session transformers caches, one step at a time)."""
    from ..modeling import SlicerModelForCausalLM

    try:
        reference = tiny_model(model_type)
    except Untested:
        raise
    except Exception as exc:
        raise Untested(f"the generic tiny config cannot be built: {type(exc).__name__}: {exc}") from exc
    n = compat.num_layers(reference.config)
    vocab = min(VOCAB, int(reference.config.vocab_size))
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    try:
        reference.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    except Exception as exc:
        raise Untested(f"the tiny config does not generate unsplit either: {type(exc).__name__}: {exc}") from exc
    for k in sorted({1, n - 1}):
        split = SlicerModelForCausalLM.from_model(
            copy.deepcopy(reference), SlicerConfig(codec="identity", split_layer=k)
        )
        for label, kwargs in (
            ("greedy", {"input_ids": ids[:1], "do_sample": False}),
            ("left-padded batch", {"input_ids": ids, "attention_mask": mask, "do_sample": False}),
            ("seeded sampling", {"input_ids": ids, "attention_mask": mask, "do_sample": True, "top_k": 20}),
        ):
            torch.manual_seed(7)
            expected = reference.generate(**kwargs, max_new_tokens=8, pad_token_id=0)
            torch.manual_seed(7)
            got = split.generate(**kwargs, max_new_tokens=8, pad_token_id=0)
            if not torch.equal(got, expected):
                raise AssertionError(f"split at {k}, {label}: {got.tolist()} != {expected.tolist()}")
    return split.split_server.store is not None


def check(model_type: str) -> dict[str, Any]:
    """One row of the support table."""
    started, store = time.perf_counter(), False
    try:
        try:
            default = compat.config_class(model_type)()
        except Exception as exc:
            raise Untested(f"its config class does not build with defaults: {type(exc).__name__}: {exc}") from exc
        compat.check_supported(default)  # what from_pretrained refuses, before any weight is read
        store = anchor(model_type)
        status, reason = "exact", ""
    except NotImplementedError as exc:
        status, reason = "not supported", str(exc).split("\n")[0]
    except Untested as exc:
        status, reason = "untested", str(exc).split("\n")[0][:300]
    except Exception as exc:  # a failure of the anchor: recorded as such, then fixed or listed in compat
        status, reason = "fails", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    seconds = time.perf_counter() - started
    return {"model_type": model_type, "status": status, "reason": reason, "kv_store": store, "seconds": seconds}


def architectures() -> list[str]:
    return compat.causal_lm_model_types()


def markdown(rows: list[dict[str, Any]]) -> str:
    import transformers

    statuses = ("exact", "not supported", "untested", "fails")
    counts = {status: sum(r["status"] == status for r in rows) for status in statuses}
    stored = sum(bool(r.get("kv_store")) for r in rows)
    lines = [
        "# Supported architectures",
        "",
        "Generated by `slicer-hf bench architectures --doc docs/architectures.md` with transformers "
        f"{transformers.__version__}; `tests/test_architectures.py` runs the same sweep in CI.",
        "",
        "Every causal LM in transformers' auto mapping is built tiny from its config class (4 layers, hidden size 64, "
        "where the family allows) and runs the exactness anchor with the lossless codec: greedy, a left-padded batch "
        "and seeded sampling, at split layers 1 and L-1, each equal to plain `generate()` token for token.",
        "",
        f"- **exact**: {counts['exact']} architectures split exactly; {stored} of them run on the server's KV store "
        "(batched with other sessions; `docs/serving.md`), the others on per-session transformers caches, one step "
        "at a time (the store's start-up check found their attention or cache differs from what it reproduces).",
        f"- **not supported**: {counts['not supported']}, with the reason; `SlicerModelForCausalLM.from_pretrained` "
        "refuses them with `NotImplementedError` before loading any weight.",
        f"- **untested**: {counts['untested']} whose generic tiny config does not build, stays too large for the "
        "sweep, or does not run even unsplit; nothing is claimed for them.",
        "- Cross-attention is refused with `NotImplementedError` in every family: `encoder_hidden_states` given to "
        "a decoder that takes them (`trocr` is exact as a language model on its own), or a config with "
        "`add_cross_attention=True`. The server's layers never get an encoder's states.",
        *(
            [f"- **fails**: {counts['fails']} that ran and did not equal plain `generate()`: bugs to fix."]
            if counts["fails"]
            else []
        ),
        "",
        "| architecture | split generation | server KV store | why not |",
        "|---|---|---|---|",
    ]
    clean = lambda text: text.replace("|", "/").replace("\n", " ")  # noqa: E731
    engine = lambda r: ("yes" if r.get("kv_store") else "no") if r["status"] == "exact" else ""  # noqa: E731
    lines += [f"| `{r['model_type']}` | {r['status']} | {engine(r)} | {clean(r['reason'])} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = suite_arguments(__doc__)
    parser.add_argument("--only", nargs="*", default=None, help="model types to run (default: all)")
    parser.add_argument("--out-json", default="docs/benchmarks/architectures.json", help="where the JSON goes")
    parser.add_argument("--doc", default=None, help="write the support table here (docs/architectures.md)")
    parser.add_argument("--render", action="store_true", help="only render --doc from an earlier --out-json")
    args = parser.parse_args(argv)
    if unknown := sorted(set(args.only or ()) - set(architectures())):
        parser.error(f"--only: not causal-LM model types of this transformers: {', '.join(unknown)}")
    rows = json.loads(Path(args.out_json).read_text())["rows"] if args.render else []
    for model_type in [] if args.render else args.only or architectures():
        rows.append(check(model_type))
        r = rows[-1]
        print(f"{r['model_type']:28s} {r['status']:14s} {r['seconds']:5.1f}s {r['reason'][:100]}", flush=True)
    if args.out_json and not args.render:
        import transformers

        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        result = {"transformers": transformers.__version__, "rows": rows}
        Path(args.out_json).write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(rows)
    if args.doc:
        Path(args.doc).write_text(table + "\n")
    print(table)
    failed = [r["model_type"] for r in rows if r["status"] == "fails"]
    if failed:
        raise SystemExit(f"the exactness anchor fails for {', '.join(failed)}")
    return rows


if __name__ == "__main__":
    main()

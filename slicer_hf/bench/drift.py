"""Long-generation drift: does codec noise accumulate in the server's KV cache over hundreds of decode steps?

The unsplit model generates a continuation greedily. The split model then decodes the same tokens one by one
(teacher forcing: each step sends a single-token packet; the server's cache is built only from lossy hidden
states), and its next-token distribution is compared with the unsplit model's at every position: KL and top-1
agreement, in buckets of generation length.

    python -m slicer_hf.bench.drift --new-tokens 512 --out-json docs/benchmarks/drift.json
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from ..config import SlicerConfig, default_config_dir
from ..data import CALIBRATION_TEXT, load_text, resolve_model
from ..modeling import SlicerModelForCausalLM, unsplit
from .common import at_least, markdown_table, suite_parser, write_json


@torch.inference_mode()
def run(
    model: str = "smollm2",
    config_dir: str | None = None,
    prompts: int = 2,
    prompt_tokens: int = 64,
    new_tokens: int = 512,
    bucket: int = 64,
    out_json: str | None = None,
) -> dict[str, Any]:
    path = resolve_model(model)
    cfg = SlicerConfig.from_pretrained(config_dir or default_config_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = SlicerModelForCausalLM.from_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), cfg)
    text_ids = tokenizer(load_text(CALIBRATION_TEXT)[:200_000], return_tensors="pt")["input_ids"][0]
    kl_sum = torch.zeros(new_tokens)
    agree_sum = torch.zeros(new_tokens)
    for p in range(prompts):
        prompt = text_ids[p * 5000 : p * 5000 + prompt_tokens].unsqueeze(0)
        with unsplit(lm):
            full = lm.generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.3
            )  # keeps greedy text from looping
            ref = lm(full).logits[0, prompt_tokens - 1 : -1].float()  # [new, V]
        cache = DynamicCache(config=lm.config)
        out = [lm(prompt, cache=cache, use_cache=True).logits[0, -1]]
        for t in range(prompt_tokens, prompt_tokens + new_tokens - 1):
            out.append(lm(full[:, t : t + 1], cache=cache, use_cache=True).logits[0, -1])
        got = torch.stack(out).float()
        ref_lp, got_lp = F.log_softmax(ref, -1), F.log_softmax(got, -1)
        kl_sum += (ref_lp.exp() * (ref_lp - got_lp)).sum(-1)
        agree_sum += (ref.argmax(-1) == got.argmax(-1)).float()
        print(f"prompt {p}: mean KL {kl_sum.sum() / ((p + 1) * new_tokens):.4f}", flush=True)
    lm.close_session()
    rows = []
    for a in range(0, new_tokens, bucket):
        z = min(a + bucket, new_tokens)
        rows.append(
            {
                "positions": f"{a + 1}-{z}",
                "kl_mean": (kl_sum[a:z].sum() / (prompts * (z - a))).item(),
                "top1_agreement": (agree_sum[a:z].sum() / (prompts * (z - a))).item(),
            }
        )
    result = {
        "model": model,
        "config": cfg.to_dict(),
        "prompts": prompts,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "rows": rows,
    }
    write_json(result, out_json)
    print(
        markdown_table(
            rows,
            [
                ("generated positions", "positions", ""),
                ("KL (nats)", "kl_mean", ".4f"),
                ("top-1 agreement", "top1_agreement", ".3f"),
            ],
        )
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser(__doc__, "docs/benchmarks/drift.json")
    parser.add_argument("--prompts", type=at_least(1), default=2, help="WikiText-2 prompts to continue")
    parser.add_argument("--prompt-tokens", type=at_least(1), default=64, help="tokens of each prompt")
    parser.add_argument("--new-tokens", type=at_least(1), default=512, help="tokens generated after each prompt")
    parser.add_argument("--bucket", type=at_least(1), default=64, help="generated tokens per row of the table")
    args = parser.parse_args(argv)
    run(args.model, args.config, args.prompts, args.prompt_tokens, args.new_tokens, args.bucket, args.out_json)


if __name__ == "__main__":
    main()

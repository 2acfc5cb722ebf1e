"""Image-classification accuracy against uplink bits, for a split vision model on real images.

For users with real weights and ImageNet validation images (none are available offline where slicer_hf is
developed, so the project reports no vision quality numbers of its own):

    python benchmarks/vision_accuracy.py --model google/vit-base-patch16-224 --images /data/imagenet/val \\
        --splits 4,8,10 --limit 5000 --json vit.json
    python benchmarks/vision_accuracy.py --model microsoft/resnet-50 --images /data/imagenet/val --splits 1,2,3
    python benchmarks/vision_accuracy.py --dry-run        # the mechanics on tiny random models and random images

`--images` is an ImageFolder layout: one folder per class named by its WordNet synset (`n01440764/...JPEG`), the
classes indexed in sorted folder order, the order of the ImageNet-1k labels of the Hub's ImageNet classifiers.
Each image goes through the model's own image processor, then the split path (`SlicerModelForImageClassification`,
in-process server) at each split layer and codec setting.

Printed and written (--json) per split layer and setting: top-1 accuracy of the split model, of the unsplit one on
the same images, the agreement of their predictions, and uplink bits per position (a ViT patch or a CNN
feature-map position: whole STEP messages over the rows sent). The run ends with a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, ResNetConfig, ViTConfig

from slicer_hf import SlicerConfig, compat
from slicer_hf.bench.common import codec_sweep
from slicer_hf.encoders import SlicerModelForImageClassification
from slicer_hf.modeling import unsplit

SETTINGS: dict[str, dict[str, Any]] = {
    "fp16": {"codec": "fp16"},
    "int8": {"codec": "int8"},
    **{f"slicer step {s}": {"codec": "slicer", "quantizer": "ecsq", "step": s} for s in (0.2, 0.4, 0.8)},
}
EXTENSIONS = {".jpeg", ".jpg", ".png"}


def image_folder(root: Path, limit: int | None) -> list[tuple[Path, int]]:
    """(image, class index) pairs; classes are the sorted sub-folder names, images taken round-robin over them."""
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"{root}: expected one sub-folder per class (ImageFolder layout)")
    per_class = [sorted(f for f in c.iterdir() if f.suffix.lower() in EXTENSIONS) for c in classes]
    pairs = []
    for i in range(max(map(len, per_class))):
        pairs += [(files[i], label) for label, files in enumerate(per_class) if i < len(files)]
    return pairs[:limit] if limit else pairs


def batches(pairs: list[tuple[Path, int]], processor: Any, size: int) -> list[tuple[dict, torch.Tensor]]:
    from PIL import Image

    out = []
    for a in range(0, len(pairs), size):
        chunk = pairs[a : a + size]
        images = [Image.open(path).convert("RGB") for path, _ in chunk]
        out.append((processor(images=images, return_tensors="pt"), torch.tensor([label for _, label in chunk])))
    return out


@torch.inference_mode()
def predictions(model: Any, data: list[tuple[dict, torch.Tensor]], **kwargs: Any) -> torch.Tensor:
    return torch.cat([model(**inputs, **kwargs).logits.argmax(-1) for inputs, _ in data])


def evaluate(model: Any, data: list, splits: list[int], settings: dict[str, dict]) -> list[dict[str, Any]]:
    labels = torch.cat([y for _, y in data])
    with unsplit(model):
        reference = predictions(model, data)
    rows = []
    for name, k in codec_sweep(model, settings, splits):
        got = predictions(model, data, split_layer=k)
        stats = model.wire_stats()
        rows.append(
            {
                "setting": name,
                "split_layer": k,
                "bits_per_position": stats.uplink_bits_per_token,
                "top1": (got == labels).float().mean().item(),
                "top1_unsplit": (reference == labels).float().mean().item(),
                "agreement": (got == reference).float().mean().item(),
            }
        )
        r = rows[-1]
        print(
            f"{name:>16} split {k}: {r['bits_per_position']:8.0f} bits/position, top-1 {r['top1']:.4f} "
            f"(unsplit {r['top1_unsplit']:.4f}), agreement {r['agreement']:.4f}",
            flush=True,
        )
    return rows


def dry_run() -> list[dict[str, Any]]:
    """Tiny random ViT and ResNet on random images: the mechanics only (accuracy of random weights means nothing)."""
    torch.manual_seed(0)
    rows = []
    tiny = {
        "vit": ViTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=48,
            image_size=32,
            patch_size=8,
        ),
        "resnet": ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    }
    for name, config in tiny.items():
        config.num_labels = 10
        model = SlicerModelForImageClassification.from_model(
            AutoModelForImageClassification.from_config(config).eval(), SlicerConfig(split_layer=1)
        )
        data = [({"pixel_values": torch.randn(4, 3, 32, 32)}, torch.randint(0, 10, (4,))) for _ in range(2)]
        print(f"-- {name} (random weights, random images)")
        for row in evaluate(model, data, list(range(1, compat.num_layers(config))), SETTINGS):
            rows.append({"model": name, **row})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Hub id or folder of an image classifier (ViT, DeiT, Swin, ResNet, ConvNeXt)")
    parser.add_argument("--images", type=Path, help="ImageFolder root (one sub-folder per class)")
    parser.add_argument("--splits", default=None, help="comma-separated split layers (default: every boundary)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images (round-robin over classes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--dry-run", action="store_true", help="tiny random models and random images")
    args = parser.parse_args()
    if args.dry_run:
        rows = dry_run()
    else:
        if not args.model or not args.images:
            parser.error("--model and --images are needed (or --dry-run)")
        model = SlicerModelForImageClassification.from_pretrained(args.model, slicer_config=SlicerConfig(split_layer=1))
        n = compat.num_layers(model.config)
        splits = [int(s) for s in args.splits.split(",")] if args.splits else list(range(1, n))
        processor = AutoImageProcessor.from_pretrained(args.model)
        data = batches(image_folder(args.images, args.limit), processor, args.batch_size)
        rows = evaluate(model, data, splits, SETTINGS)
    print("\n| setting | split | bits/position | top-1 | top-1 unsplit | agreement |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['split_layer']} | {r['bits_per_position']:.0f} | {r['top1']:.4f} | "
            f"{r['top1_unsplit']:.4f} | {r['agreement']:.4f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

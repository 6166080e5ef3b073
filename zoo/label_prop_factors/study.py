"""``python -m zoo.label_prop_factors.study``: J&F of label propagation on DAVIS-2016, one factor at a time.

    python -m zoo.label_prop_factors.study                                   # random-init ResNet-18 (offline)
    python -m zoo.label_prop_factors.study --checkpoint runs/<ssl run>/checkpoints/last.ckpt   # an ssl encoder
    python -m zoo.label_prop_factors.study --pretrained resnet18.tv_in1k --input-height 480 --max-frames 0
                                                                             # the paper setting (hub weights)

Features of every frame are computed once per (encoder, input height, layer, stride) and cached; each setting
then only propagates (``LabelPropagation``) and scores. Settings: CRW's defaults (tau 0.07, k 10, radius 12, n 20,
first frame kept, L2 on, layer3 at stride 8), then each factor varied alone: context length n, top-k, radius,
temperature, L2 normalisation, first frame kept, feature stride, input resolution. Writes ``<out>.json`` / ``.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zoo.ssl.encoders import timm_encoder

from .davis import DavisSequence, load_davis2016, sequence_scores
from .propagation import DenseFeatures, LabelPropagation

__all__ = ["segment_sequence", "evaluate", "copy_first_mask", "factor_settings", "load_encoder", "run_study",
           "main"]

DEFAULTS = dict(temperature=0.07, topk=10, radius=12.0, context=20, keep_first=True, l2_normalize=True)
FEATURE_DEFAULTS = dict(layer="layer3", stride=8)


def frames_tensor(frames: np.ndarray, height: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, height, W * height / H) float in [0, 1] (CRW resizes the short side)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    width = round(x.shape[-1] * height / x.shape[-2])
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def segment_sequence(sequence: DavisSequence, features: torch.Tensor, propagation: LabelPropagation) -> np.ndarray:
    """Propagate frame 0's mask with ``features`` (T, C, h, w) -> (T, H, W) predicted object ids at mask size:
    one-hot labels bilinearly downsampled to h x w, soft predictions bilinearly upsampled, argmax."""
    objects = np.unique(sequence.masks[0])
    onehot = torch.from_numpy(sequence.masks[0][None] == objects[:, None, None]).float()[None]
    first = F.interpolate(onehot, size=features.shape[-2:], mode="bilinear", align_corners=False)[0]
    soft = propagation(features, first)
    soft = F.interpolate(soft, size=sequence.masks.shape[-2:], mode="bilinear", align_corners=False)
    return objects[soft.argmax(1).numpy()]


def evaluate(sequences: list[DavisSequence], features: list[torch.Tensor], propagation: LabelPropagation) -> dict:
    """J, F and J&F means over sequences (the benchmark's mean over sequences of per-sequence frame means)."""
    per_sequence = {s.name: sequence_scores(s.masks, segment_sequence(s, f, propagation))
                    for s, f in zip(sequences, features)}
    j = float(np.mean([v["J"] for v in per_sequence.values()]))
    f = float(np.mean([v["F"] for v in per_sequence.values()]))
    return {"J&F": (j + f) / 2, "J": j, "F": f, "per_sequence": per_sequence}


def copy_first_mask(sequences: list[DavisSequence]) -> dict:
    """The no-propagation reference: frame 0's mask predicted for every frame."""
    scores = [sequence_scores(s.masks, np.repeat(s.masks[:1], len(s.masks), 0)) for s in sequences]
    j, f = float(np.mean([v["J"] for v in scores])), float(np.mean([v["F"] for v in scores]))
    return {"name": "copy first mask (no propagation)", "J&F": (j + f) / 2, "J": j, "F": f}


def factor_settings(input_height: int) -> list[dict]:
    """The default, then each factor moved alone: name, propagation kwargs, feature kwargs, input height."""
    grid = {"context": [1, 5, 10], "topk": [1, 5, 20], "radius": [3.0, 6.0, math.inf],
            "temperature": [0.01, 0.5], "l2_normalize": [False], "keep_first": [False]}
    settings = [{"name": "default", "propagation": {}, "features": {}, "input_height": input_height}]
    for factor, values in grid.items():
        settings += [{"name": f"{factor}={v}", "propagation": {factor: v}, "features": {},
                      "input_height": input_height} for v in values]
    settings.append({"name": "stride=16", "propagation": {}, "features": {"stride": 16}, "input_height": input_height})
    settings.append({"name": f"input_height={input_height * 3 // 2}", "propagation": {}, "features": {},
                     "input_height": input_height * 3 // 2})
    return settings


def load_encoder(checkpoint: str | None = None, pretrained: str | None = None, seed: int = 0) -> tuple[str, object]:
    """A timm ResNet-18: random init (``seed``), an ssl-family run's ``network.*`` weights, or hub weights."""
    if pretrained:
        return f"pretrained {pretrained}", timm_encoder(pretrained, pretrained=True)
    torch.manual_seed(seed)
    encoder = timm_encoder("resnet18")
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        network = {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}
        encoder.load_state_dict(network)
        return f"checkpoint {checkpoint}", encoder
    return f"random-init resnet18 (seed {seed})", encoder


def run_study(sequences: list[DavisSequence], encoder, settings: list[dict]) -> list[dict]:
    cache: dict[tuple, list[torch.Tensor]] = {}
    rows = []
    for setting in settings:
        start = time.time()
        feature_kwargs = {**FEATURE_DEFAULTS, **setting["features"]}
        key = (setting["input_height"], *feature_kwargs.values())
        if key not in cache:
            extractor = DenseFeatures(encoder, **feature_kwargs)
            cache[key] = [extractor(frames_tensor(s.frames, setting["input_height"])) for s in sequences]
        propagation = LabelPropagation(**{**DEFAULTS, **setting["propagation"]})
        scores = evaluate(sequences, cache[key], propagation)
        rows.append({**setting, **scores, "feature_shape": list(cache[key][0].shape[-2:]),
                     "seconds": time.time() - start})
        print(f"{setting['name']:>22}  J&F {scores['J&F']:.3f}  J {scores['J']:.3f}  F {scores['F']:.3f}  "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def write_report(rows: list[dict], meta: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    default = rows[0]["J&F"]
    lines = [f"# Label propagation factors on DAVIS-2016 ({meta['encoder']})", "",
             f"{meta['num_sequences']} sequences, {meta['num_frames']} frames "
             f"(first {meta['max_frames'] or 'all'} per sequence), masks {meta['mask_size']}; features "
             f"layer3 of a timm ResNet-18; default = CRW's (tau 0.07, k 10, radius 12, n 20, first frame kept, "
             f"L2 on, stride 8), input height {meta['input_height']}. J&F = (mean J + mean F) / 2 over sequences, "
             f"frames 1..T-2. {meta['minutes']:.1f} min on {meta['hardware']}.", "",
             "| setting | feature map | J&F | J | F | J&F - default |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['feature_shape'][0]}x{r['feature_shape'][1]} | {r['J&F']:.3f} | "
                     f"{r['J']:.3f} | {r['F']:.3f} | {r['J&F'] - default:+.3f} |")
    copy = meta["copy_first_mask"]
    lines.append(f"| {copy['name']} | - | {copy['J&F']:.3f} | {copy['J']:.3f} | {copy['F']:.3f} | "
                 f"{copy['J&F'] - default:+.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="an ssl-family run's checkpoint (its network.* weights)")
    parser.add_argument("--pretrained", help="a timm pretrained name (hub weights; the paper setting)")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed")
    parser.add_argument("--input-height", type=int, default=120, help="frame height fed to the encoder "
                        "(CRW 320, the paper 480; 120 keeps the CPU sweep in minutes)")
    parser.add_argument("--max-frames", type=int, default=0, help="first N frames per sequence (0: all)")
    parser.add_argument("--sequences", nargs="*", help="sequence names (default: val_subset.txt)")
    parser.add_argument("--out", default="zoo/label_prop_factors/results", help="writes <out>.json / .md")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    start = time.time()
    sequences = load_davis2016(sequences=args.sequences, max_frames=args.max_frames or None)
    name, encoder = load_encoder(args.checkpoint, args.pretrained, args.seed)
    rows = run_study(sequences, encoder, factor_settings(args.input_height))
    meta = {"copy_first_mask": copy_first_mask(sequences), "encoder": name, "input_height": args.input_height,
            "max_frames": args.max_frames,
            "num_sequences": len(sequences), "num_frames": sum(len(s.frames) for s in sequences),
            "mask_size": "x".join(map(str, sequences[0].masks.shape[1:])), "hardware": "2-core CPU, shared, 1 thread",
            "minutes": (time.time() - start) / 60}
    write_report(rows, meta, Path(args.out))


if __name__ == "__main__":
    main()

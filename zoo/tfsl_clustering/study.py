"""``python -m zoo.tfsl_clustering.study [--runs runs/<base run> ...] [--episodes 1000]``:
transductive clustering against the inductive nearest prototype on N-way K-shot episodes of a trained base encoder.

Each run's encoder is frozen; its features of the novel-class images are extracted once (cached in the run folder)
and CL2N-normalised with the base-class mean. lambda of SLK-Means / SLK-MS is tuned per shot on validation
episodes, as the official ``tune_lambda`` (over {0.05, ..., 1.0}); then every method runs on the same test episodes
(one seed); the same arms also run on episodes of held-out base-class images, a diagnostic of the features.
Writes the tables of mean accuracy ± 95 % interval to ``zoo/tfsl_clustering/results.md`` (+ ``.json``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from zoo.fewshot.bank import run_feature_bank
from zoo.fewshot.episodes import (Episodes, center_l2, confidence_interval, episode_accuracies, nearest_prototype,
                                  sample_episodes)
from zoo.tfsl_clustering.module import SLK

LAMBDAS = (0.05, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0)  # the official tune_lambda grid
TUNED = {"SLK-Means": "kmeans", "SLK-MS": "kmodes"}


def methods(lambdas: dict[str, float]) -> dict[str, object]:
    """Every arm: ``(support, query, episodes) -> query labels``."""
    def clustering(method: str, lmd: float, **options):
        slk = SLK(method, lmd=lmd, **options)
        return lambda support, query, episodes: slk(support, query, episodes.ways)

    return {
        "nearest prototype (inductive, SimpleShot CL2N)": lambda s, q, e: nearest_prototype(s, q, e.ways),
        "K-means (lambda = 0)": clustering("kmeans", 0.0),
        "K-modes (lambda = 0)": clustering("kmodes", 0.0),
        "SLK-Means (lambda tuned)": clustering("kmeans", lambdas["SLK-Means"]),
        "SLK-MS (lambda tuned)": clustering("kmodes", lambdas["SLK-MS"]),
        "SLK-MS, supports free as in the official code": clustering("kmodes", lambdas["SLK-MS"], clamp_support=False),
    }


def tune(features: torch.Tensor, episodes: Episodes) -> dict[str, float]:
    """The lambda of each SLK arm with the best mean accuracy on the validation ``episodes``."""
    best = {}
    for name, method in TUNED.items():
        scores = [episode_accuracies(lambda s, q, e: SLK(method, lmd=lmd)(s, q, e.ways), features, episodes).mean()
                  for lmd in LAMBDAS]
        best[name] = LAMBDAS[int(np.argmax(scores))]
        print(f"  {name}: validation accuracy per lambda "
              + ", ".join(f"{lmd:g}: {100 * s:.2f}" for lmd, s in zip(LAMBDAS, scores)), flush=True)
    return best


def evaluate(pools: dict[str, tuple[torch.Tensor, np.ndarray]], arms: dict, ways: int, shot: int, queries: int,
             num_episodes: int, seed: int) -> dict:
    """Every arm on the same ``num_episodes`` episodes of each pool: accuracy %, 95 % half-width, seconds."""
    out = {}
    for pool, (features, labels) in pools.items():
        episodes = sample_episodes(labels, ways, shot, queries, num_episodes, seed=seed)
        out[pool] = {}
        for name, predict in arms.items():
            start = time.time()
            mean, half_width = confidence_interval(episode_accuracies(predict, features, episodes))
            out[pool][name] = {"accuracy": 100 * mean, "ci95": 100 * half_width, "seconds": time.time() - start}
            print(f"  {pool}, {name}: {100 * mean:.2f} ± {100 * half_width:.2f} ({time.time() - start:.0f} s)",
                  flush=True)
    return out


def markdown(results: dict) -> str:
    shots, pools = list(results["shots"]), list(POOLS)
    first = results["shots"][shots[0]]["pools"][pools[0]]
    columns = [(pool, shot) for pool in pools for shot in shots]
    lines = [f"{results['ways']}-way, {results['queries']} queries per class, {results['episodes']} episodes per "
             f"column (seed {results['seed']}, the same episodes for every method), base encoder `{results['run']}`; "
             "accuracy %, mean ± 95 % interval", "",
             "| method | " + " | ".join(f"{POOLS[pool]}, {shot}-shot" for pool, shot in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for index, name in enumerate(first):
        cells = [list(results["shots"][shot]["pools"][pool].values())[index] for pool, shot in columns]
        lines.append(f"| {name} | " + " | ".join(f"{c['accuracy']:.2f} ± {c['ci95']:.2f}" for c in cells) + " |")
    tuned = "; ".join(f"{shot}-shot: " + ", ".join(f"{k} {v:g}" for k, v in results["shots"][shot]["lambdas"].items())
                      for shot in shots)
    lines += ["", f"lambda tuned on {results['val_episodes']} validation episodes per value ({tuned})."]
    return "\n".join(lines) + "\n"


POOLS = {"novel": "novel classes", "base_test": "base classes (held-out images)"}


def study(run: str, args: argparse.Namespace) -> dict:
    bank = run_feature_bank(run)
    base_mean = torch.as_tensor(bank.base_mean)
    cl2n = lambda features: center_l2(torch.as_tensor(features), base_mean)
    # the headline: classes the encoder never saw; the diagnostic: held-out images of the classes it learnt
    pools = {"novel": (cl2n(bank.novel), bank.novel_labels), "base_test": (cl2n(bank.base_test), bank.base_test_labels)}
    results = {"run": run, "ways": args.ways, "queries": args.queries, "episodes": args.episodes,
               "val_episodes": args.val_episodes, "seed": args.seed, "shots": {}}
    for shot in args.shots:
        print(f"{run}: {args.ways}-way {shot}-shot, tuning lambda on {args.val_episodes} validation episodes",
              flush=True)
        lambdas = tune(cl2n(bank.novel_val), sample_episodes(bank.novel_val_labels, args.ways, shot, args.queries,
                                                             args.val_episodes, seed=args.seed + 1))
        results["shots"][shot] = {"lambdas": lambdas, "pools": evaluate(pools, methods(lambdas), args.ways, shot,
                                                                         args.queries, args.episodes, args.seed)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", default=["runs/tfsl_clustering_cifar10_subset_base",
                                                      "runs/tfsl_clustering_digits_base"])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--val-episodes", type=int, default=500, help="official meta-val-iter")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = parser.parse_args()
    results = [study(run, args) for run in args.runs]
    table = "\n".join(markdown(r) for r in results)
    print(table)
    Path(args.out + ".md").write_text(table)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

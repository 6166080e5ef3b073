"""SimMatchV2's memory banks and distribution alignment under a 2-process gloo group: every rank ends with the
same banks, holding every rank's samples. This file imports only torch (the spawned workers re-import it)."""
from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from zoo.simmatchv2.graph import distribution_alignment, update_labeled_bank, update_unlabeled_bank

C, D, DA_M = 4, 6, 0.9


def table(rows, cols, a, b, scale=1.0):
    i = torch.arange(rows, dtype=torch.float64)[:, None]
    j = torch.arange(cols, dtype=torch.float64)[None]
    return (scale * torch.sin(a * i + b * j + 0.1 * i * j)).float()


def _bank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b = 3
    feats = F.normalize(table(b, D, 0.3 + rank, 0.9), dim=1)       # this rank's teacher embeddings
    probs = torch.softmax(table(b, C, 0.7, 0.2 + rank, 2.0), dim=1)
    indices = torch.tensor([[0, 4, 2], [5, 1, 6]][rank])
    labeled = torch.zeros(8, D)
    unlabeled, unlabeled_probs, ptr = torch.zeros(4 * b, D), torch.zeros(4 * b, C), torch.tensor([b * world])
    update_labeled_bank(labeled, feats, indices)
    update_unlabeled_bank(unlabeled, unlabeled_probs, ptr, feats, probs)
    _, da = distribution_alignment(probs, torch.full((1, C), 1.0 / C), DA_M)
    torch.save({"labeled": labeled, "unlabeled": unlabeled, "unlabeled_probs": unlabeled_probs, "ptr": ptr,
                "da": da, "feats": feats, "probs": probs, "indices": indices}, os.path.join(out_dir, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_bank_updates_all_gather_across_two_processes(tmp_path):
    mp.spawn(_bank_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    for key in ("labeled", "unlabeled", "unlabeled_probs", "ptr", "da"):
        assert torch.equal(r0[key], r1[key]), f"{key} differs between ranks"
    for r in (r0, r1):  # each rank's labeled samples land in their rows on every rank
        assert torch.equal(r0["labeled"][r["indices"]], r["feats"])
    assert r0["labeled"][[3, 7]].abs().sum() == 0
    # FIFO: written at the pointer (6) in rank order, pointer wraps to 0 after the 12-row bank is full
    assert torch.equal(r0["unlabeled"][6:], torch.cat([r0["feats"], r1["feats"]]))
    assert torch.equal(r0["unlabeled_probs"][6:], torch.cat([r0["probs"], r1["probs"]]))
    assert r0["unlabeled"][:6].abs().sum() == 0 and int(r0["ptr"]) == 0
    global_mean = torch.cat([r0["probs"], r1["probs"]]).mean(0, keepdim=True)
    torch.testing.assert_close(r0["da"], 0.9 / C + 0.1 * global_mean)

"""CoACT (zoo/coact): the losses against the official code, the asynchronous teacher, what trains when, the
prototype classifier and the few-shot session stream.

Golden numbers: ``ShuvenduRoy/CoACT-FSCIL`` at commit e11721c, ``losses/contrastive.py::SupConLoss()`` (T = 0.07,
mode "all") and the consistency term of ``methods/helper.py::inc_train_one_epoch`` (``F.mse_loss(logits,
logits_base)``), run on CPU on the inputs drawn below (``torch.manual_seed(0)``, then the draws in this order).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.coact.data import FewShotIncrementalDataModule
from zoo.coact.module import CoACT, ViTBackbone, consistency_loss, supcon_loss

GOLDEN_SUPCON_2_VIEWS = 10.42756175994873   # base session: [student query, teacher key]
GOLDEN_SUPCON_3_VIEWS = 11.369647979736328  # incremental: [student query, base teacher key, pretrained key]
GOLDEN_MSE = 1.5436570644378662
LABELS = torch.tensor([0, 1, 0, 2, 1, 3])  # class 3 has a single sample: the official "no positive" edge case


def golden_inputs():
    torch.manual_seed(0)
    views2 = F.normalize(torch.randn(6, 2, 5), dim=-1)
    views3 = F.normalize(torch.randn(6, 3, 5), dim=-1)
    logits, base_logits = torch.randn(4, 7), torch.randn(4, 7)
    return views2, views3, logits, base_logits


def test_losses_match_the_official_code():
    views2, views3, logits, base_logits = golden_inputs()
    assert views2[0, 0, 0].item() == pytest.approx(-0.5961249470710754, abs=1e-7)  # the same draws as the reference
    assert supcon_loss(views2, LABELS, 0.07).item() == pytest.approx(GOLDEN_SUPCON_2_VIEWS, rel=1e-5)
    assert supcon_loss(views3, LABELS, 0.07).item() == pytest.approx(GOLDEN_SUPCON_3_VIEWS, rel=1e-5)
    assert consistency_loss(logits, base_logits).item() == pytest.approx(GOLDEN_MSE, rel=1e-6)


def tiny_coact(**kwargs) -> CoACT:
    torch.manual_seed(0)
    backbone = ViTBackbone("vit_tiny_patch16_224", pretrained=False,
                           model_kwargs=dict(img_size=16, patch_size=4, depth=3, embed_dim=24, num_heads=2))
    return CoACT(backbone, num_classes=10, **{"tune_from_block": None, **kwargs})


def test_teacher_has_no_lora_and_only_its_heads_move_while_the_backbone_is_frozen():
    model = tiny_coact(projection_layers=1, lora_rank=4)
    teacher = dict(model.teacher.module.named_parameters())
    assert teacher and not any("lora_" in n for n in teacher)
    assert any("lora_" in n for n, _ in model.network.named_parameters())
    before = {n: p.clone() for n, p in teacher.items()}
    with torch.no_grad():  # a "training step": the trainable student parameters move
        for p in model.network.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model.teacher.update(model.shared_weights(), 0.9)
    student = {n.replace(".base_layer", ""): p for n, p in model.network.named_parameters() if "lora_" not in n}
    for name, p in model.teacher.module.named_parameters():
        expected = 0.9 * before[name] + 0.1 * student[name]
        torch.testing.assert_close(p, expected)
        moved = not torch.equal(p, before[name])
        assert moved == (not name.startswith("backbone.")), name  # frozen backbone: the teacher's stays pretrained


def trainable(model: CoACT) -> set[str]:
    return {n for n, p in model.network.named_parameters() if p.requires_grad}


def test_what_trains_in_each_session():
    model = tiny_coact(lora_rank=4, tune_from_block=1, tune_from_epoch=2, incremental_tuning="classifier")
    lora = {n for n, _ in model.network.named_parameters() if "lora_" in n}
    assert lora and all(".query." in n or ".value." in n for n in lora)  # the official targets: query and value
    assert {n.split(".blocks.")[1].split(".")[0] for n in lora} == {"0", "1", "2"}  # every block
    model.set_trainable(session=0, epoch=0)
    assert trainable(model) == lora | {"classifier.weight"}  # LoRA + heads only: the student's PET tuning
    model.set_trainable(session=0, epoch=2)  # controlled fine-tuning: from block 1 on, and the final norm
    tuned = trainable(model) - lora - {"classifier.weight"}
    assert tuned and all(".blocks.1." in n or ".blocks.2." in n or ".norm." in n for n in tuned)
    assert not any(".blocks.0." in n or "patch_embed" in n or "pos_embed" in n for n in tuned)
    model.set_trainable(session=1, epoch=60)
    assert trainable(model) == {"classifier.weight"}
    model.incremental_tuning = "pet"
    model.set_trainable(session=2, epoch=61)
    assert trainable(model) == lora


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="incremental_tuning must be"):
        tiny_coact(incremental_tuning="all")
    with pytest.raises(ValueError, match="lora_rank is 0"):
        tiny_coact(lora_rank=0, incremental_tuning="pet")
    with pytest.raises(ValueError, match="shots must be"):
        FewShotIncrementalDataModule(dataset="usps", shots=0)


@pytest.fixture(scope="module")
def stream():
    dm = FewShotIncrementalDataModule(dataset="usps", base_classes=4, ways=2, shots=5, base_epochs=3,
                                      incremental_epochs=2, batch_size=4, steps_per_epoch=2, image_size=16,
                                      crop_scale=(0.6, 1.0), flip_p=0.0, num_workers=0, download=False)
    dm.setup()
    return dm


def test_session_stream_has_k_shots_of_its_classes_and_tests_on_the_classes_seen(stream):
    assert stream.num_sessions == 4 and stream.num_classes == 10 and stream.total_epochs == 3 + 3 * 2
    seen = set()
    for s, classes in enumerate([[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]):
        labels = stream.data.y_train[stream.session_idx[s]]
        assert sorted(np.unique(labels)) == classes and all((labels == c).sum() == 5 for c in classes)
        assert not seen & set(stream.session_idx[s].tolist())  # sessions never share an image
        seen |= set(stream.session_idx[s].tolist())
    assert [stream.session_of_epoch(e) for e in range(9)] == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    for epoch, session in [(0, 0), (4, 1), (8, 3)]:
        stream.trainer = SimpleNamespace(global_step=epoch * 2, accumulate_grad_batches=1, max_epochs=9,
                                         global_rank=0, world_size=1)
        labels = torch.cat([b["label"] for b in stream.train_dataloader()])
        assert set(labels.tolist()) <= set(stream.session_classes(session).tolist()) and len(labels) == 8
        # validation after this epoch: every test image of the classes seen so far, and only those
        stream.trainer.global_step = (epoch + 1) * 2
        tested = torch.cat([b["label"] for b in stream.val_dataloader()])
        assert tested.max().item() == stream.seen_classes(session) - 1
        assert len(tested) == int((stream.data.y_test < stream.seen_classes(session)).sum())
    stream.trainer = None


def test_prototype_rows_are_the_class_means_of_the_session_features(stream):
    model = tiny_coact(lora_rank=4)
    model.trainer = SimpleNamespace(datamodule=stream)
    before = model.network.classifier.weight.detach().clone()
    model.write_prototypes(session=1)
    images, labels = stream.support(1)
    model.network.eval()
    with torch.no_grad():
        features = model.network.backbone(images)
    after = model.network.classifier.weight.detach()
    for c in (4, 5):
        torch.testing.assert_close(after[c], features[labels == c].mean(0))
    others = [c for c in range(10) if c not in (4, 5)]
    assert torch.equal(after[others], before[others])


def test_sessions_end_to_end_snapshot_the_base_model_and_freeze_what_the_paper_freezes(tmp_path):
    """Two base epochs with controlled fine-tuning of the last block, then three 1-epoch incremental sessions that
    tune the classifier only: the base-session snapshot is the student at the end of the base session, the encoder
    and the adapters stop moving after it, the teacher's tuned block followed the student by EMA, and every
    session's accuracy is recorded."""
    import lightning as L

    dm = FewShotIncrementalDataModule(dataset="usps", base_classes=4, ways=2, shots=2, base_epochs=2,
                                      incremental_epochs=1, batch_size=4, steps_per_epoch=1, image_size=16,
                                      crop_scale=(0.6, 1.0), flip_p=0.0, eval_batch_size=500, num_workers=0,
                                      download=False)
    model = tiny_coact(lora_rank=4, tune_from_block=2, encoder_lr_factor=1.0, incremental_tuning="classifier",
                       incremental_lr_factor=1.0)
    trainer = L.Trainer(max_epochs=5, reload_dataloaders_every_n_epochs=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    assert sorted(model.session_acc) == [0, 1, 2, 3]
    now = dict(model.network.named_parameters())
    base = dict(model.base_student.module.named_parameters())
    pretrained = dict(model.pretrained.module.named_parameters())
    teacher = dict(model.teacher.module.named_parameters())
    block2 = "backbone.vit.blocks.2.mlp.fc1.weight"
    assert not torch.equal(now[block2], pretrained[block2])  # controlled fine-tuning moved the last block ...
    assert torch.equal(now[block2], base[block2])  # ... in the base session only
    assert all(torch.equal(now[n], base[n]) for n in now if "lora_" in n)
    assert not torch.equal(now["classifier.weight"], base["classifier.weight"])
    assert not torch.equal(teacher[block2], pretrained[block2])  # the teacher followed the tuned block by EMA
    assert torch.equal(teacher["backbone.vit.blocks.0.mlp.fc1.weight"], pretrained["backbone.vit.blocks.0.mlp.fc1.weight"])

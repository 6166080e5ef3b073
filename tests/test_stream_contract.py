"""The zoo's one data contract (``zoo.core.data``), checked on every data module at tiny sizes on the offline data.

(a) Global batches: with 2 processes, each one's batch of a step is half of the 1-process global batch of that step,
    and the two halves are disjoint and together the global batch.
(b) Resume: with the trainer at optimizer step k of an epoch (k steps of 2 accumulated batches), the training stream
    yields exactly what the uninterrupted stream yields from batch k (2k) on.

The trainer is a stand-in carrying the attributes the data modules read; Lightning itself does the rest, in
``test_resume.py``. Every subclass of ``StreamDataModule`` in ``zoo`` must have its tiny settings below.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader

import zoo
from zoo.core.data import StreamDataModule
from zoo.lm.tiny import byte_tokenizer

STEPS = 4  # steps_per_epoch of every module (weak-to-strong and preference pairs: one pass, derived)
EPOCH = 1  # the checked epoch: its draws and its position both depend on the epoch
K = 1  # resume after K optimizer steps of the epoch
# A round-based module builds an epoch's round at the first request for that epoch, starting at the trainer's step
# then; so every epoch is first requested at its start, and each accumulation setting gets an epoch of its own.

TINY = {  # constructor arguments: real offline data, a few items per batch, no worker processes
    "zoo.transitive_invariance.data.TransitiveGraphDataModule": dict(
        dataset="digits", patch_size=10, crop_size=8, track_gap=10, num_clusters=2, sequences=["libby", "car-shadow"],
        mining_encoder={"name": "resnet18", "cifar_stem": True, "model_kwargs": {"channels": [4, 8, 8, 8]}},
        batch_size=4, steps_per_epoch=STEPS, num_workers=0, download=False),
    "zoo.semisup.data.SemiSupervisedDataModule": dict(dataset="digits", num_labels=40, batch_size=4, uratio=2,
                                                      steps_per_epoch=STEPS, num_workers=0, download=False),
    "zoo.ict.data.ImageDataModule": dict(dataset="mnist", batch_size=4, steps_per_epoch=STEPS, grayscale=True,
                                         pad_to=32, random_flip=False, num_workers=0, download=False),
    "zoo.ssl.data.SSLDataModule": dict(dataset="digits", batch_size=4, steps_per_epoch=STEPS, num_workers=0,
                                       download=False),
    "zoo.segda.data.SourceTargetDataModule": dict(source="camvid_day", target="camvid_dusk", batch_size=2,
                                                  steps_per_epoch=STEPS, crop_size=(32, 48), num_workers=0),
    "zoo.mic.data.DomainAdaptationDataModule": dict(source="mnist", target="usps", batch_size=4,
                                                    steps_per_epoch=STEPS, num_workers=0),
    "zoo.consistent_teacher.data.DetectionSemiDataModule": dict(
        dataset="raccoon", labeled_percent=20, batch_size=2, uratio=1, steps_per_epoch=STEPS,
        train_short_side=(32, 48), max_long_side=64, num_workers=0),
    "zoo.gen_vs_dis_nb.data.FeatureSubsetDataModule": dict(source="pixels", dataset="digits", m=40, batch_size=4,
                                                           steps_per_epoch=STEPS),
    "zoo.recsys.data.InteractionsDataModule": dict(dataset="movielens100k", split="u1", batch_size=4,
                                                   item_batch_size=4, steps_per_epoch=STEPS),
    "zoo.tabular.data.TabularDataModule": dict(dataset="breast_cancer", batch_size=4, steps_per_epoch=STEPS,
                                               download=False),
    "zoo.timeseries.data.TimeSeriesDataModule": dict(dataset="ECG200", batch_size=4, steps_per_epoch=STEPS,
                                                     num_workers=0),
    "zoo.autows_bench.data.AutoWSDataModule": dict(dataset="youtube", supervision="few_shot", batch_size=4,
                                                   steps_per_epoch=STEPS),
    "zoo.continual.data.TaskStreamDataModule": dict(dataset="digits", num_tasks=5, steps_per_task=3, batch_size=4,
                                                    steps_per_epoch=STEPS, num_workers=0),  # task switches mid-epoch
    "zoo.wscl.data.ManipulationDataModule": dict(train_source="coco_splices", eval_set="casia1_samples", crop_size=32,
                                                 batch_size=4, steps_per_epoch=STEPS, num_workers=0),
    "zoo.coact.data.FewShotIncrementalDataModule": dict(dataset="usps", base_classes=4, ways=2, shots=5, base_epochs=1,
                                                        incremental_epochs=1, batch_size=4, steps_per_epoch=STEPS,
                                                        image_size=16, num_workers=0, download=False),
    "zoo.mdcs.data.LongTailedDataModule": dict(dataset="digits", imbalance_ratio=10, batch_size=4,
                                               steps_per_epoch=STEPS, num_workers=0, download=False),
    "zoo.fewshot.data.BaseClassDataModule": dict(dataset="digits", base_classes=[0, 1, 2, 3, 4], batch_size=4,
                                                 steps_per_epoch=STEPS, num_workers=0),
    "zoo.itta.data.DomainGeneralizationDataModule": dict(dataset="pacs_64px_subset", test_domain="sketch",
                                                         batch_size=4, image_size=64, steps_per_epoch=STEPS,
                                                         num_workers=0),
    "zoo.ferkd.data.SoftLabelDataModule": dict(  # no teacher run here: a linear stand-in labels the crops in memory
        store="absent_ferkd_store.pt", dataset="digits", num_crops=2, batch_size=8, steps_per_epoch=STEPS,
        num_workers=0, download=False, standin_crops_per_image=4,
        generate_missing_with=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))),
    "zoo.spl_web_video.data.WebVideoDataModule": dict(dataset="digits", num_labels=50, batch_size=4, uratio=2,
                                                      steps_per_epoch=STEPS, num_workers=0, download=False),
    "zoo.hle_plfms.data.HLEDataModule": dict(dataset="cifar10_subset", per_class=6, batch_size=4, online_iter=0.5,
                                             steps_per_epoch=STEPS, num_workers=0, download=False),
    "zoo.lm.tiny.TextDataModule": dict(block_size=16, batch_size=4, steps_per_epoch=STEPS),
    "zoo.lm.tiny.SFTDataModule": dict(task="two_digit_arithmetic", batch_size=4, steps_per_epoch=STEPS),
    "zoo.ul2.data.UL2DataModule": dict(block_size=16, batch_size=4, steps_per_epoch=STEPS, val_windows=4,
                                       cloze_questions=4),
    "zoo.lm.rounds.RoundDataModule": dict(prompts="two_digit_arithmetic", prompts_per_round=8, batch_size=4,
                                          steps_per_epoch=STEPS),
    "zoo.weak_to_strong.data.WeakToStrongDataModule": dict(n_docs=32, n_test_docs=8, batch_size=4),  # 16 / 4 steps
    "zoo.reward_consistency.data.PreferenceDataModule": dict(n_test=8, n_train=16, max_length=32, batch_size=4,
                                                             contrast_min_similarity=0.3),  # 16 / 4 steps
}


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def stream_data_modules() -> dict[str, type]:
    """Every data module of the zoo, found by importing every module of the package."""
    for info in pkgutil.walk_packages(zoo.__path__, "zoo."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    return {f"{cls.__module__}.{cls.__qualname__}": cls for cls in _subclasses(StreamDataModule)}


DATA_MODULES = stream_data_modules()


def test_every_data_module_is_checked():
    assert DATA_MODULES.keys() - TINY.keys() == set(), "add tiny settings for these data modules to TINY"
    for name in ("zoo.lm.tiny.TextDataModule", "zoo.lm.tiny.SFTDataModule", "zoo.lm.rounds.RoundDataModule",
                 "zoo.weak_to_strong.data.WeakToStrongDataModule", "zoo.reward_consistency.data.PreferenceDataModule"):
        assert name in DATA_MODULES


class RoundModule:
    """What a round-based method hands the data module: a round of ``round_sizes[r]`` examples, the same on every
    process (what pooling over processes gives), and their collation. Also the tokenizer SFT reads."""

    def __init__(self, round_sizes: dict[int, int] | None = None):
        self.round_sizes = round_sizes or {}
        self.built: list[int] = []
        self.network = SimpleNamespace(tokenizer=byte_tokenizer())

    def build_round(self, prompts, round_index):
        self.built.append(round_index)
        return [{"idx": 100 * round_index + i} for i in range(self.round_sizes.get(round_index, 24))]

    def collate(self, examples):
        return {"idx": torch.tensor([e["idx"] for e in examples])}


@dataclass
class FakeTrainer:
    """The trainer attributes the data modules read."""
    global_rank: int = 0
    world_size: int = 1
    global_step: int = 0
    accumulate_grad_batches: int = 1
    current_epoch: int = 0
    reload_dataloaders_every_n_epochs: int = 1
    lightning_module: RoundModule = field(default_factory=RoundModule)


def _indices(batch) -> list[int]:
    return batch["idx"].tolist()


def epoch_of(dm: StreamDataModule, trainer: FakeTrainer) -> list[list[list[int]]]:
    """Per training stream, per step: the item indices this process's loader yields, with ``trainer`` attached."""
    dm.trainer = trainer
    loader = dm.train_dataloader()
    streams = loader.flattened if isinstance(loader, CombinedLoader) else [loader]
    out = []
    for stream in streams:
        stream.sampler.set_epoch(trainer.current_epoch)  # as Lightning does at an epoch's start
        out.append([_indices(batch) for batch in stream])
    return out


@pytest.fixture(scope="module", params=sorted(DATA_MODULES))
def data_module(request):
    cls = DATA_MODULES[request.param]
    dm = cls(**TINY[request.param])
    dm.trainer = FakeTrainer()
    dm.setup("fit")
    return dm


def start_of_epoch(dm, epoch: int = EPOCH, accumulate: int = 1, **trainer) -> FakeTrainer:
    # the same method stand-in throughout, as a round is built once
    return FakeTrainer(current_epoch=epoch, global_step=epoch * dm.steps_per_epoch // accumulate,
                       accumulate_grad_batches=accumulate, lightning_module=dm.trainer.lightning_module, **trainer)


def test_each_process_gets_its_half_of_every_global_batch(data_module):
    dm = data_module
    whole = epoch_of(dm, start_of_epoch(dm))
    shards = [epoch_of(dm, start_of_epoch(dm, global_rank=rank, world_size=2)) for rank in (0, 1)]
    assert all(len(steps) == dm.steps_per_epoch for steps in whole)
    for stream, global_steps in enumerate(whole):
        for step, global_batch in enumerate(global_steps):
            first, second = shards[0][stream][step], shards[1][stream][step]
            assert len(first) == len(second) == len(global_batch) // 2, (stream, step)
            assert Counter(first) + Counter(second) == Counter(global_batch), (stream, step)
            if len(set(global_batch)) == len(global_batch):  # a pool smaller than the batch repeats items
                assert not set(first) & set(second), (stream, step)


@pytest.mark.parametrize("accumulate, epoch", [(1, EPOCH), (2, EPOCH + 1)])
def test_resumed_stream_continues_where_the_interrupted_one_was(data_module, accumulate, epoch):
    dm = data_module
    uninterrupted = epoch_of(dm, start_of_epoch(dm, epoch, accumulate))
    interrupted = start_of_epoch(dm, epoch, accumulate)
    interrupted.global_step += K
    assert epoch_of(dm, interrupted) == [steps[K * accumulate:] for steps in uninterrupted]


def test_global_batch_must_split_over_the_processes(data_module):
    dm = data_module
    with pytest.raises(ValueError, match="not divisible"):
        epoch_of(dm, start_of_epoch(dm, world_size=3))


# ---------------------------------------------------------------------------------------------- rounds
def round_data(**kwargs):
    from zoo.lm.rounds import RoundDataModule

    dm = RoundDataModule(prompts="two_digit_arithmetic", prompts_per_round=8, batch_size=4, **kwargs)
    dm.setup("fit")
    return dm


def test_a_round_resumes_from_the_checkpoint_without_being_rebuilt():
    """Rounds of 8 then 12 examples (one pass each: 2 then 3 steps). A run interrupted one step into round 1
    resumes from its checkpoint's copy of the round: building it again would sample from other weights."""
    method = RoundModule({0: 8, 1: 12})
    straight = round_data()
    round0 = epoch_of(straight, FakeTrainer(lightning_module=method))
    round1 = epoch_of(straight, FakeTrainer(current_epoch=1, global_step=2, lightning_module=method))
    assert [len(round0[0]), len(round1[0])] == [2, 3] and method.built == [0, 1]
    straight.trainer.global_step = 3  # the checkpoint after round 1's first step
    checkpoint = straight.state_dict()

    resumed = round_data()
    resumed.load_state_dict(checkpoint)
    # Lightning builds a loader before restoring its loops (step 0, epoch 0) to count an LR schedule's steps: it
    # counts the first round's 2 steps, as the interrupted run did
    resumed.trainer = FakeTrainer(lightning_module=method)
    assert len(resumed.train_dataloader()) == 2
    assert epoch_of(resumed, FakeTrainer(current_epoch=1, global_step=3, lightning_module=method)) == \
        [round1[0][1:]]
    assert method.built == [0, 1]  # no round was sampled again


def test_rounds_need_a_new_loader_every_epoch():
    dm = round_data(steps_per_epoch=2)
    dm.trainer = FakeTrainer(reload_dataloaders_every_n_epochs=0)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        dm.train_dataloader()

"""FST: the look-ahead update order against the official ``train_step`` (the sweep runs the paper setting on its
CamVid stand-in).

The expected traces come from RUNNING the official ``train_step`` of usr922/FST
@ 5b44c0154dd7e6e10e7511360d16ca2f942b3b51 (``mmseg/models/uda/fst_d.py`` class FSTD, ``fst_w.py`` class FSTW; script /tmp/fst_ref/trace.py, kept out of the
repo: the method is extracted by AST and called for 3 real iterations with K = 3 on a stand-in ``self`` that records
forwards (incrementing ``local_iter`` as the real ``forward_train`` does), optimizer steps, EMA updates with their
momentum min(1 - 1/(local_iter+1), 0.999), and parameter restores). Saving, soup bookkeeping and the iteration-0
teacher copy are not events here (the zoo's teacher starts as a copy of the student).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch import Callback

from helpers import build
from zoo.segda.host import DAFormerSelfTraining, ema_alpha
from zoo.fst.module import forwards_before

ROOT = Path(__file__).resolve().parents[1]
F, S, R = ("forward",), ("step",), ("restore",)


def E(alpha):
    return ("ema", alpha)


OFFICIAL = {  # printed by /tmp/fst_ref/trace.py (alphas rounded to 6 decimals)
    "deep": [F, S, E(0.5),
             E(0.5), F, S, E(0.666667), F, S, E(0.75), F, S, E(0.8), R, F, S,
             E(0.833333), F, S, E(0.857143), F, S, E(0.875), F, S, E(0.888889), R, F, S],
    "wide": [F, S, E(0.5),
             F, S, R, F, S, R, F, S, E(0.8), R, F, S, E(0.833333),
             F, S, R, F, S, R, F, S, E(0.888889), R, F, S, E(0.9)],
}
# the same order with the CPU configs' alpha ceiling (0.99 instead of the official 0.999) does not change any of
# the momenta above: they are all still on the 1 - 1/(n+1) ramp.


def test_forward_count_matches_official_local_iter():
    assert [forwards_before(r, 3) for r in range(4)] == [0, 1, 5, 9]


@pytest.mark.parametrize("variant", ["deep", "wide"])
def test_update_order_matches_official(variant, tmp_path, monkeypatch):
    config = "fst_camvid_day_dusk" if variant == "deep" else "fst_camvid_day_dusk_wide"
    cli = build(ROOT / "experiments" / f"{config}.yaml", tmp_path, "--trainer.limit_val_batches=0")
    model, events = cli.model, []
    host_step = DAFormerSelfTraining.training_step

    def recording_forward(self, batch, batch_idx):
        events.append(F)
        return host_step(self, batch, batch_idx)

    monkeypatch.setattr(DAFormerSelfTraining, "training_step", recording_forward)
    update, restore = model.update_teacher, model.restore
    monkeypatch.setattr(model, "update_teacher",
                        lambda params, n: (events.append(E(round(ema_alpha(n, model.alpha), 6))), update(params, n)))
    monkeypatch.setattr(model, "restore", lambda saved: (events.append(R), restore(saved)))

    class RecordSteps(Callback):
        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            original = optimizer.step

            def step(closure=None):
                out = original(closure) if closure is not None else original()
                events.append(S)
                return out
            optimizer.step = step

    cli.trainer.callbacks.append(RecordSteps())
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert events == OFFICIAL[variant]

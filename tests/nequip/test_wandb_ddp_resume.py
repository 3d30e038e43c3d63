"""Training infrastructure through the real ``nequip-train`` CLI (subprocesses, no mocks):

* W&B (offline): UQ metrics next to NequIP's own, and the test-time UQ plots of
  :class:`nequip_ext.UQPlotsCallback` as images, read back from the run's ``.wandb`` file;
* DDP (2 CPU processes, gloo): a 2-process training run, and test metrics of 1 vs 2 processes on
  the same checkpoint and data agree;
* resume from ``last.ckpt``: epoch/step counters continue and the restored head equals the saved one.

The data are the shipped iso7 files (19 atoms per frame). Test sets for the DDP comparison have a
frame count divisible by the world size (iso7_test: 100, iso7_ood_mol: 120): Lightning's
``DistributedSampler`` pads a test set of odd size with repeated frames, which would change the
metrics (iso7_ood_hot has 125 frames and is used only in the single-process W&B test).
"""

import hashlib
import math

import numpy as np
import pytest
import torch

from e2ip_plugins.metrics import COLUMNS, compute_metrics

from ._cli_helpers import (
    PLOT_NAMES,
    UQ_NAMES,
    csv_last_values,
    data,
    head_state,
    load_ckpt,
    model_from_checkpoint,
    nequip_train,
    read_wandb_run,
    wandb_logger,
)

ATOMS = 19
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _columns(run_dir, idx):
    with np.load(run_dir / "uq_plots" / f"test{idx}_columns.npz") as z:
        return {c: z[c] for c in COLUMNS}


# ------------------------------------------------------------------------------------------- W&B
def test_wandb_offline_uq_metrics_and_images(tmp_path):
    run = tmp_path / "wandb_run"
    nequip_train(
        run,
        "max_epochs=1",
        f"train_file={data('val')}",
        f"test_file=[{data('test')},{data('ood_hot')}]",
        *wandb_logger(run),
    )
    wb = read_wandb_run(run)
    summary, history = wb["summary"], wb["history"]

    # scalar UQ metrics under NequIP's own prefixes, next to its RMSE/MAE
    for prefix in ("val0_epoch", "test0_epoch", "test1_epoch"):
        for name in UQ_NAMES + ("forces_mae", "forces_coverage_50", "forces_ence", "forces_sharpness"):
            key = f"{prefix}/{name}"
            assert key in summary, (key, sorted(summary))
            assert math.isfinite(summary[key]), key
        for name in ("forces_auroc", "forces_coverage_90", "forces_coverage_50", "forces_miscal_area"):
            assert 0.0 <= summary[f"{prefix}/{name}"] <= 1.0
        assert summary[f"{prefix}/forces_sharpness"] > 0.0

    # images: one history row per test set with the three plots, each a PNG whose bytes equal the
    # file the callback wrote to disk
    images = {}
    for row in history:
        for k, v in row.items():
            if k.endswith("/_type") and v == "image-file":
                base = k[: -len("/_type")]
                images[base] = {f: row[f"{base}/{f}"] for f in ("path", "sha256", "width", "height")}
    expected = {f"test{i}/{n}" for i in (0, 1) for n in PLOT_NAMES}
    assert set(images) == expected, sorted(images)
    for key, img in images.items():
        tag, name = key.split("/")
        media = wb["run_dir"] / "files" / img["path"]
        disk = run / "uq_plots" / f"{tag}_{name}.png"
        assert media.is_file() and disk.is_file(), (media, disk)
        assert disk.read_bytes()[:8] == PNG_MAGIC
        assert _sha256(media) == _sha256(disk) == img["sha256"], key
        assert img["width"] >= 300 and img["height"] >= 300
        pixels = __import__("matplotlib.image", fromlist=["imread"]).imread(disk)
        assert pixels.std() > 0.01  # not a blank canvas

    # the plotted atoms are exactly those behind the logged test metrics
    for idx, frames in ((0, 100), (1, 125)):
        cols = _columns(run, idx)
        assert len(cols["e"]) == frames * ATOMS
        recomputed = compute_metrics(cols)
        for name in UQ_NAMES:
            assert recomputed[name] == pytest.approx(summary[f"test{idx}_epoch/{name}"], rel=1e-9, abs=1e-12), name


# ------------------------------------------------------------------------------------------- DDP
def test_ddp_two_processes_match_one_process(tmp_path):
    tests = f"test_file=[{data('test')},{data('ood_mol')}]"  # 100 and 120 frames: divisible by 2
    common = (f"train_file={data('val')}", tests)
    ddp = ("trainer.strategy=ddp", "trainer.devices=2")

    # a short 2-process training run
    train = tmp_path / "ddp_train"
    res = nequip_train(train, "run=[train]", "max_epochs=1", *common, *ddp)
    out = res.stdout + res.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out and "distributed_backend=gloo" in out
    ckpt = train / "best.ckpt"
    # 100 training frames split over 2 ranks at batch size 5: 10 optimizer steps (1 process: 20)
    assert load_ckpt(ckpt)["global_step"] == 10

    # test-only runs from that checkpoint (NequIP's ModelFromCheckpoint builder), 1 and 2 processes
    one, two = tmp_path / "test_1proc", tmp_path / "test_2proc"
    nequip_train(one, "run=[test]", *common, *model_from_checkpoint(ckpt))
    nequip_train(two, "run=[test]", *common, *ddp, *model_from_checkpoint(ckpt))

    m1, m2 = csv_last_values(one), csv_last_values(two)
    for idx in (0, 1):
        for name in UQ_NAMES + ("forces_coverage_50", "forces_ence", "forces_sharpness", "forces_mae"):
            key = f"test{idx}_epoch/{name}"
            assert math.isfinite(m1[key]), key
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-9), key
        # the UQ plots of the 2-process run are built from all atoms of both ranks (gathered, no duplicates)
        c1, c2 = _columns(one, idx), _columns(two, idx)
        assert len(c1["e"]) == len(c2["e"]) == (100, 120)[idx] * ATOMS
        for c in ("e", "u", "nll", "pit"):
            np.testing.assert_allclose(np.sort(c2[c]), np.sort(c1[c]), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------- resume
def test_resume_from_last_ckpt_continues(tmp_path):
    # shuffle off: NequIP 0.19.1's datamodule does not restore the training data order on resume
    # (Lightning calls its setup(), which creates the shuffle generator, before load_state_dict(), which
    # only stores the saved generator state), so with shuffling the resumed epoch sees another order
    # than an uninterrupted run; without it the two runs must agree
    files = (f"train_file={data('val')}", f"val_file={data('test')}", "run=[train]", "data.train_dataloader.shuffle=false")
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"

    nequip_train(a, "max_epochs=1", *files)
    ck_a = load_ckpt(a / "last.ckpt")
    steps = ck_a["global_step"]
    assert ck_a["epoch"] == 0 and steps == 20  # 100 frames / batch 5

    # resume to epoch 2 with a probe that dumps the module state when training (re)starts
    probe = b / "start_state.pt"
    callbacks = (
        "trainer.callbacks=["
        f"{{_target_: lightning.pytorch.callbacks.ModelCheckpoint, monitor: val0_epoch/weighted_sum, dirpath: {b}, "
        "filename: best, save_last: true},"
        "{_target_: nequip_ext.NoveltyFitCallback},"  # as in the shipped config: refits the novelty buffers
        f"{{_target_: tests.nequip._cli_helpers.TrainStartStateDump, out_file: {probe}}}]"
    )
    nequip_train(b, "max_epochs=2", *files, f"+ckpt_path={a / 'last.ckpt'}", callbacks)
    start = torch.load(probe, weights_only=False)
    assert start["current_epoch"] == 1 and start["global_step"] == steps

    # the head (and everything else, incl. EMA weights) at resume start is what last.ckpt saved
    saved_head = head_state(ck_a["state_dict"])
    assert len(saved_head) >= 4, sorted(ck_a["state_dict"])
    saved = {k: v for k, v in ck_a["state_dict"].items() if torch.is_tensor(v)}
    assert set(saved) <= set(start["state_dict"])
    for k, v in saved.items():
        assert torch.equal(start["state_dict"][k], v), k

    ck_b = load_ckpt(b / "last.ckpt")
    assert ck_b["epoch"] == 1 and ck_b["global_step"] == 2 * steps

    # ... and the resumed run is the uninterrupted 2-epoch run (optimizer and EMA state restored)
    nequip_train(c, "max_epochs=2", *files)
    ck_c = load_ckpt(c / "last.ckpt")
    assert ck_c["global_step"] == 2 * steps
    head_b, head_c = head_state(ck_b["state_dict"]), head_state(ck_c["state_dict"])
    assert set(head_b) == set(head_c) == set(saved_head)
    moved = 0.0
    for k in saved_head:
        torch.testing.assert_close(head_b[k], head_c[k], rtol=1e-5, atol=1e-7, msg=k)
        if head_b[k].numel():
            moved = max(moved, float((head_b[k].double() - saved_head[k].double()).abs().max()))
    assert moved > 1e-4  # the second epoch did train the head
    for k in ck_c["state_dict"]:
        if k.startswith("ema."):
            torch.testing.assert_close(ck_b["state_dict"][k], ck_c["state_dict"][k], rtol=1e-5, atol=1e-7, msg=k)

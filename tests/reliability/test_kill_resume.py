"""Interruption: a trainer killed with SIGKILL resumes to bitwise the weights of an uninterrupted run.

Each trainer (``tools.train_tokenizer``, ``tools.train_lm``; tiny presets, phantom data, CPU, fp32,
``trainer.deterministic=true``) is run once without interruption to step S. A second run of the same
command in a fresh directory is killed with SIGKILL at a random moment after a checkpoint reached a random
step, restarted (it resumes from ``<run_dir>/checkpoints/last.ckpt``), killed again, and restarted to the
end; its exported weights must equal the uninterrupted run's bit for bit. The checkpoint intervals do not
divide the epoch, so at least one kill of each run lands mid-epoch: the data position, the random
generators and the optimizer state all have to come back.

The runs are forked children of this process (a fresh interpreter spends 10-30 s importing torch,
Lightning and Hydra on a busy 2-core machine); the ``slow`` test does the same through the command line,
``python -m tools.train_* ...`` in new interpreters. The last test kills a process that writes checkpoints
in a loop with the trainers' own writer and loads whatever ``last.ckpt`` it left each time.

``encode_dataset`` killed and restarted: tests/tools/test_encode_dataset.py::
test_sigkill_then_resume_equals_an_uninterrupted_run; the shard writer: tests/tokenizer/test_shards.py::
test_sigkill_loses_no_finished_row.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tools.schemas import compose
from tools.trainer import TrainerConfig, build_trainer, last_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FORK = multiprocessing.get_context("fork")
KILLS_PER_RUN = 2
RUN_TIMEOUT_S = 240

COMMON = ["trainer.progress_bar=false", "trainer.val_every_n_steps=0", "trainer.precision=32-true",
          "trainer.deterministic=true", "trainer.log_every_n_steps=1"]  # fmt: skip
TOKENIZER = [*COMMON, "tokenizer=tiny", "stage=visual", "data.num_train=8", "data.num_val=4",
             "data.batch_size=4", "optim.warmup_steps=2", "loss.lpips_weight=0", "loss.gan_start=3",
             "loss.gan_ramp_steps=2"]  # fmt: skip
"""2 batches per epoch; the GAN, the alignment teacher and the discriminator's optimizer all take part."""
LM = [*COMMON, "lm=tiny", "data.batch_size=4", "text_vocab_size=300", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def lm_inputs(make_lm_inputs) -> list[str]:
    """Overrides naming a tiny tokenizer checkpoint and a 12-row phantom shard it encoded."""
    checkpoint, shard = make_lm_inputs("Which modality?")
    return [f"tokenizer.checkpoint={checkpoint}", f"data.shard_dirs=[{shard}]"]


# ------------------------------------------------------------------------------------------- helpers
def _train(config_name: str, overrides: list[str]) -> None:
    """The body of ``python -m tools.<config_name> overrides…`` (runs in a forked child)."""
    torch.set_num_threads(1)
    if config_name == "train_tokenizer":
        from tools.train_tokenizer import train
    else:
        from tools.train_lm import train
    train(compose(config_name, overrides))


def _start(config_name: str, overrides: list[str]):
    proc = FORK.Process(target=_train, args=(config_name, overrides))
    proc.start()
    return proc


def _run_to_end(config_name: str, overrides: list[str]) -> None:
    proc = _start(config_name, overrides)
    proc.join(RUN_TIMEOUT_S)
    assert proc.exitcode == 0, f"{config_name} {overrides} ended with {proc.exitcode}"


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _alive(proc) -> bool:
    return proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()


def _reap(proc) -> int:
    if isinstance(proc, subprocess.Popen):
        return proc.wait(60)
    proc.join(60)
    return proc.exitcode


def _kill_after_step(proc, ckpt: Path, min_step: int, rng: random.Random, delay_until: int = 10**9) -> int:
    """SIGKILL ``proc`` once ``ckpt`` holds step >= ``min_step``; the step it holds then.

    The kill lands a random moment later (mid-step, mid-save, between steps), or at once when the checkpoint
    reaches ``delay_until``, so a run near its end cannot finish before the kill.
    """
    deadline, seen, kill_at = time.monotonic() + RUN_TIMEOUT_S, None, None
    while _alive(proc) and time.monotonic() < deadline:
        try:
            stamp = ckpt.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp != seen:
            seen = stamp
            step = _checkpoint_step(ckpt)
            if step >= min_step and (kill_at is None or step >= delay_until):
                kill_at = time.monotonic() + (rng.uniform(0.0, 0.3) if step < delay_until else 0.0)
        if kill_at is not None and time.monotonic() >= kill_at:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    code = _reap(proc)
    assert code == -signal.SIGKILL, f"the run ended ({code}) before it could be killed"
    return _checkpoint_step(ckpt)


def _assert_same_weights(path_a: Path, path_b: Path) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert sorted(a) == sorted(b)
    differing = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} of {len(a)} tensors differ after resuming, e.g. {differing[:5]}"


def _kill_and_finish(config_name, overrides, run_dir: Path, steps: int, every: int, seed: int) -> list[int]:
    """Kill a run KILLS_PER_RUN times after random checkpoints, restarting it each time, then let it finish.

    Returns the steps of the checkpoints each kill left behind.
    """
    rng = random.Random(seed)
    ckpt, killed_at = run_dir / "checkpoints" / "last.ckpt", []
    # the last target leaves two checkpoint intervals to go, so the run cannot end before the kill lands
    targets = sorted(rng.sample(range(every, steps - 2 * every + 1, every), KILLS_PER_RUN))
    for target in targets:
        target = min(max(target, killed_at[-1] + every), steps - every) if killed_at else target
        proc = _start(config_name, overrides)
        step = _kill_after_step(proc, ckpt, target, rng, delay_until=steps - 2 * every + 1)
        assert target <= step < steps
        killed_at.append(step)
    _run_to_end(config_name, overrides)
    assert _checkpoint_step(ckpt) == steps
    return killed_at


# ------------------------------------------------------------------------------------------- tests
def test_tokenizer_trainer_killed_twice_resumes_to_the_same_weights(tmp_path):
    steps, every = 12, 3  # checkpoints at 3, 6, 9; 3 and 9 fall mid-epoch (2 batches per epoch)
    args = [*TOKENIZER, f"trainer.max_steps={steps}", f"trainer.checkpoint_every_n_steps={every}"]
    _run_to_end("train_tokenizer", [*args, f"run_dir={tmp_path / 'clean'}"])
    killed = tmp_path / "killed"
    killed_at = _kill_and_finish("train_tokenizer", [*args, f"run_dir={killed}"], killed, steps, every, 7)
    assert len(killed_at) == KILLS_PER_RUN and any(k % 2 for k in killed_at)  # at least one mid-epoch
    _assert_same_weights(
        tmp_path / "clean/tokenizer/model.safetensors", killed / "tokenizer/model.safetensors"
    )


def test_lm_trainer_killed_twice_resumes_to_the_same_weights(tmp_path, lm_inputs):
    steps, every = 25, 5  # 6 batches per epoch: checkpoints at 5, 10, 15, 20 fall mid-epoch
    args = [*LM, *lm_inputs, f"trainer.max_steps={steps}", f"trainer.checkpoint_every_n_steps={every}"]
    _run_to_end("train_lm", [*args, f"run_dir={tmp_path / 'clean'}"])
    killed = tmp_path / "killed"
    killed_at = _kill_and_finish("train_lm", [*args, f"run_dir={killed}"], killed, steps, every, 11)
    assert len(killed_at) == KILLS_PER_RUN and any(k % 6 for k in killed_at)
    _assert_same_weights(tmp_path / "clean/model/lm.safetensors", killed / "model/lm.safetensors")


# ------------------------------------------------------------------------------------------- atomic saves
NUM_SAVE_KILLS = 12


def _save_forever(path: Path, staging: str) -> None:
    """Write checkpoints of growing step through the trainers' own writer until killed."""
    tempfile.tempdir = staging  # where a writer that stages in the temp folder (Lightning's default) stages
    writer = build_trainer(TrainerConfig(accelerator="cpu", devices=1, progress_bar=False),
                           path.parent).strategy.checkpoint_io  # fmt: skip
    step = 0
    while True:
        step += 1
        writer.save_checkpoint(
            {"global_step": step, "state_dict": {"w": torch.full((2**21,), float(step))}}, path
        )


def _staging_folder(target: Path) -> str:
    """A temp folder on another file system than ``target`` when the machine has one (/dev/shm)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != target.stat().st_dev:
        return tempfile.mkdtemp(dir=shm)
    return tempfile.mkdtemp()


def test_a_kill_during_checkpoint_saving_never_leaves_a_corrupt_last_ckpt(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    staging = _staging_folder(path.parent)
    try:
        last_step = _kill_savers(path, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    assert last_step > 1  # the kills did land while checkpoints were being rewritten
    assert last_checkpoint(tmp_path) == path  # resuming deletes what interrupted saves left behind
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def _kill_savers(path: Path, staging: str) -> int:
    """NUM_SAVE_KILLS times: start a saver, kill it at a random moment, load what it left; the last step."""
    rng, last_step = random.Random(3), 0
    for _ in range(NUM_SAVE_KILLS):
        proc = FORK.Process(target=_save_forever, args=(path, staging))
        proc.start()
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        state = torch.load(path, map_location="cpu", weights_only=True)  # must never be half a file
        step = state["global_step"]
        assert torch.equal(state["state_dict"]["w"], torch.full((2**21,), float(step))) and step >= 1
        last_step = max(last_step, step)
    return last_step


def test_the_trainers_write_checkpoints_by_renaming_a_finished_file_in_the_same_folder(tmp_path, monkeypatch):
    """Why no kill can corrupt ``last.ckpt`` on any file system layout: it only ever appears by ``os.replace``
    of a complete, fsynced file from its own folder. (Lightning's default writer stages the bytes in the
    system temp folder and moves them, a copy when that folder is on another file system.)"""
    path = tmp_path / "checkpoints" / "last.ckpt"
    renames, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(
        os, "replace", lambda a, b: (renames.append((Path(a), Path(b))), real_replace(a, b))[1]
    )
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    writer = build_trainer(TrainerConfig(accelerator="cpu", devices=1, progress_bar=False),
                           tmp_path).strategy.checkpoint_io  # fmt: skip
    writer.save_checkpoint({"global_step": 3}, path)
    assert len(renames) == 1 and synced
    staged, target = renames[0]
    assert target == path and staged.parent == path.parent and not staged.exists()
    assert torch.load(path, weights_only=True) == {"global_step": 3}


# ------------------------------------------------------------------------------------------- command line
_BOOT = "import runpy, sys, torch; torch.set_num_threads(1); sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')"


def _cli(module: str, overrides: list[str], log: Path) -> subprocess.Popen:
    """``python -m module overrides…`` in a new interpreter, one thread, output to ``log``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _BOOT, module, *overrides]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.parametrize("config_name", ["train_tokenizer", "train_lm"])
def test_command_line_run_killed_and_restarted_resumes_to_the_same_weights(tmp_path, lm_inputs, config_name):
    steps, every = 15, 3
    base = TOKENIZER if config_name == "train_tokenizer" else [*LM, *lm_inputs]
    args = [*base, f"trainer.max_steps={steps}", f"trainer.checkpoint_every_n_steps={every}"]
    weights = "tokenizer/model.safetensors" if config_name == "train_tokenizer" else "model/lm.safetensors"
    _run_to_end(config_name, [*args, f"run_dir={tmp_path / 'clean'}"])
    killed, rng = tmp_path / "killed", random.Random(5)
    command = [*args, f"run_dir={killed}"]
    proc = _cli(f"tools.{config_name}", command, tmp_path / "killed.log")
    step = _kill_after_step(
        proc, killed / "checkpoints/last.ckpt", rng.randrange(every, steps - every, every), rng
    )
    assert step < steps and not (killed / weights).exists()
    restarted = _cli(f"tools.{config_name}", command, tmp_path / "restarted.log")
    code, log = restarted.wait(600), (tmp_path / "restarted.log").read_text()
    assert code == 0, log[-3000:]
    assert "Restored all states from the checkpoint" in log
    _assert_same_weights(tmp_path / "clean" / weights, killed / weights)

import csv
from pathlib import Path

import pytest
import torch

from tokenizer import load_tokenizer
from tools.schemas import TrainTokenizerRun, compose
from tools.train_tokenizer import train


def compose_run(overrides: list[str]) -> TrainTokenizerRun:
    return compose("train_tokenizer", overrides)


@pytest.mark.parametrize("tokenizer", ["tiny", "small", "base", "large"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp"])
def test_every_config_composes(tokenizer, trainer):
    run = compose_run([f"tokenizer={tokenizer}", f"trainer={trainer}"])
    assert run.tokenizer.quantizer.num_codebooks >= 1
    assert run.trainer.strategy in ("auto", "ddp", "fsdp")


@pytest.mark.parametrize("data", ["phantoms", "folder", "manifest", "volume", "realmini"])
def test_data_presets_compose(data):
    overrides = [f"data={data}"] + ([] if data in ("phantoms", "realmini") else ["data.path=/x"])
    assert compose_run(overrides).data.kind in ("phantoms", "folder", "manifest", "volume")


def test_typo_fails_at_compose():
    with pytest.raises(Exception, match="learning_rat"):
        compose_run(["optim.learning_rat=1"])
    with pytest.raises(Exception, match="stage"):
        compose_run(["stage=vision"])


def _losses(run_dir: Path) -> list[float]:
    rows = []
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return [float(r["train/l2"]) for r in rows if r.get("train/l2")]


FAST = [
    "tokenizer=tiny",
    "data.num_train=8",
    "data.num_val=4",
    "data.batch_size=8",
    "trainer.log_every_n_steps=1",
    "trainer.val_every_n_steps=0",
    "trainer.progress_bar=false",
    "optim.warmup_steps=1",
    "optim.lr=3e-3",
    "loss.lpips_weight=0",
    "loss.gan_start=4",
    "loss.gan_ramp_steps=2",
]


def test_stages_train_resume_and_export(tmp_path):
    visual = compose_run([*FAST, "trainer.max_steps=12", f"run_dir={tmp_path / 'visual'}"])
    out = train(visual)
    losses = _losses(tmp_path / "visual")
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    first = load_tokenizer(out)
    assert first.config.embed_dim is not None

    # Resume: the same run directory with more steps continues from last.ckpt, not from scratch.
    longer = compose_run(
        [
            *FAST,
            "trainer.max_steps=14",
            "trainer.checkpoint_every_n_steps=4",
            f"run_dir={tmp_path / 'visual'}",
        ]
    )
    train(longer)
    assert len(_losses(tmp_path / "visual")) == 14

    text = compose_run(
        [*FAST, "stage=text", f"init_from={out}", "trainer.max_steps=6", f"run_dir={tmp_path / 'text'}"]
    )
    tok = load_tokenizer(train(text))
    emb = tok.embed_text(["axial CT, no finding", "brain MRI with a bright lesion"])
    assert emb.shape == (2, tok.config.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert tok.embed_image(x).shape == (2, tok.config.embed_dim)

    recon = compose_run([*FAST, "stage=recon", "trainer.max_steps=4", f"run_dir={tmp_path / 'recon'}"])
    assert load_tokenizer(train(recon)).config.text_encoder is None

import json
from concurrent.futures import ThreadPoolExecutor

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar

from tools.trainer import TrainerConfig, build_trainer, save_resolved_config


class Line(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, _):
        return (self.w - batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_step_limited_run_names_its_last_step(tmp_path):
    cfg = TrainerConfig(accelerator="cpu", devices=1, max_steps=3, progress_bar=True, precision="32")
    trainer = build_trainer(cfg, tmp_path)
    trainer.fit(Line(), torch.utils.data.DataLoader(torch.ones(10, 1), batch_size=2))
    bar = next(c for c in trainer.callbacks if isinstance(c, RichProgressBar))
    titles = [t.description for t in bar.progress.tasks]
    assert titles[0] == "Epoch 0 (run ends at step 3)", titles  # Lightning's own title: "Epoch 0/-2"
    assert trainer.global_step == 3


def test_ranks_can_save_the_resolved_config_at_once(tmp_path):
    # every rank of a DDP run saves the config: a shared temporary name let one rank rename it away under another
    config = {"lr": 1e-3, "name": "x" * 10_000}

    def save(_):
        for _ in range(50):
            save_resolved_config(tmp_path, config)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(save, range(4)))
    assert json.loads((tmp_path / "config.json").read_text()) == config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary file left

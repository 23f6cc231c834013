import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from lm import describe_image, load_model
from lm.config import PRESETS, lm_config
from lm.vocab import Vocab
from tokenizer.api import create_tokenizer
from tokenizer.checkpoint import save_tokenizer
from tokenizer.errors import InputError
from tools import generate
from tools.schemas import TrainLMRun
from tools.train_lm import build_system, train

ROOT = Path(__file__).resolve().parents[2]


def make_run(*overrides: str) -> TrainLMRun:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train_lm", overrides=["trainer.progress_bar=false", *overrides])
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="module")
def checkpoint_and_shard(make_lm_inputs):
    """A tiny tokenizer checkpoint and a shard of 12 phantoms it encoded (captions + one QA each)."""
    return make_lm_inputs("What imaging modality is this?")


def test_every_config_composes():
    for preset in PRESETS:
        run = make_run(f"lm={preset}", "tokenizer.checkpoint=ckpt", "data.shard_dirs=[a,b]")
        assert isinstance(run, TrainLMRun) and run.lm == lm_config(preset)
        assert run.data.max_len == run.lm.max_seq_len and run.data.shard_dirs == ["a", "b"]
    for trainer in ("cpu", "gpu", "ddp", "fsdp"):
        run = make_run(
            f"trainer={trainer}", "lm=tiny", "lm.grad_checkpointing=true", "tokenizer.checkpoint=c"
        )
        assert run.lm.grad_checkpointing and run.lm.dim == 32
    run = make_run(
        "tokenizer.checkpoint=c", "seed=5", "optim.lr=1e-3", "data.mix.vqa=0.5", "text_tokenizer=gpt2"
    )
    assert run.data.seed == 5 and run.optim.lr == 1e-3 and run.data.mix["vqa"] == 0.5
    assert run.text_tokenizer == "gpt2" and run.lm == lm_config("small")  # small is the default
    mix = "data.mix={caption:3.0,vqa:0.5,records:0.0,compare:0.5}"  # every task can be named
    run = make_run("tokenizer.checkpoint=c", mix, "data.vqa_explain=true", "data.group_by_task=true")
    assert run.data.mix["compare"] == 0.5 and run.data.vqa_explain and run.data.group_by_task
    with pytest.raises(MissingMandatoryValue):
        make_run()  # no tokenizer.checkpoint
    with pytest.raises(ConfigCompositionException, match="not_a_field"):
        make_run("tokenizer.checkpoint=c", "lm.not_a_field=1")


def test_grounding_needs_its_targets_and_its_weight():
    vocab = Vocab(300, 2, 16, (2, 2))
    both = make_run("lm=tiny", "tokenizer.checkpoint=c", "data.grounding=true", "optim.grounding_weight=0.5")
    assert build_system(both, vocab).grounding_head is not None
    for half in (
        "data.grounding=true",
        "optim.grounding_weight=0.5",
    ):  # targets never trained, or a head with none
        with pytest.raises(ValueError, match="need both"):
            build_system(make_run("lm=tiny", "tokenizer.checkpoint=c", half), vocab)


def test_image_init_takes_the_tokenizer_codebook():
    vocab = Vocab(300, 2, 16, (2, 2))
    codebook = torch.nn.functional.normalize(torch.randn(2, 16, 4), dim=-1)
    tables = {}
    for init in ("random", "codebook", "codebook_inputs", "codebook_heads"):
        run = make_run("lm=tiny", "tokenizer.checkpoint=c", f"image_init={init}")
        torch.manual_seed(0)
        model = build_system(run, vocab, codebook=codebook).model
        tables[init] = model.image_embed.weight.view(2, 16, -1), model.depth.head

    def has_codebook_geometry(table: torch.Tensor) -> bool:
        """Sub-codebook 1's rows have the code vectors' inner products (up to scale)."""
        centred = codebook[1] - codebook[1].mean(0)
        grams = torch.stack([(table[1] @ table[1].T).flatten(), (centred @ centred.T).flatten()])
        return bool(torch.corrcoef(grams)[0, 1] > 0.999)

    assert [has_codebook_geometry(t) for t in tables["random"]] == [False, False]
    assert [has_codebook_geometry(t) for t in tables["codebook"]] == [True, True]
    assert [has_codebook_geometry(t) for t in tables["codebook_inputs"]] == [True, False]
    assert [has_codebook_geometry(t) for t in tables["codebook_heads"]] == [False, True]
    torch.testing.assert_close(tables["codebook_inputs"][1], tables["random"][1])  # the heads left as drawn
    torch.testing.assert_close(tables["codebook_heads"][0], tables["random"][0])  # the inputs likewise
    with pytest.raises(ValueError, match="needs the image tokenizer's codebook"):
        build_system(make_run("lm=tiny", "tokenizer.checkpoint=c", "image_init=codebook"), vocab)
    with pytest.raises(ValueError, match="image_init: expected one of"):
        make_run("lm=tiny", "tokenizer.checkpoint=c", "image_init=kmeans")


def test_cpu_smoke_run_exports_a_model_and_the_cli_uses_it(checkpoint_and_shard, tmp_path, capsys):
    checkpoint, shard = checkpoint_and_shard
    run_dir = tmp_path / "run"
    overrides = [
        "lm=tiny", f"tokenizer.checkpoint={checkpoint}", f"data.shard_dirs=[{shard}]", f"run_dir={run_dir}",
        "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=3", "trainer.val_every_n_steps=0",
        "data.batch_size=4",
        "text_vocab_size=400",
    ]  # fmt: skip
    out = train(make_run(*overrides))
    assert out == run_dir / "model" and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run_dir / "config.json").read_text())["lm"]["dim"] == 32  # resolved config saved
    model = load_model(out)
    assert model.text_tokenizer.vocab_size <= 400 and model.vocab.grid == (8, 8)
    assert (run_dir / "text_tokenizer").is_dir()

    # rerunning with more steps resumes from last.ckpt and reuses the saved text tokenizer
    train(make_run(*overrides[:4], "trainer.max_steps=5", *overrides[5:]))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5
    assert load_model(out).vocab == model.vocab

    # init_from: a new run starts from the exported model's weights, architecture and text tokenizer
    tuned = tmp_path / "tuned"
    start = [
        "lm=tiny",
        "lm.dim=64",  # the architecture comes from init_from, the training options from lm
        "lm.grad_checkpointing=true",
        f"init_from={out}",
        *overrides[1:3],
        f"run_dir={tuned}",
    ]
    run = make_run(*start, "trainer.max_steps=2", *overrides[5:])
    system = build_system(run, model.vocab, load_model(out))
    assert system.config.model == replace(load_model(out).config, grad_checkpointing=True)  # dim 32
    assert all(
        torch.equal(v, load_model(out).lm.state_dict()[k]) for k, v in system.model.state_dict().items()
    )
    with pytest.raises(
        ValueError, match="image_init=codebook with init_from=.*its image tables come with it"
    ):
        build_system(replace(run, image_init="codebook"), model.vocab, load_model(out))
    tuned_model = load_model(train(run))
    assert tuned_model.text_tokenizer.vocab_size == model.text_tokenizer.vocab_size
    assert not (tuned / "text_tokenizer").exists()  # none trained
    other = save_tokenizer(create_tokenizer("tiny").eval(), tmp_path / "other_tokenizer")  # other weights
    with pytest.raises(InputError, match="image tokenizer differs"):
        train(make_run(*start[:4], f"tokenizer.checkpoint={other}", *start[5:], "trainer.max_steps=2"))

    # the generation CLI: PNGs + prompts.json, and a printed report
    images = tmp_path / "images"
    argv = ["--model", str(out), "--prompt", "one small lesion", "--prompt", "normal", "--num", "2", "--out"]
    assert generate.main([*argv, str(images), "--seed", "3", "--device", "cpu"]) == 0
    listing = json.loads((images / "prompts.json").read_text())
    assert [r["file"] for r in listing["images"]] == ["p00_00.png", "p00_01.png", "p01_00.png", "p01_01.png"]
    assert listing["images"][2] == {"file": "p01_00.png", "prompt": "normal", "index": 0, "seed": 4}
    with Image.open(images / "p00_00.png") as png:
        assert png.size == (32, 32) and png.mode == "RGB"
    png_path = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(png_path)
    capsys.readouterr()
    assert generate.main(["--model", str(out), "--describe", str(png_path), "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == describe_image(load_model(out), png_path, max_new_tokens=6)
    argv = ["--model", str(out), "--describe", str(png_path), "--question", "How many?", "--report-first"]
    assert generate.main([*argv, "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == describe_image(
        load_model(out), png_path, "How many?", report_first=True, max_new_tokens=4
    )
    argv = ["--model", str(out), "--prompt", "one lesion", "--num", "1", "--negative-prompt", "normal"]
    assert generate.main([*argv, "--out", str(tmp_path / "neg"), "--modality", "ct"]) == 0
    assert json.loads((tmp_path / "neg" / "prompts.json").read_text())["negative_prompt"] == "normal"
    argv = ["--model", str(out), "--prompt", "one lesion", "--num", "1", "--cfg-interval", "0.25", "1"]
    assert generate.main([*argv, "--out", str(tmp_path / "interval")]) == 0
    assert json.loads((tmp_path / "interval" / "prompts.json").read_text())["cfg_interval"] == [0.25, 1.0]
    assert generate.main([*argv[:-2], "0.5", "0.25", "--out", str(tmp_path / "bad")]) == 2  # START > END
    assert generate.main(["--model", str(tmp_path / "missing"), "--describe", str(png_path)]) == 2
    with pytest.raises(SystemExit):
        generate.main(["--model", str(out), "--prompt", "x"])  # --out is required


def test_to_pil_modes():
    gray = generate.to_pil(torch.linspace(-1, 1, 16).reshape(1, 4, 4))
    assert gray.mode == "L" and np.asarray(gray)[0, 0] == 0 and np.asarray(gray)[3, 3] == 255
    assert generate.to_pil(torch.zeros(3, 4, 4)).mode == "RGB"
    with pytest.raises(ValueError):
        generate.to_pil(torch.zeros(2, 4, 4))

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenizer import create_tokenizer, load_tokenizer, save_tokenizer
from tokenizer.errors import InputError


@pytest.fixture
def saved(tmp_path):
    model = create_tokenizer("tiny").eval()
    return model, save_tokenizer(model, tmp_path / "tok")


def test_save_load_same_codes(saved):
    model, directory = saved
    loaded = load_tokenizer(directory)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(model.encode_to_codes(x), loaded.encode_to_codes(x))
    assert not loaded.training
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]


def test_config_weights_mismatch_named(saved, tmp_path):
    _, directory = saved
    state = load_file(directory / "model.safetensors")
    key = next(k for k in state if "codebook" in k or "embed" in k)
    state[key] = torch.zeros(1, 2, 3)
    save_file(state, directory / "model.safetensors")
    with pytest.raises(InputError, match=f"shape mismatch {key}"):
        load_tokenizer(directory)


def test_missing_tensor_named(saved):
    _, directory = saved
    state = load_file(directory / "model.safetensors")
    key = sorted(state)[0]
    del state[key]
    save_file(state, directory / "model.safetensors")
    with pytest.raises(InputError, match="missing tensors"):
        load_tokenizer(directory)


def test_unknown_architecture_refused(saved):
    _, directory = saved
    cfg = json.loads((directory / "config.json").read_text())
    cfg["architecture"] = "evil"
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="evil"):
        load_tokenizer(directory)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(InputError, match="not a tokenizer checkpoint"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    with pytest.raises(InputError, match="Hub repo id"):
        load_tokenizer(tmp_path / "absent" / "dir" / "x")


def test_corrupt_weights(saved):
    _, directory = saved
    (directory / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="safetensors"):
        load_tokenizer(directory)

"""Security: no file we read can run code; configs are data; manifest paths stay inside their root.

A crafted pickle (an object whose ``__reduce__`` opens a marker file for writing) is handed, under every
weights suffix (.ckpt / .pt / .pth / .bin) and in both pickle layouts (torch's zip archive and a raw pickle),
to every loader of this project that reads weights: ``load_tokenizer``, ``lm.load_model``, LPIPS (loss and
metric), the FID feature networks, timm teachers / encoder weights, open_clip teachers, Hugging Face text
encoders and backbones, code shards, and Lightning's resume of both trainers. The marker must never appear
and each loader must refuse with an error that says why. The payload is checked to be live: a plain
``pickle.load`` does create the marker.

Configs that name code (a Hugging Face ``auto_map`` pointing at a Python file) are refused without importing
it. Unknown architectures and mis-shaped tensors are refused by name in
tests/tokenizer/test_checkpoint.py (test_unknown_architecture_refused, test_config_weights_mismatch_named,
test_missing_tensor_named) and tests/lm/test_api.py::test_load_refuses_bad_text_tokenizer_weights_and_config.
The last tests read the package sources: no eval / exec / shell=True, every torch.load with
weights_only=True, no pickle module, no trust_remote_code.
"""

from __future__ import annotations

import ast
import json
import multiprocessing
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import lm
from tokenizer.api import create_tokenizer
from tokenizer.checkpoint import load_tokenizer, save_tokenizer
from tokenizer.data.datasets import ManifestDataset
from tokenizer.data.intensity import PreprocessConfig
from tokenizer.data.manifest import read_manifest
from tokenizer.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tokenizer", "lm", "tools")
SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class _Payload:
    """Unpickling this opens ``path`` for writing: the file appearing means code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _craft(path: Path, marker: Path, layout: str = "zip") -> Path:
    """A checkpoint-looking file: plain tensors plus the payload, as torch.save writes it or as raw pickle."""
    content = {"state_dict": {"weight": torch.zeros(2, 2)}, "global_step": 1, "hyper": _Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "zip":
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(content, protocol=2))
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "CODE_RAN"
    yield path
    assert not path.exists(), "a crafted pickle ran code"


def _unpickle_in_child(path: Path) -> None:
    with open(path, "rb") as f:
        pickle.load(f)


def test_the_payload_is_live(tmp_path):
    """Without weights_only the crafted file does run its code (in a child process, to be safe)."""
    live = tmp_path / "live_marker"
    crafted = _craft(tmp_path / "raw.pkl", live, "raw")
    child = multiprocessing.get_context("fork").Process(target=_unpickle_in_child, args=(crafted,))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and live.exists()


# ------------------------------------------------------------------------------------------- our checkpoints
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(create_tokenizer("tiny").eval(), tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = lm.create_model("tiny", create_tokenizer("tiny").eval())
    return model.save_pretrained(tmp_path_factory.mktemp("lm") / "model")


@pytest.mark.parametrize("layout", ["zip", "raw"])
def test_load_tokenizer_never_unpickles(tmp_path, tokenizer_dir, marker, layout):
    directory = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    _craft(directory / "model.safetensors", marker, layout)  # a pickle where the weights belong
    with pytest.raises(InputError, match=r"model.safetensors: not a readable safetensors file"):
        load_tokenizer(directory)
    (directory / "model.safetensors").unlink()
    for suffix in SUFFIXES:  # the usual PyTorch names are not even looked at
        _craft(directory / f"pytorch_model{suffix}", marker, layout)
    with pytest.raises(InputError, match=r"missing model.safetensors"):
        load_tokenizer(directory)


@pytest.mark.parametrize("layout", ["zip", "raw"])
def test_load_model_never_unpickles(tmp_path, model_dir, marker, layout):
    directory = shutil.copytree(model_dir, tmp_path / "model")
    _craft(directory / "lm.safetensors", marker, layout)
    with pytest.raises(InputError, match=r"lm.safetensors: not a readable safetensors file"):
        lm.load_model(directory)
    shutil.copy(model_dir / "lm.safetensors", directory / "lm.safetensors")
    _craft(directory / "image_tokenizer" / "model.safetensors", marker, layout)
    with pytest.raises(InputError, match=r"image_tokenizer/model.safetensors: not a readable safetensors"):
        lm.load_model(directory)


def test_load_model_refuses_a_backbone_path_outside_the_model(tmp_path, model_dir):
    directory = shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((directory / "config.json").read_text())
    for outside in ("/etc", "../elsewhere", "hf/../../elsewhere"):
        config["lm"]["hf_backbone"] = outside
        (directory / "config.json").write_text(json.dumps(config))
        with pytest.raises(InputError, match=r"config.json: lm.hf_backbone must name a folder inside"):
            lm.load_model(directory)


# ------------------------------------------------------------------------------------------- pretrained parts
@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("layout", ["zip", "raw"])
def test_lpips_and_feature_weights_never_unpickle(tmp_path, marker, suffix, layout):
    from tokenizer.losses import LPIPSLoss
    from tokenizer.metrics import FeatureExtractorConfig, LPIPSMetric, build_feature_extractor

    crafted = _craft(tmp_path / f"weights{suffix}", marker, layout)
    with pytest.raises(InputError, match=rf"LPIPS weights {crafted}: not a plain tensor file"):
        LPIPSLoss(weights=crafted)
    with pytest.raises(InputError, match=rf"{crafted}: not a plain tensor file \(UnpicklingError"):
        LPIPSMetric("alex", weights=crafted)
    with pytest.raises(InputError, match=rf"{crafted}: not a plain tensor file"):
        build_feature_extractor(FeatureExtractorConfig(kind="inception", weights=str(crafted)))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_timm_teacher_and_encoder_weights_never_unpickle(tmp_path, marker, suffix):
    from tokenizer.alignment import TeacherConfig, build_vision_teacher
    from tokenizer.model import create_timm_model

    crafted = _craft(tmp_path / f"vit{suffix}", marker)
    with pytest.raises(Exception, match=r"(?i)weights.only|unpickl|unsupported global"):
        create_timm_model("test_vit", str(crafted))  # tokenizer encoders: load_encoder_weights
    with pytest.raises(Exception, match=r"(?i)weights.only|unpickl|unsupported global"):
        build_vision_teacher(TeacherConfig(kind="timm", name="test_vit", pretrained=str(crafted)))


def test_open_clip_teacher_weights_never_unpickle(tmp_path, marker, monkeypatch):
    """open_clip's own loader, called as the teacher calls it (the model itself is a small stand-in)."""
    import open_clip

    from tokenizer.alignment import TeacherConfig, build_vision_teacher

    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: torch.nn.Linear(2, 2))
    crafted = _craft(tmp_path / "clip.pt", marker)
    with pytest.raises(Exception, match=r"(?i)weights.only|unpickl|unsupported global"):
        build_vision_teacher(TeacherConfig(kind="open_clip", name="ViT-B-32", pretrained=str(crafted)))


def _tiny_bert(directory: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "lesion", "left", "right", "small"]
    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    BertModel(config).save_pretrained(directory)
    return directory


def test_hf_text_encoder_reads_safetensors_only(tmp_path, marker):
    from tokenizer.text_encoder import TextEncoderConfig, build_text_encoder

    directory = _tiny_bert(tmp_path / "bert")
    cfg = TextEncoderConfig(kind="hf", name=str(directory), pretrained=str(directory))
    assert build_text_encoder(cfg).embed_dim == 16  # the genuine directory loads
    (directory / "model.safetensors").unlink()
    _craft(directory / "pytorch_model.bin", marker)
    with pytest.raises(OSError, match="safetensors"):
        build_text_encoder(cfg)


def _tiny_llama(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_hf_backbone_weights_never_unpickle(tmp_path, marker):
    from lm.config import lm_config
    from lm.model import HFBackbone

    directory = _tiny_llama(tmp_path / "llama")
    (directory / "model.safetensors").unlink()
    _craft(directory / "pytorch_model.bin", marker)
    with pytest.raises(Exception, match=r"(?i)weights.only|unpickl|unsupported global"):
        HFBackbone(lm_config("tiny", hf_backbone=str(directory)))


def _code_config(directory: Path, marker: Path, name: str, **changes) -> None:
    """Point config file ``name`` at a Python file in the directory that creates the marker when imported."""
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    path = directory / name
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModel": "evil.Model",
                          "AutoModelForCausalLM": "evil.Model", "AutoTokenizer": ["evil.Tok", "evil.Tok"]}  # fmt: skip
    path.write_text(json.dumps({**config, **changes}))


def test_configs_naming_code_are_never_imported(tmp_path, marker):
    """A known architecture loads with its built-in class; one that only the named code defines is refused.

    (lm/model.py's ``HFBackbone`` does not pass ``trust_remote_code=False``, so transformers asks on the
    terminal whether to run the code, default no; without a terminal it refuses, as here.)"""
    from lm.config import lm_config
    from lm.model import HFBackbone
    from lm.text_tokenizer import TextTokenizer
    from tokenizer.text_encoder import TextEncoderConfig, build_text_encoder

    llama = _tiny_llama(tmp_path / "llama")
    _code_config(llama, marker, "config.json")
    assert type(HFBackbone(lm_config("tiny", hf_backbone=str(llama))).hf).__name__ == "LlamaModel"
    _code_config(llama, marker, "config.json", model_type="evil_model")
    with pytest.raises(Exception, match="custom code|trust_remote_code"):
        HFBackbone(lm_config("tiny", hf_backbone=str(llama)))

    bert = _tiny_bert(tmp_path / "bert")
    _code_config(bert, marker, "tokenizer_config.json")
    _code_config(bert, marker, "config.json")
    cfg = TextEncoderConfig(kind="hf", name=str(bert), pretrained=str(bert))
    assert type(build_text_encoder(cfg).model).__name__ == "BertModel"
    _code_config(bert, marker, "tokenizer_config.json", tokenizer_class="EvilTokenizer")
    text = TextTokenizer.from_pretrained(bert)  # falls back to the tokenizer.json it can read
    assert type(text.tokenizer).__module__.startswith("transformers.")
    _code_config(bert, marker, "config.json", model_type="evil_model")
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_text_encoder(TextEncoderConfig(kind="hf", name=str(bert)))  # random weights: from the config


def test_code_shards_refuse_pickled_arrays(tmp_path, marker):
    from tokenizer.encode import checkpoint_config
    from tokenizer.shards import CodeShard, ShardWriter

    tok = create_tokenizer("tiny").eval()
    checkpoint = save_tokenizer(tok, tmp_path / "tok")
    with ShardWriter(tmp_path / "shard", num_rows=1, K=2, V=16, grid=(8, 8),
                     tokenizer_config=checkpoint_config(checkpoint, tok)) as writer:  # fmt: skip
        writer.write([0], torch.zeros(1, 2, 8, 8, dtype=torch.long), [{"source": "x"}])
        writer.finalize()
    evil = np.empty((1, 2, 8, 8), dtype=object)
    evil[0, 0, 0, 0] = _Payload(marker)
    np.save(tmp_path / "shard" / "codes.npy", evil, allow_pickle=True)
    with pytest.raises(InputError, match=r"codes.npy: not a readable .npy file \(.*Python objects"):
        CodeShard(tmp_path / "shard").codes(0)


# ------------------------------------------------------------------------------------------- Lightning resume
@pytest.mark.parametrize("layout", ["zip", "raw"])
def test_resuming_a_run_never_unpickles_its_last_ckpt(tmp_path, marker, layout):
    from tools.schemas import compose
    from tools.train_tokenizer import train

    run_dir = tmp_path / "run"
    _craft(run_dir / "checkpoints" / "last.ckpt", marker, layout)
    run = compose("train_tokenizer", ["tokenizer=tiny", "stage=recon", "data.num_train=4", "data.batch_size=4",
                                      "trainer.max_steps=2", "trainer.progress_bar=false",
                                      "trainer.val_every_n_steps=0", "loss.lpips_weight=0", f"run_dir={run_dir}"])  # fmt: skip
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(run)
    assert not (run_dir / "tokenizer").exists()


def test_lm_checkpoints_load_with_weights_only(tmp_path, marker):
    """The LM system's own entry point for a Lightning checkpoint (the LM trainer resumes through fit as above)."""
    from lm.system import LMSystem

    crafted = _craft(tmp_path / "lm.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        LMSystem.load_from_checkpoint(crafted, weights_only=True)


# ------------------------------------------------------------------------------------------- manifests
def test_manifest_paths_stay_inside_their_root_unless_allowed(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "secret.png"
    from PIL import Image

    for path in (root / "a.png", outside):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    escapes = [
        "../secret.png",
        str(outside),
        "sub/../../secret.png",
        "./../secret.png",
        "sub/../../data/../secret.png",
    ]
    inside = ["a.png", "sub/../a.png", str(root / "a.png"), "./sub/../a.png"]
    (root / "m.jsonl").write_text("\n".join(json.dumps({"image": p}) for p in escapes + inside))
    rows, bad = read_manifest(root / "m.jsonl")
    assert [b.line for b in bad] == list(range(1, len(escapes) + 1))
    assert all("escapes the manifest folder" in b.reason for b in bad)
    assert [r.image for r in rows] == [root / "a.png"] * len(inside)
    allowed, none_bad = read_manifest(root / "m.jsonl", allow_outside_root=True)
    assert not none_bad and {r.image for r in allowed} == {outside, root / "a.png"}
    dataset = ManifestDataset(root / "m.jsonl", PreprocessConfig(image_size=16))
    assert len(dataset) == len(inside) and all(
        dataset[i]["source"] == str(root / "a.png") for i in range(len(dataset))
    )


# ------------------------------------------------------------------------------------------- the sources
def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            owner = (
                func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            )
            keywords = {k.arg: k.value for k in node.keywords}
            yield node, name, owner, keywords


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


PICKLE_MODULES = ("pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve")


def _scan(source: str, label: str) -> list[str]:
    """Every form of running code from data in ``source``, as "label:line: what"."""
    tree, problems = ast.parse(source), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n in PICKLE_MODULES for n in names):
                problems.append(f"{label}:{node.lineno}: imports a pickle module")
    for node, name, owner, kw in _calls(tree):
        found = []
        if isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
            found.append(f"{name}()")
        if name in ("system", "popen") and owner == "os":
            found.append(f"os.{name}()")
        if "shell" in kw and not (isinstance(kw["shell"], ast.Constant) and kw["shell"].value is False):
            found.append("shell=")
        if name == "load" and owner == "torch" and not _is_true(kw.get("weights_only")):
            found.append("torch.load without weights_only=True")
        if name == "load" and owner in ("np", "numpy") and _is_true(kw.get("allow_pickle")):
            found.append("np.load(allow_pickle=True)")
        if name == "load" and owner == "yaml":
            found.append("yaml.load")
        if "trust_remote_code" in kw and not (
            isinstance(kw["trust_remote_code"], ast.Constant) and kw["trust_remote_code"].value is False
        ):
            found.append("trust_remote_code")
        if "weights_only" in kw and not _is_true(kw["weights_only"]):
            found.append(f"{name}(weights_only=False)")
        elif name == "fit" and "ckpt_path" in kw and not _is_true(kw.get("weights_only")):
            found.append("fit(ckpt_path=...) without weights_only=True")
        problems += [f"{label}:{node.lineno}: {what}" for what in found]
    return problems


def test_sources_never_evaluate_code_or_unpickle():
    problems = [p for path in _sources() for p in _scan(path.read_text(), str(path.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


def test_the_source_scan_sees_what_it_forbids():
    """The scanner reports each forbidden form (so the scan above cannot pass vacuously), and not m.eval()."""
    snippet = (
        "import pickle\nimport os, subprocess, torch, numpy as np\neval('1')\nexec('x=1')\nos.system('ls')\n"
        "subprocess.run('ls', shell=True)\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
        "np.load('x', allow_pickle=True)\nAutoModel.from_pretrained('x', trust_remote_code=True)\n"
        "trainer.fit(m, ckpt_path='x', weights_only=False)\nm.eval()\ntorch.load('x', weights_only=True)\n"
        "np.load('x', allow_pickle=False)\nsubprocess.run(['ls'], shell=False)\ntrainer.fit(m, ckpt_path='x')\n"
        "AutoTokenizer.from_pretrained('x', trust_remote_code=False)\ntrainer.fit(m, ckpt_path=p, weights_only=True)\n"
    )
    flagged = sorted({int(p.split(":")[1]) for p in _scan(snippet, "snippet")})
    assert flagged == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16]

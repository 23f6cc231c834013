import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lm.data import (
    IMAGE_TO_TEXT_INSTRUCTIONS,
    REPORT_FIRST_INSTRUCTION,
    EpochDataLoader,
    LMDataConfig,
    LMDataset,
    ShardResolver,
    caption_record,
    learn_leading_image,
    text_corpus,
    text_to_image_prompt,
    vqa_record,
)
from lm.sequence import IGNORE_INDEX, RecordRejected, build_sequence
from lm.text_tokenizer import TextTokenizer
from lm.vocab import Vocab
from tokenizer.errors import InputError
from tokenizer.shards import CodeShard, ShardWriter

N, K, V, GRID = 20, 2, 16, (2, 2)
HW = GRID[0] * GRID[1]


def _row(i: int) -> dict:
    row = {
        "source": f"img{i}.png",
        "modality": ["CT", "MR"][i % 2],
        "caption": f"A {['small', 'large'][i % 2]} lesion in the {['left', 'right'][i % 3 % 2]} lobe.",
        "split": "val" if i >= 16 else "train",
    }
    if i % 4 == 0:
        row["qa"] = [
            {"question": "Is there a lesion?", "answer": "yes"},
            {"question": "Which side?", "answer": "left"},
        ]
    if i == 5:
        row["caption"] = ""  # not a caption item
    if i == 6:
        row["qa"] = [{"question": "broken"}]  # a malformed qa entry: skipped and counted
    return row


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmdata")
    codes = np.random.default_rng(0).integers(0, V, size=(N, K, *GRID))
    with ShardWriter(root / "phantoms", num_rows=N, K=K, V=V, grid=GRID, tokenizer_config={"K": K}) as w:
        w.write(range(N), codes, [_row(i) for i in range(N)])
        w.finalize()
    shard = CodeShard(root / "phantoms")
    tok = TextTokenizer.train_bpe(text_corpus(shard) * 3, vocab_size=300)
    vocab = Vocab(num_text=tok.vocab_size, num_codebooks=K, codebook_size=V, grid=GRID)
    records = root / "docs.jsonl"
    lines = [
        {
            "segments": [
                {"text": "Two scans. "},
                {"image": "phantoms:1"},
                {"text": " and "},
                {"image": "phantoms:2"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": [{"image": "phantoms:3"}, {"text": "Side?"}]},
                {"role": "assistant", "content": "left"},
            ]
        },
        {"segments": [{"text": "missing"}, {"image": "phantoms:999"}]},
        {"segments": []},
    ]
    records.write_text("\n".join([json.dumps(r) for r in lines] + ["{not json"]) + "\n")
    return {"root": root, "shard": shard, "tok": tok, "vocab": vocab, "records": str(records), "codes": codes}


def _dataset(env, split="train", shuffle=True, **cfg):
    cfg = LMDataConfig(
        **{"shard_dirs": [str(env["root"] / "phantoms")], "record_files": [env["records"]], "max_len": 64,
           "batch_size": 4, "max_bad_fraction": 0.3, **cfg}
    )  # fmt: skip
    files = [(p, Path(p).read_text().splitlines()) for p in cfg.record_files]
    return LMDataset([env["shard"]], files, split, cfg, env["vocab"], env["tok"], shuffle=shuffle)


def _targets(seq) -> torch.Tensor:
    """Ids of the positions that carry loss."""
    return seq.tokens[1:][(seq.labels[:-1] != IGNORE_INDEX).all(1)]


def _build(env, record):
    return build_sequence(record, env["vocab"], env["tok"].encode, ShardResolver([env["shard"]]))


def test_text_corpus(env):
    corpus = text_corpus(env["shard"])
    assert _row(0)["caption"] in corpus and "Is there a lesion?" in corpus and "left" in corpus
    assert IMAGE_TO_TEXT_INSTRUCTIONS[0] in corpus and "" not in corpus


def test_image_to_text_loss_on_caption_only(env):
    row = env["shard"].row(2)
    record = caption_record(row, "phantoms:2", np.random.default_rng(0), image_first=1.0, cond_dropout=0.0)
    seq = _build(env, record)
    vocab, tok = env["vocab"], env["tok"]
    assert seq.tokens[:2, 0].tolist() == [vocab.bos, vocab.boi]
    assert torch.equal(seq.tokens[2 : 2 + HW], vocab.image_rows(env["shard"].codes(2)))
    targets = _targets(seq)[:, 0].tolist()
    assert targets[-1] == vocab.eos and tok.decode(targets[:-1]) == row["caption"]


def test_text_to_image_loss_on_image_and_prompt(env):
    row = env["shard"].row(3)
    record = caption_record(row, "phantoms:3", np.random.default_rng(0), image_first=0.0, cond_dropout=0.0)
    prompt = record["segments"][0]["text"]
    assert row["caption"] in prompt and "MR" in prompt
    seq = _build(env, record)
    vocab = env["vocab"]
    n = len(env["tok"].encode(prompt))
    assert env["tok"].decode(seq.tokens[1 : 1 + n, 0].tolist()) == prompt
    targets = _targets(seq)
    assert targets[:, 0].tolist() == [vocab.boi] + targets[1 : 1 + HW, 0].tolist() + [vocab.eoi, vocab.eos]
    assert torch.equal(targets[1 : 1 + HW], vocab.image_rows(env["shard"].codes(3)))
    assert text_to_image_prompt(row["caption"], "MR") == f"Generate a MR image: {row['caption']}"


def test_condition_dropout_gives_the_unconditional_prompt(env):
    row = env["shard"].row(4)
    record = caption_record(row, "phantoms:4", np.random.default_rng(0), image_first=0.0, cond_dropout=1.0)
    seq = _build(env, record)
    vocab = env["vocab"]
    assert seq.tokens[:2, 0].tolist() == [vocab.bos, vocab.boi]
    assert torch.equal(seq.tokens[2 : 2 + HW], vocab.image_rows(env["shard"].codes(4)))
    assert seq.tokens[2 + HW :, 0].tolist() == [vocab.eoi, vocab.eos]
    rng = np.random.default_rng(1)
    kinds = Counter()
    for _ in range(2000):
        r = caption_record(row, "x:4", rng, image_first=0.5, cond_dropout=0.1)
        first = r["segments"][0]
        kinds["image_first" if "image" in first else ("uncond" if first["text"] == "" else "cond")] += 1
    assert 900 < kinds["image_first"] < 1100 and 60 < kinds["uncond"] < 140  # 50% and 5%


def test_understanding_records_can_learn_their_image_as_an_unconditional_one(env):
    vocab = env["vocab"]
    row = env["shard"].row(2)
    record = caption_record(row, "phantoms:2", np.random.default_rng(0), image_first=1.0, cond_dropout=0.0)
    seq = _build(env, record)
    learn_leading_image(seq, vocab)
    unconditional = _build(env, caption_record(row, "phantoms:2", np.random.default_rng(0), image_first=0.0,
                                               cond_dropout=1.0))  # fmt: skip
    n = 2 + HW  # <boi>, the image and <eoi>: what <bos> and the image positions predict
    assert torch.equal(seq.labels[:n], unconditional.labels[:n])
    targets = _targets(seq)[:, 0].tolist()
    assert targets[-1] == vocab.eos and env["tok"].decode(targets[n:-1]) == row["caption"]  # still learnt
    text_first = _build(env, caption_record(row, "phantoms:2", np.random.default_rng(0), image_first=0.0,
                                             cond_dropout=0.0))  # fmt: skip
    before = text_first.labels.clone()
    learn_leading_image(text_first, vocab)
    assert torch.equal(text_first.labels, before)  # a prompt before the image: nothing to add

    def image_labels(**cfg):
        batches = _epoch(
            _dataset(env, mix={"caption": 1.0, "vqa": 1.0, "records": 0.0}, image_first=1.0, **cfg), 0
        )
        return sum(int(vocab.is_image(b.labels[..., 0]).sum()) for b in batches)

    # captions, rows with qa and the malformed row's refilled slot: each opens with its image
    slots = 15 + 4 + 1
    assert image_labels() == 0 and image_labels(understanding_image_loss=1.0) == slots * HW
    share = image_labels(understanding_image_loss=0.5)
    assert share % HW == 0 and 0 < share < slots * HW  # some of the records, whole images each


def test_report_first_vqa_record_trains_the_report_then_the_answers(env):
    qa, caption = env["shard"].row(0)["qa"], "A small lesion\nin the left lobe."
    record = vqa_record(qa, "phantoms:0", np.random.default_rng(0), report=caption)
    texts = [seg["text"] for seg in record["segments"][1:]]
    assert texts[:2] == [f"{REPORT_FIRST_INSTRUCTION}\n", "A small lesion in the left lobe.\n"]
    assert record["loss_on"] == [2, 4, 6]
    seq = _build(env, record)
    tok, vocab = env["tok"], env["vocab"]
    said = tok.decode([t for t in _targets(seq)[:, 0].tolist() if t < vocab.num_text])
    assert said == "A small lesion in the left lobe.\n" + texts[3] + texts[5]
    with pytest.raises(RecordRejected, match="empty report"):
        vqa_record(qa, "phantoms:0", report=" ")
    ds = _dataset(env, mix={"caption": 0.0, "vqa": 1.0, "records": 0.0}, vqa_report_first=0.5)
    firsts = Counter()
    for epoch in range(6):
        ds.set_epoch(epoch)
        plan = ds.plan()
        for position in range(len(plan)):
            try:
                record, _ = ds.record(plan[position], np.random.default_rng([0, epoch, position]))
            except RecordRejected:
                continue
            firsts[record["segments"][1]["text"] == f"{REPORT_FIRST_INSTRUCTION}\n"] += 1
    assert firsts[True] > 3 and firsts[False] > 3  # both layouts, about half each
    assert REPORT_FIRST_INSTRUCTION in text_corpus(env["shard"])


def test_vqa_loss_on_answer_only(env):
    seq = _build(env, vqa_record(env["shard"].row(0)["qa"][1:], "phantoms:0"))
    targets = _targets(seq)[:, 0].tolist()
    assert env["tok"].decode(targets[:-1]) == "left" and targets[-1] == env["vocab"].eos


def test_vqa_turns_share_one_image_and_first_turn_matches_a_single_question(env):
    qa = env["shard"].row(0)["qa"]
    orders = set()
    for seed in range(8):
        record = vqa_record(qa, "phantoms:0", np.random.default_rng(seed))
        texts = [seg["text"] for seg in record["segments"][1:]]
        assert record["segments"][0] == {"image": "phantoms:0"} and record["loss_on"] == [2, 4]
        assert all(t.endswith("\n") and not t.startswith("\n") for t in texts[:3])  # questions, first answer
        assert "\n" not in texts[3]  # the last answer ends in <eos>
        orders.add(texts[1])
        seq = _build(env, record)
        targets = _targets(seq)[:, 0].tolist()
        answers = env["tok"].decode([t for t in targets if t < env["vocab"].num_text])
        assert answers == texts[1] + texts[3] and targets[-1] == env["vocab"].eos  # each answer and its end
    assert orders == {"yes\n", "left\n"}  # the turn order is random
    first = vqa_record(qa, "phantoms:0", np.random.default_rng(0))
    entry = next(e for e in qa if e["answer"] == first["segments"][2]["text"].strip())
    assert first["segments"][:2] == vqa_record([entry], "phantoms:0")["segments"][:2]
    with pytest.raises(RecordRejected, match="qa entry 1"):
        vqa_record([qa[0], {"question": "q"}], "phantoms:0")


def _epoch(ds, epoch):
    ds.set_epoch(epoch)
    return list(ds)


def test_batches_shapes_ranges_and_skips(env):
    ds = _dataset(env)
    batches = _epoch(ds, 0)
    vocab = env["vocab"]
    items = 15 + 4 + 1 + 5  # captions (16 train rows, one empty), rows with qa (one malformed), records
    assert len(batches) == len(ds) == -(-items // 4)
    assert sum(len(b) for b in batches) == items  # bad records are replaced, so every slot is filled
    for b in batches:
        B, T = b.attention_mask.shape
        assert b.tokens.shape == b.labels.shape == (B, T, K) and b.image_pos.shape == (B, T)
        assert b.tokens.dtype == b.labels.dtype == b.image_pos.dtype == torch.long
        assert T <= 64 and ((b.tokens >= 0) & (b.tokens < vocab.size)).all()
        assert torch.equal(vocab.is_image(b.tokens[..., 0]), b.image_pos >= 0)
    skipped = sum((Counter(b.skipped) for b in batches), Counter())
    assert skipped == {"unknown_image": 1, "empty": 1, "bad_record": 2}


def test_deterministic_given_seed_and_epoch(env):
    def key(batches):
        return [(b.tokens.tolist(), b.labels.tolist()) for b in batches]

    a, b = _dataset(env), _dataset(env)
    assert key(_epoch(a, 0)) == key(_epoch(b, 0))
    assert key(_epoch(a, 1)) != key(_epoch(b, 0))
    assert key(_epoch(_dataset(env, seed=1), 0)) != key(_epoch(b, 0))
    loader = EpochDataLoader(_dataset(env), epoch_fn=lambda: 1, num_workers=2)
    assert key(list(loader)) == key(_epoch(a, 1))  # independent of the number of workers


def test_mix_weights_and_rank_split(env):
    ds = _dataset(env, mix={"caption": 0.5, "vqa": 2.0, "records": 0.0})
    counts = Counter(ds.plan()[:, 0].tolist())
    assert counts == {0: 8, 1: 10}
    assert Counter(_dataset(env, vqa_turns=1).plan()[:, 0].tolist())[1] == 2 * 4 + 1  # one per qa entry
    ds = _dataset(env)
    full = {tuple(x) for x in ds.plan().tolist()}
    parts = []
    for rank in range(3):
        ds.set_rank(rank, 3)
        parts.append({tuple(x) for x in ds.plan().tolist()})
    assert len({len(p) for p in parts}) == 1 and not (parts[0] & parts[1]) and set().union(*parts) <= full


def test_length_pool_batches_records_of_similar_length(env):
    def seqs(batches):  # each batch's sequences, unpadded, as (length, tokens)
        out = []
        for b in batches:
            keep = b.attention_mask
            out.append([(int(keep[i].sum()), b.tokens[i][keep[i]].tolist()) for i in range(len(b))])
        return out

    mix = {"caption": 2.0, "vqa": 3.0, "records": 1.0}
    plain = seqs(_epoch(_dataset(env, mix=mix), 0))
    pooled = seqs(_epoch(_dataset(env, mix=mix, length_pool=3), 0))
    assert sorted(s for b in pooled for s in b) == sorted(s for b in plain for s in b)  # the same sequences
    assert [len(b) for b in pooled[-1:]] == [len(b) for b in plain[-1:]]  # one partial pool at the end

    def padding(batches):
        return sum(max(n for n, _ in b) * len(b) - sum(n for n, _ in b) for b in batches)

    assert padding(pooled) < padding(plain)
    ds = _dataset(env, mix=mix, length_pool=3)
    ds.set_epoch(0)
    plan = ds.plan()
    lengths, built = ds._lengths(plan, np.arange(len(plan))), 0
    for p in range(len(plan)):  # the measured length is the sequence's (bad records are replaced later)
        try:
            seq = ds.sequence(plan, p)
        except RecordRejected:
            continue
        assert lengths[p] == len(seq.tokens)
        built += 1
    assert built > 0.8 * len(plan)
    for pool in range(-(-len(pooled) // 3)):  # a pool's batches hold consecutive runs of its sorted lengths
        runs = sorted(sorted(lengths[p] for p in b) for b in ds._pool(plan, pool))
        flat = [n for run in runs for n in run]
        assert flat == sorted(flat) and len(runs) == len(pooled[pool * 3 : pool * 3 + 3])
    loader = EpochDataLoader(ds, epoch_fn=lambda: 0, num_workers=2)
    assert seqs(loader) == pooled  # independent of the number of workers
    resumed = _dataset(env, mix=mix, length_pool=3, max_bad_fraction=0.5)  # its tail has more bad records
    resumed.start_batch = 4  # a resumed pass continues the same batches
    assert seqs(_epoch(resumed, 0)) == pooled[4:]
    val = {"split": "val", "shuffle": False, "max_bad_fraction": 0.5}
    assert seqs(_epoch(_dataset(env, length_pool=3, **val), 0)) == seqs(_epoch(_dataset(env, **val), 0))


def test_group_by_task_gives_one_task_per_batch(env):
    mix = {"caption": 2.0, "vqa": 3.0, "records": 1.0}
    plain, grouped = _dataset(env, mix=mix).plan(), _dataset(env, mix=mix, group_by_task=True).plan()
    assert sorted(map(tuple, grouped.tolist())) == sorted(map(tuple, plain.tolist()))  # same items
    tasks = grouped[:, 0]
    whole = sum(n // 4 for n in np.bincount(tasks))  # batches that can be of one task
    assert whole >= 8 and all(len(set(tasks[i * 4 : i * 4 + 4].tolist())) == 1 for i in range(whole))
    assert tasks[: whole * 4].tolist() != sorted(tasks[: whole * 4].tolist())  # batches in random order
    assert grouped.tolist() == _dataset(env, mix=mix, group_by_task=True).plan().tolist()
    ds = _dataset(env, mix=mix, group_by_task=True)
    ds.set_epoch(1)
    assert ds.plan().tolist() != grouped.tolist()
    assert _dataset(env, split="val", shuffle=False, group_by_task=True).plan().tolist() == (
        _dataset(env, split="val", shuffle=False).plan().tolist()
    )  # evaluation order unchanged


def test_val_split_and_bad_fraction_limit(env):
    val = _dataset(env, split="val", shuffle=False, record_files=[])
    assert {int(s) for s in val.plan()[:, 2]} == {16, 17, 18, 19}
    assert sum(len(b) for b in val) == 4 + 1
    with pytest.raises(InputError, match="max_bad_fraction"):
        list(_dataset(env, max_bad_fraction=0.01))


def test_over_long_records_are_skipped(env):
    mix = {"caption": 1.0, "vqa": 0.0, "records": 0.0}
    lengths = torch.cat([b.attention_mask.sum(1) for b in _epoch(_dataset(env, mix=mix), 0)])
    max_len = int(lengths.median())
    batches = _epoch(_dataset(env, max_len=max_len, mix=mix, max_bad_fraction=1.0), 0)
    skipped = sum((Counter(b.skipped) for b in batches), Counter())
    assert skipped["no_loss"] > 0 and set(skipped) <= {"too_long", "no_loss"}
    assert all(b.attention_mask.shape[1] <= max_len for b in batches)
    assert sum(len(b) for b in batches) == len(lengths)


def test_config_validation():
    with pytest.raises(ValueError, match="mix"):
        LMDataConfig(mix={"captions": 1.0})
    with pytest.raises(ValueError, match="cond_dropout"):
        LMDataConfig(cond_dropout=1.5)
    with pytest.raises(ValueError, match=r"understanding_image_loss must lie in \[0, 1\], got -0.5"):
        LMDataConfig(understanding_image_loss=-0.5)
    with pytest.raises(ValueError, match="length_pool must be >= 0 batches"):
        LMDataConfig(length_pool=-1)


def test_data_module(env):
    from lm.data import LMDataModule

    cfg = LMDataConfig(shard_dirs=[str(env["root"] / "phantoms")], record_files=[env["records"]], max_len=64,
                       batch_size=4, max_bad_fraction=0.3)  # fmt: skip
    dm = LMDataModule(cfg, env["tok"])
    assert dm.vocab == env["vocab"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.tokens.shape[0] == 4
    assert sum(len(b) for b in dm.val_dataloader()) == 4 + 1  # val rows: 4 captions, 1 vqa record
    wrong = Vocab(num_text=env["tok"].vocab_size, num_codebooks=K, codebook_size=V + 1, grid=GRID)
    with pytest.raises(InputError, match="phantoms"):
        LMDataModule(cfg, env["tok"], wrong)


def test_lightning_moves_batches_and_sets_epochs(env):
    import lightning.pytorch as pl

    from lm.data import LMDataModule

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(env["vocab"].size, 4)
            self.first_tokens = {}

        def training_step(self, batch, _):
            self.first_tokens.setdefault(self.current_epoch, batch.tokens.clone())
            return self.emb(batch.tokens).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cfg = LMDataConfig(shard_dirs=[str(env["root"] / "phantoms")], record_files=[env["records"]], max_len=64,
                       batch_size=4, max_bad_fraction=0.3)  # fmt: skip
    probe = Probe()
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(probe, datamodule=LMDataModule(cfg, env["tok"]))
    ds = _dataset(env)
    for epoch in (0, 1):
        assert torch.equal(probe.first_tokens[epoch], _epoch(ds, epoch)[0].tokens)

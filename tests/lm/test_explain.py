"""Explained yes/no answers (``data.vqa_explain``) and the ``compare`` task's text-only records."""

from collections import Counter

import numpy as np
import pytest

from lm.data import (
    EXPLAINED_ANSWER,
    LMDataConfig,
    LMDataset,
    ShardResolver,
    compare_record,
    explain,
    text_corpus,
    vqa_record,
)
from lm.sequence import IGNORE_INDEX, RecordRejected, build_sequence
from lm.text_tokenizer import TextTokenizer
from lm.vocab import Vocab
from tokenizer.data.phantom_text import phantom_questions, seen_value
from tokenizer.data.phantoms import make_phantom
from tokenizer.shards import CodeShard, ShardWriter

N, K, V, GRID = 24, 2, 16, (2, 2)
QUESTION = "Is the lesion in the left upper region large?"


def _qa(seed: int) -> list[dict]:
    phantom = make_phantom(seed, size=16)
    return [{"question": q, "answer": a} for q, a in phantom_questions(phantom, np.random.default_rng(seed))]


def _is_attribute_yes_no(question: str) -> bool:
    return question.startswith("Is the ") and " or " not in question


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    rows = [
        {
            "caption": "A lesion.",
            "attributes": make_phantom(i, size=16).attributes(),
            "qa": _qa(i),
            "split": "val" if i >= 20 else "train",
        }
        for i in range(N)
    ]
    codes = np.random.default_rng(0).integers(0, V, size=(N, K, *GRID))
    with ShardWriter(root / "phantoms", num_rows=N, K=K, V=V, grid=GRID, tokenizer_config={"K": K}) as w:
        w.write(range(N), codes, rows)
        w.finalize()
    shard = CodeShard(root / "phantoms")
    tok = TextTokenizer.train_bpe(text_corpus(shard) * 3, vocab_size=400)
    vocab = Vocab(num_text=tok.vocab_size, num_codebooks=K, codebook_size=V, grid=GRID)
    return {"root": root, "shard": shard, "tok": tok, "vocab": vocab, "rows": rows}


def _dataset(env, **cfg):
    cfg = LMDataConfig(
        **{"shard_dirs": [str(env["root"] / "phantoms")], "max_len": 128, "batch_size": 4, **cfg}
    )
    return LMDataset([env["shard"]], [], "train", cfg, env["vocab"], env["tok"])


def _said(env, seq) -> str:
    """The text of the positions that carry loss."""
    targets = seq.tokens[1:, 0][(seq.labels[:-1] != IGNORE_INDEX).all(1)].tolist()
    return env["tok"].decode([t for t in targets if t < env["vocab"].num_text])


def test_seen_value_is_the_value_of_the_named_region():
    checked = Counter()
    for seed in range(60):
        phantom = make_phantom(seed, size=16)
        by_region = {f.region: f for f in phantom.findings}
        for qa in _qa(seed):
            value = seen_value(qa["question"], qa["answer"])
            if not _is_attribute_yes_no(qa["question"]):
                assert value is None, qa
                continue
            finding = next(f for r, f in by_region.items() if f" {r} region " in qa["question"])
            assert value in (finding.size, finding.intensity), qa
            asked = qa["question"].rstrip("?").split()[-1]
            assert (value == asked) == (qa["answer"] == "yes")
            checked[qa["answer"]] += 1
    assert checked["yes"] > 10 and checked["no"] > 10
    assert seen_value(f"  {QUESTION.upper()} ", " No ") == "small"
    assert seen_value("Is the lesion in the left upper region dark?", "yes") == "dark"
    assert (
        seen_value(QUESTION, "small") is None
        and seen_value("Is the lesion in the left upper region round?", "no") is None
    )


def test_explain_rewrites_the_attribute_yes_no_answers_only():
    entries = [e for seed in range(6) for e in _qa(seed)] + [{"question": "broken"}]
    explained = explain(entries)
    assert len(explained) == len(entries) and explained[-1] is entries[-1]  # malformed: left for vqa_record
    rewritten = 0
    for before, after in zip(entries[:-1], explained[:-1], strict=True):
        value = seen_value(before["question"], before["answer"])
        if value is None:
            assert after == before
        else:
            assert after == {
                **before,
                "answer": EXPLAINED_ANSWER.format(value=value, answer=before["answer"]),
            }
            rewritten += 1
    assert rewritten == sum(_is_attribute_yes_no(e["question"]) for e in entries[:-1]) > 0
    assert explain([{"question": QUESTION, "answer": "No"}])[0]["answer"] == "small, so no"


def test_compare_record_is_the_last_step_of_the_answer_in_the_same_tokens(env):
    resolver = ShardResolver([env["shard"]])

    def build(record):
        return build_sequence(record, env["vocab"], env["tok"].encode, resolver)

    qa = {"question": QUESTION, "answer": "no"}
    vqa = build(vqa_record(explain([qa]), "phantoms:0"))
    compare = build(compare_record(QUESTION, "no"))
    vocab = env["vocab"]
    after_image = vqa.tokens[int((vqa.tokens[:, 0] == vocab.eoi).nonzero()) + 1 :]
    assert compare.tokens[0, 0] == vocab.bos and compare.tokens[1:].tolist() == after_image.tolist()
    assert (compare.image_pos < 0).all()
    assert _said(env, vqa) == "small, so no" and _said(env, compare) == " no"  # then <eos>
    assert compare.labels[-2, 0] == vocab.eos
    with pytest.raises(RecordRejected, match="size or intensity"):
        compare_record("Is there a lesion in the left upper region?", "yes")


def test_compare_task_batches_and_config(env):
    with pytest.raises(ValueError, match="vqa_explain"):
        LMDataConfig(mix={"caption": 1.0, "compare": 1.0})
    expected = sum(
        seen_value(e["question"], e["answer"]) is not None
        for r in env["rows"]
        if r["split"] == "train"
        for e in r["qa"]
    )
    mix = {"caption": 1.0, "vqa": 1.0, "records": 0.0}
    assert len(_dataset(env, mix=mix).items["compare"]) == 0  # not trained: no items, the plan draws nothing
    ds = _dataset(
        env, mix={**mix, "compare": 1.0}, vqa_explain=True, vqa_turns=3, group_by_task=True, grounding=True
    )
    assert len(ds.items["compare"]) == expected > 0
    compare = [b for b in ds if not (b.image_pos >= 0).any()]
    assert sum(len(b) for b in compare) == expected
    for b in compare:
        assert b.grounding is None or (b.grounding == IGNORE_INDEX).all()  # no image, no grounding targets
        for row in range(len(b)):
            kept = b.labels[row, :, 0][b.labels[row, :, 0] != IGNORE_INDEX].tolist()
            assert env["tok"].decode(kept[:-1]) in (" yes", " no") and kept[-1] == env["vocab"].eos
    said = Counter()
    for position in range(len(ds.plan())):
        if ds.plan()[position, 0] == 1:  # vqa
            said.update(a.split(",")[0] for a in _said(env, ds.sequence(ds.plan(), position)).split("\n"))
    assert said["small"] + said["large"] + said["bright"] + said["dark"] > 0 and said["yes"] + said["no"] > 0

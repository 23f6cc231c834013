import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Test models are tiny: one intra-op thread is faster than two fighting over the cores (OpenMP spin-waits
# made token-by-token decoding 30x slower with two threads on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def make_lm_inputs(tmp_path_factory):
    """Factory: a tiny tokenizer checkpoint and a shard of 12 captioned phantoms it encoded.

    ``make(question)`` adds one closed question per record ("<question>" -> the modality) unless question is
    None; returns (checkpoint directory, shard directory).
    """
    from tokenizer.api import create_tokenizer
    from tokenizer.checkpoint import load_tokenizer, save_tokenizer
    from tokenizer.data.phantoms import PhantomDataset
    from tokenizer.encode import checkpoint_config
    from tokenizer.shards import ShardWriter

    def make(question: str | None):
        root = tmp_path_factory.mktemp("lm_inputs")
        checkpoint = save_tokenizer(create_tokenizer("tiny").eval(), root / "tokenizer")
        tokenizer = load_tokenizer(checkpoint)
        data = PhantomDataset(12, seed=1, size=32)
        with torch.no_grad():
            codes = tokenizer.encode_to_codes(torch.stack([data[i]["image"] for i in range(12)]))
        records = [{k: data[i][k] for k in ("source", "modality", "caption")} for i in range(12)]
        if question is not None:
            for record in records:
                record["qa"] = [{"question": question, "answer": record["modality"]}]
        config = checkpoint_config(checkpoint, tokenizer)
        with ShardWriter(
            root / "phantoms", num_rows=12, K=2, V=16, grid=(8, 8), tokenizer_config=config
        ) as w:
            w.write(range(12), codes, records)
            w.finalize()
        return checkpoint, root / "phantoms"

    return make

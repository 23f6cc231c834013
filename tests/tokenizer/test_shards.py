import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenizer.errors import InputError
from tokenizer.shards import CodeShard, ShardWriter

N, K, V, GRID = 12, 2, 300, (2, 3)
CONFIG = {"format": "medtok-image-tokenizer", "K": K, "V": V, "grid": list(GRID)}


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, V, size=(N, K, *GRID))
    records = [
        {
            "source": f"img{i}.png",
            "modality": "ct" if i % 2 else "mr",
            "caption": f"caption {i}",
            "split": "val" if i == 3 else "train",
            "qa": [{"question": f"q{i}?", "answer": "yes"}],
        }
        for i in range(N)
    ]
    return codes, records


def _writer(path, rank=0):
    return ShardWriter(path, num_rows=N, K=K, V=V, grid=GRID, tokenizer_config=CONFIG, rank=rank)


def _clean_run(path):
    codes, records = _data()
    with _writer(path) as w:
        w.write(range(N), codes, records)
        w.finalize()
    return path


def _same_shard(a: Path, b: Path) -> None:
    assert (a / "codes.npy").read_bytes() == (b / "codes.npy").read_bytes()
    assert (a / "index.jsonl").read_text() == (b / "index.jsonl").read_text()
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def test_write_and_read_back(tmp_path):
    codes, records = _data()
    shard = CodeShard(_clean_run(tmp_path / "s"))
    assert len(shard) == N and shard.K == K and shard.V == V and shard.grid == GRID
    assert shard.config == CONFIG
    assert shard.name == "s"
    for i in (0, 5, N - 1):
        c = shard.codes(i)
        assert c.dtype == torch.long and tuple(c.shape) == (K, *GRID)
        assert torch.equal(c, torch.from_numpy(codes[i]))
        row = shard.row(i)
        assert row["row"] == i and row["caption"] == f"caption {i}" and row["qa"][0]["answer"] == "yes"
    assert np.load(tmp_path / "s" / "codes.npy", mmap_mode="r").dtype == np.uint16
    with pytest.raises(InputError, match="row 12"):
        shard.codes(N)


def test_resume_after_crash_matches_clean_run(tmp_path):
    codes, records = _data()
    clean = _clean_run(tmp_path / "clean")
    path = tmp_path / "resumed"
    w = _writer(path)
    order = [7, 2, 9, 0, 11, 4]  # half the rows, out of order
    w.write(order, codes[order], [records[i] for i in order])
    del w  # "crash": no finalize, no close
    # a kill in the middle of an append leaves a partial last line
    with open(path / "index.rank0.jsonl", "ab") as f:
        f.write(b'{"row": 5, "source": "img5.p')
    with pytest.raises(InputError, match="6 of 12 rows not written"):
        _writer(path).finalize()
    w = _writer(path)
    assert w.num_done == 6 and w.pending() == [1, 3, 5, 6, 8, 10]
    rest = w.pending()
    # writing everything again only writes the missing rows: no duplicates
    assert w.write(range(N), codes, records) == len(rest)
    assert w.write(rest, codes[rest], [records[i] for i in rest]) == 0
    w.finalize()
    _same_shard(clean, path)
    assert len(CodeShard(path)) == N


def test_parallel_ranks_out_of_order(tmp_path):
    codes, records = _data()
    clean = _clean_run(tmp_path / "clean")
    path = tmp_path / "ranks"
    writers = [_writer(path, rank=r) for r in range(3)]
    for r, w in enumerate(writers):
        rows = list(range(N))[r::3][::-1]
        w.write(rows, codes[rows], [records[i] for i in rows])
    assert sorted(p.name for p in path.glob("index.rank*.jsonl")) == [
        f"index.rank{r}.jsonl" for r in range(3)
    ]
    for w in writers[1:]:
        w.close()
    writers[0].finalize()
    _same_shard(clean, path)
    # a resumed run with another world size finds every row finished
    assert _writer(path, rank=5).pending() == []


_CHILD = """
import sys, time, numpy as np
from tokenizer.shards import ShardWriter
path, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
codes = rng.integers(0, 300, size=(n, 2, 2, 3))
w = ShardWriter(path, num_rows=n, K=2, V=300, grid=(2, 3), tokenizer_config={}, rank=0)
for r in w.pending():
    w.write([r], codes[r:r + 1], [{"caption": "c" * 50}])
    time.sleep(0.002)
"""


def test_sigkill_loses_no_finished_row(tmp_path):
    n = 400
    path = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(n)], env=env)
    log = path / "index.rank0.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or log.stat().st_size < 2000):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    w = ShardWriter(path, num_rows=n, K=2, V=300, grid=(2, 3), tokenizer_config={})
    assert 0 < w.num_done < n
    codes = np.random.default_rng(0).integers(0, 300, size=(n, 2, 2, 3))
    stored = np.load(path / "codes.npy", mmap_mode="r")
    done = [r for r in range(n) if w.is_done(r)]
    assert np.array_equal(stored[done], codes[done])  # every recorded row has its codes
    rest = w.pending()
    w.write(rest, codes[rest], [{"caption": "c" * 50}] * len(rest))
    w.finalize()
    shard = CodeShard(path)
    assert [shard.row(i)["row"] for i in range(n)] == list(range(n))
    assert np.array_equal(np.load(path / "codes.npy"), codes)


def test_refuses_a_different_shard_in_the_same_directory(tmp_path):
    _writer(tmp_path).close()
    with pytest.raises(InputError, match="shard.json.*num_rows"):
        ShardWriter(tmp_path, num_rows=N + 1, K=K, V=V, grid=GRID, tokenizer_config=CONFIG)
    with pytest.raises(InputError, match="config.json"):
        ShardWriter(tmp_path, num_rows=N, K=K, V=V, grid=GRID, tokenizer_config={"other": 1})


def test_write_validation(tmp_path):
    w = _writer(tmp_path)
    codes, records = _data()
    with pytest.raises(InputError, match="shape"):
        w.write([0], codes[:2], records[:1])
    with pytest.raises(InputError, match=r"\[0, 300\)"):
        w.write([0], np.full((1, K, *GRID), V), records[:1])
    with pytest.raises(InputError, match="outside"):
        w.write([N], codes[:1], records[:1])
    with pytest.raises(InputError, match="V must lie"):
        ShardWriter(tmp_path / "big", num_rows=1, K=1, V=70000, grid=(1, 1), tokenizer_config={})


def test_reader_validates_files(tmp_path):
    path = _clean_run(tmp_path / "s")
    meta = json.loads((path / "shard.json").read_text())
    (path / "shard.json").write_text(json.dumps({**meta, "K": 3}))
    with pytest.raises(InputError, match="codes.npy: expected uint16"):
        CodeShard(path)
    (path / "shard.json").write_text(json.dumps({**meta, "V": 65536}))
    with pytest.raises(InputError, match="shard.json: V must lie"):
        CodeShard(path)
    (path / "shard.json").write_text(json.dumps(meta))
    lines = (path / "index.jsonl").read_text().splitlines()
    (path / "index.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(InputError, match="index.jsonl: 11 rows"):
        CodeShard(path)
    (path / "index.jsonl").write_text("\n".join([lines[1], *lines[1:]]) + "\n")
    with pytest.raises(InputError, match="index.jsonl:1"):
        CodeShard(path)
    with pytest.raises(InputError, match="index.jsonl: missing"):
        CodeShard(_writer(tmp_path / "unfinished").directory)


def test_shard_pickles_without_the_memmap(tmp_path):
    import pickle

    shard = CodeShard(_clean_run(tmp_path / "s"))
    shard.codes(0)
    blob = pickle.dumps(shard)
    assert len(blob) < 10_000
    assert torch.equal(pickle.loads(blob).codes(3), shard.codes(3))

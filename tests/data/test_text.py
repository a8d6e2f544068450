import json
import os
import shutil

import pytest
import torch

from lightning_memkit.data import ByteTokenizer, TextDataModule, list_files, load_tokenizer, split_keys, tokenize_corpus
from lightning_memkit.data.text import is_validation


def _write_corpus(root, n_docs=40):
    os.makedirs(root, exist_ok=True)
    for i in range(n_docs):
        with open(os.path.join(root, f"doc{i:02d}.txt"), "w") as f:
            f.write(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (5 + i % 7))
    return str(root)


def _batches(dm, n=3):
    return [b["input_ids"].clone() for _, b in zip(range(n), dm.train_dataloader())]


def test_same_data_same_sequences_and_split(tmp_path):
    root = _write_corpus(tmp_path / "corpus")
    a = TextDataModule(paths=root, seq_len=32, batch_size=4, val_fraction=0.2)
    b = TextDataModule(paths=root, seq_len=32, batch_size=4, val_fraction=0.2)
    a.setup(), b.setup()
    assert torch.equal(a.train_set.tokens, b.train_set.tokens) and torch.equal(a.val_set.tokens, b.val_set.tokens)
    assert all(torch.equal(x, y) for x, y in zip(_batches(a), _batches(b)))
    assert len(a.val_set) > 0 and len(a.train_set) > len(a.val_set)


def test_split_is_by_document_and_independent_of_location_and_workers(tmp_path):
    root = _write_corpus(tmp_path / "corpus")
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "corpus")
    a = TextDataModule(paths=root, seq_len=32, val_fraction=0.2)
    b = TextDataModule(paths=str(moved), seq_len=32, val_fraction=0.2, num_workers=2)
    a.setup(), b.setup()
    assert torch.equal(a.train_set.tokens, b.train_set.tokens) and torch.equal(a.val_set.tokens, b.val_set.tokens)
    assert all(torch.equal(x, y) for x, y in zip(_batches(a), _batches(b)))
    # each document lies wholly in one split
    val_docs = {f for f in sorted(os.listdir(root)) if is_validation(f, 0.2)}
    val_text = ByteTokenizer().decode(a.val_set.tokens.tolist())
    for f in sorted(os.listdir(root)):
        doc = open(os.path.join(root, f)).read()
        assert (doc[:40] in val_text) == (f in val_docs)


def test_packing_targets_are_inputs_shifted(tmp_path):
    dm = TextDataModule(paths=_write_corpus(tmp_path / "c"), seq_len=16, batch_size=2)
    dm.setup()
    item, nxt = dm.train_set[0], dm.train_set[1]
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])
    assert item["labels"][-1] == nxt["input_ids"][0]  # windows tile the stream
    assert ByteTokenizer.eos_id in dm.train_set.tokens


def test_jsonl_documents(tmp_path):
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for i in range(30):
            f.write(json.dumps({"body": f"record {i} " + "lorem ipsum dolor sit amet " * 4}) + "\n")
    dm = TextDataModule(paths=str(path), text_key="body", seq_len=16, val_fraction=0.3)
    dm.setup()
    assert "record 3 lorem" in ByteTokenizer().decode(torch.cat([dm.train_set.tokens, dm.val_set.tokens]).tolist())
    with pytest.raises(ValueError, match="has no 'text' field.*data.text_key"):
        TextDataModule(paths=str(path), seq_len=16).setup()


def test_default_corpus_is_the_python_standard_library():
    dm = TextDataModule(max_tokens=200_000, seq_len=64)
    dm.setup()
    text = ByteTokenizer().decode(dm.train_set.tokens[:20000].tolist())
    assert "import" in text and "def " in text


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.paths: .*nowhere.* does not exist"):
        TextDataModule(paths=str(tmp_path / "nowhere")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no text files"):
        TextDataModule(paths=str(tmp_path / "empty")).setup()
    with pytest.raises(ValueError, match=r"data.paths=\[\] is empty"):
        TextDataModule(paths=[])
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(ValueError, match="fewer than one sequence of data.seq_len=64"):
        TextDataModule(paths=str(tmp_path / "tiny.txt"), seq_len=64).setup()


def test_split_independent_of_location_for_several_roots_and_files(tmp_path):
    a = _write_corpus(tmp_path / "one" / "a", n_docs=20)
    b = _write_corpus(tmp_path / "one" / "b", n_docs=20)
    single = os.path.join(a, "doc03.txt")
    moved = shutil.copytree(tmp_path / "one", tmp_path / "two" / "deeper")
    first = TextDataModule(paths=[a, b, single], seq_len=16, val_fraction=0.3)
    second = TextDataModule(paths=[str(moved / "a"), str(moved / "b"), str(moved / "a" / "doc03.txt")], seq_len=16,
                            val_fraction=0.3)
    first.setup(), second.setup()
    assert torch.equal(first.val_set.tokens, second.val_set.tokens)
    assert torch.equal(first.train_set.tokens, second.train_set.tokens)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": "0.1"}, "data.val_fraction='0.1'"),
        ({"max_tokens": "100"}, "data.max_tokens='100'"),
        ({"max_tokens": -5}, "data.max_tokens=-5"),
        ({"tokenizer": None}, "data.tokenizer=None"),
        ({"paths": 5}, "data.paths=5"),
        ({"batch_size": 0}, "data.batch_size=0"),
    ],
)
def test_wrong_types_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(**kwargs)


def test_bad_settings():
    with pytest.raises(ValueError, match="data.seq_len=0"):
        TextDataModule(seq_len=0)
    with pytest.raises(ValueError, match="data.val_fraction=1.5"):
        TextDataModule(val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="data.tokenizer='gpt2'"):
        TextDataModule(tokenizer="gpt2")


def test_hf_tokenizer_from_local_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    root = _write_corpus(tmp_path / "c")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"])
    tok.train([os.path.join(root, f) for f in sorted(os.listdir(root))], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.eos_id == fast.eos_token_id and loaded.vocab_size == len(fast)
    dm = TextDataModule(paths=root, tokenizer=str(tmp_path / "tok"), seq_len=8)
    dm.setup()
    assert dm.vocab_size == len(fast)
    assert int(dm.train_set.tokens.max()) < dm.vocab_size
    assert "quick brown" in loaded.decode(dm.train_set.tokens[:40].tolist())


def test_list_files_sorted_and_filtered(tmp_path):
    root = _write_corpus(tmp_path / "c", n_docs=3)
    (tmp_path / "c" / "image.png").write_bytes(b"\x89PNG")
    files = list_files([root, os.path.join(root, "doc00.txt")])
    assert files == sorted(files) and len(files) == 3


def test_max_tokens_caps_reading(tmp_path):
    root = _write_corpus(tmp_path / "c")
    files = split_keys([root])
    train, val = tokenize_corpus(files, ByteTokenizer(), val_fraction=0.1, max_tokens=1000)
    full_train, full_val = tokenize_corpus(files, ByteTokenizer(), val_fraction=0.1)
    assert 1000 <= len(train) + len(val) < len(full_train) + len(full_val)


def test_sentencepiece_model_file(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    root = _write_corpus(tmp_path / "c")
    corpus = tmp_path / "all.txt"
    corpus.write_text("\n".join(open(os.path.join(root, f)).read() for f in sorted(os.listdir(root))))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40, eos_id=2, bos_id=-1,
        minloglevel=2,
    )
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert tok.vocab_size == 40 and tok.eos_id == 2
    dm = TextDataModule(paths=root, tokenizer=str(tmp_path / "sp.model"), seq_len=8)
    dm.setup()
    assert int(dm.train_set.tokens.max()) < 40
    assert "quick brown" in tok.decode(dm.train_set.tokens[:40].tolist())


def test_epoch_shuffle_sampler_matches_a_seeded_shuffle_and_depends_on_the_epoch_only():
    from torch.utils.data import DataLoader

    from lightning_memkit.data.text import EpochShuffleSampler

    data = list(range(23))
    plain = DataLoader(data, batch_size=4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(5))
    sampler = EpochShuffleSampler(23, 5)
    ours = DataLoader(data, batch_size=4, sampler=sampler, drop_last=True, generator=torch.Generator().manual_seed(5))
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append([b.tolist() for b in ours])
        assert orders[-1] == [b.tolist() for b in plain]
    fresh = EpochShuffleSampler(23, 5)  # a resumed run: a new sampler told the epoch
    fresh.set_epoch(2)
    assert [b.tolist() for b in DataLoader(data, batch_size=4, sampler=fresh, drop_last=True)] == orders[2]


def _loader(n=23, batch_size=3, num_workers=0, num_replicas=1, rank=0, seed=5):
    from lightning_memkit.data import EpochShuffleSampler, ResumableDataLoader

    sampler = EpochShuffleSampler(n, seed, num_replicas=num_replicas, rank=rank)
    return ResumableDataLoader(list(range(n)), batch_size=batch_size, sampler=sampler, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_resumes_at_the_next_batch_of_the_epoch(num_workers):
    """state_dict() after k batches counts the batches handed out (not those workers prepared ahead); a new
    loader given it continues with batch k of the same epoch, and the epoch after it is the usual one."""
    loader = _loader(num_workers=num_workers)
    loader.sampler.set_epoch(2)
    full = [b.tolist() for b in loader]
    loader.sampler.set_epoch(3)
    following = [b.tolist() for b in loader]
    loader.sampler.set_epoch(2)
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(4)]
    state = loader.state_dict()
    assert seen == full[:4] and state["epoch"] == 2 and state["batches"] == 4
    resumed = _loader(num_workers=num_workers)
    resumed.load_state_dict(state)
    it = iter(resumed)  # Lightning asks for the iterator first, then sets the (same) epoch
    resumed.sampler.set_epoch(2)
    assert [b.tolist() for b in it] == full[4:]
    assert resumed.state_dict()["batches"] == len(full)
    resumed.sampler.set_epoch(3)
    assert [b.tolist() for b in resumed] == following
    del it


def test_loader_state_of_a_finished_epoch_starts_the_next_one():
    loader = _loader()
    loader.sampler.set_epoch(0)
    list(loader)
    state = loader.state_dict()
    assert state["batches"] == len(loader)
    resumed = _loader()
    resumed.load_state_dict(state)
    nxt = _loader()
    nxt.sampler.set_epoch(1)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in nxt]  # epoch 1, from its start


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_for_another_epoch_is_dropped_by_set_epoch(num_workers):
    """A pending position belongs to its epoch: Lightning moving on to another epoch starts that one at 0 --
    also with workers, which start fetching when the iterator starts, after Lightning's set_epoch."""
    loader = _loader(num_workers=num_workers)
    loader.load_state_dict({**_loader().state_dict(), "epoch": 0, "batches": 3})
    assert loader.state_dict()["batches"] == 3  # saved again before any batch: the same place
    it = iter(loader)
    loader.sampler.set_epoch(1)
    fresh = _loader()
    fresh.sampler.set_epoch(1)
    assert [b.tolist() for b in it] == [b.tolist() for b in fresh]


def test_loader_state_from_other_data_settings_is_refused():
    from lightning_memkit import MemKitConfigError

    state = _loader().state_dict()
    with pytest.raises(MemKitConfigError, match=r"data.batch_size: .*batch_size=3, this run has batch_size=4.*Fix"):
        _loader(batch_size=4).load_state_dict(state)
    with pytest.raises(MemKitConfigError, match="number of training sequences.*samples=23.*samples=24"):
        _loader(n=24).load_state_dict(state)
    with pytest.raises(MemKitConfigError, match="number of processes"):
        _loader(num_replicas=2).load_state_dict(state)
    with pytest.raises(MemKitConfigError, match="data.seed"):
        _loader(seed=6).load_state_dict(state)
    with pytest.raises(MemKitConfigError, match="version None"):
        _loader().load_state_dict({k: v for k, v in state.items() if k != "version"})


def test_sampler_shards_an_epoch_across_processes():
    """Rank r takes every other index: the k-th batches of 2 processes hold the k-th batch of one process
    with twice the batch; a sampler is a DistributedSampler, which Lightning leaves in place."""
    from torch.utils.data import DistributedSampler

    one = _loader(n=23, batch_size=4)
    ranks = [_loader(n=23, batch_size=2, num_replicas=2, rank=r) for r in range(2)]
    assert isinstance(one.sampler, DistributedSampler) and len(ranks[0]) == len(ranks[1]) == len(one) == 5
    for epoch in range(2):
        for loader in (one, *ranks):
            loader.sampler.set_epoch(epoch)
        for whole, a, b in zip(one, *ranks):
            assert sorted(whole.tolist()) == sorted(a.tolist() + b.tolist())


def test_text_datamodule_shards_when_the_trainer_is_distributed(small_corpus_dir):
    """The training loader reads the process count and rank from the trainer, and is resumable."""
    from lightning.fabric.utilities.types import _Stateful

    class FakeTrainer:
        distributed_sampler_kwargs = {"num_replicas": 2, "rank": 1}

    dm = TextDataModule(paths=small_corpus_dir, seq_len=32, batch_size=4)
    dm.setup()
    alone = dm.train_dataloader()
    dm.trainer = FakeTrainer()
    second = dm.train_dataloader()
    assert isinstance(alone, _Stateful) and isinstance(second, _Stateful)
    assert (alone.sampler.num_replicas, second.sampler.num_replicas, second.sampler.rank) == (1, 2, 1)
    assert len(second.sampler) == len(dm.train_set) // 2

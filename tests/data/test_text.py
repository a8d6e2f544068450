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

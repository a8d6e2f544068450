import pytest
import torch

from lightning_memkit.activations import apply_checkpointing
from lightning_memkit.models import HFCausalLM, find_blocks, load_hf_causal_lm
from tests.models.test_llama import tiny_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture
def saved_llama(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama"), hf


def test_load_from_local_folder_and_interface(saved_llama):
    path, hf = saved_llama
    model = load_hf_causal_lm(path).eval()
    assert isinstance(model, HFCausalLM)
    assert model.memkit_blocks() is model.hf.model.layers
    assert model.final_norm is model.hf.model.norm and model.lm_head is model.hf.lm_head
    assert model.max_seq_len == 128 and model.vocab_size == 101
    ids = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits)
        torch.testing.assert_close(model.lm_head(model.forward_hidden(ids)), model(ids))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_checkpointing_hf_blocks_is_exact(family):
    model = HFCausalLM(tiny_hf(family)).train()
    ids = torch.randint(0, 101, (2, 19))

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids).float().logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert find_blocks(model) == list(model.hf.model.layers)
    apply_checkpointing(find_blocks(model))
    ckpt = grads()
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name


def test_raw_hf_model_blocks_found_structurally():
    hf = tiny_hf("qwen2")
    assert find_blocks(hf) == list(hf.model.layers)


def test_path_that_is_not_a_causal_lm(tmp_path):
    distilbert = transformers.DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    distilbert.save_pretrained(tmp_path / "distilbert")
    with pytest.raises(ValueError, match="'distilbert' model, which is not a causal LM"):
        load_hf_causal_lm(str(tmp_path / "distilbert"))
    # BERT has a causal-LM head class, but not the decoder-only layout the adapter serves
    bert = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="neither a family of memkit's table .* nor a decoder-only causal LM"):
        load_hf_causal_lm(str(tmp_path / "bert"))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder with a config.json"):
        load_hf_causal_lm(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "gemma2", "phi3"])
def test_every_family_of_the_table_behind_the_interface(model_type):
    """HFCausalLM finds each family's parts through the table (GPT-2's transformer.h and ln_f, GPT-NeoX's
    embed_out): its forward is the model's, forward_hidden and the head give the same logits, and the blocks
    are the model's."""
    from tests.loss.test_families import tiny

    hf = tiny(model_type).eval()
    model = HFCausalLM(hf)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
        torch.testing.assert_close(model(ids), logits)
        head = model.lm_head(model.forward_hidden(ids))
        if model.logit_softcap is not None:
            head = model.logit_softcap * torch.tanh(head / model.logit_softcap)
        torch.testing.assert_close(head, logits)
    assert len(find_blocks(model)) == 2 and model.max_seq_len == 64 and model.vocab_size == 97
    assert model.embed_tokens.weight.shape[0] == 97

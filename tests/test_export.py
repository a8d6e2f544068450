"""Exporting memkit checkpoints of ``CausalLMModule(hf_path=...)`` as Hugging Face folders (lightning_memkit.export)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_memkit import CausalLMModule, MemKitStrategy
from lightning_memkit.config import MemKitConfigError
from lightning_memkit.export import DTYPES, PEFT_CHECKPOINT_KEY, export_checkpoint, main
from tests.helpers.export_fit import batch, loader

transformers = pytest.importorskip("transformers")
HERE = os.path.dirname(os.path.abspath(__file__))


def _tokenizer():
    """A byte-level BPE tokenizer trained here (offline), 258 tokens like the model's vocabulary."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=258, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["memkit exports models"] * 8, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture
def hf_dir(tmp_path) -> str:
    """A tiny random-init Llama (untied head) with a tokenizer and a generation config of its own."""
    config = transformers.LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.max_new_tokens = 7
    folder = str(tmp_path / "base")
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


class PeftModule(CausalLMModule):
    """The Hugging Face model wrapped in LoRA adapters; checkpoints record the PEFT configuration."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        self.model.hf = peft.get_peft_model(self.model.hf, config)  # CausalLMModule records its LoRA settings


def _fit(module: CausalLMModule, folder, strategy: MemKitStrategy) -> str:
    """Train 2 steps, saving a checkpoint with ModelCheckpoint; its path."""
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(folder),
                         callbacks=[ModelCheckpoint(dirpath=str(folder), every_n_train_steps=2, filename="{step}")])
    trainer.fit(module, train_dataloaders=loader())
    path = os.path.join(str(folder), "step=2.ckpt")
    assert os.path.isfile(path)
    return path


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch(), use_cache=False).logits


def _reload(folder: str, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)


@pytest.mark.parametrize("optimizer", [None, {"name": "adamw", "in_backward": True}], ids=["ddp", "in_backward"])
def test_ddp_checkpoint_exports_a_folder_from_pretrained_loads(optimizer, hf_dir, tmp_path):
    module = CausalLMModule(hf_path=hf_dir, learning_rate=1e-2, warmup_steps=0)
    ckpt = _fit(module, tmp_path / "ckpt", MemKitStrategy(optimizer=optimizer))
    before = _logits(_reload(hf_dir))
    trained = _logits(module.model.hf)
    assert not torch.allclose(trained, before), "training did not change the model"

    out = export_checkpoint(ckpt, tmp_path / "export")
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files, files
    reloaded = _reload(out)
    assert reloaded.dtype == torch.float32
    assert torch.equal(_logits(reloaded), trained)
    assert reloaded.generation_config.max_new_tokens == 7
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer("memkit exports").input_ids == _tokenizer()("memkit exports").input_ids
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]


def test_command_line_export_casts_and_refuses_bad_arguments(hf_dir, tmp_path, capsys):
    module = CausalLMModule(hf_path=hf_dir, learning_rate=1e-2, warmup_steps=0)
    ckpt = _fit(module, tmp_path / "ckpt", MemKitStrategy())
    assert main(["--ckpt", ckpt, "--to", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert "exported" in capsys.readouterr().out
    reloaded = _reload(str(tmp_path / "bf16"), dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    weights = reloaded.state_dict()
    for name, value in module.model.hf.state_dict().items():  # every weight the trained one, rounded to bf16
        assert torch.equal(weights[name], value.to(torch.bfloat16)), name
    torch.testing.assert_close(_logits(reloaded).float(), _logits(module.model.hf), rtol=0, atol=0.05)

    with pytest.raises(MemKitConfigError, match=r"argument --dtype: invalid choice: 'fp8'.*Fix: memkit export"):
        main(["--ckpt", ckpt, "--to", str(tmp_path / "x"), "--dtype", "fp8"])
    with pytest.raises(MemKitConfigError, match=r"required: --to.*Fix"):
        main(["--ckpt", ckpt])
    with pytest.raises(MemKitConfigError, match=r"to=.*bf16.* exists and is not an empty folder.*Fix"):
        main(["--ckpt", ckpt, "--to", str(tmp_path / "bf16")])
    with pytest.raises(MemKitConfigError, match=r"--adapter-only.*holds no PEFT adapters.*Fix"):
        main(["--ckpt", ckpt, "--to", str(tmp_path / "x"), "--adapter-only"])
    with pytest.raises(MemKitConfigError, match=r"ckpt=.*does not exist.*Fix"):
        export_checkpoint(tmp_path / "nothing.ckpt", tmp_path / "x")
    with pytest.raises(MemKitConfigError, match=r"dtype='int8' is not an export dtype.*Fix"):
        export_checkpoint(ckpt, tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()


def test_a_moved_model_folder_is_named_and_hf_path_overrides_it(hf_dir, tmp_path):
    """Only the config (and tokenizer) of hf_path are read: a copy without weights rebuilds the model."""
    module = CausalLMModule(hf_path=hf_dir, learning_rate=1e-2, warmup_steps=0)
    ckpt = _fit(module, tmp_path / "ckpt", MemKitStrategy())
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    os.replace(os.path.join(hf_dir, "config.json"), config_only / "config.json")
    with pytest.raises(MemKitConfigError, match=r"model.hf_path=.*not a folder with a config.json.*--hf-path"):
        export_checkpoint(ckpt, tmp_path / "x")
    out = export_checkpoint(ckpt, tmp_path / "export", hf_path=str(config_only))
    assert torch.equal(_logits(_reload(out)), _logits(module.model.hf))
    assert "tokenizer.json" not in os.listdir(out)  # no tokenizer in that folder: skipped quietly


def test_reference_model_is_refused_with_the_way_to_load_it(tmp_path):
    module = CausalLMModule(model="tiny")
    ckpt = str(tmp_path / "ref.ckpt")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    with pytest.raises(MemKitConfigError, match=r"hf_path=None \(the reference model 'tiny'\): only CausalLMModule"
                                                r"\(hf_path=...\) models export .*CausalLMModule.load_from_checkpoint"):
        export_checkpoint(ckpt, tmp_path / "x")
    with pytest.raises(MemKitConfigError, match=r"save_pretrained: .*CausalLMModule.load_from_checkpoint"):
        module.save_pretrained(str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_save_pretrained_of_a_live_module(hf_dir, tmp_path):
    module = CausalLMModule(hf_path=hf_dir, learning_rate=1e-2, warmup_steps=0)
    _fit(module, tmp_path / "ckpt", MemKitStrategy())
    module.save_pretrained(str(tmp_path / "live"))
    assert {"model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "live"))
    assert torch.equal(_logits(_reload(str(tmp_path / "live"))), _logits(module.model.hf))


def test_peft_checkpoint_exports_merged_or_adapters_only(hf_dir, tmp_path):
    peft = pytest.importorskip("peft")
    module = PeftModule(hf_path=hf_dir, learning_rate=1e-2, warmup_steps=0)
    ckpt = _fit(module, tmp_path / "ckpt", MemKitStrategy(cross_entropy="plain"))
    trained = _logits(module.model.hf)
    base = _reload(hf_dir)
    assert not torch.allclose(trained, _logits(base), atol=1e-4), "the adapters did not train"
    saved = torch.load(ckpt, weights_only=True)  # the recorded PEFT configuration is plain values
    assert saved[PEFT_CHECKPOINT_KEY]["default"]["r"] == 4

    merged = export_checkpoint(ckpt, tmp_path / "merged")
    assert not any(f.startswith("adapter_") for f in os.listdir(merged))
    reloaded = _reload(merged)
    assert not isinstance(reloaded, peft.PeftModel)
    torch.testing.assert_close(_logits(reloaded), trained, rtol=1e-5, atol=1e-5)  # W + BA summed once: rounding

    adapters = export_checkpoint(ckpt, tmp_path / "adapters", merge_lora=False)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapters))
    assert "model.safetensors" not in os.listdir(adapters)
    with open(os.path.join(adapters, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(hf_dir)
    over_base = peft.PeftModel.from_pretrained(_reload(hf_dir), adapters)
    assert torch.equal(_logits(over_base), trained)

    module.save_pretrained(str(tmp_path / "live_adapters"))  # the live module: adapters alone by default
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "live_adapters")
    module.save_pretrained(str(tmp_path / "live_merged"), merge_lora=True)
    torch.testing.assert_close(_logits(_reload(str(tmp_path / "live_merged"))), trained, rtol=1e-5, atol=1e-5)
    assert isinstance(module.model.hf, peft.PeftModel)  # merging a copy left the live module's adapters alone

    del saved[PEFT_CHECKPOINT_KEY]
    torch.save(saved, tmp_path / "no_config.ckpt")
    with pytest.raises(MemKitConfigError, match=r"PEFT \(LoRA\) weights but no PEFT configuration.*Fix"):
        export_checkpoint(tmp_path / "no_config.ckpt", tmp_path / "x")


ZERO_CASES = [  # (MemKitStrategy kwargs, helper arguments, --dtype of the export); ~7 s each, one process
    pytest.param({"zero_stage": 1}, [], None, id="zero1"),
    pytest.param({"zero_stage": 2}, [], None, id="zero2"),
    # a torch optimizer stepping on the CPU partitions (cpu_adam=False: nothing JIT-compiles)
    pytest.param({"zero_stage": 2, "offload_optimizer": "cpu", "cpu_adam": False}, [], None, id="zero2_offload"),
    # really sharded (2 processes, a partition each), bf16: the module holds bf16 copies of the fp32 master weights,
    # so the fp32 export differs from it and the bf16 export (the command line's --dtype bf16) equals it
    pytest.param({"zero_stage": 2}, ["--devices", "2", "--precision", "bf16-mixed"], "bf16", id="zero2_bf16_2ranks",
                 marks=pytest.mark.slow),
    pytest.param({"zero_stage": 3}, [], None, id="zero3", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("strategy", "fit_args", "dtype"), ZERO_CASES)
def test_zero_checkpoint_folder_exports_the_trained_model(strategy, fit_args, dtype, hf_dir, tmp_path, capsys):
    """ZeRO-1/2/3 (DeepSpeed on CPU, in a subprocess): the sharded folder, consolidated, is the trained model."""
    pytest.importorskip("deepspeed")
    out = str(tmp_path / "fit.pt")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "helpers", "export_fit.py"), "--hf-path", hf_dir,
         "--strategy", json.dumps(strategy), "--workdir", str(tmp_path / "ckpt"), "--out", out, *fit_args],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    fit = torch.load(out, weights_only=True)
    assert fit["strategy"] == "MemKitDeepSpeedStrategy"
    assert fit["backend"] == f"DeepSpeed ZeRO-{strategy['zero_stage']}" + (
        " (optimizer on cpu)" if strategy.get("offload_optimizer") == "cpu" else "")
    ckpt = str(tmp_path / "ckpt" / "step=2.ckpt")
    shards = [f for f in os.listdir(os.path.join(ckpt, "checkpoint")) if f.endswith("optim_states.pt")]
    ranks = int(fit_args[fit_args.index("--devices") + 1]) if "--devices" in fit_args else 1
    assert len(shards) == ranks, shards  # one optimizer partition per process
    exported = str(tmp_path / "export")
    assert main(["--ckpt", ckpt, "--to", exported] + (["--dtype", dtype] if dtype else [])) == 0
    assert "exported" in capsys.readouterr().out
    reloaded = _reload(exported, dtype="auto")
    assert reloaded.dtype == (DTYPES[dtype] if dtype else torch.float32)  # a ZeRO folder consolidates to fp32
    assert torch.equal(_logits(reloaded).float(), fit["logits"])
    assert not torch.allclose(fit["logits"], _logits(_reload(hf_dir)))
    if dtype is not None:  # the fp32 master weights are not the weights the module computed with
        fp32 = _logits(_reload(export_checkpoint(ckpt, tmp_path / "fp32")))
        assert not torch.equal(fp32, fit["logits"])
        torch.testing.assert_close(fp32, fit["logits"], rtol=0, atol=0.05)


class _CustomSetting:
    """A hyperparameter of a user's own type: torch.load(weights_only=True) refuses to unpickle it."""


def test_a_checkpoint_the_safe_loader_refuses_is_not_unpickled(tmp_path):
    from lightning_memkit import MemKitConfigError

    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"setting": _CustomSetting()}}, path)
    with pytest.raises(MemKitConfigError, match=r"weights_only=True\) refuses .*add_safe_globals"):
        export_checkpoint(str(path), str(tmp_path / "out"))

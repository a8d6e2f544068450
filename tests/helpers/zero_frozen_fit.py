"""tests/helpers/zero_fit.py's runs with parts of the model frozen. Used by tests/test_zero_frozen.py.

Each run takes zero_fit's keys plus ``"freeze"``: ``"lm_head"``, ``"embeddings"``, ``"first_block"`` or
``"lora"`` (PEFT LoRA, r=4 on q_proj / v_proj, over the tiny Hugging Face Llama: use with ``"hf": true``).
The module freezes in its ``setup`` hook, which Lightning calls before the strategy's setup (so before
DeepSpeed partitions anything), with the seed fixed so that every rank and every run get the same LoRA
factors. Its ``configure_optimizers`` (zero_fit's) hands AdamW *every* parameter, the frozen ones included,
as ``AdamW(self.parameters())`` does. Each result also records ``"frozen"`` (the names of the frozen
parameters) and ``"trainable"`` (the others). ``"groups": "module"`` uses CausalLMModule's optimizer
instead (the trainable parameters only, in a decay and a no-decay group: under LoRA the no-decay group is
empty, as every norm is frozen); ``"groups": "split"`` the same two groups over every parameter (under LoRA
the no-decay group then holds frozen parameters only).
"""


import torch

from lightning_memkit.module import CausalLMModule
from tests.helpers import zero_fit

FREEZE: dict = {"case": None, "groups": None, "frozen": [], "trainable": []}


class FrozenModule(zero_fit.Module):
    def setup(self, stage: str) -> None:
        case = FREEZE["case"]
        if case == "lora":
            import peft

            torch.manual_seed(0)
            peft.get_peft_model(self.model.hf, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        elif case is not None:
            model = self.model.hf.model if hasattr(self.model, "hf") else self.model
            blocks = model.layers if hasattr(model, "layers") else model.blocks
            head = self.model.hf.lm_head if hasattr(self.model, "hf") else self.model.lm_head
            {"lm_head": head, "embeddings": model.embed_tokens, "first_block": blocks[0]}[case].requires_grad_(False)
        FREEZE["frozen"] = [n for n, p in self.named_parameters() if not p.requires_grad]
        FREEZE["trainable"] = [n for n, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self):
        if FREEZE["groups"] == "module":  # CausalLMModule's: trainable parameters only, decay and no-decay groups
            return CausalLMModule.configure_optimizers(self)
        if FREEZE["groups"] == "split":  # a decay and a no-decay group over every parameter, frozen ones included
            decay = [p for n, p in self.named_parameters() if p.ndim >= 2 and "embed" not in n]
            rest = [p for n, p in self.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
            return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                     lr=1e-2)
        return super().configure_optimizers()


def fit(run: dict, devices: int, workdir: str) -> dict:
    """``zero_fit.fit`` with the run's freezing (its ``expect_error`` runs report their error themselves)."""
    FREEZE["case"], FREEZE["groups"] = run.get("freeze"), run.get("groups")
    return {**zero_fit.fit(run, devices, workdir), "frozen": FREEZE["frozen"], "trainable": FREEZE["trainable"]}


def main() -> None:
    zero_fit.Module = FrozenModule
    zero_fit.main(fit)


if __name__ == "__main__":
    main()

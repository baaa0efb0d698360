"""lmopt inside the frameworks users train with: HF Trainer, accelerate, Lightning, PEFT (tiny Llama, CPU, fp32).

Each test trains a few steps and checks what a user relies on: resume from the framework's checkpoint is bit-exact
against an uninterrupted run, lmopt's structural groups and Muon routing survive Trainer, and Schedule-Free's
averaged point ``x`` is what is evaluated and saved while training continues on ``y``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lmopt
from lmopt.integrations import eval_mode, hf_optimizer, is_schedule_free

transformers = pytest.importorskip("transformers")

torch.set_num_threads(2)

VOCAB, SEQ, BATCH = 64, 8, 4


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).float()


def token_rows(n: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_import_lmopt_imports_no_framework():
    code = (
        "import sys, lmopt, lmopt.integrations; "
        "frameworks = ('transformers', 'accelerate', 'pytorch_lightning', 'lightning', 'peft'); "
        "bad = [m for m in frameworks if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_eval_mode_unwraps_and_restores():
    model = nn.Linear(4, 4)
    opt = lmopt.create_optimizer("schedule_free_adamw", model, lr=1e-2)
    for _ in range(3):
        model(torch.randn(2, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    y = params_of(model)

    class Wrapper:  # accelerate's AcceleratedOptimizer / Lightning's LightningOptimizer shape
        def __init__(self, inner):
            self.optimizer = inner

    with eval_mode(Wrapper(opt), model) as found:
        assert found == [opt] and opt.mode == "eval" and not model.training
        assert not torch.equal(model.weight, y["weight"])
    assert opt.mode == "train" and model.training
    torch.testing.assert_close(params_of(model), y)
    with eval_mode(torch.optim.SGD(model.parameters(), lr=0.1)) as found:  # no Schedule-Free: no-op
        assert found == []
    assert is_schedule_free(opt) and not is_schedule_free(torch.optim.AdamW(model.parameters()))


# ------------------------------------------------------------------------------------------------- HF Trainer
def _args(out: Path, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=BATCH,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        learning_rate=1e-3,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _trainer(out: Path, route: str, name: str, callbacks=(), **hp):
    model = tiny_llama()
    kw: dict = {}
    if route == "optimizers":
        kw["optimizers"] = (lmopt.create_optimizer(name, model, **hp), None)
    else:
        kw["optimizer_cls_and_kwargs"] = hf_optimizer(name, **hp)
    return transformers.Trainer(
        model=model, args=_args(out), train_dataset=token_rows(), callbacks=list(callbacks), **kw
    )


@pytest.mark.parametrize(
    ("route", "name", "hp"),
    [
        ("optimizers", "adamw", {"lr": 1e-3, "weight_decay": 0.1}),
        ("factory", "muon", {"lr": 0.02, "weight_decay": 0.1}),
    ],
)
def test_trainer_resume_is_bit_exact(tmp_path, route, name, hp):
    full = _trainer(tmp_path / "full", route, name, **hp)
    full.train()
    resumed = _trainer(tmp_path / "resumed", route, name, **hp)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert_same(params_of(full.model), params_of(resumed.model))


def test_hf_optimizer_keeps_structural_groups_and_muon_routing(tmp_path):
    trainer = _trainer(tmp_path, "factory", "muon", lr=0.02, weight_decay=0.1)
    opt = trainer.create_optimizer()
    model = trainer.model
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert group_of[id(embed)]["weight_decay"] == 0.0 and not group_of[id(embed)]["use_muon"]
    assert not group_of[id(head)]["use_muon"]
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        if g["use_muon"]:
            assert p.ndim == 2 and "embed" not in name and "lm_head" not in name, name
        if "norm" in name:
            assert g["weight_decay"] == 0.0, name
    assert any(g["use_muon"] for g in opt.param_groups)


def test_trainer_schedule_free_saves_and_ends_at_x(tmp_path):
    from lmopt.integrations import ScheduleFreeCallback

    seen: dict[str, dict[str, torch.Tensor]] = {}

    class Record(transformers.TrainerCallback):  # runs after ScheduleFreeCallback's on_save (back at y)
        def on_save(self, args, state, control, model=None, optimizer=None, **kw):
            seen["y"] = params_of(model)
            with eval_mode(optimizer):
                seen["x"] = params_of(model)
            with torch.no_grad():  # undo the round trip's rounding: the run goes on exactly as without this
                for k, p in model.named_parameters():
                    p.copy_(seen["y"][k])

    def run(out, resume=None):
        t = _trainer(out, "optimizers", "schedule_free_adamw", [ScheduleFreeCallback(), Record()], lr=1e-2)
        t.train(resume_from_checkpoint=resume)
        return t

    full = run(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-4"
    saved = transformers.LlamaForCausalLM.from_pretrained(ckpt)
    saved_params = params_of(saved)
    torch.testing.assert_close(saved_params, seen["x"], rtol=0, atol=1e-6)
    assert any(not torch.equal(saved_params[k], seen["y"][k]) for k in saved_params)  # x, not y
    state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert all(not g["train_mode"] for g in state["param_groups"])  # saved in eval mode
    opt = full.optimizer
    assert lmopt.integrations.schedule_free_optimizers(opt)[0].mode == "eval"  # after training: x
    torch.testing.assert_close(params_of(full.model), saved_params, rtol=0, atol=1e-6)  # save_model would hold x
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert_same(params_of(full.model), params_of(resumed.model))


# ------------------------------------------------------------------------------------------------- accelerate
def _batches(n_rows: int = 16) -> list[dict[str, torch.Tensor]]:
    rows = token_rows(n_rows)
    return [{k: torch.stack([r[k] for r in rows[i : i + BATCH]]) for k in rows[0]} for i in range(0, n_rows, BATCH)]


def test_accelerate_accumulation_and_save_load_resume(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    batches = _batches(32)  # 8 micro-batches = 4 optimizer steps with accumulation 2

    def setup():
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = tiny_llama()
        opt = lmopt.create_optimizer("schedule_free_adamw", model, lr=1e-2, warmup_steps=0)
        model, opt = accelerator.prepare(model, opt)
        return accelerator, model, opt

    def train(accelerator, model, opt, chunk):
        model.train()
        opt.train()  # accelerate forwards train()/eval() to the Schedule-Free optimizer
        for batch in chunk:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                opt.step()
                opt.zero_grad()

    accelerator, model, opt = setup()
    train(accelerator, model, opt, batches[:4])
    before = params_of(model)
    with eval_mode(opt, model):  # the recipe: save (and evaluate) at x
        accelerator.save_state(str(tmp_path / "state"))
        at_x = params_of(model)
    assert any(not torch.equal(at_x[k], before[k]) for k in at_x)
    train(accelerator, model, opt, batches[4:])
    with eval_mode(opt):
        full = params_of(model)

    accelerator, model, opt = setup()
    accelerator.load_state(str(tmp_path / "state"))
    assert opt.optimizer.mode == "eval"  # the state was saved at x
    assert_same(params_of(model), at_x)
    train(accelerator, model, opt, batches[4:])
    with eval_mode(opt):
        assert_same(params_of(model), full)


# ------------------------------------------------------------------------------------------------- Lightning
def test_lightning_closures_model_checkpoint_resume_and_schedule_free(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from lmopt.integrations import ScheduleFreeLightningCallback

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()
            self.val_modes: list[str] = []
            self.closure_steps = 0

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def validation_step(self, batch, batch_idx):
            self.val_modes.append(self.trainer.optimizers[0].mode)
            return self.model(**batch).loss

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            assert callable(optimizer_closure)  # Lightning's closure path: step(closure) runs forward/backward
            self.closure_steps += 1
            optimizer.step(closure=optimizer_closure)

        def configure_optimizers(self):
            return lmopt.create_optimizer("schedule_free_adamw", self, lr=1e-2, warmup_steps=0)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(token_rows(8), batch_size=BATCH, shuffle=False)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(token_rows(4, seed=2), batch_size=BATCH)

    def fit(root, ckpt_path=None):
        module = LM()
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(root), every_n_epochs=1, save_top_k=-1)
        trainer = pl.Trainer(
            max_steps=4,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[ScheduleFreeLightningCallback(), ckpt],
        )
        trainer.fit(module, ckpt_path=ckpt_path)
        return module, trainer

    full, trainer = fit(tmp_path / "full")
    assert full.closure_steps == 4 and full.val_modes and set(full.val_modes) == {"eval"}
    assert trainer.optimizers[0].mode == "eval"  # after fit: the model holds x
    saved = torch.load(tmp_path / "full" / "epoch=0-step=2.ckpt", weights_only=False)
    assert all(not g["train_mode"] for g in saved["optimizer_states"][0]["param_groups"])
    resumed, _ = fit(tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / "epoch=0-step=2.ckpt"))
    assert_same(params_of(full), params_of(resumed))


# ------------------------------------------------------------------------------------------------- PEFT
@pytest.mark.parametrize("name", ["adamw", "adam_mini"])
def test_peft_lora_trains_with_lmopt(name):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    before = params_of(model)
    opt = lmopt.create_optimizer(name, model, lr=1e-2)
    for batch in _batches(8):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = params_of(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not torch.equal(before[n], after[n]) for n in trainable if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in after if n not in trainable)


# ------------------------------------------------------------------------------------------------- Adam-mini
def test_adam_mini_finds_heads_on_wrapped_models():
    class Holder(nn.Module):  # a LightningModule, or any module holding a Hugging Face model
        def __init__(self, *models):
            super().__init__()
            self.parts = nn.ModuleList(models)

    opt = lmopt.create_optimizer("adam_mini", Holder(tiny_llama()), lr=1e-3)
    wrapped = lmopt.create_optimizer("adam_mini", tiny_llama(), lr=1e-3)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in wrapped.param_groups]
    other = tiny_llama()
    other.config.num_attention_heads = 8  # a second model that disagrees
    with pytest.raises(ValueError, match="disagree on the head count"):
        lmopt.create_optimizer("adam_mini", Holder(tiny_llama(), other), lr=1e-3)
    lmopt.create_optimizer("adam_mini", Holder(tiny_llama(), other), lr=1e-3, n_heads=4, n_kv_heads=2)


def test_hf_optimizer_adamw_does_not_decay_the_embedding(tmp_path):
    trainer = _trainer(tmp_path, "factory", "adamw", lr=1e-3, weight_decay=0.1)
    opt = trainer.create_optimizer()
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    model = trainer.model
    assert decay[id(model.get_input_embeddings().weight)] == 0.0  # Trainer's own split would decay it
    assert decay[id(model.model.layers[0].self_attn.q_proj.weight)] == 0.1
    assert all(decay[id(p)] == 0.0 for n, p in model.named_parameters() if "norm" in n)

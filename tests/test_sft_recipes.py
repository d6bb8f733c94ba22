"""The Qwen3 fine-tuning recipes run through TRL's SFTTrainer: the model's chat template renders each
Alpaca row (instruction + input as the user turn), the loss covers the completion only, LoRA goes in as
``peft_config``, and the optimizer is ours, chosen by name. Shrunk to a tiny local Qwen3 with a chat
template; the recipe runner itself is used."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_recipes import local_assets, shrink  # noqa: F401 (local_assets is a fixture)

from hf_mousse import Mousse
from hf_mousse.train import load_recipe, run_recipe


@pytest.fixture
def captured(monkeypatch):
    """The trainer each run builds (the runner builds it internally)."""
    from hf_mousse import train

    trainers = []
    build = train.build_trainer

    def spy(*args, **kwargs):
        trainers.append(build(*args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(train, "build_trainer", spy)
    return trainers


def test_lora_recipe_fine_tunes_through_sft_trainer(tmp_path, local_assets, captured):  # noqa: F811
    from peft import PeftModel
    from trl import SFTTrainer

    recipe = shrink(load_recipe("qwen3-0.6b-lora"), tmp_path, local_assets)
    recipe["lora"]["r"] = 4
    run_recipe(recipe)
    (trainer,) = captured
    assert isinstance(trainer, SFTTrainer) and trainer.args.completion_only_loss
    assert isinstance(trainer.model, PeftModel)  # SFTTrainer applied the recipe's LoRA (peft_config)
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, Mousse) and trainer.args.optim == "mousse"
    trained = {n for g in opt.param_groups for n in g["param_names"]}
    assert trained and all("lora_" in n for n in trained)  # only the adapter is trained

    tokenizer = trainer.processing_class
    # A row that max_length did not truncate (the tiny tokenizer makes long sequences).
    row = next(r for r in trainer.train_dataset if len(r["input_ids"]) < trainer.args.max_length)
    batch = trainer.data_collator([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    text = tokenizer.decode(ids)
    # The chat template's turns; the Alpaca input (rows with one) follows the instruction in the user turn.
    assert text.startswith("<|im_start|>user\nExplain topic") and "<|im_start|>assistant\n" in text
    # Completion-only loss: the masked tokens are exactly the prompt (a prefix, up to the assistant header);
    # the trained ones are the completion and its eos.
    masked = [i for i, label in enumerate(labels) if label == -100]
    assert masked == list(range(len(masked))) and 0 < len(masked) < len(ids)
    prompt, completion = tokenizer.decode(ids[: len(masked)]), tokenizer.decode(ids[len(masked):])
    assert prompt.rstrip("\n").endswith("<|im_start|>assistant") and "<|im_start|>" not in completion
    assert completion.rstrip("\n").endswith("<|im_end|>")  # the end of turn is trained too
    assert (tmp_path / "checkpoint-2" / "optimizer.safetensors").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_full_finetune_recipe_uses_the_chat_template_and_input_column(tmp_path, local_assets,  # noqa: F811
                                                                      captured):
    recipe = shrink(load_recipe("qwen3-0.6b-full-finetune"), tmp_path, local_assets)
    run_recipe(recipe)
    (trainer,) = captured
    texts = [trainer.processing_class.decode(r["input_ids"]) for r in trainer.train_dataset]
    with_input = [t for t in texts if "\n\n" in t.split("<|im_end|>")[0]]
    assert with_input and len(with_input) < len(texts)  # rows with an input carry it; rows without do not
    assert all(t.count("<|im_start|>") == 2 for t in texts)
    assert (Path(tmp_path) / "checkpoint-2" / "optimizer.safetensors").is_file()

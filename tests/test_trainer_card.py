"""The model card that ``Trainer.push_to_hub()`` writes (transformers' and TRL's), when the optimizer is ours:
tagged ``hf_mousse`` + the optimizer's name, and stating the optimizer's effective hyperparameters.

``push_to_hub`` runs for real up to the network: ``create_repo`` and ``upload_folder`` are replaced by
recorders, and the test reads the README.md that would have been uploaded."""

from __future__ import annotations

import types

import pytest
from helpers import alpaca_rows, byte_blocks, tiny_gpt2, tiny_qwen3_dir
from huggingface_hub import ModelCard
from transformers import Trainer, TrainingArguments

import hf_mousse
from hf_mousse.integration.trainer_card import SECTION_TITLE

hf_mousse.register()


@pytest.fixture
def no_network(monkeypatch):
    """Record Hub calls instead of making them; returns the list of uploaded folders."""
    import transformers.trainer as trainer_module

    uploads = []

    def create_repo(repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(*, repo_id, folder_path, **kwargs):
        uploads.append(folder_path)
        return types.SimpleNamespace(commit_url="local", oid="0")

    api = types.SimpleNamespace(create_repo=create_repo, upload_folder=upload_folder)
    monkeypatch.setattr(trainer_module, "hf_api", lambda: api)
    return uploads


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=3e-3,
                report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                hub_model_id="someone/tiny", push_to_hub=False)
    return TrainingArguments(**{**base, **kw})


def _card(tmp_path) -> ModelCard:
    return ModelCard.load(tmp_path / "README.md")


def test_trainer_push_to_hub_card_has_tags_and_effective_hyperparameters(tmp_path, text_file, no_network):
    train, _ = byte_blocks(text_file)
    trainer = Trainer(model=tiny_gpt2(), train_dataset=train,
                      args=_args(tmp_path, optim="mousse", optim_args="alpha=0.25,refresh_every=3"))
    trainer.train()
    trainer.push_to_hub()
    assert no_network == [str(tmp_path)]  # reached the upload, with this folder
    card = _card(tmp_path)
    assert {"hf_mousse", "mousse"} <= set(card.data.tags)
    text = card.text
    assert "No additional optimizer arguments" not in text and "OptimizerNames" not in text
    assert SECTION_TITLE in text
    # Effective values: the two set ones, and defaults the user never typed.
    for row in ("| `alpha` | 0.25 |", "| `refresh_every` | 3 |", "| `beta` | 0.95 |",
                "| `adjust_lr` | match_rms_adamw |", "| `lr` | 0.003 |", "| `optimizer_class` | Mousse |"):
        assert row in text, row
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper, if any
    size = opt.stats()
    assert f"| `optimizer_state` | {size['state_bytes'] / 2**20:,.1f} MiB (matrices " in text  # what it costs
    trainer.push_to_hub()  # a second push rewrites the section rather than appending another
    assert _card(tmp_path).text.count(SECTION_TITLE) == 1


def test_optimizers_route_is_described_too(tmp_path, text_file, no_network):
    """``Trainer(optimizers=...)``: args.optim says adamw, the card must say what actually ran."""
    train, _ = byte_blocks(text_file)
    model = tiny_gpt2()
    opt = hf_mousse.Muon.for_model(model, lr=0.02, momentum=0.9)
    trainer = Trainer(model=model, train_dataset=train, args=_args(tmp_path), optimizers=(opt, None))
    trainer.train()
    trainer.push_to_hub()
    card = _card(tmp_path)
    assert {"hf_mousse", "muon"} <= set(card.data.tags)
    assert "| `momentum` | 0.9 |" in card.text and "| `optimizer_class` | Muon |" in card.text
    assert "Use OptimizerNames.ADAMW" not in card.text


def test_other_optimizers_keep_transformers_card(tmp_path, text_file, no_network):
    train, _ = byte_blocks(text_file)
    trainer = Trainer(model=tiny_gpt2(), train_dataset=train, args=_args(tmp_path, optim="adamw_torch"))
    trainer.train()
    trainer.push_to_hub()
    card = _card(tmp_path)
    assert "hf_mousse" not in (card.data.tags or []) and SECTION_TITLE not in card.text


def test_trl_sft_trainer_card(tmp_path, no_network):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model_dir = tiny_qwen3_dir(tmp_path / "model")
    rows = [{"prompt": [{"role": "user", "content": r["instruction"]}],
             "completion": [{"role": "assistant", "content": r["output"]}]} for r in alpaca_rows(8)]
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                     learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                     disable_tqdm=True, hub_model_id="someone/tiny-sft", optim="mimuon",
                     optim_args="gap_every=2", max_length=64)
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.push_to_hub()
    assert no_network == [str(tmp_path / "out")]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {"hf_mousse", "mimuon", "trl", "sft"} <= set(card.data.tags)
    assert SECTION_TITLE in card.text and "| `gap_every` | 2 |" in card.text
    assert "| `optimizer_class` | MiMuon |" in card.text

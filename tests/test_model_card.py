"""Model cards (metadata, content, citations), atomic README writes, the Hub upload file list (no network)."""

from __future__ import annotations

import enum
import math
import os
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

import hf_mousse
from hf_mousse.errors import HubUploadError, ModelCardError
from hf_mousse.integration import model_card as mc
from hf_mousse.integration.model_card import (
    TrainingReport,
    prepare_hub_upload,
    push_to_hub,
    render_model_card,
    write_model_card,
)
from hf_mousse.metrics import perplexity_from_loss

ROOT = Path(__file__).resolve().parent.parent

MOUSSE_HYPER = {
    "optimizer_class": "Mousse", "alpha": 0.125, "beta": 0.95, "refresh_every": 7, "eps": 1e-05,
    "bias_correction": True, "grafting": True, "sides": "left", "momentum": 0.95, "nesterov": False,
    "ns": "dion", "ns_steps": 5, "ns_eps": 1e-08, "adjust_lr": "spectral_norm", "weight_decay": 0.01,
    "weight_decay_schedule": "decoupled", "scalar_optimizer": "lion", "scalar_lr": 0.06, "betas": (0.9, 0.95),
    "custom_knob": "x|y",
}


def scratch_report(**overrides) -> TrainingReport:
    """A Mousse pretraining run from config (like the gpt2-124m recipe, with small numbers)."""
    fields = dict(
        model_name="gpt2-mousse-demo", base_model=None, model_config_summary="gpt2, 2 layers, d=128",
        datasets=["local:pydoc"], dataset_description='{"builtin": "pydoc", "block_size": 128}',
        optimizer="mousse", optimizer_hyperparameters=dict(MOUSSE_HYPER),
        training_arguments={"learning_rate": 0.003, "lr_scheduler_type": "cosine", "warmup_steps": 10,
                            "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2,
                            "max_steps": 150, "bf16": True, "fp16": False, "block_size": 128},
        tokens_seen=150 * 16 * 2 * 128, train_steps=150, final_eval_loss=3.25, best_eval_loss=3.125,
        loss_curve="loss_curve.png", hardware="2 CPU cores", train_seconds=95.4, recipe="demo-cpu",
    )
    fields.update(overrides)
    return TrainingReport(**fields)


def lora_report(**overrides) -> TrainingReport:
    """A LoRA fine-tune of a Hub base model with Muon."""
    fields = dict(
        model_name="user/qwen3-0.6b-lora-muon", base_model="Qwen/Qwen3-0.6B",
        model_config_summary="qwen3, 28 layers, d=1024", datasets=["wikitext"],
        dataset_description="WikiText-103 (raw), packed into 512-token blocks.", optimizer="muon",
        optimizer_hyperparameters={"optimizer_class": "Muon", "momentum": 0.95, "nesterov": True,
                                   "ns": "keller_jordan", "ns_steps": 5, "adjust_lr": "match_rms_adamw",
                                   "weight_decay": 0.0, "weight_decay_schedule": "decoupled"},
        training_arguments={"learning_rate": 2e-4, "max_steps": 40},
        tokens_seen=40 * 8 * 512, train_steps=40, final_eval_loss=2.5, best_eval_loss=2.5, loss_curve=None,
        hardware="1x NVIDIA H100", train_seconds=7384.0, recipe=None,
        peft={"type": "LoRA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    )
    fields.update(overrides)
    return TrainingReport(**fields)


def metrics_of(card) -> dict[str, float]:
    return {r.metric_type: r.metric_value for r in ModelCard(str(card)).data.eval_results or []}


# ---------------------------------------------------------------------------- rendering
def test_mousse_from_scratch_card_metadata():
    report = scratch_report()
    card = render_model_card(report)
    data = ModelCard(str(card)).data  # parsed back from the YAML header

    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert {"hf_mousse", "mousse"} <= set(data.tags)
    assert "mimuon" not in data.tags and "generated_from_trainer" not in data.tags
    assert data.base_model is None
    assert data.datasets is None  # local data is named in the text, not as a Hub dataset id
    assert data.model_name == "gpt2-mousse-demo"
    results = data.eval_results
    assert {r.task_type for r in results} == {"text-generation"}
    assert {r.dataset_split for r in results} == {"validation"}
    assert {(r.dataset_type, r.dataset_name) for r in results} == {("custom", "pydoc (local data)")}
    assert metrics_of(card) == pytest.approx({"loss": 3.25, "perplexity": math.exp(3.25)})
    assert "model-index:" in str(card)


def test_mousse_from_scratch_card_content():
    report = scratch_report()
    text = str(render_model_card(report))

    assert "trained from scratch" in text
    expected = [("alpha", "0.125"), ("refresh_every", "7"), ("sides", "left"), ("adjust_lr", "spectral_norm"),
                ("eps", "1e-05"), ("nesterov", "False"), ("ns", "dion"), ("scalar_optimizer", "lion"),
                ("scalar_lr", "0.06"), ("betas", "(0.9, 0.95)"), ("weight_decay_schedule", "decoupled")]
    for key, value in expected:
        assert f"| `{key}` | {value} |" in text, key
    for key in MOUSSE_HYPER:  # every hyperparameter has its row, unknown ones too
        assert f"| `{key}` |" in text, key
    assert "| `custom_knob` | x\\|y |" in text  # a '|' does not break the table
    assert "√(fan_out / fan_in)" in text  # the spectral_norm convention is explained
    assert "| `lr_scheduler_type` | cosine |" in text and "| `block_size` | 128 |" in text
    assert "| `precision` | bf16 mixed precision |" in text
    assert "614,400" in text and "4,096 per optimizer step" in text  # tokens seen, tokens per step
    assert "| final | 3.2500 | 25.79 |" in text and "| best | 3.1250 | 22.76 |" in text
    assert "![loss curve](loss_curve.png)" in text
    assert "1 min 35 s" in text and "2 CPU cores" in text
    assert f"| hf_mousse | {hf_mousse.__version__} |" in text
    assert f"| transformers | {metadata.version('transformers')} |" in text
    assert "hf-mousse train demo-cpu" in text
    assert "@misc{zhang2026mousse" in text and "2603.09697" in text
    assert "@misc{jordan2024muon" in text and "https://kellerjordan.github.io/posts/muon/" in text
    assert "huang2026mimuon" not in text and "2605.19619" not in text
    assert "chou2025correction" not in text and "2512.08217" not in text
    assert "{{" not in text and "{%" not in text  # every template variable was filled


def test_lora_finetune_card():
    report = lora_report()
    card = render_model_card(report)
    data = ModelCard(str(card)).data
    text = str(card)

    assert data.library_name == "transformers"
    assert data.base_model == "Qwen/Qwen3-0.6B"
    assert data.base_model_relation == "adapter"
    assert data.datasets == ["wikitext"]
    assert {"hf_mousse", "muon", "peft", "lora"} <= set(data.tags) and "mousse" not in data.tags
    assert metrics_of(card) == pytest.approx({"loss": 2.5, "perplexity": math.exp(2.5)})
    assert "LoRA adapter" in text and "[Qwen/Qwen3-0.6B](https://huggingface.co/Qwen/Qwen3-0.6B)" in text
    assert "trained from scratch" not in text
    assert "| `r` | 8 |" in text and "| `target_modules` | q_proj, v_proj |" in text
    assert "0.2·√max(fan_out, fan_in)" in text  # match_rms_adamw explained
    assert "![loss curve]" not in text  # no curve recorded
    assert "2 h 03 min 04 s" in text
    assert "--optim muon" in text  # no recipe: how to run it through a script instead
    assert "@misc{zhang2026mousse" in text and "@misc{jordan2024muon" in text
    assert "huang2026mimuon" not in text and "chou2025correction" not in text


def test_full_finetune_from_local_path_keeps_metadata_valid(tmp_path):
    local = tmp_path / "my-base"
    local.mkdir()
    card = render_model_card(lora_report(base_model=str(local), peft=None))
    data = ModelCard(str(card)).data
    assert data.base_model is None  # a local path is not a Hub id: only named in the text
    assert f"`{local}`" in str(card) and "full fine-tune" in str(card)
    full = ModelCard(str(render_model_card(lora_report(peft=None)))).data
    assert full.base_model == "Qwen/Qwen3-0.6B" and full.base_model_relation == "finetune"


def test_mimuon_and_corrected_weight_decay_citations():
    hyper = {"optimizer_class": "MiMuon", "gap_threshold": 0.001, "gap_every": 10,
             "weight_decay_schedule": "decoupled"}
    mimuon = str(render_model_card(scratch_report(optimizer="mimuon", optimizer_hyperparameters=hyper)))
    assert "@misc{huang2026mimuon" in mimuon and "2605.19619" in mimuon
    assert "chou2025correction" not in mimuon
    assert "| `gap_threshold` | 0.001 |" in mimuon

    corrected = str(render_model_card(scratch_report(
        optimizer_hyperparameters={**MOUSSE_HYPER, "weight_decay_schedule": "corrected"})))
    assert "@misc{chou2025correction" in corrected and "2512.08217" in corrected
    assert "huang2026mimuon" not in corrected
    assert "λ_t = λ·η_t / η_peak" in corrected
    for text in (mimuon, corrected):
        assert "@misc{zhang2026mousse" in text and "@misc{jordan2024muon" in text


def test_baseline_optimizer_card():
    text = str(render_model_card(scratch_report(
        optimizer="adamw_torch", optimizer_hyperparameters={"optimizer_class": "AdamW", "eps": 1e-08,
                                                            "betas": (0.9, 0.95), "weight_decay": 0.1})))
    data = ModelCard(text).data
    assert "mousse" not in data.tags and {"hf_mousse", "adamw_torch"} <= set(data.tags)
    assert "| `eps` | 1e-08 | Adam epsilon |" in text
    assert "Learning-rate convention" not in text and "Kronecker" not in text


def test_perplexity_is_inf_safe():
    assert perplexity_from_loss(None) is None
    assert perplexity_from_loss(0.0) == 1.0
    assert perplexity_from_loss(1000.0) == math.inf
    assert math.isnan(perplexity_from_loss(math.nan))

    card = render_model_card(scratch_report(final_eval_loss=1000.0, best_eval_loss=999.0))
    assert metrics_of(card) == {"loss": 1000.0}  # an infinite perplexity stays out of the metadata
    assert "| final | 1000.0000 | inf |" in str(card)
    diverged = render_model_card(scratch_report(final_eval_loss=math.nan, best_eval_loss=None))
    assert ModelCard(str(diverged)).data.eval_results is None
    assert "| final | nan | nan |" in str(diverged) and "| best | n/a | n/a |" in str(diverged)


def test_enum_values_render_as_values():
    class Scheduler(str, enum.Enum):  # like transformers' SchedulerType / OptimizerNames
        COSINE = "cosine"

    text = str(render_model_card(scratch_report(training_arguments={"lr_scheduler_type": Scheduler.COSINE})))
    assert "| `lr_scheduler_type` | cosine |" in text and "Scheduler" not in text


def test_report_rejects_bad_values():
    with pytest.raises(ModelCardError, match="loss_curve"):
        scratch_report(loss_curve=os.path.abspath("loss_curve.png"))
    with pytest.raises(ModelCardError, match="tokens_seen"):
        scratch_report(tokens_seen=-1)
    with pytest.raises(ModelCardError, match="datasets"):
        scratch_report(datasets="wikitext")
    with pytest.raises(ValueError, match="model_name"):
        scratch_report(model_name=" ")


def test_versions_default():
    versions = scratch_report().versions
    assert versions["hf_mousse"] == hf_mousse.__version__
    assert versions["transformers"] == metadata.version("transformers")
    assert versions["torch"] == metadata.version("torch")
    assert versions["peft"] == metadata.version("peft")


# ---------------------------------------------------------------------------- template location / packaging
def test_template_found_and_shipped_as_package_data():
    text = mc.template_text()
    assert text == (ROOT / "model_cards" / mc.TEMPLATE_NAME).read_text(encoding="utf-8")
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools_cfg = pyproject["tool"]["setuptools"]
    assert setuptools_cfg["package-dir"][mc.TEMPLATE_PACKAGE] == "model_cards"
    assert "*.md" in setuptools_cfg["package-data"][mc.TEMPLATE_PACKAGE]
    # The package list is explicit (discovery cannot map model_cards/): every package directory must be in it.
    on_disk = {".".join(p.relative_to(ROOT).parts) for p in (ROOT / "hf_mousse").rglob("*")
               if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))} | {"hf_mousse"}
    missing = on_disk - set(setuptools_cfg["packages"])
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


def test_missing_template_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(mc, "TEMPLATE_PACKAGE", "hf_mousse_no_such_package")
    monkeypatch.setattr(mc, "__file__", str(tmp_path / "a" / "b" / "model_card.py"))
    with pytest.raises(ModelCardError, match="template"):
        mc.template_text()


# ---------------------------------------------------------------------------- write_model_card
def test_write_model_card_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "loss_curve.png").write_bytes(b"\x89PNG")
    (out / "README.md").write_text("old card", encoding="utf-8")
    old_umask = os.umask(0o022)
    try:
        path = write_model_card(scratch_report(), str(out))
    finally:
        os.umask(old_umask)
    assert path == str(out / "README.md")
    assert sorted(os.listdir(out)) == ["README.md", "loss_curve.png"]  # no temporary file left behind
    card = ModelCard.load(path)
    assert "mousse" in card.data.tags and "![loss curve](loss_curve.png)" in card.text
    if sys.platform != "win32":
        assert os.stat(path).st_mode & 0o777 == 0o644  # like open(): not a private 0600 temp file

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(mc.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(lora_report(), str(out))
    assert sorted(os.listdir(out)) == ["README.md", "loss_curve.png"]
    assert "mousse" in ModelCard.load(path).data.tags  # the previous card is intact


def test_write_model_card_warns_about_a_missing_curve(tmp_path):
    with pytest.warns(UserWarning, match="loss_curve.png"):
        write_model_card(scratch_report(), str(tmp_path / "new"))
    assert (tmp_path / "new" / "README.md").is_file()


# ---------------------------------------------------------------------------- Hub upload
TOP_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "README.md", "loss_curve.png",
             "training_args.bin"]
CHECKPOINT_FILES = ["config.json", "model.safetensors", "optimizer.safetensors", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json", "training_args.bin"]


def fake_output_dir(root: Path, checkpoints=(2, 4)) -> Path:
    """What a finished run leaves: final model, card, curve, checkpoints, TensorBoard runs and temporaries."""
    out = root / "run"
    out.mkdir()
    for name in TOP_FILES:
        (out / name).write_text(f"top {name}")
    (out / ".README.md.0123abcd.tmp").write_text("partial card")
    (out / "model.safetensors.tmp").write_text("partial weights")
    (out / "runs" / "Nov23_host").mkdir(parents=True)
    (out / "runs" / "Nov23_host" / "events.out.tfevents.1").write_text("tb")
    for step in checkpoints:
        ckpt = out / f"checkpoint-{step}"
        ckpt.mkdir()
        for name in CHECKPOINT_FILES:
            (ckpt / name).write_text(f"step {step} {name}")
        (ckpt / ".optimizer.safetensors.99.tmp").write_text("partial")
    (out / "tmp-checkpoint-6").mkdir()  # a checkpoint being written
    (out / "tmp-checkpoint-6" / "optimizer.safetensors").write_text("in progress")
    return out


def test_prepare_hub_upload_without_checkpoints(tmp_path):
    out = fake_output_dir(tmp_path)
    ops = prepare_hub_upload(str(out), include_checkpoints=False)
    assert {op.path_in_repo for op in ops} == set(TOP_FILES)
    assert all(op.path_or_fileobj == str(out / op.path_in_repo) for op in ops)


def test_prepare_hub_upload_with_newest_checkpoint(tmp_path):
    out = fake_output_dir(tmp_path)
    ops = {op.path_in_repo: op for op in prepare_hub_upload(str(out), include_checkpoints=True)}
    assert set(ops) == set(TOP_FILES) | {f"last-checkpoint/{n}" for n in CHECKPOINT_FILES}
    sources = {op.path_or_fileobj for op in ops.values()}
    assert str(out / "checkpoint-4" / "optimizer.safetensors") in sources
    assert ops["last-checkpoint/optimizer.safetensors"].path_or_fileobj == str(
        out / "checkpoint-4" / "optimizer.safetensors")
    assert ops["last-checkpoint/scheduler.pt"].path_or_fileobj == str(out / "checkpoint-4" / "scheduler.pt")
    assert not any("checkpoint-2" in s or "runs" in Path(s).parts or s.endswith(".tmp") for s in sources)


def test_newest_checkpoint_is_by_step_number(tmp_path):
    out = fake_output_dir(tmp_path, checkpoints=(4, 10, 9))
    ops = {op.path_in_repo: op for op in prepare_hub_upload(str(out), include_checkpoints=True)}
    assert ops["last-checkpoint/optimizer.safetensors"].path_or_fileobj == str(
        out / "checkpoint-10" / "optimizer.safetensors")


def test_prepare_hub_upload_refuses_bad_directories(tmp_path):
    with pytest.raises(HubUploadError, match="no such directory"):
        prepare_hub_upload(str(tmp_path / "missing"), include_checkpoints=False)
    parent = tmp_path / "compare"
    (parent / "mousse").mkdir(parents=True)
    (parent / "loss_curves.png").write_bytes(b"png")
    with pytest.raises(HubUploadError, match="no model weights"):
        prepare_hub_upload(str(parent), include_checkpoints=False)
    out = fake_output_dir(tmp_path, checkpoints=())
    with pytest.warns(UserWarning, match="no checkpoint-"):
        ops = prepare_hub_upload(str(out), include_checkpoints=True)
    assert {op.path_in_repo for op in ops} == set(TOP_FILES)


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi.create_repo / create_commit replaced by recorders: nothing leaves the machine."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", self.token, repo_id, kwargs))
        return types.SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def create_commit(self, repo_id, **kwargs):
        calls.append(("create_commit", self.token, repo_id, kwargs))
        return types.SimpleNamespace(oid="abc123")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_to_hub(tmp_path, fake_hub):
    out = fake_output_dir(tmp_path)
    info = push_to_hub(str(out), "me/gpt2-mousse", include_checkpoints=True, private=True, token="hf_test",
                       commit_message="Mousse run")
    assert info.oid == "abc123"
    (kind1, token1, repo1, kw1), (kind2, token2, repo2, kw2) = fake_hub
    assert (kind1, token1, repo1, kw1) == ("create_repo", "hf_test", "me/gpt2-mousse",
                                           {"exist_ok": True, "private": True})
    assert (kind2, token2, repo2) == ("create_commit", "hf_test", "me/gpt2-mousse")
    assert kw2["commit_message"] == "Mousse run"
    paths = {op.path_in_repo for op in kw2["operations"]}
    assert paths == set(TOP_FILES) | {f"last-checkpoint/{n}" for n in CHECKPOINT_FILES}


def test_push_to_hub_defaults_and_resolved_repo_id(tmp_path, fake_hub):
    out = fake_output_dir(tmp_path)
    push_to_hub(str(out), "gpt2-mousse")
    (_, _, _, kw1), (_, _, repo2, kw2) = fake_hub
    assert kw1 == {"exist_ok": True, "private": False}
    assert repo2 == "me/gpt2-mousse"  # the namespace create_repo resolved
    assert kw2["commit_message"] == mc.DEFAULT_COMMIT_MESSAGE
    assert not any(op.path_in_repo.startswith("last-checkpoint/") for op in kw2["operations"])


def test_push_to_hub_checks_files_before_creating_the_repo(tmp_path, fake_hub):
    with pytest.raises(HubUploadError):
        push_to_hub(str(tmp_path / "missing"), "me/x")
    assert fake_hub == []

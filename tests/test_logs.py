"""Logs that fit the optimizer: Muon and MiMuon log no ``optim/eigh_*`` counters (they have no eigenbasis
refresh), Mousse does; the console line (progress bar or printer) leaves the ``optim/*`` diagnostics out
while callbacks such as TensorBoard's still receive them."""

from __future__ import annotations

import pytest
from helpers import byte_blocks, tiny_gpt2
from transformers import Trainer, TrainerCallback, TrainingArguments

import hf_mousse

hf_mousse.register()


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _train(tmp_path, text_file, optim, *, disable_tqdm):
    train, _ = byte_blocks(text_file)
    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, optim_args="log_diagnostics=true",
                             max_steps=2, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=disable_tqdm)
    recorder = Recorder()
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=train, callbacks=[recorder])
    trainer.train()
    return [h for h in recorder.logs if "loss" in h]


@pytest.mark.parametrize("optim", ["muon", "mimuon"])
def test_no_eigh_counters_without_a_refresh(tmp_path, text_file, optim):
    logs = _train(tmp_path, text_file, optim, disable_tqdm=True)
    assert logs and all("optim/update_rms/matrix" in h for h in logs)  # diagnostics are on
    assert not [k for h in logs for k in h if k.startswith("optim/eigh_")]
    assert all("optim/nonfinite_skips" in h for h in logs)  # counters that apply stay


def test_mousse_keeps_its_eigh_counters(tmp_path, text_file):
    logs = _train(tmp_path, text_file, "mousse", disable_tqdm=True)
    assert all(h["optim/eigh_refreshes"] > 0 for h in logs)


# disable_tqdm=True: transformers prints with PrinterCallback; False: with ProgressCallback (tqdm.write).
@pytest.mark.parametrize("disable_tqdm", [True, False], ids=["printer", "progress-bar"])
def test_console_line_is_short_and_callbacks_get_everything(tmp_path, text_file, capsys, disable_tqdm):
    logs = _train(tmp_path, text_file, "mousse", disable_tqdm=disable_tqdm)
    assert any(k.startswith("optim/") for k in logs[0])  # the recorder (like TensorBoard) got them
    printed = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(printed) == 2, printed  # one console line per logging step, from the console callback
    assert all("optim/" not in line for line in printed)
    assert all(len(line) < 200 for line in printed), printed

"""Tiny models built from configs and byte-level datasets from a local file (offline)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from transformers import TrainerCallback


class StopAt(TrainerCallback):
    """Stop training after the given global step (a checkpoint saved at that step is kept)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def tiny_gpt2(seed: int = 0, hidden: int = 32):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=hidden, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def tiny_qwen3(seed: int = 0, hidden: int = 32, vocab_size: int = 256, **config):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size, **config, hidden_size=hidden,
                                        intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=16, max_position_embeddings=64, tie_word_embeddings=False))


def byte_blocks(path: str, block: int = 32):
    """The file's bytes as (train, eval) datasets of fixed-length blocks, labels = inputs."""
    from datasets import Dataset

    data = list(open(path, encoding="utf-8").read().encode("utf-8"))
    blocks = [data[i : i + block] for i in range(0, len(data) - block, block)]
    train, evaluation = blocks[:-16], blocks[-16:]
    return (Dataset.from_dict({"input_ids": train, "labels": train}),
            Dataset.from_dict({"input_ids": evaluation, "labels": evaluation}))


def train(model, opt, batches) -> list[float]:
    """One optimizer step per batch of token ids (labels = inputs); returns the losses."""
    losses = []
    for x in batches:
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# A minimal ChatML template (Qwen's format, without tools and thinking): enough for TRL's SFTTrainer to
# render prompts and completions the way it renders them with a real Qwen3 tokenizer.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer():
    """A byte-level BPE tokenizer (trained on pydoc text, 320 tokens) with ChatML special tokens and a
    chat template; eos is ``<|im_end|>`` as in Qwen3's instruct tokenizers."""
    from hf_mousse.data import pydoc_text, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([pydoc_text()[:20_000]], vocab_size=320)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_dir(path, seed: int = 0) -> str:
    """A tiny Qwen3 model and its chat tokenizer saved in ``path`` (a local stand-in for Qwen/Qwen3-0.6B)."""
    tokenizer = chat_tokenizer()
    model = tiny_qwen3(seed, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def alpaca_rows(n: int = 24) -> list[dict]:
    """Alpaca-style rows (instruction, input, output), some with an empty input (as in alpaca-cleaned)."""
    topics = ["lists", "tuples", "dicts", "sets", "strings", "loops"]
    return [{"instruction": f"Explain Python {topics[i % 6]} briefly.",
             "input": "" if i % 2 else f"Example {i}",
             "output": f"Python {topics[i % 6]} are built-in types; example number {i}."} for i in range(n)]


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they import their siblings, so that folder goes on the path)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

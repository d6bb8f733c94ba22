"""A stock-style causal-LM script (HfArgumentParser + Trainer, like transformers' run_clm.py).

It does not import hf_mousse: run it with ``python -m hf_mousse stock_clm.py --optim mousse ...``.
The model is a tiny GPT-2 or Qwen3 built from a config (or loaded with from_pretrained from a local
directory), trained on the bytes of a local text file. Prints one ``RESULT {json}`` line.
"""

import json
import math
import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    HfArgumentParser,
    Qwen3Config,
    Trainer,
    TrainingArguments,
    set_seed,
)


@dataclass
class ModelArguments:
    model_type: str = field(default="gpt2", metadata={"help": "gpt2 or qwen3, built from a tiny config"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "load this instead"})
    hidden_size: int = field(default=32)


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "a local text file"})
    block_size: int = field(default=32)
    eval_blocks: int = field(default=16)


def build_model(args: ModelArguments):
    if args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    if args.model_type == "gpt2":
        config = GPT2Config(vocab_size=256, n_positions=64, n_embd=args.hidden_size, n_layer=2, n_head=2,
                            bos_token_id=0, eos_token_id=0)
    else:
        h = args.hidden_size
        config = Qwen3Config(vocab_size=256, hidden_size=h, intermediate_size=2 * h,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                             max_position_embeddings=64, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)
    data = list(open(data_args.train_file, encoding="utf-8").read().encode("utf-8"))
    n = data_args.block_size
    blocks = [data[i : i + n] for i in range(0, len(data) - n, n)]
    split = len(blocks) - data_args.eval_blocks
    train = Dataset.from_dict({"input_ids": blocks[:split], "labels": blocks[:split]})
    evaluation = Dataset.from_dict({"input_ids": blocks[split:], "labels": blocks[split:]})
    model = build_model(model_args)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    result = {
        "optimizer": type(inner).__name__,
        "groups": [{k: v for k, v in g.items() if isinstance(v, (int, float, str, bool))}
                   for g in inner.param_groups],
        "train_loss": result.training_loss,
        "losses": losses,
        "eval": metrics,
        "perplexity_check": math.exp(metrics["eval_loss"]),
        "steps": trainer.state.global_step,
        "stats": inner.stats() if hasattr(inner, "stats") else None,
        "torch": torch.__version__,
    }
    # One file per process too: under torchrun the ranks' stdout lines can interleave.
    name = f"result_rank{training_args.process_index}.json"
    with open(os.path.join(training_args.output_dir, name), "w") as f:
        json.dump(result, f)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

"""The README's demo table, from a recipe run's ``summary.json`` (copied to benchmarks/results/demo-cpu.json
after ``make demo``; see benchmarks/README.md). Used by render_readme.py."""

from __future__ import annotations

NAMES = {"mousse": "Mousse", "muon": "Muon", "adamw_torch": "AdamW", "mimuon": "MiMuon"}


def render_markdown(summary: dict) -> str:
    t, v = summary["training"], summary["versions"]
    runs = summary["runs"]
    tokens = runs[0]["tokens"]
    lines = [
        f"Measured with `make demo` on {summary['hardware']}, torch {v['torch']}, transformers "
        f"{v['transformers']}, hf_mousse {v['hf_mousse']}: {runs[0]['steps']} steps of "
        f"{t['per_device_train_batch_size']} x {summary['data']['block_size']} tokens ({tokens:,} tokens, "
        "each seen once), one seed.",
        "",
        "| optimizer | learning rate | eval loss | eval perplexity | train time |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {NAMES.get(r['optimizer'], r['optimizer'])} | {r['learning_rate']:g} | "
                     f"{r['eval_loss']:.3f} | {r['eval_perplexity']:.1f} | {r['train_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"

"""Local `evaluate` metric modules that load offline.

Pass a path to `evaluate.load`, e.g. `evaluate.load(hf_mousse.metrics.PERPLEXITY)`: evaluate's wheel ships
no metric scripts and the Hub copies cannot be fetched offline, but a local directory holding
`<dirname>.py` is loaded without any network access.
"""

from pathlib import Path

PERPLEXITY = str(Path(__file__).resolve().parent / "perplexity")

__all__ = ["PERPLEXITY"]

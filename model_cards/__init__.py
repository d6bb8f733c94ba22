"""Model-card templates (Jinja2, for ``huggingface_hub.ModelCard.from_template``).

This folder is installed as the package ``hf_mousse.model_cards`` (see ``[tool.setuptools.package-dir]`` in
pyproject.toml), so the templates ship in the wheel and are found by ``importlib.resources`` in editable
installs too; :mod:`hf_mousse.integration.model_card` renders them.
"""

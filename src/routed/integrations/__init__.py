"""Integrations with other libraries. Each submodule imports its library lazily, so importing
``routed`` never needs them: ``import routed.integrations.transformers`` registers the ``"routed"``
attention implementation with Hugging Face transformers."""

"""Architectures as compositions of the shared ``nn`` blocks, chosen by ``TransformerSpec`` fields."""

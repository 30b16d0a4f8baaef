"""Building blocks shared by every architecture: attention, MLP, embeddings, norms."""

"""Student builders: layer-pruned copies, narrower encoders, static embeddings."""

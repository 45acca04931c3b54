"""rankstream's model zoo: schema, embeddings, CTR models, cached scoring, metrics, data.
Pure PyTorch: nothing here imports Ray or Kafka."""

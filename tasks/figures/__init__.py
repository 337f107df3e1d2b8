"""Pictures of what the model and a run do: co-attention figures, training curves (matplotlib, headless)."""

"""The dual encoder around the model: its contrastive loss, image/text embedding, the on-disk index and search
re-ranked by co-attention."""

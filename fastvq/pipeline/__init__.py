"""The reference VQGAN + GPT pipeline: data, checkpoints, logs, training loops, image sampling."""

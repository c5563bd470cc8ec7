"""Task fine-tuning on the one training loop: classification, seq2seq and SFT; LoRA; adversarial training."""

"""Loading a plan's models: state dicts read from the weight files, models built on the meta device and given
the files' tensors, FP8 checkpoints' linears, LoRAs."""

"""HunyuanVideo-1.5: the 8.3B DiT (base and SR), its 3-D causal VAE, the SR latent upsamplers, the text
encoders' prompt handling, and the key layouts and weight detection of the published checkpoints.

See docs/hunyuan15.md for what exists, the published numbers and what is tested.
"""

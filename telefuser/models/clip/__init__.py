"""CLIP ViT-H/14 image encoder (the vision tower of Wan2.1 image-to-video's CLIP) and its key layouts."""

"""TAEHV, the tiny video autoencoder of madebyollin/taehv: its decoder, for Wan2.1 (`taew2_1.pth`) and Wan2.2-5B
(`taew2_2.pth`) latents.

`keys` (names, shapes; no torch) and `decoder` (the network). Importing this package imports no torch.
"""

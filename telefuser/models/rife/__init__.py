"""RIFE frame interpolation: the IFNet of Practical-RIFE's 4.x series (v4.26, as LightX2V ships it).

`keys` (names, shapes, the file check; no torch), `ifnet` (the network), `interpolate` (a video's frames, in
batches of pairs, split across ranks). Importing this package imports no torch.
"""

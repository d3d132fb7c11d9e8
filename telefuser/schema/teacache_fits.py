"""The published TeaCache rescaling polynomials (numpy.poly1d order, highest power first), facts of the models they
were fitted on: the compiler picks one into the plan (compiler/skip_work.py) and the runtime applies it
(runtime/caches/teacache.py). Here, beside the schema, because the compiler imports neither torch nor the runtime."""

from __future__ import annotations

# Source: ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py (the coefficients its README lists for
# Wan2.1; numpy.poly1d order, highest power first). "*_ret" are the `use_ret_steps` fits (input e0, the
# first 5 steps computed).
WAN21_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "wan2.1_t2v_1.3b": (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
    "wan2.1_t2v_14b": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    "wan2.1_i2v_14b_480p": (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01),
    "wan2.1_i2v_14b_720p": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
    "wan2.1_t2v_1.3b_ret": (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    "wan2.1_t2v_14b_ret": (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
}
# Source: ModelTC/LightX2V, configs/hunyuan_video_15/cache/hy_15_{t2v,i2v}_{480p,720p}_teacache.json (commit
# 29c8504; published with teacache_thresh 0.15, 50 steps): HunyuanVideo-1.5's fits, whose input is the first
# double-stream block's modulated video stream (input "modulated": the DiT's `teacache_input`).
HY15_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "hunyuan_video15_t2v_480p": (-2.97190924e+04, 2.22834983e+04, -4.37418360e+03, 3.39340251e+02, -1.01365855e+01,
                                 1.29101768e-01),
    "hunyuan_video15_t2v_720p": (-3.08907507e+04, 1.67786188e+04, -3.19178643e+03, 2.60740519e+02, -8.19205881e+00,
                                 1.07913775e-01),
    "hunyuan_video15_i2v_480p": (8.08528429e+03, -2.44607178e+03, 2.49489589e+02, -9.10697865e+00, 1.20261379e-01),
    "hunyuan_video15_i2v_720p": (3.84300014e+03, -1.39247433e+03, 1.69167679e+02, -7.07679232e+00, 1.02419011e-01),
}
COEFFICIENTS: dict[str, tuple[float, ...]] = {**WAN21_COEFFICIENTS, **HY15_COEFFICIENTS}

"""Triton kernels and their host launchers (tensors in, tensors out; no autograd). Installed as fastlayers.kernels.

Each module `<op>.py` holds `_<op>_*_kernel` (@triton.jit), launchers `<op>_fwd` / `<op>_bwd`, and
`aot_cases()`: every (kernel, signature, constexprs, options) its launchers may compile, which CI compiles for
sm_90 ahead of time (see `common.compile_sm90`).
"""

"""Developer tools, not pipeline steps: the synthetic demo corpus (`demo_data`) and the tiny
random-weight test LVLM (`test_model`). The torch import hook the pipeline needs at run time is
`mvrec.torch_compat`.
"""

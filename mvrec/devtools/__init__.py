"""Developer tools, not pipeline steps: the synthetic demo corpus (`demo_data`), the tiny
random-weight test LVLM (`test_model`) and the import hook that lets CUDA-only torchvision /
torchaudio / torchcodec builds import on a CPU torch (`torch_compat`, installed as a .pth file).

Kept import-free: the .pth hook imports `mvrec.devtools.torch_compat` in every interpreter.
"""

"""The C++/CUDA sources of the DCNv4 op, installed as the package `unet_dcnv4._csrc` so that the build
(unet_dcnv4/ops/_build.py) finds them in a wheel install as in a checkout."""

"""One rasterize call: gsplat on CUDA, a pure-torch reference on the CPU; cameras."""

"""gatrep: image categorization and search with a graph attention autoencoder and representative models."""

import os

# Ray's progress bars replace builtins.print in the driver (RAY_TQDM_PATCH_PRINT, on by default);
# numba then refuses to compile pynndescent ("Untyped global name 'print'"), so a pipeline that
# embeds with Ray Data and then builds a k-NN graph in the same process would fail. Keep print.
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
# pynndescent compiles with numba on first use; numba's on-disk cache saves most of that minute in
# later processes. Set here, before any gatrep module can import numba.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "gatrep", "numba"))

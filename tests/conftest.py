import os

# Tests never touch the network: every weight loader must take its offline branch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIT_WUERSTCHEN_OFFLINE", "1")

import torch  # noqa: E402

# CI has 2 cores; tiny models run far faster single-threaded than with threads fighting over them.
torch.set_num_threads(1)

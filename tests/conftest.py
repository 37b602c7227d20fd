import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# One torch thread: 2-thread torch under contention on 2-core machines collapses badly.
torch.set_num_threads(1)
torch.set_flush_denormal(True)

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The ahead-of-time decode step (engine/aot_step.py) costs ~30-60 s of compiling per model shape: off for the suite,
# on in the tests written for it (tests/test_aot_step.py), which compare it with the eager and compiled steps.
os.environ.setdefault("QWEN3NEXT_AOT", "0")

import torch  # noqa: E402

# One torch thread: 2-thread torch under contention on 2-core machines collapses badly.
torch.set_num_threads(1)
torch.set_flush_denormal(True)

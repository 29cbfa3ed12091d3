import os, sys
def test_probe():
    import torch
    print("PROBE", os.environ.get("OMP_NUM_THREADS"), os.environ.get("OMP_WAIT_POLICY"), torch.get_num_threads(), os.environ.get("LDM_THREAD_POLICY"))

"""How fast host memory gets pinned, and whether pinning in a thread stalls the GPU work of the main thread.

Each variant runs in a fresh process: pinning 11.36 GB (umT5-XXL) in 1 GiB pieces with PyTorch's default
pinned allocator (cudaHostAlloc), with
PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:N (malloc, pages
touched by N threads, then cudaHostRegister), and with the runtime's switch to the latter after CUDA is
initialised (telefuser.runtime.memory.offload.use_registered_pinning); then the same pinning in a background thread while the main
thread runs 200 batches of small matmuls (launch-bound GPU work), against those batches alone.
GPU: `PYTHONPATH=. python3 bench/pinning.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = r"""
import threading, time, torch
GB, PIECE = 11.36e9, 1 << 30
torch.zeros(1, device="cuda")
import os
if os.environ.get("TELEFUSER_PINNING"):  # what the runtime does, after CUDA is initialised
    from telefuser.runtime.memory.offload import use_registered_pinning
    use_registered_pinning()
a = torch.randn(256, 256, device="cuda")

def pin():
    out, left = [], int(GB)
    while left > 0:
        out.append(torch.empty(min(PIECE, left), dtype=torch.uint8, pin_memory=True))
        left -= PIECE
    return out

def work():
    t = time.perf_counter()
    for _ in range(200):
        for _ in range(50):
            b = a @ a
        torch.cuda.synchronize()
    return time.perf_counter() - t

work()
alone = work()
t = time.perf_counter(); chunks = pin(); alloc = time.perf_counter() - t
# the first pieces stay allocated, so the thread's pinning is new allocations, not PyTorch's cached blocks
done = {}
th = threading.Thread(target=lambda: done.setdefault("s", (lambda t0: (pin(), time.perf_counter() - t0)[1])(time.perf_counter())))
th.start(); busy = work(); th.join()
print(f"RESULT pin {alloc:.2f} s ({GB / alloc / 1e9:.1f} GB/s); matmul batches alone {alone:.2f} s, "
      f"while pinning in a thread {busy:.2f} s (that pinning took {done['s']:.2f} s)")
"""


def main() -> None:
    variants = [("cudaHostAlloc (default)", None)]
    variants += [(f"cudaHostRegister, {n} threads", f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{n}")
                 for n in (1, 8, 16)]
    variants.append(("telefuser.runtime.memory.offload.use_registered_pinning() after CUDA init", "runtime"))
    for label, conf in variants:
        env = dict(os.environ)
        if conf == "runtime":
            env["TELEFUSER_PINNING"] = "1"
        elif conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = conf
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
        print(f"| {label} | {line[0][7:] if line else 'failed: ' + out.stderr[-300:]} |", flush=True)


if __name__ == "__main__":
    main()

"""Training throughput of the paper network on the CPU: clips/s of a full step (forward, backward, Adam).

Baseline, measured in the same run: the forward pass alone at batch 32 (inference, no autograd),
so the figure reads as "a training step costs k forward passes". Also prints the epoch time this
implies for the 15-phone CCNU experiment (294 training windows at hop 1 s).

    python benchmarks/train.py [--threads 2] [--batches 16 32 64] [--repeats 3]

The machine is shared in development: run it on an idle box, and read the min over repeats.
"""

from __future__ import annotations

import argparse
import time

import torch

from devrecd.model import build_model

CCNU_TRAIN_WINDOWS = 294  # 45 recordings of 8-10 s, 2 s windows every 1 s


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive caches)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model("paper", 15)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    x32 = torch.randn(32, 128, 73)
    net.eval()

    def forward() -> None:
        with torch.no_grad():
            net(x32)

    base = 32 / best_time(forward, args.repeats)
    print(f"threads {args.threads}; baseline: forward only, batch 32: {base:.1f} clips/s")
    net.train()
    for b in args.batches:
        x, y = torch.randn(b, 128, 73), torch.randint(0, 15, (b,))

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        rate = b / best_time(step, args.repeats)
        print(f"train step, batch {b:3d}: {rate:6.1f} clips/s = {base / rate:.1f}x a forward; "
              f"CCNU epoch ({CCNU_TRAIN_WINDOWS} windows) ~{CCNU_TRAIN_WINDOWS / rate:.0f} s")


if __name__ == "__main__":
    main()

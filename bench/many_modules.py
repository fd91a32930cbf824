"""Offline aggregation time against the number of modules: one open per client, so it grows linearly.

    .venv/bin/python -P bench/many_modules.py [--modules 500,2000,5000] [--clients 2,3] [--rank 4]

Writes client adapters of ``--modules`` tiny (16 × 16) modules into a temporary directory and times
``lorafleet.server.aggregation.aggregate_dirs("flexlora", ...)`` — what ``lorafleet aggregate`` runs. Before lorafleet
kept one ``safe_open`` per client, every module reopened every client file and re-parsed its header, so the
time grew with the square of the module count (132 s for 2,000 modules × 2 clients, 6 min for 5,000 × 3).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the lorafleet CLI sets it (lorafleet/cli.py)
    import torch

    from lorafleet.export.formats.adapter import Adapter, LoraPair, peft_config, write_adapter
    from lorafleet.server.aggregation import aggregate_dirs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", default="500,2000,5000")
    ap.add_argument("--clients", default="2,3")
    ap.add_argument("--rank", type=int, default=4)
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    g = torch.Generator().manual_seed(0)
    for n in (int(x) for x in args.modules.split(",")):
        for k in (int(x) for x in args.clients.split(",")):
            with tempfile.TemporaryDirectory(prefix="lorafleet-many-") as tmp:
                dirs = []
                for c in range(k):
                    mods = {f"model.layers.{i}.self_attn.q_proj": LoraPair(torch.randn(args.rank, 16, generator=g),
                                                                          torch.randn(16, args.rank, generator=g), 4.0)
                            for i in range(n)}
                    dirs.append(write_adapter(Adapter(mods, peft_config(["q_proj"], args.rank, 4.0 * args.rank)),
                                              Path(tmp) / f"c{c}"))
                t = time.perf_counter()
                aggregate_dirs("flexlora", dirs)
                print(f"{n} modules × {k} clients: {time.perf_counter() - t:.2f} s", flush=True)


if __name__ == "__main__":
    main()

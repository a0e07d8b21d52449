"""Several training processes, on one host or several, started by PyTorch's own elastic launcher (what `torchrun`
runs: an agent per host, c10d rendezvous, a process per device) and trained as one with DistributedDataParallel.

The stage's own process is the launcher: on the host with node rank 0 it takes the stage's lock and temporary
folder, starts the training processes (`python -m stages.<stage>` with the same arguments; each finds itself a
worker by the launcher's environment), waits for them, and publishes once all have finished; on the other hosts it
only starts theirs. A training process that fails stops the others (the launcher's doing): one line, EXIT_FAILED,
nothing published, the checkpoints kept for the next run with the same config, code and inputs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from rich.text import Text

from . import cli


@dataclass(frozen=True)
class Launch:
    """How many training processes, on how many hosts (the command line: make's NPROC, NNODES, NODE_RANK,
    MASTER_ADDR, MASTER_PORT)."""
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @classmethod
    def from_args(cls, args) -> "Launch":
        return cls(args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr, args.master_port)


def add_launch_args(parser) -> None:
    parser.add_argument("--nproc-per-node", type=int, default=1, help="training processes on this host (default 1)")
    parser.add_argument("--nnodes", type=int, default=1, help="hosts training together (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this host's rank; 0 publishes (default 0)")
    parser.add_argument("--master-addr", default="127.0.0.1", help="the rendezvous host (default 127.0.0.1)")
    parser.add_argument("--master-port", type=int, default=29500, help="the rendezvous port (default 29500)")


def worker() -> dict | None:
    """{"rank", "local_rank", "world_size"} in a process the launcher started, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return {key.lower(): int(os.environ[key]) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}


def join(cuda: bool) -> None:
    """Join the other training processes (the rendezvous the launcher arranged), before touching shared files."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")


def lost_peers(err: BaseException) -> bool:
    """Did a collective fail because another training process went away (it says why in its own lines)?"""
    import torch.distributed as dist
    return dist.is_initialized() and (isinstance(err, dist.DistError) or "by peer" in str(err))


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def total(value: float) -> float:
    """The sum of `value` over every training process (itself when there is one)."""
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


def launch(plan: Launch, module: str, argv: list[str], run_id: str) -> int:
    """Start plan.nproc_per_node processes of `python -m module argv` here, in one job with the other hosts' (c10d
    rendezvous at master_addr:master_port), and wait for all of them; the stage's exit code."""
    import logging
    import sys
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(min_nodes=plan.nnodes, max_nodes=plan.nnodes, nproc_per_node=plan.nproc_per_node,
                          run_id=run_id, rdzv_backend="c10d", rdzv_endpoint=f"{plan.master_addr}:{plan.master_port}",
                          max_restarts=0, monitor_interval=1)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)   # its failures get our one line
    # each process takes its share of the cores (torchrun's default is 1 thread each)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nproc_per_node)))
    try:
        elastic_launch(config, sys.executable)("-m", module, *argv)
    except ChildFailedError as err:
        if all(f.exitcode == cli.EXIT_INTERRUPTED for f in err.failures.values()):
            return cli.EXIT_INTERRUPTED   # Ctrl-C reached every process: each said so
        rank, failure = min(err.failures.items(), key=lambda item: item[1].timestamp)   # the first to fail
        cli.console.print(Text(f"training process {rank} of {plan.world_size} exited with code {failure.exitcode} "
                               f"(its lines above); the others were stopped, nothing was published; a rerun with the "
                               f"same config resumes from the last checkpoint"))
        return cli.EXIT_FAILED
    except SignalException:
        raise KeyboardInterrupt from None
    except RendezvousError as err:
        cli.console.print(Text(f"the training processes did not meet at {plan.master_addr}:{plan.master_port} "
                               f"({type(err).__name__}: {err}); check NNODES, MASTER_ADDR and MASTER_PORT on every "
                               f"host"))
        return cli.EXIT_FAILED
    return cli.EXIT_OK

"""Spreading grid points over MPI ranks (mpi4py), or one process without mpirun.

The unfinished points are cut into chunks of `points_per_pass`; chunk c goes to rank c % size,
so every rank knows its share without asking. Ranks other than 0 evaluate their chunks and
send the results to rank 0 with non-blocking sends, a message every `send_every` seconds;
rank 0 evaluates its own chunks and, between them, takes whatever has arrived. Nobody waits
for anybody until the end: there is no collective per point, and a slow rank delays no other.
Rank 0 alone writes (the store, the figures).
"""
import functools
import os
import time

import numpy as np
import torch

from backdoor_lens.device import progress
from backdoor_lens.errors import UserError
from backdoor_lens.landscape.store import grid_coordinates

RESULT, DONE = 11, 12
_MPI_ENVIRONMENT = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")


class SingleProcess:
    """The stand-in communicator of a run started without mpirun."""

    rank, size = 0, 1

    def bcast(self, obj, root=0):
        return obj


def get_comm():
    """MPI.COMM_WORLD under mpirun (or srun), else a single-process stand-in.

    mpi4py is imported only when a launcher set up the environment: a plain `python` run then
    never initialises MPI, so it works where no MPI runtime is usable.
    """
    if not any(name in os.environ for name in _MPI_ENVIRONMENT):
        return SingleProcess()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else SingleProcess()


def root_decides(comm, decide):
    """Rank 0 runs decide() -> (kept, shared): `kept` stays on rank 0, `shared` reaches every rank.

    Returns (kept, shared), kept None off rank 0. A UserError on rank 0 is raised on every rank,
    so that no rank waits for a broadcast that never comes.
    """
    kept, reply = None, None
    if comm.rank == 0:
        try:
            kept, shared = decide()
            reply = ("ok", shared)
        except UserError as error:
            reply = ("error", str(error))
    reply = comm.bcast(reply, root=0)
    if reply[0] == "error":
        raise UserError(reply[1])
    return kept, reply[1]


def local_size(comm) -> int:
    """How many ranks share this machine."""
    if comm.size == 1:
        return 1
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE"):
        if name in os.environ:
            return max(1, int(os.environ[name]))
    from mpi4py import MPI

    return comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()


def rank_device(comm, requested: str) -> str:
    """GPU rank % device_count for every rank when GPUs exist and none was named."""
    if requested in (None, "", "auto") and torch.cuda.is_available():
        return f"cuda:{comm.rank % torch.cuda.device_count()}"
    return requested


def share_cpu_threads(comm) -> int:
    """Ranks on one machine split its cores instead of each starting one thread per core."""
    if comm.size == 1:
        return torch.get_num_threads()
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    threads = max(1, min(available, (os.cpu_count() or 1) // local_size(comm)))
    torch.set_num_threads(threads)
    return threads


def my_chunks(flat: np.ndarray, points_per_pass: int, rank: int, size: int) -> list:
    chunks = [flat[i:i + points_per_pass] for i in range(0, len(flat), points_per_pass)]
    return chunks[rank::size]


def run_points(evaluate, coordinates, flat, comm, points_per_pass: int, on_result, send_every: float = 2.0,
               desc: str = "grid") -> int:
    """Evaluate the points `flat` (flat indices, the same array on every rank).

    evaluate: coords (k, 2) -> {split: (loss[k], acc[k])}; coordinates: flat indices -> coords.
    on_result(flat_chunk, results): called on rank 0 for every chunk, its own and the others'.
    Returns the number of points whose results reached rank 0 (0 on the other ranks).
    """
    flat = np.asarray(flat, dtype=np.int64)
    chunks = my_chunks(flat, points_per_pass, comm.rank, comm.size)
    if comm.rank != 0:
        _work_and_send(evaluate, coordinates, chunks, comm, send_every)
        return 0
    received = 0
    finished = 1  # ranks whose DONE arrived, rank 0 counted
    bar = progress(total=len(flat), desc=desc, iterable=None)
    try:
        for chunk in chunks:
            on_result(chunk, evaluate(coordinates(chunk)))
            received += len(chunk)
            bar.update(len(chunk))
            if comm.size > 1:
                while comm.Iprobe(source=_any_source(), tag=_any_tag()):
                    got, finished = _receive(comm, on_result, finished)
                    received += got
                    bar.update(got)
        while finished < comm.size:
            got, finished = _receive(comm, on_result, finished)
            received += got
            bar.update(got)
    finally:
        bar.close()
    return received


def evaluate_grid(comm, evaluate, store, todo, x, y, save_every: float) -> int:
    """Run the points `todo` (flat indices) over the ranks into `store` (rank 0's; None elsewhere).

    Rank 0 saves the store every save_every seconds and at the end, also when stopped by Ctrl-C or
    SIGTERM (which the context turns into an interrupt, raised on after the save). Returns the
    points computed (0 off rank 0).
    """
    coordinates = functools.partial(grid_coordinates, x, y)
    if comm.rank != 0:
        return run_points(evaluate, coordinates, todo, comm, evaluate.points_per_pass, None)
    last_save = [time.monotonic()]

    def on_result(flat, results):
        store.put(flat, results)
        if time.monotonic() - last_save[0] >= save_every:
            store.save()
            last_save[0] = time.monotonic()

    try:
        computed = run_points(evaluate, coordinates, todo, comm, evaluate.points_per_pass, on_result)
    except KeyboardInterrupt:
        store.save()
        raise
    store.save()
    return computed


def _work_and_send(evaluate, coordinates, chunks, comm, send_every):
    pending, requests, last = [], [], time.monotonic()
    for chunk in chunks:
        pending.append((chunk, evaluate(coordinates(chunk))))
        if time.monotonic() - last >= send_every:
            requests.append(comm.isend(pending, dest=0, tag=RESULT))
            pending, last = [], time.monotonic()
    if pending:
        requests.append(comm.isend(pending, dest=0, tag=RESULT))
    requests.append(comm.isend(None, dest=0, tag=DONE))
    for request in requests:
        request.wait()


def _receive(comm, on_result, finished):
    from mpi4py import MPI

    status = MPI.Status()
    message = comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
    if status.Get_tag() == DONE:
        return 0, finished + 1
    count = 0
    for chunk, results in message:
        on_result(chunk, results)
        count += len(chunk)
    return count, finished


def _any_source():
    from mpi4py import MPI

    return MPI.ANY_SOURCE


def _any_tag():
    from mpi4py import MPI

    return MPI.ANY_TAG

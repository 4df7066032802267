"""One evaluation split across the processes ``torchrun`` or ``accelerate launch`` starts, merged back.

An evaluation's work items are independent (every trial answers with a fresh cache and greedy
decoding; every perplexity run streams with its own cache), so a node with several GPUs can run
them side by side: one process per device, each doing the items it owns, then every process's rows
gathered and put back in the order one process would have produced them. The merged result is the
single-process result (same rows, same order, same numbers where the arithmetic is the same: the
same device kind and thread count), only sooner.

The process group and the exchanges are accelerate's:

* :func:`join` reads the launch from the environment both launchers set (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``) and, for more than one process, joins the process group through
  ``accelerate.PartialState`` (NCCL on GPUs, gloo on the CPU), with the long :data:`WAIT`.
* :func:`gather` sends every process's ``(position, row)`` pairs to every process with
  ``accelerate.utils.gather_object``; :func:`barrier` and :func:`main_first` are
  ``PartialState.wait_for_everyone`` and ``PartialState.main_process_first``.

Three things stay here, because accelerate's versions cannot keep a guarantee the tests hold:

* **The assignment**, :meth:`Shard.owns`, not ``PartialState.split_between_processes``. That
  splitter hands each process one contiguous block of a sized sequence. An evaluation's prompts
  are built lazily, one just before its methods run (a generator, its length not always known),
  and its grid is ordered (prompts by length, runs by method): contiguous blocks would give one
  process all the short prompts, or all of the full cache's runs, and the others the rest. The
  diagonal rule of :meth:`Shard.owns` mixes lengths and methods in every share and is a pure
  function of the item's position, so it can be decided item by item as the prompts arrive.
* **The order**, :func:`merge`. ``gather_object`` concatenates the processes' lists in rank order,
  which is the single-process order only for contiguous blocks; with the diagonal assignment the
  rows are put back by their grid position (and an item done twice is refused).
* **``cpu=True`` on a machine without GPUs, and a check of what accelerate joined.** accelerate
  (1.x, checked with 1.16) picks its backend from the devices it sees: on a CPU-only machine a
  plain ``PartialState()`` under ``torchrun --nproc-per-node 2`` reports ``DistributedType.NO``
  with one process, and ``gather_object`` then returns each process's own rows unchanged, so every
  process would write its half as if it were the whole (even with a gloo group already joined).
  :func:`join` therefore asks for ``PartialState(cpu=True)`` when there is no GPU, and refuses to
  go on if the state (a process-wide singleton: whoever builds it first decides) does not count
  the processes the launcher started. More processes on a node than GPUs is refused by
  :func:`device_for` first, in words, not as a CUDA error from accelerate's ``set_device``.

A single process (no launcher, or a launch of one) joins nothing and imports nothing of
accelerate: :func:`gather` then only orders its own rows.

A process that finishes its share early waits for the others in :func:`gather`, hence the long
:data:`WAIT`: shares of a long run can end hours apart.
"""

from __future__ import annotations

import atexit
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

__all__ = ["SINGLE", "WAIT", "Shard", "barrier", "device_for", "gather", "join", "main_first", "merge",
           "shard_from_environment"]

T = TypeVar("T")

#: how long a process waits for the others at a gather or barrier before giving up
WAIT = timedelta(hours=72)

#: whether :func:`join` has joined a process group (and registered leaving it at exit)
_joined = False


@dataclass(frozen=True)
class Shard:
    """This process's place in a launch: ``rank`` of ``world`` processes, ``local_rank`` on its node;
    ``launched`` when a launcher started it (even as its only process: it then still gets a GPU)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False

    @property
    def main(self) -> bool:
        """The process that prints tables, writes the results and keeps the run's record (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process shares the work."""
        return self.world > 1

    def owns(self, *position: int) -> bool:
        """Whether the item at grid ``position`` (e.g. ``(prompt, method)`` or ``(config,)``) is this process's.

        The owner of ``(p, m)`` is ``(p + m) % world``: along a prompt its methods go to consecutive
        processes, and the next prompt starts one process further on. Every process so gets an
        even mix of methods (whose costs differ: the full cache against a bounded one) and of
        prompts (ordered by length); plain round-robin over ``p * methods + m`` would give all of
        one method to one process whenever ``world`` divides the number of methods.
        """
        return sum(position) % self.world == self.rank

    def share(self, *sizes: int) -> int:
        """How many positions of the grid ``sizes`` (e.g. ``(prompts, methods)``) this process owns."""
        return sum(self.owns(*position) for position in itertools.product(*(range(n) for n in sizes)))


#: one process doing everything (no launcher)
SINGLE = Shard()


def _int_from(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} must be an integer, as torchrun or accelerate launch sets it "
                         f"(e.g. {name}=0)") from None


def shard_from_environment(environ: Mapping[str, str] | None = None) -> Shard:
    """The launch described by ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (:data:`SINGLE` without them)."""
    environ = os.environ if environ is None else environ
    world = _int_from(environ, "WORLD_SIZE", 1)
    rank = _int_from(environ, "RANK", 0)
    local = _int_from(environ, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of a launch; start the "
                         f"command through torchrun or accelerate launch (e.g. torchrun --nproc-per-node 2 -m lacache ...)")
    return Shard(rank, world, local, launched=any(name in environ for name in ("WORLD_SIZE", "LOCAL_RANK")))


def device_for(shard: Shard):
    """Where a launched process runs its share: ``cuda:LOCAL_RANK`` when there are GPUs, else None (the CPU,
    as for a command started without a launcher).

    More processes on a node than GPUs would put two on one GPU, each with a whole model: refused.
    """
    import torch

    if not shard.launched or not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    if shard.local_rank >= count:
        raise ValueError(f"LOCAL_RANK={shard.local_rank} but this node has {count} GPU(s); start at most one process "
                         f"per GPU, e.g. torchrun --nproc-per-node {count}")
    return torch.device("cuda", shard.local_rank)


def join(environ: Mapping[str, str] | None = None) -> Shard:
    """This process's :class:`Shard`, the process group joined first when the launch has several processes.

    Safe to call more than once (the group is joined once); a single process joins nothing.
    """
    global _joined
    shard = shard_from_environment(environ)
    if not shard.distributed:
        return shard
    import torch
    from accelerate import PartialState

    device_for(shard)  # more processes than GPUs: refused here, in words
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT)
    if (state.num_processes, state.process_index) != (shard.world, shard.rank):
        raise RuntimeError(
            f"accelerate joined process {state.process_index} of {state.num_processes} "
            f"({state.distributed_type}), but the launch says RANK={shard.rank} of WORLD_SIZE={shard.world}: "
            "accelerate's PartialState was set up before lacache joined (it is one per process); "
            "build it with cpu=True on a machine without GPUs, or let lacache build it"
        )
    if not _joined:
        _joined = True
        atexit.register(_leave)
    return shard


def _leave() -> None:
    """Leave the process group at exit (torch warns about a group never destroyed)."""
    from accelerate import PartialState

    PartialState().destroy_process_group()


def barrier(shard: Shard) -> None:
    """Wait until every process got here (nothing to wait for alone)."""
    if shard.distributed:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


@contextmanager
def main_first(shard: Shard) -> Iterator[None]:
    """Run the body in the main process first, then in the others: for work that fills a shared cache
    once (converting the bundled model, downloads) and must not race with itself."""
    if not shard.distributed:
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def merge(parts: Iterable[Iterable[tuple[tuple[int, ...], T]]]) -> list[T]:
    """The rows of every process's ``(position, row)`` pairs, in position order: the single-process order.

    Two rows at one position mean two processes did the same item (a bug in the assignment): refused.
    """
    pairs = sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])
    for (first, _), (second, _) in zip(pairs, pairs[1:]):
        if first == second:
            raise RuntimeError(f"two processes returned a row for the item at position {first}")
    return [row for _, row in pairs]


def gather(shard: Shard, mine: Iterable[tuple[tuple[int, ...], T]]) -> list[T]:
    """Every process's rows, merged in single-process order (:func:`merge`), returned to every process."""
    mine = list(mine)
    if not shard.distributed:
        return merge([mine])
    from accelerate.utils import gather_object

    return merge([gather_object(mine)])  # every process's pairs, in rank order; merge puts them in grid order

"""Planning on every core (sync with `--jobs` > 1): each key shard of a parallel read
(`inputs.read_sharded`) is absorbed and planned in a worker process, with a Planner built from
the same arguments as the parent's; the parent gets back the LeadUpdates and the planner's side
effects, and plans the state's leads the input did not mention (`Planner.plan_from_state`) last.

That is `Planner.plan` over the whole fold, leads in another order: a lead's plan depends on its
own fold state and its own row in the state, never on other leads, and the state's pending and
recheck keys are handed to the shard that holds them. The parent never holds the folded leads.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from didomi_marketo.didomi.fold import FoldSchema, Stamp
from didomi_marketo.inputs import Shards, shard_of
from didomi_marketo.mapping import FieldMapping
from didomi_marketo.outcomes import LeadUpdate
from didomi_marketo.plan import Planner, PlanStats, PriorState
from didomi_marketo.state import StateStore

# Updates (and fresher records) per pickle in a shard's scratch file: one batch. Unpickling holds
# the GIL throughout, and the delivery's event loop waits meanwhile: at 5,000 a load took 8-20 ms,
# and the first round's ten calls reached Marketo 10 ms apart instead of together.
CHUNK = 300

Fresher = Callable[[str, dict[str, Any], dict[str, Stamp]], None]


@dataclass(frozen=True)
class ShardPlanning:
    """What a worker needs to plan a shard: the parent's Planner arguments (workers inherit it as
    they start: never pickled), and what the parent wants back."""

    mappings: list[FieldMapping]
    schema: FoldSchema
    lookup_field: str
    action: str
    send_all: bool
    state: str | None  # the state file, opened read-only in each worker (no connection crosses a fork)
    fresher: bool  # collect Planner.on_fresher records (the parent writes them to the state)
    updates: bool  # every update back (a sync, --output); else only the first `samples` of each shard
    samples: int = 3

    def planner(self, state: PriorState | None, **options: Any) -> Planner:
        """The run's Planner: the parent's, or a worker's (with its shard's `pending`/`rechecks`)."""
        return Planner(self.mappings, self.schema, self.lookup_field, state, self.action, send_all=self.send_all,
                       **options)  # fmt: skip


@dataclass
class _Planned:
    stats: PlanStats
    seen_pending: set[str]  # keys the shard's planner took out of `pending`...
    seen_rechecks: set[str]  # ...and of `rechecks`
    path: str | None  # scratch file of pickled (updates, fresher records) chunks
    samples: list[LeadUpdate]


def _plan_shard(leads: Iterator[tuple[str, list[Any]]], setup: ShardPlanning,
                arg: tuple[set[str], set[str], str]) -> _Planned:  # fmt: skip
    """In a worker: Planner.plan_folded over one shard (Shards.map's `work`)."""
    pending, rechecks, path = arg
    store = StateStore(setup.state, readonly=True) if setup.state is not None else None
    fresher: list[tuple[str, dict[str, Any], dict[str, Stamp]]] = []
    planner = setup.planner(
        store, pending=set(pending), rechecks=set(rechecks),
        on_fresher=(lambda k, f, s: fresher.append((k, dict(f), dict(s)))) if setup.fresher else None,
    )  # fmt: skip
    samples: list[LeadUpdate] = []
    try:
        if not setup.updates:
            for u in planner.plan_folded(leads):
                if len(samples) < setup.samples:
                    samples.append(u)
            out = None
        else:
            with open(path, "wb") as f:
                chunk: list[LeadUpdate] = []
                for u in planner.plan_folded(leads):
                    chunk.append(u)
                    if len(chunk) + len(fresher) >= CHUNK:
                        pickle.dump((chunk, fresher), f, pickle.HIGHEST_PROTOCOL)
                        chunk, fresher[:] = [], []
                pickle.dump((chunk, fresher), f, pickle.HIGHEST_PROTOCOL)
            out = path
    finally:
        if store is not None:
            store.close()
    return _Planned(planner.stats, pending - planner.pending, rechecks - planner.rechecks, out, samples)


def plan_shards(shards: Shards, planner: Planner, on_fresher: Fresher | None = None,
                on_planned: Callable[[int], None] | None = None) -> Iterator[LeadUpdate]:  # fmt: skip
    """`planner.plan` over the leads of `shards`, planned in the workers (`Shards.map` with the
    ShardPlanning the read was given), shard by shard as each is ready; then the state's leads
    that no shard covered, planned here. `planner` counts every shard; `on_fresher` gets the
    workers' fresher records, `on_planned` the leads each shard planned.

    The workers start at once (while the schema check may still be under way, for instance),
    not when the first update is asked for; nothing reaches `planner` or `on_fresher` before."""
    pending: list[set[str]] = [set() for _ in range(shards.count)]
    rechecks: list[set[str]] = [set() for _ in range(shards.count)]
    for key in planner.pending:
        pending[shard_of(key, shards.count)].add(key)
    for key in planner.rechecks:
        rechecks[shard_of(key, shards.count)].add(key)
    args = [
        (pending[j], rechecks[j], os.path.join(shards.scratch, f"plan-{j}.pickle"))
        for j in range(shards.count)
    ]
    return _planned(shards.map(_plan_shard, args), planner, on_fresher, on_planned)


def _planned(results: Iterator[_Planned], planner: Planner, on_fresher: Fresher | None,
             on_planned: Callable[[int], None] | None) -> Iterator[LeadUpdate]:  # fmt: skip
    for done in results:
        planner.stats.add(done.stats)
        planner.pending -= done.seen_pending
        planner.rechecks -= done.seen_rechecks
        if on_planned is not None:
            on_planned(done.stats.leads)
        yield from done.samples
        if done.path is not None:
            yield from _updates(done.path, on_fresher)
    yield from planner.plan_from_state()


def _updates(path: str, on_fresher: Fresher | None) -> Iterator[LeadUpdate]:
    with open(path, "rb") as f:
        while True:
            try:
                updates, fresher = pickle.load(f)
            except EOFError:
                break
            if on_fresher is not None:
                for record in fresher:
                    on_fresher(*record)
            yield from updates
    os.unlink(path)

"""KV events between the connector's workers and its scheduler, and out to vLLM's KV-event publisher.

Path (the same as LMCache's connector): each worker polls its engine (``Engine.poll_events``) in
``get_kv_connector_kv_cache_events`` and returns the events in an ``LMCacheNativeKVEvents``, a
``KVConnectorKVEvents`` of vLLM; vLLM's output aggregator merges the containers of all TP ranks
(``add_events`` of each rank's ``get_all_events``) and hands the result to the scheduler's
``update_connector_output``; ``take_events`` then yields vLLM's ``BlockStored`` / ``BlockRemoved``
/ ``AllBlocksCleared``.

Across ranks: each record carries its rank, and ``EventAggregator`` turns the ranks' records into
ONE event per chunk and medium: BlockStored once every rank holds the chunk there; BlockRemoved as
soon as one rank lost a chunk that was announced (a partial chunk is no longer a hit);
AllBlocksCleared once per clear of the ranks (and once when a rank's queue overflowed: the
router's view must be rebuilt). Every rank names a chunk by the same hash (the engine's event
hash: the key a single-rank engine computes), so records of one chunk meet.

vLLM versions without these classes (before ``KVConnectorKVEvents``): the connector returns no
events and yields none; nothing here raises.

Importing this module loads nothing of the library (records pickle without it).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

try:  # vLLM >= ≈0.12: events travel from the workers to the scheduler in KVConnectorOutput
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
    from vllm.distributed.kv_events import KVConnectorKVEvents as _KVConnectorKVEventsBase
except Exception:  # this vLLM cannot carry connector events
    AllBlocksCleared = BlockRemoved = BlockStored = None
    _KVConnectorKVEventsBase = None

STORED, REMOVED, CLEARED, DROPPED = "BlockStored", "BlockRemoved", "AllBlocksCleared", "Dropped"


class RankEvent(NamedTuple):
    """One engine event of one rank (``kind`` also "Dropped": ``token_count`` events were lost to a
    full queue on that rank). Plain values: it pickles between processes without the library."""

    rank: int
    kind: str
    medium: str
    block_hash: Optional[bytes]
    parent_hash: Optional[bytes]
    token_count: int
    token_ids: Optional[tuple]


def records_from_poll(rank: int, polled) -> list:
    """RankEvents of one ``Engine.poll_events`` result; a drop marker last (the lost events were
    newer than the ones kept)."""
    records = [RankEvent(rank, e.kind, e.medium, e.block_hash, e.parent_hash, e.token_count, e.token_ids)
               for e in polled.events]
    if polled.dropped:
        records.append(RankEvent(rank, DROPPED, "", None, None, int(polled.dropped), None))
    return records


if _KVConnectorKVEventsBase is not None:
    class LMCacheNativeKVEvents(_KVConnectorKVEventsBase):
        """The workers' KV event records on their way to the scheduler (vLLM's KVConnectorKVEvents).
        Ranks are combined by the scheduler's ``EventAggregator``, which knows the world size, so
        ``aggregate`` keeps every record."""

        def __init__(self, records: Optional[list] = None, num_workers: int = 1) -> None:
            self._records = list(records or ())
            self._num_workers = num_workers

        def add_events(self, events: list) -> None:
            self._records.extend(events)

        def aggregate(self) -> "LMCacheNativeKVEvents":
            return self

        def increment_workers(self, count: int = 1) -> None:
            self._num_workers += count

        def get_all_events(self) -> list:
            return list(self._records)

        def get_number_of_workers(self) -> int:
            return self._num_workers

        def clear_events(self) -> None:
            self._records.clear()
            self._num_workers = 1

        def __repr__(self) -> str:
            return f"<LMCacheNativeKVEvents records={len(self._records)} workers={self._num_workers}>"
else:
    LMCacheNativeKVEvents = None


def supported() -> bool:
    """Whether this vLLM carries connector KV events (KVConnectorKVEvents and BlockStored exist)."""
    return LMCacheNativeKVEvents is not None and BlockStored is not None


def _make(cls, **fields):
    """A vLLM event with the fields this vLLM's class has: older releases lack medium / lora_name."""
    try:
        return cls(**fields)
    except TypeError:
        for optional in ("lora_name", "medium", "lora_id"):
            fields.pop(optional, None)
            try:
                return cls(**fields)
            except TypeError:
                continue
        raise


class EventAggregator:
    """Scheduler-side: the ranks' records in, one vLLM event per chunk and medium out.

    State: for each (hash, medium) some rank holds, the set of ranks holding it and, until it is
    announced, the first rank's record (tokens and parent for the BlockStored). About 100 bytes per
    chunk and tier, plus the token ids of chunks not yet held by every rank. REMOTE chunks are
    forgotten once announced: no removal can follow (expiry is not observable).
    """

    def __init__(self, world_size: int) -> None:
        self._world_size = max(1, int(world_size))
        self._holders: dict = {}  # (hash, medium) -> set of ranks holding it
        self._first_record: dict = {}  # (hash, medium) -> RankEvent, until announced
        self._announced: set = set()  # (hash, medium) the router was told about
        self._clears_seen: dict = {}  # rank -> clears (and drops) it reported
        self._clears_yielded = 0
        self._out: list = []  # vLLM events ready for take_events

    def add(self, records) -> None:
        for record in records:
            if not isinstance(record, RankEvent):
                record = RankEvent(*record)
            if record.kind == STORED:
                self._stored(record)
            elif record.kind == REMOVED:
                self._removed(record)
            elif record.kind in (CLEARED, DROPPED):
                self._cleared(record)

    def _stored(self, record: RankEvent) -> None:
        key = (record.block_hash, record.medium)
        if key in self._announced:
            return
        holders = self._holders.setdefault(key, set())
        holders.add(record.rank)
        self._first_record.setdefault(key, record)
        if len(holders) < self._world_size:
            return
        first = self._first_record.pop(key)
        self._announced.add(key)
        if record.medium == "REMOTE":  # never removed: nothing more to track
            del self._holders[key]
        self._out.append(_make(BlockStored, block_hashes=[first.block_hash], parent_block_hash=first.parent_hash,
                               token_ids=list(first.token_ids or ()), block_size=first.token_count, lora_id=None,
                               medium=first.medium, lora_name=None))

    def _removed(self, record: RankEvent) -> None:
        key = (record.block_hash, record.medium)
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(record.rank)
            if not holders:
                del self._holders[key]
                self._first_record.pop(key, None)
        if key in self._announced:
            self._announced.discard(key)
            self._out.append(_make(BlockRemoved, block_hashes=[record.block_hash], medium=record.medium))

    def _cleared(self, record: RankEvent) -> None:
        if record.kind == DROPPED:
            # The rank lost events: what is known of it cannot be trusted. Start over, and have the
            # router start over too.
            self._holders.clear()
            self._first_record.clear()
            self._announced.clear()
            self._out.append(_make(AllBlocksCleared))
            return
        # The rank's CPU tier is empty.
        for key in [k for k in self._holders if k[1] == "CPU"]:
            holders = self._holders[key]
            holders.discard(record.rank)
            if not holders:
                del self._holders[key]
                self._first_record.pop(key, None)
        seen = self._clears_seen.get(record.rank, 0) + 1
        self._clears_seen[record.rank] = seen
        if seen > self._clears_yielded:
            # The first rank to report its n-th clear: one AllBlocksCleared for the n-th clear of
            # all ranks. The router forgets everything (vLLM's event names no medium), so nothing
            # counts as announced any more; chunks still on disk are announced again when written.
            self._clears_yielded = seen
            self._announced.clear()
            self._out.append(_make(AllBlocksCleared))

    def take(self) -> list:
        out, self._out = self._out, []
        return out

    def sizes(self) -> dict:
        return {"event_holders": len(self._holders), "events_announced": len(self._announced),
                "events_ready": len(self._out)}

"""A scripted keyed consumer for :class:`~fogline.daemon.stream.keyed_process.KeyedProcessSource`.

It runs in the source's child process (the factory pickles by reference; the
child gets the parent's ``sys.path``), so it is a module of its own rather
than part of a test file.  Each ``poll`` first plays its step of the script
-- assignments and revocations, raised from another thread the way
kafka-python's IO thread runs rebalance callbacks, or a crash -- then returns
up to ``max_records`` records from the assigned, unpaused partitions, in
partition order, from their positions.  Every partition holds ``END``
records; ``seek_checked`` beyond the end, or with a fingerprint that is not
the record's, is reported by ``out_of_range`` (as ``KafkaSource`` does), and
``seek``/``reset``/``commit`` are recorded so a test can check the order of
calls.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fogline.daemon.stream.decode import RawRecord
from fogline.daemon.stream.source import BEYOND_END, FINGERPRINT_MISMATCH, OutOfRange
from fogline.models.state import RecordFingerprint

TP = tuple[str, int]
#: Records per partition.
END = 100


def value(partition: int, offset: int) -> bytes:
    """The bytes of record ``offset`` of ``partition``."""
    if offset % 7 == 6:
        return b'{"p": '  # malformed: the dead-letter path gets it raw
    return (
        f'{{"p": {partition}, "o": {offset}, "y": {offset / 2}, "key": "k{offset % 3}"}}'.encode()
    )


def fingerprint(partition: int, offset: int) -> RecordFingerprint:
    """The fingerprint of record ``offset`` of ``partition``."""
    return RecordFingerprint.of(offset, None, value(partition, offset), 0)


class ScriptedConsumer:
    """A keyed consumer following ``script``: one list of actions per poll.

    Actions: ``("assign", [p, ...])``, ``("revoke", [p, ...])``, ``("die", code)``.
    """

    def __init__(
        self,
        offsets_for: Callable[[list[TP]], Mapping[TP, int]],
        on_revoked: Callable[[list[TP]], None],
        fingerprints_for: Callable[[list[TP]], Mapping[TP, RecordFingerprint]],
        *,
        topic: str,
        script: list[list[tuple[str, Any]]],
    ) -> None:
        self.offsets_for = offsets_for
        self.on_revoked = on_revoked
        self.topic = topic
        self.script = list(script)
        self.assigned: set[int] = set()
        self.paused: set[int] = set()
        self.position: dict[int, int] = {}
        self.found: list[OutOfRange] = []
        self.calls: list[tuple[Any, ...]] = []

    def _play(self, action: tuple[str, Any]) -> None:
        kind, arg = action
        if kind == "die":
            os._exit(int(arg))
        keys = [(self.topic, p) for p in arg]
        if kind == "assign":
            self.assigned |= set(arg)
            for p in arg:
                self.position[p] = 0  # keyed mode: the earliest until the claim seeks
            self.offsets_for(keys)
        else:
            self.assigned -= set(arg)
            self.on_revoked(keys)

    def poll(self, max_records: int | None = None, timeout_ms: int = 100) -> list[RawRecord]:
        if self.script:
            for action in self.script.pop(0):
                t = threading.Thread(target=self._play, args=(action,))  # the IO thread
                t.start()
                t.join()
        out: list[RawRecord] = []
        room = max_records or 1000
        for p in sorted(self.assigned - self.paused):
            while room and self.position[p] < END:
                o = self.position[p]
                out.append(RawRecord(self.topic, p, o, None, value(p, o), 0))
                self.position[p] = o + 1
                room -= 1
        return out

    @property
    def assignment(self) -> list[TP]:
        return sorted((self.topic, p) for p in self.assigned)

    def pause(self, keys: Iterable[TP]) -> None:
        self.paused |= {p for _, p in keys} & self.assigned
        self.calls.append(("pause", sorted(self.paused)))

    def resume(self, keys: Iterable[TP]) -> None:
        self.paused -= {p for _, p in keys}
        self.calls.append(("resume", sorted(self.paused)))

    def seek(self, offsets: Mapping[TP, int]) -> None:
        for (_, p), off in offsets.items():
            self.position[p] = int(off)

    def seek_checked(
        self, offsets: Mapping[TP, int], prints: Mapping[TP, RecordFingerprint]
    ) -> None:
        for key, off in offsets.items():
            p = key[1]
            fp = prints.get(key)
            if int(off) > END:
                self.found.append(OutOfRange(key, int(off), END, BEYOND_END))
                self.position[p] = END  # nothing withheld is read
            elif fp is not None and fp != fingerprint(p, fp.offset):
                self.found.append(OutOfRange(key, int(off), END, FINGERPRINT_MISMATCH))
                self.position[p] = END
            else:
                self.position[p] = int(off)

    def reset(self, key: TP, to: str, high_watermark: int | None = None) -> None:
        self.position[key[1]] = 0 if to == "earliest" else int(high_watermark or END)

    def out_of_range(self) -> list[OutOfRange]:
        found, self.found = self.found, []
        return found

    def partition_count(self, topic: str | None = None) -> int | None:
        return 4

    def commit(self, offsets: Mapping[TP, int]) -> bool:
        self.calls.append(("commit", dict(offsets)))
        return True

    def close(self) -> None:
        pass


def unreachable(*_callbacks: Any) -> ScriptedConsumer:
    """A factory whose consumer cannot be built (as when no broker answers)."""
    raise ConnectionError("no broker answers at nowhere:9092")

"""kafka-python checks record batches with the C CRC-32C of the ``crc32c`` dependency."""

from __future__ import annotations

import crc32c
from kafka.record import util


def test_kafka_python_uses_the_c_crc32c() -> None:
    # kafka-python binds its implementation at import: the pure-Python fallback is ~2x
    # slower end to end on a bare consume + decode loop (fogline bench keyed's baseline)
    assert util.calc_crc32c.__defaults__ == (crc32c.crc32c,)
    assert util.calc_crc32c(memoryview(b"123456789")) == 0xE3069283  # the CRC-32C check value

"""The consumer's child process does not load torch.

The child (``daemon/stream/process_source.py``'s ``child_main``) imports the
consumer, the decoder and the settings, and unpickles the parent's factory and
decoder (tabular, or an autoregressive model's series decoder).  None of that needs torch (~2 s and ~250 MB per process); this test
runs those imports and an unpickle in a fresh interpreter and checks that
``torch`` never entered ``sys.modules``.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import torch

from fogline.daemon.stream.decode import Decoder
from fogline.daemon.stream.series import SeriesDecoder
from fogline.models.schema import DataSchema
from fogline.models.spec import ModelSpec

CHILD = """
import pickle, sys
import fogline.daemon.stream.process_source
import fogline.daemon.stream.keyed_process
import fogline.daemon.stream.source
import fogline.daemon.config
dec, series = pickle.loads(sys.stdin.buffer.read())
assert dec.decode(b'{"ts": 1, "a": 2.0, "b": 3.0, "y": 1.0}').x == (2.0, 3.0)
assert series.decode_batch([b'{"ts": 1, "host": "h", "value": 2.5}']).keys == ["h"]
print("torch" in sys.modules)
"""


def test_child_side_imports_and_decoder_unpickle_skip_torch() -> None:
    schema = DataSchema.fit(
        torch.tensor([[1.0, 2.0], [3.0, 5.0]]), torch.tensor([1.0, 2.0]), ("a", "b"), "y"
    )
    series = SeriesDecoder(
        DataSchema.unfitted(
            ModelSpec.model_validate(
                {"mode": "autoregressive", "target": "value", "timestamp": "ts", "key": "host"}
            )
        )
    )
    blob = pickle.dumps((Decoder(schema), series))
    out = subprocess.run(
        [sys.executable, "-c", CHILD], input=blob, capture_output=True, check=True, timeout=120
    )
    assert out.stdout.decode().strip() == "False", out.stderr.decode()

# pyre-strict
"""The read path under a load: byte ranges coalesced into few ``preadv`` calls, units checked in
spans of the file, and prefetch requests the kernel cannot misread."""

import os
import random
from unittest import mock

from distributed_shampoo.checkpoint.errors import ChecksumMismatchError, CorruptCheckpointError
from distributed_shampoo.checkpoint.format import checksum
from distributed_shampoo.checkpoint.integrity import check_units, SCRATCH_BYTES, Unit
from distributed_shampoo.checkpoint.reader import coalesce, GAP_BYTES, prefetch, read_ranges, ReadRequest
from tests.checkpoint.scratch import ScratchDirTest


class ReadsTest(ScratchDirTest):
    def setUp(self) -> None:
        super().setUp()
        self.data = random.Random(0).randbytes(3 * SCRATCH_BYTES)
        self.path = self.root / "file"
        self.path.write_bytes(self.data)
        self.fd = os.open(self.path, os.O_RDONLY)

    def tearDown(self) -> None:
        os.close(self.fd)
        super().tearDown()

    def _unit(self, name: str, offset: int, nbytes: int) -> Unit:
        return Unit(name, "", offset, nbytes, checksum(self.data[offset : offset + nbytes]))

    def test_ranges_closer_than_the_gap_share_a_call_and_get_exact_bytes(self) -> None:
        # (offset, length): adjacent, a small gap, a gap of exactly GAP_BYTES, then a larger one.
        ranges = [(0, 10), (10, 5), (100, 7), (107 + GAP_BYTES, 3), (110 + 2 * GAP_BYTES + 1, 4)]
        requests = [ReadRequest(offset, memoryview(bytearray(length))) for offset, length in reversed(ranges)]
        self.assertEqual([call.offset for call in coalesce(requests)], [0, 110 + 2 * GAP_BYTES + 1])
        read_ranges(self.fd, self.path, requests)
        for request in requests:
            self.assertEqual(bytes(request.buffer), self.data[request.offset : request.offset + request.buffer.nbytes])

    def test_one_call_takes_at_most_1024_buffers(self) -> None:
        requests = [ReadRequest(i, memoryview(bytearray(1))) for i in range(2000)]
        self.assertEqual([len(call.buffers) for call in coalesce(requests)], [1023, 977])

    def test_a_range_past_the_end_is_a_truncated_file(self) -> None:
        request = ReadRequest(len(self.data) - 4, memoryview(bytearray(8)))
        with self.assertRaisesRegex(CorruptCheckpointError, rf"{self.path}: truncated: no data at byte {len(self.data)}"):
            read_ranges(self.fd, self.path, [request])

    def test_units_in_spans_each_checked_and_named(self) -> None:
        units = [
            self._unit("a", 0, 100),
            self._unit("b", 100, 50),  # adjacent: the same span
            self._unit("c", 150 + GAP_BYTES // 2, 10),  # a small gap: the same span
            self._unit("d", 160 + 2 * GAP_BYTES, 20),  # a large gap: a new span
            self._unit("e", 170 + 2 * GAP_BYTES, 5),  # inside d
            self._unit("big", SCRATCH_BYTES - 10, SCRATCH_BYTES + 20),  # larger than the scratch buffer: streamed
            self._unit("last", 3 * SCRATCH_BYTES - 7, 7),
        ]
        check_units(self.fd, self.path, units)
        damaged = [unit._replace(expected="0" * 16) for unit in units]
        mismatches: list[ChecksumMismatchError] = []
        check_units(self.fd, self.path, damaged, mismatches.append)
        self.assertEqual([str(m).split(":")[1].split()[0] for m in mismatches], ["a", "b", "c", "d", "e", "big", "last"])
        with self.assertRaisesRegex(ChecksumMismatchError, r"^" + str(self.path) + r": a "):
            check_units(self.fd, self.path, [units[1], damaged[0]])

    def test_prefetch_never_asks_for_an_empty_range(self) -> None:
        with mock.patch.object(os, "posix_fadvise", wraps=os.posix_fadvise) as fadvise:
            prefetch(self.fd, [(50, 0)])
            prefetch(self.fd, [(10, 5), (20, 0), (10 + 2 * GAP_BYTES, 3)])
        self.assertEqual(
            [call.args[1:] for call in fadvise.call_args_list],
            [(10, 5, os.POSIX_FADV_WILLNEED), (10 + 2 * GAP_BYTES, 3, os.POSIX_FADV_WILLNEED)],
        )

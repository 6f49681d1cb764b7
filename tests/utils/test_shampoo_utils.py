# pyre-strict
import math
import unittest

import torch
from parameterized import parameterized

from distributed_shampoo.distributor.block_distributor import block_owners, checkpoint_writes
from distributed_shampoo.distributor.block_layout import block_boxes, BlockSpec, param_layouts
from distributed_shampoo.utils.shampoo_utils import (
    compress_list,
    distribute_buffer_sizes,
    generate_pairwise_indices,
    get_dtype_size,
    merge_small_dims,
    multi_dim_split,
    ParameterizeEnterExitContext,
)


class MergeSmallDimsTest(unittest.TestCase):
    @parameterized.expand(
        [
            ((1, 2, 5, 1), 10, 1, (10,)),
            ((32, 3, 64, 64), 8192, 1, (96, 4096)),
            ((32, 3, 64, 64), 8192, 2, (96, 4096)),
            ((32, 3, 64, 64), 1_000_000, 2, (32, 12288)),
            ((1, 2, 5, 1), 1, 1, (2, 5)),
            ((32, 3, 64, 64), 1024, 2, (32, 192, 64)),
            ((1, 1, 1), 10, 1, (1,)),
            ((), 10, 1, (1,)),
            ((3, 0, 4), 10, 1, (0,)),
            ((2, 3, 4), 100, 1, (24,)),
            ((2, 3, 4), 100, 2, (2, 12)),
            ((2, 3, 4), 100, 3, (2, 3, 4)),
            ((2, 3, 4), 11, 1, (6, 4)),
            ((2, 3, 4), math.inf, 1, (24,)),
            ((1, 7, 1, 9), math.inf, 2, (7, 9)),
            ((1, 2, 5, 1), 10, math.inf, (1, 2, 5, 1)),
            ((5,), 2, 1, (5,)),
        ]
    )
    def test_rule(self, shape: tuple[int, ...], threshold: float, target: float, expected: tuple[int, ...]) -> None:
        self.assertEqual(merge_small_dims(shape, threshold, target), expected)

    def test_bad_arguments(self) -> None:
        with self.assertRaisesRegex(ValueError, r"target_tensor_dimensionality=2.5 has to be an integer or math.inf"):
            merge_small_dims((2, 3), 10, 2.5)
        with self.assertRaisesRegex(ValueError, r"negative dimension in \(2, -3\)"):
            merge_small_dims((2, -3), 10)


class MultiDimSplitTest(unittest.TestCase):
    def test_row_major_views(self) -> None:
        tensor = torch.arange(15.0).reshape(5, 3)
        blocks = multi_dim_split(tensor, 2)
        self.assertEqual([tuple(b.shape) for b in blocks], [(2, 2), (2, 1), (2, 2), (2, 1), (1, 2), (1, 1)])
        self.assertTrue(torch.equal(blocks[1], tensor[0:2, 2:3]))
        self.assertTrue(torch.equal(blocks[4], tensor[4:5, 0:2]))
        blocks[5].fill_(-1.0)
        self.assertEqual(tensor[4, 2].item(), -1.0)  # views, not copies

    def test_inf_and_zero_dim(self) -> None:
        tensor = torch.randn(5, 3)
        (alone,) = multi_dim_split(tensor, math.inf)
        self.assertIs(alone, tensor)
        scalar = torch.tensor(2.0)
        self.assertEqual(len(multi_dim_split(scalar, 2)), 1)

    def test_three_dims_and_empty(self) -> None:
        self.assertEqual(len(multi_dim_split(torch.zeros(3, 4, 5), 2)), 2 * 2 * 3)
        # Like torch.split, a zero-size dimension yields one empty block.
        self.assertEqual([tuple(b.shape) for b in multi_dim_split(torch.zeros(0, 4), 3)], [(0, 3), (0, 1)])

    @parameterized.expand([(0,), (-1,), (1.5,), (True,)])
    def test_bad_split_size(self, split_size: float) -> None:
        with self.assertRaisesRegex(ValueError, "split_size must be a positive int or math.inf"):
            multi_dim_split(torch.zeros(2), split_size)


class SmallHelpersTest(unittest.TestCase):
    def test_compress_list(self) -> None:
        self.assertEqual(compress_list(["a", "b", "c", "d"], [True, False, True, False]), ("a", "c"))
        self.assertEqual(compress_list([], []), ())
        with self.assertRaisesRegex(AssertionError, r"^Inconsistent lengths between complete_list 2 and selector 1!$"):
            compress_list([1, 2], [True])

    @parameterized.expand(
        [(torch.float32, 4), (torch.bool, 1), (torch.bfloat16, 2), (torch.float64, 8), (torch.int8, 1), (torch.float8_e4m3fn, 1)]
    )
    def test_get_dtype_size(self, dtype: torch.dtype, size: int) -> None:
        self.assertEqual(get_dtype_size(dtype), size)

    def test_generate_pairwise_indices(self) -> None:
        self.assertEqual(list(generate_pairwise_indices([2, 3, 1])), [(0, 2), (2, 5), (5, 6)])
        self.assertEqual(list(generate_pairwise_indices([])), [])
        self.assertEqual(list(generate_pairwise_indices([0, 2])), [(0, 0), (0, 2)])

    def test_parameterize_enter_exit_context(self) -> None:
        calls: list[str] = []
        with self.assertRaises(RuntimeError):
            with ParameterizeEnterExitContext(calls, lambda c: c.append("enter"), lambda c: c.append("exit")):
                self.assertEqual(calls, ["enter"])
                raise RuntimeError("body fails")
        self.assertEqual(calls, ["enter", "exit"])


class DistributeBufferSizesTest(unittest.TestCase):
    @parameterized.expand(
        [
            ("seed", (128, 64, 500, 256), 2, ((128, 1), (64, 1), (512, 0), (256, 1))),
            ("alignment", (1, 65, 0), 1, ((64, 0), (128, 0), (0, 0))),
            ("ties_lower_index_and_rank", (64, 64, 64, 64), 2, ((64, 0), (64, 1), (64, 0), (64, 1))),
            ("more_ranks_than_buffers", (64, 128), 4, ((64, 1), (128, 0))),
            ("empty", (), 3, ()),
        ]
    )
    def test_assignment(
        self, _name: str, sizes: tuple[int, ...], group_size: int, expected: tuple[tuple[int, int], ...]
    ) -> None:
        self.assertEqual(distribute_buffer_sizes(sizes, group_size), expected)

    def test_balances_load(self) -> None:
        sizes = tuple(64 * s for s in (7, 3, 9, 1, 4, 4, 6, 2, 8, 5))
        loads = [0, 0, 0]
        for size, rank in distribute_buffer_sizes(sizes, 3):
            loads[rank] += size
        self.assertLessEqual(max(loads) - min(loads), 64 * 9)
        self.assertEqual(sum(loads), sum(sizes))

    def test_bad_arguments(self) -> None:
        with self.assertRaisesRegex(ValueError, "group_size must be >= 1, got 0"):
            distribute_buffer_sizes((64,), 0)
        with self.assertRaisesRegex(ValueError, "negative buffer size"):
            distribute_buffer_sizes((-1,), 2)


class BlockLayoutTest(unittest.TestCase):
    @parameterized.expand([((7, 27), 6), ((6, 3, 3), 2), ((5,), 5), ((0, 4), 3), ((1,), 4), ((9, 1, 4), 8)])
    def test_boxes_are_what_multi_dim_split_cuts(self, shape: tuple[int, ...], size: int) -> None:
        tensor = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
        boxes = block_boxes(shape, size)
        blocks = multi_dim_split(tensor, size)
        self.assertEqual(len(boxes), len(blocks))
        for box, block in zip(boxes, blocks):
            self.assertTrue(torch.equal(tensor[tuple(slice(axis.start, axis.stop) for axis in box)], block))

    def test_layouts_of_the_global_shapes(self) -> None:
        layouts, blocks = param_layouts([(3, 2, 2, 2), (7,), ()], [6, 4, 4])
        self.assertEqual([layout.merged_shape for layout in layouts], [(6, 4), (7,), (1,)])
        self.assertEqual([layout.block_positions for layout in layouts], [range(0, 1), range(1, 3), range(3, 4)])
        self.assertEqual(
            blocks,
            [BlockSpec(0, 0, (6, 4)), BlockSpec(1, 0, (4,)), BlockSpec(1, 1, (3,)), BlockSpec(2, 0, (1,))],
        )


class BlockOwnershipTest(unittest.TestCase):
    def test_block_owners_is_distribute_buffer_sizes(self) -> None:
        sizes = [4096, 2048, 1024, 1024, 512, 8192]
        self.assertEqual(block_owners(sizes, 3), tuple(rank for _, rank in distribute_buffer_sizes(sizes, 3)))
        self.assertEqual(block_owners(sizes, 1), (0,) * 6)

    def test_checkpoint_writes_follow_the_optimizer_block_order(self) -> None:
        f32 = torch.float32
        tensors = {
            '["optimizer", "state", "w", "block_1", "momentum"]': ((4, 4), f32),
            '["optimizer", "state", "w", "block_0", "momentum"]': ((8, 8), f32),
            '["optimizer", "state", "w", "block_0", "shampoo", "factor_matrices", 0]': ((8, 8), f32),
            '["optimizer", "state", "w", "step"]': ((), f32),
            '["optimizer", "state", "b", "block_0", "shampoo", "factor_matrices", 0]': ((2, 2), f32),
            '["model", "w"]': ((12, 8), f32),
        }
        writes = checkpoint_writes(tensors, 2)
        # Blocks in order, by their tensors' bytes: w/block_0 (256 + 256), w/block_1 (64), b/block_0 (16).
        owners = block_owners([512, 64, 16], 2)
        expected: list[list[str]] = [[], []]
        expected[0] = ['["optimizer", "state", "w", "step"]', '["model", "w"]']
        expected[owners[0]] += [name for name in tensors if "block_0" in name and '"w"' in name]
        expected[owners[1]] += ['["optimizer", "state", "w", "block_1", "momentum"]']
        expected[owners[2]] += ['["optimizer", "state", "b", "block_0", "shampoo", "factor_matrices", 0]']
        self.assertEqual([sorted(w) for w in writes], [sorted(w) for w in expected])
        with self.assertRaisesRegex(ValueError, "no Shampoo blocks"):
            checkpoint_writes({'["model", "w"]': ((2,), f32)}, 2)

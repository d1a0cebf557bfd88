"""The CUDA launch geometry and template arguments (kernels/cuda/launch.py), on the host: every launch the
cupy backend makes names an instantiation of the kernel table, stays within CUDA's limits, and covers
its work with the grid-stride loops' assumptions."""

import pytest

from deltaprop.kernels.activations import ACTIVATIONS
from deltaprop.kernels.cuda import launch
from deltaprop.kernels.cuda.loader import KERNELS

GRID_LIMIT = launch.max_blocks(132)  # an H100/H200's multiprocessors
ROW_LENGTHS = (1, 2, 3, 10, 31, 32, 33, 1024, 1025, 10_240, 10_241, 100_000)


@pytest.mark.parametrize(
    ("cols", "team"),
    [(1, ("GroupTeam<1>", 1)), (10, ("GroupTeam<16>", 16)), (32, ("GroupTeam<32>", 32)),
     (33, ("GroupTeam<32>", 32)), (1024, ("GroupTeam<32>", 32)), (1025, ("BlockTeam", 0))],
)
def test_row_team_by_row_length(cols, team):
    assert launch.row_team(cols) == team


@pytest.mark.parametrize("cols", ROW_LENGTHS)
@pytest.mark.parametrize("kind", sorted(launch.TARGETS))
def test_every_row_launch_names_an_instantiation(cols, kind):
    for loss, variant in launch.LOSS_VARIANTS.items():
        team = launch.rows_launch(7, cols, 4, GRID_LIMIT, caches_row=loss == "softmax_xent")[0]
        assert variant + (launch.TARGETS[kind], team) in KERNELS[loss].variants, (loss, cols)
    team = launch.rows_launch(7, cols, 4, GRID_LIMIT, caches_row=True)[0]
    assert (launch.NO_TARGETS, team) in KERNELS["softmax"].variants


def test_every_activation_names_an_instantiation():
    for name in ACTIVATIONS:
        for kernel in ("bias_act", "act_backward"):
            assert (launch.activation_functor(name),) in KERNELS[kernel].variants


@pytest.mark.parametrize("rows", [1, 7, 4099])
@pytest.mark.parametrize("cols", ROW_LENGTHS)
@pytest.mark.parametrize("accum_itemsize", [4, 8])
def test_row_launches_cover_their_rows_within_the_limits(rows, cols, accum_itemsize):
    team, geometry, cache = launch.rows_launch(rows, cols, accum_itemsize, GRID_LIMIT, caches_row=True)
    lanes = launch.row_team(cols)[1]
    assert geometry.block == (launch.THREADS,) and 1 <= geometry.grid[0] <= GRID_LIMIT
    if lanes:  # rows handed out lanes at a time: the grid covers every row, or wraps at the limit
        assert geometry.grid[0] == min(launch.blocks(rows * lanes, launch.THREADS), GRID_LIMIT)
        assert (geometry.shared_mem, cache) == (0, False)
    else:  # a block per row; the row kept in shared memory only while it fits
        assert geometry.grid[0] == min(rows, GRID_LIMIT)
        fits = cols * accum_itemsize <= launch.ROW_CACHE_BYTES
        assert cache == fits and geometry.shared_mem == (cols * accum_itemsize if fits else 0)
    assert not launch.rows_launch(rows, cols, accum_itemsize, GRID_LIMIT, caches_row=False)[2]


@pytest.mark.parametrize("rows", [1, 3, 255, 257, 100_000, 10_000_000])
@pytest.mark.parametrize("cols", [1, 2, 3, 255, 256, 257, 100_000])
def test_bias_act_blocks_hold_threads_and_grids_stay_within_the_limits(rows, cols):
    geometry = launch.bias_act_launch(1, rows, cols, GRID_LIMIT)
    (grid_x, grid_y, grid_z), (block_x, block_y) = geometry.grid, geometry.block
    assert block_x * block_y == launch.THREADS and block_x & (block_x - 1) == 0  # a power of two
    assert block_x >= min(cols, launch.THREADS)  # a row's columns fit one block across, up to THREADS
    assert 1 <= grid_x <= launch.blocks(cols, block_x) and 1 <= grid_y <= launch.MAX_GRID_Y and grid_z == 1
    assert grid_x * grid_y <= max(GRID_LIMIT, grid_x)


@pytest.mark.parametrize("members", [1, 2, 7, GRID_LIMIT, 65_535, 65_536, 10**6])
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (3, 33), (100_000, 257)])
def test_stacked_launches_take_the_members_on_z_within_the_limits(members, rows, cols):
    """gridDim.z is the members up to CUDA's 65535 (the kernels walk the rest); the other axes share the
    grid limit among the z slices, as many blocks in all as one member would get, or one per slice."""
    grid_z = min(members, launch.MAX_GRID_Z)
    share = max(GRID_LIMIT // grid_z, 1)
    stacked, alone = launch.bias_act_launch(members, rows, cols, GRID_LIMIT), launch.bias_act_launch(1, rows, cols, share)
    assert stacked == launch.Launch(alone.grid[:2] + (grid_z,), alone.block)
    flat = launch.act_backward_launch(members, rows * cols, 4, GRID_LIMIT)
    assert flat == launch.Launch((launch.flat_launch(rows * cols, 4, share).grid[0], 1, grid_z), (launch.THREADS,))
    for geometry in (stacked, flat):
        x_and_y = geometry.grid[0] * geometry.grid[1]
        assert geometry.grid[2] == grid_z and x_and_y * grid_z <= max(GRID_LIMIT, grid_z, x_and_y)
    columns, one = launch.column_sums_launch(members, rows, cols, GRID_LIMIT), launch.column_sums_launch(1, rows, cols, GRID_LIMIT)
    assert (columns.chunk_rows, columns.chunks) == (one.chunk_rows, one.chunks)  # a member's sums as a 2-D call's
    assert columns.first.grid == one.first.grid[:2] + (grid_z,)
    assert columns.second == (None if one.second is None else launch.Launch(one.second.grid[:2] + (grid_z,), one.second.block))
    assert launch.mean_launch(members, GRID_LIMIT) == launch.Launch((min(members, GRID_LIMIT),), (launch.MEAN_THREADS,))


@pytest.mark.parametrize("itemsize", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 4096, 10**9])
def test_flat_launches_give_each_thread_16_bytes_up_to_the_grid_limit(itemsize, n):
    geometry = launch.flat_launch(n, itemsize, GRID_LIMIT)
    per_thread = launch.VECTOR_BYTES // itemsize
    assert geometry.block == (launch.THREADS,)
    assert geometry.grid == (min(launch.blocks(n, per_thread * launch.THREADS), GRID_LIMIT),)


@pytest.mark.parametrize("cols", [1, 32, 33, 10**6])
def test_column_sums_take_a_tile_of_columns_per_block(cols):
    geometry = launch.column_sums_launch(1, 1, cols, GRID_LIMIT)
    assert geometry.first.block == (launch.COLUMN_TILE, launch.COLUMN_TILE)
    assert geometry.first.grid == (min(launch.blocks(cols, launch.COLUMN_TILE), GRID_LIMIT), 1, 1)
    assert (geometry.chunks, geometry.second) == (1, None)


@pytest.mark.parametrize("rows, cols", [(5000, 10), (10**6, 1), (10**6, 33), (129, 1), (3, 1025), (10**5, 10**4)])
def test_column_sums_split_rows_into_chunks_until_the_device_is_full(rows, cols):
    """Column tiles times row chunks fill COLUMN_BLOCKS_PER_SM blocks per multiprocessor where rows
    allow (chunks of at least COLUMN_CHUNK_ROWS rows), the chunks cover every row once, and several
    chunks get the second pass over every column tile."""
    geometry = launch.column_sums_launch(1, rows, cols, GRID_LIMIT)
    tiles = min(launch.blocks(cols, launch.COLUMN_TILE), GRID_LIMIT)
    device_blocks = GRID_LIMIT * launch.COLUMN_BLOCKS_PER_SM // launch.BLOCKS_PER_SM
    assert geometry.first.grid == (tiles, geometry.chunks, 1)
    assert tiles * geometry.chunks <= max(device_blocks, tiles)
    assert (geometry.chunks - 1) * geometry.chunk_rows < rows <= geometry.chunks * geometry.chunk_rows
    assert geometry.chunks == 1 or geometry.chunk_rows >= launch.COLUMN_CHUNK_ROWS
    enough_rows = rows >= 2 * launch.COLUMN_CHUNK_ROWS
    assert (geometry.chunks > 1) == (enough_rows and tiles * 2 <= device_blocks)
    assert geometry.second == (None if geometry.chunks == 1 else launch.Launch((tiles, 1, 1), geometry.first.block))

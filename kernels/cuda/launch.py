"""How the CUDA kernels are launched, beside the kernels: block and grid shapes, shared memory, and the
C++ template arguments that name each instantiation (``loader.KERNELS`` builds its table from them).

The rules, which the .cu sources rely on:

- 1-D and row-wise kernels run ``THREADS`` threads per block; every kernel loops grid-stride, so a grid
  never needs more than ``BLOCKS_PER_SM`` blocks per multiprocessor.
- Flat kernels (optimizers, act_backward) give each thread 16-byte chunks (common.cuh: vector_width).
- Row-wise kernels (softmax, the losses) give a row to a team: ``GroupTeam<W>`` (W lanes of a warp, several
  rows per warp) for rows of up to 32 elements, a warp per row up to ``WARP_ROW_LIMIT``, a block per row
  beyond; a block-per-row softmax keeps its row in shared memory up to ``ROW_CACHE_BYTES``.
- bias_act runs 2-D blocks, x across columns; column_sums a 32 x 32 block per 32 columns, and a grid
  over (column tiles, row chunks) with a second pass where the tiles alone would not fill the device.
- Over a stack of K members (a 2-D call is K = 1), bias_act, act_backward and column_sums take the members
  on gridDim.z (at most ``MAX_GRID_Z``, grid-stride beyond); the row-wise kernels take the members' rows
  as one range of K * B rows, and mean_of_rows a block per member.

Pure arithmetic on sizes: importing it imports no CuPy.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltaprop.kernels.activations import ACTIVATIONS

THREADS = 256  # threads per block of the 1-D and row-wise launches
BLOCKS_PER_SM = 16  # grid-stride loops: at most this many blocks per multiprocessor
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y
MAX_GRID_Z = 65535  # CUDA's limit on gridDim.z
ROW_CACHE_BYTES = 40 * 1024  # a block-per-row softmax keeps its row in shared memory up to this size
MEAN_THREADS = 1024  # the one block that reduces the per-row losses
VECTOR_BYTES = 16  # a thread of a flat kernel takes chunks of 16 bytes
COLUMN_TILE = 32  # column_sums: a (COLUMN_TILE, COLUMN_TILE) block per COLUMN_TILE columns
COLUMN_BLOCKS_PER_SM = 2  # column_sums' blocks of 1024 threads that a multiprocessor runs at once
COLUMN_CHUNK_ROWS = 4 * COLUMN_TILE  # the fewest rows in a row chunk of column_sums: 4 per thread row

GROUP_WIDTHS = (1, 2, 4, 8, 16, 32)  # the lanes of a GroupTeam
WARP_ROW_LIMIT = 1024  # rows up to this many elements: a warp per row; beyond, a block
TEAMS = tuple(f"GroupTeam<{w}>" for w in GROUP_WIDTHS) + ("BlockTeam",)

# ---- the C++ template arguments of the instantiations ("{T}" stands for the storage type) ----
TARGETS = {"labels": "LabelTargets<{T}>", "matrix": "MatrixTargets<{T}>"}  # by kind of loss targets
NO_TARGETS = "NoTargets<{T}>"  # softmax_rows without a loss: the plain softmax
# the template arguments of each loss kernel before its targets and its team
LOSS_VARIANTS = {"softmax_xent": (), "sigmoid_xent": ("SigmoidXent",), "squared_error": ("SquaredError",)}


def activation_functor(name: str) -> str:
    """The C++ functor of activation ``name`` (``loader.activation_functors`` defines them)."""
    return f"act_{name}"


ACTIVATION_FUNCTORS = tuple(activation_functor(name) for name in ACTIVATIONS)


@dataclass(frozen=True)
class Launch:
    """One kernel launch's geometry: grid and block (1-D or 2-D), dynamic shared memory in bytes."""

    grid: tuple[int, ...]
    block: tuple[int, ...]
    shared_mem: int = 0


def blocks(count: int, per_block: int) -> int:
    """ceil(count / per_block)."""
    return -(-count // per_block)


def max_blocks(multiprocessors: int) -> int:
    """The most blocks a grid-stride launch uses on a device of ``multiprocessors`` SMs."""
    return multiprocessors * BLOCKS_PER_SM


def flat_launch(n: int, itemsize: int, grid_limit: int) -> Launch:
    """A flat kernel over ``n`` elements of ``itemsize`` bytes: a thread per 16-byte chunk, at most
    ``grid_limit`` blocks."""
    return Launch((min(blocks(blocks(n, VECTOR_BYTES // itemsize), THREADS), grid_limit),), (THREADS,))


def member_grid(members: int, grid_limit: int) -> tuple[int, int]:
    """(gridDim.z for a stack of ``members``, the grid limit left to each z slice of the grid)."""
    grid_z = min(members, MAX_GRID_Z)
    return grid_z, max(grid_limit // grid_z, 1)


def act_backward_launch(members: int, n: int, itemsize: int, grid_limit: int) -> Launch:
    """act_backward over ``members`` of ``n`` elements each: each member as a flat kernel (x), the
    members on z; at most about ``grid_limit`` blocks in all."""
    grid_z, limit = member_grid(members, grid_limit)
    return Launch(flat_launch(n, itemsize, limit).grid + (1, grid_z), (THREADS,))


def bias_act_launch(members: int, rows: int, cols: int, grid_limit: int) -> Launch:
    """bias_act's launch: x over columns (a power of two up to THREADS), y over rows, z over members; at
    most about ``grid_limit`` blocks in all."""
    grid_z, limit = member_grid(members, grid_limit)
    block_x = min(THREADS, 1 << (cols - 1).bit_length())
    block_y = THREADS // block_x
    grid_x = min(blocks(cols, block_x), limit)
    grid_y = min(blocks(rows, block_y), max(limit // grid_x, 1), MAX_GRID_Y)
    return Launch((grid_x, grid_y, grid_z), (block_x, block_y))


def row_team(cols: int) -> tuple[str, int]:
    """The team for rows of ``cols`` elements and its lanes per row (0 for a block per row)."""
    for width in GROUP_WIDTHS:
        if cols <= width:
            return f"GroupTeam<{width}>", width
    if cols <= WARP_ROW_LIMIT:
        return "GroupTeam<32>", 32
    return "BlockTeam", 0


def rows_launch(rows: int, cols: int, accum_itemsize: int, grid_limit: int, caches_row: bool):
    """A row-wise kernel's (team, launch, whether a block keeps its row in shared memory); only a
    ``caches_row`` kernel with a block per row ever does."""
    team, lanes = row_team(cols)
    if lanes:
        return team, Launch((min(blocks(rows * lanes, THREADS), grid_limit),), (THREADS,)), False
    row_bytes = cols * accum_itemsize
    cache = caches_row and row_bytes <= ROW_CACHE_BYTES
    return team, Launch((min(rows, grid_limit),), (THREADS,), row_bytes if cache else 0), cache


@dataclass(frozen=True)
class ColumnSumsLaunch:
    """column_sums (bias_grad) over (column tiles, row chunks of ``chunk_rows``, members); with several
    chunks, ``second`` adds each column's ``chunks`` chunk sums (column_sums_of_partials), else it is None."""

    first: Launch
    chunk_rows: int
    chunks: int
    second: Launch | None


def column_sums_launch(members: int, rows: int, cols: int, grid_limit: int) -> ColumnSumsLaunch:
    """A block per COLUMN_TILE columns; where those tiles would not fill the device (COLUMN_BLOCKS_PER_SM
    per multiprocessor), the rows are split into chunks of at least COLUMN_CHUNK_ROWS to fill it. Each of
    ``members`` gets the chunks one member would (so its sums are added as a 2-D call adds them)."""
    tiles = min(blocks(cols, COLUMN_TILE), grid_limit)
    device_blocks = max(grid_limit * COLUMN_BLOCKS_PER_SM // BLOCKS_PER_SM, 1)
    chunks = max(min(device_blocks // tiles, rows // COLUMN_CHUNK_ROWS, MAX_GRID_Y), 1)
    chunk_rows = blocks(rows, chunks)
    chunks = blocks(rows, chunk_rows)
    return column_chunks_launch(members, cols, chunk_rows, chunks, tiles)


def column_chunks_launch(members: int, cols: int, chunk_rows: int, chunks: int, tiles: int) -> ColumnSumsLaunch:
    """column_sums over ``tiles`` blocks of columns (grid-stride beyond), ``chunks`` row chunks and the
    members on z."""
    block, grid_z = (COLUMN_TILE, COLUMN_TILE), min(members, MAX_GRID_Z)
    second = Launch((tiles, 1, grid_z), block) if chunks > 1 else None
    return ColumnSumsLaunch(Launch((tiles, chunks, grid_z), block), chunk_rows, chunks, second)


def mean_launch(members: int, grid_limit: int) -> Launch:
    """mean_of_rows: a block per member (grid-stride beyond ``grid_limit``) reduces its rows' losses."""
    return Launch((min(members, grid_limit),), (MEAN_THREADS,))
